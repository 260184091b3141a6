"""What the SSD's Triton files share: the @triton.jit helpers every path calls, and host helpers.

Glossary (paper symbols): b = batch, l = seqlen, h = nheads, p = headdim (P), g = ngroups, n = d_state (N),
Q = chunk_size, Δ = dt (after dt_bias and softplus), A: one negative scalar per head, cs = the cumulative
sum of Δ·A inside a chunk (inclusive), S = the state (P×N) entering a chunk, G = the gradient of the loss
with respect to the state leaving a chunk, seen from the tokens after it.

Per head:  h_t = exp(Δ_t·A)·h_{t−1} + Δ_t·x_t B_tᵀ,   y_t = (h_t C_t + D·x_t)·silu(z_t).
"""

import functools

import torch
import triton
import triton.language as tl

from kernels import next_pow2
from kernels.jit import softplus_short
from kernels.launch import INTERPRET, autotune

# Every matrix-product dimension (rows, tokens, P, N) is tiled by at least 64 on the GPU: on Hopper,
# Triton 3.4-3.6 miscompiles kernels holding two or more tl.dot with 16- or 32-wide tiles (illegal
# memory accesses and silent corruption; seen here on tiny shapes, and worked around the same way in
# pytorch/helion#1905). Smaller dimensions are masked. The interpreter keeps 16 for speed.
_MIN_DOT = 16 if INTERPRET else 64


def _autotune(configs, key):
    """`triton.autotune` on the GPU; the interpreter cannot time kernels, so it gets the first config."""
    return autotune(configs[:1] if INTERPRET else configs, key)


# Triton 3.9's interpreter multiplies bf16 operands wrongly in tl.dot; fp32 operands give it the exact
# products that the GPU's bf16 tensor cores accumulate in fp32.
_DOT_IN_FP32 = tl.constexpr(INTERPRET)


@triton.jit
def _dot(a, b):
    if _DOT_IN_FP32:
        return tl.dot(a.to(tl.float32), b.to(tl.float32))
    return tl.dot(a, b)


@triton.jit
def _process_dt(dt_raw, bias, DT_SOFTPLUS: tl.constexpr):
    """Δ = softplus(dt + dt_bias) (`kernels.jit.softplus_short`, mamba_ssm's), or dt + dt_bias."""
    dt = dt_raw + bias
    if DT_SOFTPLUS:
        dt = softplus_short(dt)
    return dt


@triton.jit
def _gated_grad(dout_ptr, z_ptr, o_off, z_off, mask, HAS_Z: tl.constexpr):
    """dy = dout·silu(z), the gradient of the scan's output before the gate (fp32)."""
    dy = tl.load(dout_ptr + o_off, mask=mask, other=0.0).to(tl.float32)
    if HAS_Z:
        z = tl.load(z_ptr + z_off, mask=mask, other=0.0).to(tl.float32)
        dy = dy * z * tl.sigmoid(z)
    return dy


@triton.jit
def _head(bh, nheads, heads_per_group):
    """Program index b·h → batch (int64, for offsets), head, and the head's group of B and C."""
    hh = bh % nheads
    return (bh // nheads).to(tl.int64), hh, hh // heads_per_group


@triton.jit
def _head_params(A_ptr, dt_bias_ptr, hh, HAS_DT_BIAS: tl.constexpr):
    """A and dt_bias of head hh in fp32 (dt_bias 0 when there is none)."""
    bias = tl.load(dt_bias_ptr + hh).to(tl.float32) if HAS_DT_BIAS else 0.0
    return tl.load(A_ptr + hh).to(tl.float32), bias


@triton.jit
def _load_D(D_ptr, hh, headdim, offs_p, mask_p, D_PER_P: tl.constexpr):
    """D of head hh in fp32: its (P,) row (D_PER_P) or its scalar; either broadcasts over (tokens, P)."""
    # One return: triton 3.6 rejects returns of different shapes even under a constexpr branch.
    if D_PER_P:
        Dv = tl.load(D_ptr + hh * headdim + offs_p, mask=mask_p, other=0.0)
    else:
        Dv = tl.load(D_ptr + hh)
    return Dv.to(tl.float32)

def _pow2(v: int, lo: int = _MIN_DOT) -> int:
    return max(lo, next_pow2(v))


def _cast(t: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    # `t.to(dtype)` returns t itself when the dtype matches, but still pays a dispatch (~5 µs of host
    # time here); a forward+backward on either path makes several.
    return t if t.dtype == dtype else t.to(dtype)


@functools.cache  # asked on every call (`_use_fused`) and in `_ssd_bwd`'s split loop
def _num_sms(device: torch.device) -> int:
    if device.type == "cuda":
        return torch.cuda.get_device_properties(device).multi_processor_count
    return 4  # interpreter: small, so that tiny test shapes still split heads across programs


def _check(name, t, shape):
    if tuple(t.shape) != tuple(shape):
        raise ValueError(f"{name}: shape {tuple(t.shape)}, expected {tuple(shape)}")

