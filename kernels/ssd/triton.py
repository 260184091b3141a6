"""SSD (Mamba-2's state space dual) in Triton: chunked scan with forward and backward, and a decode step.

Glossary (paper symbols): b = batch, l = seqlen, h = nheads, p = headdim (P), g = ngroups, n = d_state (N),
Q = chunk_size, Δ = dt (after dt_bias and softplus), A: one negative scalar per head, cs = the cumulative
sum of Δ·A inside a chunk (inclusive), S = the state (P×N) entering a chunk, G = the gradient of the loss
with respect to the state leaving a chunk, seen from the tokens after it.

Per head:  h_t = exp(Δ_t·A)·h_{t−1} + Δ_t·x_t B_tᵀ,   y_t = (h_t C_t + D·x_t)·silu(z_t).

Two paths compute the same function; `ssd_scan_triton` takes the fused one when its b·h programs fill
the GPU, or, for training, when its programs (P slices and sequence segments included) fill 3/4 of it
(`_use_fused`), which is the workbench's case; the chunked one otherwise.

Fused path (blocks of T = 64 tokens; 1 launch forward, 3 backward):
  `_fused_fwd_kernel`         per b·h (and slice of P, when b·h programs would leave SMs idle): the
                              blocks in order, the state in registers; y, and every block's entering
                              state S for the backward.
  `_fused_dstate_bwd_kernel`  per b·h (and slice of P): the blocks in reverse, G (the gradient of the
                              state leaving each block) in registers; one matrix product a block.
  `_fused_block_bwd_kernel`   per (block, b·h), all independent: dx, dz, dΔ, per-head dB and dC, and
                              partial sums of dA, d dt_bias and dD.
  `_fused_bwd_sums_kernel`    dB and dC summed over a group's heads, and the partial sums reduced.
Few launches matter as much as fast kernels here: at workbench shapes a launch costs the host about as
much as the GPU time of a whole kernel.

Chunked path, forward, three launches:
  1. `_chunk_state_fwd_kernel`  per (chunk, b·h): Δ, cs, and the chunk's own final state from zero.
  2. `_state_passing_kernel`    per (b·h, slice of P·N): the only sequential part, over chunks; turns
                                each chunk's own state into the state entering it, in place.
  3. `_chunk_scan_fwd_kernel`   per (row block, chunk, b·h): y = causal (C Bᵀ ∘ decay ∘ Δ) x + C S.
Chunked path, backward, five launches, mirroring it (the gradient runs backwards in time through the same
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
difference of large terms, so it too stays accurate when the decay is strong.

Everything is asynchronous and shape-driven (no host reads of device data), so a training step that
calls these can be captured in a CUDA graph (after a first call has compiled and autotuned them).
"""

import functools

import torch
import triton
import triton.language as tl

from kernels import cdiv, next_pow2
from kernels.launch import INTERPRET, autotune, fast_launch

# Every matrix-product dimension (rows, tokens, P, N) is tiled by at least 64 on the GPU: on Hopper,
# Triton 3.4-3.6 miscompiles kernels holding two or more tl.dot with 16- or 32-wide tiles (illegal
# memory accesses and silent corruption; seen here on tiny shapes, and worked around the same way in
# pytorch/helion#1905). Smaller dimensions are masked. The interpreter keeps 16 for speed.
_MIN_DOT = 16 if INTERPRET else 64


def _autotune(configs, key):
    """`triton.autotune` on the GPU; the interpreter cannot time kernels, so it gets the first config."""
    return autotune(configs[:1] if INTERPRET else configs, key)


# Triton 3.9's interpreter multiplies bf16 operands wrongly in tl.dot; fp32 operands give it the exact
# products that the GPU's bf16 tensor cores accumulate in fp32.
_DOT_IN_FP32 = tl.constexpr(INTERPRET)


@triton.jit
def _dot(a, b):
    if _DOT_IN_FP32:
        return tl.dot(a.to(tl.float32), b.to(tl.float32))
    return tl.dot(a, b)


@triton.jit
def _process_dt(dt_raw, bias, DT_SOFTPLUS: tl.constexpr):
    """Δ = softplus(dt + dt_bias); softplus is the identity above 20, like torch's default threshold."""
    dt = dt_raw + bias
    if DT_SOFTPLUS:
        dt = tl.where(dt > 20.0, dt, tl.log(1.0 + tl.exp(tl.minimum(dt, 20.0))))
    return dt


@triton.jit
def _gated_grad(dout_ptr, z_ptr, o_off, z_off, mask, HAS_Z: tl.constexpr):
    """dy = dout·silu(z), the gradient of the scan's output before the gate (fp32)."""
    dy = tl.load(dout_ptr + o_off, mask=mask, other=0.0).to(tl.float32)
    if HAS_Z:
        z = tl.load(z_ptr + z_off, mask=mask, other=0.0).to(tl.float32)
        dy = dy * z * tl.sigmoid(z)
    return dy


@triton.jit
def _head(bh, nheads, heads_per_group):
    """Program index b·h → batch (int64, for offsets), head, and the head's group of B and C."""
    hh = bh % nheads
    return (bh // nheads).to(tl.int64), hh, hh // heads_per_group


@triton.jit
def _head_params(A_ptr, dt_bias_ptr, hh, HAS_DT_BIAS: tl.constexpr):
    """A and dt_bias of head hh in fp32 (dt_bias 0 when there is none)."""
    bias = tl.load(dt_bias_ptr + hh).to(tl.float32) if HAS_DT_BIAS else 0.0
    return tl.load(A_ptr + hh).to(tl.float32), bias


@triton.jit
def _load_D(D_ptr, hh, headdim, offs_p, mask_p, D_PER_P: tl.constexpr):
    """D of head hh in fp32: its (P,) row (D_PER_P) or its scalar; either broadcasts over (tokens, P)."""
    # One return: triton 3.6 rejects returns of different shapes even under a constexpr branch.
    if D_PER_P:
        Dv = tl.load(D_ptr + hh * headdim + offs_p, mask=mask_p, other=0.0)
    else:
        Dv = tl.load(D_ptr + hh)
    return Dv.to(tl.float32)


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
    m0 = pid_m * BLOCK_M
    if m0 >= chunk_len:
        return
    offs_m = m0 + tl.arange(0, BLOCK_M)
    offs_p = tl.arange(0, BLOCK_P)
    offs_n = tl.arange(0, BLOCK_N)
    mask_m = offs_m < chunk_len
    mask_p = offs_p < headdim
    mask_n = offs_n < dstate
    mask_mp = mask_m[:, None] & mask_p[None, :]
    mask_mn = mask_m[:, None] & mask_n[None, :]
    mask_pn = mask_p[:, None] & mask_n[None, :]
    b64 = b.to(tl.int64)
    B_base = B_ptr + b64 * s_B_b + start * s_B_l + gg * s_B_g
    C_base = C_ptr + b64 * s_C_b + start * s_C_l + gg * s_C_g
    Bm = tl.load(B_base + offs_m[:, None] * s_B_l + offs_n[None, :] * s_B_n, mask=mask_mn, other=0.0)  # (M, N)
    dB_acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    row = offs_m[:, None] * nheads * headdim + offs_p[None, :]  # (M, P) offsets in contiguous (b, l, h, p)

    for i in range(heads_per_split):
        hh = gg * heads_per_group + split * heads_per_split + i
        bh = b64 * nheads + hh
        buf_base = bh * seqlen + start
        x_base = x_ptr + b64 * s_x_b + start * s_x_l + hh * s_x_h
        z_base = b64 * s_z_b + start * s_z_l + hh * s_z_h
        o_base = ((b64 * seqlen + start) * nheads + hh) * headdim  # dout, ypre, dx, dz
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
    m0 = pid_m * BLOCK_M
    if m0 >= chunk_len:
        return
    offs_m = m0 + tl.arange(0, BLOCK_M)
    offs_p = tl.arange(0, BLOCK_P)
    offs_n = tl.arange(0, BLOCK_N)
    mask_m = offs_m < chunk_len
    mask_p = offs_p < headdim
    mask_n = offs_n < dstate
    mask_mp = mask_m[:, None] & mask_p[None, :]
    mask_mn = mask_m[:, None] & mask_n[None, :]
    mask_pn = mask_p[:, None] & mask_n[None, :]
    b64 = b.to(tl.int64)
    B_base = B_ptr + b64 * s_B_b + start * s_B_l + gg * s_B_g
    C_base = C_ptr + b64 * s_C_b + start * s_C_l + gg * s_C_g
    Cm = tl.load(C_base + offs_m[:, None] * s_C_l + offs_n[None, :] * s_C_n, mask=mask_mn, other=0.0)  # (M, N)
    dC_acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    row = offs_m[:, None] * nheads * headdim + offs_p[None, :]

    for i in range(heads_per_split):
        hh = gg * heads_per_group + split * heads_per_split + i
        bh = b64 * nheads + hh
        buf_base = bh * seqlen + start
        x_base = x_ptr + b64 * s_x_b + start * s_x_l + hh * s_x_h
        z_base = b64 * s_z_b + start * s_z_l + hh * s_z_h
        o_base = ((b64 * seqlen + start) * nheads + hh) * headdim
        st_pn = ((b64 * nchunks + c) * nheads + hh) * headdim * dstate + offs_p[:, None] * dstate + offs_n[None, :]
        cs_m = tl.load(cs_ptr + buf_base + offs_m, mask=mask_m, other=0.0)
        S = tl.load(states_ptr + st_pn, mask=mask_pn, other=0.0)  # (P, N)
        if pid_m == 0:
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
        ddt = tl.where(raw > 20.0, ddt, ddt * tl.sigmoid(raw))
    ddt = tl.where(mask, ddt, 0.0)
    if HAS_DT_BIAS:
        tl.store(ddt_bias_ptr + bh.to(tl.int64) * nchunks + c, tl.sum(ddt))
    tl.store(ddt_ptr + (b.to(tl.int64) * seqlen + offs) * nheads + hh, ddt, mask=mask)  # ddt: contiguous (b, l, h)


# Fused path (see the module docstring): the sequential walks carry the state, or its gradient, in
# registers; everything else is one independent program per block. It is SSD with chunk T (the chunk
# size changes only rounding, not the function). Four or eight warps: with four the forward and block
# kernels spill more (`python -m kernels.ssd.sass`) but two programs fit on a multiprocessor; on an
# H200 the forward took 0.173 ms at eight and 0.092 ms autotuned over both (NOTES.md), so the
# autotuner chooses.
_FUSED_CONFIGS = [triton.Config({}, num_warps=4, num_stages=2), triton.Config({}, num_warps=8, num_stages=2)]
# BLOCK_P too: the autotuner keys on these alone, and without it the first P slice timed would choose the
# warps for every other. The choice matters: 16-wide slices at (2, 16384, 32, 64, 128) forced to 8 warps took
# 2.67 ms forward against 1.30 at 4 (NOTES.md, "v9").
_FUSED_KEY = ["headdim", "dstate", "HAS_Z", "BLOCK_P"]


@triton.jit
def _block_dt(dt_ptrs, mask_t, bias, A, BLOCK_T: tl.constexpr, DT_SOFTPLUS: tl.constexpr):
    """For one block of T tokens: dt + dt_bias, Δ (0 past the sequence, so padding neither decays nor
    writes), cs = the inclusive cumulative Σ Δ·A over the block, and its last value cs_end."""
    raw = tl.load(dt_ptrs, mask=mask_t, other=0.0).to(tl.float32) + bias
    dt = tl.where(mask_t, _process_dt(raw, 0.0, DT_SOFTPLUS), 0.0)
    cs = tl.cumsum(dt * A, axis=0)  # (T,)
    cs_end = tl.sum(tl.where(tl.arange(0, BLOCK_T) == BLOCK_T - 1, cs, 0.0))
    return raw, dt, cs, cs_end


@triton.jit
def _load_state(ptrs, mask, ROWS: tl.constexpr, COLS: tl.constexpr, PRESENT: tl.constexpr):
    """A state tile (ROWS, COLS) in fp32, or zeros where none was given (no initial state, no final-state
    gradient)."""
    if PRESENT:
        return tl.load(ptrs, mask=mask, other=0.0).to(tl.float32)
    return tl.zeros((ROWS, COLS), dtype=tl.float32)


@triton.jit
def _state_slice(offs_n, headdim, dstate, p_slice, BLOCK_P: tl.constexpr):
    """Columns p_slice·BLOCK_P… of P (the slices are independent in the sequential kernels), and the (N, P)
    offsets and mask of that part of a state stored as contiguous (p, n): the sequential kernels hold states
    transposed, so that the slice's P is the narrow side of every matrix product."""
    offs_p = p_slice * BLOCK_P + tl.arange(0, BLOCK_P)
    mask_p = offs_p < headdim
    state_off = offs_n[:, None] + offs_p[None, :] * dstate  # (N, P)
    return offs_p, mask_p, state_off, (offs_n < dstate)[:, None] & mask_p[None, :]


@triton.jit
def _segment_blocks(nblocks, seg_blocks, SEGMENTED: tl.constexpr):
    """This program's segment (grid axis 2) and its blocks [k_first, k_end): all of them unless SEGMENTED."""
    if SEGMENTED:
        seg = tl.program_id(2)
        return seg, seg * seg_blocks, tl.minimum(seg * seg_blocks + seg_blocks, nblocks)
    return 0, 0, nblocks


@fast_launch
@_autotune(_FUSED_CONFIGS, key=_FUSED_KEY)
@triton.jit
def _fused_fwd_kernel(
    x_ptr, dt_ptr, A_ptr, dt_bias_ptr, B_ptr, C_ptr, D_ptr, z_ptr, init_ptr,
    out_ptr, ypre_ptr, states_ptr, final_ptr, seg_decay_ptr, seg_final_ptr,
    seqlen, nheads, headdim, dstate, heads_per_group, seg_blocks,
    s_x_b, s_x_l, s_x_h, s_z_b, s_z_l, s_z_h, s_dt_b, s_dt_l, s_dt_h,
    s_B_b, s_B_l, s_B_g, s_C_b, s_C_l, s_C_g,
    HAS_D: tl.constexpr, D_PER_P: tl.constexpr, HAS_Z: tl.constexpr, HAS_DT_BIAS: tl.constexpr,
    DT_SOFTPLUS: tl.constexpr, HAS_INIT: tl.constexpr, STORE_STATES: tl.constexpr, STORE_FINAL: tl.constexpr,
    STORE_YPRE: tl.constexpr, SEGMENTED: tl.constexpr, BLOCK_T: tl.constexpr, BLOCK_P: tl.constexpr,
    BLOCK_N: tl.constexpr,
):
    """One head of one sequence (or a slice of its P columns, which are independent), block by block:
    with S the (P, N) state entering the block,
      y_t = Σ_{s ≤ t} exp(cs_t − cs_s)(C_t·B_s) Δ_s x_s + exp(cs_t) S C_t + D x_t  (then · silu(z_t)),
      S  ← exp(cs_end) S + Σ_s exp(cs_end − cs_s) Δ_s x_s B_sᵀ.
    The backward reads every block's entering state (`states`, (b·h, blocks, P, N)) and y before the gate.
    SEGMENTED: grid axis 2 splits the sequence into segments of seg_blocks blocks, each walked from a zero
    state (the first from the initial state), so that the chains are shorter. y and `states` then miss what
    the state entering the segment contributes; `_fused_fwd_fix_kernel` adds it to y from what this kernel
    leaves: seg_decay (b·h, blocks + segments) fp32, Σ Δ·A from the segment's start to each block's, then
    over each whole segment; seg_final (b·h, segments, P, N) fp32, each segment's last state."""
    bh = tl.program_id(0)
    b, hh, gg = _head(bh, nheads, heads_per_group)
    nblocks = tl.cdiv(seqlen, BLOCK_T)
    seg, k_first, k_end = _segment_blocks(nblocks, seg_blocks, SEGMENTED)
    offs_t = tl.arange(0, BLOCK_T)
    offs_n = tl.arange(0, BLOCK_N)
    offs_p, mask_p, state_off, mask_np = _state_slice(offs_n, headdim, dstate, tl.program_id(1), BLOCK_P)
    mask_n = offs_n < dstate
    causal = offs_t[:, None] >= offs_t[None, :]  # (T, T): token t reads tokens s ≤ t
    A, bias = _head_params(A_ptr, dt_bias_ptr, hh, HAS_DT_BIAS)
    if HAS_D:
        Dv = _load_D(D_ptr, hh, headdim, offs_p, mask_p, D_PER_P)
    head_state = bh.to(tl.int64) * headdim * dstate  # this head's (P, N) in a (b·h, P, N) tensor
    St = _load_state(init_ptr + head_state + state_off, mask_np, BLOCK_N, BLOCK_P, HAS_INIT)  # Sᵀ (N, P)
    if SEGMENTED:
        St = tl.where(seg == 0, St, 0.0)  # later segments start from zero
        decay_in = tl.sum(tl.zeros((BLOCK_T,), dtype=tl.float32))  # Σ Δ·A from the segment's start to block k's
    x_base = x_ptr + b * s_x_b + hh * s_x_h
    z_base = z_ptr + b * s_z_b + hh * s_z_h
    dt_base = dt_ptr + b * s_dt_b + hh * s_dt_h
    B_base = B_ptr + b * s_B_b + gg * s_B_g
    C_base = C_ptr + b * s_C_b + gg * s_C_g
    o_base = (b * seqlen * nheads + hh) * headdim  # out and ypre: contiguous (b, l, h, p)
    st_base = states_ptr + bh.to(tl.int64) * nblocks * headdim * dstate

    for k in range(k_first, k_end):
        t = k * BLOCK_T + offs_t
        mask_t = t < seqlen
        mask_tp = mask_t[:, None] & mask_p[None, :]
        mask_tn = mask_t[:, None] & mask_n[None, :]
        _, dt, cs, cs_end = _block_dt(dt_base + t * s_dt_l, mask_t, bias, A, BLOCK_T, DT_SOFTPLUS)
        if SEGMENTED:  # every slice stores the same value
            tl.store(seg_decay_ptr + bh.to(tl.int64) * (nblocks + tl.num_programs(2)) + k, decay_in)
            decay_in += cs_end
        x = tl.load(x_base + t[:, None] * s_x_l + offs_p[None, :], mask=mask_tp, other=0.0)  # (T, P)
        Bt = tl.load(B_base + t[:, None] * s_B_l + offs_n[None, :], mask=mask_tn, other=0.0)  # (T, N)
        Ct = tl.load(C_base + t[:, None] * s_C_l + offs_n[None, :], mask=mask_tn, other=0.0)  # (T, N)
        if STORE_STATES:
            tl.store(st_base + k * headdim * dstate + state_off, St.to(states_ptr.dtype.element_ty), mask=mask_np)

        decay = tl.exp(tl.where(causal, cs[:, None] - cs[None, :], float("-inf")))  # (T, T)
        cb = _dot(Ct, tl.trans(Bt))  # (T, T)
        y = _dot((cb * decay * dt[None, :]).to(x.dtype), x)  # (T, P)
        y += _dot(Ct, St.to(Ct.dtype)) * tl.exp(cs)[:, None]
        w = dt * tl.exp(cs_end - cs)  # (T,) Δ_s·exp(cs_end − cs_s)
        St = St * tl.exp(cs_end) + _dot(tl.trans((Bt * w[:, None]).to(Bt.dtype)), x)  # (N, P)

        if HAS_D:
            y += x.to(tl.float32) * Dv
        o_off = o_base + t[:, None] * nheads * headdim + offs_p[None, :]
        if HAS_Z:
            if STORE_YPRE:
                tl.store(ypre_ptr + o_off, y, mask=mask_tp)
            zt = tl.load(z_base + t[:, None] * s_z_l + offs_p[None, :], mask=mask_tp, other=0.0).to(tl.float32)
            y = y * zt * tl.sigmoid(zt)
        tl.store(out_ptr + o_off, y, mask=mask_tp)

    if SEGMENTED:
        nseg = tl.num_programs(2)
        tl.store(seg_decay_ptr + bh.to(tl.int64) * (nblocks + nseg) + nblocks + seg, decay_in)
        tl.store(seg_final_ptr + (bh.to(tl.int64) * nseg + seg) * headdim * dstate + state_off, St, mask=mask_np)
    if STORE_FINAL:
        tl.store(final_ptr + head_state + state_off, St, mask=mask_np)


@fast_launch
@triton.jit
def _fused_fwd_fix_kernel(
    dt_ptr, A_ptr, dt_bias_ptr, C_ptr, z_ptr, out_ptr, ypre_ptr, final_ptr, seg_decay_ptr, seg_final_ptr,
    seg_in_ptr,
    seqlen, nheads, headdim, dstate, heads_per_group, seg_blocks,
    s_z_b, s_z_l, s_z_h, s_dt_b, s_dt_l, s_dt_h, s_C_b, s_C_l, s_C_g,
    HAS_Z: tl.constexpr, HAS_DT_BIAS: tl.constexpr, DT_SOFTPLUS: tl.constexpr, STORE_FINAL: tl.constexpr,
    STORE_YPRE: tl.constexpr, BLOCK_T: tl.constexpr, BLOCK_P: tl.constexpr, BLOCK_N: tl.constexpr,
):
    """The segmented forward's correction, a program for each block after the first segment. With S_in the
    state entering the block's segment (S_in ← exp(Σ_seg Δ·A) S_in + S_seg over the segments before it,
    from 0: the first segment started from the initial state) and d = Σ Δ·A from the segment's start to the
    block's start,
      y_t += exp(d + cs_t) S_in C_t   (ypre as it is, the output times silu(z_t)).
    The first block of each segment stores S_in (seg_in, (b·h, segments, P, N)), which the block backward
    adds to its segment-local entering state as exp(d) S_in; the last block stores the final state."""
    k = seg_blocks + tl.program_id(0)
    bh = tl.program_id(1)
    b, hh, gg = _head(bh, nheads, heads_per_group)
    nblocks = tl.cdiv(seqlen, BLOCK_T)
    nseg = tl.cdiv(nblocks, seg_blocks)
    seg = k // seg_blocks
    offs_t = tl.arange(0, BLOCK_T)
    offs_n = tl.arange(0, BLOCK_N)
    offs_p, mask_p, state_off, mask_np = _state_slice(offs_n, headdim, dstate, 0, BLOCK_P)  # all of P
    decay_row = seg_decay_ptr + bh.to(tl.int64) * (nblocks + nseg)
    seg_rows = bh.to(tl.int64) * nseg * headdim * dstate
    S_in = tl.zeros((BLOCK_N, BLOCK_P), dtype=tl.float32)
    for j in range(seg):
        S_in = S_in * tl.exp(tl.load(decay_row + nblocks + j)) + tl.load(
            seg_final_ptr + seg_rows + j * headdim * dstate + state_off, mask=mask_np, other=0.0)
    here = seg_rows + seg * headdim * dstate + state_off
    if k % seg_blocks == 0:
        tl.store(seg_in_ptr + here, S_in, mask=mask_np)
    if STORE_FINAL:
        if k == nblocks - 1:
            final = S_in * tl.exp(tl.load(decay_row + nblocks + seg)) + tl.load(seg_final_ptr + here, mask=mask_np,
                                                                                  other=0.0)
            tl.store(final_ptr + bh.to(tl.int64) * headdim * dstate + state_off, final, mask=mask_np)

    t = k * BLOCK_T + offs_t
    mask_t = t < seqlen
    mask_tp = mask_t[:, None] & mask_p[None, :]
    A, bias = _head_params(A_ptr, dt_bias_ptr, hh, HAS_DT_BIAS)
    _, _, cs, _ = _block_dt(dt_ptr + b * s_dt_b + hh * s_dt_h + t * s_dt_l, mask_t, bias, A, BLOCK_T, DT_SOFTPLUS)
    Ct = tl.load(C_ptr + b * s_C_b + gg * s_C_g + t[:, None] * s_C_l + offs_n[None, :],
                 mask=mask_t[:, None] & (offs_n < dstate)[None, :], other=0.0)  # (T, N)
    corr = _dot(Ct, S_in.to(Ct.dtype)) * tl.exp(tl.load(decay_row + k) + cs)[:, None]  # (T, P)
    o_off = (b * seqlen * nheads + hh) * headdim + t[:, None] * nheads * headdim + offs_p[None, :]
    if HAS_Z:
        if STORE_YPRE:
            ypre = tl.load(ypre_ptr + o_off, mask=mask_tp, other=0.0).to(tl.float32)
            tl.store(ypre_ptr + o_off, ypre + corr, mask=mask_tp)
        zt = tl.load(z_ptr + b * s_z_b + hh * s_z_h + t[:, None] * s_z_l + offs_p[None, :], mask=mask_tp,
                     other=0.0).to(tl.float32)
        corr = corr * zt * tl.sigmoid(zt)
    tl.store(out_ptr + o_off, tl.load(out_ptr + o_off, mask=mask_tp, other=0.0).to(tl.float32) + corr, mask=mask_tp)


@fast_launch
@_autotune(_FUSED_CONFIGS, key=_FUSED_KEY)
@triton.jit
def _fused_dstate_bwd_kernel(
    dout_ptr, z_ptr, dt_ptr, A_ptr, dt_bias_ptr, C_ptr, dfinal_ptr, dstates_ptr, dinit_ptr, seg_gfirst_ptr,
    seqlen, nheads, headdim, dstate, heads_per_group, seg_blocks,
    s_z_b, s_z_l, s_z_h, s_dt_b, s_dt_l, s_dt_h, s_C_b, s_C_l, s_C_g,
    HAS_Z: tl.constexpr, HAS_DT_BIAS: tl.constexpr, DT_SOFTPLUS: tl.constexpr, HAS_DFINAL: tl.constexpr,
    HAS_INIT: tl.constexpr, SEGMENTED: tl.constexpr, BLOCK_T: tl.constexpr, BLOCK_P: tl.constexpr,
    BLOCK_N: tl.constexpr,
):
    """The only sequential part of the backward: the blocks in reverse, G = ∂L/∂(state leaving the block)
    carried in registers and stored for every block ((b·h, blocks, P, N), like the forward's states):
      G ← exp(cs_end) G + Σ_t exp(cs_t) dy_t C_tᵀ   (dy = dout·silu(z)); what is left is the initial state's.
    Like the forward, a program may take a slice of P. SEGMENTED: as in the forward, each segment walks its
    blocks from G = 0 (the last one from the final state's gradient) and stores what is left at its start
    (seg_gfirst, (b·h, segments, P, N) fp32); the block backward adds what the later segments contribute and
    writes the initial state's gradient."""
    bh = tl.program_id(0)
    b, hh, gg = _head(bh, nheads, heads_per_group)
    nblocks = tl.cdiv(seqlen, BLOCK_T)
    seg, k_first, k_end = _segment_blocks(nblocks, seg_blocks, SEGMENTED)
    offs_t = tl.arange(0, BLOCK_T)
    offs_n = tl.arange(0, BLOCK_N)
    offs_p, mask_p, state_off, mask_np = _state_slice(offs_n, headdim, dstate, tl.program_id(1), BLOCK_P)
    A, bias = _head_params(A_ptr, dt_bias_ptr, hh, HAS_DT_BIAS)
    head_state = bh.to(tl.int64) * headdim * dstate
    Gt = _load_state(dfinal_ptr + head_state + state_off, mask_np, BLOCK_N, BLOCK_P, HAS_DFINAL)  # Gᵀ (N, P)
    if SEGMENTED:
        Gt = tl.where(seg == tl.num_programs(2) - 1, Gt, 0.0)  # earlier segments start from zero
    z_base = b * s_z_b + hh * s_z_h
    dt_base = dt_ptr + b * s_dt_b + hh * s_dt_h
    C_base = C_ptr + b * s_C_b + gg * s_C_g
    o_base = (b * seqlen * nheads + hh) * headdim
    st_base = dstates_ptr + bh.to(tl.int64) * nblocks * headdim * dstate
    for i in range(k_end - k_first):
        k = k_end - 1 - i
        tl.store(st_base + k * headdim * dstate + state_off, Gt.to(dstates_ptr.dtype.element_ty), mask=mask_np)
        t = k * BLOCK_T + offs_t
        mask_t = t < seqlen
        mask_tp = mask_t[:, None] & mask_p[None, :]
        _, _, cs, cs_end = _block_dt(dt_base + t * s_dt_l, mask_t, bias, A, BLOCK_T, DT_SOFTPLUS)
        dy = _gated_grad(dout_ptr, z_ptr, o_base + t[:, None] * nheads * headdim + offs_p[None, :],
                         z_base + t[:, None] * s_z_l + offs_p[None, :], mask_tp, HAS_Z)  # (T, P)
        Ct = tl.load(C_base + t[:, None] * s_C_l + offs_n[None, :], mask=mask_t[:, None] & (offs_n[None, :] < dstate),
                     other=0.0)  # (T, N)
        Gt = Gt * tl.exp(cs_end) + _dot(tl.trans((Ct * tl.exp(cs)[:, None]).to(Ct.dtype)), dy.to(Ct.dtype))
    if SEGMENTED:
        tl.store(seg_gfirst_ptr + (bh.to(tl.int64) * tl.num_programs(2) + seg) * headdim * dstate + state_off, Gt,
                 mask=mask_np)
    elif HAS_INIT:
        tl.store(dinit_ptr + head_state + state_off, Gt, mask=mask_np)


@fast_launch
@_autotune(_FUSED_CONFIGS, key=_FUSED_KEY)
@triton.jit
def _fused_block_bwd_kernel(
    x_ptr, dt_ptr, A_ptr, dt_bias_ptr, B_ptr, C_ptr, D_ptr, z_ptr, dout_ptr, ypre_ptr, states_ptr, dstates_ptr,
    seg_decay_ptr, seg_in_ptr, seg_gfirst_ptr, dinit_ptr, dx_ptr, dz_ptr, ddt_ptr, dB_ptr, dC_ptr, part_ptr,
    seqlen, nheads, headdim, dstate, heads_per_group, seg_blocks,
    s_x_b, s_x_l, s_x_h, s_z_b, s_z_l, s_z_h, s_dt_b, s_dt_l, s_dt_h,
    s_B_b, s_B_l, s_B_g, s_C_b, s_C_l, s_C_g,
    HAS_D: tl.constexpr, D_PER_P: tl.constexpr, HAS_Z: tl.constexpr, HAS_DT_BIAS: tl.constexpr,
    DT_SOFTPLUS: tl.constexpr, SEGMENTED: tl.constexpr, HAS_INIT: tl.constexpr, BLOCK_T: tl.constexpr,
    BLOCK_P: tl.constexpr, BLOCK_N: tl.constexpr,
):
    """One block of one head, independent of the others once S (entering state, from the forward) and
    G (∂L/∂ state leaving, from `_fused_dstate_bwd_kernel`) are known. With dy = dout·silu(z),
    L_ts = exp(cs_t − cs_s) for s ≤ t and M = (C Bᵀ) ∘ L:
      u_s  = Σ_{t ≥ s} M_ts dy_t + exp(cs_end − cs_s) G B_s,     dx_s = Δ_s u_s + D dy_s
      dC_t = Σ_{s ≤ t} L_ts Δ_s (dy_t·x_s) B_s + exp(cs_t) Sᵀ dy_t
      dB_s = Δ_s [Σ_{t ≥ s} L_ts (dy_t·x_s) C_t + exp(cs_end − cs_s) Gᵀ x_s]
    dB and dC are per head ((b, l, h, n)); the launcher sums a group's heads. ∂L/∂(Δ_r A) sums the pairs
    that straddle r (as `_dt_bwd_kernel` explains): with Q_ts = M_ts Δ_s (dy_t·x_s) for s < t,
      ∂L/∂(Δ_r A) = exp(cs_end)⟨G, S⟩ + Σ_{t ≥ r}(Σ_{s < t} Q_ts + exp(cs_t) C_t·(Sᵀ dy_t) − Σ_{t' > t} Q_t't)
                    + Σ_{s < r} Δ_s exp(cs_end − cs_s) x_s·(G B_s).
    part: (h, b, blocks, 2 + P) fp32 rows of [dA, d dt_bias, dD…] summed over the block (dD: P entries, or
    one for a scalar D per head)."""
    k = tl.program_id(0)
    bh = tl.program_id(1)
    nblocks = tl.num_programs(0)
    b, hh, gg = _head(bh, nheads, heads_per_group)
    offs_t = tl.arange(0, BLOCK_T)
    offs_p = tl.arange(0, BLOCK_P)
    offs_n = tl.arange(0, BLOCK_N)
    mask_p = offs_p < headdim
    mask_n = offs_n < dstate
    mask_pn = mask_p[:, None] & mask_n[None, :]
    t0 = k * BLOCK_T
    t = t0 + offs_t
    mask_t = t < seqlen
    mask_tp = mask_t[:, None] & mask_p[None, :]
    mask_tn = mask_t[:, None] & mask_n[None, :]
    # Scalar int64 bases, int32 tile offsets: fewer registers than int64 offset tiles.
    tok = b * seqlen + t0  # first token of the block in (b, l)
    x_blk = x_ptr + b * s_x_b + t0 * s_x_l + hh * s_x_h
    B_blk = B_ptr + b * s_B_b + t0 * s_B_l + gg * s_B_g
    C_blk = C_ptr + b * s_C_b + t0 * s_C_l + gg * s_C_g
    tp_off = offs_t[:, None] * (nheads * headdim) + offs_p[None, :]  # dout, ypre, dx, dz: contiguous (b, l, h, p)
    tn_off = offs_t[:, None] * (nheads * dstate) + offs_n[None, :]  # dB, dC per head: contiguous (b, l, h, n)
    o_blk = tok * nheads * headdim + hh * headdim
    bc_blk = tok * nheads * dstate + hh * dstate
    st_blk = (bh.to(tl.int64) * nblocks + k) * headdim * dstate
    pn_off = offs_p[:, None] * dstate + offs_n[None, :]

    A, bias = _head_params(A_ptr, dt_bias_ptr, hh, HAS_DT_BIAS)
    raw, dt, cs, cs_end = _block_dt(dt_ptr + b * s_dt_b + hh * s_dt_h + t * s_dt_l, mask_t, bias, A, BLOCK_T,
                                    DT_SOFTPLUS)
    decay_end = tl.exp(cs_end - cs)  # (T,)
    x = tl.load(x_blk + offs_t[:, None] * s_x_l + offs_p[None, :], mask=mask_tp, other=0.0)  # (T, P)
    Bt = tl.load(B_blk + offs_t[:, None] * s_B_l + offs_n[None, :], mask=mask_tn, other=0.0)  # (T, N)
    Ct = tl.load(C_blk + offs_t[:, None] * s_C_l + offs_n[None, :], mask=mask_tn, other=0.0)  # (T, N)
    S = tl.load(states_ptr + st_blk + pn_off, mask=mask_pn, other=0.0)  # (P, N), the state entering the block
    if SEGMENTED:  # the forward stored it segment-local: add what entered the segment (`_fused_fwd_fix_kernel`)
        nseg = tl.cdiv(nblocks, seg_blocks)
        seg = k // seg_blocks
        # seg_in holds nothing for the first segment, whose blocks (half, or more) then read no more memory.
        S_in = tl.load(seg_in_ptr + (bh.to(tl.int64) * nseg + seg) * headdim * dstate + pn_off,
                       mask=mask_pn & ((pn_off * 0 + seg) > 0), other=0.0)
        decay_row = seg_decay_ptr + bh.to(tl.int64) * (nblocks + nseg)  # Σ Δ·A before each block, then a segment
        decay_in = tl.exp(tl.load(decay_row + k))
        S = (S.to(tl.float32) + decay_in * S_in).to(S.dtype)  # in the stored dtype, as the unsplit forward has it
    G = tl.load(dstates_ptr + st_blk + pn_off, mask=mask_pn, other=0.0)  # (P, N), ∂L/∂ the state leaving it
    if SEGMENTED:  # so was G (`_fused_dstate_bwd_kernel`): add what the later segments send back
        seg_sums = decay_row + nblocks  # Σ Δ·A over each segment
        seg_rows = seg_gfirst_ptr + bh.to(tl.int64) * nseg * headdim * dstate + pn_off
        G_in = tl.zeros((BLOCK_P, BLOCK_N), dtype=tl.float32)  # ∂L/∂ the state leaving this segment
        for i in range(nseg - 1 - seg):
            j = nseg - 1 - i
            G_in = G_in * tl.exp(tl.load(seg_sums + j)) + tl.load(seg_rows + j * headdim * dstate, mask=mask_pn,
                                                                  other=0.0)
        # exp(Σ Δ·A from this block's end to its segment's end) = exp(segment − before this block − this block)
        to_end = tl.exp(tl.load(seg_sums + seg) - tl.load(decay_row + k) - cs_end)
        G = (G.to(tl.float32) + to_end * G_in).to(G.dtype)
        if HAS_INIT:
            if k == 0:
                dinit = tl.load(seg_rows, mask=mask_pn, other=0.0) + tl.exp(tl.load(seg_sums)) * G_in
                tl.store(dinit_ptr + bh.to(tl.int64) * headdim * dstate + pn_off, dinit, mask=mask_pn)
    dda = tl.exp(cs_end) * tl.sum(tl.sum(G.to(tl.float32) * S.to(tl.float32), axis=1), axis=0)
    dy = tl.load(dout_ptr + o_blk + tp_off, mask=mask_tp, other=0.0).to(tl.float32)  # (T, P)
    if HAS_Z:
        zt = tl.load(z_ptr + b * s_z_b + t0 * s_z_l + hh * s_z_h + offs_t[:, None] * s_z_l + offs_p[None, :],
                     mask=mask_tp, other=0.0).to(tl.float32)
        sig = tl.sigmoid(zt)
        ypre = tl.load(ypre_ptr + o_blk + tp_off, mask=mask_tp, other=0.0).to(tl.float32)
        tl.store(dz_ptr + o_blk + tp_off, dy * ypre * sig * (1.0 + zt * (1.0 - sig)), mask=mask_tp)
        dy = dy * zt * sig
    dyc = dy.to(x.dtype)
    batch = tl.num_programs(1) // nheads
    part = part_ptr + ((hh * batch + b) * nblocks + k) * (2 + headdim)  # head-major: one head's rows together
    if HAS_D:
        dD = tl.sum(dy * x.to(tl.float32), axis=0)  # (P,)
        if D_PER_P:
            tl.store(part + 2 + offs_p, dD, mask=mask_p)
        else:
            tl.store(part + 2, tl.sum(dD))
        dy_skip = dy * _load_D(D_ptr, hh, headdim, offs_p, mask_p, D_PER_P)

    # Token pairs inside the block. Ordered so that few (T, T) tiles are alive at once.
    decay = tl.exp(tl.where(offs_t[:, None] >= offs_t[None, :], cs[:, None] - cs[None, :], float("-inf")))  # L
    m = _dot(Ct, tl.trans(Bt)) * decay  # (T, T) M_ts = (C_t·B_s) L_ts
    dyx = _dot(dyc, tl.trans(x))  # (T, T) dy_t·x_s
    q = tl.where(offs_t[:, None] > offs_t[None, :], m * dyx * dt[None, :], 0.0)  # (T, T) Q_ts
    dcs = tl.sum(q, axis=1) - tl.sum(q, axis=0)
    bg = _dot(Bt, tl.trans(G).to(Bt.dtype))  # (T, P) G B_s
    u = _dot(tl.trans(m).to(x.dtype), dyc) + bg * decay_end[:, None]  # (T, P)
    xf = x.to(tl.float32)
    w = dt * decay_end * tl.sum(xf * bg, axis=1)
    ddt = tl.sum(xf * u, axis=1)
    dx = u * dt[:, None]
    if HAS_D:
        dx += dy_skip
    tl.store(dx_ptr + o_blk + tp_off, dx, mask=mask_tp)

    dyx = dyx * decay  # L_ts (dy_t·x_s)
    dys = _dot(dyc, S.to(x.dtype)) * tl.exp(cs)[:, None]  # (T, N) exp(cs_t) Sᵀ dy_t
    dcs += tl.sum(Ct.to(tl.float32) * dys, axis=1)
    dC = _dot((dyx * dt[None, :]).to(Bt.dtype), Bt) + dys
    tl.store(dC_ptr + bc_blk + tn_off, dC, mask=mask_tn)
    dB = (_dot(tl.trans(dyx).to(Ct.dtype), Ct) + _dot(x, G.to(x.dtype)) * decay_end[:, None]) * dt[:, None]
    tl.store(dB_ptr + bc_blk + tn_off, dB, mask=mask_tn)

    dda += tl.cumsum(dcs, axis=0, reverse=True) + (tl.cumsum(w, axis=0) - w)  # ∂L/∂(Δ_r A)
    ddt += dda * A
    if DT_SOFTPLUS:
        ddt = tl.where(raw > 20.0, ddt, ddt * tl.sigmoid(raw))
    ddt = tl.where(mask_t, ddt, 0.0)
    tl.store(ddt_ptr + (tok + offs_t) * nheads + hh, ddt, mask=mask_t)  # ddt: contiguous (b, l, h)
    tl.store(part, tl.sum(dda * dt))
    tl.store(part + 1, tl.sum(ddt))


@fast_launch
@triton.jit
def _fused_bwd_sums_kernel(
    dB_head_ptr, dC_head_ptr, dB_ptr, dC_ptr, part_ptr, dA_ptr, dbias_ptr, dD_ptr,
    rows, part_rows, headdim, dstate, heads_per_group, bc_programs,
    HAS_D: tl.constexpr, D_PER_P: tl.constexpr, HAS_DT_BIAS: tl.constexpr,
    BLOCK_R: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_C: tl.constexpr,
):
    """What `_fused_block_bwd_kernel` leaves as partial sums, summed in one launch (each torch call it
    replaces costs the host about as much as a launch):
      programs [0, bc_programs): dB and dC per head, (rows, heads_per_group, N) each with rows = b·l·g,
        summed over the group's heads into (rows, N) in the output dtype;
      the next h programs, one a head: its part_rows = b·blocks rows of part (h, b, blocks, 2 + P) summed
        into dA, d dt_bias and dD, each stored in its own dtype."""
    pid = tl.program_id(0)
    # The branches name their tiles apart: compiled, an `if` may not bind one name to two tile shapes.
    if pid < bc_programs:
        offs_r = pid * BLOCK_R + tl.arange(0, BLOCK_R)
        offs_n = tl.arange(0, BLOCK_N)
        mask_rn = (offs_r < rows)[:, None] & (offs_n < dstate)[None, :]
        src = offs_r[:, None].to(tl.int64) * heads_per_group * dstate + offs_n[None, :]
        db = tl.zeros((BLOCK_R, BLOCK_N), dtype=tl.float32)
        dc = tl.zeros((BLOCK_R, BLOCK_N), dtype=tl.float32)
        for j in range(heads_per_group):
            db += tl.load(dB_head_ptr + src + j * dstate, mask=mask_rn, other=0.0).to(tl.float32)
            dc += tl.load(dC_head_ptr + src + j * dstate, mask=mask_rn, other=0.0).to(tl.float32)
        dst = offs_r[:, None].to(tl.int64) * dstate + offs_n[None, :]
        tl.store(dB_ptr + dst, db, mask=mask_rn)
        tl.store(dC_ptr + dst, dc, mask=mask_rn)
    else:
        hh = pid - bc_programs
        offs_k = tl.arange(0, BLOCK_K)
        offs_c = tl.arange(0, BLOCK_C)
        mask_c = offs_c < 2 + headdim
        acc = tl.zeros((BLOCK_K, BLOCK_C), dtype=tl.float32)
        rows_h = part_ptr + hh.to(tl.int64) * part_rows * (2 + headdim)
        for k0 in range(0, part_rows, BLOCK_K):
            mask = ((k0 + offs_k) < part_rows)[:, None] & mask_c[None, :]
            acc += tl.load(rows_h + (k0 + offs_k)[:, None] * (2 + headdim) + offs_c[None, :], mask=mask, other=0.0)
        col = tl.sum(acc, axis=0)  # (C,): [dA, d dt_bias, dD…]
        tl.store(dA_ptr + hh, tl.sum(tl.where(offs_c == 0, col, 0.0)))
        if HAS_DT_BIAS:
            tl.store(dbias_ptr + hh, tl.sum(tl.where(offs_c == 1, col, 0.0)))
        if HAS_D:
            if D_PER_P:
                tl.store(dD_ptr + hh * headdim + offs_c - 2, col, mask=(offs_c >= 2) & mask_c)
            else:
                tl.store(dD_ptr + hh, tl.sum(tl.where(offs_c == 2, col, 0.0)))


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


def _pow2(v: int, lo: int = _MIN_DOT) -> int:
    return max(lo, next_pow2(v))


def _cast(t: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    # `t.to(dtype)` returns t itself when the dtype matches, but still pays a dispatch (~5 µs of host
    # time here); a forward+backward on either path makes several.
    return t if t.dtype == dtype else t.to(dtype)


@functools.cache  # asked on every call (`_use_fused`) and in `_ssd_bwd`'s split loop
def _num_sms(device: torch.device) -> int:
    if device.type == "cuda":
        return torch.cuda.get_device_properties(device).multi_processor_count
    return 4  # interpreter: small, so that tiny test shapes still split heads across programs


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
    numel = headdim * dstate
    BLOCK = min(256, next_pow2(numel))
    _state_passing_kernel[(cdiv(numel, BLOCK), batch * nheads)](
        states, cs, init if init is not None else states, final if final is not None else states,
        seqlen, nheads, nchunks, chunk_size, numel,
        REVERSE=False, HAS_INIT=init is not None, HAS_FINAL=final is not None, BLOCK=BLOCK,
        num_warps=2,
    )
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
    numel = headdim * dstate
    BLOCK = min(256, next_pow2(numel))
    _state_passing_kernel[(cdiv(numel, BLOCK), batch * nheads)](
        dstates, cs, dfin if dfin is not None else dstates, dinit if dinit is not None else dstates,
        seqlen, nheads, nchunks, chunk_size, numel,
        REVERSE=True, HAS_INIT=dfin is not None, HAS_FINAL=dinit is not None, BLOCK=BLOCK,
        num_warps=2,
    )

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


# Which path `ssd_scan_triton` takes: "auto" asks `_use_fused`; "fused" and "chunked" force one (for tests and
# benchmarks).
PATH = "auto"
_FUSED_T = 16 if INTERPRET else 64  # tokens a block on the fused path
# A P slice of the sequential fused kernels is only ever the narrow (column) side of their matrix products
# (states held as (N, P)), never their rows or inner dimension, the tile shapes of the Hopper miscompile
# noted at _MIN_DOT.
_MIN_SLICE = 16 if INTERPRET else 32
_SUM_ROWS = 16 if INTERPRET else 64  # (b, l, g) rows a program of `_fused_bwd_sums_kernel` sums dB, dC over


# The largest states, P·N with each padded to a power of two, whose kernels fit in a Hopper block's 227 KB of
# shared memory, by input element size; their matrix products keep (T, N), (T, P) and (P, N) operands there.
# Compiled for sm_90 here (triton 3.9; triton 3.6 on an H200 asked ~13% more, 278 KB where 3.9 asks 246):
# - fused: the backward's block kernel, 8 warps, P = 64: fp32 147 KB at N = 64 and 246 KB at N = 128 (an H200
#   refused it); bf16 94 KB at N = 128, 160 KB at N = 256 and 147 KB at (P, N) = (128, 128);
# - chunked: the largest of its kernels, in the autotuner's smallest config: fp32 176 KB at (P, N) = (64, 128)
#   and (128, 64), 224-256 KB at 16,384 entries; bf16 144 KB at (64, 512) and 112 KB at (128, 256).
# GPUs with less shared memory a block (an A100 has 163 KB) fit less; these limits are the H100/H200's.
_FUSED_MAX_STATE = {2: 128 * 128, 4: 64 * 64}
_CHUNKED_MAX_STATE = {2: 64 * 512, 4: 64 * 128}


@functools.cache  # asked on every call: the fused path's check in the forward, the chunked one twice
def _state_fits(dtype: torch.dtype, headdim: int, dstate: int, fused: bool) -> bool:
    limits = _FUSED_MAX_STATE if fused else _CHUNKED_MAX_STATE
    return _pow2(headdim) * _pow2(dstate) <= limits.get(dtype.itemsize, 0)


def _fused_fits(x: torch.Tensor, dstate: int) -> bool:
    """Whether the fused kernels fit in shared memory for x (b, l, h, p)'s dtype and the state size (the
    interpreter has no limit)."""
    return INTERPRET or _state_fits(x.dtype, x.shape[3], dstate, True)


def unsupported(x: torch.Tensor, dstate: int) -> str | None:
    """Why the Triton SSD cannot take x (b, l, h, p) with this state size, or None when it can: no path's
    kernels fit the state in shared memory (the interpreter has no limit)."""
    if INTERPRET or _state_fits(x.dtype, x.shape[3], dstate, False):
        return None
    limit = _CHUNKED_MAX_STATE.get(x.element_size(), 0)
    if not limit:
        return f"x.dtype={x.dtype}: the Triton SSD takes float32, bfloat16 or float16"
    fixes = "bf16 or fp16 inputs, a smaller state" if x.element_size() == 4 else "a smaller state"
    return (f"headdim={x.shape[3]}, d_state={dstate} in {x.dtype}: the Triton SSD holds the (headdim, d_state) "
            f"state in shared memory, up to {limit:,} entries (each size rounded up to a power of two) for this "
            f"dtype; use {fixes}, or backend='torch'")


def _use_fused(shape: tuple[int, ...], device: torch.device, for_backward: bool) -> bool:
    """Fused or chunked for x of `shape` (b, l, h, p), from how many programs the fused kernels run. Measured on
    an H200 (132 SMs), bf16, graphed (BENCHMARKS.md, "v10"):
    - the forward alone: from b·h ≥ SMs. Below, the chunked forward wins even against segments: 0.76 against
      0.89 ms at (2, 16384, 32, 64, 128), 0.40 against 0.48 at b = 1; above, the fused one (0.46 ms at
      (4, 4096, 64, 64, 128), b·h = 256; chunked 0.93 in v8);
    - forward+backward: once the sequential kernels' programs (b·h, times P slices, times segments) fill 3/4 of
      the SMs. With 128 or more the fused path won at every shape timed: (1, 16384, 32, 64, 128) 1.44 against
      1.84 ms, (1, 8192, 16, 64, 128) 0.47 against 0.54, (8, 1024, 8, 64, 64) 0.16 against 0.19; with 32 it
      lost at every one: 0.22 against 0.12 ms at (1, 4096, 8, 64, 64), and v8's 64 (one segment) lost 2.26
      against 2.12."""
    if PATH != "auto":
        return PATH == "fused"
    batch, seqlen, nheads, headdim = shape
    sms = _num_sms(device)
    if not for_backward:
        return batch * nheads >= sms
    _, programs, segments = _fused_split(batch * nheads, headdim, cdiv(seqlen, _FUSED_T), device)
    return programs * segments >= sms * 3 // 4


@functools.cache  # asked twice a forward+backward
def _fused_block_p(bh: int, headdim: int, device: torch.device) -> int:
    """Columns of P a program of the two sequential fused kernels takes. The whole of P, unless b·h
    programs leave multiprocessors idle: then P is halved until they are busy or the slice reaches
    _MIN_SLICE. The slices recompute C Bᵀ and Δ each, but every program's chain of blocks gets shorter
    steps, and it is the chain's latency, not the arithmetic, that sets the time at small b·h (the
    fused forward at l = 16384, h = 32, p = 64, n = 128: 1.37 ms at b·h = 64, 0.44 at 256 on an H200)."""
    block_p, sms = _pow2(headdim), _num_sms(device)
    while bh * cdiv(headdim, block_p) < sms and block_p // 2 >= _MIN_SLICE:
        block_p //= 2
    return block_p


_MIN_SEGMENT = 4 if INTERPRET else 32  # blocks: shorter segments would spend more on the correction than they save


def _fused_segments(programs: int, nblocks: int, device: torch.device) -> int:
    """Segments the fused forward splits each sequence into: enough for two programs an SM (they share one at
    ~12% cost, v9), each at least _MIN_SEGMENT blocks long. A program's time is its chain of blocks, so at
    (2, 16384, 32, 64, 128) (128 programs, 256 blocks) two segments should halve the forward's chain."""
    return max(1, min(2 * _num_sms(device) // programs, nblocks // _MIN_SEGMENT))


def _fused_split(bh: int, headdim: int, nblocks: int, device: torch.device) -> tuple[int, int, int]:
    """How the sequential fused kernels split their work: the P slice width, the programs over b·h and P
    slices, and the segments each sequence is asked to split into."""
    block_p = _fused_block_p(bh, headdim, device)
    programs = bh * cdiv(headdim, block_p)
    return block_p, programs, _fused_segments(programs, nblocks, device)


def _fused_strides(x, zz, dt, B, C) -> tuple[int, ...]:
    """The stride arguments of `_fused_fwd_kernel` and `_fused_block_bwd_kernel`, in their order (x, z, B
    and C have unit stride on the last axis, which `ssd_scan_triton` ensures)."""
    return (*x.stride()[:3], *zz.stride()[:3], *dt.stride(), *B.stride()[:3], *C.stride()[:3])


def _zdtc_strides(zz, dt, C) -> tuple[int, ...]:
    """The stride arguments of the kernels that read only z, dt and C (`_fused_fwd_fix_kernel`,
    `_fused_dstate_bwd_kernel`), in their order."""
    return (*zz.stride()[:3], *dt.stride(), *C.stride()[:3])


def _fused_fwd(x, dt, A, B, C, D, z, dt_bias, initial_states, dt_softplus, store_final, for_backward):
    """Returns out (b, l, h, p), final state or None, and what `_fused_bwd` needs."""
    batch, seqlen, nheads, headdim = x.shape
    ngroups, dstate = B.shape[2], B.shape[3]
    bh, nblocks = batch * nheads, cdiv(seqlen, _FUSED_T)
    out = torch.empty(batch, seqlen, nheads, headdim, device=x.device, dtype=x.dtype)
    ypre = torch.empty_like(out) if (for_backward and z is not None) else None
    # The entering state of every block; bf16 for bf16 inputs, as the forward rounds it so for C S.
    state_dtype = torch.bfloat16 if x.dtype == torch.bfloat16 else torch.float32
    states = None
    if for_backward:
        states = torch.empty(bh, nblocks, headdim, dstate, device=x.device, dtype=state_dtype)
    final = torch.empty(batch, nheads, headdim, dstate, device=x.device, dtype=torch.float32) if store_final else None
    init = initial_states.contiguous() if initial_states is not None else None
    zz = z if z is not None else x
    block_p, _, segments = _fused_split(bh, headdim, nblocks, x.device)
    seg_blocks = cdiv(nblocks, segments)
    nseg = cdiv(nblocks, seg_blocks)
    seg_decay = seg_final = seg_in = None
    if nseg > 1:
        f32 = dict(device=x.device, dtype=torch.float32)
        seg_decay = torch.empty(bh, nblocks + nseg, **f32)
        seg_final = torch.empty(bh, nseg, headdim, dstate, **f32)
        seg_in = torch.empty(bh, nseg, headdim, dstate, **f32)
    _fused_fwd_kernel[(bh, cdiv(headdim, block_p), nseg)](
        x, dt, A, dt_bias if dt_bias is not None else A, B, C, D if D is not None else A, zz,
        init if init is not None else x, out, ypre if ypre is not None else out,
        states if states is not None else out, final if final is not None else out,
        seg_decay if seg_decay is not None else out, seg_final if seg_final is not None else out,
        seqlen, nheads, headdim, dstate, nheads // ngroups, seg_blocks, *_fused_strides(x, zz, dt, B, C),
        HAS_D=D is not None, D_PER_P=D is not None and D.dim() == 2, HAS_Z=z is not None,
        HAS_DT_BIAS=dt_bias is not None, DT_SOFTPLUS=dt_softplus, HAS_INIT=init is not None,
        STORE_STATES=states is not None, STORE_FINAL=final is not None and nseg == 1,
        STORE_YPRE=ypre is not None, SEGMENTED=nseg > 1, BLOCK_T=_FUSED_T, BLOCK_P=block_p, BLOCK_N=_pow2(dstate),
    )
    if nseg > 1:
        _fused_fwd_fix_kernel[(nblocks - seg_blocks, bh)](
            dt, A, dt_bias if dt_bias is not None else A, C, zz, out, ypre if ypre is not None else out,
            final if final is not None else out, seg_decay, seg_final, seg_in,
            seqlen, nheads, headdim, dstate, nheads // ngroups, seg_blocks,
            *_zdtc_strides(zz, dt, C),
            HAS_Z=z is not None, HAS_DT_BIAS=dt_bias is not None, DT_SOFTPLUS=dt_softplus,
            STORE_FINAL=final is not None, STORE_YPRE=ypre is not None,
            BLOCK_T=_FUSED_T, BLOCK_P=_pow2(headdim), BLOCK_N=_pow2(dstate), num_warps=4,
        )
    return out, final, (states, ypre, seg_decay, seg_in)


def _fused_bwd(dout, dfinal, x, dt, A, B, C, D, z, dt_bias, dt_softplus, has_init, saved):
    """Gradients for x, dt, A, B, C, D, z, dt_bias, initial_states (None where the input was None)."""
    states, ypre, seg_decay, seg_in = saved
    batch, seqlen, nheads, headdim = x.shape
    ngroups, dstate = B.shape[2], B.shape[3]
    nblocks = states.shape[1]
    # the forward's seg_blocks, cdiv(nblocks, segments), back from the segment count: cdiv(n, cdiv(n, cdiv(n, s)))
    # == cdiv(n, s) for all n, s (saved holds tensors only)
    seg_blocks = cdiv(nblocks, seg_in.shape[1]) if seg_in is not None else nblocks
    hpg = nheads // ngroups
    dout = dout.contiguous()
    dfin = dfinal.contiguous() if dfinal is not None else None
    zz = z if z is not None else x
    blocks = dict(BLOCK_T=_FUSED_T, BLOCK_N=_pow2(dstate))
    flags = dict(HAS_Z=z is not None, HAS_DT_BIAS=dt_bias is not None, DT_SOFTPLUS=dt_softplus)
    d_flags = dict(HAS_D=D is not None, D_PER_P=D is not None and D.dim() == 2)
    bias_arg = dt_bias if dt_bias is not None else A

    dstates = torch.empty_like(states)
    dinit = torch.empty(batch, nheads, headdim, dstate, device=x.device, dtype=torch.float32) if has_init else None
    block_p = _fused_block_p(batch * nheads, headdim, x.device)
    nseg = seg_in.shape[1] if seg_in is not None else 1
    seg_gfirst = torch.empty_like(seg_in) if seg_in is not None else None
    _fused_dstate_bwd_kernel[(batch * nheads, cdiv(headdim, block_p), nseg)](
        dout, zz, dt, A, bias_arg, C, dfin if dfin is not None else dout, dstates,
        dinit if dinit is not None else dstates, seg_gfirst if seg_gfirst is not None else dstates,
        seqlen, nheads, headdim, dstate, hpg, seg_blocks, *_zdtc_strides(zz, dt, C),
        **flags, HAS_DFINAL=dfin is not None, HAS_INIT=has_init, SEGMENTED=nseg > 1, **blocks, BLOCK_P=block_p,
    )

    dx = torch.empty(batch, seqlen, nheads, headdim, device=x.device, dtype=x.dtype)
    dz = torch.empty_like(dx) if z is not None else None
    ddt = torch.empty(batch, seqlen, nheads, device=x.device, dtype=dt.dtype)
    # dB and dC per head, (b, l, h, n) each, summed over a group's heads below: fp32 unless they are final
    # (one head a group) or bf16, whose 8-bit mantissa a few more roundings before the sum do not change.
    # Two tensors, not views of one: an `unbind` costs the host more than an allocation.
    head_bc = dict(device=x.device, dtype=B.dtype if hpg == 1 or B.dtype == torch.bfloat16 else torch.float32)
    dB_head = torch.empty(batch, seqlen, nheads, dstate, **head_bc)
    dC_head = torch.empty(batch, seqlen, nheads, dstate, **head_bc)
    part = torch.empty(nheads, batch, nblocks, 2 + headdim, device=x.device, dtype=torch.float32)
    _fused_block_bwd_kernel[(nblocks, batch * nheads)](
        x, dt, A, bias_arg, B, C, D if D is not None else A, zz, dout, ypre if ypre is not None else dout,
        states, dstates, seg_decay if seg_decay is not None else states, seg_in if seg_in is not None else states,
        seg_gfirst if seg_gfirst is not None else states, dinit if dinit is not None else states,
        dx, dz if dz is not None else dx, ddt, dB_head, dC_head, part,
        seqlen, nheads, headdim, dstate, hpg, seg_blocks, *_fused_strides(x, zz, dt, B, C),
        **flags, **d_flags, SEGMENTED=nseg > 1, HAS_INIT=has_init, **blocks, BLOCK_P=_pow2(headdim),
    )
    dA = torch.empty_like(A)
    dbias = torch.empty_like(dt_bias) if dt_bias is not None else None
    dD = torch.empty_like(D) if D is not None else None
    rows = batch * seqlen * ngroups
    bc_programs = 0
    dB, dC = dB_head, dC_head  # final when a group has one head
    if hpg > 1:  # dB, dC (b, l, g, n): the per-head partials summed below
        dB = torch.empty(batch, seqlen, ngroups, dstate, device=x.device, dtype=B.dtype)
        dC = torch.empty(batch, seqlen, ngroups, dstate, device=x.device, dtype=B.dtype)
        bc_programs = cdiv(rows, _SUM_ROWS)
    block_c = next_pow2(2 + headdim)  # a part row; tiles of 8,192 of them: one head's rows in few steps
    _fused_bwd_sums_kernel[(bc_programs + nheads,)](
        dB_head, dC_head, dB, dC, part, dA, dbias if dbias is not None else dA, dD if dD is not None else dA,
        rows, batch * nblocks, headdim, dstate, hpg, bc_programs,
        **d_flags, HAS_DT_BIAS=dt_bias is not None,
        BLOCK_R=_SUM_ROWS, BLOCK_N=next_pow2(dstate), BLOCK_K=max(16, 8192 // block_c), BLOCK_C=block_c,
    )
    return dx, ddt, dA, dB, dC, dD, dz, dbias, dinit


class _SSDScanFn(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, dt, A, B, C, chunk_size, D, z, dt_bias, initial_states, dt_softplus, return_final_states,
                for_backward):
        # Where the fused kernels would not fit in shared memory, the chunked path runs whatever PATH says.
        ctx.fused = _fused_fits(x, B.shape[3]) and _use_fused(x.shape, x.device, for_backward)
        if ctx.fused:
            out, final, saved = _fused_fwd(x, dt, A, B, C, D, z, dt_bias, initial_states, dt_softplus,
                                           store_final=return_final_states, for_backward=for_backward)
        else:
            out, final, saved = _ssd_fwd(
                x, dt, A, B, C, chunk_size, D, z, dt_bias, initial_states, dt_softplus,
                store_final=return_final_states, store_ypre=for_backward,
            )
        ctx.save_for_backward(x, dt, A, B, C, D, z, dt_bias, *saved)
        ctx.chunk_size, ctx.dt_softplus = chunk_size, dt_softplus
        ctx.has_init = initial_states is not None
        ctx.init_dtype = initial_states.dtype if initial_states is not None else None
        if return_final_states:
            return out, final
        return out

    @staticmethod
    def backward(ctx, dout, dfinal=None):
        x, dt, A, B, C, D, z, dt_bias, *saved = ctx.saved_tensors
        if ctx.fused:
            grads = _fused_bwd(dout, dfinal, x, dt, A, B, C, D, z, dt_bias, ctx.dt_softplus, ctx.has_init, saved)
        else:
            grads = _ssd_bwd(dout, dfinal, x, dt, A, B, C, ctx.chunk_size, D, z, dt_bias, ctx.dt_softplus,
                             ctx.has_init, saved)
        dx, ddt, dA, dB, dC, dD, dz, dbias, dinit = grads
        if dinit is not None:
            dinit = dinit.to(ctx.init_dtype)
        return dx, ddt, dA, dB, dC, None, dD, dz, dbias, dinit, None, None, None


def _check(name, t, shape):
    if tuple(t.shape) != tuple(shape):
        raise ValueError(f"{name}: shape {tuple(t.shape)}, expected {tuple(shape)}")


def ssd_scan_triton(x, dt, A, B, C, chunk_size, D=None, z=None, dt_bias=None, dt_softplus=False,
                    initial_states=None, return_final_states=False):
    """Chunked SSD scan, the Triton twin of `kernels.ssd.reference.ssd_scan_ref`.

    x, z:        (batch, seqlen, nheads, headdim)
    dt:          (batch, seqlen, nheads)
    A:           (nheads,)
    B, C:        (batch, seqlen, ngroups, dstate)
    D:           (nheads,) or (nheads, headdim)
    dt_bias:     (nheads,)
    initial_states: (batch, nheads, headdim, dstate)
    Returns y (batch, seqlen, nheads, headdim) in x.dtype, or (y, final_states fp32 (batch, nheads, headdim, dstate)).
    Internally fp32: Δ, the cumulative decays, the states, and every matrix product's accumulator.
    """
    if not (isinstance(chunk_size, int) and not isinstance(chunk_size, bool) and chunk_size > 0):
        raise ValueError(f"chunk_size={chunk_size!r}: must be a positive integer")
    batch, seqlen, nheads, headdim = x.shape
    ngroups, dstate = B.shape[2], B.shape[3]
    if nheads % ngroups:
        raise ValueError(f"ngroups={ngroups}: must divide nheads={nheads}")
    _check("dt", dt, (batch, seqlen, nheads))
    _check("A", A, (nheads,))
    _check("B", B, (batch, seqlen, ngroups, dstate))
    _check("C", C, (batch, seqlen, ngroups, dstate))
    if z is not None:
        _check("z", z, x.shape)
    if D is not None and tuple(D.shape) not in ((nheads,), (nheads, headdim)):
        raise ValueError(f"D: shape {tuple(D.shape)}, expected ({nheads},) or ({nheads}, {headdim})")
    if dt_bias is not None:
        _check("dt_bias", dt_bias, (nheads,))
    if initial_states is not None:
        _check("initial_states", initial_states, (batch, nheads, headdim, dstate))
    reason = unsupported(x, dstate)
    if reason:
        raise ValueError(reason)
    # Unit stride on the last axis keeps loads coalesced; B and C join x's dtype for the tensor cores.
    x, z, B, C = (t if t is None or t.stride(-1) == 1 else t.contiguous()
                  for t in (x, z, _cast(B, x.dtype), _cast(C, x.dtype)))
    D = D.contiguous() if D is not None else None
    tensors = (x, dt, A, B, C, D, z, dt_bias, initial_states)
    for_backward = torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in tensors)
    return _SSDScanFn.apply(x, dt, A, B, C, chunk_size, D, z, dt_bias, initial_states, dt_softplus,
                            return_final_states, for_backward)


def ssd_step_triton(state, x, dt, A, B, C, D=None, z=None, dt_bias=None, dt_softplus=False):
    """One decode step; updates `state` in place and returns y (batch, nheads, headdim) in x.dtype.

    state: (batch, nheads, headdim, dstate)    x, z: (batch, nheads, headdim)    dt: (batch, nheads)
    A: (nheads,)    B, C: (batch, ngroups, dstate)    D: (nheads,) or (nheads, headdim)    dt_bias: (nheads,)
    """
    batch, nheads, headdim = x.shape
    ngroups, dstate = B.shape[1], B.shape[2]
    if nheads % ngroups:
        raise ValueError(f"ngroups={ngroups}: must divide nheads={nheads}")
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
