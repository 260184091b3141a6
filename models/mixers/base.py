"""The mixer contract: a `Mixer` is an nn.Module built from a dataclass of hyper-parameters, its `Config`.

A mixer file (`models/mixers/<name>.py`) holds exactly one `Mixer` subclass and its `Config`. The
Config's fields are the mixer's hyper-parameters, the keys `model.<key>` it takes (the first is
d_model, which the LM supplies); its `__post_init__` validates them with messages that start
`key=value:`. The mixer is built as `cls(d_model, **params)`, params being the Config's other fields.

Every mixer computes a causal map of a sequence and can continue it token by token:
    forward(x: (batch, seqlen, d_model), cache=None) -> (batch, seqlen, d_model)
        with a cache, continue from the state in it and leave the final state there;
    step(x: (batch, d_model), cache) -> (batch, d_model)
        the token after those in the cache; updates the cache;
    allocate_cache(batch_size, max_seqlen, device=None, dtype=None) -> the state of an empty sequence;
    state_size(seq_len) -> the numbers a layer keeps to continue a sequence (Zoology's accounting).
It has an `out_proj` Linear (the projection into the residual stream, which the LM's init scales with
depth) and says whose init it follows under the LM's init="mixer" in `reference_init`: "gpt2"
(every Linear N(0, 0.02), as Zoology) or "mamba_ssm" (PyTorch's Linear init, as mamba_ssm).
"""

import dataclasses

from torch import nn


class Mixer(nn.Module):
    """Base of every mixer: see the module docstring for the contract."""

    Config: type
    reference_init: str

    @classmethod
    def hyperparameters(cls) -> list[str]:
        """The names of its hyper-parameters, d_model first: the Config's constructor fields."""
        return [f.name for f in dataclasses.fields(cls.Config) if f.init]


def check_positive_int(name: str, value) -> None:
    """ValueError unless `value` is a real int > 0 (a bool is not an int here)."""
    if not (isinstance(value, int) and not isinstance(value, bool) and value > 0):
        raise ValueError(f"{name}={value!r}: must be a positive integer")
