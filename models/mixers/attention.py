"""Multi-head causal softmax attention (PyTorch SDPA), with optional rotary position embeddings.

Glossary: h = n_heads, hd = head_dim = d_model / h, K/V cache = the keys and values of every token
seen so far, which is the attention layer's whole state (so it grows with the sequence).
"""

from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from models.mixers.base import Mixer, check_positive_int

POSITIONS = ("none", "rope")


@dataclass
class AttentionConfig:
    """Attention's hyper-parameters: h = n_heads (dividing d_model); hd = head_dim is derived.

    pos and max_seqlen are the LM's (`model.pos`, `model.max_seqlen`): "rope" rotates queries and keys,
    for positions [0, max_seqlen); the LM's learned positions are added before the blocks ("none" here).
    """

    d_model: int
    n_heads: int = 1
    pos: str = "none"
    max_seqlen: int = 2048
    head_dim: int = field(init=False)

    def __post_init__(self):
        for name in ("d_model", "n_heads", "max_seqlen"):
            check_positive_int(name, getattr(self, name))
        if self.d_model % self.n_heads:
            raise ValueError(f"n_heads={self.n_heads}: must divide d_model={self.d_model}")
        if self.pos not in POSITIONS:
            raise ValueError(f"pos={self.pos!r}: must be one of {', '.join(POSITIONS)}")
        self.head_dim = self.d_model // self.n_heads
        if self.pos == "rope" and self.head_dim % 2:
            raise ValueError(
                f"n_heads={self.n_heads}: pos='rope' needs an even head_dim=d_model/n_heads (got {self.head_dim})"
            )


@dataclass
class AttentionCache:
    """Preallocated keys and values; `seqlen` tokens are filled.

    k, v: (batch, n_heads, max_seqlen, head_dim)
    """

    k: Tensor
    v: Tensor
    seqlen: int = 0

    def append(self, k: Tensor, v: Tensor) -> tuple[Tensor, Tensor]:
        """Store k, v (b, h, l, hd) after the filled part; return all keys and values so far."""
        start, end = self.seqlen, self.seqlen + k.shape[2]
        if end > self.k.shape[2]:
            raise ValueError(f"seqlen={end}: the attention cache holds at most {self.k.shape[2]} tokens")
        self.k[:, :, start:end] = k
        self.v[:, :, start:end] = v
        self.seqlen = end
        # Under autocast the cache may be wider than q; SDPA needs one dtype.
        return self.k[:, :, :end].to(k.dtype), self.v[:, :, :end].to(v.dtype)


def apply_rope(x: Tensor, cos: Tensor, sin: Tensor) -> Tensor:
    """Rotate channel pairs (i, i + hd/2) of x by position-dependent angles (GPT-NeoX layout).

    x: (batch, n_heads, seqlen, head_dim), cos/sin: (seqlen, head_dim / 2)
    """
    x1, x2 = x.float().chunk(2, dim=-1)
    return torch.cat([x1 * cos - x2 * sin, x1 * sin + x2 * cos], dim=-1).to(x.dtype)


class Attention(Mixer):
    """Causal multi-head self-attention.

    x: (batch, seqlen, d_model) -> (batch, seqlen, d_model)
    params: AttentionConfig's fields after d_model.

    pos="rope" rotates queries and keys (RoPE, base 10000); the angle table covers positions
    [0, max_seqlen). It is not saved in checkpoints, so a model can be evaluated with a larger
    max_seqlen than it was trained with. Initialised as Zoology (GPT-2's N(0, 0.02)).
    """

    Config = AttentionConfig
    reference_init = "gpt2"

    def __init__(self, d_model: int, **params):
        super().__init__()
        cfg = AttentionConfig(d_model, **params)
        self.d_model, self.n_heads, self.head_dim = d_model, cfg.n_heads, cfg.head_dim
        self.pos, self.max_seqlen = cfg.pos, cfg.max_seqlen

        self.qkv = nn.Linear(d_model, 3 * d_model, bias=False)
        self.out_proj = nn.Linear(d_model, d_model, bias=False)
        if cfg.pos == "rope":
            hd = cfg.head_dim
            inv_freq = 10000.0 ** (-torch.arange(0, hd, 2, dtype=torch.float32) / hd)
            angles = torch.outer(torch.arange(cfg.max_seqlen, dtype=torch.float32), inv_freq)  # (L, hd/2)
            self.register_buffer("rope_cos", angles.cos(), persistent=False)
            self.register_buffer("rope_sin", angles.sin(), persistent=False)

    def forward(self, x: Tensor, cache: AttentionCache | None = None) -> Tensor:
        """x: (b, l, d_model). With a cache, the block follows the tokens already in it."""
        b, l, _ = x.shape
        start = 0 if cache is None else cache.seqlen
        q, k, v = self.qkv(x).view(b, l, 3, self.n_heads, self.head_dim).permute(2, 0, 3, 1, 4)  # (b, h, l, hd)
        if self.pos == "rope":
            if start + l > self.max_seqlen:
                raise ValueError(f"seqlen={start + l}: RoPE covers positions below max_seqlen={self.max_seqlen}")
            cos, sin = self.rope_cos[start : start + l], self.rope_sin[start : start + l]
            q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
        if cache is not None:
            k, v = cache.append(k, v)  # (b, h, start + l, hd)
        # Query i sits at position start + i and sees keys 0..start + i. From an empty cache that is
        # the plain causal mask; a single new token sees everything, so it needs no mask.
        mask = None
        if start > 0 and l > 1:
            mask = torch.ones(l, start + l, dtype=torch.bool, device=x.device).tril(diagonal=start)
        y = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=start == 0)
        return self.out_proj(y.transpose(1, 2).reshape(b, l, self.d_model))  # (b, l, h·hd)

    def attention_matrix(self, x: Tensor) -> Tensor:
        """The causal softmax matrix of each head on a whole sequence (MOHAWK's matrix mixer view).

        x: (batch, seqlen, d_model) -> (batch, n_heads, seqlen, seqlen), fp32, rows summing to 1, so
        that head h of forward's output before out_proj is `attention_matrix(x)[:, h] @ v[:, h]`.
        """
        b, l, _ = x.shape
        q, k, _ = self.qkv(x).view(b, l, 3, self.n_heads, self.head_dim).permute(2, 0, 3, 1, 4)  # (b, h, l, hd)
        if self.pos == "rope":
            if l > self.max_seqlen:
                raise ValueError(f"seqlen={l}: RoPE covers positions below max_seqlen={self.max_seqlen}")
            cos, sin = self.rope_cos[:l], self.rope_sin[:l]
            q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
        # fp32 even under autocast: MOHAWK regresses onto these probabilities.
        scores = q.float() @ k.float().transpose(-1, -2) / self.head_dim**0.5  # (b, h, l, l)
        future = torch.ones(l, l, dtype=torch.bool, device=x.device).triu(diagonal=1)
        return scores.masked_fill(future, float("-inf")).softmax(dim=-1)

    def step(self, x: Tensor, cache: AttentionCache) -> Tensor:
        """x: (b, d_model), one token after those in the cache -> (b, d_model)."""
        return self.forward(x[:, None], cache)[:, 0]

    def allocate_cache(self, batch_size: int, max_seqlen: int, device=None, dtype=None) -> AttentionCache:
        w = self.qkv.weight
        shape = (batch_size, self.n_heads, max_seqlen, self.head_dim)
        k = torch.zeros(shape, device=device or w.device, dtype=dtype or w.dtype)
        return AttentionCache(k=k, v=torch.zeros_like(k))

    def state_size(self, seq_len: int) -> int:
        """Keys and values of every token: 2·d_model·seq_len numbers (Zoology's accounting)."""
        return 2 * self.d_model * seq_len
