"""Benchmark of the gated RMSNorm: Triton vs the PyTorch reference vs the IO floor, forward and
forward+backward, on one GPU.

    python -m bench.gated_norm                     # the table for BENCHMARKS.md
    python -m bench.gated_norm --json gated_norm.json      # also every number to a file

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

import torch

from bench import common
from kernels.gated_norm.reference import gated_rms_norm_ref
from kernels.gated_norm.triton import gated_rms_norm_triton

SHAPES = [(128, 256, d) for d in (256, 320, 640)]  # (batch, seqlen, d)
DTYPE = torch.bfloat16
LAYOUTS = ("packed", "contiguous")
EPS = 1e-5


def make_inputs(b, l, d, layout, seed=0):
    gen = torch.Generator(device="cuda").manual_seed(seed)
    y = torch.randn(b, l, d, device="cuda", generator=gen).to(DTYPE).requires_grad_()
    width = 2 * d + 8 if layout == "packed" else d
    packed = torch.randn(b, l, width, device="cuda", generator=gen).to(DTYPE).requires_grad_()
    z = packed[..., :d] if layout == "packed" else packed
    weight = (1 + 0.1 * torch.randn(d, device="cuda", generator=gen)).requires_grad_()
    return y, z, weight


if __name__ == "__main__":
    # Group size d (one group) and eps as the Mamba-2 block; y first: it is the size of the output.
    common.main(__doc__, SHAPES, LAYOUTS, make_inputs,
               lambda y, z, w: gated_rms_norm_triton(y, z, w, y.shape[-1], EPS),
               lambda y, z, w: gated_rms_norm_ref(y, z, w, y.shape[-1], EPS), floor_reads=(3, 8),
               header="(b, l, d) | z", note="bf16, one group")
