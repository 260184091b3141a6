"""The SSD's decode step in Triton: one token, the state updated in place. Symbols: `kernels.ssd.common`."""

import torch
import triton
import triton.language as tl

from kernels import cdiv, next_pow2
from kernels.launch import fast_launch
from kernels.reference_common import check_groups
from kernels.ssd.common import _check, _head, _head_params, _load_D, _process_dt

@fast_launch
@triton.jit
def _ssd_step_kernel(
    state_ptr, x_ptr, dt_ptr, A_ptr, B_ptr, C_ptr, D_ptr, z_ptr, dt_bias_ptr, out_ptr,
    nheads, headdim, dstate, heads_per_group,
    s_st_b, s_st_h, s_st_p, s_st_n,
    s_x_b, s_x_h, s_x_p,
    s_z_b, s_z_h, s_z_p,
    s_dt_b, s_dt_h,
    s_B_b, s_B_g, s_B_n,
    s_C_b, s_C_g, s_C_n,
    HAS_D: tl.constexpr, D_PER_P: tl.constexpr, HAS_Z: tl.constexpr,
    HAS_DT_BIAS: tl.constexpr, DT_SOFTPLUS: tl.constexpr,
    BLOCK_P: tl.constexpr, BLOCK_N: tl.constexpr,
):
    pid_p = tl.program_id(0)
    bh = tl.program_id(1)
    b, hh, gg = _head(bh, nheads, heads_per_group)
    offs_p = pid_p * BLOCK_P + tl.arange(0, BLOCK_P)
    offs_n = tl.arange(0, BLOCK_N)
    mask_p = offs_p < headdim
    mask_n = offs_n < dstate
    mask_pn = mask_p[:, None] & mask_n[None, :]

    A, bias = _head_params(A_ptr, dt_bias_ptr, hh, HAS_DT_BIAS)
    dt = _process_dt(tl.load(dt_ptr + b * s_dt_b + hh * s_dt_h).to(tl.float32), bias, DT_SOFTPLUS)
    decay = tl.exp(dt * A)
    x = tl.load(x_ptr + b * s_x_b + hh * s_x_h + offs_p * s_x_p, mask=mask_p, other=0.0).to(tl.float32)
    Bv = tl.load(B_ptr + b * s_B_b + gg * s_B_g + offs_n * s_B_n, mask=mask_n, other=0.0).to(tl.float32)
    Cv = tl.load(C_ptr + b * s_C_b + gg * s_C_g + offs_n * s_C_n, mask=mask_n, other=0.0).to(tl.float32)
    st_ptrs = state_ptr + b * s_st_b + hh * s_st_h + offs_p[:, None] * s_st_p + offs_n[None, :] * s_st_n
    s = tl.load(st_ptrs, mask=mask_pn, other=0.0).to(tl.float32)
    s = s * decay + (dt * x)[:, None] * Bv[None, :]
    tl.store(st_ptrs, s, mask=mask_pn)
    y = tl.sum(s * Cv[None, :], axis=1)  # (P,)
    if HAS_D:
        y += x * _load_D(D_ptr, hh, headdim, offs_p, mask_p, D_PER_P)
    if HAS_Z:
        z = tl.load(z_ptr + b * s_z_b + hh * s_z_h + offs_p * s_z_p, mask=mask_p, other=0.0).to(tl.float32)
        y = y * z * tl.sigmoid(z)
    tl.store(out_ptr + (b * nheads + hh) * headdim + offs_p, y, mask=mask_p)


def ssd_step_triton(state, x, dt, A, B, C, D=None, z=None, dt_bias=None, dt_softplus=False):
    """One decode step; updates `state` in place and returns y (batch, nheads, headdim) in x.dtype.

    state: (batch, nheads, headdim, dstate)    x, z: (batch, nheads, headdim)    dt: (batch, nheads)
    A: (nheads,)    B, C: (batch, ngroups, dstate)    D: (nheads,) or (nheads, headdim)    dt_bias: (nheads,)
    """
    batch, nheads, headdim = x.shape
    ngroups, dstate = B.shape[1], B.shape[2]
    check_groups(nheads, ngroups, "nheads")
    _check("state", state, (batch, nheads, headdim, dstate))
    _check("dt", dt, (batch, nheads))
    _check("C", C, (batch, ngroups, dstate))
    zz = z if z is not None else x
    D = D.contiguous() if D is not None else None
    out = torch.empty(batch, nheads, headdim, device=x.device, dtype=x.dtype)
    BLOCK_N = next_pow2(dstate)
    BLOCK_P = min(next_pow2(headdim), max(1, 4096 // BLOCK_N))
    _ssd_step_kernel[(cdiv(headdim, BLOCK_P), batch * nheads)](
        state, x, dt, A, B, C, D if D is not None else x, zz, dt_bias if dt_bias is not None else A, out,
        nheads, headdim, dstate, nheads // ngroups,
        *state.stride(), *x.stride(), *zz.stride(), *dt.stride(), *B.stride(), *C.stride(),
        HAS_D=D is not None, D_PER_P=D is not None and D.dim() == 2, HAS_Z=z is not None,
        HAS_DT_BIAS=dt_bias is not None, DT_SOFTPLUS=dt_softplus,
        BLOCK_P=BLOCK_P, BLOCK_N=BLOCK_N,
    )
    return out
