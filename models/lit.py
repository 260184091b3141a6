"""The LightningModule that trains any `models.lm.LM` on any task.

Synthetic tasks score few positions (MQAR: K of L), so the hidden states are gathered at the scored
positions *before* the vocabulary head: the head and the loss never see unscored tokens.

Metrics, per stage (train / val / test, and each extra test set such as `test@seq_len=1024`):
    {stage}/loss   cross-entropy over scored positions (token-weighted)
    {stage}/acc    token accuracy over scored positions
    {stage}/exact  fraction of examples with every scored position right
    {stage}/acc@{slice}={value}   token accuracy restricted to examples with that slice value
"""
import math
import lightning as L
import torch
import torch.nn.functional as F
from torch import nn
from torch.optim.lr_scheduler import LambdaLR
from torchmetrics.aggregation import MeanMetric


def warmup_cosine(optimizer, total_steps, warmup_frac=0.1, min_lr_ratio=0.0):
    """Linear warmup over `warmup_frac` of the steps, then cosine decay to `min_lr_ratio`·lr.

    warmup_frac=0, min_lr_ratio=1 gives a constant learning rate (the Mamba paper's synthetic runs).
    One LambdaLR whatever the settings, so a run resumed with another length (say more epochs)
    loads its scheduler state and continues on the new schedule from the step it reached.
    """
    if not 0 <= warmup_frac < 1:
        raise ValueError(f"warmup_frac={warmup_frac!r}: must be in [0, 1)")
    if not 0 <= min_lr_ratio <= 1:
        raise ValueError(f"min_lr_ratio={min_lr_ratio!r}: must be in [0, 1]")
    warmup = int(warmup_frac * total_steps)

    def factor(step):
        if step < warmup:
            return (step + 1) / warmup
        progress = min(1.0, (step - warmup) / max(1, total_steps - warmup))
        return min_lr_ratio + (1 - min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * progress))

    return LambdaLR(optimizer, factor)


WEIGHT_DECAY_ON = ("all", "matrices")


def check_weight_decay_on(weight_decay_on) -> None:
    if weight_decay_on not in WEIGHT_DECAY_ON:
        raise ValueError(f"weight_decay_on={weight_decay_on!r}: must be one of {', '.join(WEIGHT_DECAY_ON)}")


def configure_optimizers(module: L.LightningModule, params, optimizer_factory, scheduler_factory=None,
                         weight_decay_on="all"):
    """AdamW-style `optimizer_factory` over `params` (the trainable ones), stepped per batch by
    `scheduler_factory(optimizer, total_steps)`; Lightning's `configure_optimizers` return value.

    weight_decay_on: "all" decays every parameter (Zoology's `AdamW(model.parameters())`);
        "matrices" spares norm gains, biases and the SSM's A_log / D / dt_bias (the parameters
        mamba_ssm marks `_no_weight_decay`), as GPT-style training scripts do.
    """
    check_weight_decay_on(weight_decay_on)
    decay, no_decay = [], []
    for p in params:
        if not p.requires_grad:
            continue
        spared = weight_decay_on == "matrices" and (p.ndim < 2 or getattr(p, "_no_weight_decay", False))
        (no_decay if spared else decay).append(p)
    optimizer = optimizer_factory([{"params": decay}, {"params": no_decay, "weight_decay": 0.0}])
    if scheduler_factory is None:
        return optimizer
    total = module.trainer.estimated_stepping_batches
    total = int(total) if math.isfinite(total) else module.trainer.max_steps
    scheduler = scheduler_factory(optimizer, total)
    return {"optimizer": optimizer, "lr_scheduler": {"scheduler": scheduler, "interval": "step"}}


class LitLM(L.LightningModule):
    """Loss, metrics and optimiser around a network with `hidden(ids)` and `head`.

    Args:
        net: the language model (`hidden(ids) -> (b, l, d)`, `head: d -> V`).
        optimizer: a partial optimiser (`optimizer(param_groups)`), e.g. Hydra's `_partial_` AdamW.
        scheduler: a partial `(optimizer, total_steps) -> LRScheduler`, or None for a constant LR.
        weight_decay_on: "all" or "matrices" (see `configure_optimizers`).
    """

    flops_per_batch = None  # ThroughputMonitor: FLOPs are not counted here; tokens/s is the measure

    def __init__(self, net: nn.Module, optimizer, scheduler=None, weight_decay_on="all"):
        super().__init__()
        check_weight_decay_on(weight_decay_on)  # at build time, before anything is written
        self.net = net
        self.optimizer_factory = optimizer
        self.scheduler_factory = scheduler
        self.weight_decay_on = weight_decay_on
        self.metrics = nn.ModuleDict()  # "{stage}/{name}" -> MeanMetric, created in setup

    # -- metrics ---------------------------------------------------------------------------------
    def setup(self, stage):
        dm = self.trainer.datamodule
        stages = ["val"] + dm.test_names
        names = ["loss", "acc", "exact"] + [f"acc@{k}={v}" for k, vs in dm.slice_values.items()
                                            for v in vs if len(vs) > 1]
        for s in stages:
            for n in names:
                key = self._key(s, n)
                if key not in self.metrics:
                    self.metrics[key] = MeanMetric().to(self.device)

    @staticmethod
    def _key(stage, name):
        return f"{stage}/{name}"

    def _scored(self, batch):
        """Loss and correctness at scored positions only.

        Returns: loss (scalar), correct (s,) bool, example (s,) index of each scored position's
        example, n_examples.
        """
        inputs, labels = batch["inputs"], batch["labels"]  # (b, l), (b, l)
        mask = labels != -100
        example, position = mask.nonzero(as_tuple=True)  # (s,), (s,)
        h = self.net.hidden(inputs)  # (b, l, d)
        logits = self.net.head(h[example, position]).float()  # (s, V)
        target = labels[example, position]
        loss = F.cross_entropy(logits, target)
        correct = logits.argmax(-1) == target
        return loss, correct, example, inputs.shape[0]

    def _update(self, stage, batch, loss, correct, example, n_examples):
        m = self.metrics
        m[self._key(stage, "loss")].update(loss.detach(), weight=correct.numel())
        m[self._key(stage, "acc")].update(correct.float())
        wrong = torch.zeros(n_examples, device=correct.device).index_add_(0, example, (~correct).float())
        m[self._key(stage, "exact")].update((wrong == 0).float())
        for key, values in batch.items():
            if not key.startswith("slice/"):
                continue
            name = key.removeprefix("slice/")
            per_token = values[example]  # (s,)
            for v in values.unique().tolist():
                metric_key = self._key(stage, f"acc@{name}={v}")
                if metric_key in m:
                    m[metric_key].update(correct[per_token == v].float())

    def _log_epoch(self, stage):
        for key, metric in self.metrics.items():
            if key.startswith(stage + "/") and metric.update_called:
                self.log(key, metric.compute())  # MeanMetric already syncs across processes
                metric.reset()

    # -- steps -----------------------------------------------------------------------------------
    def training_step(self, batch, batch_idx):
        loss, correct, _, _ = self._scored(batch)
        self.log("train/loss", loss, prog_bar=True)
        self.log("train/acc", correct.float().mean(), prog_bar=True)
        return loss

    def validation_step(self, batch, batch_idx):
        self._update("val", batch, *self._scored(batch))

    def on_validation_epoch_end(self):
        self._log_epoch("val")

    def test_step(self, batch, batch_idx, dataloader_idx=0):
        stage = self.trainer.datamodule.test_names[dataloader_idx]
        self._update(stage, batch, *self._scored(batch))

    def on_test_epoch_end(self):
        for stage in self.trainer.datamodule.test_names:
            self._log_epoch(stage)

    # -- optimisation ----------------------------------------------------------------------------
    def configure_optimizers(self):
        return configure_optimizers(self, self.net.parameters(), self.optimizer_factory, self.scheduler_factory,
                                    self.weight_decay_on)
