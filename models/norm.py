"""Gated RMSNorm, the norm Mamba-2 applies between the SSD output and out_proj."""

import torch
import torch.nn.functional as F
from torch import Tensor, nn


class GatedRMSNorm(nn.Module):
    """RMSNorm(y · silu(z)) · weight, normalised over groups of `group_size` channels.

    The gate comes before the norm (mamba_ssm's norm_before_gate=False). With ngroups > 1 Mamba-2
    normalises each group of heads separately, so a group's scale does not depend on the others.

    y, z: (..., d)  ->  (..., d)
    """

    def __init__(self, d: int, group_size: int | None = None, eps: float = 1e-5):
        super().__init__()
        self.group_size = d if group_size is None else group_size
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(d))

    def forward(self, y: Tensor, z: Tensor) -> Tensor:
        dtype = y.dtype
        # Normalise in fp32: the mean of squares loses too much in bf16.
        y = y.float() * F.silu(z.float())
        y = y.unflatten(-1, (-1, self.group_size))  # (..., groups, group_size)
        y = y * torch.rsqrt(y.pow(2).mean(-1, keepdim=True) + self.eps)
        return (y.flatten(-2) * self.weight.float()).to(dtype)
