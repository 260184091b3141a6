"""Sequence-mixer kernels: one folder per op, each with `reference.py` (plain PyTorch, the spec and
the CPU path) and `triton.py` (GPU kernels), dispatched by the op's `__init__` on `backend`:

    "torch"   the PyTorch reference
    "triton"  the op's Triton module (on CPU it runs only under TRITON_INTERPRET=1)
    "auto"    Triton for CUDA tensors when the op's Triton module imports, else the reference

Triton modules are imported only when they are chosen, so a CPU install never needs them.

Shared by the ops: `jit.py` (@triton.jit helpers of both scans), `launch.py` (direct launches) and
`reference_common.py` (what the scans' references share).
"""

import functools
import importlib
import warnings
from types import ModuleType

BACKENDS = ("auto", "torch", "triton")


def load_backend(module: str, backend: str, x) -> ModuleType | None:
    """The Triton module (dotted name `module`) that `backend` picks for input x, or None for torch."""
    if backend not in BACKENDS:
        raise ValueError(f"backend={backend!r}: must be one of 'auto', 'torch', 'triton'")
    if backend == "torch" or (backend == "auto" and not x.is_cuda):
        return None
    if backend == "triton":
        return importlib.import_module(module)  # asked for by name: an import failure is the user's error
    return _import_or_none(module)


@functools.cache
def _import_or_none(module: str) -> ModuleType | None:
    # Cached so that "auto" pays for (and warns about) a failed import once, not on every call.
    try:
        return importlib.import_module(module)
    except ImportError as e:
        warnings.warn(f"{module} could not be imported ({e}); backend='auto' uses the PyTorch reference")
        return None


def cdiv(a: int, b: int) -> int:
    """⌈a / b⌉ for the launchers' host code. `triton.cdiv` and `triton.next_power_of_2` are constexpr
    functions in recent Triton, ~5 µs a host call; a launch computes several of these."""
    return -(-a // b)


def next_pow2(v: int) -> int:
    """The least power of two ≥ v (v ≥ 1)."""
    return 1 << (v - 1).bit_length()
