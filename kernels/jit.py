"""@triton.jit helpers that more than one op's kernels call, written once: the two scans' softplus and
its gradient."""

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
def softplus_grad(g, v):
    """g·softplus'(v) = g·sigmoid(v): the gradient g of softplus(v) taken back to v; the identity's
    (g itself) above 20, where `softplus` is the identity."""
    return tl.where(v <= 20.0, g * tl.sigmoid(v), g)
