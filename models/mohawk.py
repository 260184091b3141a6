"""MOHAWK (Bick et al. 2024, arXiv 2408.10189): distil an attention LM into a Mamba-2 LM of the same depth.

1. Matrix orientation: every student mixer, fed the teacher's (normed) hidden state entering its
   layer, regresses its materialised SSD matrix M onto the teacher's causal softmax matrix A:
   min ‖A − M‖_F per head.
2. Hidden-state alignment: every student mixer, placed in the teacher's block (the teacher's norm,
   residual and MLP around it) and fed the teacher's hidden state entering the layer, regresses the
   block's output onto the teacher block's output.
3. Weight transfer + knowledge distillation: copy embeddings, norms, MLPs and head from the teacher,
   then train the whole student on KL to the teacher's output distribution.
Stages 1 and 2 train only the student's mixers, and every layer on the teacher's own inputs, so the
layers train independently (one optimiser over all of them is the same as one per layer).

Each stage is a LightningModule, so Lightning's Trainer runs the loops, logging and checkpoints:
`LayerwiseStage` (stages 1 and 2) and `KnowledgeDistillation` (stage 3: `LitLM` with a KD loss).
"""


import lightning as L
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from models.mixers.attention import Attention
from models.lit import LitLM, configure_optimizers, scored_logits
from models.lm import LM
from models.mamba2_discrete import DiscreteMamba2
from tasks.base import IGNORE

STUDENT_MIXERS = ("mamba2", "discrete")


def check_teacher(teacher: LM) -> None:
    """A teacher must be attention in every layer: stage 1 needs each layer's softmax matrix."""
    kinds = sorted({type(block.mixer).__name__ for block in teacher.blocks})
    if kinds != [Attention.__name__]:
        raise ValueError(f"mixer={'+'.join(kinds)}: MOHAWK's teacher must be an attention model")


def make_student(
    teacher: LM, mixer: str = "mamba2", d_state: int | None = None, expand: int = 1, d_conv: int = 4,
    chunk_size: int = 64,
) -> LM:
    """A Mamba-2 LM shaped like `teacher`: same vocabulary, width, depth, MLPs, positions, norms and head
    tying (so stage 3 can copy everything outside the mixers).

    Each mixer has one head per teacher head with its own B and C (ngroups = nheads = the teacher's
    n_heads), so head h's SSD matrix can match attention head h; headdim = expand·d_model / n_heads
    (expand=1: x plays the teacher's values, P = the teacher's head_dim).
    mixer: "mamba2" (models.mixers.mamba2.Mamba2) or "discrete" (models.mamba2_discrete.DiscreteMamba2).
    d_state: N; None = the teacher's head_dim (B and C play its keys and queries).
    A RoPE teacher gives a student without positions (LM has RoPE in attention layers only).
    """
    if mixer not in STUDENT_MIXERS:
        raise ValueError(f"mixer={mixer!r}: must be one of {', '.join(STUDENT_MIXERS)}")
    check_teacher(teacher)
    attn = teacher.blocks[0].mixer
    d_model, n_heads = teacher.d_model, attn.n_heads
    d_state = attn.head_dim if d_state is None else d_state
    if not (isinstance(expand, int) and not isinstance(expand, bool) and expand > 0):
        raise ValueError(f"expand={expand!r}: must be a positive integer")
    mlp = teacher.blocks[0].mlp
    student = LM(
        teacher.vocab_size, d_model, len(teacher.blocks), mixer="mamba2",
        mlp_expand=0 if mlp is None else mlp.fc1.out_features // d_model,
        pos="none" if teacher.pos == "rope" else teacher.pos, max_seqlen=teacher.max_seqlen,
        d_state=d_state, d_conv=d_conv, expand=expand, headdim=expand * d_model // n_heads, ngroups=n_heads,
        chunk_size=chunk_size, tie_embeddings=teacher.tie_embeddings, norm=teacher.norm_type,
    )
    if mixer == "discrete":
        for block in student.blocks:
            block.mixer = DiscreteMamba2(
                d_model, nheads=n_heads, d_state=d_state, d_conv=d_conv, expand=expand, chunk_size=chunk_size
            )
    return student


def transfer_weights(teacher: LM, student: LM) -> list[str]:
    """Copy every teacher parameter outside the mixers (embeddings, norms, MLPs, head) into the student.

    Returns the names copied.
    """
    shared = {k: v for k, v in teacher.state_dict().items() if ".mixer." not in k}
    missing, unexpected = student.load_state_dict(shared, strict=False)
    left = [k for k in missing if ".mixer." not in k]
    if unexpected or left:
        raise ValueError(f"teacher and student differ outside the mixers: {sorted(unexpected + left)}")
    return sorted(shared)


@torch.no_grad()
def block_inputs(lm: LM, ids: Tensor) -> list[Tensor]:
    """The residual stream entering each block of `lm` on ids (b, l): n_layers × (b, l, d_model)."""
    inputs = []
    hooks = [block.register_forward_pre_hook(lambda _, args: inputs.append(args[0])) for block in lm.blocks]
    try:
        lm.hidden(ids)
    finally:
        for hook in hooks:
            hook.remove()
    return inputs


def block_with_mixer(block: nn.Module, mixer: nn.Module, x: Tensor) -> Tensor:
    """`block` (models.lm.Block) on x with its mixer replaced by `mixer`: the student layer of stage 2."""
    x = x + mixer(block.norm(x))
    return x if block.mlp is None else x + block.mlp(block.mlp_norm(x))


def matrix_errors(teacher: LM, student: LM, ids: Tensor) -> list[tuple[Tensor, Tensor]]:
    """Stage 1, per layer: (loss, relative error).

    loss = mean over examples and heads of ‖A − M‖_F; relative error = the same of ‖A − M‖_F / ‖A‖_F.
    """
    out = []
    for x, t_block, s_block in zip(block_inputs(teacher, ids), teacher.blocks, student.blocks):
        with torch.no_grad():
            u = t_block.norm(x)
            A = t_block.mixer.attention_matrix(u)  # (b, h, l, l)
        diff = torch.linalg.matrix_norm(A - s_block.mixer.ssd_matrix(u))  # (b, h)
        out.append((diff.mean(), (diff / torch.linalg.matrix_norm(A)).mean()))
    return out


def hidden_errors(teacher: LM, student: LM, ids: Tensor) -> list[tuple[Tensor, Tensor]]:
    """Stage 2, per layer: (loss, relative error) between the teacher block's output y_T and the
    student layer's output y_S, on the teacher's input x.

    loss = mean over tokens of ‖y_T − y_S‖₂; relative error = mean over examples of
    ‖y_T − y_S‖_F / ‖y_T − x‖_F. The residual x is common to both blocks, so the error is measured
    against the teacher block's own contribution, not against x (which would make any student look
    nearly perfect).
    """
    out = []
    for x, t_block, s_block in zip(block_inputs(teacher, ids), teacher.blocks, student.blocks):
        with torch.no_grad():
            y_teacher = t_block(x)
        diff = y_teacher - block_with_mixer(t_block, s_block.mixer, x)  # (b, l, d)
        rel = diff.flatten(1).norm(dim=1) / (y_teacher - x).flatten(1).norm(dim=1)  # (b,)
        out.append((diff.norm(dim=-1).mean(), rel.mean()))
    return out


class _FrozenTeacher:
    """Keeps `self.teacher` in eval mode when Lightning switches the module to training."""

    def train(self, mode: bool = True):
        super().train(mode)
        self.teacher.eval()
        return self


class LayerwiseStage(_FrozenTeacher, L.LightningModule):
    """Stage 1 (matrix orientation) or 2 (hidden-state alignment): the student's mixers, each trained
    against its teacher layer; the rest of the student is untouched.

    Logs `stage{n}/train/loss` (summed over layers), `stage{n}/train/loss@layer=i`, and on validation
    `stage{n}/val/{error}` (the relative error, mean over layers) and `stage{n}/val/{error}@layer=i`,
    with error = matrix_err_rel (stage 1) or hidden_err_rel (stage 2).
    """

    ERRORS = {1: ("matrix_err_rel", matrix_errors), 2: ("hidden_err_rel", hidden_errors)}

    def __init__(self, stage: int, teacher: LM, student: LM, optimizer, scheduler=None):
        super().__init__()
        if stage not in self.ERRORS:
            raise ValueError(f"stage={stage!r}: must be 1 or 2 (stage 3 is KnowledgeDistillation)")
        self.stage = f"stage{stage}"
        self.error, self.errors = self.ERRORS[stage]
        self.teacher = teacher.requires_grad_(False)
        self.student = student
        self.optimizer_factory, self.scheduler_factory = optimizer, scheduler

    def training_step(self, batch, batch_idx):
        per_layer = self.errors(self.teacher, self.student, batch["inputs"])
        for i, (loss, _) in enumerate(per_layer):
            self.log(f"{self.stage}/train/loss@layer={i}", loss)
        loss = torch.stack([loss for loss, _ in per_layer]).sum()
        self.log(f"{self.stage}/train/loss", loss, prog_bar=True)
        return loss

    def validation_step(self, batch, batch_idx):
        rel = torch.stack([rel for _, rel in self.errors(self.teacher, self.student, batch["inputs"])])
        n = batch["inputs"].shape[0]
        self.log(f"{self.stage}/val/{self.error}", rel.mean(), batch_size=n)
        for i, r in enumerate(rel):
            self.log(f"{self.stage}/val/{self.error}@layer={i}", r, batch_size=n)

    def configure_optimizers(self):
        mixers = [p for block in self.student.blocks for p in block.mixer.parameters()]
        return configure_optimizers(self, mixers, self.optimizer_factory, self.scheduler_factory)


class KnowledgeDistillation(_FrozenTeacher, LitLM):
    """Stage 3: `LitLM` (same val/test metrics) training `net` on the teacher's output distribution.

    loss = (1 − hard_weight)·τ²·KL(p_teacher^τ ‖ p_student^τ) + hard_weight·CE(student, labels), at
    the scored positions only (elsewhere the teacher's distribution is noise the task never asks
    for); p^τ = softmax(logits / τ), τ = temperature (τ² keeps the gradient's scale independent of τ).
    """

    def __init__(self, net: LM, teacher: LM, optimizer, scheduler=None, temperature: float = 1.0,
                 hard_weight: float = 0.0, weight_decay_on: str = "all"):
        super().__init__(net, optimizer, scheduler, weight_decay_on)
        if not (isinstance(temperature, (int, float)) and temperature > 0):
            raise ValueError(f"temperature={temperature!r}: must be a number > 0")
        if not (isinstance(hard_weight, (int, float)) and 0 <= hard_weight <= 1):
            raise ValueError(f"hard_weight={hard_weight!r}: must be a number in [0, 1]")
        self.teacher = teacher.requires_grad_(False)
        self.temperature, self.hard_weight = float(temperature), float(hard_weight)

    def training_step(self, batch, batch_idx):
        inputs, positions, targets = batch["inputs"], batch["positions"], batch["targets"]  # (b, l), (b, S), (b, S)
        valid = (targets != IGNORE).flatten()  # (b·S,)
        logits = scored_logits(self.net, inputs, positions).flatten(0, 1)  # (b·S, V)
        with torch.no_grad():
            target = scored_logits(self.teacher, inputs, positions).flatten(0, 1)
        tau = self.temperature
        kl = F.kl_div(F.log_softmax(logits / tau, -1), F.log_softmax(target / tau, -1), log_target=True,
                      reduction="none").sum(-1)  # (b·S,)
        kd = (kl * valid).sum() / valid.sum() * tau**2  # the mean over scored positions
        hard = F.cross_entropy(logits, targets.flatten(), ignore_index=IGNORE)
        loss = (1 - self.hard_weight) * kd + self.hard_weight * hard
        self.log("train/loss", loss, prog_bar=True)
        self.log("train/kd", kd)
        self.log("train/ce", hard)
        correct = (logits.argmax(-1) == targets.flatten()) & valid
        self.log("train/acc", correct.sum() / valid.sum(), prog_bar=True)
        return loss
