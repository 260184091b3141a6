"""Benchmark of the causal conv1d + SiLU: Triton vs the PyTorch reference vs the IO floor, forward and
forward+backward, on one GPU.

    python -m bench.conv1d                     # the table for BENCHMARKS.md
    python -m bench.conv1d --json conv1d.json        # also every number to a file

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

import functools

import torch

from bench import common
from kernels.conv1d.reference import causal_conv1d_ref
from kernels.conv1d.triton import causal_conv1d_triton

SHAPES = [(128, 256, c) for c in (256, 320, 640)]  # (batch, seqlen, channels)
WIDTH = 4
DTYPE = torch.bfloat16
LAYOUTS = ("packed", "contiguous")


def make_inputs(b, l, c, layout, seed=0):
    gen = torch.Generator(device="cuda").manual_seed(seed)
    width = 2 * c + 8 if layout == "packed" else c
    packed = torch.randn(b, l, width, device="cuda", generator=gen).to(DTYPE).requires_grad_()
    x = packed[..., c // 2 : c // 2 + c] if layout == "packed" else packed
    weight = (torch.randn(c, WIDTH, device="cuda", generator=gen) / WIDTH**0.5).requires_grad_()
    bias = torch.randn(c, device="cuda", generator=gen).requires_grad_()
    return x, weight, bias


if __name__ == "__main__":
    common.main(__doc__, SHAPES, LAYOUTS, make_inputs, functools.partial(causal_conv1d_triton, activation="silu"),
               functools.partial(causal_conv1d_ref, activation="silu"), floor_reads=(2, 5),
               header="(b, l, c) | x", note=f"bf16, width {WIDTH}, SiLU")
