"""Causal depthwise conv1d (Mamba's short conv) with an optional fused SiLU, with a backend switch (see
`kernels`): "torch" is `reference.py`, "triton" is `triton.py`, "auto" picks Triton for CUDA tensors
(the reference, with a warning, for widths the kernels do not take).

The Triton kernels cover the training path, a whole sequence from a zero state. Decoding from a
`state` always runs the reference, whatever the backend: it is a few multiply-adds a channel.

Shapes (channel-last, as the projections produce them; mamba_ssm's `causal_conv1d_fn` takes x
transposed to (batch, channels, seqlen)):
    x, out:  (batch, seqlen, channels)     a slice of in_proj's output is fine (unit channel stride)
    weight:  (channels, width)             nn.Conv1d's (channels, 1, width) weight, squeezed
    bias:    (channels,)
    state:   (batch, channels, width − 1)
"""

import warnings

from torch import Tensor

from kernels import load_backend
from kernels.conv1d.reference import causal_conv1d_ref

__all__ = ["causal_conv1d"]

_TRITON = "kernels.conv1d.triton"


def causal_conv1d(
    x: Tensor,
    weight: Tensor,
    bias: Tensor | None = None,
    activation: str | None = None,
    state: Tensor | None = None,
    backend: str = "auto",
) -> Tensor:
    """act(bias + Σ_k weight[:, k]·x_{t−(W−1)+k}) per channel, act = silu ("silu"/"swish") or None.

    With a state (batch, channels, width − 1), continue from the inputs it holds and overwrite it with
    the last width − 1 inputs. Returns (batch, seqlen, channels) in x's dtype.
    """
    impl = None if state is not None else load_backend(_TRITON, backend, x)
    if impl is not None and backend == "auto":
        reason = impl.unsupported(x, weight)
        if reason:  # shown once per distinct message (Python's default warning filter)
            warnings.warn(f"{reason}; backend='auto' uses the PyTorch reference")
            impl = None
    if impl is None:
        return causal_conv1d_ref(x, weight, bias, activation, state)
    return impl.causal_conv1d_triton(x, weight, bias, activation)
