"""`kernels.launch.fast_launch`: after Triton's first launch, later launches with the same key take the
compiled kernel directly, and must compute exactly what Triton's own launch does."""

import pytest
import torch
import triton
import triton.language as tl

from kernels.launch import fast_launch, launch_key


def test_key_separates_what_triton_specialises_on():
    x = torch.zeros(64)
    base = launch_key(0, (x, 64, 0.5), {"BLOCK": 32})
    assert launch_key(0, (torch.ones(64), 64, 2.0), {"BLOCK": 32}) == base  # new data, new float: same kernel
    assert launch_key(0, (x[1:], 64, 0.5), {"BLOCK": 32}) != base  # 4-byte offset: not 16-byte aligned
    assert launch_key(0, (x.double(), 64, 0.5), {"BLOCK": 32}) != base
    assert launch_key(0, (x, 65, 0.5), {"BLOCK": 32}) != base
    assert launch_key(0, (x, 64, 0.5), {"BLOCK": 64}) != base
    assert launch_key(1, (x, 64, 0.5), {"BLOCK": 32}) != base


@fast_launch
@triton.jit
def _axpb_kernel(x_ptr, y_ptr, n, a, b, BLOCK: tl.constexpr):
    offs = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    mask = offs < n
    tl.store(y_ptr + offs, tl.load(x_ptr + offs, mask=mask) * a + b, mask=mask)


@fast_launch
@triton.autotune(configs=[triton.Config({"BLOCK": 32}), triton.Config({"BLOCK": 128})], key=["n"])
@triton.jit
def _tuned_axpb_kernel(x_ptr, y_ptr, n, a, b, BLOCK: tl.constexpr):
    offs = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    mask = offs < n
    tl.store(y_ptr + offs, tl.load(x_ptr + offs, mask=mask) * a + b, mask=mask)


def _axpb(kernel, x, a, b, grid):
    y = torch.full_like(x, float("nan"))  # poisoned: an element the launch misses stays NaN
    kernel[grid](x, y, x.numel(), a, b, **({} if kernel is _tuned_axpb_kernel else {"BLOCK": 64}))
    return y


@pytest.mark.gpu
def test_direct_launches_compute_what_triton_does():
    _axpb_kernel.compiled.clear()
    n = 1000
    grid = (triton.cdiv(n, 64),)
    for i in range(3):  # the first through Triton, then two direct launches with fresh data and floats
        x = torch.randn(n + 1, device="cuda")[:n]
        torch.testing.assert_close(_axpb(_axpb_kernel, x, 0.5 + i, -1.0, grid), x * (0.5 + i) - 1.0)
    assert len(_axpb_kernel.compiled) == 1
    x = torch.randn(n + 1, device="cuda")[1:]  # misaligned: Triton would compile another kernel
    torch.testing.assert_close(_axpb(_axpb_kernel, x, 2.0, 3.0, grid), x * 2.0 + 3.0)
    assert len(_axpb_kernel.compiled) == 2


@pytest.mark.gpu
def test_autotuned_kernel_with_a_grid_function():
    _tuned_axpb_kernel.compiled.clear()
    n = 777  # not a multiple of either BLOCK: the grid must come from the config the autotuner chose

    def grid(meta):
        return (triton.cdiv(n, meta["BLOCK"]),)

    for _ in range(3):
        x = torch.randn(n, device="cuda")
        torch.testing.assert_close(_axpb(_tuned_axpb_kernel, x, 3.0, 0.25, grid), x * 3.0 + 0.25)
    assert len(_tuned_axpb_kernel.compiled) == 1


@pytest.mark.gpu
def test_runtime_argument_by_name_is_refused():
    x = torch.randn(64, device="cuda")
    with pytest.raises(TypeError, match="by position"):
        _axpb_kernel[(1,)](x, x, 64, 1.0, b=0.0, BLOCK=64)
