"""A language model around any mixer: embedding → n_layers × block → final norm → head.

Block: x + mixer(norm(x)), then x + MLP(norm(x)) when mlp_expand > 0 (pre-norm, as GPT-2 and
mamba_ssm's MixerModel). The constructor is flat so Hydra can build it from `model.*` keys; the
mixer hyper-parameters a chosen mixer does not use are accepted and ignored.

The recipe choices (head tying, norm, init) default to what the reference code does; README "Recipe"
compares them with Zoology and mamba_ssm, with the measurements behind each.
"""

import math
from dataclasses import dataclass

import torch
from torch import Tensor, nn

from models.attention import Attention
from models.mamba1 import Mamba1
from models.mamba2 import Mamba2
from models.norm import RMSNorm

MIXERS = ("mamba2", "attention", "mamba1", "hybrid")
POSITIONS = ("none", "learned", "rope")
NORMS = {"rmsnorm": RMSNorm, "layernorm": nn.LayerNorm}
INITS = ("mixer", "normal")


@dataclass
class LMCache:
    """One cache per layer, and the number of tokens consumed (the next token's position)."""

    layers: list
    seqlen: int = 0


class MLP(nn.Module):
    def __init__(self, d_model: int, hidden: int):
        super().__init__()
        self.fc1 = nn.Linear(d_model, hidden)
        self.act = nn.GELU()
        self.fc2 = nn.Linear(hidden, d_model)

    def forward(self, x: Tensor) -> Tensor:
        return self.fc2(self.act(self.fc1(x)))


class Block(nn.Module):
    def __init__(self, d_model: int, mixer: nn.Module, mlp_expand: int, norm: str = "rmsnorm"):
        super().__init__()
        self.norm = NORMS[norm](d_model, eps=1e-5)
        self.mixer = mixer
        self.mlp_norm = NORMS[norm](d_model, eps=1e-5) if mlp_expand else None
        self.mlp = MLP(d_model, mlp_expand * d_model) if mlp_expand else None

    def forward(self, x: Tensor, cache=None) -> Tensor:
        x = x + self.mixer(self.norm(x), cache)
        return x if self.mlp is None else x + self.mlp(self.mlp_norm(x))

    def step(self, x: Tensor, cache) -> Tensor:
        x = x + self.mixer.step(self.norm(x), cache)
        return x if self.mlp is None else x + self.mlp(self.mlp_norm(x))


def _positive_int(name: str, v) -> None:
    if not (isinstance(v, int) and not isinstance(v, bool) and v > 0):
        raise ValueError(f"{name}={v!r}: must be a positive integer")


class LM(nn.Module):
    """Causal language model.

    ids: (batch, seqlen) int64 -> logits (batch, seqlen, vocab_size)

    mixer: "mamba2" | "attention" | "mamba1" | "hybrid" (Mamba-2 everywhere except attention at the
        layer indices in `attn_layers`).
    pos: "none"; "learned" (absolute position embeddings for max_seqlen positions, added to the token
        embeddings); "rope" (rotary embeddings inside the attention layers, for max_seqlen positions).
    mlp_expand: MLP hidden width as a multiple of d_model; 0 = no MLP (Zoology's MQAR setting).
    tie_embeddings: the head's weight is the token embedding's (Zoology and mamba_ssm); False gives
        the head its own weight.
    norm: "rmsnorm" (mamba_ssm, Zoology's Mamba blocks) or "layernorm" (Zoology's attention blocks),
        for the blocks' norms and the final norm; eps 1e-5.
    init: "mixer" (each block as its reference code: attention and MLPs GPT-2's N(0, 0.02) as in
        Zoology; Mamba blocks mamba_ssm's, PyTorch's default Linear init) or "normal" (GPT-2's
        N(0, 0.02) for every Linear, as Zoology did in 2023). Both keep the mixers' own Δ/A/D inits.
    Mixer hyper-parameters (named as in mamba_ssm): n_heads (attention); d_state (default 16 for
    Mamba-1, 64 for Mamba-2), d_conv, expand (both Mambas); dt_rank (Mamba-1); headdim, ngroups,
    chunk_size (Mamba-2).
    """

    def __init__(
        self,
        vocab_size: int,
        d_model: int,
        n_layers: int,
        mixer: str = "mamba2",
        mlp_expand: int = 0,
        pos: str = "none",
        max_seqlen: int = 2048,
        attn_layers=(),
        n_heads: int = 1,
        d_state: int | None = None,
        d_conv: int = 4,
        expand: int = 2,
        headdim: int = 64,
        ngroups: int = 1,
        chunk_size: int = 256,
        dt_rank: int | str = "auto",
        tie_embeddings: bool = True,
        norm: str = "rmsnorm",
        init: str = "mixer",
    ):
        super().__init__()
        for name, v in dict(vocab_size=vocab_size, d_model=d_model, n_layers=n_layers, max_seqlen=max_seqlen).items():
            _positive_int(name, v)
        if not (isinstance(mlp_expand, int) and not isinstance(mlp_expand, bool) and mlp_expand >= 0):
            raise ValueError(f"mlp_expand={mlp_expand!r}: must be an integer >= 0 (0 = no MLP)")
        if mixer not in MIXERS:
            raise ValueError(f"mixer={mixer!r}: must be one of {', '.join(MIXERS)}")
        if pos not in POSITIONS:
            raise ValueError(f"pos={pos!r}: must be one of {', '.join(POSITIONS)}")
        if not isinstance(tie_embeddings, bool):
            raise ValueError(f"tie_embeddings={tie_embeddings!r}: must be true or false")
        if norm not in NORMS:
            raise ValueError(f"norm={norm!r}: must be one of {', '.join(NORMS)}")
        if init not in INITS:
            raise ValueError(f"init={init!r}: must be one of {', '.join(INITS)}")
        attn_layers = tuple(attn_layers)
        if mixer == "hybrid":
            if not attn_layers:
                raise ValueError("attn_layers=(): mixer='hybrid' needs at least one attention layer index")
            for i in attn_layers:
                if not (isinstance(i, int) and not isinstance(i, bool) and 0 <= i < n_layers):
                    raise ValueError(f"attn_layers={list(attn_layers)}: indices must be in [0, n_layers={n_layers})")
            if len(set(attn_layers)) != len(attn_layers):
                raise ValueError(f"attn_layers={list(attn_layers)}: indices must be distinct")
        elif attn_layers:
            raise ValueError(f"attn_layers={list(attn_layers)}: only used with mixer='hybrid' (mixer={mixer!r})")
        if pos == "rope" and mixer not in ("attention", "hybrid"):
            raise ValueError(f"pos='rope': only attention layers use RoPE, and mixer={mixer!r} has none")
        if d_state is None:
            d_state = 16 if mixer == "mamba1" else 64  # each block's mamba_ssm default
        self.vocab_size, self.d_model, self.max_seqlen, self.pos = vocab_size, d_model, max_seqlen, pos
        self.norm_type, self.tie_embeddings = norm, tie_embeddings

        def make_mixer(i: int) -> nn.Module:
            if mixer == "attention" or i in attn_layers:
                return Attention(d_model, n_heads, pos="rope" if pos == "rope" else "none", max_seqlen=max_seqlen)
            if mixer == "mamba1":
                return Mamba1(d_model, d_state=d_state, d_conv=d_conv, expand=expand, dt_rank=dt_rank)
            return Mamba2(
                d_model, d_state=d_state, d_conv=d_conv, expand=expand, headdim=headdim, ngroups=ngroups,
                chunk_size=chunk_size,
            )

        self.embedding = nn.Embedding(vocab_size, d_model)
        self.pos_emb = nn.Embedding(max_seqlen, d_model) if pos == "learned" else None
        self.blocks = nn.ModuleList(Block(d_model, make_mixer(i), mlp_expand, norm) for i in range(n_layers))
        self.norm_f = NORMS[norm](d_model, eps=1e-5)
        self.head = nn.Linear(d_model, vocab_size, bias=False)
        self._init_weights(init, n_layers, n_residuals=n_layers * (2 if mlp_expand else 1))
        if tie_embeddings:  # after the init, so the shared weight keeps the embedding's N(0, 0.02)
            self.head.weight = self.embedding.weight

    def _init_weights(self, init: str, n_layers: int, n_residuals: int) -> None:
        """GPT-2's init (Zoology's `_init_weights`) or, for Mamba blocks under init="mixer", mamba_ssm's.

        GPT-2: every Linear and Embedding N(0, 0.02), biases zero; the projections that write into
        the residual stream (attention's out_proj, the MLP's fc2) N(0, 0.02/√(2·n_layers)), so the
        stream's variance at init does not grow with depth.
        mamba_ssm (`mixer_seq_simple._init_weights`): Linear weights keep PyTorch's default
        (kaiming-uniform), biases zero; out_proj is redrawn and divided by √(#residual branches).
        Modules and biases marked `_no_reinit` (Mamba-1's Δ projection) keep their own init in both.
        """
        gpt2_std_out = 0.02 / math.sqrt(2 * n_layers)
        mamba_blocks = [] if init == "normal" else [b for b in self.blocks if isinstance(b.mixer, (Mamba1, Mamba2))]
        mamba_modules = {id(m) for b in mamba_blocks for m in b.mixer.modules()}
        for module in self.modules():
            if not isinstance(module, (nn.Linear, nn.Embedding)) or getattr(module, "_no_reinit", False):
                continue
            if id(module) not in mamba_modules:
                nn.init.normal_(module.weight, std=0.02)
            bias = getattr(module, "bias", None)
            if bias is not None and not getattr(bias, "_no_reinit", False):
                nn.init.zeros_(bias)
        for block in self.blocks:
            if block.mlp is not None:
                nn.init.normal_(block.mlp.fc2.weight, std=gpt2_std_out)
            out = block.mixer.out_proj.weight
            if block in mamba_blocks:
                nn.init.kaiming_uniform_(out, a=math.sqrt(5))
                with torch.no_grad():
                    out /= math.sqrt(n_residuals)
            else:
                nn.init.normal_(out, std=gpt2_std_out)

    def _embed(self, ids: Tensor, start: int) -> Tensor:
        """ids: (b, l) at positions start.. -> (b, l, d_model)."""
        x = self.embedding(ids)
        if self.pos_emb is not None:
            end = start + ids.shape[1]
            if end > self.max_seqlen:
                raise ValueError(f"seqlen={end}: longer than the max_seqlen={self.max_seqlen} learned positions")
            x = x + self.pos_emb.weight[start:end]
        return x

    def hidden(self, ids: Tensor, cache: LMCache | None = None) -> Tensor:
        """ids: (b, l) -> final-norm hidden states (b, l, d_model). A cache is continued and updated."""
        start = 0 if cache is None else cache.seqlen
        x = self._embed(ids, start)
        for i, block in enumerate(self.blocks):
            x = block(x, None if cache is None else cache.layers[i])
        if cache is not None:
            cache.seqlen += ids.shape[1]
        return self.norm_f(x)

    def forward(self, ids: Tensor) -> Tensor:
        """ids: (b, l) -> logits (b, l, vocab_size)."""
        return self.head(self.hidden(ids))

    def allocate_cache(self, batch_size: int, max_seqlen: int, device=None, dtype=None) -> LMCache:
        return LMCache([block.mixer.allocate_cache(batch_size, max_seqlen, device, dtype) for block in self.blocks])

    def step(self, ids: Tensor, cache: LMCache) -> Tensor:
        """ids: (b,), the token at position cache.seqlen -> logits (b, vocab_size); updates the cache."""
        x = self._embed(ids[:, None], cache.seqlen)[:, 0]  # (b, d_model)
        for block, layer_cache in zip(self.blocks, cache.layers):
            x = block.step(x, layer_cache)
        cache.seqlen += 1
        return self.head(self.norm_f(x))

    def state_size(self, seq_len: int) -> int:
        """Sum of the mixers' state sizes (Zoology's accounting) for a sequence of seq_len tokens."""
        return sum(block.mixer.state_size(seq_len) for block in self.blocks)

    def num_params(self) -> int:
        return sum(p.numel() for p in self.parameters())
