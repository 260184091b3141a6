"""The pieces Mamba-1 and Mamba-2 (and the discrete Mamba-2 student) share: their common
hyper-parameters, the causal conv, the Δ init, the recurrent cache and the state accounting.

Glossary: D = d_model, E = expand, d_inner = E·D, N = d_state, Δ = dt.
"""

import math
from dataclasses import dataclass, field

import torch
from torch import Tensor, nn

from kernels.conv1d import causal_conv1d
from models.mixers.base import Mixer, check_positive_int


@dataclass
class SSMConfig:
    """Hyper-parameters of every Mamba block (named as in mamba_ssm); d_inner = expand·d_model.

    dt_min, dt_max, dt_init_floor: Δ starts log-uniform in [dt_min, dt_max], floored at dt_init_floor.
    conv_bias, bias: whether the conv and the in/out projections have biases.
    """

    d_model: int
    d_state: int = 16
    d_conv: int = 4
    expand: int = 2
    dt_min: float = 0.001
    dt_max: float = 0.1
    dt_init_floor: float = 1e-4
    conv_bias: bool = True
    bias: bool = False
    d_inner: int = field(init=False)

    def __post_init__(self):
        for name in ("d_model", "d_state", "d_conv", "expand"):
            check_positive_int(name, getattr(self, name))
        if not (_is_number(self.dt_min) and _is_number(self.dt_max) and 0 < self.dt_min <= self.dt_max):
            raise ValueError(f"dt_min={self.dt_min!r}, dt_max={self.dt_max!r}: must satisfy 0 < dt_min <= dt_max")
        if not (_is_number(self.dt_init_floor) and self.dt_init_floor >= 0):
            raise ValueError(f"dt_init_floor={self.dt_init_floor!r}: must be a number >= 0")
        self.d_inner = self.expand * self.d_model


def _is_number(v) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool)


def init_dt_bias(n: int, dt_min: float, dt_max: float, dt_init_floor: float) -> Tensor:
    """softplus⁻¹(Δ) for Δ ~ log-uniform(dt_min, dt_max), floored at dt_init_floor.

    Used as the bias inside softplus, it starts each channel's (or head's) step size Δ spread
    over [dt_min, dt_max], i.e. memories from ~10 to ~1000 tokens long.
    """
    dt = torch.exp(torch.rand(n) * (math.log(dt_max) - math.log(dt_min)) + math.log(dt_min))
    dt = dt.clamp(min=dt_init_floor)
    return dt + torch.log(-torch.expm1(-dt))  # log(exp(Δ) − 1) without overflow


class CausalConv1d(nn.Conv1d):
    """Depthwise causal conv (`kernels.conv1d`: Triton on CUDA, PyTorch on CPU) over the sequence.

    x: (batch, seqlen, channels) -> (batch, seqlen, channels); with a conv_state (batch, channels,
    d_conv − 1), it continues from the inputs there and leaves the last d_conv − 1 in it.
    """

    def __init__(self, channels: int, d_conv: int, bias: bool = True):
        super().__init__(channels, channels, d_conv, groups=channels, bias=bias)

    def forward(self, x: Tensor, activation: str | None = "silu", conv_state: Tensor | None = None) -> Tensor:
        return causal_conv1d(x, self.weight.squeeze(1), self.bias, activation, conv_state)


@dataclass
class MambaCache:
    """Recurrent state of a Mamba block; zeros = the start of a sequence.

    conv_state: (batch, conv channels, d_conv − 1)  the last d_conv − 1 inputs of the conv
    ssm_state:  (batch, d_inner, N) for Mamba-1, (batch, nheads, headdim, N) for Mamba-2; fp32
    """

    conv_state: Tensor
    ssm_state: Tensor


class SSMMixer(Mixer):
    """A Mamba block: an `in_proj`, a `conv1d` (CausalConv1d) and a scan whose state has the
    shape `ssm_state_shape`, set by the subclass with `d_model`, `d_state` and `d_conv`.

    Initialised as mamba_ssm does (the LM keeps PyTorch's Linear init under init="mixer").
    """

    reference_init = "mamba_ssm"

    def allocate_cache(self, batch_size: int, max_seqlen: int, device=None, dtype=None) -> MambaCache:
        """Constant-size state; max_seqlen is accepted for the common mixer interface only."""
        w = self.in_proj.weight
        device = device or w.device
        conv = torch.zeros(batch_size, self.conv1d.in_channels, self.d_conv - 1, device=device, dtype=dtype or w.dtype)
        # fp32 whatever the model's dtype: the state sums many small updates.
        ssm = torch.zeros(batch_size, *self.ssm_state_shape, device=device, dtype=torch.float32)
        return MambaCache(conv_state=conv, ssm_state=ssm)

    def state_size(self, seq_len: int) -> int:
        """2·d_model·N, Zoology's count for Mamba (independent of seq_len).

        The true recurrent state is d_inner·N = expand·d_model·N, the same at the default expand=2;
        Zoology's count, and this one, ignore expand and the small conv state.
        """
        return 2 * self.d_model * self.d_state
