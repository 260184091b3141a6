"""Several workers on one study: every slot trained exactly once, kill -9 loses nothing, failures
are recorded. Workers are real `sweep.py` processes; only `train` is replaced by a cheap stand-in
(`fake_train`), so these tests exercise the queue, not the models (test_sweep.py trains for real)."""
import json
import math
import os
import re
import signal
import subprocess
import sys
import time
import uuid
from collections import Counter
from pathlib import Path

import optuna
import pytest
import torch
from optuna.trial import TrialState

import sweep
from sweeps.spec import Sweep, from_overrides

ROOT = Path(__file__).resolve().parents[1]
GRID = 'sweep.grid=["model=attention,mamba2","model.d_model=16,32,64","optimizer.lr=1e-3,3e-3"]'
HANG = "model=mamba2,model.d_model=32,optimizer.lr=0.001"  # the slot the killed worker was training


def fake_train(cfg, callbacks=()):
    """Stand-in for run.train: logs start/end per run dir, sleeps, returns a made-up accuracy.

    Env: FAKE_LOG (required), FAKE_SLEEP (s), FAKE_HANG (run dir name: the first attempt hangs
    until killed), FAKE_FAIL / FAKE_NAN (run dir names: raise / return NaN).
    """
    run_dir = Path(cfg.run_dir)
    log = Path(os.environ["FAKE_LOG"])
    _append(log, f"start {run_dir.name}")
    if run_dir.name == os.environ.get("FAKE_HANG"):
        marker = log.with_suffix(".hung")
        if not marker.exists():
            marker.touch()
            time.sleep(3600)
    time.sleep(float(os.environ.get("FAKE_SLEEP", "0.1")))
    if run_dir.name == os.environ.get("FAKE_FAIL"):
        raise RuntimeError("boom: injected failure")
    acc = math.nan if run_dir.name == os.environ.get("FAKE_NAN") else cfg.model.d_model / 100
    run_dir.mkdir(parents=True, exist_ok=True)
    (run_dir / "metrics.json").write_text(json.dumps({"test/acc": acc}))
    _append(log, f"end {run_dir.name}")
    return {"test/acc": acc, "model/state_size": 1.0}


def _append(path, line):
    with open(path, "a") as f:  # one short O_APPEND write per line: atomic between processes
        f.write(line + "\n")


def worker_main():
    """Entry point of a worker subprocess: sweep.py with fake_train. FAKE_GPUS simulates the host's
    GPU count; as with CUDA, a process sees only the GPUs its CUDA_VISIBLE_DEVICES names."""
    if "FAKE_GPUS" in os.environ:
        visible = os.environ.get("CUDA_VISIBLE_DEVICES")
        count = len(visible.split(",")) if visible else int(os.environ["FAKE_GPUS"])
        torch.cuda.device_count = lambda: count
    sweep.main(sys.argv[1:], train=fake_train)


def args(tmp_path, *extra, storage=None, study=None):
    out = ["sweep=smoke", GRID, f"sweep.dir={tmp_path / 'sweep'}", "sweep.heartbeat_interval=1",
           "sweep.grace_period=3", *extra]
    if storage:
        out.append(f"sweep.storage={storage}")
    if study:
        out.append(f"sweep.study_name={study}")
    return out


def start(tmp_path, argv, **env):
    environment = {**os.environ, "FAKE_LOG": str(tmp_path / "train.log"), **env}
    code = "from tests.test_sweep_workers import worker_main; worker_main()"
    return subprocess.Popen([sys.executable, "-c", code, *argv], cwd=ROOT, env=environment,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)


def finish(proc, timeout=180):
    out, _ = proc.communicate(timeout=timeout)
    assert proc.returncode == 0, out
    return out


def spec(argv) -> Sweep:
    return from_overrides(argv)


def load(argv):
    s = spec(argv)
    return s, optuna.load_study(study_name=s.study_name, storage=s.storage)


def log_lines(tmp_path):
    log = tmp_path / "train.log"
    return Counter(log.read_text().splitlines() if log.exists() else [])


def assert_exactly_the_grid(s: Sweep, study, log):
    trials = study.get_trials()
    complete = [t for t in trials if t.state == TrialState.COMPLETE]
    slots = [t.user_attrs["slot"] for t in complete]
    assert sorted(slots) == sorted(x.key for x in s.slots()), slots
    assert not [t for t in trials if "duplicate_of" in t.user_attrs], "a slot was enqueued twice"
    assert not [t for t in trials if t.state in (TrialState.RUNNING, TrialState.WAITING)]
    ends = [line for line in log if line.startswith("end ")]
    assert all(log[line] == 1 for line in ends), log  # no slot trained to the end twice
    assert len(ends) == len(s.slots())


def test_three_workers_on_one_sqlite_study_train_each_slot_once(tmp_path):
    argv = args(tmp_path)
    workers = [start(tmp_path, argv, FAKE_SLEEP="0.3") for _ in range(3)]
    outputs = [finish(w) for w in workers]
    s, study = load(argv)
    assert_exactly_the_grid(s, study, log_lines(tmp_path))
    assert len(s.slots()) == 12
    # The work was shared: at least two workers trained something.
    assert sum("] trial " in out for out in outputs) >= 2, outputs


def test_one_command_starts_workers_on_every_gpu_of_the_host(tmp_path):
    """On a host of 2 (simulated) GPUs with sweep.workers_per_gpu=2, one command starts 4 worker
    processes, 2 on each GPU, which share the study as any workers do."""
    argv = args(tmp_path, "sweep.workers_per_gpu=2")
    out = finish(start(tmp_path, argv, FAKE_SLEEP="0.3", FAKE_GPUS="2"))
    s, study = load(argv)
    assert_exactly_the_grid(s, study, log_lines(tmp_path))
    assert sorted(re.findall(r"worker \S+ on GPU (\d+):", out)) == ["0", "0", "1", "1"], out
    trials = [t for t in study.get_trials() if t.state == TrialState.COMPLETE]
    assert {t.user_attrs["gpu"] for t in trials} <= {"0", "1"}
    assert len({t.user_attrs["worker"] for t in trials}) >= 2  # the work was shared


def test_kill_9_then_rerun_continues_and_retries_the_interrupted_trial(tmp_path):
    argv = args(tmp_path)
    first = start(tmp_path, argv, FAKE_HANG=HANG)
    deadline = time.time() + 120
    while f"start {HANG}" not in log_lines(tmp_path):
        assert time.time() < deadline and first.poll() is None, first.communicate()[0]
        time.sleep(0.2)
    first.send_signal(signal.SIGKILL)
    first.communicate()
    before = log_lines(tmp_path)
    done_before = {line[4:] for line in before if line.startswith("end ")}
    assert done_before, "some trials completed before the kill"

    finish(start(tmp_path, argv, FAKE_HANG=HANG))
    s, study = load(argv)
    log = log_lines(tmp_path)
    assert_exactly_the_grid(s, study, log)
    for name in done_before:  # completed before the kill: not trained again
        assert log[f"start {name}"] == 1
    assert log[f"start {HANG}"] == 2  # the interrupted one, retried
    killed = [t for t in study.get_trials() if t.state == TrialState.FAIL]
    assert len(killed) == 1 and killed[0].user_attrs["slot"] == HANG
    retry = next(t for t in study.get_trials(states=(TrialState.COMPLETE,))
                 if t.user_attrs["slot"] == HANG)
    assert retry.system_attrs.get("failed_trial") == killed[0].number
    assert retry.params == killed[0].params


def test_failed_trials_are_recorded_with_a_reason_and_the_sweep_goes_on(tmp_path, monkeypatch):
    fail = "model=attention,model.d_model=16,optimizer.lr=0.003"
    nan = "model=mamba2,model.d_model=64,optimizer.lr=0.001"
    monkeypatch.setenv("FAKE_LOG", str(tmp_path / "train.log"))
    monkeypatch.setenv("FAKE_FAIL", fail)
    monkeypatch.setenv("FAKE_NAN", nan)
    argv = args(tmp_path)
    sweep.main(argv, train=fake_train)
    s, study = load(argv)
    by_slot = {t.user_attrs["slot"]: t for t in study.get_trials()}
    assert len(by_slot) == 12
    assert by_slot[fail].state == TrialState.FAIL
    assert by_slot[fail].user_attrs["fail_reason"] == "RuntimeError: boom: injected failure"
    assert by_slot[nan].state == TrialState.FAIL
    assert by_slot[nan].user_attrs["fail_reason"].startswith("ValueError: test/acc=nan")
    assert sum(t.state == TrialState.COMPLETE for t in by_slot.values()) == 10
    # Running again retrains nothing: failed slots stay failed (their reason is the result).
    sweep.main(argv, train=fake_train)
    assert len(load(argv)[1].get_trials()) == 12


def test_tpe_search_inside_each_cell(tmp_path, monkeypatch):
    monkeypatch.setenv("FAKE_LOG", str(tmp_path / "train.log"))
    argv = ["sweep=smoke", f"sweep.dir={tmp_path / 'sweep'}", 'sweep.grid=["model.d_model=16,32"]',
            'sweep.search=["optimizer.lr=tag(log,interval(1e-4,1e-2))"]', "sweep.trials_per_cell=3",
            "sweep.report.best_over=[]", "sweep.report.hue=null"]
    sweep.main(argv, train=fake_train)
    s, study = load(argv)
    trials = study.get_trials(states=(TrialState.COMPLETE,))
    assert Counter(t.params["model.d_model"] for t in trials) == {16: 3, 32: 3}
    assert all(1e-4 <= t.params["optimizer.lr"] <= 1e-2 for t in trials)
    assert len({t.params["optimizer.lr"] for t in trials}) == 6
    # Each trial's directory is named by its cell, its index in the cell and its sampled LR.
    assert all(Path(t.user_attrs["run_dir"]).name.startswith(f"model.d_model={t.params['model.d_model']}#")
               for t in trials)


POSTGRES = os.environ.get("MIXERLAB_TEST_POSTGRES_URL")


@pytest.mark.skipif(not POSTGRES, reason="MIXERLAB_TEST_POSTGRES_URL is not set (.ci/postgres.sh)")
def test_three_workers_on_one_postgres_study_train_each_slot_once(tmp_path):
    argv = args(tmp_path, storage=POSTGRES, study=f"test-{uuid.uuid4().hex[:12]}")
    try:
        workers = [start(tmp_path, argv, FAKE_SLEEP="0.3") for _ in range(3)]
        for w in workers:
            finish(w)
        s, study = load(argv)
        assert_exactly_the_grid(s, study, log_lines(tmp_path))
    finally:
        optuna.delete_study(study_name=spec(argv).study_name, storage=POSTGRES)
