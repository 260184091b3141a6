"""The SSD's chunked path in Triton: chunk-parallel kernels with one sequential pass over chunk states.

Forward, three launches (`_ssd_fwd`):
  1. `_chunk_state_fwd_kernel`  per (chunk, b·h): Δ, cs, and the chunk's own final state from zero.
  2. `_state_passing_kernel`    per (b·h, slice of P·N): the only sequential part, over chunks; turns
                                each chunk's own state into the state entering it, in place.
  3. `_chunk_scan_fwd_kernel`   per (row block, chunk, b·h): y = causal (C Bᵀ ∘ decay ∘ Δ) x + C S.
Backward, five launches (`_ssd_bwd`), mirroring it (the gradient runs backwards in time through the same
recurrence):
  1. `_chunk_dstate_bwd_kernel`  per (chunk, b·h): each chunk's own state gradient dyᵀ (C ∘ exp(cs)), dD.
  2. `_state_passing_kernel`     reversed: G for every chunk, and the initial state's gradient.
  3. `_chunk_scan_bwd_dx_kernel` per (row block, chunk, b·g): what reaches token t from later tokens
                                 and from G: dx, dz, dB (summed over the group's heads in registers,
                                 so no atomics) and parts of dΔ.
  4. `_chunk_scan_bwd_dc_kernel` same grid: what reaches C_t from earlier tokens and from S: dC and
                                 parts of dΔ. Two kernels rather than one halve the registers each
                                 program holds.
  5. `_dt_bwd_kernel`            per (chunk, b·h): ∂L/∂(Δ·A) from those parts (cumulative sums inside
                                 the chunk), then dA, dΔ through softplus, and d dt_bias.

Why the decay is stable: every exponent is a difference cs_t − cs_s with s ≤ t (≤ 0 since A < 0, Δ ≥ 0),
masked to −inf before `exp` where s > t, so nothing overflows however long the sequence or large Δ.
The gradient of Δ·A is summed only over products of decays (see `_dt_bwd_kernel`), never as a
difference of large terms, so it too stays accurate when the decay is strong. Symbols: `kernels.ssd.common`.
"""

import torch
import triton
import triton.language as tl

from kernels import cdiv, next_pow2
from kernels.jit import softplus_grad
from kernels.launch import fast_launch
from kernels.ssd.common import (
    _autotune, _dot, _gated_grad, _head_params, _load_D, _num_sms, _pow2, _cast, _process_dt,
)

@fast_launch
@triton.jit
def _chunk_state_fwd_kernel(
    x_ptr, dt_ptr, A_ptr, dt_bias_ptr, B_ptr,
    dtp_ptr, cs_ptr, states_ptr,
    seqlen, nheads, headdim, dstate, chunk_size, heads_per_group,
    s_x_b, s_x_l, s_x_h, s_x_p,
    s_dt_b, s_dt_l, s_dt_h,
    s_B_b, s_B_l, s_B_g, s_B_n,
    HAS_DT_BIAS: tl.constexpr, DT_SOFTPLUS: tl.constexpr,
    BLOCK_K: tl.constexpr, BLOCK_P: tl.constexpr, BLOCK_N: tl.constexpr,
):
    """One chunk of one head: Δ and cs for its tokens (kept for the later kernels), and the state
    the chunk alone leaves behind, Σ_s Δ_s exp(cs_end − cs_s) x_s B_sᵀ (P×N)."""
    c = tl.program_id(0)
    bh = tl.program_id(1)
    nchunks = tl.num_programs(0)
    b = bh // nheads
    hh = bh % nheads
    gg = hh // heads_per_group
    start = c * chunk_size
    chunk_len = tl.minimum(chunk_size, seqlen - start)

    A, bias = _head_params(A_ptr, dt_bias_ptr, hh, HAS_DT_BIAS)
    dt_base = dt_ptr + b.to(tl.int64) * s_dt_b + start * s_dt_l + hh * s_dt_h
    x_base = x_ptr + b.to(tl.int64) * s_x_b + start * s_x_l + hh * s_x_h
    B_base = B_ptr + b.to(tl.int64) * s_B_b + start * s_B_l + gg * s_B_g
    buf_base = bh.to(tl.int64) * seqlen + start  # dtp and cs are (b, h, l) fp32
    offs_p = tl.arange(0, BLOCK_P)
    offs_n = tl.arange(0, BLOCK_N)

    # The decay to the chunk's end needs cs at its last token before any token is weighted. Both
    # passes carry cs from block to block by the same float operations, so `total` is bit-equal to
    # the stored cs of the last token, and the last token's weight exp(total − cs) is exactly 1.
    is_last = tl.arange(0, BLOCK_K) == BLOCK_K - 1
    total = 0.0
    for k0 in range(0, chunk_size, BLOCK_K):
        offs_k = k0 + tl.arange(0, BLOCK_K)
        mask_k = offs_k < chunk_len
        dt = _process_dt(tl.load(dt_base + offs_k * s_dt_l, mask=mask_k, other=0.0).to(tl.float32), bias, DT_SOFTPLUS)
        cs = total + tl.cumsum(tl.where(mask_k, dt, 0.0) * A, axis=0)
        total = tl.sum(tl.where(is_last, cs, 0.0))

    carry = 0.0
    acc = tl.zeros((BLOCK_P, BLOCK_N), dtype=tl.float32)
    for k0 in range(0, chunk_size, BLOCK_K):
        offs_k = k0 + tl.arange(0, BLOCK_K)
        mask_k = offs_k < chunk_len
        dt = _process_dt(tl.load(dt_base + offs_k * s_dt_l, mask=mask_k, other=0.0).to(tl.float32), bias, DT_SOFTPLUS)
        dt = tl.where(mask_k, dt, 0.0)  # padding past the sequence must neither decay nor write
        cs = carry + tl.cumsum(dt * A, axis=0)
        carry = tl.sum(tl.where(is_last, cs, 0.0))
        tl.store(dtp_ptr + buf_base + offs_k, dt, mask=mask_k)
        tl.store(cs_ptr + buf_base + offs_k, cs, mask=mask_k)
        w = dt * tl.exp(total - cs)  # (K,) Δ_s·exp(cs_end − cs_s), ≤ Δ_s
        x = tl.load(
            x_base + offs_k[:, None] * s_x_l + offs_p[None, :] * s_x_p,
            mask=mask_k[:, None] & (offs_p[None, :] < headdim), other=0.0,
        )  # (K, P)
        Bk = tl.load(
            B_base + offs_k[:, None] * s_B_l + offs_n[None, :] * s_B_n,
            mask=mask_k[:, None] & (offs_n[None, :] < dstate), other=0.0,
        )  # (K, N)
        acc += _dot(tl.trans(x), (Bk * w[:, None]).to(Bk.dtype))  # (P, N)

    st_ptrs = states_ptr + ((b.to(tl.int64) * nchunks + c) * nheads + hh) * headdim * dstate
    st_ptrs += offs_p[:, None] * dstate + offs_n[None, :]
    tl.store(st_ptrs, acc, mask=(offs_p[:, None] < headdim) & (offs_n[None, :] < dstate))


@triton.jit
def _chunk_state(states_ptr, b, hh, c, nchunks, nheads, state_numel, offs):
    """Pointers to a BLOCK slice of chunk c's state in states (b, chunks, h, P·N)."""
    return states_ptr + ((b.to(tl.int64) * nchunks + c) * nheads + hh) * state_numel + offs


@triton.jit
def _passing_operands(states_ptr, cs_ptr, b, hh, bh, c, offs, mask, seqlen, nheads, nchunks, chunk_size, state_numel):
    """Chunk c's own contribution to the state (a BLOCK slice of it) and the cumulative Σ Δ·A at its last token."""
    own = tl.load(_chunk_state(states_ptr, b, hh, c, nchunks, nheads, state_numel, offs), mask=mask, other=0.0)
    last = tl.minimum((c + 1) * chunk_size, seqlen) - 1
    return own, tl.load(cs_ptr + bh.to(tl.int64) * seqlen + last)


@fast_launch
@triton.jit
def _state_passing_kernel(
    states_ptr, cs_ptr, init_ptr, final_ptr,
    seqlen, nheads, nchunks, chunk_size, state_numel,
    REVERSE: tl.constexpr, HAS_INIT: tl.constexpr, HAS_FINAL: tl.constexpr, BLOCK: tl.constexpr,
):
    """states[c] holds chunk c's own contribution on entry and the carried state on exit.

    Forward: states[c] becomes the state entering chunk c, and final_ptr the state after the last.
    REVERSE: states[c] becomes G_c, the gradient from the tokens after chunk c, and final_ptr the
    initial state's gradient. Either way, crossing chunk c multiplies by exp(Σ_{t ∈ c} Δ_t·A).
    """
    pid = tl.program_id(0)
    bh = tl.program_id(1)
    b = bh // nheads
    hh = bh % nheads
    offs = pid * BLOCK + tl.arange(0, BLOCK)
    mask = offs < state_numel
    io_base = bh.to(tl.int64) * state_numel
    if HAS_INIT:
        s = tl.load(init_ptr + io_base + offs, mask=mask, other=0.0).to(tl.float32)
    else:
        s = tl.zeros((BLOCK,), dtype=tl.float32)
    # Chunk i + 1's operands are loaded during chunk i: only the FMA depends on the previous chunk, so the
    # walk is otherwise a chain of exposed load latencies (the last iteration re-reads its own chunk).
    c = nchunks - 1 if REVERSE else 0
    own_nx, cs_nx = _passing_operands(states_ptr, cs_ptr, b, hh, bh, c, offs, mask, seqlen, nheads, nchunks,
                                      chunk_size, state_numel)
    for i in range(nchunks):
        c = nchunks - 1 - i if REVERSE else i
        own, decay = own_nx, tl.exp(cs_nx)
        c_nx = tl.maximum(c - 1, 0) if REVERSE else tl.minimum(c + 1, nchunks - 1)
        own_nx, cs_nx = _passing_operands(states_ptr, cs_ptr, b, hh, bh, c_nx, offs, mask, seqlen, nheads,
                                          nchunks, chunk_size, state_numel)
        tl.store(_chunk_state(states_ptr, b, hh, c, nchunks, nheads, state_numel, offs), s, mask=mask)
        s = decay * s + own
    if HAS_FINAL:
        tl.store(final_ptr + io_base + offs, s, mask=mask)


_SCAN_FWD_CONFIGS = [
    triton.Config({"BLOCK_M": 64, "BLOCK_P": 64}, num_warps=4, num_stages=2),
    triton.Config({"BLOCK_M": 128, "BLOCK_P": 64}, num_warps=8, num_stages=2),
    triton.Config({"BLOCK_M": 64, "BLOCK_P": 128}, num_warps=8, num_stages=2),
]


@fast_launch
@_autotune(_SCAN_FWD_CONFIGS, key=["chunk_size", "headdim", "dstate", "IS_FP32"])
@triton.jit
def _chunk_scan_fwd_kernel(
    x_ptr, z_ptr, D_ptr, B_ptr, C_ptr, dtp_ptr, cs_ptr, states_ptr,
    out_ptr, ypre_ptr,
    seqlen, nheads, headdim, dstate, chunk_size, heads_per_group,
    s_x_b, s_x_l, s_x_h, s_x_p,
    s_z_b, s_z_l, s_z_h, s_z_p,
    s_B_b, s_B_l, s_B_g, s_B_n,
    s_C_b, s_C_l, s_C_g, s_C_n,
    HAS_D: tl.constexpr, D_PER_P: tl.constexpr, HAS_Z: tl.constexpr, STORE_YPRE: tl.constexpr,
    IS_FP32: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_P: tl.constexpr,
):
    """Rows t of one chunk, one head, P-slice: y_t = Σ_{s ≤ t} exp(cs_t − cs_s) Δ_s (C_t·B_s) x_s
    + exp(cs_t) S C_t + D x_t, times silu(z_t); y before the gate is kept for the backward's dz."""
    n_pblocks = tl.cdiv(headdim, BLOCK_P)
    pid_m = tl.program_id(0) // n_pblocks
    pid_p = tl.program_id(0) % n_pblocks
    c = tl.program_id(1)
    bh = tl.program_id(2)
    nchunks = tl.num_programs(1)
    b = bh // nheads
    hh = bh % nheads
    gg = hh // heads_per_group
    start = c * chunk_size
    chunk_len = tl.minimum(chunk_size, seqlen - start)
    m0 = pid_m * BLOCK_M
    if m0 >= chunk_len:
        return
    offs_m = m0 + tl.arange(0, BLOCK_M)
    offs_p = pid_p * BLOCK_P + tl.arange(0, BLOCK_P)
    offs_n = tl.arange(0, BLOCK_N)
    mask_m = offs_m < chunk_len
    mask_p = offs_p < headdim
    mask_n = offs_n < dstate
    buf_base = bh.to(tl.int64) * seqlen + start
    x_base = x_ptr + b.to(tl.int64) * s_x_b + start * s_x_l + hh * s_x_h
    B_base = B_ptr + b.to(tl.int64) * s_B_b + start * s_B_l + gg * s_B_g
    C_base = C_ptr + b.to(tl.int64) * s_C_b + start * s_C_l + gg * s_C_g

    cs_m = tl.load(cs_ptr + buf_base + offs_m, mask=mask_m, other=0.0)
    Cm = tl.load(
        C_base + offs_m[:, None] * s_C_l + offs_n[None, :] * s_C_n, mask=mask_m[:, None] & mask_n[None, :], other=0.0
    )  # (M, N)
    S = tl.load(
        states_ptr + ((b.to(tl.int64) * nchunks + c) * nheads + hh) * headdim * dstate
        + offs_p[None, :] * dstate + offs_n[:, None],
        mask=mask_p[None, :] & mask_n[:, None], other=0.0,
    )  # (N, P): the state entering the chunk, transposed
    # The entering state reaches token t decayed by exp(cs_t).
    acc = _dot(Cm, S.to(Cm.dtype)) * tl.exp(cs_m)[:, None]  # (M, P)

    # Tokens of this chunk up to the diagonal block: the quadratic (attention-like) form.
    for k0 in range(0, m0 + BLOCK_M, BLOCK_M):
        offs_k = k0 + tl.arange(0, BLOCK_M)
        mask_k = offs_k < chunk_len
        cs_k = tl.load(cs_ptr + buf_base + offs_k, mask=mask_k, other=0.0)
        dt_k = tl.load(dtp_ptr + buf_base + offs_k, mask=mask_k, other=0.0)
        Bk = tl.load(
            B_base + offs_k[:, None] * s_B_l + offs_n[None, :] * s_B_n, mask=mask_k[:, None] & mask_n[None, :], other=0.0
        )  # (K, N)
        xk = tl.load(
            x_base + offs_k[:, None] * s_x_l + offs_p[None, :] * s_x_p, mask=mask_k[:, None] & mask_p[None, :], other=0.0
        )  # (K, P)
        cb = _dot(Cm, tl.trans(Bk))  # (M, K)
        causal = (offs_m[:, None] >= offs_k[None, :]) & mask_m[:, None] & mask_k[None, :]
        decay = tl.exp(tl.where(causal, cs_m[:, None] - cs_k[None, :], float("-inf")))
        acc += _dot((cb * decay * dt_k[None, :]).to(xk.dtype), xk)

    mask_mp = mask_m[:, None] & mask_p[None, :]
    if HAS_D:
        xm = tl.load(x_base + offs_m[:, None] * s_x_l + offs_p[None, :] * s_x_p, mask=mask_mp, other=0.0)
        acc += xm.to(tl.float32) * _load_D(D_ptr, hh, headdim, offs_p, mask_p, D_PER_P)
    out_off = ((b.to(tl.int64) * seqlen + start + offs_m[:, None]) * nheads + hh) * headdim + offs_p[None, :]
    if HAS_Z:
        if STORE_YPRE:
            tl.store(ypre_ptr + out_off, acc, mask=mask_mp)
        zm = tl.load(
            z_ptr + b.to(tl.int64) * s_z_b + (start + offs_m[:, None]) * s_z_l + hh * s_z_h + offs_p[None, :] * s_z_p,
            mask=mask_mp, other=0.0,
        ).to(tl.float32)
        acc = acc * zm * tl.sigmoid(zm)
    tl.store(out_ptr + out_off, acc, mask=mask_mp)


@fast_launch
@triton.jit
def _chunk_dstate_bwd_kernel(
    dout_ptr, z_ptr, x_ptr, C_ptr, cs_ptr, dstates_ptr, dD_ptr,
    seqlen, nheads, headdim, dstate, chunk_size, heads_per_group,
    s_z_b, s_z_l, s_z_h, s_z_p,
    s_x_b, s_x_l, s_x_h, s_x_p,
    s_C_b, s_C_l, s_C_g, s_C_n,
    HAS_Z: tl.constexpr, HAS_D: tl.constexpr,
    BLOCK_K: tl.constexpr, BLOCK_P: tl.constexpr, BLOCK_N: tl.constexpr,
):
    """The chunk's own share of the gradient w.r.t. the state entering it, Σ_t dy_tᵀ C_t exp(cs_t),
    and its share of dD, Σ_t dy_t ∘ x_t (dy = dout·silu(z): the gradient before the gate)."""
    c = tl.program_id(0)
    bh = tl.program_id(1)
    nchunks = tl.num_programs(0)
    b = bh // nheads
    hh = bh % nheads
    gg = hh // heads_per_group
    start = c * chunk_size
    chunk_len = tl.minimum(chunk_size, seqlen - start)
    offs_p = tl.arange(0, BLOCK_P)
    offs_n = tl.arange(0, BLOCK_N)
    mask_p = offs_p < headdim
    mask_n = offs_n < dstate
    buf_base = bh.to(tl.int64) * seqlen + start
    C_base = C_ptr + b.to(tl.int64) * s_C_b + start * s_C_l + gg * s_C_g
    x_base = x_ptr + b.to(tl.int64) * s_x_b + start * s_x_l + hh * s_x_h
    acc = tl.zeros((BLOCK_P, BLOCK_N), dtype=tl.float32)
    dD = tl.zeros((BLOCK_P,), dtype=tl.float32)
    for k0 in range(0, chunk_size, BLOCK_K):
        offs_k = k0 + tl.arange(0, BLOCK_K)
        mask_k = offs_k < chunk_len
        mask_kp = mask_k[:, None] & mask_p[None, :]
        cs = tl.load(cs_ptr + buf_base + offs_k, mask=mask_k, other=0.0)
        out_off = ((b.to(tl.int64) * seqlen + start + offs_k[:, None]) * nheads + hh) * headdim + offs_p[None, :]
        z_off = b.to(tl.int64) * s_z_b + (start + offs_k[:, None]) * s_z_l + hh * s_z_h + offs_p[None, :] * s_z_p
        dy = _gated_grad(dout_ptr, z_ptr, out_off, z_off, mask_kp, HAS_Z)  # (K, P) fp32
        if HAS_D:
            xk = tl.load(x_base + offs_k[:, None] * s_x_l + offs_p[None, :] * s_x_p, mask=mask_kp, other=0.0)
            dD += tl.sum(dy * xk.to(tl.float32), axis=0)
        Ck = tl.load(
            C_base + offs_k[:, None] * s_C_l + offs_n[None, :] * s_C_n, mask=mask_k[:, None] & mask_n[None, :], other=0.0
        )  # (K, N)
        acc += _dot(tl.trans(dy.to(Ck.dtype)), (Ck * tl.exp(cs)[:, None]).to(Ck.dtype))  # (P, N)
    st_ptrs = dstates_ptr + ((b.to(tl.int64) * nchunks + c) * nheads + hh) * headdim * dstate
    st_ptrs += offs_p[:, None] * dstate + offs_n[None, :]
    tl.store(st_ptrs, acc, mask=mask_p[:, None] & mask_n[None, :])
    if HAS_D:
        # dD: (nchunks, b, h, p) partial sums; the launcher adds them up.
        tl.store(dD_ptr + ((c.to(tl.int64) * tl.num_programs(1)) + bh) * headdim + offs_p, dD, mask=mask_p)


_SCAN_BWD_CONFIGS = [
    triton.Config({"BLOCK_M": 64}, num_warps=4, num_stages=2),
    triton.Config({"BLOCK_M": 64}, num_warps=8, num_stages=2),
    triton.Config({"BLOCK_M": 64}, num_warps=4, num_stages=1),
]
_SCAN_BWD_KEY = ["chunk_size", "headdim", "dstate", "heads_per_split", "IS_FP32"]


@triton.jit
def _scan_bwd_program(seqlen, chunk_size, heads_per_group, heads_per_split, ngroups, BLOCK_M: tl.constexpr):
    """What a program of the two scan backward kernels owns, from its grid index (row block, chunk,
    b·g·split): (its first row m0, chunk, nchunks, batch (int64), group, split of the group's heads, the
    chunk's first token and its length). A short last chunk leaves the last row blocks with m0 ≥ its length."""
    pid_m = tl.program_id(0)
    c = tl.program_id(1)
    pid_bgs = tl.program_id(2)
    nchunks = tl.num_programs(1)
    nsplit = heads_per_group // heads_per_split
    b = pid_bgs // (ngroups * nsplit)
    gg = (pid_bgs // nsplit) % ngroups
    split = pid_bgs % nsplit
    start = c * chunk_size
    chunk_len = tl.minimum(chunk_size, seqlen - start)
    return pid_m * BLOCK_M, c, nchunks, b.to(tl.int64), gg, split, start, chunk_len


@triton.jit
def _scan_bwd_tile(m0, chunk_len, b64, gg, start, B_ptr, C_ptr, nheads, headdim, dstate,
                   s_B_b, s_B_l, s_B_g, s_C_b, s_C_l, s_C_g,
                   BLOCK_M: tl.constexpr, BLOCK_P: tl.constexpr, BLOCK_N: tl.constexpr):
    """The program's tile, rows m0… of its chunk: the row, P and N offsets and their masks (alone and paired),
    the chunk's first token of B and of C in the group, and the rows' (M, P) offsets in a contiguous
    (b, l, h, p) tensor."""
    offs_m = m0 + tl.arange(0, BLOCK_M)
    offs_p = tl.arange(0, BLOCK_P)
    offs_n = tl.arange(0, BLOCK_N)
    mask_m = offs_m < chunk_len
    mask_p = offs_p < headdim
    mask_n = offs_n < dstate
    mask_mp = mask_m[:, None] & mask_p[None, :]
    mask_mn = mask_m[:, None] & mask_n[None, :]
    mask_pn = mask_p[:, None] & mask_n[None, :]
    B_base = B_ptr + b64 * s_B_b + start * s_B_l + gg * s_B_g
    C_base = C_ptr + b64 * s_C_b + start * s_C_l + gg * s_C_g
    row = offs_m[:, None] * nheads * headdim + offs_p[None, :]
    return offs_m, offs_p, offs_n, mask_m, mask_p, mask_n, mask_mp, mask_mn, mask_pn, B_base, C_base, row


@triton.jit
def _scan_bwd_head(i, b64, gg, split, start, x_ptr, seqlen, nheads, headdim, heads_per_group, heads_per_split,
                   s_x_b, s_x_l, s_x_h, s_z_b, s_z_l, s_z_h):
    """Head i of the program's split: the head, b·h, and the chunk's offsets into the (b·h, l) buffers,
    into x, into z, and into the contiguous (b, l, h, p) dout, ypre, dx and dz."""
    hh = gg * heads_per_group + split * heads_per_split + i
    bh = b64 * nheads + hh
    buf_base = bh * seqlen + start
    x_base = x_ptr + b64 * s_x_b + start * s_x_l + hh * s_x_h
    z_base = b64 * s_z_b + start * s_z_l + hh * s_z_h
    o_base = ((b64 * seqlen + start) * nheads + hh) * headdim
    return hh, bh, buf_base, x_base, z_base, o_base


@fast_launch
@_autotune(_SCAN_BWD_CONFIGS, key=_SCAN_BWD_KEY)
@triton.jit
def _chunk_scan_bwd_dx_kernel(
    x_ptr, z_ptr, D_ptr, B_ptr, C_ptr, dtp_ptr, cs_ptr, dstates_ptr, dout_ptr, ypre_ptr,
    dx_ptr, dz_ptr, dB_ptr, ddt_in_ptr, dq_ptr, dcs_in_ptr,
    batch, seqlen, nheads, headdim, dstate, chunk_size, heads_per_group, heads_per_split, ngroups,
    s_x_b, s_x_l, s_x_h, s_x_p,
    s_z_b, s_z_l, s_z_h, s_z_p,
    s_B_b, s_B_l, s_B_g, s_B_n,
    s_C_b, s_C_l, s_C_g, s_C_n,
    HAS_D: tl.constexpr, D_PER_P: tl.constexpr, HAS_Z: tl.constexpr,
    IS_FP32: tl.constexpr, BLOCK_P: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_M: tl.constexpr,
):
    """What flows back to token t from the tokens s ≥ t of its chunk and from G, for one row block
    of one chunk and the heads of one group (or a slice of them). With u_t = g_t B_t (g_t = ∂L/∂h_t):
      u_t  = Σ_{s ≥ t} exp(cs_s − cs_t)(B_t·C_s) dy_s + exp(cs_end − cs_t) G B_t
      dx_t = Δ_t u_t + D dy_t,        ∂L/∂Δ_t (direct part) = x_t·u_t
      dB_t = Δ_t [Σ_{s ≥ t} exp(cs_s − cs_t)(x_t·dy_s) C_s + exp(cs_end − cs_t) Gᵀ x_t], summed over heads
    and the parts of ∂L/∂(Δ·A) that leave t (see `_dt_bwd_kernel`):
      dq_t = Δ_t exp(cs_end − cs_t) x_t·(G B_t),   dcs_in_t = Σ_{s > t} M_st.
    """
    m0, c, nchunks, b64, gg, split, start, chunk_len = _scan_bwd_program(
        seqlen, chunk_size, heads_per_group, heads_per_split, ngroups, BLOCK_M)
    if m0 >= chunk_len:
        return
    offs_m, offs_p, offs_n, mask_m, mask_p, mask_n, mask_mp, mask_mn, mask_pn, B_base, C_base, row = _scan_bwd_tile(
        m0, chunk_len, b64, gg, start, B_ptr, C_ptr, nheads, headdim, dstate, s_B_b, s_B_l, s_B_g, s_C_b, s_C_l,
        s_C_g, BLOCK_M, BLOCK_P, BLOCK_N)
    Bm = tl.load(B_base + offs_m[:, None] * s_B_l + offs_n[None, :] * s_B_n, mask=mask_mn, other=0.0)  # (M, N)
    dB_acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)

    for i in range(heads_per_split):
        hh, bh, buf_base, x_base, z_base, o_base = _scan_bwd_head(
            i, b64, gg, split, start, x_ptr, seqlen, nheads, headdim, heads_per_group, heads_per_split,
            s_x_b, s_x_l, s_x_h, s_z_b, s_z_l, s_z_h)
        cs_m = tl.load(cs_ptr + buf_base + offs_m, mask=mask_m, other=0.0)
        dt_m = tl.load(dtp_ptr + buf_base + offs_m, mask=mask_m, other=0.0)
        cs_end = tl.load(cs_ptr + buf_base + chunk_len - 1)
        xm = tl.load(x_base + offs_m[:, None] * s_x_l + offs_p[None, :] * s_x_p, mask=mask_mp, other=0.0)  # (M, P)
        z_m_off = z_base + offs_m[:, None] * s_z_l + offs_p[None, :] * s_z_p
        dy_m = _gated_grad(dout_ptr, z_ptr, o_base + row, z_m_off, mask_mp, HAS_Z)
        if HAS_Z:
            zm = tl.load(z_ptr + z_m_off, mask=mask_mp, other=0.0).to(tl.float32)
            sig_z = tl.sigmoid(zm)
            dout_m = tl.load(dout_ptr + o_base + row, mask=mask_mp, other=0.0).to(tl.float32)
            ypre = tl.load(ypre_ptr + o_base + row, mask=mask_mp, other=0.0).to(tl.float32)
            tl.store(dz_ptr + o_base + row, dout_m * ypre * sig_z * (1.0 + zm * (1.0 - sig_z)), mask=mask_mp)

        G = tl.load(dstates_ptr + ((b64 * nchunks + c) * nheads + hh) * headdim * dstate
                    + offs_p[:, None] * dstate + offs_n[None, :], mask=mask_pn, other=0.0)  # (P, N)
        decay_end = tl.exp(cs_end - cs_m)  # (M,)
        u = _dot(Bm, tl.trans(G).to(Bm.dtype)) * decay_end[:, None]  # (M, P)
        dq = dt_m * tl.sum(xm.to(tl.float32) * u, axis=1)
        dB_h = _dot(xm, G.to(xm.dtype)) * decay_end[:, None]  # (M, N)
        dcs_in = tl.zeros((BLOCK_M,), dtype=tl.float32)
        for s0 in range(m0, chunk_len, BLOCK_M):
            offs_s = s0 + tl.arange(0, BLOCK_M)
            mask_s = offs_s < chunk_len
            mask_sp = mask_s[:, None] & mask_p[None, :]
            cs_s = tl.load(cs_ptr + buf_base + offs_s, mask=mask_s, other=0.0)
            Cs = tl.load(
                C_base + offs_s[:, None] * s_C_l + offs_n[None, :] * s_C_n, mask=mask_s[:, None] & mask_n[None, :], other=0.0
            )  # (S, N)
            dy_s = _gated_grad(dout_ptr, z_ptr, o_base + offs_s[:, None] * nheads * headdim + offs_p[None, :],
                               z_base + offs_s[:, None] * s_z_l + offs_p[None, :] * s_z_p, mask_sp, HAS_Z).to(xm.dtype)
            later = (offs_s[None, :] >= offs_m[:, None]) & mask_m[:, None] & mask_s[None, :]
            w = tl.exp(tl.where(later, cs_s[None, :] - cs_m[:, None], float("-inf")))  # (M, S)
            bc = _dot(Bm, tl.trans(Cs))  # (M, S)
            xdy = _dot(xm, tl.trans(dy_s))  # (M, S)
            u += _dot((bc * w).to(xm.dtype), dy_s)
            dB_h += _dot((xdy * w).to(xm.dtype), Cs)
            dcs_in += tl.sum(tl.where(offs_s[None, :] > offs_m[:, None], bc * xdy * w, 0.0), axis=1)
        dx = u * dt_m[:, None]
        if HAS_D:
            dx += dy_m * _load_D(D_ptr, hh, headdim, offs_p, mask_p, D_PER_P)
        tl.store(dx_ptr + o_base + row, dx, mask=mask_mp)
        tl.store(ddt_in_ptr + buf_base + offs_m, tl.sum(xm.to(tl.float32) * u, axis=1), mask=mask_m)
        tl.store(dq_ptr + buf_base + offs_m, dq, mask=mask_m)
        tl.store(dcs_in_ptr + buf_base + offs_m, dt_m * dcs_in, mask=mask_m)
        dB_acc += dB_h * dt_m[:, None]

    # dB: (nsplit, b, l, g, n); the launcher sums the splits when there is more than one.
    bc_off = (((split.to(tl.int64) * batch + b64) * seqlen + start + offs_m[:, None]) * ngroups + gg) * dstate
    tl.store(dB_ptr + bc_off + offs_n[None, :], dB_acc, mask=mask_mn)


@fast_launch
@_autotune(_SCAN_BWD_CONFIGS, key=_SCAN_BWD_KEY)
@triton.jit
def _chunk_scan_bwd_dc_kernel(
    x_ptr, z_ptr, B_ptr, C_ptr, dtp_ptr, cs_ptr, states_ptr, dstates_ptr, dout_ptr,
    dC_ptr, dcs_out_ptr, dcs_chunk_ptr,
    batch, seqlen, nheads, headdim, dstate, chunk_size, heads_per_group, heads_per_split, ngroups,
    s_x_b, s_x_l, s_x_h, s_x_p,
    s_z_b, s_z_l, s_z_h, s_z_p,
    s_B_b, s_B_l, s_B_g, s_B_n,
    s_C_b, s_C_l, s_C_g, s_C_n,
    HAS_Z: tl.constexpr, IS_FP32: tl.constexpr, BLOCK_P: tl.constexpr, BLOCK_N: tl.constexpr,
    BLOCK_M: tl.constexpr,
):
    """What flows back through C_t from the tokens s ≤ t of its chunk and from S (grid as
    `_chunk_scan_bwd_dx_kernel`):
      dC_t = Σ_{s ≤ t} exp(cs_t − cs_s) Δ_s (dy_t·x_s) B_s + exp(cs_t) Sᵀ dy_t, summed over heads
    and the parts of ∂L/∂(Δ·A) that reach t: dcs_out_t = Σ_{s < t} M_ts + exp(cs_t) C_t·(Sᵀ dy_t), and
    per chunk dcs_chunk = exp(cs_end)⟨G, S⟩.
    """
    m0, c, nchunks, b64, gg, split, start, chunk_len = _scan_bwd_program(
        seqlen, chunk_size, heads_per_group, heads_per_split, ngroups, BLOCK_M)
    if m0 >= chunk_len:
        return
    offs_m, offs_p, offs_n, mask_m, mask_p, mask_n, mask_mp, mask_mn, mask_pn, B_base, C_base, row = _scan_bwd_tile(
        m0, chunk_len, b64, gg, start, B_ptr, C_ptr, nheads, headdim, dstate, s_B_b, s_B_l, s_B_g, s_C_b, s_C_l,
        s_C_g, BLOCK_M, BLOCK_P, BLOCK_N)
    Cm = tl.load(C_base + offs_m[:, None] * s_C_l + offs_n[None, :] * s_C_n, mask=mask_mn, other=0.0)  # (M, N)
    dC_acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)

    for i in range(heads_per_split):
        hh, bh, buf_base, x_base, z_base, o_base = _scan_bwd_head(
            i, b64, gg, split, start, x_ptr, seqlen, nheads, headdim, heads_per_group, heads_per_split,
            s_x_b, s_x_l, s_x_h, s_z_b, s_z_l, s_z_h)
        st_pn = ((b64 * nchunks + c) * nheads + hh) * headdim * dstate + offs_p[:, None] * dstate + offs_n[None, :]
        cs_m = tl.load(cs_ptr + buf_base + offs_m, mask=mask_m, other=0.0)
        S = tl.load(states_ptr + st_pn, mask=mask_pn, other=0.0)  # (P, N)
        if m0 == 0:  # dcs_chunk is per chunk: the first row block stores it
            GS = tl.load(dstates_ptr + st_pn, mask=mask_pn, other=0.0) * S
            cs_end = tl.load(cs_ptr + buf_base + chunk_len - 1)
            tl.store(dcs_chunk_ptr + bh * nchunks + c, tl.exp(cs_end) * tl.sum(tl.sum(GS, axis=1), axis=0))
        dy_m = _gated_grad(dout_ptr, z_ptr, o_base + row, z_base + offs_m[:, None] * s_z_l + offs_p[None, :] * s_z_p,
                           mask_mp, HAS_Z).to(Cm.dtype)
        dC_h = _dot(dy_m, S.to(Cm.dtype)) * tl.exp(cs_m)[:, None]  # (M, N)
        dcs_out = tl.sum(Cm.to(tl.float32) * dC_h, axis=1)
        for s0 in range(0, m0 + BLOCK_M, BLOCK_M):
            offs_s = s0 + tl.arange(0, BLOCK_M)
            mask_s = offs_s < chunk_len
            cs_s = tl.load(cs_ptr + buf_base + offs_s, mask=mask_s, other=0.0)
            dt_s = tl.load(dtp_ptr + buf_base + offs_s, mask=mask_s, other=0.0)
            xs = tl.load(
                x_base + offs_s[:, None] * s_x_l + offs_p[None, :] * s_x_p, mask=mask_s[:, None] & mask_p[None, :], other=0.0
            )  # (S, P)
            Bs = tl.load(
                B_base + offs_s[:, None] * s_B_l + offs_n[None, :] * s_B_n, mask=mask_s[:, None] & mask_n[None, :], other=0.0
            )  # (S, N)
            earlier = (offs_m[:, None] >= offs_s[None, :]) & mask_m[:, None] & mask_s[None, :]
            w = tl.exp(tl.where(earlier, cs_m[:, None] - cs_s[None, :], float("-inf"))) * dt_s[None, :]
            dyx = _dot(dy_m, tl.trans(xs))  # (M, S)
            cb = _dot(Cm, tl.trans(Bs))  # (M, S)
            dC_h += _dot((dyx * w).to(Cm.dtype), Bs)
            dcs_out += tl.sum(tl.where(offs_m[:, None] > offs_s[None, :], dyx * cb * w, 0.0), axis=1)
        tl.store(dcs_out_ptr + buf_base + offs_m, dcs_out, mask=mask_m)
        dC_acc += dC_h

    bc_off = (((split.to(tl.int64) * batch + b64) * seqlen + start + offs_m[:, None]) * ngroups + gg) * dstate
    tl.store(dC_ptr + bc_off + offs_n[None, :], dC_acc, mask=mask_mn)


@fast_launch
@triton.jit
def _dt_bwd_kernel(
    dt_ptr, A_ptr, dt_bias_ptr, dtp_ptr, ddt_in_ptr, dcs_out_ptr, dcs_in_ptr, dq_ptr, dcs_chunk_ptr,
    ddt_ptr, dA_ptr, ddt_bias_ptr,
    seqlen, nheads, chunk_size,
    s_dt_b, s_dt_l, s_dt_h,
    HAS_DT_BIAS: tl.constexpr, DT_SOFTPLUS: tl.constexpr, BLOCK_Q: tl.constexpr,
):
    """∂L/∂(Δ_k A), then dΔ through softplus, and this chunk's shares of dA and d dt_bias ((b·h, nchunks)
    partial sums).

    A pair (token or state) s → t carries the decay of every token in (s, t], so ∂L/∂(Δ_k A) sums the
    pairs that straddle k. With M_ts = (dy_t·x_s)(C_t·B_s) Δ_s exp(cs_t − cs_s), for k in a chunk:
      the state entering the chunk → after it:   dcs_chunk = exp(cs_end)⟨G, S⟩
      tokens s < k of the chunk → after it:      Σ_{s < k} dq_s
      the entering state and tokens s < k → t ≥ k in the chunk:
                                                 Σ_{t ≥ k} (dcs_out_t − dcs_in_t)
    with dcs_out_t = Σ_{s < t} M_ts + exp(cs_t) C_t·(Sᵀ dy_t) and dcs_in_t = Σ_{s > t} M_st: the pairs
    inside [k, end] enter both sums and cancel, and they are the same fp32 numbers on both sides.
    Every term is a product of decays, never a difference of large terms, which keeps dA right where
    decay is strong or Δ large; the diagonal pairs M_tt are left out of both sums for that reason.
    """
    c = tl.program_id(0)
    bh = tl.program_id(1)
    nchunks = tl.num_programs(0)
    b = bh // nheads
    hh = bh % nheads
    A, bias = _head_params(A_ptr, dt_bias_ptr, hh, HAS_DT_BIAS)
    start = c * chunk_size
    offs = start + tl.arange(0, BLOCK_Q)
    mask = (tl.arange(0, BLOCK_Q) < chunk_size) & (offs < seqlen)
    buf = bh.to(tl.int64) * seqlen + offs
    dcs = tl.load(dcs_out_ptr + buf, mask=mask, other=0.0) - tl.load(dcs_in_ptr + buf, mask=mask, other=0.0)
    dq = tl.load(dq_ptr + buf, mask=mask, other=0.0)
    ddA = tl.load(dcs_chunk_ptr + bh.to(tl.int64) * nchunks + c) + tl.cumsum(dcs, axis=0, reverse=True)
    ddA += tl.cumsum(dq, axis=0) - dq
    ddt = tl.load(ddt_in_ptr + buf, mask=mask, other=0.0) + ddA * A
    tl.store(dA_ptr + bh.to(tl.int64) * nchunks + c, tl.sum(tl.where(mask, ddA * tl.load(dtp_ptr + buf, mask=mask, other=0.0), 0.0)))
    if DT_SOFTPLUS:
        raw = tl.load(dt_ptr + b.to(tl.int64) * s_dt_b + offs * s_dt_l + hh * s_dt_h, mask=mask, other=0.0).to(tl.float32)
        raw += bias
        ddt = softplus_grad(ddt, raw)
    ddt = tl.where(mask, ddt, 0.0)
    if HAS_DT_BIAS:
        tl.store(ddt_bias_ptr + bh.to(tl.int64) * nchunks + c, tl.sum(ddt))
    tl.store(ddt_ptr + (b.to(tl.int64) * seqlen + offs) * nheads + hh, ddt, mask=mask)  # ddt: contiguous (b, l, h)


def _state_passing(states, cs, init, final, chunk_size, reverse):
    """`_state_passing_kernel` over states (b, nchunks, h, p, n) fp32, in place, with cs (b, h, l): from `init`
    (b, h, p, n) or zero, and the state after the last chunk into `final` when it is given (see the kernel)."""
    batch, nchunks, nheads, headdim, dstate = states.shape
    numel = headdim * dstate
    BLOCK = min(256, next_pow2(numel))
    _state_passing_kernel[(cdiv(numel, BLOCK), batch * nheads)](
        states, cs, init if init is not None else states, final if final is not None else states,
        cs.shape[2], nheads, nchunks, chunk_size, numel,
        REVERSE=reverse, HAS_INIT=init is not None, HAS_FINAL=final is not None, BLOCK=BLOCK,
        num_warps=2,
    )


def _ssd_fwd(x, dt, A, B, C, chunk_size, D, z, dt_bias, initial_states, dt_softplus, store_final, store_ypre):
    """Returns out (b, l, h, p), final state or None, and what the backward needs."""
    batch, seqlen, nheads, headdim = x.shape
    _, _, ngroups, dstate = B.shape
    nchunks = cdiv(seqlen, chunk_size)
    f32 = dict(device=x.device, dtype=torch.float32)
    dtp = torch.empty(batch, nheads, seqlen, **f32)  # Δ after dt_bias and softplus
    cs = torch.empty(batch, nheads, seqlen, **f32)  # cumulative Σ Δ·A inside each chunk
    states = torch.empty(batch, nchunks, nheads, headdim, dstate, **f32)
    BLOCK_P, BLOCK_N = _pow2(headdim), _pow2(dstate)
    hpg = nheads // ngroups
    dt_bias_arg = dt_bias if dt_bias is not None else dt
    _chunk_state_fwd_kernel[(nchunks, batch * nheads)](
        x, dt, A, dt_bias_arg, B, dtp, cs, states,
        seqlen, nheads, headdim, dstate, chunk_size, hpg,
        *x.stride(), *dt.stride(), *B.stride(),
        HAS_DT_BIAS=dt_bias is not None, DT_SOFTPLUS=dt_softplus,
        BLOCK_K=min(64, _pow2(chunk_size)), BLOCK_P=BLOCK_P, BLOCK_N=BLOCK_N,
        num_warps=4,
    )
    final = torch.empty(batch, nheads, headdim, dstate, **f32) if store_final else None
    init = initial_states.contiguous() if initial_states is not None else None
    _state_passing(states, cs, init, final, chunk_size, reverse=False)
    out = torch.empty(batch, seqlen, nheads, headdim, device=x.device, dtype=x.dtype)
    ypre = torch.empty_like(out) if (store_ypre and z is not None) else None
    zz = z if z is not None else x
    grid = lambda META: (  # noqa: E731
        cdiv(chunk_size, META["BLOCK_M"]) * cdiv(headdim, META["BLOCK_P"]), nchunks, batch * nheads
    )
    _chunk_scan_fwd_kernel[grid](
        x, zz, D if D is not None else x, B, C, dtp, cs, states, out, ypre if ypre is not None else out,
        seqlen, nheads, headdim, dstate, chunk_size, hpg,
        *x.stride(), *zz.stride(), *B.stride(), *C.stride(),
        HAS_D=D is not None, D_PER_P=D is not None and D.dim() == 2, HAS_Z=z is not None,
        STORE_YPRE=ypre is not None, IS_FP32=x.dtype == torch.float32, BLOCK_N=BLOCK_N,
    )
    return out, final, (dtp, cs, states, ypre)


def _ssd_bwd(dout, dfinal, x, dt, A, B, C, chunk_size, D, z, dt_bias, dt_softplus, has_init, saved):
    """Gradients for x, dt, A, B, C, D, z, dt_bias, initial_states (None where the input was None)."""
    dtp, cs, states, ypre = saved
    batch, seqlen, nheads, headdim = x.shape
    _, _, ngroups, dstate = B.shape
    nchunks = cdiv(seqlen, chunk_size)
    hpg = nheads // ngroups
    f32 = dict(device=x.device, dtype=torch.float32)
    BLOCK_P, BLOCK_N = _pow2(headdim), _pow2(dstate)
    dout = dout.contiguous()
    zz = z if z is not None else x

    dstates = torch.empty_like(states)
    dD_part = torch.empty(nchunks, batch, nheads, headdim, **f32) if D is not None else None
    _chunk_dstate_bwd_kernel[(nchunks, batch * nheads)](
        dout, zz, x, C, cs, dstates, dD_part if dD_part is not None else dstates,
        seqlen, nheads, headdim, dstate, chunk_size, hpg,
        *zz.stride(), *x.stride(), *C.stride(),
        HAS_Z=z is not None, HAS_D=D is not None,
        BLOCK_K=min(64, _pow2(chunk_size)), BLOCK_P=BLOCK_P, BLOCK_N=BLOCK_N,
        num_warps=4,
    )
    dinit = torch.empty(batch, nheads, headdim, dstate, **f32) if has_init else None
    dfin = dfinal.contiguous() if dfinal is not None else None
    _state_passing(dstates, cs, dfin, dinit, chunk_size, reverse=True)

    # Split a group's heads over more programs only when the grid would not fill the GPU.
    heads_per_split = hpg
    base_programs = cdiv(chunk_size, 64) * nchunks * batch * ngroups
    while heads_per_split % 2 == 0 and base_programs * (hpg // heads_per_split) < 4 * _num_sms(x.device):
        heads_per_split //= 2
    nsplit = hpg // heads_per_split
    dx = torch.empty(batch, seqlen, nheads, headdim, device=x.device, dtype=x.dtype)
    dz = torch.empty(batch, seqlen, nheads, headdim, device=x.device, dtype=z.dtype) if z is not None else None
    bc_dtype = B.dtype if nsplit == 1 else torch.float32
    dB = torch.empty(nsplit, batch, seqlen, ngroups, dstate, device=x.device, dtype=bc_dtype)
    dC = torch.empty(nsplit, batch, seqlen, ngroups, dstate, device=x.device, dtype=bc_dtype)
    ddt_in, dq, dcs_in, dcs_out = torch.empty(4, batch, nheads, seqlen, **f32).unbind(0)
    dcs_chunk = torch.empty(batch, nheads, nchunks, **f32)
    grid = lambda META: (cdiv(chunk_size, META["BLOCK_M"]), nchunks, batch * ngroups * nsplit)  # noqa: E731
    sizes = (batch, seqlen, nheads, headdim, dstate, chunk_size, hpg, heads_per_split, ngroups)
    strides = (*x.stride(), *zz.stride(), *B.stride(), *C.stride())
    _chunk_scan_bwd_dx_kernel[grid](
        x, zz, D if D is not None else x, B, C, dtp, cs, dstates, dout, ypre if ypre is not None else dout,
        dx, dz if dz is not None else dx, dB, ddt_in, dq, dcs_in, *sizes, *strides,
        HAS_D=D is not None, D_PER_P=D is not None and D.dim() == 2, HAS_Z=z is not None,
        IS_FP32=x.dtype == torch.float32, BLOCK_P=BLOCK_P, BLOCK_N=BLOCK_N,
    )
    _chunk_scan_bwd_dc_kernel[grid](
        x, zz, B, C, dtp, cs, states, dstates, dout, dC, dcs_out, dcs_chunk, *sizes, *strides,
        HAS_Z=z is not None, IS_FP32=x.dtype == torch.float32, BLOCK_P=BLOCK_P, BLOCK_N=BLOCK_N,
    )

    ddt = torch.empty(batch, seqlen, nheads, device=x.device, dtype=dt.dtype)
    dt_parts = torch.empty(2, batch, nheads, nchunks, **f32)  # dA and d dt_bias, per (b, h, chunk)
    dA_part, dbias_part = dt_parts.unbind(0)
    _dt_bwd_kernel[(nchunks, batch * nheads)](
        dt, A, dt_bias if dt_bias is not None else A, dtp, ddt_in, dcs_out, dcs_in, dq, dcs_chunk,
        ddt, dA_part, dbias_part,
        seqlen, nheads, chunk_size, *dt.stride(),
        HAS_DT_BIAS=dt_bias is not None, DT_SOFTPLUS=dt_softplus, BLOCK_Q=_pow2(chunk_size, 16),
        num_warps=4,
    )

    dB = dB[0] if nsplit == 1 else _cast(dB.sum(0), B.dtype)
    dC = dC[0] if nsplit == 1 else _cast(dC.sum(0), C.dtype)
    dA_dbias = dt_parts.sum((1, 3))  # (2, h); without dt_bias its second row is unwritten and unused
    dA = _cast(dA_dbias[0], A.dtype)
    dbias = _cast(dA_dbias[1], dt_bias.dtype) if dt_bias is not None else None
    dD = None
    if D is not None:
        dD = _cast(dD_part.sum((0, 1) if D.dim() == 2 else (0, 1, 3)), D.dtype)  # (h, p) or (h,)
    return dx, ddt, dA, dB, dC, dD, dz, dbias, dinit

