"""Selective scan (Mamba-1's S6 layer) in plain PyTorch: the parallel reference, the per-token
oracle and the one-token state update.

Glossary (Mamba paper, arXiv 2312.00752): per channel d and state index n, a real A_{d,n} < 0 and
a step size Δ_{t,d},
    h_t = exp(Δ_t·A)⊙h_{t−1} + Δ_t·B_t·u_t        state h_t: (D, N)
    y_t = Σ_n C_t h_t + D·u_t,   then y_t · silu(z_t) when a gate z is given.
N = d_state, G = ngroups: channel c reads B, C of group c // (D/G) (G = 1 for B, C of rank 3).
Everything is computed in fp32 (fp64 for fp64 inputs, which makes the oracle exact enough to
test gradients); y comes back in u's dtype, states in the compute dtype.

Shapes (mamba_ssm `selective_scan_fn` layout):
    u, delta, z:        (batch, dim, seqlen)
    A:                  (dim, d_state)
    B, C:               (batch, d_state, seqlen) or (batch, ngroups, d_state, seqlen)
    D, delta_bias:      (dim,)
    last_state:         (batch, dim, d_state)
"""

import torch
import torch.nn.functional as F
from torch import Tensor


def _compute_dtype(u: Tensor) -> torch.dtype:
    return torch.float64 if u.dtype == torch.float64 else torch.float32


def _check(dim: int, ngroups: int) -> None:
    if dim % ngroups:
        raise ValueError(f"ngroups={ngroups}: must divide dim={dim}")


def _delta(delta: Tensor, bias: Tensor | None, softplus: bool) -> Tensor:
    """Δ from the raw delta: delta + bias (already shaped to broadcast), through softplus when asked."""
    if bias is not None:
        delta = delta + bias.to(delta.dtype)
    return F.softplus(delta) if softplus else delta


def _skip_and_gate(y: Tensor, u: Tensor, D: Tensor | None, z: Tensor | None, D_shape: tuple) -> Tensor:
    """(y + D·u)·silu(z) in y's dtype; D (dim,) is viewed as D_shape to broadcast against u."""
    if D is not None:
        y = y + u.to(y.dtype) * D.to(y.dtype).view(D_shape)
    if z is not None:
        y = y * F.silu(z.to(y.dtype))
    return y


def _linear_scan(a: Tensor, b: Tensor) -> Tensor:
    """h_t = a_t·h_{t−1} + b_t along dim −2 from h_{−1} = 0; a, b, h: (..., l, k).

    Odd–even reduction: fold each pair of neighbours into one step, (a, b) then (a', b') giving
    (a'·a, a'·b + b'), scan the half-length sequence recursively (it yields h at odd positions),
    then fill in the even ones. Only products of decays (each ≤ 1) are formed, so nothing
    overflows at any Δ; the depth is log2(l) and the work, like the memory autograd keeps, is O(l).
    """
    l = a.shape[-2]
    if l == 1:
        return b
    if l % 2:
        h = _linear_scan(a[..., :-1, :], b[..., :-1, :])
        return torch.cat([h, a[..., -1:, :] * h[..., -1:, :] + b[..., -1:, :]], dim=-2)
    # unbind rather than strided slices: its backward is one stack, not a zero-fill and copy per slice
    a_even, a_odd = a.unflatten(-2, (l // 2, 2)).unbind(-2)  # (..., l/2, k) each
    b_even, b_odd = b.unflatten(-2, (l // 2, 2)).unbind(-2)
    h_odd = _linear_scan(a_odd * a_even, torch.addcmul(b_odd, a_odd, b_even))  # h_1, h_3, ...
    h_before_even = F.pad(h_odd[..., :-1, :], (0, 0, 1, 0))  # h_{−1} = 0, h_1, h_3, ...
    h_even = torch.addcmul(b_even, a_even, h_before_even)  # h_0, h_2, ...
    return torch.stack([h_even, h_odd], dim=-2).flatten(-3, -2)  # interleave back to (..., l, k)


def _groups(B: Tensor) -> Tensor:
    """B or C as (batch, g, n, l): rank 3 means one group shared by every channel."""
    return B[:, None] if B.dim() == 3 else B


def selective_scan_ref(
    u: Tensor,
    delta: Tensor,
    A: Tensor,
    B: Tensor,
    C: Tensor,
    D: Tensor | None = None,
    z: Tensor | None = None,
    delta_bias: Tensor | None = None,
    delta_softplus: bool = False,
    return_last_state: bool = False,
) -> Tensor | tuple[Tensor, Tensor]:
    """Parallel selective scan over the whole length (log-depth odd–even scan, see _linear_scan).

    u, delta, z: (b, d, l), A: (d, n), B, C: (b, n, l) or (b, g, n, l), D, delta_bias: (d,).
    Returns y: (b, d, l) in u.dtype, and the last state (b, d, n) when return_last_state.
    Materialises h for every token, d·n values each (and a few such tensors for autograd).
    """
    batch, d, l = u.shape
    B, C = _groups(B), _groups(C)
    g, n = B.shape[1:3]
    _check(d, g)
    r = d // g
    dtype = _compute_dtype(u)
    delta = _delta(delta.to(dtype), None if delta_bias is None else delta_bias[:, None], delta_softplus)
    # Time-major (b, g, l, r, n): each token's state is one contiguous block, which keeps the scan's
    # even/odd halves dense and lets C read h out with a plain batched matmul.
    delta_t = delta.view(batch, g, r, l).transpose(-1, -2)  # (b, g, l, r)
    u_t = u.to(dtype).view(batch, g, r, l).transpose(-1, -2)
    B, C = B.to(dtype).transpose(-1, -2), C.to(dtype).transpose(-1, -2)  # (b, g, l, n)
    decay = torch.exp(delta_t.contiguous()[..., None] * A.to(dtype).view(g, 1, r, n))  # exp(Δ_t·A) ∈ (0, 1]
    Bu = (delta_t * u_t).contiguous()[..., None] * B[:, :, :, None]  # (b, g, l, r, n): Δ_t·B_t·u_t
    h = _linear_scan(decay.flatten(-2), Bu.flatten(-2)).view(batch, g, l, r, n)
    y = (h @ C[..., None]).view(batch, g, l, r).transpose(-1, -2).reshape(batch, d, l)  # Σ_n C_t h_t
    y = _skip_and_gate(y, u, D, z, (d, 1)).to(u.dtype)
    return (y, h[:, :, -1].reshape(batch, d, n)) if return_last_state else y


def _recurrence_step(
    state: Tensor, u: Tensor, delta: Tensor, A: Tensor, B: Tensor, C: Tensor
) -> tuple[Tensor, Tensor]:
    """One token, all in one dtype: state (b, d, n), u, Δ (b, d), A (d, n), B, C (b, g, n)
    -> (next state, y before skip and gate (b, d))."""
    r = u.shape[1] // B.shape[1]
    B = B.repeat_interleave(r, dim=1)  # (b, d, n): channel c reads group c // r
    C = C.repeat_interleave(r, dim=1)
    state = torch.exp(delta[..., None] * A) * state + (delta * u)[..., None] * B
    return state, (state * C).sum(-1)


def selective_scan_naive(
    u: Tensor,
    delta: Tensor,
    A: Tensor,
    B: Tensor,
    C: Tensor,
    D: Tensor | None = None,
    z: Tensor | None = None,
    delta_bias: Tensor | None = None,
    delta_softplus: bool = False,
    return_last_state: bool = False,
) -> Tensor | tuple[Tensor, Tensor]:
    """The recurrence token by token: the test oracle (give it fp64 inputs). Shapes as selective_scan_ref."""
    batch, d, _ = u.shape
    B, C = _groups(B), _groups(C)
    g, n = B.shape[1:3]
    _check(d, g)
    dtype = _compute_dtype(u)
    delta = _delta(delta.to(dtype), None if delta_bias is None else delta_bias[:, None], delta_softplus)
    A, B, C = A.to(dtype), B.to(dtype), C.to(dtype)
    state = u.new_zeros(batch, d, n, dtype=dtype)
    ys = []
    # unbind, not u[..., t]: the backward of l index ops would zero-fill and add l full-size gradients
    for u_t, delta_t, B_t, C_t in zip(*(t.unbind(-1) for t in (u.to(dtype), delta, B, C))):
        state, y_t = _recurrence_step(state, u_t, delta_t, A, B_t, C_t)
        ys.append(y_t)
    y = _skip_and_gate(torch.stack(ys, dim=-1), u, D, z, (d, 1)).to(u.dtype)  # (b, d, l)
    return (y, state) if return_last_state else y


@torch.no_grad()
def selective_state_update_ref(
    state: Tensor,
    x: Tensor,
    dt: Tensor,
    A: Tensor,
    B: Tensor,
    C: Tensor,
    D: Tensor | None = None,
    z: Tensor | None = None,
    dt_bias: Tensor | None = None,
    dt_softplus: bool = False,
) -> Tensor:
    """One token of the selective scan (decoding); updates `state` in place.

    state: (b, d, n) fp32, x, dt, z: (b, d), A: (d, n), B, C: (b, n) or (b, g, n), D, dt_bias: (d,).
    Returns y: (b, d) in x.dtype. Not differentiable (decoding only).
    """
    B = B[:, None] if B.dim() == 2 else B  # (b, g, n)
    C = C[:, None] if C.dim() == 2 else C
    _check(x.shape[1], B.shape[1])
    dtype = state.dtype
    delta = _delta(dt.to(dtype), dt_bias, dt_softplus)
    new_state, y = _recurrence_step(state, x.to(dtype), delta, A.to(dtype), B.to(dtype), C.to(dtype))
    state.copy_(new_state)
    return _skip_and_gate(y, x, D, z, (-1,)).to(x.dtype)
