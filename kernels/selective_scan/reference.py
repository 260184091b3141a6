"""Selective scan (Mamba-1's S6 layer) in plain PyTorch: the reference (a token loop in place,
with a closed-form backward), the per-token oracle and the one-token state update.

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

from kernels.reference_common import check_groups, compute_dtype, step_size


def _skip_and_gate(y: Tensor, u: Tensor, D: Tensor | None, z: Tensor | None, D_shape: tuple) -> Tensor:
    """(y + D·u)·silu(z) in y's dtype; D (dim,) is viewed as D_shape to broadcast against u."""
    if D is not None:
        y = y + u.to(y.dtype) * D.to(y.dtype).view(D_shape)
    if z is not None:
        y = y * F.silu(z.to(y.dtype))
    return y


def _groups(B: Tensor) -> Tensor:
    """B or C as (batch, g, n, l): rank 3 means one group shared by every channel."""
    return B[:, None] if B.dim() == 3 else B


class _ScanFn(torch.autograd.Function):
    """h_t = exp(Δ_t·A)⊙h_{t−1} + Δ_t·u_t·B_t and y_t = h_t·C_t, time-major, stepped token by token:
    each step works on one token's (b, g, r, n) state, which stays in cache. On a CPU this is memory
    bound, and a log-depth scan over the whole (b, g, l, r, n) tensor passes through memory a dozen
    times (the odd–even scan this replaced made the default Mamba-1 job's step 2-3x slower; see
    README, "CPU defaults"). The backward is in closed form, one reverse loop: the adjoint
    λ_t = ∂L/∂h_t + exp(Δ_{t+1}·A)⊙λ_{t+1}, and each token's gradients taken while λ_t is in cache.

    delta, u: (b, g, l, r), A: (g, r, n), B, C: (b, g, l, n) -> y (b, g, l, r), h_last (b, g, r, n).
    All five come in the compute dtype and both passes stay in it with autocast off: autocast would
    run the matmuls in bf16 and hand the backward a bf16 dy against the fp32 h.
    """

    @staticmethod
    def forward(ctx, delta, u, A, B, C):
        with torch.autocast(delta.device.type, enabled=False):
            h = (delta * u)[..., None] * B[:, :, :, None]  # (b, g, l, r, n): Δ_t·u_t·B_t, then h_t in place
            for t in range(1, h.shape[2]):
                decay = torch.exp(delta[:, :, t, :, None] * A)  # exp(Δ_t·A) ∈ (0, 1]
                h[:, :, t].addcmul_(decay, h[:, :, t - 1])
            ctx.save_for_backward(delta, u, A, B, C, h)
            return (h @ C[..., None]).squeeze(-1), h[:, :, -1]  # y_t = Σ_n C_t h_t

    @staticmethod
    def backward(ctx, dy, dh_last):
        with torch.autocast(dy.device.type, enabled=False):
            delta, u, A, B, C, h = ctx.saved_tensors
            delta_u = delta * u  # (b, g, l, r)
            d_log_delta = torch.zeros_like(delta)  # Σ_n ∂L/∂(Δ_t·A)·A: Δ's gradient through the decay
            d_delta_u = torch.empty_like(delta)  # Σ_n λ_t B_t: the gradient of Δ_t·u_t
            dA, dB = torch.zeros_like(A), torch.empty_like(B)
            lam, next_decay = dh_last, None  # (b, g, r, n); exp(Δ_{t+1}·A), none after the last token
            for t in reversed(range(h.shape[2])):
                dh = dy[:, :, t, :, None] * C[:, :, t, None, :]  # ∂L/∂h_t through y_t
                lam = dh + lam if next_decay is None else torch.addcmul(dh, next_decay, lam)
                d_delta_u[:, :, t] = (lam @ B[:, :, t, :, None]).squeeze(-1)
                dB[:, :, t] = (delta_u[:, :, t, None, :] @ lam).squeeze(-2)  # Σ_r Δ_t u_t λ_t
                if t == 0:
                    break  # h_{−1} = 0: the first decay has no gradient
                decay = torch.exp(delta[:, :, t, :, None] * A)
                d_log_decay = lam * decay * h[:, :, t - 1]  # ∂L/∂(Δ_t·A) = λ_t ⊙ h_{t−1} ⊙ exp(Δ_t·A)
                d_log_delta[:, :, t] = (d_log_decay * A).sum(-1)
                dA += (d_log_decay * delta[:, :, t, :, None]).sum(0)
                next_decay = decay
            dC = (dy[..., None, :] @ h).squeeze(-2)  # (b, g, l, n): Σ_r dy_t h_t
            return d_log_delta + d_delta_u * u, d_delta_u * delta, dA, dB, dC


def selective_scan_ref(u, delta, A, B, C, D=None, z=None, delta_bias=None, delta_softplus=False,
                       return_last_state=False):
    """`kernels.selective_scan.selective_scan` (shapes, semantics) token by token in place, with a closed-form
    backward (see _ScanFn). Materialises h for every token, d·n values each."""
    batch, d, l = u.shape
    B, C = _groups(B), _groups(C)
    g, n = B.shape[1:3]
    check_groups(d, g, "dim")
    r = d // g
    dtype = compute_dtype(u)
    delta = step_size(delta.to(dtype), None if delta_bias is None else delta_bias[:, None], delta_softplus)
    # Time-major (b, g, l, r, n): each token's state is one contiguous block, which keeps a step's
    # slices dense and lets C read h out with a plain batched matmul.
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


def selective_scan_naive(u, delta, A, B, C, D=None, z=None, delta_bias=None, delta_softplus=False,
                         return_last_state=False):
    """`kernels.selective_scan.selective_scan` (shapes, semantics) as the recurrence token by token: the test
    oracle (give it fp64 inputs)."""
    batch, d, _ = u.shape
    B, C = _groups(B), _groups(C)
    g, n = B.shape[1:3]
    check_groups(d, g, "dim")
    dtype = compute_dtype(u)
    delta = step_size(delta.to(dtype), None if delta_bias is None else delta_bias[:, None], delta_softplus)
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
def selective_state_update_ref(state, x, dt, A, B, C, D=None, z=None, dt_bias=None, dt_softplus=False):
    """`kernels.selective_scan.selective_state_update` (shapes, semantics): one token, `state` updated in place.
    Not differentiable (decoding only)."""
    B = B[:, None] if B.dim() == 2 else B  # (b, g, n)
    C = C[:, None] if C.dim() == 2 else C
    check_groups(x.shape[1], B.shape[1], "dim")
    dtype = state.dtype
    delta = step_size(dt.to(dtype), dt_bias, dt_softplus)
    new_state, y = _recurrence_step(state, x.to(dtype), delta, A.to(dtype), B.to(dtype), C.to(dtype))
    state.copy_(new_state)
    return _skip_and_gate(y, x, D, z, (-1,)).to(x.dtype)
