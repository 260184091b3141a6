"""Gated RMSNorm, Mamba-2's norm before out_proj, with a backend switch (see `kernels`): "torch" is
`reference.py`, "triton" is `triton.py`, "auto" picks Triton for CUDA tensors.

    out = RMSNorm(y · silu(z)) · weight over groups of group_size channels (mamba_ssm's
          `rmsnorm_fn(y, weight, None, z=z, group_size=group_size, norm_before_gate=False)`);
          with z = None, the plain RMSNorm(y) · weight (mamba_ssm's `RMSNorm`)

Shapes:
    y, z, out:  (..., d)     z may be a slice of in_proj's output (unit channel stride)
    weight:     (d,)         d a multiple of group_size
"""

from torch import Tensor

from kernels import load_backend
from kernels.gated_norm.reference import gated_rms_norm_ref

__all__ = ["gated_rms_norm"]

_TRITON = "kernels.gated_norm.triton"


def gated_rms_norm(
    y: Tensor, z: Tensor | None, weight: Tensor, group_size: int, eps: float = 1e-5, backend: str = "auto"
) -> Tensor:
    """RMSNorm(y · silu(z)) · weight (RMSNorm(y) · weight when z is None), each group of group_size
    channels normalised on its own, with fp32 statistics. Returns (..., d) in y's dtype."""
    impl = load_backend(_TRITON, backend, y)
    norm = gated_rms_norm_ref if impl is None else impl.gated_rms_norm_triton
    return norm(y, z, weight, group_size, eps)
