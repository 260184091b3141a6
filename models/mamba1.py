"""Mamba-1 block (Gu & Dao 2023), laid out as mamba_ssm's `modules/mamba_simple.py`.

Glossary (paper symbols): D = d_model, E·D = d_inner (expand E), N = d_state, R = dt_rank,
Δ = dt (per channel and token), A (d_inner, N) = −exp(A_log), B/C (N per token, shared by channels),
D_skip = the `D` parameter (per-channel skip connection).
Selective scan per channel d and state n:  h_t = exp(Δ_t·A)·h_{t−1} + Δ_t·B_t·x_t,  y_t = C_t·h_t + D·x_t.
"""

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from kernels.conv1d import causal_conv1d
from kernels.selective_scan import selective_scan, selective_state_update


@dataclass
class MambaCache:
    """Recurrent state of a Mamba-1 or Mamba-2 block; zeros = the start of a sequence.

    conv_state: (batch, conv channels, d_conv − 1)  the last d_conv − 1 inputs of the conv
    ssm_state:  (batch, d_inner, N) for Mamba-1, (batch, nheads, headdim, N) for Mamba-2; fp32
    """

    conv_state: Tensor
    ssm_state: Tensor


def init_dt_bias(n: int, dt_min: float, dt_max: float, dt_init_floor: float) -> Tensor:
    """softplus⁻¹(Δ) for Δ ~ log-uniform(dt_min, dt_max), floored at dt_init_floor.

    Used as the bias inside softplus, it starts each channel's (or head's) step size Δ spread
    over [dt_min, dt_max], i.e. memories from ~10 to ~1000 tokens long.
    """
    dt = torch.exp(torch.rand(n) * (math.log(dt_max) - math.log(dt_min)) + math.log(dt_min))
    dt = dt.clamp(min=dt_init_floor)
    return dt + torch.log(-torch.expm1(-dt))  # log(exp(Δ) − 1) without overflow


def check_dt_range(dt_min: float, dt_max: float, dt_init_floor: float) -> None:
    if not (isinstance(dt_min, (int, float)) and isinstance(dt_max, (int, float)) and 0 < dt_min <= dt_max):
        raise ValueError(f"dt_min={dt_min!r}, dt_max={dt_max!r}: must satisfy 0 < dt_min <= dt_max")
    if not (isinstance(dt_init_floor, (int, float)) and dt_init_floor >= 0):
        raise ValueError(f"dt_init_floor={dt_init_floor!r}: must be a number >= 0")


class Mamba1(nn.Module):
    """Mamba-1 mixer.

    x: (batch, seqlen, d_model) -> (batch, seqlen, d_model)

    A_log, D and the Δ bias carry `_no_weight_decay = True` so the optimizer can exclude them.
    """

    def __init__(
        self,
        d_model: int,
        d_state: int = 16,
        d_conv: int = 4,
        expand: int = 2,
        dt_rank: int | str = "auto",
        dt_min: float = 0.001,
        dt_max: float = 0.1,
        dt_init_floor: float = 1e-4,
        conv_bias: bool = True,
        bias: bool = False,
    ):
        super().__init__()
        for name, v in dict(d_model=d_model, d_state=d_state, d_conv=d_conv, expand=expand).items():
            if not (isinstance(v, int) and not isinstance(v, bool) and v > 0):
                raise ValueError(f"{name}={v!r}: must be a positive integer")
        if dt_rank == "auto":
            dt_rank = math.ceil(d_model / 16)
        elif not (isinstance(dt_rank, int) and not isinstance(dt_rank, bool) and dt_rank > 0):
            raise ValueError(f"dt_rank={dt_rank!r}: must be a positive integer or 'auto'")
        check_dt_range(dt_min, dt_max, dt_init_floor)
        self.d_model, self.d_state, self.d_conv, self.dt_rank = d_model, d_state, d_conv, dt_rank
        self.d_inner = d_inner = expand * d_model

        self.in_proj = nn.Linear(d_model, 2 * d_inner, bias=bias)  # Order: [x, z]
        self.conv1d = nn.Conv1d(d_inner, d_inner, d_conv, groups=d_inner, bias=conv_bias)
        self.x_proj = nn.Linear(d_inner, dt_rank + 2 * d_state, bias=False)  # Order: [Δ (rank R), B, C]
        self.dt_proj = nn.Linear(dt_rank, d_inner, bias=True)
        # Uniform(±R^−½) keeps the low-rank Δ contribution at unit scale; the LM must not re-init it.
        nn.init.uniform_(self.dt_proj.weight, -dt_rank**-0.5, dt_rank**-0.5)
        with torch.no_grad():
            self.dt_proj.bias.copy_(init_dt_bias(d_inner, dt_min, dt_max, dt_init_floor))
        self.dt_proj._no_reinit = True
        self.dt_proj.bias._no_weight_decay = True
        # S4D-real: A_n = −n for every channel. Kept in fp32: exp(Δ·A) is sensitive to A's precision.
        A = torch.arange(1, d_state + 1, dtype=torch.float32).repeat(d_inner, 1)  # (d_inner, N)
        self.A_log = nn.Parameter(torch.log(A))
        self.A_log._no_weight_decay = True
        self.D = nn.Parameter(torch.ones(d_inner))
        self.D._no_weight_decay = True
        self.out_proj = nn.Linear(d_inner, d_model, bias=bias)

    def forward(self, x: Tensor, cache: MambaCache | None = None) -> Tensor:
        """x: (b, l, d_model). With a cache, continue from its state and leave the final state in it."""
        l = x.shape[1]
        x, z = self.in_proj(x).chunk(2, dim=-1)  # (b, l, d_inner) each
        conv_state = None if cache is None else cache.conv_state
        x = causal_conv1d(x, self.conv1d.weight.squeeze(1), self.conv1d.bias, "silu", conv_state)  # (b, l, d_inner)
        dt, B, C = self.x_proj(x).split([self.dt_rank, self.d_state, self.d_state], dim=-1)
        dt = (dt @ self.dt_proj.weight.T).transpose(1, 2)  # (b, d_inner, l); its bias is added in the scan
        B, C = B.transpose(1, 2), C.transpose(1, 2)  # (b, N, l)
        x, z = x.transpose(1, 2), z.transpose(1, 2)  # (b, d_inner, l), the scan's layout
        A = -torch.exp(self.A_log.float())  # (d_inner, N)
        D, dt_bias = self.D.float(), self.dt_proj.bias.float()
        if cache is None:
            y = selective_scan(x, dt, A, B, C, D=D, z=z, delta_bias=dt_bias, delta_softplus=True)
            return self.out_proj(y.transpose(1, 2))

        # selective_scan starts from h = 0. The scan is linear in its initial state h0, so h0's share
        # is added in closed form: it decays to exp(A·Σ_{s≤t} Δ_s)·h0 by token t.
        y, h = selective_scan(x, dt, A, B, C, D=D, delta_bias=dt_bias, delta_softplus=True, return_last_state=True)
        h0 = cache.ssm_state  # (b, d_inner, N)
        delta = F.softplus(dt.float() + dt_bias[:, None])  # (b, d_inner, l)
        decay = torch.exp(A[:, None] * delta.cumsum(-1)[..., None])  # (b, d_inner, l, N)
        y = y + torch.einsum("bdln,bdn,bnl->bdl", decay, h0, C.float()).to(y.dtype)
        cache.ssm_state.copy_(h + decay[:, :, l - 1] * h0)
        y = y * F.silu(z)
        return self.out_proj(y.transpose(1, 2))

    def step(self, x: Tensor, cache: MambaCache) -> Tensor:
        """x: (b, d_model), the token after the cache's state -> (b, d_model)."""
        x, z = self.in_proj(x).chunk(2, dim=-1)  # (b, d_inner) each
        x = causal_conv1d(x[:, None], self.conv1d.weight.squeeze(1), self.conv1d.bias, "silu", cache.conv_state)[:, 0]
        dt, B, C = self.x_proj(x).split([self.dt_rank, self.d_state, self.d_state], dim=-1)
        dt = dt @ self.dt_proj.weight.T  # (b, d_inner)
        A = -torch.exp(self.A_log.float())
        y = selective_state_update(
            cache.ssm_state, x, dt, A, B, C, D=self.D.float(), z=z, dt_bias=self.dt_proj.bias.float(), dt_softplus=True
        )
        return self.out_proj(y)

    def allocate_cache(self, batch_size: int, max_seqlen: int, device=None, dtype=None) -> MambaCache:
        """Constant-size state; max_seqlen is accepted for the common mixer interface only."""
        w = self.in_proj.weight
        device = device or w.device
        return MambaCache(
            conv_state=torch.zeros(batch_size, self.d_inner, self.d_conv - 1, device=device, dtype=dtype or w.dtype),
            ssm_state=torch.zeros(batch_size, self.d_inner, self.d_state, device=device, dtype=torch.float32),
        )

    def state_size(self, seq_len: int) -> int:
        """2·d_model·N, Zoology's count for Mamba (independent of seq_len).

        The true recurrent state is d_inner·N = expand·d_model·N, the same at the default expand=2;
        Zoology's count, and this one, ignore expand and the small conv state.
        """
        return 2 * self.d_model * self.d_state
