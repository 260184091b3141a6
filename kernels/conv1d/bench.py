"""Benchmark of the causal conv1d + SiLU: Triton vs the PyTorch reference vs the IO floor, forward and
forward+backward, on one GPU.

    python -m kernels.conv1d.bench                        # the table for BENCHMARKS.md
    python -m kernels.conv1d.bench --json conv1d.json     # also every number to a file

bf16 x (batch, seqlen, channels), fp32 weight (channels, 4) and bias, SiLU, as the Mamba blocks call
it. Two layouts of x: `packed`, a slice of a wider in_proj output (row stride 2·channels + 8, as
Mamba-2's [z, xBC, dt]), and `contiguous`. The reference is the models' path before the kernels:
transpose to (b, c, l), zero-pad, F.conv1d in bf16 (cuDNN), SiLU, transpose back (a strided view; a
consumer that needs it contiguous pays one more copy, not timed here). Forward+backward takes the
gradients of x, weight and bias for a random upstream gradient. IO floor = bytes of x read and out
written (forward; the backward adds x and dout read, dx written) over the bandwidth of a large
device-to-device copy. Times are medians of triton.testing.do_bench (L2 flushed between runs); each
measurement is printed as a JSON line as soon as it is taken. Needs a CUDA GPU.
"""

import argparse
import datetime
import json

import torch
import triton

from kernels.conv1d.reference import causal_conv1d_ref
from kernels.conv1d.triton import causal_conv1d_triton

SHAPES = [(128, 256, c) for c in (256, 320, 640)]  # (batch, seqlen, channels)
WIDTH = 4
DTYPE = torch.bfloat16
LAYOUTS = ("packed", "contiguous")


def bench_ms(fn) -> float:
    return triton.testing.do_bench(fn, warmup=25, rep=100, return_mode="median")


def copy_bandwidth() -> float:
    """Device-to-device copy, bytes read plus written per second."""
    src = torch.empty(2**30, dtype=torch.uint8, device="cuda")
    dst = torch.empty_like(src)
    return 2 * src.numel() / (bench_ms(lambda: dst.copy_(src)) * 1e-3)


def make_inputs(b, l, c, layout, seed=0):
    gen = torch.Generator(device="cuda").manual_seed(seed)
    width = 2 * c + 8 if layout == "packed" else c
    packed = torch.randn(b, l, width, device="cuda", generator=gen).to(DTYPE).requires_grad_()
    x = packed[..., c // 2 : c // 2 + c] if layout == "packed" else packed
    weight = (torch.randn(c, WIDTH, device="cuda", generator=gen) / WIDTH**0.5).requires_grad_()
    bias = torch.randn(c, device="cuda", generator=gen).requires_grad_()
    return x, weight, bias


def time_op(conv, x, weight, bias) -> tuple[float, float]:
    """(forward ms, forward+backward ms) of out = conv(x, weight, bias, activation="silu")."""
    dout = torch.randn(x.shape, device="cuda", dtype=DTYPE)

    def fwd():
        with torch.no_grad():
            conv(x, weight, bias, "silu")

    def fwd_bwd():
        out = conv(x, weight, bias, "silu")
        torch.autograd.grad(out, (x, weight, bias), dout)

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
    for b, l, c in SHAPES:
        for layout in LAYOUTS:
            x, weight, bias = make_inputs(b, l, c, layout)
            elems = x.numel() * x.element_size()
            row = dict(shape=f"({b}, {l}, {c})", layout=layout,
                       floor_fwd_ms=2 * elems / bw * 1e3, floor_fwd_bwd_ms=5 * elems / bw * 1e3)
            row["triton_fwd_ms"], row["triton_fwd_bwd_ms"] = time_op(causal_conv1d_triton, x, weight, bias)
            row["ref_fwd_ms"], row["ref_fwd_bwd_ms"] = time_op(causal_conv1d_ref, x, weight, bias)
            emit("row", row)
            rows.append(row)
    if args.json:
        with open(args.json, "w") as f:
            json.dump(dict(env=env, copy_bw_tb_s=bw / 1e12, rows=rows), f, indent=1)

    print(f"\n{env['device']} · torch {env['torch']} · triton {env['triton']} · copy {bw / 1e12:.2f} TB/s · "
          f"bf16, width {WIDTH}, SiLU\n")
    print("| (b, l, c) | x | floor fwd | Triton fwd | ref fwd | speed-up | floor fwd+bwd | Triton fwd+bwd "
          "| ref fwd+bwd | speed-up |")
    print("|---|---|---|---|---|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['shape']} | {r['layout']} | {r['floor_fwd_ms']:.4f} ms | {r['triton_fwd_ms']:.4f} ms "
              f"| {r['ref_fwd_ms']:.4f} ms | {r['ref_fwd_ms'] / r['triton_fwd_ms']:.1f}x "
              f"| {r['floor_fwd_bwd_ms']:.4f} ms | {r['triton_fwd_bwd_ms']:.4f} ms | {r['ref_fwd_bwd_ms']:.4f} ms "
              f"| {r['ref_fwd_bwd_ms'] / r['triton_fwd_bwd_ms']:.1f}x |")


if __name__ == "__main__":
    main()
