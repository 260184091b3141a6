"""Causal depthwise conv1d with an optional fused SiLU in Triton, forward and backward, channel-last.

Per channel, with W taps w[k] (the last tap reads the current token) and lag j = W − 1 − k:
    pre_t = bias + Σ_{j<W} w[W−1−j]·x_{t−j}         (x_{t<0} = 0: a sequence start)
    out_t = silu(pre_t) or pre_t
Backward, with dpre_t = dout_t·silu'(pre_t) (or dout_t), silu'(p) = σ(p)·(1 + p·(1 − σ(p))):
    dx_t        = Σ_{s<W} w[W−1−s]·dpre_{t+s}        (dpre past the sequence end = 0)
    dw[W−1−j]   = Σ_{batch, t} dpre_t·x_{t−j}
    dbias       = Σ_{batch, t} dpre_t

Shapes (channel-last, the layout the projections produce; mamba_ssm's `causal_conv1d_fn` takes the
same data as x.transpose(1, 2)):
    x, out, dx:  (batch, seqlen, channels), channels at unit stride; any batch and row strides, so x
                 can be a slice of in_proj's output (`zxbcdt[..., a:b]`) without a copy
    weight:      (channels, width), 2 ≤ width ≤ 4
    bias:        (channels,)

`_conv_fwd_kernel`  per (channel block, row block, batch): the W taps as W row-shifted loads of the
                    tile (the shifted tiles overlap, so all but the first come from L1), summed in fp32.
`_conv_bwd_kernel`  per (channel block, chunk of rows, batch): walks the chunk in row blocks. dx_t needs
                    dpre at rows t..t+W−1, so pre is recomputed at each of those W shifts (the loads of
                    x at equal net shift are the same addresses: 2W − 1 distinct tiles). dw and dbias
                    are summed over the chunk in registers and stored as one partial per program, which
                    the launcher sums over programs: no atomics, and deterministic.
Everything is asynchronous and shape-driven (no host reads of device data), so forward and backward
can be captured in a CUDA graph once a first call has compiled and autotuned the kernels.
"""

import torch
import triton
import triton.language as tl

from kernels import cdiv, next_pow2
from kernels.conv1d.reference import check_activation
from kernels.launch import INTERPRET, autotune, fast_launch

MIN_WIDTH, MAX_WIDTH = 2, 4  # mamba_ssm's range; wider convs would hold more shifted tiles in registers
# Rows a backward program walks: its dw and dbias partials are one (W + 1, channels) row per program
# and chunk, so chunks bound the partials' size (b·l/CHUNK_L rows) while keeping enough programs.
_CHUNK_L = 16 if INTERPRET else 128


def _autotune(configs, key):
    """`triton.autotune` on the GPU; the interpreter cannot time kernels, so it gets the last config:
    tiles small enough that tiny test shapes span several of them in both directions."""
    return autotune(configs[-1:] if INTERPRET else configs[:-1], key)


def _configs(tiles, interpret_tile):
    """(BLOCK_L, BLOCK_C, num_warps, maxnreg) tiles; the interpreter's is appended last, see _autotune."""
    return [triton.Config({"BLOCK_L": bl, "BLOCK_C": bc}, num_warps=w, maxnreg=r)
            for bl, bc, w, r in (*tiles, interpret_tile)]


# Memory-bound kernels: tiles of 16-32 elements a thread in the forward (W shifted loads of each, ~125
# registers on sm_90). The backward holds 2W − 1 shifted tiles of x, W of dout and W lags of the dw sums
# at once: 8 elements a thread already take ~210 registers, or 168 without spills when capped (more
# programs a multiprocessor). Every backward BLOCK_L divides _CHUNK_L.
_FWD_CONFIGS = _configs([(32, 128, 4, None), (64, 64, 4, None), (16, 128, 4, None), (128, 64, 8, None),
                         (64, 128, 8, None), (32, 256, 8, None)], (8, 16, 1, None))
_BWD_CONFIGS = _configs([(16, 64, 4, None), (8, 128, 4, None), (16, 128, 8, None), (32, 64, 8, None),
                         (16, 64, 4, 168), (8, 128, 4, 168), (16, 128, 8, 168), (32, 64, 8, 168)], (8, 16, 1, None))


@triton.jit
def _load_rows(row_ptr, rows, offs_c, mask_c, seqlen, stride_l):
    """The (rows, channels) tile at row_ptr in fp32, 0 at rows outside [0, seqlen)."""
    mask = ((rows >= 0) & (rows < seqlen))[:, None] & mask_c[None, :]
    return tl.load(row_ptr + rows[:, None] * stride_l + offs_c[None, :], mask=mask, other=0.0).to(tl.float32)


@triton.jit
def _load_taps(w_ptr, offs_c, mask_c, s_w_c, s_w_k, WIDTH: tl.constexpr, W_PAD: tl.constexpr):
    """(W_PAD, BLOCK_C) fp32: row j holds tap W − 1 − j (the weight of x_{t−j}), 0 for j ≥ W. Loaded once
    and sliced by `_lag`: the taps are strided (weight is (channels, width)), so loading a tap where it is
    used kept a 64-bit address per tap and channel live across the backward's loop (~64 registers)."""
    lags = tl.arange(0, W_PAD)
    ptrs = w_ptr + offs_c[None, :] * s_w_c + (WIDTH - 1 - lags)[:, None] * s_w_k
    return tl.load(ptrs, mask=(lags < WIDTH)[:, None] & mask_c[None, :], other=0.0).to(tl.float32)


@triton.jit
def _lag(taps, j: tl.constexpr):
    """Row j of `taps` as a (1, BLOCK_C) row that broadcasts over a tile."""
    lags = tl.arange(0, taps.shape[0])
    return tl.sum(tl.where(lags[:, None] == j, taps, 0.0), axis=0)[None, :]


@triton.jit
def _load_bias(b_ptr, offs_c, mask_c, HAS_BIAS: tl.constexpr):
    # One return for both branches: (1, BLOCK_C) fp32, zeros without a bias.
    if HAS_BIAS:
        bias = tl.load(b_ptr + offs_c, mask=mask_c, other=0.0).to(tl.float32)
    else:
        bias = tl.zeros_like(offs_c).to(tl.float32)
    return bias[None, :]


@triton.jit
def _pre(x_row, taps, bias, rows, offs_c, mask_c, seqlen, s_x_l, SHIFT: tl.constexpr, WIDTH: tl.constexpr):
    """pre at rows + SHIFT: bias + Σ_j w[W−1−j]·x_{rows+SHIFT−j}, (BLOCK_L, BLOCK_C) fp32."""
    acc = bias + tl.zeros((rows.shape[0], offs_c.shape[0]), tl.float32)
    for j in tl.static_range(WIDTH):
        # One constant shift a load: equal shifts make identical loads, which the compiler merges.
        acc += _lag(taps, j) * _load_rows(x_row, rows + (SHIFT - j), offs_c, mask_c, seqlen, s_x_l)
    return acc


@fast_launch
@_autotune(_FWD_CONFIGS, key=["channels", "WIDTH"])
@triton.jit
def _conv_fwd_kernel(
    x_ptr, w_ptr, b_ptr, out_ptr,
    seqlen, channels, s_x_b, s_x_l, s_w_c, s_w_k, s_o_b, s_o_l,
    WIDTH: tl.constexpr, W_PAD: tl.constexpr, HAS_BIAS: tl.constexpr, SILU: tl.constexpr,
    BLOCK_L: tl.constexpr, BLOCK_C: tl.constexpr,
):
    pid_c, pid_l, pid_b = tl.program_id(0), tl.program_id(1), tl.program_id(2).to(tl.int64)
    offs_c = pid_c * BLOCK_C + tl.arange(0, BLOCK_C)
    rows = pid_l * BLOCK_L + tl.arange(0, BLOCK_L)
    mask_c = offs_c < channels
    taps = _load_taps(w_ptr, offs_c, mask_c, s_w_c, s_w_k, WIDTH, W_PAD)
    bias = _load_bias(b_ptr, offs_c, mask_c, HAS_BIAS)
    acc = _pre(x_ptr + pid_b * s_x_b, taps, bias, rows, offs_c, mask_c, seqlen, s_x_l, 0, WIDTH)
    if SILU:
        acc = acc * tl.sigmoid(acc)
    mask = (rows < seqlen)[:, None] & mask_c[None, :]
    out = out_ptr + pid_b * s_o_b + rows[:, None] * s_o_l + offs_c[None, :]
    tl.store(out, acc.to(out_ptr.dtype.element_ty), mask=mask)


@fast_launch
@_autotune(_BWD_CONFIGS, key=["channels", "WIDTH"])
@triton.jit
def _conv_bwd_kernel(
    x_ptr, w_ptr, b_ptr, dout_ptr, dx_ptr, part_ptr,
    seqlen, channels, nchunks, s_x_b, s_x_l, s_w_c, s_w_k, s_d_b, s_d_l, s_dx_b, s_dx_l,
    WIDTH: tl.constexpr, W_PAD: tl.constexpr, HAS_BIAS: tl.constexpr, SILU: tl.constexpr, CHUNK_L: tl.constexpr,
    BLOCK_L: tl.constexpr, BLOCK_C: tl.constexpr,
):
    pid_c, pid_chunk, pid_b = tl.program_id(0), tl.program_id(1), tl.program_id(2).to(tl.int64)
    offs_c = pid_c * BLOCK_C + tl.arange(0, BLOCK_C)
    mask_c = offs_c < channels
    lags = tl.arange(0, W_PAD)
    taps = _load_taps(w_ptr, offs_c, mask_c, s_w_c, s_w_k, WIDTH, W_PAD)
    bias = _load_bias(b_ptr, offs_c, mask_c, HAS_BIAS)
    x_row = x_ptr + pid_b * s_x_b
    dout_row = dout_ptr + pid_b * s_d_b
    # Summed over rows after the loop: one cross-thread reduction a program, not one a row block.
    dw_acc = tl.zeros((W_PAD, BLOCK_L, BLOCK_C), tl.float32)  # [j] sums dpre_t·x_{t−j}
    db_acc = tl.zeros((BLOCK_L, BLOCK_C), tl.float32)
    start = pid_chunk * CHUNK_L
    end = tl.minimum(start + CHUNK_L, seqlen)
    for row0 in range(start, end, BLOCK_L):
        rows = row0 + tl.arange(0, BLOCK_L)
        dx = tl.zeros((BLOCK_L, BLOCK_C), tl.float32)
        for s in tl.static_range(WIDTH):  # dpre at rows + s reaches dx at rows through the tap of lag s
            dpre = _load_rows(dout_row, rows + s, offs_c, mask_c, seqlen, s_d_l)
            if SILU:
                pre = _pre(x_row, taps, bias, rows, offs_c, mask_c, seqlen, s_x_l, s, WIDTH)
                sig = tl.sigmoid(pre)
                dpre = dpre * sig * (1.0 + pre * (1.0 - sig))
            dx += _lag(taps, s) * dpre
            if s == 0:
                db_acc += dpre
                # x_{t−j} for every lag j at once: (W_PAD, BLOCK_L, BLOCK_C), lags ≥ W masked off
                x_rows = rows[None, :, None] - lags[:, None, None]
                mask = (lags < WIDTH)[:, None, None] & (x_rows >= 0) & (x_rows < seqlen) & mask_c[None, None, :]
                xs = tl.load(x_row + x_rows * s_x_l + offs_c[None, None, :], mask=mask, other=0.0).to(tl.float32)
                dw_acc += dpre[None, :, :] * xs
        mask = (rows < seqlen)[:, None] & mask_c[None, :]
        tl.store(dx_ptr + pid_b * s_dx_b + rows[:, None] * s_dx_l + offs_c[None, :],
                 dx.to(dx_ptr.dtype.element_ty), mask=mask)
    # This program's partial sums: rows 0..W−1 are dw by tap, row W is dbias.
    part = part_ptr + (pid_b * nchunks + pid_chunk) * (WIDTH + 1) * channels
    tl.store(part + (WIDTH - 1 - lags)[:, None] * channels + offs_c[None, :], tl.sum(dw_acc, axis=1),
             mask=(lags < WIDTH)[:, None] & mask_c[None, :])
    tl.store(part + WIDTH * channels + offs_c, tl.sum(db_acc, axis=0), mask=mask_c)


def _conv_fwd(x, weight, bias, silu):
    batch, seqlen, channels = x.shape
    out = torch.empty(batch, seqlen, channels, device=x.device, dtype=x.dtype)
    grid = lambda META: (cdiv(channels, META["BLOCK_C"]), cdiv(seqlen, META["BLOCK_L"]), batch)  # noqa: E731
    _conv_fwd_kernel[grid](
        x, weight, bias if bias is not None else weight, out,
        seqlen, channels, x.stride(0), x.stride(1), *weight.stride(), out.stride(0), out.stride(1),
        WIDTH=weight.shape[1], W_PAD=next_pow2(weight.shape[1]), HAS_BIAS=bias is not None, SILU=silu,
    )
    return out


def _conv_bwd(dout, x, weight, bias, silu):
    """dx (batch, seqlen, channels) in x's dtype, dweight and dbias (None without a bias) in theirs."""
    batch, seqlen, channels = x.shape
    width = weight.shape[1]
    dx = torch.empty(batch, seqlen, channels, device=x.device, dtype=x.dtype)
    nchunks = cdiv(seqlen, _CHUNK_L)
    part = torch.empty(batch * nchunks, width + 1, channels, device=x.device, dtype=torch.float32)
    grid = lambda META: (cdiv(channels, META["BLOCK_C"]), nchunks, batch)  # noqa: E731
    _conv_bwd_kernel[grid](
        x, weight, bias if bias is not None else weight, dout, dx, part,
        seqlen, channels, nchunks, x.stride(0), x.stride(1), *weight.stride(), dout.stride(0), dout.stride(1),
        dx.stride(0), dx.stride(1),
        WIDTH=width, W_PAD=next_pow2(width), HAS_BIAS=bias is not None, SILU=silu, CHUNK_L=_CHUNK_L,
    )
    sums = part.sum(0)  # (W + 1, channels) fp32
    dweight = sums[:width].t().to(weight.dtype)
    dbias = sums[width].to(bias.dtype) if bias is not None else None
    return dx, dweight, dbias


def _unit_stride(t):
    return t if t.stride(-1) == 1 else t.contiguous()


class CausalConv1dFn(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, weight, bias, silu):
        ctx.save_for_backward(x, weight, bias)
        ctx.silu = silu
        return _conv_fwd(x, weight, bias, silu)

    @staticmethod
    def backward(ctx, dout):
        x, weight, bias = ctx.saved_tensors
        dx, dweight, dbias = _conv_bwd(_unit_stride(dout), x, weight, bias, ctx.silu)
        return dx, dweight, dbias, None


def unsupported(x, weight) -> str | None:
    """Why the Triton conv cannot take these inputs, or None."""
    if not MIN_WIDTH <= weight.shape[-1] <= MAX_WIDTH:
        return f"width={weight.shape[-1]}: the Triton causal conv1d takes widths {MIN_WIDTH} to {MAX_WIDTH}"
    return None


def causal_conv1d_triton(x, weight, bias=None, activation=None):
    """act(causal depthwise conv1d of x), the Triton twin of `causal_conv1d_ref` without a state.

    x: (batch, seqlen, channels) with unit channel stride (other strides free; a copy is made otherwise)
    weight: (channels, width), 2 ≤ width ≤ 4    bias: (channels,)    activation: None, "silu" or "swish"
    Returns (batch, seqlen, channels), contiguous, in x's dtype; accumulates in fp32. The backward gives
    dx in x's dtype and dweight, dbias (summed over batch and time in fp32) in their own dtypes.
    """
    check_activation(activation)
    if x.dim() != 3 or weight.dim() != 2 or weight.shape[0] != x.shape[2]:
        raise ValueError(f"x{tuple(x.shape)}, weight{tuple(weight.shape)}: must be (b, l, c) and (c, width)")
    if bias is not None and tuple(bias.shape) != (x.shape[2],):
        raise ValueError(f"bias{tuple(bias.shape)}: must be ({x.shape[2]},)")
    reason = unsupported(x, weight)
    if reason:
        raise ValueError(reason)
    return CausalConv1dFn.apply(_unit_stride(x), weight, bias, activation is not None)
