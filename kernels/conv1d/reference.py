"""Causal depthwise conv1d, Mamba's short convolution, in plain PyTorch: the spec of the Triton
kernels and the path for CPU tensors and for decoding from a state.

Per channel c, with width W taps w[c, 0..W−1] (the last tap reads the current token):
    out_t = act(bias_c + Σ_{k<W} w[c, k]·x_{t−(W−1)+k}),   x before the sequence start = 0
         (or the inputs held in `state`), act = silu or the identity.
This is mamba_ssm's `causal_conv1d_fn(x.transpose(1, 2), weight, bias, activation)`, channel-last.

Shapes:
    x, out:  (batch, seqlen, channels)
    weight:  (channels, width)
    bias:    (channels,)
    state:   (batch, channels, width − 1)
"""

import torch
import torch.nn.functional as F
from torch import Tensor

ACTIVATIONS = (None, "silu", "swish")  # "swish" is silu's other name, as mamba_ssm accepts it


def check_activation(activation: str | None) -> None:
    if activation not in ACTIVATIONS:
        raise ValueError(f"activation={activation!r}: must be None, 'silu' or 'swish'")


def causal_conv1d_ref(
    x: Tensor, weight: Tensor, bias: Tensor | None = None, activation: str | None = None, state: Tensor | None = None
) -> Tensor:
    """act(causal depthwise conv of x) that continues from `state`.

    state (None = zeros, a sequence start) holds the width − 1 inputs before x and is overwritten with
    the last width − 1 inputs, so that calling this chunk by chunk (or token by token) equals one call.
    The conv runs in x's dtype, as F.conv1d does under autocast (weight and bias are cast to it).
    Returns (batch, seqlen, channels) in x's dtype: a transposed view of F.conv1d's (b, c, l) output.
    """
    check_activation(activation)
    width = weight.shape[-1]
    x = x.transpose(1, 2)  # (b, c, l)
    past = x.new_zeros(*x.shape[:2], width - 1) if state is None else state.to(x.dtype)
    x = torch.cat([past, x], dim=-1)  # (b, c, width − 1 + l)
    if state is not None:
        state.copy_(x[..., x.shape[-1] - (width - 1) :])
    bias = None if bias is None else bias.to(x.dtype)
    out = F.conv1d(x, weight.to(x.dtype).unsqueeze(1), bias, groups=x.shape[1])  # (b, c, l)
    if activation is not None:
        out = F.silu(out)
    return out.transpose(1, 2)
