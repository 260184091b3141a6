"""Short end-to-end runs through `train(cfg)`: it learns, writes its artefacts, resumes on the same
schedule, and stops a diverged run before it saves a checkpoint of it."""
import json
import resource
import sys

import lightning as L
import pytest
import torch
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
from tensorboard.plugins.hparams import plugin_data_pb2

from training import run
from training.callbacks import Diverged, FiniteLoss
from training.lit import stepped_linear, warmup_cosine

TINY = ["task.num_train=4000", "task.num_val=200", "task.num_test=200", "task.batch_size=64",
        "trainer.accelerator=cpu", "trainer.enable_progress_bar=false", "trainer.log_every_n_steps=5"]
MQAR = ["task=mqar", "task.vocab_size=64", "task.seq_len=32", "task.num_kv_pairs=4"]


def tiny(tmp_path, *overrides):
    return run.compose([*TINY, f"run_dir={tmp_path}", *overrides])


def test_mqar_learns(tmp_path):
    # One fixed training set: the Mamba recipe's fresh data left this small run (4,000 examples an epoch,
    # lr 3e-3) on the 1/K plateau for longer: test/acc 0.385 after its 10 epochs, where one fixed set reached
    # val/acc 0.6 in 252 steps (test 0.871).
    cfg = tiny(tmp_path, *MQAR, "model=mamba2", "model.d_model=64", "trainer.max_epochs=10",
               "optimizer.lr=3e-3", "target_acc=0.6", "task.fresh_train=false")
    metrics = run.train(cfg)
    # Chance is 1/32 (values come from 32 tokens) and a model that outputs *some* value seen in
    # the context plateaus at 1/K = 0.25: 0.6 on held-out examples means it learned recall.
    assert metrics["test/acc"] >= 0.6, metrics
    assert 0 <= metrics["test/exact"] <= metrics["test/acc"] + 1e-6
    assert metrics["train/steps"] > 0 and metrics["train/seconds"] > 0

    on_disk = json.loads((tmp_path / "metrics.json").read_text())
    assert on_disk["test/acc"] == pytest.approx(metrics["test/acc"])
    assert {"test/acc", "test/loss", "train/steps", "train/seconds"} <= on_disk.keys()
    assert (tmp_path / "config.yaml").is_file()
    assert (tmp_path / "checkpoints" / "last.ckpt").is_file()
    assert (tmp_path / "checkpoints" / "best.ckpt").is_file()

    events = EventAccumulator(str(tmp_path)).Reload()
    tags = set(events.Tags()["scalars"])
    assert {"train/loss", "val/acc", "val/loss"} <= tags, tags
    assert any(t.startswith("lr-") for t in tags) and "train/tokens_per_sec" in tags, tags
    # The test metrics once, at the last step, with the settings (TensorBoard's HParams): typed,
    # the trainer's included, nothing that is the run's own place.
    assert [(e.step, e.value) for e in events.Scalars("test/acc")] == \
        [(metrics["train/steps"], pytest.approx(metrics["test/acc"]))]
    start = plugin_data_pb2.HParamsPluginData.FromString(
        events.SummaryMetadata("_hparams_/session_start_info").plugin_data.content).session_start_info
    assert start.hparams["trainer.max_epochs"].number_value == 10
    assert start.hparams["model.mixer"].string_value == "mamba2"
    assert start.hparams["trainer.enable_progress_bar"].bool_value is False
    assert "ckpt_path" not in start.hparams and "run_dir" not in start.hparams


def test_resume_continues_from_checkpoint_on_the_longer_schedule(tmp_path):
    base = [*MQAR, "task.num_train=640", "model=mamba2", "model.d_model=32", "target_acc=null"]
    first = run.train(tiny(tmp_path, *base, "trainer.max_epochs=1"))
    steps_per_epoch = first["train/steps"]
    second = run.train(tiny(tmp_path, *base, "trainer.max_epochs=2", "ckpt_path=last"))
    # Resumed at the end of epoch 1: only epoch 2's steps are run, the counter carries on.
    assert second["train/steps"] == 2 * steps_per_epoch
    assert second["train/epochs"] == 2
    assert {p.name for p in (tmp_path / "checkpoints").iterdir()} == {"best.ckpt", "last.ckpt"}
    # The schedule is a function of the step and the total: the first epoch followed the 1-epoch
    # cosine, the resumed one the 2-epoch cosine from the step reached (README, "Resuming").
    lr = run.compose(["run_dir=."]).optimizer.lr
    events = EventAccumulator(str(tmp_path)).Reload()
    (tag,) = [t for t in events.Tags()["scalars"] if t.startswith("lr-") and not t.endswith("pg2")]
    logged = {e.step: e.value for e in events.Scalars(tag)}
    for step, value in logged.items():
        total = steps_per_epoch if step < steps_per_epoch else 2 * steps_per_epoch
        factor = warmup_cosine(torch.optim.SGD([torch.zeros(1)], lr=1), int(total), 0.05).lr_lambdas[0]
        assert value == pytest.approx(lr * factor(step)), (step, total)
    assert any(step >= steps_per_epoch for step in logged)


def test_stepped_linear_drops_once_per_eighth_to_an_eighth():
    factor = stepped_linear(torch.optim.SGD([torch.zeros(1)], lr=1), total_steps=800).lr_lambdas[0]
    assert [factor(s) for s in (0, 99, 100, 450, 699, 700, 799)] == [1, 1, 7 / 8, 4 / 8, 2 / 8, 1 / 8, 1 / 8]


def test_last_checkpoint_is_written_at_every_validation(tmp_path):
    """Even when val/acc does not improve (a learning rate too small to change it), last.ckpt is the
    newest state: Lightning's own `save_last` kept the first epoch's, and a resume repeated the rest."""
    base = [*MQAR, "task.num_train=640", "model=mamba2", "model.d_model=32", "target_acc=null", "optimizer.lr=1e-12"]
    first = run.train(tiny(tmp_path, *base, "trainer.max_epochs=3"))
    last = torch.load(tmp_path / "checkpoints" / "last.ckpt", weights_only=True)
    assert last["global_step"] == first["train/steps"] == 30 and last["epoch"] == 2
    best = torch.load(tmp_path / "checkpoints" / "best.ckpt", weights_only=True)
    assert best["global_step"] == 10  # val/acc never rose after the first validation
    second = run.train(tiny(tmp_path, *base, "trainer.max_epochs=4", "ckpt_path=last"))
    assert second["train/steps"] == 40


class PoisonAfter(L.Callback):
    """Turns the embedding into NaNs after optimiser step `step`: every later loss is NaN."""

    def __init__(self, step):
        self.step = step

    def on_train_batch_end(self, trainer, module, outputs, batch, batch_idx):
        if trainer.global_step == self.step:
            with torch.no_grad():
                module.net.embedding.weight.fill_(float("nan"))


@pytest.mark.parametrize("every", [5, 50], ids=["at-a-logging-step", "before-validation"])
def test_a_diverged_run_stops_and_keeps_its_last_good_checkpoint(every, tmp_path):
    # 10 steps an epoch; the loss is NaN from step 13, in epoch 2, read at step 15 (every 5) or
    # before epoch 2's validation (every 50), which would have saved last.ckpt.
    cfg = tiny(tmp_path, *MQAR, "task.num_train=640", "model=mamba2", "model.d_model=32", "target_acc=null",
               "trainer.max_epochs=3", f"trainer.log_every_n_steps={every}")
    with pytest.raises(Diverged, match=r"train/loss=nan at step 13: training diverged; lower optimizer.lr "
                                       r"\(now 0.01\); its last good checkpoint: .*last.ckpt"):
        run.train(cfg, callbacks=[PoisonAfter(12)])
    last = torch.load(tmp_path / "checkpoints" / "last.ckpt", weights_only=True)
    assert last["global_step"] == 10
    assert all(torch.isfinite(v).all() for v in last["state_dict"].values())
    assert not (tmp_path / "metrics.json").exists()


def test_the_nan_guard_does_not_read_the_loss_at_every_step():
    """Meta tensors cannot be read on the host: the steps between logging steps never try."""
    guard = FiniteLoss()
    trainer = type("Trainer", (), {"log_every_n_steps": 5})()
    for step in range(1, 5):
        trainer.global_step = step
        guard.on_train_batch_end(trainer, None, {"loss": torch.tensor(float("nan"), device="meta")}, None, 0)
    assert len(guard._losses) == 4


class HostReads(L.Callback):
    """The training steps at which anything read a tensor to the host (Tensor.item, which Lightning's
    metric conversion and the NaN guard use), from the start of training to its first validation. Not
    counted: torch.optim's reads of its step counter, a host tensor unless the optimiser is capturable."""

    def __init__(self, monkeypatch):
        self.steps, self.trainer = set(), None
        item = torch.Tensor.item

        def counted(t):
            if self.trainer is not None and not sys._getframe(1).f_globals["__name__"].startswith("torch.optim"):
                self.steps.add(self.trainer.global_step)
            return item(t)

        monkeypatch.setattr(torch.Tensor, "item", counted)

    def on_train_start(self, trainer, pl_module):
        self.trainer = trainer

    def on_validation_start(self, trainer, pl_module):
        self.trainer = None


@pytest.mark.parametrize("bar", [False, True])
def test_training_steps_do_not_wait_for_the_device(tmp_path, monkeypatch, bar):
    """On a GPU a host read waits for every queued kernel: only logging steps (every 5th here) read.
    Logged as `prog_bar` metrics, train/loss and train/acc were read after every step."""
    reads = HostReads(monkeypatch)
    cfg = tiny(tmp_path, *MQAR, "task.num_train=1280", "model=mamba2", "model.d_model=32", "trainer.max_epochs=1",
               "target_acc=null", f"trainer.enable_progress_bar={bar}")
    run.train(cfg, callbacks=[reads])
    assert reads.steps and all(step % 5 == 0 for step in reads.steps), sorted(reads.steps)


class PageFaults(L.Callback):
    """The process's page faults (ru_minflt) per training step, over steps [10, 40)."""

    def on_train_batch_start(self, trainer, *args):
        if trainer.global_step == 10:
            self.start = resource.getrusage(resource.RUSAGE_SELF).ru_minflt

    def on_train_batch_end(self, trainer, *args):
        if trainer.global_step == 40:
            self.per_step = (resource.getrusage(resource.RUSAGE_SELF).ru_minflt - self.start) / 30


def test_cpu_steps_reuse_freed_memory(tmp_path):
    """The Mamba-1 CPU default at V=8192 frees and reallocates its 8 MB logits every step; with glibc's
    default malloc that cost fresh zeroed pages: 1,158 page faults a step here before
    run.keep_freed_memory."""
    faults = PageFaults()
    cfg = tiny(tmp_path, "model=mamba1", "task.vocab_size=8192", "task.num_train=3200", "trainer.max_steps=45",
               "target_acc=null")
    run.train(cfg, callbacks=[faults])
    assert faults.per_step < 300, faults.per_step


def test_curriculum_runs_through_train(tmp_path):
    """run.train rebuilds the training loader every epoch when there is a curriculum (the data module
    refuses to train a curriculum otherwise), and the stages' data is what trains."""
    cfg = tiny(tmp_path, *MQAR, "task.num_train=640", "model=mamba2", "model.d_model=32", "trainer.max_epochs=3",
               "target_acc=null", "task.curriculum=[{epochs:1,num_kv_pairs:2},{epochs:1,num_kv_pairs:3}]")
    metrics = run.train(cfg)
    assert metrics["train/epochs"] == 3 and metrics["train/steps"] == 3 * 10


def test_sliced_and_extrapolation_metrics(tmp_path):
    cfg = tiny(tmp_path, "task=induction_heads", "task.num_train=640", "task.vocab_size=16", "task.seq_len=32",
               "task.test_seq_lens=[64]", "model=mamba2", "model.d_model=32", "trainer.max_epochs=1",
               "target_acc=null")
    metrics = run.train(cfg)
    assert "test@seq_len=64/acc" in metrics and "test/acc" in metrics
    assert 0.0 <= metrics["test@seq_len=64/acc"] <= 1.0


def test_same_seed_same_run_and_the_seed_matters(tmp_path):
    """The seed fixes the model's init and the data order: a rerun gives bit-identical metrics."""
    base = [*MQAR, "task.num_train=640", "model=attention", "model.d_model=32", "trainer.max_epochs=1",
            "target_acc=null"]
    first, again, other = (run.train(tiny(tmp_path / name, *base, f"seed={seed}"))
                           for name, seed in [("a", 0), ("b", 0), ("c", 1)])
    assert first["test/loss"] == again["test/loss"]
    assert first["test/loss"] != other["test/loss"]


def test_a_run_shorter_than_an_epoch_finishes(tmp_path):
    """trainer.max_steps before the first validation: no val/acc yet, and still a finished run."""
    metrics = run.train(tiny(tmp_path, *MQAR, "model=attention", "trainer.max_steps=3", "target_acc=null"))
    assert metrics["train/steps"] == 3 and metrics["val/acc_best"] != metrics["val/acc_best"]  # NaN: none
    assert json.loads((tmp_path / "metrics.json").read_text())["val/acc_best"] is None
