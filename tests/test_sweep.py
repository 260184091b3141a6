"""`sweep.py`: the smoke sweep trains for real end to end, reports, feeds the notebook; every preset
composes and builds; a bad sweep config fails fast in one line; the Optuna plumbing (pruning
callback, per-cell TPE view) behaves."""
import csv
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import lightning as L
import nbformat
import optuna
import pytest
import torch
from nbclient import NotebookClient
from optuna.trial import TrialState
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

import sweep
from sweeps import driver, report
from training import run
from sweeps.callbacks import OptunaPruning
from sweeps.spec import from_overrides
from sweeps.study import CellView
from tests.conftest import assert_one_error_line

ROOT = Path(__file__).resolve().parents[1]
PRESETS = sorted(p.stem for p in (ROOT / "conf" / "sweep").glob("*.yaml") if p.stem != "base")


@pytest.fixture(scope="module")
def smoke(tmp_path_factory):
    """The smoke sweep, trained for real (4 trials on the CPU), shared by the tests below."""
    argv = ["sweep=smoke", f"sweep.dir={tmp_path_factory.mktemp('smoke')}"]
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # models this small only lose time to thread hand-offs, more so on a busy runner
    try:
        sweep.main(argv)
    finally:
        torch.set_num_threads(threads)
    spec = from_overrides(argv)
    return argv, spec, optuna.load_study(study_name=spec.study_name, storage=spec.storage)


def test_smoke_sweep_trains_every_cell_once(smoke):
    argv, spec, study = smoke
    trials = study.get_trials()
    assert [t.state for t in trials] == [TrialState.COMPLETE] * 4
    assert {(t.params["model"], t.params["model.d_model"]) for t in trials} == \
        {("attention", 16), ("attention", 32), ("mamba2", 16), ("mamba2", 32)}
    for t in trials:
        run_dir = Path(t.user_attrs["run_dir"])
        assert run_dir.parent == spec.dir / "trials"
        model, width = t.params["model"], t.params["model.d_model"]
        assert run_dir.name == f"model={model},model.d_model={width},optimizer.lr=0.003"
        assert (run_dir / "metrics.json").is_file()
        assert "val/acc" in EventAccumulator(str(run_dir)).Reload().Tags()["scalars"]
        assert 0 <= t.value <= 1 and t.value == t.user_attrs["test/acc"]
        assert t.user_attrs["model/state_size"] > 0
    # The same command again finds nothing to do.
    sweep.main(argv)
    assert len(study.get_trials()) == 4


def test_report_writes_the_figure_and_the_table(smoke, capsys):
    argv, spec, _ = smoke
    sweep.main([*argv, "action=report"])
    png, table = (Path(line) for line in capsys.readouterr().out.split())
    assert png.suffix == ".png" and png.stat().st_size > 5000 and png.read_bytes()[:4] == b"\x89PNG"
    rows = list(csv.DictReader(table.open()))
    assert [(r["model"], r["model.d_model"]) for r in rows] == \
        [("attention", "16"), ("attention", "32"), ("mamba2", "16"), ("mamba2", "32")]
    assert all(0 <= float(r["value"]) <= 1 and r["n_complete"] == "1" for r in rows)


def test_report_draws_and_tabulates_the_papers_values_beside_ours(smoke, capsys):
    """Where the preset gives the paper's values, each cell's CSV row has them and ours minus them
    (empty where the paper gives none), and the figure has a dashed line of the paper's points."""
    argv, spec, study = smoke
    paper = "sweep.paper={source:test,values:{attention:{16:0.25,32:0.5}}}"
    sweep.main([*argv, paper, "action=report"])
    png, table = (Path(line) for line in capsys.readouterr().out.split())
    rows = {(r["model"], r["model.d_model"]): r for r in csv.DictReader(table.open())}
    for width, value in (("16", 0.25), ("32", 0.5)):
        row = rows["attention", width]
        assert float(row["paper"]) == value
        assert float(row["difference"]) == pytest.approx(float(row["value"]) - value)
    assert rows["mamba2", "16"]["paper"] == rows["mamba2", "16"]["difference"] == ""
    spec = from_overrides([*argv, paper])
    figure, header, _ = report.layout(spec, report.best_per_cell(spec, report.trial_rows(study)))
    assert header[:5] == ["model", "model.d_model", "test/acc", "paper", "difference"]
    dashed = [line for ax in figure.axes for line in ax.lines if line.get_linestyle() == "--"]
    assert [list(line.get_ydata()) for line in dashed] == [[0.25, 0.5], []]  # attention's; the legend's


def test_the_analysis_notebook_runs_against_the_smoke_study(smoke, monkeypatch):
    argv, spec, _ = smoke
    monkeypatch.setenv("MIXERLAB_SWEEP_OVERRIDES", " ".join(argv))
    notebook = nbformat.read(ROOT / "notebooks" / "sweep_analysis.ipynb", as_version=4)
    NotebookClient(notebook, timeout=300, kernel_name="python3",
                   resources={"metadata": {"path": str(ROOT / "notebooks")}}).execute()
    outputs = [o for cell in notebook.cells if cell.cell_type == "code" for o in cell.outputs]
    assert sum("image/png" in o.get("data", {}) for o in outputs) == 2
    assert any("4 trials, 4 cells" in o.get("text", "") for o in outputs)


def test_a_study_made_with_other_train_settings_is_refused(smoke, capsys):
    argv, _, _ = smoke
    with pytest.raises(SystemExit) as exit_:
        sweep.main([*argv, "trainer.max_epochs=1"])
    assert exit_.value.code == 2
    assert "sweep.train: study 'smoke' was run with" in capsys.readouterr().err


# A GPU preset on a machine without one is refused (run.check_trainer); CI builds it for the CPU.
ON_THIS_MACHINE = [] if torch.cuda.is_available() else ["trainer=cpu"]


@pytest.mark.parametrize("preset", PRESETS)
def test_every_preset_composes_and_builds_every_cell(preset):
    spec = from_overrides([f"sweep={preset}", *ON_THIS_MACHINE])
    driver.check_cells(spec)
    assert spec.slots() and len({s.key for s in spec.slots()}) == len(spec.slots())


def grid(*axes):
    """The smoke grid plus `axes` (the report still finds its x and hue axes)."""
    smoke = ["model=attention,mamba2", "model.d_model=16,32", "optimizer.lr=3e-3"]
    quoted = ",".join(f'"{a}"' for a in [*smoke, *axes])
    return f"sweep.grid=[{quoted}]"


BAD = {
    "unknown-grid-key": ([grid("model.d_modle=16,32")], ["model.d_modle", "unknown key", "d_model"]),
    "impossible-cell": ([grid("task.num_kv_pairs=4,40")], ["task.num_kv_pairs=40", "seq_len"]),
    "empty-grid": (["sweep.grid=[]"], ["sweep.grid=[]", "empty"]),
    "interval-in-grid": ([grid("optimizer.lr=interval(1e-4,1e-2)")], ["sweep.grid[3]", "sweep.search"]),
    "hydra-override": (["hydra.run.dir=/tmp/x"], ["hydra.run.dir=/tmp/x", "no hydra.* overrides", "sweep.dir"]),
    "unknown-sweep-key": (["sweep.n_trails=3"], ["sweep.n_trails", "n_trials"]),
    "unknown-preset": (["sweep=nope"], ["sweep=nope", "smoke"]),
    "bad-action": (["action=plot"], ["action='plot'", "report"]),
    "too-many-trials": (["sweep.n_trials=10"], ["sweep.n_trials=10", "4 cells"]),
    "report-axis": (["sweep.report.x=model.d_state"], ["sweep.report.x='model.d_state'", "model.d_model"]),
    "paper-label": (["sweep.paper={source:x,values:{mamba3:{16:0.5}}}"],
                    ["sweep.paper.values.mamba3", "not a label of axis 'model'", "mamba2"]),
    "paper-value": (["sweep.paper={source:x,values:{mamba2:{16:50}}}"],
                    ["sweep.paper.values.mamba2.16=50", "accuracy in [0, 1]"]),
    "workers-per-gpu": (["sweep.workers_per_gpu=0"], ["sweep.workers_per_gpu=0", "positive integer"]),
    "storage-scheme": (["sweep.storage=nosuchdb://x/y"], ["sweep.storage='nosuchdb://x/y'", "cannot open"]),
    "storage-unreachable": (["sweep.storage=postgresql+psycopg2://u:p@127.0.0.1:9/db"],
                            ["sweep.storage=", "cannot open"]),
}


@pytest.mark.parametrize("case", BAD)
def test_a_bad_sweep_config_fails_fast_in_one_line(case, tmp_path, capsys):
    overrides, expected = BAD[case]
    with pytest.raises(SystemExit) as exit_:
        sweep.main(["sweep=smoke", f"sweep.dir={tmp_path / 'sweep'}", *overrides],
                   train=lambda cfg, callbacks=(): pytest.fail("must fail before training"))
    assert exit_.value.code == 2
    assert_one_error_line(capsys.readouterr().err, expected)


def test_one_command_places_its_workers_on_every_gpu_it_sees():
    assert driver.worker_gpus(0, 4, None) == []  # no GPU: the command is the one worker
    assert driver.worker_gpus(1, 1, None) == ["0"]
    assert driver.worker_gpus(2, 2, None) == ["0", "0", "1", "1"]
    assert driver.worker_gpus(2, 1, "5, 7") == ["5", "7"]  # its own CUDA_VISIBLE_DEVICES, renamed back


def test_the_command_line_exits_2_with_one_line_and_writes_nothing(tmp_path):
    proc = subprocess.run([sys.executable, "sweep.py", grid("model.d_modle=16"),
                           f"sweep.dir={tmp_path / 'sweep'}"], cwd=ROOT, capture_output=True, text=True,
                          timeout=120)
    lines = [line for line in proc.stderr.splitlines() if line.strip()]
    assert proc.returncode == 2 and len(lines) == 1 and "model.d_modle" in lines[0], proc.stderr
    assert not (tmp_path / "sweep").exists()


def test_report_without_a_study_is_one_line(tmp_path, capsys):
    with pytest.raises(SystemExit):
        sweep.main(["sweep=smoke", f"sweep.dir={tmp_path}", "action=report"])
    assert "no such study" in capsys.readouterr().err
    assert not (tmp_path / "study.db").exists()


def test_a_retried_slot_trains_on_from_its_interrupted_attempts_checkpoint(tmp_path):
    """What a killed worker leaves in a slot's directory (here: one epoch of two, trained for real)
    is resumed by the next attempt, not trained again; a torn checkpoint is started over."""
    argv = ["sweep=smoke", f"sweep.dir={tmp_path}", 'sweep.grid=["model=attention","model.d_model=16","optimizer.lr=3e-3"]']
    spec = from_overrides(argv)
    (slot,) = spec.slots()
    run_dir = spec.run_dir(slot.key, slot.params)
    first = run.compose([*spec.overrides(slot.params), f"run_dir={driver._quoted(run_dir)}", "trainer.max_epochs=1"])
    steps_per_epoch = run.train(first)["train/steps"]
    assert driver.resumable(run_dir) == run_dir / "checkpoints" / "last.ckpt"

    started = []

    class StartStep(L.Callback):
        def on_train_start(self, trainer, module):
            started.append(trainer.global_step)

    sweep.main(argv, train=lambda cfg, callbacks=(): run.train(cfg, callbacks=[*callbacks, StartStep()]))
    study = optuna.load_study(study_name=spec.study_name, storage=spec.storage)
    (trial,) = study.get_trials()
    assert trial.state == TrialState.COMPLETE
    assert trial.user_attrs["resumed_from"] == str(run_dir / "checkpoints" / "last.ckpt")
    assert started == [steps_per_epoch]  # the second attempt began where the first stopped
    assert trial.user_attrs["train/steps"] == 2 * steps_per_epoch

    (run_dir / "checkpoints" / "last.ckpt").write_bytes(b"torn by a kill")
    assert driver.resumable(run_dir) is None


# -- plumbing ------------------------------------------------------------------------------------
def _trainer(acc, step=10):
    return SimpleNamespace(sanity_checking=False, global_step=step, callback_metrics={"val/acc": torch.tensor(acc)})


def test_pruning_callback_reports_val_acc_and_prunes_through_the_study_pruner():
    study = optuna.create_study(direction="maximize", pruner=optuna.pruners.ThresholdPruner(lower=0.5))
    trial = study.ask()
    OptunaPruning(trial).on_validation_end(_trainer(0.8), None)
    assert study.trials[0].intermediate_values == {10: pytest.approx(0.8)}
    with pytest.raises(optuna.TrialPruned, match="val/acc=0.2"):
        OptunaPruning(trial).on_validation_end(_trainer(0.2, step=20), None)


def test_tpe_sees_only_the_trials_of_the_cell():
    study = optuna.create_study()
    for cell, lr in [("a", 1e-3), ("b", 1e-2), ("a", 3e-3)]:
        study.add_trial(optuna.create_trial(params={"lr": lr}, value=lr, user_attrs={"cell": cell},
                                            distributions={"lr": optuna.distributions.FloatDistribution(1e-4, 1e-1)}))
    view = CellView(study, "a")
    assert [t.params["lr"] for t in view.get_trials()] == [1e-3, 3e-3]
    assert [t.params["lr"] for t in view._get_trials(deepcopy=False, states=None, use_cache=False)] == [1e-3, 3e-3]
    assert view.direction == study.direction
