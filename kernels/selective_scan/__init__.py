"""Selective scan, Mamba-1's scan, with a backend switch (see `kernels`): "torch" is
`reference.py`, "triton" is `triton.py`, "auto" picks Triton for CUDA tensors.

Shapes follow mamba_ssm's `selective_scan_fn` and `selective_state_update`; each parameter says
its own.
"""

from torch import Tensor

from kernels import load_backend
from kernels.selective_scan.reference import selective_scan_ref, selective_state_update_ref

__all__ = ["selective_scan", "selective_state_update"]

_TRITON = "kernels.selective_scan.triton"


def selective_scan(
    u: Tensor,                              # (batch, dim, seqlen)
    delta: Tensor,                          # as u
    A: Tensor,                              # (dim, d_state) real
    B: Tensor,                              # (batch, d_state, seqlen) or (batch, ngroups, d_state, seqlen):
                                            # channel c reads group c // (dim/ngroups)
    C: Tensor,                              # as B
    D: Tensor | None = None,                # (dim,)
    z: Tensor | None = None,                # as u
    delta_bias: Tensor | None = None,       # (dim,)
    delta_softplus: bool = False,
    return_last_state: bool = False,
    backend: str = "auto",
) -> Tensor | tuple[Tensor, Tensor]:
    """y = (scan(u) + D·u)·silu(z) over a whole sequence, from h = 0.

    Δ = softplus(delta + delta_bias) if delta_softplus else delta + delta_bias;
    h_t = exp(Δ_t·A)⊙h_{t−1} + Δ_t·B_t·u_t,  y_t = Σ_n C_t h_t + D·u_t.
    Returns y (batch, dim, seqlen) in u.dtype, or (y, last_state (batch, dim, d_state) fp32) when
    return_last_state.
    """
    impl = load_backend(_TRITON, backend, u)
    scan = selective_scan_ref if impl is None else impl.selective_scan_triton
    return scan(
        u, delta, A, B, C, D=D, z=z, delta_bias=delta_bias, delta_softplus=delta_softplus,
        return_last_state=return_last_state,
    )


def selective_state_update(
    state: Tensor,                          # (batch, dim, d_state) fp32, updated in place
    x: Tensor,                              # (batch, dim)
    dt: Tensor,                             # as x
    A: Tensor,                              # (dim, d_state) real
    B: Tensor,                              # (batch, d_state) or (batch, ngroups, d_state)
    C: Tensor,                              # as B
    D: Tensor | None = None,                # (dim,)
    z: Tensor | None = None,                # as x
    dt_bias: Tensor | None = None,          # (dim,)
    dt_softplus: bool = False,
    backend: str = "auto",
) -> Tensor:
    """One token of selective_scan; returns y: (batch, dim) in x.dtype."""
    impl = load_backend(_TRITON, backend, x)
    update = selective_state_update_ref if impl is None else impl.selective_state_update_triton
    return update(state, x, dt, A, B, C, D=D, z=z, dt_bias=dt_bias, dt_softplus=dt_softplus)
