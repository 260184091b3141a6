"""Mamba-2 block (Dao & Gu 2024), laid out as mamba_ssm's `modules/mamba2_simple.py` / `mamba2.py`.

Glossary (paper symbols): D = d_model, d_inner = expand·D, P = headdim, H = nheads = d_inner / P,
G = ngroups (heads share B and C within a group, like grouped-query attention), N = d_state,
Q = chunk_size, Δ = dt (per head and token), A = −exp(A_log) (one scalar per head),
D_skip = the `D` parameter (per head).
SSD per head:  h_t = exp(Δ_t·A)·h_{t−1} + Δ_t·x_t B_tᵀ,  y_t = h_t C_t + D·x_t,  h: (P, N).
"""

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from kernels.conv1d import causal_conv1d
from kernels.ssd import ssd_scan, ssd_step
from models.mamba1 import MambaCache, check_dt_range, init_dt_bias
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


class Mamba2(nn.Module):
    """Mamba-2 mixer.

    x: (batch, seqlen, d_model) -> (batch, seqlen, d_model)

    A_log, D and dt_bias carry `_no_weight_decay = True` so the optimizer can exclude them.
    """

    def __init__(
        self,
        d_model: int,
        d_state: int = 64,
        d_conv: int = 4,
        expand: int = 2,
        headdim: int = 64,
        ngroups: int = 1,
        chunk_size: int = 256,
        A_init_range: tuple[float, float] = (1, 16),
        dt_min: float = 0.001,
        dt_max: float = 0.1,
        dt_init_floor: float = 1e-4,
        conv_bias: bool = True,
        bias: bool = False,
    ):
        super().__init__()
        sizes = dict(
            d_model=d_model, d_state=d_state, d_conv=d_conv, expand=expand, headdim=headdim, ngroups=ngroups,
            chunk_size=chunk_size,
        )
        for name, v in sizes.items():
            if not (isinstance(v, int) and not isinstance(v, bool) and v > 0):
                raise ValueError(f"{name}={v!r}: must be a positive integer")
        d_inner = expand * d_model
        if d_inner % headdim:
            raise ValueError(f"headdim={headdim}: must divide d_inner=expand*d_model={d_inner}")
        nheads = d_inner // headdim
        if nheads % ngroups:
            raise ValueError(f"ngroups={ngroups}: must divide nheads=d_inner/headdim={nheads}")
        if not (len(A_init_range) == 2 and 0 < A_init_range[0] <= A_init_range[1]):
            raise ValueError(f"A_init_range={A_init_range!r}: must be (low, high) with 0 < low <= high")
        check_dt_range(dt_min, dt_max, dt_init_floor)
        self.d_model, self.d_state, self.d_conv, self.headdim = d_model, d_state, d_conv, headdim
        self.ngroups, self.chunk_size, self.d_inner, self.nheads = ngroups, chunk_size, d_inner, nheads
        self.conv_dim = conv_dim = d_inner + 2 * ngroups * d_state  # x, B and C all go through the conv

        # Order: [z, x, B, C, dt]
        self.in_proj = nn.Linear(d_model, 2 * d_inner + 2 * ngroups * d_state + nheads, bias=bias)
        self.conv1d = nn.Conv1d(conv_dim, conv_dim, d_conv, groups=conv_dim, bias=conv_bias)
        self.dt_bias = nn.Parameter(init_dt_bias(nheads, dt_min, dt_max, dt_init_floor))
        self.dt_bias._no_weight_decay = True
        # Decay rates spread over heads: A ~ −U(A_init_range). Kept in fp32 like Mamba-1's A_log.
        self.A_log = nn.Parameter(torch.empty(nheads).uniform_(*A_init_range).log())
        self.A_log._no_weight_decay = True
        self.D = nn.Parameter(torch.ones(nheads))
        self.D._no_weight_decay = True
        # One norm group per B/C group, so a group's scale does not depend on the other groups.
        self.norm = GatedRMSNorm(d_inner, group_size=d_inner // ngroups)
        self.out_proj = nn.Linear(d_inner, d_model, bias=bias)

    def _split(self, zxbcdt: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        return zxbcdt.split([self.d_inner, self.conv_dim, self.nheads], dim=-1)  # z, xBC, dt

    def _split_xbc(self, xBC: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """(..., conv_dim) -> x (..., H, P), B and C (..., G, N)."""
        x, B, C = xBC.split([self.d_inner, self.ngroups * self.d_state, self.ngroups * self.d_state], dim=-1)
        G, N = self.ngroups, self.d_state
        return x.unflatten(-1, (self.nheads, self.headdim)), B.unflatten(-1, (G, N)), C.unflatten(-1, (G, N))

    def forward(self, u: Tensor, cache: MambaCache | None = None) -> Tensor:
        """u: (b, l, d_model). With a cache, continue from its state and leave the final state in it."""
        z, xBC, dt = self._split(self.in_proj(u))  # (b, l, d_inner), (b, l, conv_dim), (b, l, H)
        conv_state = None if cache is None else cache.conv_state
        xBC = causal_conv1d(xBC, self.conv1d.weight.squeeze(1), self.conv1d.bias, "silu", conv_state)
        x, B, C = self._split_xbc(xBC)  # (b, l, H, P), (b, l, G, N), (b, l, G, N)
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

    def ssd_inputs(self, u: Tensor) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor, Tensor]:
        """What forward feeds the SSD for a whole sequence from a zero state.

        u: (b, l, d_model) -> z (b, l, d_inner), x (b, l, H, P) after the conv, Δ (b, l, H) fp32,
        A (H,) fp32, B and C (b, l, G, N) after the conv.
        """
        z, xBC, dt = self._split(self.in_proj(u))
        xBC = causal_conv1d(xBC, self.conv1d.weight.squeeze(1), self.conv1d.bias, "silu")
        x, B, C = self._split_xbc(xBC)
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
        z, xBC, dt = self._split(self.in_proj(u))  # (b, d_inner), (b, conv_dim), (b, H)
        weight, bias = self.conv1d.weight.squeeze(1), self.conv1d.bias
        xBC = causal_conv1d(xBC[:, None], weight, bias, "silu", cache.conv_state)[:, 0]  # one token
        x, B, C = self._split_xbc(xBC)  # (b, H, P), (b, G, N), (b, G, N)
        A = -torch.exp(self.A_log.float())
        y = ssd_step(cache.ssm_state, x, dt, A, B, C, D=self.D, dt_bias=self.dt_bias, dt_softplus=True)
        return self.out_proj(self.norm(y.flatten(-2), z))

    def allocate_cache(self, batch_size: int, max_seqlen: int, device=None, dtype=None) -> MambaCache:
        """Constant-size state; max_seqlen is accepted for the common mixer interface only."""
        w = self.in_proj.weight
        device = device or w.device
        conv_state = torch.zeros(batch_size, self.conv_dim, self.d_conv - 1, device=device, dtype=dtype or w.dtype)
        ssm_state = torch.zeros(batch_size, self.nheads, self.headdim, self.d_state, device=device, dtype=torch.float32)
        return MambaCache(conv_state=conv_state, ssm_state=ssm_state)

    def state_size(self, seq_len: int) -> int:
        """2·d_model·N, Zoology's count for Mamba (independent of seq_len).

        The true recurrent state is H·P·N = d_inner·N = expand·d_model·N, the same at the default
        expand=2; Zoology's count, and this one, ignore expand and the small conv state.
        """
        return 2 * self.d_model * self.d_state
