"""The Lightning callback a sweep adds to `run.train`: Optuna pruning on val accuracy (run.train
itself stops a trial whose loss turns NaN: training.callbacks.FiniteLoss).

Written here rather than taken from optuna-integration (a separate package) so that the sweep
depends on optuna alone; the pruning one is a few lines on top of `trial.report/should_prune`.
"""
import lightning as L
import optuna


class OptunaPruning(L.Callback):
    """Report `monitor` (e.g. val/acc) to the trial after each validation; stop a hopeless trial.

    The step reported is the global step, so trials with other batch sizes still line up by
    optimiser steps. Raising `optuna.TrialPruned` ends `trainer.fit`; the driver marks it PRUNED.
    """

    def __init__(self, trial: optuna.Trial, monitor: str = "val/acc"):
        self.trial, self.monitor = trial, monitor

    def on_validation_end(self, trainer, pl_module):
        if trainer.sanity_checking or self.monitor not in trainer.callback_metrics:
            return
        value = float(trainer.callback_metrics[self.monitor])
        step = trainer.global_step
        self.trial.report(value, step)
        if self.trial.should_prune():
            raise optuna.TrialPruned(f"{self.monitor}={value:.4f} at step {step}: below the median "
                                     "of the other trials in this cell")

