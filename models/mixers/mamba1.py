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

from kernels.selective_scan import selective_scan, selective_state_update
from models.mixers.ssm import CausalConv1d, MambaCache, SSMConfig, SSMMixer, init_dt_bias


@dataclass
class Mamba1Config(SSMConfig):
    """Mamba-1's hyper-parameters: SSMConfig's (N = d_state, default 16) and dt_rank R ("auto": ⌈D/16⌉)."""

    d_state: int = 16
    dt_rank: int | str = "auto"

    def __post_init__(self):
        super().__post_init__()
        if self.dt_rank == "auto":
            self.dt_rank = math.ceil(self.d_model / 16)
        elif not (isinstance(self.dt_rank, int) and not isinstance(self.dt_rank, bool) and self.dt_rank > 0):
            raise ValueError(f"dt_rank={self.dt_rank!r}: must be a positive integer or 'auto'")


class Mamba1(SSMMixer):
    """Mamba-1 mixer.

    x: (batch, seqlen, d_model) -> (batch, seqlen, d_model)
    params: Mamba1Config's fields after d_model.

    A_log, D and the Δ bias carry `_no_weight_decay = True` so the optimizer can exclude them.
    """

    Config = Mamba1Config

    def __init__(self, d_model: int, **params):
        super().__init__()
        cfg = Mamba1Config(d_model, **params)
        self.d_model, self.d_state, self.d_conv, self.dt_rank = d_model, cfg.d_state, cfg.d_conv, cfg.dt_rank
        self.d_inner = d_inner = cfg.d_inner
        dt_rank, d_state = cfg.dt_rank, cfg.d_state
        self.ssm_state_shape = (d_inner, d_state)

        self.in_proj = nn.Linear(d_model, 2 * d_inner, bias=cfg.bias)  # Order: [x, z]
        self.conv1d = CausalConv1d(d_inner, cfg.d_conv, bias=cfg.conv_bias)
        self.x_proj = nn.Linear(d_inner, dt_rank + 2 * d_state, bias=False)  # Order: [Δ (rank R), B, C]
        self.dt_proj = nn.Linear(dt_rank, d_inner, bias=True)
        # Uniform(±R^−½) keeps the low-rank Δ contribution at unit scale; the LM must not re-init it.
        nn.init.uniform_(self.dt_proj.weight, -dt_rank**-0.5, dt_rank**-0.5)
        with torch.no_grad():
            self.dt_proj.bias.copy_(init_dt_bias(d_inner, cfg.dt_min, cfg.dt_max, cfg.dt_init_floor))
        self.dt_proj._no_reinit = True
        self.dt_proj.bias._no_weight_decay = True
        # S4D-real: A_n = −n for every channel. Kept in fp32: exp(Δ·A) is sensitive to A's precision.
        A = torch.arange(1, d_state + 1, dtype=torch.float32).repeat(d_inner, 1)  # (d_inner, N)
        self.A_log = nn.Parameter(torch.log(A))
        self.A_log._no_weight_decay = True
        self.D = nn.Parameter(torch.ones(d_inner))
        self.D._no_weight_decay = True
        self.out_proj = nn.Linear(d_inner, d_model, bias=cfg.bias)

    def forward(self, x: Tensor, cache: MambaCache | None = None) -> Tensor:
        """x: (b, l, d_model). With a cache, continue from its state and leave the final state in it."""
        l = x.shape[1]
        x, z = self.in_proj(x).chunk(2, dim=-1)  # (b, l, d_inner) each
        conv_state = None if cache is None else cache.conv_state
        x = self.conv1d(x, "silu", conv_state)  # (b, l, d_inner)
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
        x = self.conv1d(x[:, None], "silu", cache.conv_state)[:, 0]
        dt, B, C = self.x_proj(x).split([self.dt_rank, self.d_state, self.d_state], dim=-1)
        dt = dt @ self.dt_proj.weight.T  # (b, d_inner)
        A = -torch.exp(self.A_log.float())
        y = selective_state_update(
            cache.ssm_state, x, dt, A, B, C, D=self.D.float(), z=z, dt_bias=self.dt_proj.bias.float(), dt_softplus=True
        )
        return self.out_proj(y)
