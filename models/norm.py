"""RMSNorm, the blocks' pre-norm and the final norm, and gated RMSNorm, the norm Mamba-2 applies between the
SSD output and out_proj (`kernels.gated_norm`: Triton on CUDA, PyTorch on CPU)."""

import torch
from torch import Tensor, nn

from kernels.gated_norm import gated_rms_norm


class GatedRMSNorm(nn.Module):
    """RMSNorm(y · silu(z)) · weight, normalised over groups of `group_size` channels.

    The gate comes before the norm (mamba_ssm's norm_before_gate=False). With ngroups > 1 Mamba-2
    normalises each group of heads separately, so a group's scale does not depend on the others.
    Statistics in fp32; out in y's dtype (`kernels.gated_norm`: Triton on CUDA, PyTorch on CPU).

    y, z: (..., d)  ->  (..., d)
    """

    def __init__(self, d: int, group_size: int | None = None, eps: float = 1e-5):
        super().__init__()
        self.group_size = d if group_size is None else group_size
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(d))

    def forward(self, y: Tensor, z: Tensor) -> Tensor:
        return gated_rms_norm(y, z, self.weight, self.group_size, self.eps)


class RMSNorm(nn.Module):
    """x / RMS(x) · weight over the last dimension, statistics in fp32; out in x's dtype. nn.RMSNorm's
    function and parameter, through the norm kernels: on the GPU its weight gradient is a two-level sum
    (per-program partials, then one sum), where torch's kernel for it took ~90 µs on a (32768, 128)
    input, about a fifth of a small attention model's step (BENCHMARKS.md).

    x: (..., d)  ->  (..., d)
    """

    def __init__(self, d: int, eps: float = 1e-5):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(d))

    def forward(self, x: Tensor) -> Tensor:
        return gated_rms_norm(x, None, self.weight, x.shape[-1], self.eps)
