"""Benchmark of the gated RMSNorm: Triton vs the PyTorch reference vs the IO floor, forward and
forward+backward, on one GPU.

    python -m kernels.gated_norm.bench                         # the table for BENCHMARKS.md
    python -m kernels.gated_norm.bench --json gated_norm.json  # also every number to a file

bf16 y (batch, seqlen, d), the SSD's output, and z, fp32 weight, one group (Mamba-2's ngroups = 1), as
the Mamba-2 block calls it. Two layouts of z: `packed`, the first d channels of a wider in_proj output
(row stride 2·d + 8, as Mamba-2's [z, xBC, dt]), and `contiguous`. The reference is the models' fp32
path before the kernels (`gated_rms_norm_ref`: casts, silu, mean of squares, rsqrt, scale, cast back).
Forward+backward takes the gradients of y, z and weight for a random upstream gradient. IO floor =
bytes of y, z read and out written (forward; the backward adds y, z and dout read, dy and dz written)
over the bandwidth of a large device-to-device copy. Times are medians of triton.testing.do_bench (L2
flushed between runs); each measurement is printed as a JSON line as soon as it is taken. Needs a
CUDA GPU.
"""

import argparse
import datetime
import json

import torch
import triton

from kernels.gated_norm.reference import gated_rms_norm_ref
from kernels.gated_norm.triton import gated_rms_norm_triton

SHAPES = [(128, 256, d) for d in (256, 320, 640)]  # (batch, seqlen, d)
DTYPE = torch.bfloat16
LAYOUTS = ("packed", "contiguous")
EPS = 1e-5


def bench_ms(fn) -> float:
    return triton.testing.do_bench(fn, warmup=25, rep=100, return_mode="median")


def copy_bandwidth() -> float:
    """Device-to-device copy, bytes read plus written per second."""
    src = torch.empty(2**30, dtype=torch.uint8, device="cuda")
    dst = torch.empty_like(src)
    return 2 * src.numel() / (bench_ms(lambda: dst.copy_(src)) * 1e-3)


def make_inputs(b, l, d, layout, seed=0):
    gen = torch.Generator(device="cuda").manual_seed(seed)
    y = torch.randn(b, l, d, device="cuda", generator=gen).to(DTYPE).requires_grad_()
    width = 2 * d + 8 if layout == "packed" else d
    packed = torch.randn(b, l, width, device="cuda", generator=gen).to(DTYPE).requires_grad_()
    z = packed[..., :d] if layout == "packed" else packed
    weight = (1 + 0.1 * torch.randn(d, device="cuda", generator=gen)).requires_grad_()
    return y, z, weight


def time_op(norm, y, z, weight) -> tuple[float, float]:
    """(forward ms, forward+backward ms) of out = norm(y, z, weight, group_size=d)."""
    dout = torch.randn(y.shape, device="cuda", dtype=DTYPE)
    d = y.shape[-1]

    def fwd():
        with torch.no_grad():
            norm(y, z, weight, d, EPS)

    def fwd_bwd():
        out = norm(y, z, weight, d, EPS)
        torch.autograd.grad(out, (y, z, weight), dout)

    return bench_ms(fwd), bench_ms(fwd_bwd)


def emit(kind, row):
    print(json.dumps(dict(kind=kind, **row)), flush=True)


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--json", help="write all numbers to this file")
    args = p.parse_args()

    props = torch.cuda.get_device_properties(0)
    env = dict(date=datetime.date.today().isoformat(), device=props.name, torch=torch.__version__,
               triton=triton.__version__, cuda=torch.version.cuda)
    bw = copy_bandwidth()
    emit("env", dict(env, copy_bw_tb_s=bw / 1e12))
    rows = []
    for b, l, d in SHAPES:
        for layout in LAYOUTS:
            y, z, weight = make_inputs(b, l, d, layout)
            elems = y.numel() * y.element_size()
            row = dict(shape=f"({b}, {l}, {d})", layout=layout,
                       floor_fwd_ms=3 * elems / bw * 1e3, floor_fwd_bwd_ms=8 * elems / bw * 1e3)
            row["triton_fwd_ms"], row["triton_fwd_bwd_ms"] = time_op(gated_rms_norm_triton, y, z, weight)
            row["ref_fwd_ms"], row["ref_fwd_bwd_ms"] = time_op(gated_rms_norm_ref, y, z, weight)
            emit("row", row)
            rows.append(row)
    if args.json:
        with open(args.json, "w") as f:
            json.dump(dict(env=env, copy_bw_tb_s=bw / 1e12, rows=rows), f, indent=1)

    print(f"\n{env['device']} · torch {env['torch']} · triton {env['triton']} · copy {bw / 1e12:.2f} TB/s · "
          f"bf16, one group\n")
    print("| (b, l, d) | z | floor fwd | Triton fwd | ref fwd | speed-up | floor fwd+bwd | Triton fwd+bwd "
          "| ref fwd+bwd | speed-up |")
    print("|---|---|---|---|---|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['shape']} | {r['layout']} | {r['floor_fwd_ms']:.4f} ms | {r['triton_fwd_ms']:.4f} ms "
              f"| {r['ref_fwd_ms']:.4f} ms | {r['ref_fwd_ms'] / r['triton_fwd_ms']:.1f}x "
              f"| {r['floor_fwd_bwd_ms']:.4f} ms | {r['triton_fwd_bwd_ms']:.4f} ms | {r['ref_fwd_bwd_ms']:.4f} ms "
              f"| {r['ref_fwd_bwd_ms'] / r['triton_fwd_bwd_ms']:.1f}x |")


if __name__ == "__main__":
    main()
