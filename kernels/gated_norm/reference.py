"""Gated RMSNorm, the norm Mamba-2 applies between the SSD output and out_proj, in plain PyTorch: the
spec of the Triton kernels and the CPU path.

    out = RMSNorm(y · silu(z)) · weight,  each group of `group_size` channels normalised on its own
    (z = None: RMSNorm(y) · weight, the blocks' pre-norm)
The gate comes before the norm (mamba_ssm's `rmsnorm_fn(..., norm_before_gate=False)`). Statistics and
arithmetic in fp32 (fp64 for fp64 inputs); out in y's dtype.

Shapes:
    y, z, out:  (..., d)          d a multiple of group_size
    weight:     (d,)
"""

import torch
import torch.nn.functional as F
from torch import Tensor


def gated_rms_norm_ref(y: Tensor, z: Tensor | None, weight: Tensor, group_size: int, eps: float = 1e-5) -> Tensor:
    """RMSNorm(y · silu(z)) · weight over groups of group_size channels (no gate when z is None);
    (..., d) in y's dtype."""
    dtype = y.dtype
    compute = torch.promote_types(dtype, torch.float32)  # fp32: the mean of squares loses too much in bf16
    y = y.to(compute)
    if z is not None:
        y = y * F.silu(z.to(compute))
    y = y.unflatten(-1, (-1, group_size))  # (..., groups, group_size)
    y = y * torch.rsqrt(y.pow(2).mean(-1, keepdim=True) + eps)
    return (y.flatten(-2) * weight.to(compute)).to(dtype)
