"""Discrete Mamba-2: the student mixer of MOHAWK's Phi-Mamba (Bick et al. 2024, arXiv 2408.10189).

Mamba-2 (models/mixers/mamba2.py) changed so that, at initialisation, its SSD matrix is built like an
attention matrix from per-token queries and keys:
- one B and one C per head (G = H), as attention has one key and one query per head;
- no Δ discretisation of the input: h_t = exp(Δ_t·A)·h_{t−1} + x_t B_tᵀ (Mamba-2: Δ_t·x_t B_tᵀ), so
  M_ts = (C_t·B_s)·exp(A·Σ_{k=s+1..t} Δ_k): Δ only sets the decay, a per-token forget gate;
- the causal conv starts as the identity and has no activation, so x, B, C start as linear
  projections of the current token (attention's V, K, Q);
- the output gate silu(z + z_bias) starts at exactly 1 (z's rows of in_proj are zero and
  z_bias = silu⁻¹(1)), and there is no norm before out_proj, so the block starts as
  out_proj(M·x), the shape of an attention layer.
A = −exp(A_log) and Δ = softplus(dt + dt_bias) are kept learnable as in Mamba-2 (Phi-Mamba fixes
A = −1 and has no dt_bias: a special case).

Glossary as in models/mixers/mamba2.py; here headdim P = expand·d_model / nheads.

Not one of the LM's mixers (`model.mixer`): its init assumes it replaces the mixers of an LM already
built (models.mohawk.make_student). It keeps the mixer contract, and the contract tests (tests/test_mixers.py)
check it with the registered ones.
"""

from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from kernels.ssd import ssd_scan, ssd_step
from models.mixers.base import check_positive_int
from models.mixers.mamba2 import Mamba2, Mamba2Config, materialize_ssd
from models.mixers.ssm import MambaCache

SILU_INV_ONE = 1.2784645  # silu(1.2784645) = 1.0000000 to fp32 precision


@dataclass
class DiscreteMamba2Config(Mamba2Config):
    """Mamba2Config with H = nheads given and one B/C group per head: headdim = expand·d_model / nheads
    and ngroups = nheads are derived. expand defaults to 1 (x plays attention's values)."""

    expand: int = 1
    headdim: int = field(init=False)
    ngroups: int = field(init=False)
    nheads: int = field(kw_only=True)

    def __post_init__(self):
        for name in ("d_model", "nheads", "expand"):
            check_positive_int(name, getattr(self, name))
        if (self.expand * self.d_model) % self.nheads:
            raise ValueError(f"nheads={self.nheads}: must divide d_inner=expand*d_model={self.expand * self.d_model}")
        self.headdim, self.ngroups = self.expand * self.d_model // self.nheads, self.nheads
        super().__post_init__()


class DiscreteMamba2(Mamba2):
    """Mamba-2 mixer without input discretisation, conv activation or norm (Phi-Mamba's mixer).

    x: (batch, seqlen, d_model) -> (batch, seqlen, d_model)
    params: DiscreteMamba2Config's fields after d_model; nheads is required.
    """

    Config = DiscreteMamba2Config
    conv_activation = None

    def __init__(self, d_model: int, **params):
        super().__init__(d_model, **params)
        del self.norm
        self.z_bias = nn.Parameter(torch.full((self.d_inner,), SILU_INV_ONE))
        self.z_bias._no_weight_decay = True
        # Projections get models.lm.LM's N(0, 0.02): a student's LM is built before this mixer replaces
        # its Mamba-2 mixers, so the LM's own init never reaches it.
        with torch.no_grad():
            nn.init.normal_(self.in_proj.weight, std=0.02)
            self.in_proj.weight[: self.d_inner].zero_()  # Order: [z, x, B, C, dt]; gate = silu(z_bias) = 1
            nn.init.normal_(self.out_proj.weight, std=0.02)
            self.conv1d.weight.zero_()
            self.conv1d.weight[:, 0, -1] = 1.0  # the last tap reads the current token
            if self.conv1d.bias is not None:
                self.conv1d.bias.zero_()

    def ssd_matrix(self, u: Tensor) -> Tensor:
        """u: (b, l, d_model) -> M (b, H, l, l) fp32.

        M_ts = (C_t·B_s)·exp(A·Σ_{k=s+1..t} Δ_k), D on the diagonal: Mamba-2's M without the Δ_s factor.
        """
        _, _, dt, A, B, C = self.ssd_inputs(u)
        return materialize_ssd(dt * A, B, C, D=self.D)

    def _out(self, y: Tensor, x: Tensor, z: Tensor) -> Tensor:
        """The scan's y and input x (..., H, P), gate z (..., d_inner) -> (..., d_model)."""
        y = y + self.D[:, None] * x  # D·x, outside the scan: the scan sees x/Δ
        return self.out_proj(y.flatten(-2) * F.silu(z + self.z_bias))

    def forward(self, u: Tensor, cache: MambaCache | None = None) -> Tensor:
        """u: (b, l, d_model). With a cache, continue from its state and leave the final state in it."""
        z, x, dt, A, B, C = self.ssd_inputs(u, None if cache is None else cache.conv_state)
        # The scan multiplies its input by Δ_t; feeding x/Δ leaves h_t = exp(Δ_t·A)·h_{t−1} + x_t B_tᵀ.
        # In x's dtype, as the kernels want x, B and C alike (a quotient keeps its relative precision).
        x_scan = (x / dt[..., None]).to(x.dtype)
        if cache is None:
            y = ssd_scan(x_scan, dt, A, B, C, self.chunk_size)  # (b, l, H, P)
        else:
            y, final_states = ssd_scan(
                x_scan, dt, A, B, C, self.chunk_size, initial_states=cache.ssm_state, return_final_states=True
            )
            cache.ssm_state.copy_(final_states)
        return self._out(y, x, z)

    def step(self, u: Tensor, cache: MambaCache) -> Tensor:
        """u: (b, d_model), the token after the cache's state -> (b, d_model)."""
        z, x, dt, A, B, C = self.ssd_inputs(u[:, None], cache.conv_state)
        z, x, dt, B, C = z[:, 0], x[:, 0], dt[:, 0], B[:, 0], C[:, 0]  # one token
        y = ssd_step(cache.ssm_state, (x / dt[..., None]).to(x.dtype), dt, A, B, C)  # (b, H, P)
        return self._out(y, x, z)
