"""Registers and spills of the fused SSD kernels, compiled for sm_90 without a GPU.

    python -m bench.ssd_sass

Each fused kernel at 4 and 8 warps (the autotuner's two configs), specialised as bench/ssd.py's
calls at (b, l, h, p) = (64, 1024, 4, 64) make it (bf16 x, dt, B, C; fp32 A, D per head, dt_bias;
softplus; no z; one group), for N = 64 (workbench) and N = 128 (paper); the two sequential kernels also
with a P slice of 32 (`_fused_block_p`, b·h below the SMs), and the segmented forward (its correction
kernel, and the block backward reading it). STACK > 0 means spills. HGMMA counts the
Hopper warpgroup matrix instructions (0: the products fell back to the older mma).
"""

from bench.sass import compile_sm90, cuobjdump, resources
from kernels.ssd import fused

BF16_PTRS = {"x_ptr", "dt_ptr", "B_ptr", "C_ptr", "z_ptr", "dout_ptr", "out_ptr", "ypre_ptr", "states_ptr",
             "dstates_ptr", "dx_ptr", "dz_ptr", "ddt_ptr", "dB_ptr", "dC_ptr"}


def main():
    b, l, h, p = 64, 1024, 4, 64
    for n in (64, 128):
        ints = dict(seqlen=l, nheads=h, headdim=p, dstate=n, heads_per_group=h, seg_blocks=8,
                    s_x_b=l * h * p, s_x_l=h * p, s_x_h=p, s_z_b=l * h * p, s_z_l=h * p, s_z_h=p,
                    s_dt_b=l * h, s_dt_l=h, s_dt_h=1, s_B_b=l * n, s_B_l=n, s_B_g=n, s_C_b=l * n, s_C_l=n, s_C_g=n)
        flags = dict(HAS_Z=False, HAS_DT_BIAS=True, DT_SOFTPLUS=True, BLOCK_T=64, BLOCK_P=p, BLOCK_N=n)
        with_d = dict(flags, HAS_D=True, D_PER_P=False)
        fwd = dict(with_d, HAS_INIT=False, STORE_STATES=True, STORE_FINAL=False, STORE_YPRE=False, SEGMENTED=False)
        dstate = dict(flags, HAS_DFINAL=False, HAS_INIT=False, SEGMENTED=False)
        block = dict(with_d, SEGMENTED=False, HAS_INIT=False)
        kernels = [
            ("_fused_fwd_kernel", fwd), ("_fused_fwd_kernel", dict(fwd, BLOCK_P=32)),
            ("_fused_fwd_kernel", dict(fwd, BLOCK_P=32, SEGMENTED=True)),
            ("_fused_fwd_fix_kernel", dict(flags, STORE_FINAL=True, STORE_YPRE=False)),
            ("_fused_dstate_bwd_kernel", dstate), ("_fused_dstate_bwd_kernel", dict(dstate, BLOCK_P=32)),
            ("_fused_dstate_bwd_kernel", dict(dstate, BLOCK_P=32, SEGMENTED=True)),
            ("_fused_block_bwd_kernel", block), ("_fused_block_bwd_kernel", dict(block, SEGMENTED=True)),
        ]
        for name, consts in kernels:
            for warps in (4, 8):
                compiled = compile_sm90(getattr(fused, name), consts, ints, BF16_PTRS, warps)
                res = resources(compiled)
                hgmma = cuobjdump(compiled, "-sass").count("HGMMA.")
                seg = " segmented" if consts.get("SEGMENTED") else ""
                print(f"N={n} {name}{seg} P slice {consts['BLOCK_P']} warps={warps}: {res.get('REG')} registers, "
                      f"stack {res.get('STACK')} bytes, {hgmma} HGMMA", flush=True)


if __name__ == "__main__":
    main()
