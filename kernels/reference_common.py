"""What the scans' PyTorch references share: the compute dtype, the group check and Δ (the step size)."""

import torch
import torch.nn.functional as F
from torch import Tensor


def compute_dtype(x: Tensor) -> torch.dtype:
    """fp64 for fp64 inputs (which makes the oracles exact enough to test gradients), else fp32."""
    return torch.float64 if x.dtype == torch.float64 else torch.float32


def check_groups(channels: int, ngroups: int, name: str) -> None:
    """ngroups must divide the `name` channels (nheads, or Mamba-1's dim) that share B and C."""
    if channels % ngroups:
        raise ValueError(f"ngroups={ngroups}: must divide {name}={channels}")


def step_size(dt: Tensor, bias: Tensor | None, softplus: bool) -> Tensor:
    """Δ, the step size, from the raw dt: dt + bias (already shaped to broadcast against dt), through softplus when asked."""
    if bias is not None:
        dt = dt + bias.to(dt.dtype)
    return F.softplus(dt) if softplus else dt
