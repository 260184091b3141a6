"""A language model around any mixers: embedding → n_layers × block → final norm → head.

Block: x + mixer(norm(x)), then x + MLP(norm(x)) when mlp_expand > 0 (pre-norm, as GPT-2 and
mamba_ssm's MixerModel). The constructor is flat so Hydra can build it from `model.*` keys; each
layer's mixer (models/mixers/) gets the keys its Config declares, and a key no mixer of the model
declares is an error.

The recipe choices (head tying, norm, init) default to what the reference code does; README "Recipe"
compares them with Zoology and mamba_ssm, with the measurements behind each.
"""

import math
from collections.abc import Mapping
from dataclasses import dataclass

import torch
from torch import Tensor, nn

from models.mixers import available_mixers, make_mixer, mixer_class, split_params
from models.mixers.base import check_positive_int
from models.norm import RMSNorm

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
        return self.mlp_residual(x + self.mixer(self.norm(x), cache))

    def step(self, x: Tensor, cache) -> Tensor:
        return self.mlp_residual(x + self.mixer.step(self.norm(x), cache))

    def mlp_residual(self, x: Tensor) -> Tensor:
        """The block's second half, after the mixer's residual."""
        return x if self.mlp is None else x + self.mlp(self.mlp_norm(x))


def _check_mlp_expand(name: str, v) -> None:
    if not (isinstance(v, int) and not isinstance(v, bool) and v >= 0):
        raise ValueError(f"{name}={v!r}: must be an integer >= 0 (0 = no MLP)")


def mixer_choices() -> list[str]:
    """What `mixer` may name: the default (mamba2) first, the other mixers of models/mixers/, "hybrid"."""
    return ["mamba2", *(name for name in available_mixers() if name != "mamba2"), "hybrid"]


class LM(nn.Module):
    """Causal language model.

    ids: (batch, seqlen) int64 -> logits (batch, seqlen, vocab_size)

    The model is a list of n_layers blocks, each a mixer and, when its mlp_expand > 0, an MLP:
    mixer: every layer's mixer, a module of models/mixers/ ("mamba2", "attention", "mamba1"), or
        "hybrid": Mamba-2 everywhere except attention at the layer indices in `attn_layers`.
    mlp_expand: MLP hidden width as a multiple of d_model; 0 = no MLP (Zoology's MQAR setting).
    layers: {index: {mixer: ..., mlp_expand: ...}}, the layers that differ from the above: e.g.
        `+model.layers={1:{mixer:attention}}` on `model=mamba2` is `model=hybrid model.attn_layers=[1]`.
    **mixer_params: the mixers' hyper-parameters, named as in mamba_ssm and declared by each mixer's
        Config (models.mixers.mamba2.Mamba2Config: d_state, headdim, ...; AttentionConfig: n_heads).
        Each layer's mixer gets the keys its Config declares; a key that none of the model's mixers
        declares (misspelled, or another mixer's) is a TypeError. The LM supplies d_model, and pos
        ("rope" or "none") and max_seqlen to the mixers that declare them.
    pos: "none"; "learned" (absolute position embeddings for max_seqlen positions, added to the token
        embeddings); "rope" (rotary embeddings inside the attention layers, for max_seqlen positions).
    tie_embeddings: the head's weight is the token embedding's (Zoology and mamba_ssm); False gives
        the head its own weight.
    norm: "rmsnorm" (mamba_ssm, Zoology's Mamba blocks) or "layernorm" (Zoology's attention blocks),
        for the blocks' norms and the final norm; eps 1e-5.
    init: "mixer" (each block as its reference code, the mixer's `reference_init`: attention and MLPs
        GPT-2's N(0, 0.02) as in Zoology; Mamba blocks mamba_ssm's, PyTorch's default Linear init) or
        "normal" (GPT-2's N(0, 0.02) for every Linear, as Zoology did in 2023). Both keep the mixers'
        own Δ/A/D inits.
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
        layers=None,
        attn_layers=(),
        tie_embeddings: bool = True,
        norm: str = "rmsnorm",
        init: str = "mixer",
        **mixer_params,
    ):
        super().__init__()
        for name, v in dict(vocab_size=vocab_size, d_model=d_model, n_layers=n_layers, max_seqlen=max_seqlen).items():
            check_positive_int(name, v)
        _check_mlp_expand("mlp_expand", mlp_expand)
        if mixer not in mixer_choices():
            raise ValueError(f"mixer={mixer!r}: must be one of {', '.join(mixer_choices())}")
        if pos not in POSITIONS:
            raise ValueError(f"pos={pos!r}: must be one of {', '.join(POSITIONS)}")
        if not isinstance(tie_embeddings, bool):
            raise ValueError(f"tie_embeddings={tie_embeddings!r}: must be true or false")
        if norm not in NORMS:
            raise ValueError(f"norm={norm!r}: must be one of {', '.join(NORMS)}")
        if init not in INITS:
            raise ValueError(f"init={init!r}: must be one of {', '.join(INITS)}")
        layers = {} if layers is None else layers
        if not isinstance(layers, Mapping):
            raise ValueError(f"layers={layers!r}: must map layer indices to {{mixer: ..., mlp_expand: ...}}")
        attn_layers = tuple(attn_layers)
        if mixer == "hybrid":
            if not attn_layers:
                raise ValueError("attn_layers=(): mixer='hybrid' needs at least one attention layer index")
            for i in attn_layers:
                if not (isinstance(i, int) and not isinstance(i, bool) and 0 <= i < n_layers):
                    raise ValueError(f"attn_layers={list(attn_layers)}: indices must be in [0, n_layers={n_layers})")
            if len(set(attn_layers)) != len(attn_layers):
                raise ValueError(f"attn_layers={list(attn_layers)}: indices must be distinct")
            layers = {**layers, **{i: {"mixer": "attention", **layers.get(i, {})} for i in attn_layers}}
        elif attn_layers:
            raise ValueError(f"attn_layers={list(attn_layers)}: only used with mixer='hybrid' (mixer={mixer!r})")
        plan = _layer_plan(n_layers, "mamba2" if mixer == "hybrid" else mixer, mlp_expand, layers)
        names = [layer["mixer"] for layer in plan]
        if pos == "rope" and not any("pos" in mixer_class(name).hyperparameters() for name in names):
            raise ValueError(f"pos='rope': only attention layers use RoPE, and mixer={mixer!r} has none")
        params = split_params(names, mixer_params)
        # The LM's keys that a mixer may declare too. Learned positions are added to the embedding,
        # so only RoPE is the mixers' business.
        model_keys = dict(pos="rope" if pos == "rope" else "none", max_seqlen=max_seqlen)
        self.vocab_size, self.d_model, self.max_seqlen, self.pos = vocab_size, d_model, max_seqlen, pos
        self.norm_type, self.tie_embeddings = norm, tie_embeddings

        def make_block(layer: dict) -> Block:
            name = layer["mixer"]
            cls = mixer_class(name)
            given = {k: v for k, v in model_keys.items() if k in cls.hyperparameters()}
            # params[name] holds only the keys this mixer declares (split_params checked them all).
            return Block(d_model, cls(d_model, **given, **params[name]), layer["mlp_expand"], norm)

        self.embedding = nn.Embedding(vocab_size, d_model)
        self.pos_emb = nn.Embedding(max_seqlen, d_model) if pos == "learned" else None
        self.blocks = nn.ModuleList(make_block(layer) for layer in plan)
        self.norm_f = NORMS[norm](d_model, eps=1e-5)
        self.head = nn.Linear(d_model, vocab_size, bias=False)
        self._init_weights(init, n_layers, n_residuals=n_layers + sum(b.mlp is not None for b in self.blocks))
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
        mamba_blocks = [] if init == "normal" else [b for b in self.blocks if b.mixer.reference_init == "mamba_ssm"]
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


def _layer_plan(n_layers: int, mixer: str, mlp_expand: int, layers: Mapping) -> list[dict]:
    """Each layer's {mixer, mlp_expand}: `mixer` and `mlp_expand`, with `layers`' overrides applied."""
    plan = [dict(mixer=mixer, mlp_expand=mlp_expand) for _ in range(n_layers)]
    for i, overrides in layers.items():
        if not (isinstance(i, int) and not isinstance(i, bool) and 0 <= i < n_layers):
            raise ValueError(f"layers[{i!r}]: not a layer index, which must be in [0, n_layers={n_layers})")
        if not isinstance(overrides, Mapping):
            raise ValueError(f"layers[{i}]={overrides!r}: must be {{mixer: ..., mlp_expand: ...}}")
        for key, value in overrides.items():
            if key not in plan[i]:
                raise ValueError(f"layers[{i}].{key}={value!r}: not a layer setting (allowed: mixer, mlp_expand)")
            plan[i][key] = value
        if "mixer" in overrides and overrides["mixer"] not in available_mixers():
            raise ValueError(f"layers[{i}].mixer={overrides['mixer']!r}: must be one of {', '.join(available_mixers())}")
        _check_mlp_expand(f"layers[{i}].mlp_expand", plan[i]["mlp_expand"])
    return plan
