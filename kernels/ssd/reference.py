"""SSD (Mamba-2's state space dual layer) in plain PyTorch: the chunked reference, the per-token
oracle and the one-token step.

Glossary (Mamba-2 paper, arXiv 2405.21060): per head, a scalar decay A < 0 and step size Δ_t,
    h_t = exp(Δ_t·A)·h_{t−1} + Δ_t·x_t B_tᵀ        state h_t: (P, N)
    y_t = h_t C_t + D·x_t,   then y_t · silu(z_t) when a gate z is given.
P = headdim, N = d_state, Q = chunk length, G = ngroups: head i reads B, C of group i // (H/G).
Everything is computed in fp32 (fp64 for fp64 inputs, which makes the oracle exact enough to
test gradients); y comes back in x's dtype, states in the compute dtype.

Shapes (mamba_ssm `mamba_chunk_scan_combined` layout):
    x, z:                   (batch, seqlen, nheads, headdim)
    dt:                     (batch, seqlen, nheads)
    A, dt_bias:             (nheads,)
    B, C:                   (batch, seqlen, ngroups, d_state)
    D:                      (nheads,) or (nheads, headdim)
    initial/final states:   (batch, nheads, headdim, d_state)
"""

import torch
import torch.nn.functional as F
from torch import Tensor

from kernels.reference_common import check_groups, compute_dtype, step_size


def _skip_and_gate(y: Tensor, x: Tensor, D: Tensor | None, z: Tensor | None) -> Tensor:
    """(y + D·x)·silu(z) with y, x, z: (..., h, p) in y's dtype and D: (h,) or (h, p)."""
    if D is not None:
        y = y + x.to(y.dtype) * D.to(y.dtype).reshape(D.shape[0], -1)
    if z is not None:
        y = y * F.silu(z.to(y.dtype))
    return y


def _segsum(dA: Tensor) -> Tensor:
    """S[..., i, j] = Σ_{k=j+1..i} dA_k for i ≥ j and −inf for i < j, from dA: (..., Q).

    exp(S) is SSD's decay mask. Differences of one running cumsum would give the same numbers in
    exact arithmetic, but they lose precision once the cumsum is large and overflow to inf·0 = NaN
    above the diagonal; summing only the masked terms keeps every entry a sum of at most Q terms.
    """
    Q = dA.shape[-1]
    ones = torch.ones(Q, Q, dtype=torch.bool, device=dA.device)
    terms = dA[..., :, None].expand(*dA.shape, Q).masked_fill(~ones.tril(-1), 0)  # [i, j] = dA_i for i > j
    return terms.cumsum(dim=-2).masked_fill(~ones.tril(), -torch.inf)


def _pad_time(t: Tensor, pad: int) -> Tensor:
    """Zero-pad dim 1 (seqlen) at the end by `pad`."""
    return F.pad(t, (0, 0) * (t.dim() - 2) + (0, pad)) if pad else t


def ssd_scan_ref(x, dt, A, B, C, chunk_size, D=None, z=None, dt_bias=None, dt_softplus=False, initial_states=None,
                 return_final_states=False):
    """`kernels.ssd.ssd_scan` (shapes, semantics) chunked as in the blog "State Space Duality (Mamba-2) Part III",
    vectorised over chunks. Any l: the sequence is zero-padded to whole chunks (Δ = 0 there, so padding leaves h
    unchanged)."""
    if not (isinstance(chunk_size, int) and not isinstance(chunk_size, bool) and chunk_size > 0):
        raise ValueError(f"chunk_size={chunk_size!r}: must be a positive integer")
    b, l, h, p = x.shape
    g, n = B.shape[-2:]
    check_groups(h, g, "nheads")
    r = h // g
    dtype = compute_dtype(x)
    # The result does not depend on Q, so a sequence shorter than one chunk is not padded up to it.
    Q = min(chunk_size, l)
    c = -(-l // Q)
    pad = c * Q - l

    delta = step_size(dt.to(dtype), dt_bias, dt_softplus)
    xd = _pad_time(x.to(dtype) * delta[..., None], pad).view(b, c, Q, g, r, p)  # Δ_t·x_t
    delta = _pad_time(delta, pad).view(b, c, Q, g, r)
    B = _pad_time(B.to(dtype), pad).view(b, c, Q, g, n)
    C = _pad_time(C.to(dtype), pad).view(b, c, Q, g, n)
    dA = (delta * A.to(dtype).view(g, r)).permute(0, 1, 3, 4, 2)  # (b, c, g, r, Q): log-decay per token

    # (1) Within-chunk outputs, the quadratic form: y_i = Σ_{j≤i} exp(Σ_{j<k≤i} dA_k)·(C_i·B_j)·Δ_j x_j.
    L = torch.exp(_segsum(dA))  # (b, c, g, r, Q, Q)
    CB = torch.einsum("bcign,bcjgn->bcgij", C, B)  # (b, c, g, Q, Q), shared by the r heads of a group
    y = torch.einsum("bcgrij,bcjgrp->bcigrp", L * CB[:, :, :, None], xd)  # (b, c, Q, g, r, p)

    # (2) Each chunk's final state from a zero start; the last row of L is the decay to the chunk end.
    decay_to_end = L[..., -1, :].permute(0, 1, 4, 2, 3)  # (b, c, Q, g, r)
    states = torch.einsum("bcjgn,bcjgrp->bcgrpn", B, xd * decay_to_end[..., None])  # (b, c, g, r, p, n)

    # (3) Scan over chunks, the only sequential part: carry the state across chunk boundaries.
    dA_cumsum = dA.cumsum(dim=-1)  # (b, c, g, r, Q): log-decay from the chunk start (≤ 0 for A < 0)
    chunk_decay = torch.exp(dA_cumsum[..., -1])[..., None, None]  # (b, c, g, r, 1, 1)
    if initial_states is None:
        carry = x.new_zeros(b, g, r, p, n, dtype=dtype)
    else:
        carry = initial_states.to(dtype).view(b, g, r, p, n)
    entering = []
    for decay_k, states_k in zip(chunk_decay.unbind(1), states.unbind(1)):
        entering.append(carry)
        carry = decay_k * carry + states_k
    entering = torch.stack(entering, dim=1)  # (b, c, g, r, p, n): the state before each chunk

    # (4) State-to-output: the entering state, decayed to position i, read out by C_i.
    decay_from_start = torch.exp(dA_cumsum).permute(0, 1, 4, 2, 3)[..., None]  # (b, c, Q, g, r, 1)
    y = y + torch.einsum("bcign,bcgrpn->bcigrp", C, entering) * decay_from_start

    y = y.reshape(b, c * Q, h, p)[:, :l]
    y = _skip_and_gate(y, x, D, z).to(x.dtype)
    return (y, carry.view(b, h, p, n)) if return_final_states else y


def _recurrence_step(
    state: Tensor, x: Tensor, delta: Tensor, A: Tensor, B: Tensor, C: Tensor
) -> tuple[Tensor, Tensor]:
    """One token of SSD, all in one dtype: state (b, h, p, n), x (b, h, p), Δ (b, h), A (h,),
    B, C (b, g, n) -> (next state, y before skip and gate (b, h, p))."""
    r = x.shape[1] // B.shape[1]
    B = B.repeat_interleave(r, dim=1)  # (b, h, n): head i reads group i // r
    C = C.repeat_interleave(r, dim=1)
    state = torch.exp(delta * A)[..., None, None] * state + (delta[..., None] * x)[..., None] * B[:, :, None]
    return state, torch.einsum("bhpn,bhn->bhp", state, C)


def ssd_scan_naive(x, dt, A, B, C, D=None, z=None, dt_bias=None, dt_softplus=False, initial_states=None,
                   return_final_states=False):
    """`kernels.ssd.ssd_scan` (shapes, semantics; no chunk_size) as the recurrence token by token: the test
    oracle (give it fp64 inputs)."""
    b, _, h, p = x.shape
    g, n = B.shape[-2:]
    check_groups(h, g, "nheads")
    dtype = compute_dtype(x)
    delta = step_size(dt.to(dtype), dt_bias, dt_softplus)
    A, B, C = A.to(dtype), B.to(dtype), C.to(dtype)
    state = x.new_zeros(b, h, p, n, dtype=dtype) if initial_states is None else initial_states.to(dtype)
    ys = []
    # unbind, not x[:, t]: the backward of l index ops would zero-fill and add l full-size gradients
    for x_t, delta_t, B_t, C_t in zip(*(t.unbind(1) for t in (x.to(dtype), delta, B, C))):
        state, y_t = _recurrence_step(state, x_t, delta_t, A, B_t, C_t)
        ys.append(y_t)
    y = _skip_and_gate(torch.stack(ys, dim=1), x, D, z).to(x.dtype)  # (b, l, h, p)
    return (y, state) if return_final_states else y


@torch.no_grad()
def ssd_step_ref(state, x, dt, A, B, C, D=None, z=None, dt_bias=None, dt_softplus=False):
    """`kernels.ssd.ssd_step` (shapes, semantics): one token, `state` updated in place. Not differentiable
    (decoding only)."""
    check_groups(x.shape[1], B.shape[1], "nheads")
    dtype = state.dtype
    delta = step_size(dt.to(dtype), dt_bias, dt_softplus)
    new_state, y = _recurrence_step(state, x.to(dtype), delta, A.to(dtype), B.to(dtype), C.to(dtype))
    state.copy_(new_state)
    return _skip_and_gate(y, x, D, z).to(x.dtype)
