"""The LM around every mixer: logits, causality, recurrent decoding, positions, layout, training."""

import pytest
import torch
import torch.nn.functional as F
from hydra.utils import instantiate
from omegaconf import OmegaConf

from models.lm import LM
from models.mixers.attention import Attention
from models.mixers.mamba1 import Mamba1
from models.mixers.mamba2 import Mamba2
from models.norm import RMSNorm
from tests.conftest import assert_rel_close

VOCAB, D_MODEL, SEQLEN, BATCH = 13, 16, 10, 2
# Flat, as Hydra passes them; each model takes only its mixers' keys.
ATTENTION, MAMBA1, MAMBA2 = dict(n_heads=2), dict(d_state=4), dict(d_state=4, headdim=8, ngroups=2, chunk_size=4)
CONFIGS = {
    "mamba2": dict(mixer="mamba2", **MAMBA2),
    "mamba1-learned-mlp": dict(mixer="mamba1", pos="learned", mlp_expand=2, **MAMBA1),
    "attention-learned": dict(mixer="attention", pos="learned", **ATTENTION),
    "attention-rope-mlp": dict(mixer="attention", pos="rope", mlp_expand=2, **ATTENTION),
    "hybrid-rope": dict(mixer="hybrid", pos="rope", n_layers=3, attn_layers=[1], **ATTENTION, **MAMBA2),
    "layers-mlp-attention": dict(mixer="mamba1", n_layers=3, layers={1: dict(mixer="attention", mlp_expand=2)},
                                 **ATTENTION, **MAMBA1),
}


def make_lm(name, **overrides):
    torch.manual_seed(0)
    kwargs = dict(vocab_size=VOCAB, d_model=D_MODEL, n_layers=2, max_seqlen=16)
    return LM(**{**kwargs, **CONFIGS[name], **overrides})


@pytest.fixture(params=list(CONFIGS))
def lm(request):
    return make_lm(request.param).eval()


def token_ids(seqlen=SEQLEN, seed=1):
    return torch.randint(VOCAB, (BATCH, seqlen), generator=torch.Generator().manual_seed(seed))


@torch.no_grad()
def test_logits_shape(lm):
    ids = token_ids()
    assert lm(ids).shape == (BATCH, SEQLEN, VOCAB)
    assert lm.hidden(ids).shape == (BATCH, SEQLEN, D_MODEL)


@torch.no_grad()
@pytest.mark.parametrize("t", [0, 4, SEQLEN - 1])
def test_causal(lm, t):
    ids = token_ids()
    ids2 = ids.clone()
    ids2[:, t:] = (ids[:, t:] + 1) % VOCAB
    logits, logits2 = lm(ids), lm(ids2)
    torch.testing.assert_close(logits2[:, :t], logits[:, :t], rtol=0, atol=1e-6)
    assert not torch.allclose(logits2[:, t], logits[:, t])


@torch.no_grad()
def test_step_equals_forward(lm):
    ids = token_ids()
    cache = lm.allocate_cache(BATCH, SEQLEN)
    logits = torch.stack([lm.step(ids[:, t], cache) for t in range(SEQLEN)], dim=1)
    assert cache.seqlen == SEQLEN
    assert_rel_close(logits, lm(ids))


@torch.no_grad()
def test_prefill_then_step_equals_forward(lm):
    """Positions (learned or RoPE) must continue from the prefill."""
    ids = token_ids()
    expected = lm(ids)
    cache = lm.allocate_cache(BATCH, SEQLEN)
    assert_rel_close(lm.head(lm.hidden(ids[:, :6], cache)), expected[:, :6])
    logits = torch.stack([lm.step(ids[:, t], cache) for t in range(6, SEQLEN)], dim=1)
    assert_rel_close(logits, expected[:, 6:])


def test_learned_positions_stop_at_max_seqlen():
    lm = make_lm("attention-learned", max_seqlen=8)
    lm(token_ids(8))
    with pytest.raises(ValueError, match=r"^seqlen=9: longer than the max_seqlen=8 learned positions$"):
        lm(token_ids(9))
    cache = lm.allocate_cache(BATCH, 16)
    lm.hidden(token_ids(8), cache)
    with pytest.raises(ValueError, match="max_seqlen=8"):
        lm.step(token_ids(1)[:, 0], cache)


def test_hybrid_layout():
    lm = make_lm("hybrid-rope", n_layers=4, attn_layers=[0, 2])
    kinds = [type(block.mixer) for block in lm.blocks]
    assert kinds == [Attention, Mamba2, Attention, Mamba2]
    assert all(block.mixer.pos == "rope" for block in lm.blocks if isinstance(block.mixer, Attention))


def test_mixer_choice_and_d_state_defaults():
    base = dict(vocab_size=VOCAB, d_model=D_MODEL, n_layers=2)
    assert all(isinstance(b.mixer, Mamba1) and b.mixer.d_state == 16 for b in LM(**base, mixer="mamba1").blocks)
    assert all(isinstance(b.mixer, Mamba2) and b.mixer.d_state == 64 for b in LM(**base, headdim=8).blocks)
    assert all(isinstance(b.mixer, Attention) for b in LM(**base, mixer="attention").blocks)


def test_state_size_sums_layers():
    lm = make_lm("hybrid-rope", n_layers=3, attn_layers=[1])
    # Two Mamba-2 layers at 2·d_model·N each, one attention layer at 2·d_model·seq_len.
    assert lm.state_size(100) == 2 * (2 * D_MODEL * 4) + 2 * D_MODEL * 100
    assert make_lm("mamba2").state_size(100) == make_lm("mamba2").state_size(7) == 2 * (2 * D_MODEL * 4)
    assert make_lm("attention-learned").state_size(100) == 2 * (2 * D_MODEL * 100)


@pytest.mark.parametrize("tie", [True, False])
def test_num_params(tie):
    lm = make_lm("attention-learned", mlp_expand=0, norm="rmsnorm", tie_embeddings=tie)
    per_layer = D_MODEL + 3 * D_MODEL**2 + D_MODEL**2  # norm, qkv, out_proj
    embeddings = VOCAB * D_MODEL + 16 * D_MODEL  # tokens, positions (max_seqlen=16)
    head = 0 if tie else D_MODEL * VOCAB  # a tied head is the token embedding
    assert lm.num_params() == embeddings + 2 * per_layer + D_MODEL + head


def test_tied_head_is_the_embedding_and_learns_as_one():
    lm = make_lm("mamba2")
    assert lm.head.weight is lm.embedding.weight
    assert lm.embedding.weight.std().item() == pytest.approx(0.02, rel=0.2)  # the embedding's init, not the head's
    ids = token_ids()
    lm(ids).sum().backward()
    # One tensor's gradient holds both uses: rows of tokens never read still get the head's gradient.
    unread = torch.ones(VOCAB, dtype=torch.bool)
    unread[ids.unique()] = False
    assert unread.any() and lm.embedding.weight.grad[unread].abs().sum() > 0
    state = make_lm("mamba2").state_dict()
    lm.load_state_dict(state)
    assert lm.head.weight is lm.embedding.weight and torch.equal(lm.head.weight, state["embedding.weight"])
    assert make_lm("mamba2", tie_embeddings=False).head.weight is not make_lm("mamba2").embedding.weight


@pytest.mark.parametrize("norm, cls", [("rmsnorm", RMSNorm), ("layernorm", torch.nn.LayerNorm)])
def test_norm_choice(norm, cls):
    lm = make_lm("attention-rope-mlp", norm=norm)
    norms = [lm.norm_f] + [n for b in lm.blocks for n in (b.norm, b.mlp_norm)]
    assert all(type(n) is cls and n.eps == 1e-5 for n in norms)


def test_init_keeps_mixer_special_inits():
    for init in ("mixer", "normal"):
        lm = make_lm("mamba1-learned-mlp", init=init)
        for block in lm.blocks:
            dt = F.softplus(block.mixer.dt_proj.bias.detach())
            assert (dt >= 1e-4).all() and (dt <= 0.1 + 1e-6).all()  # not zeroed by the generic init
            r = block.mixer.dt_rank
            assert block.mixer.dt_proj.weight.abs().max() <= r**-0.5  # mamba_ssm's uniform(±R^-½)
            torch.testing.assert_close(block.mixer.A_log[0].exp(), torch.arange(1.0, 5.0))
        assert lm.embedding.weight.std().item() == pytest.approx(0.02, rel=0.2)


def test_init_mixer_is_mamba_ssm_for_mamba_and_gpt2_for_attention():
    """init="mixer": Mamba blocks keep PyTorch's Linear init (kaiming-uniform, std 1/√(3·fan_in)) with
    out_proj divided by √(#residual branches) (mamba_ssm); attention gets N(0, 0.02) with out_proj
    N(0, 0.02/√(2·n_layers)) (Zoology / GPT-2); init="normal" gives every Mamba Linear N(0, 0.02)."""
    d, n_layers = 256, 4
    kwargs = dict(vocab_size=VOCAB, d_model=d, n_layers=n_layers)
    torch.manual_seed(0)
    mamba = LM(**kwargs, mixer="mamba2", headdim=64, d_state=16).blocks[0].mixer
    assert mamba.in_proj.weight.std().item() == pytest.approx((3 * d) ** -0.5, rel=0.05)
    assert mamba.out_proj.weight.std().item() == pytest.approx((3 * 2 * d) ** -0.5 / n_layers**0.5, rel=0.05)
    mamba = LM(**kwargs, mixer="mamba2", headdim=64, d_state=16, init="normal").blocks[0].mixer
    assert mamba.in_proj.weight.std().item() == pytest.approx(0.02, rel=0.05)
    assert mamba.out_proj.weight.std().item() == pytest.approx(0.02 / (2 * n_layers) ** 0.5, rel=0.05)
    attn = LM(**kwargs, mixer="attention").blocks[0].mixer
    assert attn.qkv.weight.std().item() == pytest.approx(0.02, rel=0.05)
    assert attn.out_proj.weight.std().item() == pytest.approx(0.02 / (2 * n_layers) ** 0.5, rel=0.05)


@pytest.mark.parametrize("name", list(CONFIGS))
def test_training_reduces_loss(name):
    lm = make_lm(name)
    ids = token_ids(seed=2)
    opt = torch.optim.AdamW(lm.parameters(), lr=1e-2)
    losses = []
    for _ in range(10):
        loss = F.cross_entropy(lm(ids[:, :-1]).flatten(0, 1), ids[:, 1:].flatten())
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert losses[-1] < 0.8 * losses[0], losses


def test_hydra_flat_config():
    cfg = OmegaConf.create(
        dict(_target_="models.lm.LM", vocab_size=VOCAB, d_model=D_MODEL, n_layers=3, mixer="hybrid", attn_layers=[2])
    )
    cfg.headdim = 8
    cfg.d_state = 32  # flat overrides, as `model.d_state=32` on the command line
    lm = instantiate(cfg)
    assert isinstance(lm.blocks[2].mixer, Attention) and lm.blocks[0].mixer.d_state == 32


def test_layers_override_single_layers():
    """`layers` sets a layer's mixer and MLP; `mixer="hybrid"` is its shorthand for attention layers."""
    lm = make_lm("layers-mlp-attention")
    assert [type(b.mixer) for b in lm.blocks] == [Mamba1, Attention, Mamba1]
    assert [b.mlp is not None for b in lm.blocks] == [False, True, False]
    hybrid = make_lm("hybrid-rope", n_layers=3, attn_layers=[1])
    same = make_lm("hybrid-rope", mixer="mamba2", n_layers=3, attn_layers=(), layers={1: {"mixer": "attention"}})
    assert hybrid.state_dict().keys() == same.state_dict().keys()
    for (name, a), b in zip(hybrid.state_dict().items(), same.state_dict().values()):
        assert torch.equal(a, b), name


def test_layers_keep_the_hybrids_attention_layers():
    """An MLP given to one of the hybrid's attention layers leaves it an attention layer."""
    lm = make_lm("hybrid-rope", n_layers=3, attn_layers=[1], layers={1: {"mlp_expand": 2}})
    assert [type(b.mixer) for b in lm.blocks] == [Mamba2, Attention, Mamba2]
    assert [b.mlp is not None for b in lm.blocks] == [False, True, False]


def test_mixers_get_only_their_own_hyperparameters():
    """A key none of the model's mixers declares is an error, like any unexpected keyword argument."""
    with pytest.raises(TypeError, match=r"^d_state=3: not a parameter of mixer 'attention' \(allowed: n_heads, pos, max_seqlen\)$"):
        LM(VOCAB, D_MODEL, 1, mixer="attention", d_state=3)
    with pytest.raises(TypeError, match=r"^n_heads=2: not a parameter of mixer 'mamba1' \(allowed: d_state, "):
        LM(VOCAB, D_MODEL, 1, mixer="mamba1", n_heads=2)
    with pytest.raises(TypeError, match=r"^dt_rank=2: not a parameter of mixers 'attention', 'mamba2' "):
        LM(VOCAB, D_MODEL, 2, mixer="hybrid", attn_layers=[1], dt_rank=2)
    # A hybrid's keys go to the mixers that declare them.
    lm = LM(VOCAB, D_MODEL, 2, mixer="hybrid", attn_layers=[1], n_heads=4, d_state=4, headdim=8)
    assert lm.blocks[1].mixer.n_heads == 4 and lm.blocks[0].mixer.d_state == 4


VALIDATION = {
    "mixer": (dict(mixer="rnn"), r"^mixer='rnn': must be one of mamba2, attention, mamba1, hybrid$"),
    "pos": (dict(pos="alibi"), r"^pos='alibi': must be one of none, learned, rope$"),
    "rope-without-attention": (dict(pos="rope"), r"^pos='rope': only attention layers use RoPE"),
    "hybrid-no-attention": (dict(mixer="hybrid"), r"^attn_layers=\(\): mixer='hybrid' needs at least one"),
    "attn_layers-range": (dict(mixer="hybrid", attn_layers=[2]), r"^attn_layers=\[2\]: indices must be in \[0, n_"),
    "attn_layers-repeat": (dict(mixer="hybrid", attn_layers=[1, 1]), r"^attn_layers=\[1, 1\]: indices must be"),
    "attn_layers-unused": (dict(attn_layers=[0]), r"^attn_layers=\[0\]: only used with mixer='hybrid'"),
    "d_model-float": (dict(d_model=16.0), r"^d_model=16.0: must be a positive integer$"),
    "n_layers-0": (dict(n_layers=0), r"^n_layers=0: must be a positive integer$"),
    "mlp_expand": (dict(mlp_expand=-1), r"^mlp_expand=-1: must be an integer >= 0"),
    "headdim": (dict(headdim=12), r"^headdim=12: must divide d_inner=expand\*d_model=32$"),
    "norm": (dict(norm="batchnorm"), r"^norm='batchnorm': must be one of rmsnorm, layernorm$"),
    "init": (dict(init="xavier"), r"^init='xavier': must be one of mixer, normal$"),
    "tie_embeddings": (dict(tie_embeddings="yes"), r"^tie_embeddings='yes': must be true or false$"),
    "n_heads": (dict(mixer="attention", n_heads=3), r"^n_heads=3: must divide d_model=16$"),
    "layers-index": (dict(layers={2: {"mixer": "attention"}}), r"^layers\[2\]: not a layer index, which must be in"),
    "layers-key": (dict(layers={0: {"norm": "layernorm"}}), r"^layers\[0\].norm='layernorm': not a layer setting"),
    "layers-mixer": (dict(layers={0: {"mixer": "rnn"}}), r"^layers\[0\].mixer='rnn': must be one of attention, "),
    "layers-mlp_expand": (dict(layers={1: {"mlp_expand": 0.5}}), r"^layers\[1\].mlp_expand=0.5: must be an integer"),
}


@pytest.mark.parametrize("kwargs, match", list(VALIDATION.values()), ids=list(VALIDATION))
def test_validation(kwargs, match):
    with pytest.raises(ValueError, match=match):
        LM(**{**dict(vocab_size=VOCAB, d_model=D_MODEL, n_layers=2), **kwargs})


def test_unknown_kwarg_is_a_type_error():
    with pytest.raises(TypeError):
        LM(VOCAB, D_MODEL, 2, d_stat=8)
