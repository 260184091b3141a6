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
from collections import Counter

import lightning as L
import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.optim.lr_scheduler import LambdaLR
from torchmetrics.aggregation import MeanMetric

from tasks.base import IGNORE, check_positive_int


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


def stepped_linear(optimizer, total_steps, drops=8):
    """The learning rate falls linearly in `drops` equal steps: the k-th 1/drops of training (k = 0 ..
    drops-1) runs at (drops - k)/drops of the peak (Mamba-2 App. D.1: "a linear decay schedule that
    drops on every epoch", the last of its 8 epochs at 1/8 of the peak)."""
    check_positive_int("drops", drops)
    return LambdaLR(optimizer, lambda step: (drops - min(drops - 1, step * drops // max(1, total_steps))) / drops)


def scored_logits(net: nn.Module, inputs: Tensor, positions: Tensor) -> Tensor:
    """net's logits at `positions` only: inputs (b, l), positions (b, S) -> (b, S, V) fp32."""
    h = net.hidden(inputs)  # (b, l, d)
    h = h.gather(1, positions[..., None].expand(-1, -1, h.shape[-1]))  # (b, S, d)
    return net.head(h).float()


def scored_loss(net: nn.Module, batch: dict) -> tuple[Tensor, Tensor, Tensor]:
    """Loss and correctness at the scored positions, with static shapes (no host sync).

    batch: inputs (b, l), positions and targets (b, S) (`tasks.data.scored`).
    Returns: loss (scalar, cross-entropy over the real scored positions), correct (b, S) bool,
    valid (b, S) bool: which of the S positions are real ones.
    """
    logits = scored_logits(net, batch["inputs"], batch["positions"])  # (b, S, V)
    targets = batch["targets"]  # (b, S)
    loss = F.cross_entropy(logits.flatten(0, 1), targets.flatten(), ignore_index=IGNORE)
    valid = targets != IGNORE
    correct = (logits.argmax(-1) == targets) & valid
    return loss, correct, valid


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
        cuda_graph: on one GPU, replay each whole training step (forward, backward, clipping, the
            optimiser's step) as a CUDA graph (`CapturedStep`); eager elsewhere.
    """

    def __init__(self, net: nn.Module, optimizer, scheduler=None, weight_decay_on="all", cuda_graph=False):
        super().__init__()
        check_weight_decay_on(weight_decay_on)  # at build time, before anything is written
        if not isinstance(cuda_graph, bool):
            raise ValueError(f"cuda_graph={cuda_graph!r}: must be true or false")
        self.net = net
        self.optimizer_factory = optimizer
        self.scheduler_factory = scheduler
        self.weight_decay_on = weight_decay_on
        self.cuda_graph = cuda_graph
        self.metrics = nn.ModuleDict()  # "{stage}/{name}" -> MeanMetric, created in setup
        self._graphs: dict[tuple, CapturedStep] = {}  # batch shapes -> that step's graph
        self._eager_steps: Counter = Counter()  # batch shapes -> eager steps taken at them
        self._replayed = False  # this step ran whole (backward, clipping, optimiser) in its graph
        self._window: list[tuple[Tensor, Tensor]] = []  # (loss, acc) of each step since the last logging step

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

    def _update(self, stage, batch, loss, correct, valid):
        m = self.metrics
        m[self._key(stage, "loss")].update(loss.detach(), weight=valid.sum())
        m[self._key(stage, "acc")].update(correct.float(), weight=valid.float())
        m[self._key(stage, "exact")].update((correct | ~valid).all(-1).float())
        for key, values in batch.items():
            if not key.startswith("slice/"):
                continue
            name = key.removeprefix("slice/")
            for v in values.unique().tolist():
                metric_key = self._key(stage, f"acc@{name}={v}")
                if metric_key in m:
                    m[metric_key].update(correct.float(), weight=(valid & (values == v)[:, None]).float())

    def _log_epoch(self, stage):
        for key, metric in self.metrics.items():
            if key.startswith(stage + "/") and metric.update_called:
                self.log(key, metric.compute())  # MeanMetric already syncs across processes
                metric.reset()

    # -- steps -----------------------------------------------------------------------------------
    def training_step(self, batch, batch_idx):
        graph = self._graph_for(batch) if self._capturing() else None
        if graph is None:
            loss, correct, valid = scored_loss(self.net, batch)
            acc = correct.sum() / valid.sum()
        else:
            loss, acc = graph(batch)
            self._replayed = True
        self._log_train(loss.detach(), acc)
        return loss

    def _log_train(self, loss, acc):
        """train/loss and train/acc: their means over the steps since the last logging step, logged
        at the steps Lightning writes to the logger (every `trainer.log_every_n_steps`). `self.log`
        costs ~0.5 ms of host time a call (Lightning moves its whole result entry to the device on
        every call), a fair part of a small model's step on the GPU, so it is not called every step."""
        self._window.append((loss, acc))
        every = self.trainer.log_every_n_steps
        if not every or (self.global_step + 1) % every:
            return
        losses, accs = zip(*self._window)
        self._window.clear()
        # Not prog_bar metrics (Lightning reads those to the host after every step); the bar reads them
        # from the logged metrics at its redraws (training.callbacks.ProgressBar).
        self.log("train/loss", torch.stack(losses).mean())
        self.log("train/acc", torch.stack(accs).mean())

    def validation_step(self, batch, batch_idx):
        self._update("val", batch, *scored_loss(self.net, batch))

    def on_validation_epoch_end(self):
        self._log_epoch("val")

    def test_step(self, batch, batch_idx, dataloader_idx=0):
        stage = self.trainer.datamodule.test_names[dataloader_idx]
        self._update(stage, batch, *scored_loss(self.net, batch))

    def on_test_epoch_end(self):
        for stage in self.trainer.datamodule.test_names:
            self._log_epoch(stage)

    # -- the captured training step ---------------------------------------------------------------
    def _capturing(self) -> bool:
        """Whether training steps run as CUDA graphs: asked for, on one GPU, one batch per step, one
        optimiser with a capturable mode. (Several processes would need the gradients' all-reduce
        inside the graph.)"""
        t = self.trainer
        return (self.cuda_graph and self.device.type == "cuda" and t.world_size == 1 and t.accumulate_grad_batches == 1
                and len(t.optimizers) == 1 and "capturable" in t.optimizers[0].defaults)

    def _graph_for(self, batch) -> "CapturedStep | None":
        """The graph of this batch's shapes, captured after WARMUP_STEPS eager steps at those shapes
        (they compile and autotune the Triton kernels, which must not happen inside a capture, and
        make the gradients)."""
        key = tuple((k, *batch[k].shape) for k in CapturedStep.INPUTS)
        if key not in self._graphs:
            if self._eager_steps[key] < CapturedStep.WARMUP_STEPS:
                self._eager_steps[key] += 1
                return None
            self._graphs[key] = CapturedStep(self, batch)
        return self._graphs[key]

    def optimizer_zero_grad(self, epoch, batch_idx, optimizer):
        if not self._replayed:  # a replayed graph has zeroed and refilled the gradients itself
            super().optimizer_zero_grad(epoch, batch_idx, optimizer)

    def backward(self, loss, *args, **kwargs):
        if not self._replayed:  # a replayed graph has run the backward
            super().backward(loss, *args, **kwargs)

    def optimizer_step(self, epoch, batch_idx, optimizer, optimizer_closure=None):
        """Lightning's step (closure, clipping, optimiser), but a step whose closure replayed a graph
        is done when the closure returns: the graph clipped the gradients and stepped the optimiser."""
        if not self._capturing():
            return super().optimizer_step(epoch, batch_idx, optimizer, optimizer_closure)
        loss = optimizer_closure()  # training_step, zero_grad and backward, as inside optimizer.step
        if self._replayed:
            self._replayed = False
            return
        super().optimizer_step(epoch, batch_idx, optimizer, lambda: loss)

    # -- optimisation ----------------------------------------------------------------------------
    def configure_optimizers(self):
        return configure_optimizers(self, self.net.parameters(), self.optimizer_factory, self.scheduler_factory,
                                    self.weight_decay_on)


class CapturedStep:
    """One whole training step at one batch shape, captured as a CUDA graph: forward, backward,
    Lightning's gradient clipping and the optimiser's step.

    A small model's eager step is hundreds of small kernels, each paid for in host time; a graph
    replays them in one launch. The learning-rate schedule stays Lightning's: the graph's optimiser
    reads each group's learning rate from a device tensor of its own, filled from the group's
    (Python) value before every replay, so the scheduler, checkpoints and resume see an ordinary
    optimiser. The other hyper-parameters (betas, weight decay, the clipping value) are fixed at
    capture. The optimiser must have a `capturable` mode (Adam, AdamW, ...); it is switched on, and
    the lr swapped for its tensor, only while capturing, so what a checkpoint stores is what an eager
    run stores. Callbacks' `on_before_optimizer_step` and `on_after_backward` do not run in replayed
    steps.

    The graph reads the batch from its own static input tensors (the batch is copied in) and leaves
    the loss and accuracy in static outputs (copied out, since the next replay overwrites them). It
    zeroes the parameters' gradients and accumulates into gradient tensors it owns: before each
    replay they are put back as the parameters' `.grad`, since Lightning sets gradients to None
    (before each validation, say), and a graph writing into freed memory would corrupt the run.
    Lightning's autocast (bf16-mixed) is re-entered inside with its weight-cast cache off: a cached
    cast would be baked into the graph and go stale as the weights change.
    """

    INPUTS = ("inputs", "positions", "targets")
    WARMUP_STEPS = 2

    def __init__(self, module: LitLM, batch: dict):
        self.inputs = {k: batch[k].clone() for k in self.INPUTS}
        # The parameters the loss reaches: those the eager warm-up steps gave a gradient.
        self.params = [p for p in module.parameters() if p.grad is not None]
        self.grads = [p.grad for p in self.params]
        self.optimizer = module.trainer.optimizers[0]
        groups = self.optimizer.param_groups
        self.lrs = [torch.tensor(float(g["lr"]), device=self.params[0].device) for g in groups]
        # A capturable optimiser keeps its step counts on the device (the eager steps left them on the host).
        for state in self.optimizer.state.values():
            state["step"] = state["step"].to(self.params[0].device, torch.float32)
        trainer = module.trainer
        device = batch["inputs"].device.type
        autocast = dict(device_type=device, enabled=torch.is_autocast_enabled(device),
                        dtype=torch.get_autocast_dtype(device), cache_enabled=False)
        eager = [(g["lr"], g["capturable"]) for g in groups]
        for g, lr in zip(groups, self.lrs):
            g["lr"], g["capturable"] = lr, True
        self.graph = torch.cuda.CUDAGraph()
        try:
            with torch.cuda.graph(self.graph):
                torch._foreach_zero_(self.grads)
                with torch.autocast(**autocast):
                    loss, correct, valid = scored_loss(module.net, self.inputs)
                with torch.autocast(device, enabled=False):  # as Lightning's backward, outside autocast
                    loss.backward()
                # Lightning's own clipping hook, as its precision plugin calls it before each step
                module.configure_gradient_clipping(self.optimizer, trainer.gradient_clip_val,
                                                   trainer.gradient_clip_algorithm)
                self.optimizer.step()
                self.loss, self.acc = loss.detach(), correct.sum() / valid.sum()
        finally:
            for g, (lr, capturable) in zip(groups, eager):
                g["lr"], g["capturable"] = lr, capturable

    def _attach_grads(self):
        for p, g in zip(self.params, self.grads):
            if p.grad is not g:
                p.grad = g

    def __call__(self, batch: dict) -> tuple[Tensor, Tensor]:
        for k, v in self.inputs.items():
            v.copy_(batch[k])
        for lr, g in zip(self.lrs, self.optimizer.param_groups):
            lr.fill_(g["lr"])  # this step's rate, as the scheduler left it
        self._attach_grads()
        self.graph.replay()
        return self.loss.clone(), self.acc.clone()
