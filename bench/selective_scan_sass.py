"""SASS instruction counts of the selective-scan kernels, compiled for sm_90 without a GPU.

    python -m bench.selective_scan_sass         # every tile bench/selective_scan.py --sweep times

For each tile: registers, stack, and, in the loop over the state index n, the instructions per
thread and per state update, shuffles, exps, vector atomics, barriers and shared-memory traffic.
The specialisation matches bench/selective_scan.py's shape 1 (b, d, l, n) = (64, 256, 1024, 16): bf16 u, Δ, B,
C, z, dy; fp32 A, D, Δ bias; 16-divisible sizes and strides, the strides equal to 1 as constants.
Needs only triton (it ships ptxas and cuobjdump). What the counts predicted, and the times: BENCHMARKS.md
(the selective scan's measurement notes).
"""

import collections
import re

from kernels import cdiv
from bench import selective_scan as bench
from bench.sass import compile_sm90, cuobjdump, resources
from kernels.selective_scan import triton as ss

BF16_PTRS = {"u_ptr", "delta_ptr", "B_ptr", "C_ptr", "z_ptr", "dy_ptr", "y_ptr", "du_ptr", "ddelta_ptr", "dz_ptr"}


def _op(line: str) -> str:
    return re.sub(r"^@!?U?P\w+\s+", "", line).split()[0].split(".")[0]


def inner_loop_ops(compiled) -> tuple[collections.Counter, dict]:
    """Opcode counts of the innermost loop (the first backward branch's body) and the resource
    usage (REG, STACK) of the cubin."""
    sass = cuobjdump(compiled, "-sass")
    code = [(int(a, 16), text) for a, text in re.findall(r"/\*([0-9a-f]{4,})\*/\s+(.*?);", sass)]
    for addr, text in code:
        target = re.search(r"BRA\s+0x([0-9a-f]+)", text)
        if target and int(target.group(1), 16) < addr:
            start = int(target.group(1), 16)
            loop = collections.Counter(_op(t) for a, t in code if start <= a <= addr)
            break
    return loop, resources(compiled)


def main():
    b, d, l, n = bench.SHAPES[0]
    flags = dict(HAS_D=True, HAS_Z=True, HAS_BIAS=True, SOFTPLUS=True)
    for kind, tiles in (("fwd", bench.FWD_TILES), ("bwd", bench.BWD_TILES)):
        for bd, bl, nw, maxnreg in tiles:
            nchunks = cdiv(l, bl)
            state_l = min(bl, ss._chunk_size(l))  # the forward stores a state every backward chunk
            ints = dict(dim=d, seqlen=l, dstate=n, nchunks=nchunks, nstates=cdiv(l, state_l), channels_per_group=d,
                        ngroups=1,
                        s_A_d=n, s_A_n=1, s_B_b=n * l, s_B_g=n * l, s_B_n=l, s_C_b=n * l, s_C_g=n * l, s_C_n=l,
                        **{f"s_{x}_b": d * l for x in ("u", "dt", "z", "y", "dy")},
                        **{f"s_{x}_d": l for x in ("u", "dt", "z", "y", "dy")})
            if kind == "fwd":
                kernel = ss._selective_scan_fwd_kernel
                consts = dict(flags, STORE_STATES=True, BLOCK_D=bd, BLOCK_L=bl, STATE_L=state_l)
            else:
                kernel = ss._selective_scan_bwd_kernel
                consts = dict(flags, MULTI_CHUNK=nchunks > 1, LANE_STATE=ss._lane_state(n, bl), BLOCK_D=bd, BLOCK_L=bl,
                              VEC=ss._vec(bl, nw))
            ops, res = inner_loop_ops(compile_sm90(kernel, consts, ints, BF16_PTRS, nw, maxnreg))
            updates = bd * bl // (32 * nw)  # state updates a thread makes per n
            total = sum(ops.values())
            print(f"{kind} ({bd}, {bl}, {nw}) maxnreg={maxnreg}: {res.get('REG')} registers, "
                  f"stack {res.get('STACK')}; loop over n: {total} instructions for {updates} updates "
                  f"({total / updates:.1f} each), SHFL {ops['SHFL']}, MUFU {ops['MUFU']}, "
                  f"REDG {ops['REDG']}, BAR {ops['BAR']}, STS {ops['STS']}, LDL {ops['LDL']}", flush=True)


if __name__ == "__main__":
    main()
