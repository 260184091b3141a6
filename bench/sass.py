"""Compile a Triton kernel for sm_90 without a GPU and read what the compiler made of it: registers,
spills (stack) and the SASS. Used by `ssd_sass.py` and `selective_scan_sass.py`; it needs only triton (which
ships ptxas and cuobjdump). Counts from a local Triton can differ a little from the GPU machine's Triton."""

import os
import re
import subprocess
import tempfile

import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource

CUOBJDUMP = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", "cuobjdump")


def compile_sm90(kernel, constexprs: dict, ints: dict, bf16_ptrs: set, num_warps: int, maxnreg: int | None = None):
    """Compile as a launch with these int arguments would: pointers 16-byte aligned (bf16 where named
    in `bf16_ptrs`, else fp32), ints equal to 1 turned into constants, ints divisible by 16 marked so."""
    kernel = kernel.jit  # through `fast_launch` (and an autotuner) to the @triton.jit function
    signature, attrs, constexprs = {}, {}, dict(constexprs)
    for i, name in enumerate(kernel.arg_names):
        if name in constexprs:
            signature[name] = "constexpr"
        elif name.endswith("_ptr"):
            signature[name] = "*bf16" if name in bf16_ptrs else "*fp32"
            attrs[(i,)] = [["tt.divisibility", 16]]
        elif ints[name] == 1:
            signature[name] = "constexpr"
            constexprs[name] = 1
        else:
            signature[name] = "i32"
            if ints[name] % 16 == 0:
                attrs[(i,)] = [["tt.divisibility", 16]]
    src = ASTSource(kernel, signature, constexprs=constexprs, attrs=attrs)
    return triton.compile(src, target=GPUTarget("cuda", 90, 32),
                          options=dict(num_warps=num_warps, maxnreg=maxnreg))


def cuobjdump(compiled, *flags: str) -> str:
    """cuobjdump's output (e.g. "-sass", "-res-usage") for the compiled kernel's cubin."""
    with tempfile.TemporaryDirectory() as tmp:
        path = os.path.join(tmp, "k.cubin")
        with open(path, "wb") as f:
            f.write(compiled.asm["cubin"])
        return subprocess.run([CUOBJDUMP, *flags, path], capture_output=True, text=True, check=True).stdout


def resources(compiled) -> dict[str, int]:
    """Registers a thread (REG) and spill stack bytes (STACK) of the compiled kernel."""
    usage = cuobjdump(compiled, "-res-usage")
    return {k: int(v) for k, v in re.findall(r"(REG|STACK):(\d+)", usage.split("Function")[-1])}
