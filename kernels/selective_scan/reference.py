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


def _linear_scan(a: Tensor, b: Tensor, reverse: bool = False) -> Tensor:
    """h_t = a_t·h_{t−1} + b_t along dim −2 from h_{−1} = 0; a, b, h: (..., l, k).
    reverse: h_t = a_t·h_{t+1} + b_t from h_l = 0 instead (the adjoint of the forward scan).

    Odd–even reduction: fold each pair of neighbours into one step, (a, b) then (a', b') giving
    (a'·a, a'·b + b'), scan the half-length sequence recursively (it yields h at the second of
    each pair), then fill in the first ones. Only products of decays (each ≤ 1) are formed, so
    nothing overflows at any Δ; the depth is log2(l) and the work is O(l).
    """
    l = a.shape[-2]
    if l == 1:
        return b
    if l % 2:  # scan all but the token that comes last in scan order, then append it
        if reverse:
            h = _linear_scan(a[..., 1:, :], b[..., 1:, :], reverse)
            return torch.cat([torch.addcmul(b[..., :1, :], a[..., :1, :], h[..., :1, :]), h], dim=-2)
        h = _linear_scan(a[..., :-1, :], b[..., :-1, :])
        return torch.cat([h, torch.addcmul(b[..., -1:, :], a[..., -1:, :], h[..., -1:, :])], dim=-2)
    # unbind rather than strided slices: its backward is one stack, not a zero-fill and copy per slice
    a_even, a_odd = a.unflatten(-2, (l // 2, 2)).unbind(-2)  # (..., l/2, k) each
    b_even, b_odd = b.unflatten(-2, (l // 2, 2)).unbind(-2)
    if reverse:  # the pair's later token (odd) comes first in scan order
        h_even = _linear_scan(a_even * a_odd, torch.addcmul(b_even, a_even, b_odd), reverse)  # h_0, h_2, ...
        h_after_odd = F.pad(h_even[..., 1:, :], (0, 0, 0, 1))  # h_2, h_4, ..., h_l = 0
        h_odd = torch.addcmul(b_odd, a_odd, h_after_odd)  # h_1, h_3, ...
    else:
        h_odd = _linear_scan(a_odd * a_even, torch.addcmul(b_odd, a_odd, b_even))  # h_1, h_3, ...
        h_before_even = F.pad(h_odd[..., :-1, :], (0, 0, 1, 0))  # h_{−1} = 0, h_1, h_3, ...
        h_even = torch.addcmul(b_even, a_even, h_before_even)  # h_0, h_2, ...
    return torch.stack([h_even, h_odd], dim=-2).flatten(-3, -2)  # interleave back to (..., l, k)


def _groups(B: Tensor) -> Tensor:
    """B or C as (batch, g, n, l): rank 3 means one group shared by every channel."""
    return B[:, None] if B.dim() == 3 else B


def _shift(x: Tensor, steps: int) -> Tensor:
    """x moved `steps` tokens along dim 2 (later if > 0, earlier if < 0), zero-filled."""
    pad = [0, 0] * (x.dim() - 3) + ([steps, 0] if steps > 0 else [0, -steps])
    return F.pad(x[:, :, :-steps] if steps > 0 else x[:, :, -steps:], pad)


class _ScanFn(torch.autograd.Function):
    """h_t = exp(Δ_t·A)⊙h_{t−1} + Δ_t·u_t·B_t and y_t = h_t·C_t, time-major, with the backward in
    closed form: one reverse scan for the adjoint λ_t = ∂L/∂h_t + exp(Δ_{t+1}·A)⊙λ_{t+1}, then
    products with the saved h. Autograd through the odd–even scan would keep every level of it;
    this keeps h alone and is about twice as fast on a CPU.

    delta, u: (b, g, l, r), A: (g, r, n), B, C: (b, g, l, n) -> y (b, g, l, r), h_last (b, g, r, n).
    All five come in the compute dtype and both passes stay in it with autocast off: autocast would
    run the matmuls in bf16 and hand the backward a bf16 dy against the fp32 h.
    """

    @staticmethod
    def forward(ctx, delta, u, A, B, C):
        with torch.autocast(delta.device.type, enabled=False):
            decay = torch.exp(delta[..., None] * A[:, None])  # (b, g, l, r, n): exp(Δ_t·A) ∈ (0, 1]
            x = (delta * u)[..., None] * B[:, :, :, None]  # Δ_t·u_t·B_t
            h = _linear_scan(decay.flatten(-2), x.flatten(-2)).view_as(x)
            ctx.save_for_backward(delta, u, A, B, C, h)
            return (h @ C[..., None]).squeeze(-1), h[:, :, -1]  # y_t = Σ_n C_t h_t

    @staticmethod
    def backward(ctx, dy, dh_last):
        with torch.autocast(dy.device.type, enabled=False):
            delta, u, A, B, C, h = ctx.saved_tensors
            dh = dy[..., None] * C[:, :, :, None]  # (b, g, l, r, n): ∂L/∂h_t through y_t
            dh[:, :, -1] += dh_last
            decay = torch.exp(delta[..., None] * A[:, None])
            next_decay = _shift(decay, -1)  # exp(Δ_{t+1}·A), 0 after the last token
            lam = _linear_scan(next_decay.flatten(-2), dh.flatten(-2), reverse=True).view_as(h)
            d_log_decay = lam * _shift(h, 1) * decay  # ∂L/∂(Δ_t·A) = λ_t ⊙ h_{t−1} ⊙ exp(Δ_t·A)
            d_delta_u = (lam @ B[..., None]).squeeze(-1)  # (b, g, l, r): Σ_n λ_t B_t
            d_delta = (d_log_decay * A[:, None]).sum(-1) + d_delta_u * u
            dA = (d_log_decay * delta[..., None]).sum((0, 2))  # (g, r, n)
            dB = ((delta * u)[..., None, :] @ lam).squeeze(-2)  # (b, g, l, n): Σ_r Δ_t u_t λ_t
            dC = (dy[..., None, :] @ h).squeeze(-2)  # Σ_r dy_t h_t
            return d_delta, d_delta_u * delta, dA, dB, dC


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
    """Parallel selective scan over the whole length (log-depth odd–even scan, see _linear_scan;
    closed-form backward, see _ScanFn).

    u, delta, z: (b, d, l), A: (d, n), B, C: (b, n, l) or (b, g, n, l), D, delta_bias: (d,).
    Returns y: (b, d, l) in u.dtype, and the last state (b, d, n) when return_last_state.
    Materialises h for every token, d·n values each.
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
    delta_t = delta.view(batch, g, r, l).transpose(-1, -2).contiguous()  # (b, g, l, r)
    u_t = u.to(dtype).view(batch, g, r, l).transpose(-1, -2).contiguous()
    B, C = (M.to(dtype).transpose(-1, -2).contiguous() for M in (B, C))  # (b, g, l, n)
    y, last = _ScanFn.apply(delta_t, u_t, A.to(dtype).view(g, r, n), B, C)
    y = y.transpose(-1, -2).reshape(batch, d, l)
    y = _skip_and_gate(y, u, D, z, (d, 1)).to(u.dtype)
    return (y, last.reshape(batch, d, n)) if return_last_state else y


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
