"""The sweep worker: take a waiting slot, train it with `run.train`, tell Optuna, repeat.

Start the same command in as many processes / machines as you like: each is one more worker on
the same study (see sweeps/study.py for why every slot is trained exactly once). A worker leaves
when no slot waits and no other worker's trial is still running: while one runs, its worker might
die, and the trial then comes back as a retry, which resumes from the dead attempt's last checkpoint.
One command also starts the workers of a whole host: `sweep.workers_per_gpu` on every GPU it sees
(`worker_gpus`, `spawn_workers`).
"""
import gc
import itertools
import math
import os
import shutil
import socket
import subprocess
import sys
import time
import zipfile
from pathlib import Path

import optuna
import torch

from sweeps import study as studies
from sweeps.callbacks import OptunaPruning
from sweeps.extrapolate import evaluate_lengths
from sweeps.spec import Sweep, cell_name
from training import run
from training.config import ConfigError, compose, config_errors, describe_compose_error


def check_cells(sweep: Sweep, check=run.build):
    """Compose and build the cells so that a misspelled key or an impossible combination fails
    before anything trains.

    Every combination of the axes that shape the model and data is checked; an axis that only sets
    `optimizer.*` / `scheduler.*` values (the learning rates) is checked value by value, and the
    searched parameters at one value each. Models are built on the meta device (no memory, no init).
    """
    probe = {k: _first(d) for k, d in sweep.search.items()}
    shaping = [a for a in sweep.axes if not _optimiser_only(a)]
    cells = [dict(zip([a.name for a in shaping], labels))
             for labels in itertools.product(*(a.labels for a in shaping))]
    first = {a.name: a.labels[0] for a in sweep.axes}
    cells = [{**first, **c} for c in cells]
    cells += [{**cells[0], a.name: label} for a in sweep.axes if _optimiser_only(a) for label in a.labels[1:]]
    for cell in cells:
        overrides = sweep.overrides({**cell, **probe})
        where = f".grid[{cell_name(cell)}]" if cell else ".search"
        try:
            cfg = compose([*overrides, "run_dir=."])
        except Exception as e:  # Hydra's own error types: turned into run.py's one-line message
            raise ConfigError(f"sweep{where}: {describe_compose_error(e, overrides)}") from None
        try:
            with config_errors(""), torch.device("meta"):
                check(cfg)
        except ConfigError as e:
            raise ConfigError(f"sweep{where}: {e}") from None


def _optimiser_only(axis) -> bool:
    return all(o.startswith(("optimizer.", "scheduler.")) for over in axis.overrides.values() for o in over)


def _first(distribution):
    if isinstance(distribution, optuna.distributions.CategoricalDistribution):
        return distribution.choices[0]
    return distribution.low


def suggest(trial: optuna.Trial, sweep: Sweep) -> dict:
    """The trial's parameters: the grid cell (fixed when it was enqueued), then the searched ones."""
    params = {axis.name: trial.suggest_categorical(axis.name, list(axis.labels)) for axis in sweep.axes}
    for name, dist in sweep.search.items():
        if isinstance(dist, optuna.distributions.CategoricalDistribution):
            params[name] = trial.suggest_categorical(name, dist.choices)
        elif isinstance(dist, optuna.distributions.IntDistribution):
            params[name] = trial.suggest_int(name, dist.low, dist.high, log=dist.log)
        else:
            params[name] = trial.suggest_float(name, dist.low, dist.high, log=dist.log)
    return params


def _quoted(path) -> str:
    """A path as a quoted Hydra override value (trial directories contain '=' and ',')."""
    return "'" + str(path).replace("\\", "\\\\").replace("'", "\\'") + "'"


def _reason(error: BaseException) -> str:
    text = str(error).strip().splitlines()
    return f"{type(error).__name__}: {text[0]}" if text else type(error).__name__


def resumable(run_dir) -> Path | None:
    """The last checkpoint that an interrupted earlier attempt of this slot left, or None when there
    is none or it is cut short (a worker killed while writing it). torch.save writes a zip archive
    whose directory comes last, so checking for that directory reads the file's tail only, not the
    whole checkpoint that Lightning loads again to resume."""
    last = Path(run_dir) / "checkpoints" / "last.ckpt"
    return last if last.is_file() and zipfile.is_zipfile(last) else None


def run_trial(study: optuna.Study, trial: optuna.Trial, sweep: Sweep, train) -> None:
    """Train one trial and tell the study how it ended (COMPLETE, PRUNED or FAIL with a reason)."""
    params = suggest(trial, sweep)
    run_dir = sweep.run_dir(trial.user_attrs["slot"], params)
    # The slot is this trial's alone: anything in its directory is an interrupted earlier attempt.
    # Its training goes on from the last checkpoint (saved at every validation) rather than from
    # scratch, so a killed worker costs at most an epoch; anything else of it is removed.
    last = resumable(run_dir)
    if last is None:
        shutil.rmtree(run_dir, ignore_errors=True)
    else:
        trial.set_user_attr("resumed_from", str(last))
    trial.set_user_attr("run_dir", str(run_dir))
    trial.set_user_attr("worker", _worker())
    trial.set_user_attr("gpu", os.environ.get("CUDA_VISIBLE_DEVICES"))
    callbacks = []
    if sweep.pruner is not None:
        callbacks.append(OptunaPruning(trial, sweep.pruner["monitor"]))
    print(f"[sweep {sweep.study_name}] trial {trial.number} {trial.user_attrs['slot']} -> {run_dir}",
          flush=True)
    try:
        resume = [f"ckpt_path={_quoted(last)}"] if last is not None else []
        cfg = compose([*sweep.overrides(params), f"run_dir={_quoted(run_dir)}", *resume])
        metrics = dict(train(cfg, callbacks=callbacks))
        if sweep.eval is not None:
            metrics.update(evaluate_lengths(cfg, run_dir / "checkpoints" / "best.ckpt", sweep.eval))
        value = metrics.get(sweep.objective)
        if not isinstance(value, (int, float)) or not math.isfinite(value):
            raise ValueError(f"{sweep.objective}={value!r}: the objective is missing or not finite")
    except optuna.TrialPruned as e:
        trial.set_user_attr("prune_reason", str(e))
        study.tell(trial, state=optuna.trial.TrialState.PRUNED)
        return
    except Exception as e:  # NaN loss, out of memory, a bug: recorded, and the sweep goes on
        trial.set_user_attr("fail_reason", _reason(e))
        study.tell(trial, state=optuna.trial.TrialState.FAIL)
        print(f"[sweep {sweep.study_name}] trial {trial.number} failed: {_reason(e)}", flush=True)
        return
    finally:
        gc.collect()
        if torch.cuda.is_available():
            torch.cuda.empty_cache()
    for key, v in metrics.items():
        trial.set_user_attr(key, v)
    study.tell(trial, value)


def worker_gpus(device_count: int, workers_per_gpu: int, visible: str | None) -> list[str]:
    """The CUDA_VISIBLE_DEVICES of each worker one command starts: `workers_per_gpu` on each of the
    `device_count` GPUs this process sees, named as its own CUDA_VISIBLE_DEVICES names them (so
    `CUDA_VISIBLE_DEVICES=2,3 python sweep.py ...` keeps to GPUs 2 and 3); none without a GPU."""
    names = [n.strip() for n in visible.split(",")][:device_count] if visible else [str(i) for i in range(device_count)]
    return [name for name in names for _ in range(workers_per_gpu)]


def spawn_workers(argv: list[str], gpus: list[str]) -> int:
    """Start this process's own command once per entry of `gpus`, each child on that GPU alone and
    one worker (`sweep.workers_per_gpu=1`), and wait for them all; the children share the study as
    any workers do. On Ctrl-C it stops the children (their trials come back as retries). Returns
    the first non-zero exit status of a child, else 0."""
    command = [sys.executable, *sys.orig_argv[1:len(sys.orig_argv) - len(sys.argv) + 1]]  # python sweep.py
    argv = [a for a in argv if not a.startswith("sweep.workers_per_gpu=")] + ["sweep.workers_per_gpu=1"]
    children = [subprocess.Popen([*command, *argv], env={**os.environ, "CUDA_VISIBLE_DEVICES": gpu}) for gpu in gpus]
    try:
        codes = [child.wait() for child in children]
    finally:
        for child in children:
            if child.poll() is None:
                child.terminate()
    return next((code for code in codes if code), 0)


def work(sweep: Sweep, train=run.train, poll_s: float | None = None) -> None:
    """Run trials of `sweep` until its queue is empty and no other worker is mid-trial.

    `train(cfg, callbacks=[...]) -> metrics` trains one trial (tests pass a cheap stand-in).
    """
    sampler, pruner = studies.sampler_and_pruner(sweep)
    study, storage = studies.open_study(sweep, sampler, pruner)
    added = studies.enqueue_missing(study, sweep)
    gpu = os.environ.get("CUDA_VISIBLE_DEVICES")
    print(f"[sweep {sweep.study_name}] worker {_worker()}{f' on GPU {gpu}' if gpu else ''}: {len(sweep.slots())} "
          f"slots, {added} newly enqueued; storage {studies.shown(sweep.storage)}", flush=True)
    poll_s = poll_s if poll_s is not None else min(10.0, sweep.heartbeat_interval)
    while True:
        studies.fail_stale(study, sweep)
        trial = studies.pop(study, storage, sweep)
        if trial is None:
            if not studies.others_running(study):
                break
            time.sleep(poll_s)  # another worker is mid-trial; should it die, its retry comes here
            continue
        # Trial has no public id; the storage API needs it.
        with studies.heartbeat(storage, trial._trial_id, sweep.heartbeat_interval):
            owner = studies.duplicate_of(study, trial)
            if owner is not None:
                trial.set_user_attr("duplicate_of", owner)
                study.tell(trial, state=optuna.trial.TrialState.FAIL)
                continue
            run_trial(study, trial, sweep, train)
    print(f"[sweep {sweep.study_name}] done: " + summary(study), flush=True)


def _worker() -> str:
    return f"{socket.gethostname()}:{os.getpid()}"


def summary(study: optuna.Study) -> str:
    counts = {}
    for t in study.get_trials(deepcopy=False):
        counts[t.state.name] = counts.get(t.state.name, 0) + 1
    return ", ".join(f"{n} {state.lower()}" for state, n in sorted(counts.items()))
