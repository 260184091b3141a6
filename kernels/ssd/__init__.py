"""SSD, Mamba-2's scan, with a backend switch (see `kernels`): "torch" is `reference.py`, "triton"
is `triton.py` (which runs `chunk.py` or `fused.py`, as `path` says, and `step.py`), "auto" picks Triton
for CUDA tensors (the reference, with a warning, where the state is too large for the Triton kernels'
shared memory).

Shapes follow mamba_ssm's `mamba_chunk_scan_combined` and `selective_state_update`; each parameter
says its own.
"""

import warnings

from torch import Tensor

from kernels import load_backend
from kernels.ssd.reference import ssd_scan_ref, ssd_step_ref

__all__ = ["ssd_scan", "ssd_step"]

_TRITON = "kernels.ssd.triton"


def ssd_scan(
    x: Tensor,                              # (batch, seqlen, nheads, headdim)
    dt: Tensor,                             # (batch, seqlen, nheads)
    A: Tensor,                              # (nheads,)
    B: Tensor,                              # (batch, seqlen, ngroups, d_state):
                                            # head i reads group i // (nheads/ngroups)
    C: Tensor,                              # as B
    chunk_size: int,
    D: Tensor | None = None,                # (nheads,) or (nheads, headdim)
    z: Tensor | None = None,                # as x
    dt_bias: Tensor | None = None,          # (nheads,)
    dt_softplus: bool = False,
    initial_states: Tensor | None = None,   # (batch, nheads, headdim, d_state) fp32
    return_final_states: bool = False,
    backend: str = "auto",
    path: str = "auto",
) -> Tensor | tuple[Tensor, Tensor]:
    """y = (SSD(x) + D·x)·silu(z) over a whole sequence of any length, from `initial_states` (or 0).

    Δ = softplus(dt + dt_bias) if dt_softplus else dt + dt_bias;
    h_t = exp(Δ_t·A)·h_{t−1} + Δ_t·x_t B_tᵀ,  y_t = h_t C_t + D·x_t.
    Returns y (batch, seqlen, nheads, headdim) in x.dtype, or (y, final_states fp32) when
    return_final_states. `path` picks the Triton algorithm ("fused", "chunked", or "auto" by the shape;
    see `kernels.ssd.triton`); the reference ignores it.
    """
    impl = load_backend(_TRITON, backend, x)
    if impl is not None and backend == "auto":
        reason = impl.unsupported(x, B.shape[-1])
        if reason:  # shown once per distinct message (Python's default warning filter)
            warnings.warn(f"{reason}; backend='auto' uses the PyTorch reference")
            impl = None
    kwargs = dict(D=D, z=z, dt_bias=dt_bias, dt_softplus=dt_softplus, initial_states=initial_states,
                  return_final_states=return_final_states)
    if impl is None:
        return ssd_scan_ref(x, dt, A, B, C, chunk_size, **kwargs)
    return impl.ssd_scan_triton(x, dt, A, B, C, chunk_size, **kwargs, path=path)


def ssd_step(
    state: Tensor,                          # (batch, nheads, headdim, d_state) fp32, updated in place
    x: Tensor,                              # (batch, nheads, headdim)
    dt: Tensor,                             # (batch, nheads)
    A: Tensor,                              # (nheads,)
    B: Tensor,                              # (batch, ngroups, d_state)
    C: Tensor,                              # as B
    D: Tensor | None = None,                # (nheads,) or (nheads, headdim)
    z: Tensor | None = None,                # as x
    dt_bias: Tensor | None = None,          # (nheads,)
    dt_softplus: bool = False,
    backend: str = "auto",
) -> Tensor:
    """One token of ssd_scan; returns y: (batch, nheads, headdim) in x.dtype."""
    impl = load_backend(_TRITON, backend, x)
    step = ssd_step_ref if impl is None else impl.ssd_step_triton
    return step(state, x, dt, A, B, C, D=D, z=z, dt_bias=dt_bias, dt_softplus=dt_softplus)
