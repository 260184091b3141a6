"""Mamba-1 selective scan and its decode step in Triton.

Per channel d and state n (Gu & Dao 2023, eq. 2a/2b with ZOH on A, Euler on B):
    Δ_t = softplus(delta_t + delta_bias)            (or delta_t + delta_bias without softplus)
    h_t = exp(Δ_t A) h_{t-1} + Δ_t B_t u_t          (h: (b, d, n), fp32)
    y_t = (C_t · h_t + D u_t) · silu(z_t)

Shapes (mamba_ssm `selective_scan_fn` layout):
    u, delta, z, y: (batch, dim, seqlen)
    A:              (dim, dstate)
    B, C:           (batch, dstate, seqlen) or (batch, ngroups, dstate, seqlen); channel c reads
                    group c // (dim / ngroups)
    D, delta_bias:  (dim,)
    last_state:     (batch, dim, dstate) fp32

Hardware-aware layout: one program owns BLOCK_D channels of one batch row (all in one group, so
they share B and C) and walks the sequence in chunks of BLOCK_L steps. Inside a chunk it loops
over the state index n; for each n the recurrence over the chunk is one `tl.associative_scan` over
pairs (a, x) = (exp(Δ A_n), Δ B_n u), and C_n h is accumulated into y, so the full state is never
written to memory. Only the state (b, d, n) after every STATE_L steps is stored, and only when the
sequence spans several spans or the caller wants the last state. The backward walks chunks of 128
steps and restarts each from the state stored before it, so with a backward to follow STATE_L is its
chunk and the forward's chunk holds 2 of them; without one, STATE_L is the forward's chunk.

Backward, per chunk from last to first and per n: recompute h by the same forward scan, then the
adjoint g_t = dL/dh_t = C_t dout_t + exp(Δ_{t+1} A) g_{t+1} by a reverse scan, with g carried
across chunks. Because a_t h_{t-1} = h_t − x_t, the gradients that need the previous state use
(h − x) instead, which keeps everything within one chunk:
    dΔ_t = Σ_n g (B u + A (h − x)),  du_t = D dout + Δ Σ_n g B,  dA_n = Σ_t Δ g (h − x),
    dB_t = Σ_{d in group} g Δ u,     dC_t = Σ_{d in group} dout h.
dB and dC are summed over a program's BLOCK_D channels in registers and over the programs of a
group with fp32 atomics; dA, dD and delta_bias get per-batch partials that the launcher sums. The
carried state and adjoint enter the scans as part of the chunk's first and last step (_scan_from,
_adjoint_scan), and the reverse scan composes each thread's 4 steps before it scans across lanes.
With N no larger than the lanes (LANE_STATE), lane n holds A_n, the state entering the chunk, the
carried adjoint and dA_n, shuffled to the others when needed.
"""

import math

import torch
import triton
import triton.language as tl

from kernels import cdiv, next_pow2
from kernels.jit import softplus, softplus_grad
from kernels.launch import INTERPRET, fast_launch

LOG2E = tl.constexpr(math.log2(math.e))  # exp(v) = exp2(v·log2 e): ex2 is the native instruction


@triton.jit
def _combine(a_l, x_l, a_r, x_r):
    # Composition of two affine maps h -> a h + x, left one applied first.
    return a_l * a_r, a_r * x_l + x_r


@triton.jit
def _load_delta(ptrs, bias, mask, HAS_BIAS: tl.constexpr, SOFTPLUS: tl.constexpr):
    """Δ at `ptrs` (a tile, or one step a channel; bias broadcast to match), 0 where masked off so
    that steps past the sequence leave h unchanged; also delta + delta_bias, where the backward
    takes softplus' derivative."""
    pre = tl.load(ptrs, mask=mask, other=0.0).to(tl.float32)
    if HAS_BIAS:
        pre += bias
    dt = softplus(pre) if SOFTPLUS else pre
    return tl.where(mask, dt, 0.0), pre


@triton.jit
def _channel_params(bias_ptr, D_ptr, offs_d, HAS_BIAS: tl.constexpr, HAS_D: tl.constexpr, BLOCK_D: tl.constexpr):
    """delta_bias and D of the program's channels, (BLOCK_D,) fp32 each; 0 where there is none."""
    if HAS_BIAS:
        bias = tl.load(bias_ptr + offs_d).to(tl.float32)
    else:
        bias = tl.zeros((BLOCK_D,), dtype=tl.float32)
    if HAS_D:
        D = tl.load(D_ptr + offs_d).to(tl.float32)
    else:
        D = tl.zeros((BLOCK_D,), dtype=tl.float32)
    return bias, D


@triton.jit
def _by_thread(v, BLOCK_D: tl.constexpr, BLOCK_L: tl.constexpr):
    """A (BLOCK_D, BLOCK_L) tile as four (BLOCK_D, BLOCK_L // 4) tiles, step 4j + k of the chunk in
    the k-th at column j. In the backward's tiles a thread holds 4 consecutive steps (VEC = 4), so
    column j is lane j and the split moves no data; other tiles get the same values, slower."""
    return _split4(tl.reshape(v, (BLOCK_D, BLOCK_L // 4, 2, 2)))


@triton.jit
def _scan_from(h0, a, x, lane, BLOCK_D: tl.constexpr, BLOCK_L: tl.constexpr):
    """h_t = a_t h_{t-1} + x_t over a (BLOCK_D, BLOCK_L) chunk from h0 before it ((BLOCK_D, 1), or
    (BLOCK_D, BLOCK_L // 4) with column 0 read). h0 is
    folded into the first step's x, so the scan's products of a are never needed as an output and
    the compiler drops their last shuffle and fix-ups."""
    a0, a1, a2, a3 = _by_thread(a, BLOCK_D, BLOCK_L)
    x0, x1, x2, x3 = _by_thread(x, BLOCK_D, BLOCK_L)
    x0 += a0 * tl.where(lane == 0, h0, 0.0)
    _, h = tl.associative_scan((a, tl.reshape(_join4(x0, x1, x2, x3), (BLOCK_D, BLOCK_L))), axis=1,
                               combine_fn=_combine)
    return h


@triton.jit
def _adjoint_scan(a, a_end, c, g_end, lane, BLOCK_D: tl.constexpr, BLOCK_L: tl.constexpr):
    """g_t = c_t + a_{t+1} g_{t+1} over a (BLOCK_D, BLOCK_L) chunk of a_t and c_t, where a_end and
    g_end are a and g at the step after the chunk ((BLOCK_D, 1), or (BLOCK_D, BLOCK_L // 4) with the
    last column read). Returns g (BLOCK_D, BLOCK_L) and its first step (BLOCK_D, BLOCK_L // 4;
    column 0 holds it).

    a_{t+1} is a_t one step on: three of a thread's four are its own, the fourth is the next
    lane's first (one shuffle, not four more exps). Each thread composes its steps into one map
    g_{4j} = X_j + M_j g_{4j+4}; a suffix scan across lanes (Kogge-Stone, no lane flips) gives
    G_j = g_{4j}, with g_end folded into the last lane's X so that M's products never leave the
    scan; the thread's other steps follow from the next lane's G."""
    LANES: tl.constexpr = BLOCK_L // 4
    a0, a1, a2, a3 = _by_thread(a, BLOCK_D, BLOCK_L)
    c0, c1, c2, c3 = _by_thread(c, BLOCK_D, BLOCK_L)
    last = lane == LANES - 1
    nxt = tl.minimum(lane + 1, LANES - 1)
    a4 = tl.where(last, a_end, tl.gather(a0, nxt, axis=1))
    M = a1 * a2 * a3 * a4
    X = c0 + a1 * (c1 + a2 * (c2 + a3 * c3)) + M * tl.where(last, g_end, 0.0)
    for k in tl.static_range(16):
        if (1 << k) < LANES:  # log2(LANES) levels
            src = tl.minimum(lane + (1 << k), LANES - 1)
            inside = lane + (1 << k) < LANES
            X = tl.where(inside, X + M * tl.gather(X, src, axis=1), X)
            if (2 << k) < LANES:  # the last level's product is not needed
                M = tl.where(inside, M * tl.gather(M, src, axis=1), M)
    g4 = tl.where(last, g_end, tl.gather(X, nxt, axis=1))
    g3 = c3 + a4 * g4
    g2 = c2 + a3 * g3
    g1 = c1 + a2 * g2
    return tl.reshape(_join4(X, g1, g2, g3), (BLOCK_D, BLOCK_L)), X


@triton.jit
def _full_tile(v, BLOCK_D: tl.constexpr, BLOCK_L: tl.constexpr):
    """A (BLOCK_D, BLOCK_L // 4) tile, the same in each lane, as a (BLOCK_D, BLOCK_L) one: the
    inverse of _by_thread's split for a value its four steps share, registers only."""
    return tl.reshape(_join4(v, v, v, v), (BLOCK_D, BLOCK_L))


@triton.jit
def _split4(v):
    # (..., 2, 2) -> its four (...) components, in order: registers only.
    lo, hi = tl.split(v)
    v0, v1 = tl.split(lo)
    v2, v3 = tl.split(hi)
    return v0, v2, v1, v3


@triton.jit
def _join4(v0, v1, v2, v3):
    return tl.join(tl.join(v0, v2), tl.join(v1, v3))


@triton.jit
def _group_ends(v, BLOCK_D: tl.constexpr, BLOCK_L: tl.constexpr):
    """(BLOCK_D, BLOCK_L // 8): the last of every 8 consecutive columns of a (BLOCK_D, BLOCK_L)
    tile. In the forward's tiles a thread holds 8 consecutive steps (one 16-byte load of bf16),
    so this moves no data; a store of the tile itself would take a layout of one element a
    thread and convert h through shared memory on every n."""
    _, v = tl.split(tl.reshape(v, (BLOCK_D, BLOCK_L // 8, 2, 2, 2)))
    _, v = tl.split(v)
    _, v = tl.split(v)
    return v


@triton.jit
def _load_dout(dy_row, z_row, offs_l, mask, HAS_Z: tl.constexpr):
    """dout = ∂L/∂(C·h + D u) = dy·silu(z), and dy·silu'(z) (dz = dy·silu'(z)·(C·h + D u)), for
    one (BLOCK_D, BLOCK_L) tile. The backward calls it before the loop over n for dout and after
    it for the other: what a call does not use is not computed, and not kept in registers."""
    dy = tl.load(dy_row + offs_l[None, :], mask=mask, other=0.0).to(tl.float32)
    if HAS_Z:
        zz = tl.load(z_row + offs_l[None, :], mask=mask, other=0.0).to(tl.float32)
        sig_z = tl.sigmoid(zz)
        return dy * zz * sig_z, dy * sig_z * (1.0 + zz * (1.0 - sig_z))
    return dy, dy


@fast_launch
@triton.jit
def _selective_scan_fwd_kernel(
    u_ptr, delta_ptr, A_ptr, B_ptr, C_ptr, D_ptr, z_ptr, bias_ptr, y_ptr, states_ptr,
    dim, seqlen, dstate, nchunks, nstates, channels_per_group,
    s_u_b, s_u_d, s_dt_b, s_dt_d, s_A_d, s_A_n,
    s_B_b, s_B_g, s_B_n, s_C_b, s_C_g, s_C_n, s_z_b, s_z_d, s_y_b, s_y_d,
    HAS_D: tl.constexpr, HAS_Z: tl.constexpr, HAS_BIAS: tl.constexpr, SOFTPLUS: tl.constexpr,
    STORE_STATES: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_L: tl.constexpr, STATE_L: tl.constexpr,
):
    SUBS: tl.constexpr = BLOCK_L // STATE_L  # states stored a chunk
    pid_d = tl.program_id(0)
    pid_b = tl.program_id(1).to(tl.int64)
    offs_d = pid_d * BLOCK_D + tl.arange(0, BLOCK_D)
    offs_c = tl.arange(0, BLOCK_L)
    group = (pid_d * BLOCK_D) // channels_per_group

    u_row = u_ptr + pid_b * s_u_b + offs_d[:, None] * s_u_d
    delta_row = delta_ptr + pid_b * s_dt_b + offs_d[:, None] * s_dt_d
    z_row = z_ptr + pid_b * s_z_b + offs_d[:, None] * s_z_d
    y_row = y_ptr + pid_b * s_y_b + offs_d[:, None] * s_y_d
    B_base = B_ptr + pid_b * s_B_b + group * s_B_g
    C_base = C_ptr + pid_b * s_C_b + group * s_C_g
    A_col = A_ptr + offs_d * s_A_d
    # states: (b, d, nstates, n) fp32, the state after every STATE_L steps (the backward's chunks)
    states_row = states_ptr + ((pid_b * dim + offs_d) * nstates) * dstate  # (BLOCK_D,)
    # The states are stored from h's groups of 8 steps (_group_ends): a group ending a span of
    # STATE_L steps stores its last step, the others are masked off.
    GROUPS: tl.constexpr = STATE_L // 8  # groups a span
    grp = tl.arange(0, BLOCK_L // 8)
    span = grp // GROUPS
    states_tile = states_row[:, None] + span[None, :] * dstate
    ends_span = (grp % GROUPS == GROUPS - 1)[None, :]
    is_first = (offs_c == 0)[None, :]
    bias, D = _channel_params(bias_ptr, D_ptr, offs_d, HAS_BIAS, HAS_D, BLOCK_D)

    for c in range(nchunks):
        offs_l = c * BLOCK_L + offs_c
        mask = (offs_l < seqlen)[None, :]
        has_prev = tl.full((BLOCK_D,), c, dtype=tl.int32) > 0  # chunk 0 starts from h = 0
        # Spans wholly past the sequence hold no state (there are nstates).
        store_mask = ends_span & (c * SUBS + span < nstates)[None, :]
        u = tl.load(u_row + offs_l[None, :], mask=mask, other=0.0).to(tl.float32)
        dt, _ = _load_delta(delta_row + offs_l[None, :], bias[:, None], mask, HAS_BIAS, SOFTPLUS)
        dtu = dt * u
        # B_n and C_n are read as (1, BLOCK_L) rows in the layout of u's tiles, which broadcast
        # to the BLOCK_D channels a thread holds without a layout conversion.
        bc_offs = offs_l[None, :]
        y = tl.zeros((BLOCK_D, BLOCK_L), dtype=tl.float32)
        # Operands of state index n are loaded during iteration n − 1 (software pipelining): the
        # scan's barriers would otherwise expose a global-memory latency on every iteration.
        A_nx = tl.load(A_col)
        B_nx = tl.load(B_base + bc_offs, mask=mask, other=0.0)
        C_nx = tl.load(C_base + bc_offs, mask=mask, other=0.0)
        if STORE_STATES:
            h0_nx = tl.load(states_row + (c * SUBS - 1) * dstate, mask=has_prev, other=0.0)
        for n in range(dstate):
            A2 = A_nx.to(tl.float32) * LOG2E
            Bn = B_nx.to(tl.float32)
            Cn = C_nx.to(tl.float32)
            nx = tl.minimum(n + 1, dstate - 1)  # the last iteration re-reads index dstate − 1
            A_nx = tl.load(A_col + nx * s_A_n)
            B_nx = tl.load(B_base + nx * s_B_n + bc_offs, mask=mask, other=0.0)
            C_nx = tl.load(C_base + nx * s_C_n + bc_offs, mask=mask, other=0.0)
            a = tl.exp2(dt * A2[:, None])
            x = dtu * Bn
            if STORE_STATES:
                # The entering state folded into the first step, x_0 += a_0 h0: the scan's
                # products of a are then never an output.
                h0 = h0_nx
                h0_nx = tl.load(states_row + (c * SUBS - 1) * dstate + nx, mask=has_prev, other=0.0)
                x = tl.where(is_first, x + a * h0[:, None], x)
            _, h = tl.associative_scan((a, x), axis=1, combine_fn=_combine)
            if STORE_STATES:
                # Past the sequence a = 1, x = 0: the last span's last column is the final state.
                tl.store(states_tile + c * SUBS * dstate + n, _group_ends(h, BLOCK_D, BLOCK_L), mask=store_mask)
            y += h * Cn
        if STORE_STATES:
            tl.debug_barrier()  # this chunk's states are read by other threads in the next one
        if HAS_D:
            y += D[:, None] * u
        if HAS_Z:
            zz = tl.load(z_row + offs_l[None, :], mask=mask, other=0.0).to(tl.float32)
            y *= zz * tl.sigmoid(zz)
        tl.store(y_row + offs_l[None, :], y, mask=mask)


@triton.jit
def _bwd_operands(n, A_col, s_A_n, B_tile, s_B_n, C_tile, s_C_n, mask, h0_ptr, has_prev, g_end_ptr, has_next,
                  MULTI_CHUNK: tl.constexpr, LANE_STATE: tl.constexpr):
    """What the backward's iteration over state index n reads: B_n and C_n as (1, BLOCK_L) rows,
    and, unless the lanes hold them (LANE_STATE), A_n, the state entering the chunk and the
    adjoint after it (BLOCK_D,), zero at the sequence's ends."""
    B = tl.load(B_tile + n * s_B_n, mask=mask, other=0.0)
    C = tl.load(C_tile + n * s_C_n, mask=mask, other=0.0)
    if LANE_STATE:
        A = tl.zeros(A_col.shape, dtype=tl.float32)  # unused
        return A, B, C, A, A
    A = tl.load(A_col + n * s_A_n)
    if MULTI_CHUNK:
        h0 = tl.load(h0_ptr + n, mask=has_prev, other=0.0)
        g_end = tl.load(g_end_ptr + n, mask=has_next, other=0.0)
    else:
        h0 = tl.zeros(A.shape, dtype=tl.float32)
        g_end = tl.zeros(A.shape, dtype=tl.float32)
    return A, B, C, h0, g_end


@fast_launch
@triton.jit
def _selective_scan_bwd_kernel(
    u_ptr, delta_ptr, A_ptr, B_ptr, C_ptr, D_ptr, z_ptr, bias_ptr, states_ptr, dy_ptr,
    du_ptr, ddelta_ptr, dz_ptr, dB_ptr, dC_ptr, part_ptr, gcarry_ptr,
    dim, seqlen, dstate, nchunks, channels_per_group, ngroups,
    s_u_b, s_u_d, s_dt_b, s_dt_d, s_A_d, s_A_n,
    s_B_b, s_B_g, s_B_n, s_C_b, s_C_g, s_C_n, s_z_b, s_z_d, s_dy_b, s_dy_d,
    HAS_D: tl.constexpr, HAS_Z: tl.constexpr, HAS_BIAS: tl.constexpr, SOFTPLUS: tl.constexpr,
    MULTI_CHUNK: tl.constexpr, LANE_STATE: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_L: tl.constexpr,
    VEC: tl.constexpr,
):
    # Batch is the fast grid axis: programs that run at the same time then add into different
    # rows of dB and dC, rather than queueing on the same addresses.
    pid_b = tl.program_id(0).to(tl.int64)
    pid_d = tl.program_id(1)
    offs_d = pid_d * BLOCK_D + tl.arange(0, BLOCK_D)
    # VEC consecutive steps a thread: when BLOCK_L = 32·VEC·warps the lanes span the chunk and
    # the BLOCK_D channels sit in each thread's registers, so dB_n, dC_n reduce over channels
    # without shuffles; with VEC = 4, the width of an fp32 vector atomic, no tile changes layout
    # for the atomics, and the scans' split of each thread's steps moves no data.
    offs_c = tl.max_contiguous(tl.arange(0, BLOCK_L), VEC)
    row0 = offs_d[:, None] * 0
    # (BLOCK_D, BLOCK_L // 4): column j of the scans' split tiles (_by_thread), in their layout
    lane = _by_thread(row0 + offs_c[None, :], BLOCK_D, BLOCK_L)[0] // 4
    group = (pid_d * BLOCK_D) // channels_per_group

    u_row = u_ptr + pid_b * s_u_b + offs_d[:, None] * s_u_d
    delta_col = delta_ptr + pid_b * s_dt_b + offs_d * s_dt_d  # (BLOCK_D,)
    delta_row = delta_col[:, None]
    z_row = z_ptr + pid_b * s_z_b + offs_d[:, None] * s_z_d
    dy_row = dy_ptr + pid_b * s_dy_b + offs_d[:, None] * s_dy_d
    # du, ddelta, dz are fresh contiguous (b, d, l) tensors. dB, dC are fp32 (b, g, n, L) with L
    # = nchunks·BLOCK_L: the chunk past the sequence adds zeros there (Δ = 0 and dy = 0), so the
    # atomics need no mask.
    out_row = (pid_b * dim + offs_d[:, None]) * seqlen
    B_base = B_ptr + pid_b * s_B_b + group * s_B_g
    C_base = C_ptr + pid_b * s_C_b + group * s_C_g
    dB_row = dB_ptr + (pid_b * ngroups + group) * dstate * (nchunks * BLOCK_L)
    dC_row = dC_ptr + (pid_b * ngroups + group) * dstate * (nchunks * BLOCK_L)
    A_col = A_ptr + offs_d * s_A_d
    states_row = states_ptr + ((pid_b * dim + offs_d) * nchunks) * dstate  # (BLOCK_D,)
    # part: (b, d, n + 2) fp32, the per-batch partials of dA (lane 0 of each channel adds), dD
    # and dΔbias (stored at the end)
    part_row = part_ptr + (pid_b * dim + offs_d) * (dstate + 2)  # (BLOCK_D,)
    dA_tile = part_row[:, None] + lane * 0
    # gcarry: (b, d, 2, n) fp32, the adjoint at the first step of the chunk after this one. Chunk
    # c reads slot (c+1) % 2 and writes slot c % 2, so no thread overwrites a value that another
    # may still read; the barrier at the end of each chunk orders the rest.
    gcarry_row = gcarry_ptr + (pid_b * dim + offs_d) * 2 * dstate  # (BLOCK_D,)
    gcarry_tile = gcarry_row[:, None] + lane * 0  # lane 0 stores its first step's adjoint
    bias, D = _channel_params(bias_ptr, D_ptr, offs_d, HAS_BIAS, HAS_D, BLOCK_D)

    if LANE_STATE:
        # dstate <= BLOCK_L // 4: lane k of a (BLOCK_D, BLOCK_L // 4) tile holds state index k's
        # A, entering state, carried adjoint and dA, and one shuffle a value gives them to every
        # lane: no global loads for them in the loop over n, and no round trip for the adjoint.
        in_lane = lane < dstate
        A_lanes = tl.load(A_col[:, None] + lane * s_A_n, mask=in_lane, other=0.0).to(tl.float32)
        g_lanes = tl.zeros(lane.shape, dtype=tl.float32)  # the adjoint after the chunk
        dA_lanes = tl.zeros(lane.shape, dtype=tl.float32)
    dD_acc = tl.zeros((BLOCK_D,), dtype=tl.float32)
    dbias_acc = tl.zeros((BLOCK_D,), dtype=tl.float32)
    for i in range(nchunks):
        c = nchunks - 1 - i
        offs_l = c * BLOCK_L + offs_c
        mask = (offs_l < seqlen)[None, :]
        has_prev = tl.full((BLOCK_D,), c, dtype=tl.int32) > 0  # chunk 0 starts from h = 0
        has_next = tl.full((BLOCK_D,), i, dtype=tl.int32) > 0  # the last chunk ends with g = 0
        # u and z are loaded again after the loop over n rather than kept alive through it:
        # registers bound how many warps an SM holds.
        u = tl.load(u_row + offs_l[None, :], mask=mask, other=0.0).to(tl.float32)
        dt, _ = _load_delta(delta_row + offs_l[None, :], bias[:, None], mask, HAS_BIAS, SOFTPLUS)
        # Δ at the step after the chunk: the adjoint's a_{t+1} for the chunk's last step
        t_end = c * BLOCK_L + BLOCK_L
        dt_end, _ = _load_delta(delta_col + t_end, bias, (offs_d * 0 + t_end) < seqlen, HAS_BIAS, SOFTPLUS)
        dout, _ = _load_dout(dy_row, z_row, offs_l, mask, HAS_Z)
        dtu = dt * u
        bc_offs = offs_l[None, :]  # B_n, C_n as (1, BLOCK_L) rows, as in the forward
        B_tile, C_tile = B_base + bc_offs, C_base + bc_offs
        s = tl.zeros((BLOCK_D, BLOCK_L), dtype=tl.float32)  # C·h, only needed for dz
        gB = tl.zeros((BLOCK_D, BLOCK_L), dtype=tl.float32)  # Σ_n g B
        gAhx = tl.zeros((BLOCK_D, BLOCK_L), dtype=tl.float32)  # Σ_n A g (h − x)
        # Next state index's operands are loaded one iteration ahead, as in the forward.
        h0_ptr = states_row + (c - 1) * dstate
        g_end_ptr = gcarry_row + ((c + 1) % 2) * dstate
        if LANE_STATE:
            h0_lanes = tl.load(states_row[:, None] + (c - 1) * dstate + lane, mask=in_lane & has_prev[:, None],
                               other=0.0)
            g_first_lanes = tl.zeros(lane.shape, dtype=tl.float32)
        A_nx, B_nx, C_nx, h0_nx, g_end_nx = _bwd_operands(
            0, A_col, s_A_n, B_tile, s_B_n, C_tile, s_C_n, mask, h0_ptr, has_prev, g_end_ptr, has_next, MULTI_CHUNK,
            LANE_STATE)
        for n in range(dstate):
            if LANE_STATE:
                is_n = lane == n
                at_n = lane * 0 + n
                A_l = tl.gather(A_lanes, at_n, axis=1)  # every lane: A_n
                A2_l = A_l * LOG2E
                A = _full_tile(A_l, BLOCK_D, BLOCK_L)
                A2 = _full_tile(A2_l, BLOCK_D, BLOCK_L)
                a_end = tl.exp2(dt_end[:, None] * A2_l)
                h0 = tl.gather(h0_lanes, at_n, axis=1)
                g_end = tl.gather(g_lanes, at_n, axis=1)
            else:
                A = A_nx.to(tl.float32)[:, None]
                A2 = A * LOG2E
                a_end = tl.exp2(dt_end[:, None] * A2)
                h0 = h0_nx[:, None]
                g_end = g_end_nx[:, None]
            Bn = B_nx.to(tl.float32)
            Cn = C_nx.to(tl.float32)
            # the last iteration re-reads index dstate − 1
            A_nx, B_nx, C_nx, h0_nx, g_end_nx = _bwd_operands(
                tl.minimum(n + 1, dstate - 1), A_col, s_A_n, B_tile, s_B_n, C_tile, s_C_n, mask, h0_ptr, has_prev,
                g_end_ptr, has_next, MULTI_CHUNK, LANE_STATE)
            a = tl.exp2(dt * A2)
            x = dtu * Bn
            h = _scan_from(h0, a, x, lane, BLOCK_D, BLOCK_L)
            g, g_first = _adjoint_scan(a, a_end, dout * Cn, g_end, lane, BLOCK_D, BLOCK_L)
            if LANE_STATE:
                g_first_lanes = tl.where(is_n, tl.gather(g_first, lane * 0, axis=1), g_first_lanes)
            elif MULTI_CHUNK:
                tl.store(gcarry_tile + (c % 2) * dstate + n, g_first, mask=lane == 0)
            if HAS_Z:
                s += h * Cn
            gB += g * Bn
            ghx = g * (h - x)  # g_t a_t h_{t-1}
            gAhx += A * ghx
            # dA_n: each thread's steps first (registers), in the scans' split layout, which the
            # lanes' sum keeps; then kept in lane n, or added where it lives (one address a
            # program, so the atomic never waits on another program).
            p0, p1, p2, p3 = _by_thread(dt * ghx, BLOCK_D, BLOCK_L)
            dA_n = tl.sum((p0 + p1) + (p2 + p3), axis=1, keep_dims=True)
            if LANE_STATE:
                dA_lanes = tl.where(is_n, dA_lanes + dA_n, dA_lanes)
            else:
                tl.atomic_add(dA_tile + n, dA_n + lane * 0, mask=lane == 0, sem="relaxed")
            dBC_at = (n * nchunks + c) * BLOCK_L + offs_c[None, :]
            tl.atomic_add(dB_row + dBC_at, tl.sum(g * dtu, axis=0, keep_dims=True), sem="relaxed")
            tl.atomic_add(dC_row + dBC_at, tl.sum(dout * h, axis=0, keep_dims=True), sem="relaxed")
        if LANE_STATE:
            g_lanes = g_first_lanes
        elif MULTI_CHUNK:
            tl.debug_barrier()
        u = tl.load(u_row + offs_l[None, :], mask=mask, other=0.0).to(tl.float32)
        du = dt * gB
        if HAS_D:
            du += D[:, None] * dout
            dD_acc += tl.sum(dout * u, axis=1)
        ddt = u * gB + gAhx
        if SOFTPLUS:
            # delta + delta_bias is reloaded rather than kept alive through the loop over n.
            _, dt_pre = _load_delta(delta_row + offs_l[None, :], bias[:, None], mask, HAS_BIAS, False)
            ddt = softplus_grad(ddt, dt_pre)
        if HAS_BIAS:
            dbias_acc += tl.sum(ddt, axis=1)
        tl.store(du_ptr + out_row + offs_l[None, :], du, mask=mask)
        tl.store(ddelta_ptr + out_row + offs_l[None, :], ddt, mask=mask)
        if HAS_Z:
            if HAS_D:
                s += D[:, None] * u
            _, dy_dsilu = _load_dout(dy_row, z_row, offs_l, mask, HAS_Z)
            dz = dy_dsilu * s
            tl.store(dz_ptr + out_row + offs_l[None, :], dz, mask=mask)
    # The launcher sums the partials over the batch.
    if LANE_STATE:
        tl.store(dA_tile + lane, dA_lanes, mask=in_lane)
    if HAS_D:
        tl.store(part_row + dstate, dD_acc)
    if HAS_BIAS:
        tl.store(part_row + dstate + 1, dbias_acc)


@fast_launch
@triton.jit
def _selective_state_update_kernel(
    state_ptr, x_ptr, dt_ptr, A_ptr, B_ptr, C_ptr, D_ptr, z_ptr, bias_ptr, y_ptr,
    dim, dstate, channels_per_group,
    s_h_b, s_h_d, s_h_n, s_x_b, s_x_d, s_dt_b, s_dt_d, s_A_d, s_A_n,
    s_B_b, s_B_g, s_B_n, s_C_b, s_C_g, s_C_n, s_z_b, s_z_d, s_y_b, s_y_d,
    HAS_D: tl.constexpr, HAS_Z: tl.constexpr, HAS_BIAS: tl.constexpr, SOFTPLUS: tl.constexpr,
    BLOCK_D: tl.constexpr, BLOCK_N: tl.constexpr,
):
    pid_d = tl.program_id(0)
    pid_b = tl.program_id(1).to(tl.int64)
    offs_d = pid_d * BLOCK_D + tl.arange(0, BLOCK_D)
    offs_n = tl.arange(0, BLOCK_N)
    mask_d = offs_d < dim
    mask = mask_d[:, None] & (offs_n < dstate)[None, :]
    group = (offs_d // channels_per_group)[:, None]  # channels of one block may span groups

    h_ptrs = state_ptr + pid_b * s_h_b + offs_d[:, None] * s_h_d + offs_n[None, :] * s_h_n
    h = tl.load(h_ptrs, mask=mask, other=0.0)
    x = tl.load(x_ptr + pid_b * s_x_b + offs_d * s_x_d, mask=mask_d, other=0.0).to(tl.float32)
    dt = tl.load(dt_ptr + pid_b * s_dt_b + offs_d * s_dt_d, mask=mask_d, other=0.0).to(tl.float32)
    if HAS_BIAS:
        dt += tl.load(bias_ptr + offs_d, mask=mask_d, other=0.0).to(tl.float32)
    if SOFTPLUS:
        dt = softplus(dt)
    A = tl.load(A_ptr + offs_d[:, None] * s_A_d + offs_n[None, :] * s_A_n, mask=mask, other=0.0)
    Bt = tl.load(B_ptr + pid_b * s_B_b + group * s_B_g + offs_n[None, :] * s_B_n, mask=mask, other=0.0)
    Ct = tl.load(C_ptr + pid_b * s_C_b + group * s_C_g + offs_n[None, :] * s_C_n, mask=mask, other=0.0)
    h = tl.exp(dt[:, None] * A.to(tl.float32)) * h + (dt * x)[:, None] * Bt.to(tl.float32)
    tl.store(h_ptrs, h, mask=mask)
    y = tl.sum(h * Ct.to(tl.float32), axis=1)
    if HAS_D:
        y += tl.load(D_ptr + offs_d, mask=mask_d, other=0.0).to(tl.float32) * x
    if HAS_Z:
        zz = tl.load(z_ptr + pid_b * s_z_b + offs_d * s_z_d, mask=mask_d, other=0.0).to(tl.float32)
        y *= zz * tl.sigmoid(zz)
    tl.store(y_ptr + pid_b * s_y_b + offs_d * s_y_d, y, mask=mask_d)


def _pow2_divisor(n: int, cap: int) -> int:
    """Largest power of two <= cap dividing n: a channel block must not straddle two groups."""
    p = 1
    while p * 2 <= cap and n % (p * 2) == 0:
        p *= 2
    return p


def _chunk_size(seqlen: int) -> int:
    # Chunks of 128 steps, one warp each: the scans never cross warps, and many small independent
    # programs hide latency better than a few wide ones (bench/notes/selective_scan.md).
    return min(max(next_pow2(seqlen), 16), 128)


def _forward_chunk(seqlen: int, block_l: int) -> int:
    # The forward walks 2 of the backward's chunks at a time (storing the state after each for it),
    # two channels a thread: fewer, longer steps of its sequential loop, and B, C loaded once for
    # both channels; faster than one channel over 256 or 512 steps (BENCHMARKS.md, selective scan "v8").
    return max(block_l, min(next_pow2(seqlen), 2 * block_l))


# Tiles: each thread holds `per_thread` elements of every (BLOCK_D, BLOCK_L) fp32 tile; BLOCK_D
# follows from BLOCK_L. `maxnreg` caps the registers a thread (None: the compiler's choice).
# Chosen by `python -m bench.selective_scan --sweep` on an H200 (timings: BENCHMARKS.md, selective scan
# "v8"). The backward: one channel a program (4 steps a thread, at most 96 registers) beat one channel a
# warp in 2-8 warp programs, and beat two channels a thread (which halve the dB/dC atomics but hold more
# registers) except where few rows of dB, dC take the atomics of many channels.
_FWD_TILE = {"per_thread": 16, "num_warps": 1, "maxnreg": None}
_BWD_TILE = {"per_thread": 4, "num_warps": 1, "maxnreg": 96}
_BWD_TILE_FEW_ROWS = {"per_thread": 8, "num_warps": 1, "maxnreg": 128}
_FEW_ROWS = 16  # batch × groups at or below which _BWD_TILE_FEW_ROWS is used


def _tile(cfg: dict, block_l: int, channels_per_group: int) -> dict:
    """cfg with per_thread turned into block_d; a single warp under the interpreter, where warps
    mean nothing."""
    num_warps = 1 if INTERPRET else cfg["num_warps"]
    cap = max(cfg["per_thread"] * 32 * num_warps // block_l, 1)
    tile = {k: v for k, v in cfg.items() if k != "per_thread"}
    return {**tile, "block_d": _pow2_divisor(channels_per_group, cap), "num_warps": num_warps}


def _lane_state(dstate: int, block_l: int) -> bool:
    """Whether the backward's lanes hold the per-state-index values (LANE_STATE): one lane each."""
    return dstate <= block_l // 4


def _vec(block_l: int, num_warps: int) -> int:
    """Consecutive steps a thread holds in the backward's (BLOCK_D, BLOCK_L) tiles (1 to 8)."""
    return min(max(block_l // (32 * num_warps), 1), 8)


def _lastdim_contiguous(t):
    return t if t is None or t.stride(-1) == 1 else t.contiguous()


def _grouped(M):
    # (b, n, l) -> (b, 1, n, l): the shared case is one group.
    return M.unsqueeze(1) if M.dim() == 3 else M


def _selective_scan_fwd(u, delta, A, B, C, D, z, delta_bias, delta_softplus, store_states,
                        block_l, state_l=None, tile=None):
    """y, and states (b, d, l / state_l, n) fp32: the state after every state_l steps (a divisor
    of the forward's chunk block_l; block_l when None), when asked for or needed across chunks."""
    batch, dim, seqlen = u.shape
    dstate = A.shape[1]
    B4, C4 = _grouped(B), _grouped(C)
    ngroups = B4.shape[1]
    state_l = state_l or block_l
    nchunks = cdiv(seqlen, block_l)
    store_states = store_states or nchunks > 1
    nstates = cdiv(seqlen, state_l) if store_states else 0
    tile = tile or _tile(_FWD_TILE, block_l, dim // ngroups)
    y = torch.empty_like(u)
    states = torch.empty(batch, dim, nstates, dstate, device=u.device, dtype=torch.float32)
    zz = z if z is not None else u
    grid = (dim // tile["block_d"], batch)
    _selective_scan_fwd_kernel[grid](
        u, delta, A, B4, C4, D if D is not None else u, zz,
        delta_bias if delta_bias is not None else u, y, states if store_states else y,
        dim, seqlen, dstate, nchunks, nstates, dim // ngroups,
        u.stride(0), u.stride(1), delta.stride(0), delta.stride(1), A.stride(0), A.stride(1),
        B4.stride(0), B4.stride(1), B4.stride(2), C4.stride(0), C4.stride(1), C4.stride(2),
        zz.stride(0), zz.stride(1), y.stride(0), y.stride(1),
        HAS_D=D is not None, HAS_Z=z is not None, HAS_BIAS=delta_bias is not None,
        SOFTPLUS=delta_softplus, STORE_STATES=store_states, BLOCK_D=tile["block_d"],
        BLOCK_L=block_l, STATE_L=state_l, num_warps=tile["num_warps"], maxnreg=tile["maxnreg"],
    )
    return y, states


def _selective_scan_bwd(dy, u, delta, A, B, C, D, z, delta_bias, delta_softplus, states,
                        block_l, tile=None):
    batch, dim, seqlen = u.shape
    dstate = A.shape[1]
    B4, C4 = _grouped(B), _grouped(C)
    ngroups = B4.shape[1]
    nchunks = cdiv(seqlen, block_l)
    cfg = _BWD_TILE_FEW_ROWS if batch * ngroups <= _FEW_ROWS else _BWD_TILE
    tile = tile or _tile(cfg, block_l, dim // ngroups)
    lane_state = _lane_state(dstate, block_l)
    f32 = dict(device=u.device, dtype=torch.float32)
    du = torch.empty(batch, dim, seqlen, device=u.device, dtype=u.dtype)
    ddelta = torch.empty(batch, dim, seqlen, device=u.device, dtype=delta.dtype)
    dz = torch.empty(batch, dim, seqlen, device=u.device, dtype=z.dtype) if z is not None else None
    # dB, dC run to the end of the last chunk (the kernel adds zeros past the sequence); they and
    # the partials of dA, dD, dΔbias each share one buffer: fewer small kernels around the backward.
    dBC = torch.zeros(2, batch, ngroups, dstate, nchunks * block_l, **f32)
    part = torch.zeros(batch, dim, dstate + 2, **f32)
    gcarry = torch.empty(batch, dim, 2, dstate, **f32) if nchunks > 1 and not lane_state else part
    zz = z if z is not None else u
    grid = (batch, dim // tile["block_d"])
    _selective_scan_bwd_kernel[grid](
        u, delta, A, B4, C4, D if D is not None else u, zz,
        delta_bias if delta_bias is not None else u, states if nchunks > 1 else part, dy,
        du, ddelta, dz if dz is not None else du, dBC[0], dBC[1], part, gcarry,
        dim, seqlen, dstate, nchunks, dim // ngroups, ngroups,
        u.stride(0), u.stride(1), delta.stride(0), delta.stride(1), A.stride(0), A.stride(1),
        B4.stride(0), B4.stride(1), B4.stride(2), C4.stride(0), C4.stride(1), C4.stride(2),
        zz.stride(0), zz.stride(1), dy.stride(0), dy.stride(1),
        HAS_D=D is not None, HAS_Z=z is not None, HAS_BIAS=delta_bias is not None,
        SOFTPLUS=delta_softplus, MULTI_CHUNK=nchunks > 1, LANE_STATE=lane_state,
        BLOCK_D=tile["block_d"], BLOCK_L=block_l,
        VEC=_vec(block_l, tile["num_warps"]),
        num_warps=tile["num_warps"], maxnreg=tile["maxnreg"],
    )
    dBC = dBC[..., :seqlen]
    if B.dtype == C.dtype:
        dBC = dBC.to(B.dtype)
    dB = dBC[0].to(B.dtype).reshape(B.shape)
    dC = dBC[1].to(C.dtype).reshape(C.shape)
    part = part.sum(0)
    dA = part[:, :dstate].to(A.dtype)
    dD = part[:, dstate].to(D.dtype) if D is not None else None
    dbias = part[:, dstate + 1].to(delta_bias.dtype) if delta_bias is not None else None
    return du, ddelta, dA, dB, dC, dD, dz, dbias


class SelectiveScanFn(torch.autograd.Function):
    @staticmethod
    def forward(ctx, u, delta, A, B, C, D, z, delta_bias, delta_softplus, return_last_state,
                block_l, for_backward):
        u, delta, B, C, z = map(_lastdim_contiguous, (u, delta, B, C, z))
        D, delta_bias = (None if t is None else t.contiguous() for t in (D, delta_bias))
        # block_l: the backward's chunk. The backward restarts each from the state the forward
        # stored before it; without a backward the forward stores only its own chunks' states.
        fwd_l = _forward_chunk(u.shape[2], block_l)
        y, states = _selective_scan_fwd(u, delta, A, B, C, D, z, delta_bias, delta_softplus,
                                        return_last_state or (for_backward and u.shape[2] > block_l),
                                        fwd_l, block_l if for_backward else fwd_l)
        if for_backward:
            ctx.save_for_backward(u, delta, A, B, C, D, z, delta_bias, states)
            ctx.delta_softplus = delta_softplus
            ctx.block_l = block_l
        if not return_last_state:
            return y
        last_state = states[:, :, -1].contiguous()
        ctx.mark_non_differentiable(last_state)
        return y, last_state

    @staticmethod
    def backward(ctx, dy, *_):
        u, delta, A, B, C, D, z, delta_bias, states = ctx.saved_tensors
        grads = _selective_scan_bwd(_lastdim_contiguous(dy), u, delta, A, B, C, D, z, delta_bias,
                                    ctx.delta_softplus, states, ctx.block_l)
        return *grads, None, None, None, None


def _check_layout(u, delta, A, B, C):
    if u.dim() != 3 or delta.shape != u.shape:
        raise ValueError(f"u{tuple(u.shape)}, delta{tuple(delta.shape)}: must both be (b, d, l)")
    if A.dim() != 2 or A.shape[0] != u.shape[1]:
        raise ValueError(f"A{tuple(A.shape)}: must be (d, n) with d={u.shape[1]}")
    for name, M in (("B", B), ("C", C)):
        groups = M.shape[1] if M.dim() == 4 else 1
        if M.dim() not in (3, 4) or M.shape[0] != u.shape[0] or M.shape[-2:] != (A.shape[1], u.shape[2]) \
                or u.shape[1] % groups:
            raise ValueError(f"{name}{tuple(M.shape)}: must be (b, n, l) or (b, g, n, l) with "
                             f"d % g == 0")


def selective_scan_triton(u, delta, A, B, C, D=None, z=None, delta_bias=None,
                          delta_softplus=False, return_last_state=False):
    """Selective scan y = (scan(u) + D·u)·silu(z), forward and backward in Triton.

    u, delta, z: (batch, dim, seqlen)      A: (dim, dstate)       D, delta_bias: (dim,)
    B, C: (batch, dstate, seqlen) or (batch, ngroups, dstate, seqlen)
    Returns y (batch, dim, seqlen) in u.dtype, or (y, last_state (batch, dim, dstate) fp32).
    Works on CUDA tensors, or on CPU tensors under TRITON_INTERPRET=1.
    """
    _check_layout(u, delta, A, B, C)
    inputs = (u, delta, A, B, C, D, z, delta_bias)
    for_backward = torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in inputs)
    return SelectiveScanFn.apply(*inputs, bool(delta_softplus), bool(return_last_state),
                                 _chunk_size(u.shape[2]), for_backward)


def selective_state_update_triton(state, x, dt, A, B, C, D=None, z=None, dt_bias=None,
                                  dt_softplus=False):
    """One decode step of the selective scan; updates `state` in place.

    state: (batch, dim, dstate) fp32     x, dt, z: (batch, dim)     A: (dim, dstate)
    B, C: (batch, dstate) or (batch, ngroups, dstate)                D, dt_bias: (dim,)
    Returns y (batch, dim) in x.dtype.
    """
    batch, dim, dstate = state.shape
    B3 = B.unsqueeze(1) if B.dim() == 2 else B  # (b, g, n)
    C3 = C.unsqueeze(1) if C.dim() == 2 else C
    y = torch.empty_like(x)
    zz = z if z is not None else x
    block_n = next_pow2(dstate)
    block_d = max(1, min(next_pow2(dim), 2048 // block_n))
    grid = (cdiv(dim, block_d), batch)
    _selective_state_update_kernel[grid](
        state, x, dt, A, B3, C3, D if D is not None else x, zz,
        dt_bias if dt_bias is not None else x, y,
        dim, dstate, dim // B3.shape[1],
        state.stride(0), state.stride(1), state.stride(2), x.stride(0), x.stride(1),
        dt.stride(0), dt.stride(1), A.stride(0), A.stride(1),
        B3.stride(0), B3.stride(1), B3.stride(2), C3.stride(0), C3.stride(1), C3.stride(2),
        zz.stride(0), zz.stride(1), y.stride(0), y.stride(1),
        HAS_D=D is not None, HAS_Z=z is not None, HAS_BIAS=dt_bias is not None,
        SOFTPLUS=bool(dt_softplus), BLOCK_D=block_d, BLOCK_N=block_n,
        num_warps=1 if INTERPRET else 4,
    )
    return y
