"""The command line, as a user meets it: a mistake is one line naming the key, the bad value and what
is allowed (exit 2, nothing written); a resume continues the same run; a diverged run stops with one
line; a run's output is quiet and its files are the README's."""
import json
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml
from omegaconf import OmegaConf

from tests.conftest import assert_user_error

ROOT = Path(__file__).resolve().parents[1]
# 640 examples: 10 steps an epoch.
TINY = ["task.num_train=640", "task.num_val=100", "task.num_test=100", "model.d_model=32",
        "trainer.log_every_n_steps=5"]


def cli(script, *args, cwd=ROOT):
    return subprocess.run([sys.executable, str(ROOT / script), *args], cwd=cwd, capture_output=True, text=True,
                          timeout=300)


def one_error_line(proc, code=2) -> str:
    errors = [line for line in proc.stderr.splitlines() if line.startswith("error: ")]
    assert proc.returncode == code, proc.stderr
    assert len(errors) == 1 and "Traceback" not in proc.stderr + proc.stdout, proc.stderr
    return errors[0]


def snapshot(run_dir: Path) -> dict:
    return {p.relative_to(run_dir): p.read_bytes() for p in sorted(run_dir.rglob("*")) if p.is_file()}


def strict_json(path: Path) -> dict:
    def refuse(constant):
        raise ValueError(f"{constant} is not JSON")
    return json.loads(path.read_text(), parse_constant=refuse)


BAD = {
    "unknown-task": (["task=foo"], ["task=foo", "mqar"]),
    "unknown-model": (["model=mamba3"], ["model=mamba3", "mamba2"]),
    "unknown-key": (["task.seqlen=128"], ["task.seqlen", "seq_len"]),
    "non-numeric": (["model.d_state=abc"], ["model.d_state", "abc", "positive integer"]),
    "non-positive": (["task.seq_len=0"], ["task.seq_len", "0"]),
    "kv-pairs-dont-fit": (["task.num_kv_pairs=40"], ["task.num_kv_pairs", "40", "seq_len"]),
    "headdim": (["model.headdim=48"], ["model.headdim", "48"]),
    "n-heads": (["model=attention", "model.n_heads=3"], ["model.n_heads", "3", "d_model"]),
    "vocab-too-small": (["task.vocab_size=32"], ["task.vocab_size", "32"]),
    "distill-preset": (["experiment=mohawk_smoke"], ["stage1", "distill.py"]),
    "missing-checkpoint": (["ckpt_path=/nonexistent.ckpt"], ["ckpt_path", "/nonexistent.ckpt"]),
    "norm": (["model.norm=batchnorm"], ["model.norm='batchnorm'", "rmsnorm, layernorm"]),
    "init": (["model.init=xavier"], ["model.init='xavier'", "mixer, normal"]),
    "weight-decay-on": (["weight_decay_on=norms"], ["weight_decay_on='norms'", "all, matrices"]),
    "curriculum-stage": (["task.curriculum=[{epochs:2,num_kv_pairs:16}]"],
                         ["task.curriculum[0].num_kv_pairs=16", "seq_len=32"]),
    "optimizer-names-the-key": (["optimizer.lr=-1"], ["optimizer.lr=-1:", "learning rate"]),
    "trainer-rejects": (["trainer.max_epochs=-5"], ["trainer.max_epochs=-5:", "non-negative"]),
    "trainer-type": (["trainer.max_epochs=ten"], ["trainer.max_epochs='ten':", "int or null"]),
    "trainer-choice": (["trainer.precision=16x"], ["trainer.precision='16x':", "'bf16-mixed'"]),
    "trainer-unknown-argument": (["+trainer.max_epoch=3"], ["trainer.max_epoch=3:", "unexpected"]),
    "test-lengths-past-positions": (["task=induction_heads", "model=attention", "task.test_seq_lens=[128]"],
                                    ["task.test_seq_lens=[128]:", "model.max_seqlen=64", "model.pos=none"]),
}


@pytest.mark.parametrize("case", BAD)
def test_bad_input_is_one_clear_line(case, tmp_path):
    overrides, expected = BAD[case]
    assert_user_error("run.py", overrides, expected, tmp_path / "run")


@pytest.mark.skipif(torch.cuda.is_available(), reason="this machine has a GPU")
@pytest.mark.parametrize("script, preset", [("run.py", "experiment=zoology_fig2"),
                                            ("distill.py", "experiment=mohawk_mqar")])
def test_a_gpu_preset_on_a_cpu_machine_says_how_to_run_it_there(script, preset, tmp_path):
    assert_user_error(script, [preset], ["trainer.accelerator=gpu:", "no GPU", "trainer=cpu"], tmp_path / "run")


@pytest.fixture(scope="module")
def finished(tmp_path_factory):
    """A tiny run made on the command line (one epoch, 10 steps): (run dir, the process)."""
    run_dir = tmp_path_factory.mktemp("cli") / "run"
    proc = cli("run.py", *TINY, "trainer.max_epochs=1", f"hydra.run.dir={run_dir}")
    assert proc.returncode == 0, proc.stderr
    return run_dir, proc


def test_a_run_is_quiet_and_writes_the_files_the_readme_lists(finished):
    run_dir, proc = finished
    output = proc.stdout + proc.stderr
    for noise in ("flops_per_batch", "LeafSpec", "Tip:", "stepping batches", "\r"):  # \r: a progress bar
        assert noise not in output, noise
    names = {p.name for p in run_dir.iterdir()}
    assert {"config.yaml", "checkpoints", "metrics.json", "hparams.yaml"} <= names
    assert not names & {"run.log", ".hydra"}, names
    assert {p.name for p in (run_dir / "checkpoints").iterdir()} == {"best.ckpt", "last.ckpt"}
    hparams = yaml.safe_load((run_dir / "hparams.yaml").read_text())
    assert hparams["trainer.max_epochs"] == 1 and hparams["optimizer.lr"] == 0.01 and hparams["seed"] == 0
    assert "ckpt_path" not in hparams and "run_dir" not in hparams
    assert strict_json(run_dir / "metrics.json")["train/steps"] == 10


def test_help_lists_the_groups_of_this_script_only():
    proc = cli("run.py", "--help")
    groups = proc.stdout.split("== Config groups", 1)[1].split("==\n", 1)[1].split("\n\n", 1)[0]
    listed = dict(line.split(": ", 1) for line in groups.strip().splitlines())
    assert listed.keys() == {"task", "model", "trainer", "logger", "scheduler", "experiment"}, groups
    assert listed["scheduler"] == "stepped_linear, warmup_cosine"
    assert "zoology_fig2" in listed["experiment"] and "mohawk" not in listed["experiment"]


def test_an_untrained_run_still_writes_strict_json(tmp_path):
    proc = cli("run.py", *TINY, "trainer.max_epochs=0", f"hydra.run.dir={tmp_path / 'run'}")
    assert proc.returncode == 0, proc.stderr
    metrics = strict_json(tmp_path / "run" / "metrics.json")
    assert metrics["val/acc_best"] is None and metrics["train/steps"] == 0


def test_a_diverged_run_stops_at_once_with_one_line(tmp_path):
    proc = cli("run.py", *TINY, "optimizer.lr=1e6", "trainer.max_epochs=3", f"hydra.run.dir={tmp_path / 'run'}")
    line = one_error_line(proc, code=1)
    assert re.search(r"train/loss=(nan|-?inf) at step \d+: training diverged; lower optimizer.lr \(now 1000000.0\)",
                     line), line
    assert not (tmp_path / "run" / "metrics.json").exists()


# -- resuming: the same run ----------------------------------------------------------------------
def test_a_finished_run_says_so_and_stays_as_it_is(finished):
    run_dir, _ = finished
    before = snapshot(run_dir)
    proc = cli("run.py", f"hydra.run.dir={run_dir}", "ckpt_path=last")
    assert proc.returncode == 0, proc.stderr
    assert "finished already" in proc.stdout and "trainer.max_epochs (now 1)" in proc.stdout
    assert snapshot(run_dir) == before


@pytest.mark.parametrize("overrides, expected", [
    (["task.seq_len=64", "task.vocab_size=128"], ["task.seq_len=64:", "task.seq_len=32", "may change only"]),
    (["model=attention"], ["model.mixer='attention':", "model.mixer='mamba2'"]),
    (["trainer.max_epochs=0"], ["trainer.max_epochs=0:", "trainer.max_epochs=1", "not lower it"]),
], ids=["task", "model", "shorter"])
def test_a_resume_that_would_change_the_run_is_one_line(overrides, expected, finished):
    run_dir, _ = finished
    before = snapshot(run_dir)
    line = one_error_line(cli("run.py", f"hydra.run.dir={run_dir}", "ckpt_path=last", *overrides))
    for word in expected:
        assert word in line, line
    assert snapshot(run_dir) == before


def test_a_run_dir_that_holds_a_run_is_refused_unless_resumed(finished):
    run_dir, _ = finished
    before = snapshot(run_dir)
    line = one_error_line(cli("run.py", *TINY, f"hydra.run.dir={run_dir}"))
    assert f"hydra.run.dir={run_dir}: already holds a run" in line and "ckpt_path=last" in line
    assert snapshot(run_dir) == before


def test_resume_needs_the_run_dir_of_a_run_with_a_checkpoint(tmp_path):
    line = one_error_line(cli("run.py", "ckpt_path=last", cwd=tmp_path))
    assert "ckpt_path=last:" in line and "hydra.run.dir=<its directory>" in line
    assert not (tmp_path / "runs").exists()


class NotAWeight:
    """Pickled into a checkpoint, it makes the file unsafe to load (weights_only refuses it)."""


BAD_CHECKPOINTS = {
    "not-a-checkpoint": (lambda good, path: path.write_text("hello"), "not a checkpoint"),
    "cut-short": (lambda good, path: path.write_bytes(good.read_bytes()[: good.stat().st_size // 2]),
                  "not a checkpoint"),
    "unsafe": (lambda good, path: torch.save({"state_dict": {}, "loops": {}, "x": NotAWeight()}, path),
               "cannot load"),
    "another-model": (lambda good, path: torch.save({"state_dict": {"net.w": torch.zeros(1)}, "loops": {}}, path),
                      "another model"),
}


@pytest.mark.parametrize("case", BAD_CHECKPOINTS)
def test_a_checkpoint_is_checked_before_anything_is_written(case, finished, tmp_path):
    make, expected = BAD_CHECKPOINTS[case]
    path = tmp_path / "x.ckpt"
    make(finished[0] / "checkpoints" / "last.ckpt", path)
    assert_user_error("run.py", [f"ckpt_path={path}"], [f"ckpt_path='{path}':", expected], tmp_path / "run")


def test_resume_restores_the_runs_own_config_and_trains_on(tmp_path):
    run_dir = tmp_path / "run"
    assert cli("run.py", *TINY, "trainer.max_epochs=1", f"hydra.run.dir={run_dir}").returncode == 0
    # The README's form: only the run dir, and what may change (TINY is not repeated).
    proc = cli("run.py", f"hydra.run.dir={run_dir}", "ckpt_path=last", "trainer.max_epochs=2")
    assert proc.returncode == 0, proc.stderr
    cfg = OmegaConf.load(run_dir / "config.yaml")
    assert (cfg.trainer.max_epochs, cfg.task.num_train, cfg.model.d_model) == (2, 640, 32)
    metrics = strict_json(run_dir / "metrics.json")
    assert (metrics["train/steps"], metrics["train/epochs"]) == (20, 2)
    assert {p.name for p in (run_dir / "checkpoints").iterdir()} == {"best.ckpt", "last.ckpt"}
