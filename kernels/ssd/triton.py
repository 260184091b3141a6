"""SSD (Mamba-2's state space dual) in Triton: the entry that `kernels.ssd` loads as its "triton" backend.

Two paths compute the same function: `fused.py` (one program a head walks the whole sequence) and
`chunk.py` (chunk-parallel kernels). `ssd_scan_triton(..., path=...)` takes the one asked for, or with
path="auto" the fused one when its b·h programs fill the GPU, or, for training, when its programs (P
slices and sequence segments included) fill 3/4 of it (`_use_fused`), which is the workbench's case; the
chunked one otherwise. `step.py` is the decode step. Symbols: `kernels.ssd.common`.

Everything is asynchronous and shape-driven (no host reads of device data), so a training step that
calls these can be captured in a CUDA graph (after a first call has compiled and autotuned them).
"""

import functools

import torch

from kernels import cdiv
from kernels.launch import INTERPRET
from kernels.reference_common import check_groups
from kernels.ssd.chunk import _ssd_bwd, _ssd_fwd
from kernels.ssd.common import _cast, _check, _num_sms, _pow2
from kernels.ssd.fused import _FUSED_T, _fused_bwd, _fused_fwd, _fused_split
from kernels.ssd.step import ssd_step_triton

__all__ = ["PATHS", "ssd_scan_triton", "ssd_step_triton", "unsupported"]

PATHS = ("auto", "fused", "chunked")

# The largest states, P·N with each padded to a power of two, whose kernels fit in a Hopper block's 227 KB of
# shared memory, by input element size; their matrix products keep (T, N), (T, P) and (P, N) operands there.
# Compiled for sm_90 here (triton 3.9; triton 3.6 on an H200 asked ~13% more, 278 KB where 3.9 asks 246):
# - fused: the backward's block kernel, 8 warps, P = 64: fp32 147 KB at N = 64 and 246 KB at N = 128 (an H200
#   refused it); bf16 94 KB at N = 128, 160 KB at N = 256 and 147 KB at (P, N) = (128, 128);
# - chunked: the largest of its kernels, in the autotuner's smallest config: fp32 176 KB at (P, N) = (64, 128)
#   and (128, 64), 224-256 KB at 16,384 entries; bf16 144 KB at (64, 512) and 112 KB at (128, 256).
# GPUs with less shared memory a block (an A100 has 163 KB) fit less; these limits are the H100/H200's.
_FUSED_MAX_STATE = {2: 128 * 128, 4: 64 * 64}
_CHUNKED_MAX_STATE = {2: 64 * 512, 4: 64 * 128}


@functools.cache  # asked on every call: the fused path's check in the forward, the chunked one twice
def _state_fits(dtype: torch.dtype, headdim: int, dstate: int, fused: bool) -> bool:
    limits = _FUSED_MAX_STATE if fused else _CHUNKED_MAX_STATE
    return _pow2(headdim) * _pow2(dstate) <= limits.get(dtype.itemsize, 0)


def _fused_fits(x: torch.Tensor, dstate: int) -> bool:
    """Whether the fused kernels fit in shared memory for x (b, l, h, p)'s dtype and the state size (the
    interpreter has no limit)."""
    return INTERPRET or _state_fits(x.dtype, x.shape[3], dstate, True)


def unsupported(x: torch.Tensor, dstate: int) -> str | None:
    """Why the Triton SSD cannot take x (b, l, h, p) with this state size, or None when it can: no path's
    kernels fit the state in shared memory (the interpreter has no limit)."""
    if INTERPRET or _state_fits(x.dtype, x.shape[3], dstate, False):
        return None
    limit = _CHUNKED_MAX_STATE.get(x.element_size(), 0)
    if not limit:
        return f"x.dtype={x.dtype}: the Triton SSD takes float32, bfloat16 or float16"
    fixes = "bf16 or fp16 inputs, a smaller state" if x.element_size() == 4 else "a smaller state"
    return (f"headdim={x.shape[3]}, d_state={dstate} in {x.dtype}: the Triton SSD holds the (headdim, d_state) "
            f"state in shared memory, up to {limit:,} entries (each size rounded up to a power of two) for this "
            f"dtype; use {fixes}, or backend='torch'")


def _use_fused(shape: tuple[int, ...], device: torch.device, for_backward: bool) -> bool:
    """path="auto"'s choice for x of `shape` (b, l, h, p), from how many programs the fused kernels run: the
    forward alone from b·h ≥ SMs (below, the chunked forward wins even against segments); forward+backward
    once the sequential kernels' programs (b·h, times P slices, times segments) fill 3/4 of the SMs. The
    H200 timings behind both thresholds: BENCHMARKS.md, SSD "v10" and "v8"."""
    batch, seqlen, nheads, headdim = shape
    sms = _num_sms(device)
    if not for_backward:
        return batch * nheads >= sms
    _, programs, segments = _fused_split(batch * nheads, headdim, cdiv(seqlen, _FUSED_T), device)
    return programs * segments >= sms * 3 // 4


class _SSDScanFn(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, dt, A, B, C, chunk_size, D, z, dt_bias, initial_states, dt_softplus, return_final_states,
                for_backward, path):
        # Where the fused kernels would not fit in shared memory, the chunked path runs whatever `path` says.
        wants_fused = path == "fused" or (path == "auto" and _use_fused(x.shape, x.device, for_backward))
        ctx.fused = _fused_fits(x, B.shape[3]) and wants_fused
        if ctx.fused:
            out, final, saved = _fused_fwd(x, dt, A, B, C, D, z, dt_bias, initial_states, dt_softplus,
                                           store_final=return_final_states, for_backward=for_backward)
        else:
            out, final, saved = _ssd_fwd(
                x, dt, A, B, C, chunk_size, D, z, dt_bias, initial_states, dt_softplus,
                store_final=return_final_states, store_ypre=for_backward,
            )
        ctx.save_for_backward(x, dt, A, B, C, D, z, dt_bias, *saved)
        ctx.chunk_size, ctx.dt_softplus = chunk_size, dt_softplus
        ctx.has_init = initial_states is not None
        ctx.init_dtype = initial_states.dtype if initial_states is not None else None
        if return_final_states:
            return out, final
        return out

    @staticmethod
    def backward(ctx, dout, dfinal=None):
        x, dt, A, B, C, D, z, dt_bias, *saved = ctx.saved_tensors
        if ctx.fused:
            grads = _fused_bwd(dout, dfinal, x, dt, A, B, C, D, z, dt_bias, ctx.dt_softplus, ctx.has_init, saved)
        else:
            grads = _ssd_bwd(dout, dfinal, x, dt, A, B, C, ctx.chunk_size, D, z, dt_bias, ctx.dt_softplus,
                             ctx.has_init, saved)
        dx, ddt, dA, dB, dC, dD, dz, dbias, dinit = grads
        if dinit is not None:
            dinit = dinit.to(ctx.init_dtype)
        return dx, ddt, dA, dB, dC, None, dD, dz, dbias, dinit, None, None, None, None


def ssd_scan_triton(x, dt, A, B, C, chunk_size, D=None, z=None, dt_bias=None, dt_softplus=False,
                    initial_states=None, return_final_states=False, path="auto"):
    """SSD scan, the Triton twin of `kernels.ssd.reference.ssd_scan_ref`, on `path`: "fused", "chunked", or
    "auto" (`_use_fused` picks by the shape and whether a backward follows).

    x, z:        (batch, seqlen, nheads, headdim)
    dt:          (batch, seqlen, nheads)
    A:           (nheads,)
    B, C:        (batch, seqlen, ngroups, dstate)
    D:           (nheads,) or (nheads, headdim)
    dt_bias:     (nheads,)
    initial_states: (batch, nheads, headdim, dstate)
    Returns y (batch, seqlen, nheads, headdim) in x.dtype, or (y, final_states fp32 (batch, nheads, headdim, dstate)).
    Internally fp32: Δ, the cumulative decays, the states, and every matrix product's accumulator.
    """
    if path not in PATHS:
        raise ValueError(f"path={path!r}: must be one of 'auto', 'fused', 'chunked'")
    if not (isinstance(chunk_size, int) and not isinstance(chunk_size, bool) and chunk_size > 0):
        raise ValueError(f"chunk_size={chunk_size!r}: must be a positive integer")
    batch, seqlen, nheads, headdim = x.shape
    ngroups, dstate = B.shape[2], B.shape[3]
    check_groups(nheads, ngroups, "nheads")
    _check("dt", dt, (batch, seqlen, nheads))
    _check("A", A, (nheads,))
    _check("B", B, (batch, seqlen, ngroups, dstate))
    _check("C", C, (batch, seqlen, ngroups, dstate))
    if z is not None:
        _check("z", z, x.shape)
    if D is not None and tuple(D.shape) not in ((nheads,), (nheads, headdim)):
        raise ValueError(f"D: shape {tuple(D.shape)}, expected ({nheads},) or ({nheads}, {headdim})")
    if dt_bias is not None:
        _check("dt_bias", dt_bias, (nheads,))
    if initial_states is not None:
        _check("initial_states", initial_states, (batch, nheads, headdim, dstate))
    reason = unsupported(x, dstate)
    if reason:
        raise ValueError(reason)
    # Unit stride on the last axis keeps loads coalesced; B and C join x's dtype for the tensor cores.
    x, z, B, C = (t if t is None or t.stride(-1) == 1 else t.contiguous()
                  for t in (x, z, _cast(B, x.dtype), _cast(C, x.dtype)))
    D = D.contiguous() if D is not None else None
    tensors = (x, dt, A, B, C, D, z, dt_bias, initial_states)
    for_backward = torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in tensors)
    return _SSDScanFn.apply(x, dt, A, B, C, chunk_size, D, z, dt_bias, initial_states, dt_softplus,
                            return_final_states, for_backward, path)

