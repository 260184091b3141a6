"""The SSD's fused path in Triton: one program walks a head's whole sequence, the state in registers.

Blocks of T = 64 tokens; 1 launch forward (2 when segmented), 3 backward:
  `_fused_fwd_kernel`         per b·h (and slice of P, when b·h programs would leave SMs idle): the
                              blocks in order, the state in registers; y, and every block's entering
                              state S for the backward.
  `_fused_dstate_bwd_kernel`  per b·h (and slice of P): the blocks in reverse, G (the gradient of the
                              state leaving each block) in registers; one matrix product a block.
  `_fused_block_bwd_kernel`   per (block, b·h), all independent: dx, dz, dΔ, per-head dB and dC, and
                              partial sums of dA, d dt_bias and dD.
  `_fused_bwd_sums_kernel`    dB and dC summed over a group's heads, and the partial sums reduced.
Few launches matter as much as fast kernels here: at workbench shapes a launch costs the host about as
much as the GPU time of a whole kernel. Symbols: `kernels.ssd.common`.
"""

import functools

import torch
import triton
import triton.language as tl

from kernels import cdiv, next_pow2
from kernels.jit import softplus_grad
from kernels.launch import INTERPRET, fast_launch
from kernels.ssd.common import (
    _autotune, _dot, _gated_grad, _head, _head_params, _load_D, _num_sms, _pow2, _process_dt,
)

# The sequential walks carry the state, or its gradient, in registers; everything else is one independent
# program per block. It is SSD with chunk T (the chunk size changes only rounding, not the function). Four or
# eight warps: with four the forward and block kernels spill more (`python -m bench.ssd_sass`) but two
# programs fit on a multiprocessor, and neither wins at every shape (BENCHMARKS.md), so the autotuner chooses.
_FUSED_CONFIGS = [triton.Config({}, num_warps=4, num_stages=2), triton.Config({}, num_warps=8, num_stages=2)]
# BLOCK_P too: the autotuner keys on these alone, and without it the first P slice timed would choose the
# warps for every other, which can double the time of the others (BENCHMARKS.md, SSD "v9").
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


@triton.jit
def _walk_program(seqlen, nheads, headdim, dstate, heads_per_group, seg_blocks, SEGMENTED: tl.constexpr,
                  BLOCK_T: tl.constexpr, BLOCK_P: tl.constexpr, BLOCK_N: tl.constexpr):
    """What a program of the two sequential kernels walks, from its grid index (b·h, P slice, segment): b·h,
    `_head`, the number of blocks, `_segment_blocks`, the T and N offsets, `_state_slice`, and where the head's
    (P, N) state starts in a (b·h, P, N) tensor."""
    bh = tl.program_id(0)
    b, hh, gg = _head(bh, nheads, heads_per_group)
    nblocks = tl.cdiv(seqlen, BLOCK_T)
    seg, k_first, k_end = _segment_blocks(nblocks, seg_blocks, SEGMENTED)
    offs_t = tl.arange(0, BLOCK_T)
    offs_n = tl.arange(0, BLOCK_N)
    offs_p, mask_p, state_off, mask_np = _state_slice(offs_n, headdim, dstate, tl.program_id(1), BLOCK_P)
    head_state = bh.to(tl.int64) * headdim * dstate
    return bh, b, hh, gg, nblocks, seg, k_first, k_end, offs_t, offs_n, offs_p, mask_p, state_off, mask_np, head_state


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
    bh, b, hh, gg, nblocks, seg, k_first, k_end, offs_t, offs_n, offs_p, mask_p, state_off, mask_np, head_state = (
        _walk_program(seqlen, nheads, headdim, dstate, heads_per_group, seg_blocks, SEGMENTED, BLOCK_T, BLOCK_P,
                      BLOCK_N))
    mask_n = offs_n < dstate
    causal = offs_t[:, None] >= offs_t[None, :]  # (T, T): token t reads tokens s ≤ t
    A, bias = _head_params(A_ptr, dt_bias_ptr, hh, HAS_DT_BIAS)
    if HAS_D:
        Dv = _load_D(D_ptr, hh, headdim, offs_p, mask_p, D_PER_P)
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
    bh, b, hh, gg, nblocks, seg, k_first, k_end, offs_t, offs_n, offs_p, mask_p, state_off, mask_np, head_state = (
        _walk_program(seqlen, nheads, headdim, dstate, heads_per_group, seg_blocks, SEGMENTED, BLOCK_T, BLOCK_P,
                      BLOCK_N))
    A, bias = _head_params(A_ptr, dt_bias_ptr, hh, HAS_DT_BIAS)
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
        ddt = softplus_grad(ddt, raw)
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


_FUSED_T = 16 if INTERPRET else 64  # tokens a block on the fused path
# A P slice of the sequential fused kernels is only ever the narrow (column) side of their matrix products
# (states held as (N, P)), never their rows or inner dimension, the tile shapes of the Hopper miscompile
# noted at `common._MIN_DOT`.
_MIN_SLICE = 16 if INTERPRET else 32
_SUM_ROWS = 16 if INTERPRET else 64  # (b, l, g) rows a program of `_fused_bwd_sums_kernel` sums dB, dC over


@functools.cache  # asked twice a forward+backward
def _fused_block_p(bh: int, headdim: int, device: torch.device) -> int:
    """Columns of P a program of the two sequential fused kernels takes. The whole of P, unless b·h
    programs leave multiprocessors idle: then P is halved until they are busy or the slice reaches
    _MIN_SLICE. The slices recompute C Bᵀ and Δ each, but every program's chain of blocks gets shorter
    steps, and it is the chain's latency, not the arithmetic, that sets the time at small b·h."""
    block_p, sms = _pow2(headdim), _num_sms(device)
    while bh * cdiv(headdim, block_p) < sms and block_p // 2 >= _MIN_SLICE:
        block_p //= 2
    return block_p


_MIN_SEGMENT = 4 if INTERPRET else 32  # blocks: shorter segments would spend more on the correction than they save


def _fused_segments(programs: int, nblocks: int, device: torch.device) -> int:
    """Segments the fused forward splits each sequence into: enough for two programs an SM (they share one at
    little cost), each at least _MIN_SEGMENT blocks long. A program's time is its chain of blocks, so at
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

