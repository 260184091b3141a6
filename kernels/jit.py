"""@triton.jit helpers that more than one op's kernels call, written once: the scans' softplus (an accurate
one, and mamba_ssm's short one for the SSD, whose fused forward has Δ on its critical path) and its gradient."""

import triton
import triton.language as tl


@triton.jit
def softplus(v):
    """log(1 + exp(v)) with Kahan's log1p trick (tl has no log1p): Δ is often ~1e-3, where log(1 + e) loses
    most of its digits. The identity above 20, as torch's default threshold and mamba_ssm."""
    e = tl.exp(v)
    w = 1.0 + e
    log1p_e = tl.where(w == 1.0, e, tl.log(w) * e / (w - 1.0))
    return tl.where(v <= 20.0, log1p_e, v)


@triton.jit
def softplus_short(v):
    """log(1 + exp(v)) as mamba_ssm's SSD kernels write it, the identity above 20: two special functions and
    no division, ~6e-5 relative error where Δ ~ 1e-3 (1 + e rounds). The SSD takes it because its fused
    forward computes each block's Δ inside the sequential chain of blocks, where `softplus` made the whole
    forward 1.6x slower on an H200 (BENCHMARKS.md, SSD "stop 33")."""
    return tl.where(v > 20.0, v, tl.log(1.0 + tl.exp(tl.minimum(v, 20.0))))


@triton.jit
def softplus_grad(g, v):
    """g·softplus'(v) = g·sigmoid(v): the gradient g of softplus(v) taken back to v; the identity's
    (g itself) above 20, where `softplus` is the identity."""
    return tl.where(v <= 20.0, g * tl.sigmoid(v), g)
