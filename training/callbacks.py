"""Lightning callbacks every training run uses (run.py adds them; a sweep's trials get them too)."""
import time

import lightning as L
import torch
from lightning.pytorch.callbacks import TQDMProgressBar


class Diverged(FloatingPointError):
    """The training loss became NaN or infinite: the run stops, its last checkpoint is from before."""


class FiniteLoss(L.Callback):
    """Stop training at the first non-finite training loss, naming its step and value.

    No step waits for the host: each step's loss tensor is kept as it is (on its device) and the
    kept ones are read together every `log_every_n_steps` steps (where logging reads the loss
    anyway) and before every validation and epoch end. Checkpoints are saved only after those
    (Lightning runs checkpoint callbacks last), so a diverged model is never saved: the run's
    last.ckpt and best.ckpt stay those of the last validation before the loss went bad.
    """

    def __init__(self):
        self._losses: list[tuple[int, torch.Tensor]] = []  # (global step, loss) since the last read

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        loss = outputs.get("loss") if isinstance(outputs, dict) else outputs  # what training_step returned
        if loss is not None:
            self._losses.append((trainer.global_step, loss.detach()))
        every = trainer.log_every_n_steps
        if every and trainer.global_step % every == 0:
            self._check(trainer)

    def on_validation_start(self, trainer, pl_module):
        if not trainer.sanity_checking:
            self._check(trainer)

    def on_train_epoch_end(self, trainer, pl_module):
        self._check(trainer)

    def on_train_end(self, trainer, pl_module):
        self._check(trainer)

    def _check(self, trainer):
        if not self._losses:
            return
        steps, losses = zip(*self._losses)
        self._losses.clear()
        bad = ~torch.isfinite(torch.stack(losses).float())
        if not bad.any():  # the only host read: one per call, not one per step
            return
        first = int(bad.nonzero()[0])
        raise Diverged(f"train/loss={float(losses[first])} at step {steps[first]}: training diverged; "
                       "lower optimizer.lr")


class Throughput(L.Callback):
    """`train/tokens_per_sec` over each logging interval (`trainer.log_every_n_steps` steps).

    Lightning's ThroughputMonitor synchronises the GPU after every step to time it; this reads the
    clock only at logging steps, after `FiniteLoss` (listed before it) has waited for the device,
    so both ends of an interval are measured with the GPU's queue drained. Validation is left out.
    """

    def __init__(self):
        self._start, self._tokens = None, 0

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        self._tokens += batch["inputs"].numel()
        every = trainer.log_every_n_steps
        if not every or trainer.global_step % every:
            return
        now = time.perf_counter()
        if self._start is not None:
            for logger in trainer.loggers:
                logger.log_metrics({"train/tokens_per_sec": self._tokens / (now - self._start)}, trainer.global_step)
        self._start, self._tokens = now, 0

    def on_validation_start(self, trainer, pl_module):
        self._start, self._tokens = None, 0


class ProgressBar(TQDMProgressBar):
    """Lightning's bar, with the train loss and accuracy as last logged (`train/loss`, `train/acc`, and a
    distillation stage's `stage1/train/loss`), read at its redraws (run.py redraws it at logging steps).
    No module logs them as `prog_bar` metrics: Lightning turns every one of those into a Python number
    after every step, a wait for the GPU each step (two `.item()` calls a step in a host profile of
    run.py on the GPU, BENCHMARKS.md)."""

    SHOWN = ("train/loss", "train/acc")

    def get_metrics(self, trainer, pl_module):
        logged = trainer.logged_metrics
        return super().get_metrics(trainer, pl_module) | {k: float(v) for k, v in logged.items() if k.endswith(self.SHOWN)}
