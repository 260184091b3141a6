"""Launch Triton kernels for less host time than `kernel[grid](...)` costs.

On the GPU machine (an H200 on a Xeon host, triton 3.6), one launch of an autotuned kernel with ~40
arguments took 88 µs of host time: ~45 µs in the autotuner (its key holds a `str` of every tensor's
dtype), ~30 µs in the JIT's binding and specialisation, and ~15 µs in the compiled kernel's own
launcher. An eager forward+backward of the fused SSD launches three kernels against ~0.4 ms of GPU
time, so those 88 µs a launch set the pace (bench/notes/ssd.md, "v6: direct launches").

`@fast_launch` over a `@triton.jit` kernel (autotuned or not) keeps the call syntax,
`kernel[grid](*runtime_args, **constexprs_and_options)`. The first call with a given key goes through
Triton, which compiles, autotunes and launches; the compiled kernel it chose is then remembered, and
later calls with the same key launch it directly. The key holds more than Triton specialises on, so
one key never needs two compiled kernels: the device, every int argument's value, every tensor's dtype
and whether its address is 16-byte aligned, and every keyword. Under TRITON_INTERPRET=1 there is no
compiled kernel: `fast_launch` then returns the kernel as it is.
"""

import os

import torch
import triton

INTERPRET = os.environ.get("TRITON_INTERPRET") == "1"  # Triton's CPU interpreter: no compiled kernels
_MAX_KEYS = 256  # a kernel called at ever new shapes (a sweep over lengths) starts over past this


def autotune(configs, key, **kwargs):
    """`triton.autotune` with its choices kept on disk, in Triton's cache beside the compiled kernels:
    a new process at known shapes (a sweep's next trial, a resumed run) loads them instead of timing
    every config again, which a run's first step otherwise waits for. The interpreter keeps nothing."""
    return triton.autotune(configs=configs, key=key, cache_results=True, **kwargs)


def launch_key(device: int, args: tuple, kwargs: dict) -> tuple:
    """What decides which compiled kernel a launch needs, and every value baked into it as a constant."""
    # One comprehension, ints tested first: this runs on every launch, and most arguments are ints.
    return (device, *kwargs.items(), *[
        a if type(a) is int
        else (a.dtype, a.data_ptr() % 16 == 0) if isinstance(a, torch.Tensor)
        else float if type(a) is float  # Triton passes floats as fp32 values, never as constants
        else a
        for a in args
    ])


class FastLaunch:
    def __init__(self, kernel):
        self.kernel = kernel
        self.jit = kernel.fn if isinstance(kernel, triton.runtime.Autotuner) else kernel
        self.compiled = {}  # launch_key -> (CompiledKernel, the constexpr values after the runtime arguments)

    def __getitem__(self, grid):
        return lambda *args, **kwargs: self._launch(grid, args, kwargs)

    def _launch(self, grid, args, kwargs):
        key = launch_key(torch.cuda.current_device(), args, kwargs)
        entry = self.compiled.get(key)
        if entry is None:
            self.kernel[grid](*args, **kwargs)
            self._remember(key, grid, args, kwargs)
            return
        compiled, constexprs = entry
        if callable(grid):  # as Triton does: the grid function reads the named arguments
            grid = grid(dict(zip(self.jit.arg_names, (*args, *constexprs))))
        compiled[(*grid, 1, 1)[:3]](*args, *constexprs)

    def _remember(self, key, grid, args, kwargs):
        options = dict(kwargs)
        if self.jit is not self.kernel:
            options.update(self.kernel.best_config.all_kwargs())  # the config the autotuner launched
        params = self.jit.params[len(args):]
        if not all(p.is_constexpr and p.name in options for p in params):
            raise TypeError(f"{self.jit.__name__}: pass runtime arguments by position, every constexpr by name")
        compiled = self.jit.run(*args, grid=grid, warmup=True, **options)  # a cache hit: compiles nothing
        if len(self.compiled) >= _MAX_KEYS:
            self.compiled.clear()
        self.compiled[key] = (compiled, tuple(options[p.name] for p in params))


def fast_launch(kernel):
    """Decorator: `kernel[grid](...)` as before, launched directly once Triton has compiled it."""
    return kernel if INTERPRET else FastLaunch(kernel)
