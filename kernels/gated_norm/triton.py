"""Gated RMSNorm (gate before the norm) in Triton, forward and backward.

Per row and group of G = group_size channels, in fp32 (σ the logistic function):
    g = y·silu(z) (g = y without a gate: the plain RMSNorm),   r = 1/√(mean(g²) + eps),   n = g·r,   out = n·w
Backward, from dout:
    dn = dout·w,   dg = r·(dn − n·mean(dn·n)),   dy = dg·silu(z),   dz = dg·y·σ(z)·(1 + z·(1 − σ(z))),
    dw = Σ_rows dout·n

Shapes (rows = every leading dimension flattened):
    y, z, out, dy, dz:  (rows, d), unit channel stride, any row stride (z can be a slice of in_proj's
                        output without a copy)
    weight:             (d,), d = ngroups·group_size
    rstd:               (rows, ngroups) fp32, saved by the forward for the backward

`_gated_norm_fwd_kernel`  per (row block, group): the group's channels of BLOCK_M rows in one tile.
`_gated_norm_bwd_kernel`  per (chunk of rows, group): walks the chunk in row blocks; dw is summed over
                          the chunk in registers and stored as one partial per program, which the launcher
                          sums over programs: no atomics, and deterministic.
Everything is asynchronous and shape-driven, so forward and backward can be captured in a CUDA graph once
a first call has compiled and autotuned the kernels.
"""

import torch
import triton
import triton.language as tl

from kernels import cdiv, next_pow2
from kernels.launch import INTERPRET, autotune, fast_launch

# Rows a backward program walks: its dw partial is one (d,) row a program, so chunks bound the partials'
# size (rows/CHUNK_M rows of d) while keeping enough programs (512 at 32k rows).
_CHUNK_M = 8 if INTERPRET else 64


def _autotune(configs, key, per_thread):
    """`triton.autotune` on the GPU over the configs whose tile (BLOCK_M rows of BLOCK_N channels) keeps
    at most `per_thread` elements a thread (more spill registers on sm_90: the backward holds ~6 fp32
    tiles, the forward ~3). The interpreter cannot time kernels, so it gets the last config: blocks of
    few rows, so that tiny test shapes span several."""
    if INTERPRET:
        return autotune(configs[-1:], key)

    def prune(configs, named_args, **kwargs):
        block_n = kwargs.get("BLOCK_N", named_args.get("BLOCK_N"))
        fit = [c for c in configs if c.kwargs["BLOCK_M"] * block_n <= per_thread * 32 * c.num_warps]
        return fit or [min(configs, key=lambda c: (c.kwargs["BLOCK_M"], -c.num_warps))]

    return autotune(configs[:-1], key, prune_configs_by={"early_config_prune": prune})


def _configs(block_ms, interpret_block_m):
    return [triton.Config({"BLOCK_M": m}, num_warps=w) for m in block_ms for w in (4, 8)] + [
        triton.Config({"BLOCK_M": interpret_block_m}, num_warps=1)]


_FWD_CONFIGS = _configs((1, 2, 4, 8, 16), 4)
_BWD_CONFIGS = _configs((1, 2, 4, 8), 4)  # every BLOCK_M divides _CHUNK_M


@triton.jit
def _load(ptr, rows, cols, mask, stride):
    return tl.load(ptr + rows[:, None] * stride + cols[None, :], mask=mask, other=0.0).to(tl.float32)


@fast_launch
@_autotune(_FWD_CONFIGS, key=["group_size"], per_thread=32)
@triton.jit
def _gated_norm_fwd_kernel(
    y_ptr, z_ptr, w_ptr, out_ptr, rstd_ptr,
    nrows, group_size, ngroups, eps, s_y, s_z, s_o,
    HAS_Z: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_M: tl.constexpr,
):
    pid_m, group = tl.program_id(0), tl.program_id(1)
    rows = (pid_m * BLOCK_M + tl.arange(0, BLOCK_M)).to(tl.int64)
    offs = tl.arange(0, BLOCK_N)
    cols = group * group_size + offs
    mask_n = offs < group_size
    mask = (rows < nrows)[:, None] & mask_n[None, :]
    g = _load(y_ptr, rows, cols, mask, s_y)
    if HAS_Z:
        z = _load(z_ptr, rows, cols, mask, s_z)
        g = g * z * tl.sigmoid(z)
    rstd = tl.rsqrt(tl.sum(g * g, axis=1) / group_size + eps)  # (BLOCK_M,)
    w = tl.load(w_ptr + cols, mask=mask_n, other=0.0).to(tl.float32)
    out = g * rstd[:, None] * w[None, :]
    tl.store(out_ptr + rows[:, None] * s_o + cols[None, :], out.to(out_ptr.dtype.element_ty), mask=mask)
    tl.store(rstd_ptr + rows * ngroups + group, rstd, mask=rows < nrows)


@fast_launch
@_autotune(_BWD_CONFIGS, key=["group_size"], per_thread=16)
@triton.jit
def _gated_norm_bwd_kernel(
    y_ptr, z_ptr, w_ptr, rstd_ptr, dout_ptr, dy_ptr, dz_ptr, part_ptr,
    nrows, group_size, ngroups, d, s_y, s_z, s_do, s_dy, s_dz,
    HAS_Z: tl.constexpr, BLOCK_N: tl.constexpr, CHUNK_M: tl.constexpr, BLOCK_M: tl.constexpr,
):
    pid_m, group = tl.program_id(0), tl.program_id(1)
    offs = tl.arange(0, BLOCK_N)
    cols = group * group_size + offs
    mask_n = offs < group_size
    w = tl.load(w_ptr + cols, mask=mask_n, other=0.0).to(tl.float32)
    dw = tl.zeros((BLOCK_M, BLOCK_N), tl.float32)  # summed over rows after the loop
    start = pid_m * CHUNK_M
    end = tl.minimum(start + CHUNK_M, nrows)
    for row0 in range(start, end, BLOCK_M):
        rows = (row0 + tl.arange(0, BLOCK_M)).to(tl.int64)
        mask = (rows < nrows)[:, None] & mask_n[None, :]
        y = _load(y_ptr, rows, cols, mask, s_y)
        dout = _load(dout_ptr, rows, cols, mask, s_do)
        rstd = tl.load(rstd_ptr + rows * ngroups + group, mask=rows < nrows, other=0.0)[:, None]
        if HAS_Z:
            z = _load(z_ptr, rows, cols, mask, s_z)
            sig = tl.sigmoid(z)
            silu_z = z * sig
            n = y * silu_z * rstd
        else:
            n = y * rstd
        dw += dout * n
        dn = dout * w[None, :]
        dg = rstd * (dn - n * (tl.sum(dn * n, axis=1)[:, None] / group_size))
        if HAS_Z:
            tl.store(dy_ptr + rows[:, None] * s_dy + cols[None, :], (dg * silu_z).to(dy_ptr.dtype.element_ty),
                     mask=mask)
            dz = dg * y * sig * (1.0 + z * (1.0 - sig))
            tl.store(dz_ptr + rows[:, None] * s_dz + cols[None, :], dz.to(dz_ptr.dtype.element_ty), mask=mask)
        else:
            tl.store(dy_ptr + rows[:, None] * s_dy + cols[None, :], dg.to(dy_ptr.dtype.element_ty), mask=mask)
    tl.store(part_ptr + pid_m.to(tl.int64) * d + cols, tl.sum(dw, axis=0), mask=mask_n)


def _rows(t, d):
    """t (..., d) as (rows, d) with unit channel stride: a view where the leading dimensions allow one."""
    t = t.reshape(-1, d)
    return t if t.stride(-1) == 1 else t.contiguous()


def _gated_norm_fwd(y, z, weight, group_size, eps):
    nrows, d = y.shape
    ngroups = d // group_size
    out = torch.empty(nrows, d, device=y.device, dtype=y.dtype)
    rstd = torch.empty(nrows, ngroups, device=y.device, dtype=torch.float32)
    grid = lambda META: (cdiv(nrows, META["BLOCK_M"]), ngroups)  # noqa: E731
    _gated_norm_fwd_kernel[grid](
        y, y if z is None else z, weight, out, rstd, nrows, group_size, ngroups, eps, y.stride(0),
        0 if z is None else z.stride(0), out.stride(0), HAS_Z=z is not None, BLOCK_N=next_pow2(group_size),
    )
    return out, rstd


def _gated_norm_bwd(dout, y, z, weight, rstd, group_size):
    nrows, d = y.shape
    ngroups = d // group_size
    dy = torch.empty(nrows, d, device=y.device, dtype=y.dtype)
    dz = None if z is None else torch.empty(nrows, d, device=y.device, dtype=z.dtype)
    nchunks = cdiv(nrows, _CHUNK_M)
    part = torch.empty(nchunks, d, device=y.device, dtype=torch.float32)
    z_, dz_ = (y, dy) if z is None else (z, dz)  # never read nor written without a gate
    _gated_norm_bwd_kernel[(nchunks, ngroups)](
        y, z_, weight, rstd, dout, dy, dz_, part,
        nrows, group_size, ngroups, d, y.stride(0), z_.stride(0), dout.stride(0), dy.stride(0), dz_.stride(0),
        HAS_Z=z is not None, BLOCK_N=next_pow2(group_size), CHUNK_M=_CHUNK_M,
    )
    return dy, dz, part.sum(0).to(weight.dtype)


class GatedRMSNormFn(torch.autograd.Function):
    @staticmethod
    def forward(ctx, y, z, weight, group_size, eps):
        out, rstd = _gated_norm_fwd(y, z, weight, group_size, eps)
        ctx.save_for_backward(y, z, weight, rstd)
        ctx.group_size = group_size
        return out

    @staticmethod
    def backward(ctx, dout):
        y, z, weight, rstd = ctx.saved_tensors
        dy, dz, dweight = _gated_norm_bwd(_rows(dout, y.shape[1]), y, z, weight, rstd, ctx.group_size)
        return dy, dz, dweight, None, None


def gated_rms_norm_triton(y, z, weight, group_size, eps=1e-5):
    """RMSNorm(y · silu(z)) · weight over groups of group_size channels (RMSNorm(y) · weight when z is
    None), the Triton twin of `gated_rms_norm_ref`.

    y, z: (..., d) with unit channel stride (other strides free; a copy is made otherwise)    weight: (d,)
    Returns (..., d), contiguous, in y's dtype; statistics in fp32. The backward gives dy and dz in their
    dtypes and dweight (summed over rows in fp32) in weight's.
    """
    d = y.shape[-1]
    if (z is not None and z.shape != y.shape) or tuple(weight.shape) != (d,):
        z_shape = None if z is None else tuple(z.shape)
        raise ValueError(f"y{tuple(y.shape)}, z{z_shape}, weight{tuple(weight.shape)}: must be (..., d), "
                         f"(..., d) and (d,)")
    if not (isinstance(group_size, int) and group_size > 0 and d % group_size == 0):
        raise ValueError(f"group_size={group_size!r}: must be a positive integer dividing d={d}")
    out = GatedRMSNormFn.apply(_rows(y, d), None if z is None else _rows(z, d), weight, group_size, float(eps))
    return out.view(y.shape)
