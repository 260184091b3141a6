"""Mamba-2 block (Dao & Gu 2024), laid out as mamba_ssm's `modules/mamba2_simple.py` / `mamba2.py`.

Glossary (paper symbols): D = d_model, d_inner = expand·D, P = headdim, H = nheads = d_inner / P,
G = ngroups (heads share B and C within a group, like grouped-query attention), N = d_state,
Q = chunk_size, Δ = dt (per head and token), A = −exp(A_log) (one scalar per head),
D_skip = the `D` parameter (per head).
SSD per head:  h_t = exp(Δ_t·A)·h_{t−1} + Δ_t·x_t B_tᵀ,  y_t = h_t C_t + D·x_t,  h: (P, N).
"""

from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from kernels.ssd import ssd_scan, ssd_step
from models.mixers.base import check_positive_int
from models.mixers.ssm import CausalConv1d, MambaCache, SSMConfig, SSMMixer, init_dt_bias
from models.norm import GatedRMSNorm


def materialize_ssd(dA: Tensor, B: Tensor, C: Tensor, scale: Tensor | None = None, D: Tensor | None = None) -> Tensor:
    """The SSD matrix M of each head, so that y_t = Σ_s M_ts·x_s (the scan's output, D·x included).

    M_ts = (C_t·B_s)·scale_s·exp(Σ_{k=s+1..t} dA_k) for s ≤ t, 0 above the diagonal, + D on it.
    Mamba-2: dA = Δ·A and scale = Δ; without Δ discretisation of the input, scale = None (1).

    dA, scale: (batch, seqlen, nheads)
    B, C:      (batch, seqlen, ngroups, d_state)      head i reads group i // (nheads/ngroups)
    D:         (nheads,)
    Returns    (batch, nheads, seqlen, seqlen) in fp32 (fp64 for fp64 inputs).
    """
    l, H = dA.shape[1], dA.shape[2]
    dtype = torch.promote_types(dA.dtype, torch.float32)
    dA = dA.to(dtype)
    B = B.to(dtype).repeat_interleave(H // B.shape[2], dim=2)  # (b, l, H, N)
    C = C.to(dtype).repeat_interleave(H // C.shape[2], dim=2)
    # Σ_{k=s+1..t} dA_k as a cumulative sum of masked terms, not a difference of two running sums:
    # that difference loses precision once the sums are large, and gives inf − inf above the diagonal.
    ones = torch.ones(l, l, dtype=torch.bool, device=dA.device)
    terms = dA.transpose(1, 2)[..., :, None].expand(-1, -1, l, l).masked_fill(~ones.tril(-1), 0)  # [t, s] = dA_t
    decay = terms.cumsum(dim=-2).masked_fill(~ones.tril(), -torch.inf).exp()  # (b, H, l, l)
    M = torch.einsum("bthn,bshn->bhts", C, B) * decay  # (b, H, l, l)
    if scale is not None:
        M = M * scale.to(dtype).transpose(1, 2)[:, :, None, :]  # Δ_s scales column s
    if D is not None:
        M = M + torch.diag_embed(D.to(dtype)[:, None].expand(H, l))
    return M


@dataclass
class Mamba2Config(SSMConfig):
    """Mamba-2's hyper-parameters: SSMConfig's (N = d_state, default 64), P = headdim, G = ngroups,
    Q = chunk_size, and A ~ −U(A_init_range) per head; H = nheads = d_inner / P is derived."""

    d_state: int = 64
    headdim: int = 64
    ngroups: int = 1
    chunk_size: int = 256
    A_init_range: tuple[float, float] = (1, 16)
    nheads: int = field(init=False)

    def __post_init__(self):
        super().__post_init__()
        for name in ("headdim", "ngroups", "chunk_size"):
            check_positive_int(name, getattr(self, name))
        if self.d_inner % self.headdim:
            raise ValueError(f"headdim={self.headdim}: must divide d_inner=expand*d_model={self.d_inner}")
        self.nheads = self.d_inner // self.headdim
        if self.nheads % self.ngroups:
            raise ValueError(f"ngroups={self.ngroups}: must divide nheads=d_inner/headdim={self.nheads}")
        low_high = self.A_init_range
        if not (len(low_high) == 2 and 0 < low_high[0] <= low_high[1]):
            raise ValueError(f"A_init_range={low_high!r}: must be (low, high) with 0 < low <= high")


class Mamba2(SSMMixer):
    """Mamba-2 mixer.

    x: (batch, seqlen, d_model) -> (batch, seqlen, d_model)
    params: Mamba2Config's fields after d_model.

    A_log, D and dt_bias carry `_no_weight_decay = True` so the optimizer can exclude them.
    """

    Config = Mamba2Config
    conv_activation = "silu"

    def __init__(self, d_model: int, **params):
        super().__init__()
        cfg = self.Config(d_model, **params)  # a subclass (the discrete student) brings its own Config
        self.d_model, self.d_state, self.d_conv, self.chunk_size = d_model, cfg.d_state, cfg.d_conv, cfg.chunk_size
        self.d_inner, self.nheads, self.headdim, self.ngroups = cfg.d_inner, cfg.nheads, cfg.headdim, cfg.ngroups
        d_inner, H, P, G, N = cfg.d_inner, cfg.nheads, cfg.headdim, cfg.ngroups, cfg.d_state
        self.ssm_state_shape = (H, P, N)
        self.conv_dim = conv_dim = d_inner + 2 * G * N  # x, B and C all go through the conv

        # Order: [z, x, B, C, dt]
        self.in_proj = nn.Linear(d_model, 2 * d_inner + 2 * G * N + H, bias=cfg.bias)
        self.conv1d = CausalConv1d(conv_dim, cfg.d_conv, bias=cfg.conv_bias)
        self.dt_bias = nn.Parameter(init_dt_bias(H, cfg.dt_min, cfg.dt_max, cfg.dt_init_floor))
        self.dt_bias._no_weight_decay = True
        # Decay rates spread over heads: A ~ −U(A_init_range). Kept in fp32 like Mamba-1's A_log.
        self.A_log = nn.Parameter(torch.empty(H).uniform_(*cfg.A_init_range).log())
        self.A_log._no_weight_decay = True
        self.D = nn.Parameter(torch.ones(H))
        self.D._no_weight_decay = True
        # One norm group per B/C group, so a group's scale does not depend on the other groups.
        self.norm = GatedRMSNorm(d_inner, group_size=d_inner // G)
        self.out_proj = nn.Linear(d_inner, d_model, bias=cfg.bias)

    def project(self, u: Tensor, conv_state: Tensor | None = None):
        """The SSD's inputs from u (b, l, d_model): in_proj, then the causal conv over x, B and C.

        Returns z (b, l, d_inner), x (b, l, H, P), B and C (b, l, G, N) after the conv, and dt (b, l, H)
        before softplus. The conv continues from `conv_state` (and updates it) when one is given.
        """
        z, xBC, dt = self.in_proj(u).split([self.d_inner, self.conv_dim, self.nheads], dim=-1)
        xBC = self.conv1d(xBC, self.conv_activation, conv_state)  # (b, l, conv_dim)
        x, B, C = xBC.split([self.d_inner, self.ngroups * self.d_state, self.ngroups * self.d_state], dim=-1)
        G, N = self.ngroups, self.d_state
        return z, x.unflatten(-1, (self.nheads, self.headdim)), B.unflatten(-1, (G, N)), C.unflatten(-1, (G, N)), dt

    def forward(self, u: Tensor, cache: MambaCache | None = None) -> Tensor:
        """u: (b, l, d_model). With a cache, continue from its state and leave the final state in it."""
        z, x, B, C, dt = self.project(u, None if cache is None else cache.conv_state)
        A = -torch.exp(self.A_log.float())  # (H,)
        scan = dict(D=self.D, dt_bias=self.dt_bias, dt_softplus=True)
        if cache is None:
            y = ssd_scan(x, dt, A, B, C, self.chunk_size, **scan)  # (b, l, H, P)
        else:
            y, final_states = ssd_scan(
                x, dt, A, B, C, self.chunk_size, **scan, initial_states=cache.ssm_state, return_final_states=True
            )
            cache.ssm_state.copy_(final_states)
        y = self.norm(y.flatten(-2), z)  # (b, l, d_inner)
        return self.out_proj(y)

    def ssd_inputs(self, u: Tensor, conv_state: Tensor | None = None):
        """What forward feeds the SSD, with Δ and A computed.

        u: (b, l, d_model) -> z (b, l, d_inner), x (b, l, H, P) after the conv, Δ (b, l, H) fp32,
        A (H,) fp32, B and C (b, l, G, N) after the conv. The conv continues from `conv_state` (and
        updates it) when one is given.
        """
        z, x, B, C, dt = self.project(u, conv_state)
        dt = F.softplus(dt.float() + self.dt_bias.float())
        return z, x, dt, -torch.exp(self.A_log.float()), B, C

    def ssd_matrix(self, u: Tensor) -> Tensor:
        """The materialised SSD matrix M on u: y_t = Σ_s M_ts·x_s with x = `ssd_inputs(u)[1]` and y the
        scan's output before the gated norm (MOHAWK's matrix mixer view).

        u: (b, l, d_model) -> M: (b, H, l, l), fp32; M_ts = (C_t·B_s)·Δ_s·exp(A·Σ_{k=s+1..t} Δ_k), D on
        the diagonal.
        """
        _, _, dt, A, B, C = self.ssd_inputs(u)
        return materialize_ssd(dt * A, B, C, scale=dt, D=self.D)

    def step(self, u: Tensor, cache: MambaCache) -> Tensor:
        """u: (b, d_model), the token after the cache's state -> (b, d_model)."""
        z, x, B, C, dt = (t[:, 0] for t in self.project(u[:, None], cache.conv_state))  # one token
        A = -torch.exp(self.A_log.float())
        y = ssd_step(cache.ssm_state, x, dt, A, B, C, D=self.D, dt_bias=self.dt_bias, dt_softplus=True)  # (b, H, P)
        return self.out_proj(self.norm(y.flatten(-2), z))
