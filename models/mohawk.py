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

Here: the models' side (the student, the weight transfer, each stage's per-layer errors). The
LightningModules that train the stages live with the distillation driver, in training/distill.py.
"""

import torch
from torch import Tensor, nn

from models.mixers.attention import Attention
from models.lm import LM
from models.mamba2_discrete import DiscreteMamba2

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
    return block.mlp_residual(x + mixer(block.norm(x)))


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
