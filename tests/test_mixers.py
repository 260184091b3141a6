"""The mixer contract, checked on every registered mixer (and MOHAWK's student, which keeps it):
shapes, causality, that forward, step and chunk-by-chunk forward with a carried cache compute the same
function, and a state size that grows with the sequence exactly when the cache does."""

import dataclasses
import functools

import pytest
import torch
import torch.nn.functional as F

from models.mamba2_discrete import DiscreteMamba2
from models.mixers import available_mixers, make_mixer, mixer_class
from models.mixers.attention import Attention, apply_rope
from models.mixers.mamba1 import Mamba1
from models.mixers.mamba2 import Mamba2
from models.norm import GatedRMSNorm
from tests.conftest import assert_rel_close

D_MODEL = 16
# Per mixer, tiny sizes that still exercise every code path: several heads, ngroups > 1, and a chunk
# size that does not divide the test lengths. A mixer not listed is checked with its Config's defaults.
SMALL = {
    "attention": {"attention-none": dict(n_heads=2, pos="none", max_seqlen=64),
                  "attention-rope": dict(n_heads=2, pos="rope", max_seqlen=64)},
    "mamba1": {"mamba1": dict(d_state=4, d_conv=4, expand=2)},
    "mamba2": {"mamba2": dict(d_state=8, d_conv=4, expand=2, headdim=8, ngroups=2, chunk_size=4)},
}
MIXERS = {case: functools.partial(make_mixer, name, D_MODEL, **params)
          for name in available_mixers() for case, params in SMALL.get(name, {name: {}}).items()}
# MOHAWK's student keeps the contract too, though the LM does not offer it as a mixer.
MIXERS["mamba2_discrete"] = functools.partial(DiscreteMamba2, D_MODEL, nheads=2, d_state=8, chunk_size=4)
BATCH, SEQLEN = 2, 11


@pytest.fixture(params=list(MIXERS))
def mixer(request):
    torch.manual_seed(0)
    return MIXERS[request.param]().eval()


def inputs(seqlen=SEQLEN, seed=1):
    return torch.randn(BATCH, seqlen, D_MODEL, generator=torch.Generator().manual_seed(seed))


@torch.no_grad()
def test_shapes(mixer):
    x = inputs()
    assert mixer(x).shape == (BATCH, SEQLEN, D_MODEL)
    cache = mixer.allocate_cache(BATCH, SEQLEN)
    assert mixer.step(x[:, 0], cache).shape == (BATCH, D_MODEL)


@torch.no_grad()
@pytest.mark.parametrize("t", [0, 5, SEQLEN - 1])
def test_causal(mixer, t):
    x = inputs()
    x2 = x.clone()
    x2[:, t:] = torch.randn(BATCH, SEQLEN - t, D_MODEL)
    y, y2 = mixer(x), mixer(x2)
    torch.testing.assert_close(y2[:, :t], y[:, :t], rtol=0, atol=1e-6)
    assert not torch.allclose(y2[:, t], y[:, t]), "the changed token must change its own output"


@torch.no_grad()
def test_step_equals_forward(mixer):
    x = inputs()
    cache = mixer.allocate_cache(BATCH, SEQLEN)
    y = torch.stack([mixer.step(x[:, t], cache) for t in range(SEQLEN)], dim=1)
    assert_rel_close(y, mixer(x))


@torch.no_grad()
@pytest.mark.parametrize("t", [1, 2, 6])
def test_prefill_then_step_equals_forward(mixer, t):
    x = inputs()
    expected = mixer(x)
    cache = mixer.allocate_cache(BATCH, SEQLEN)
    prefill = mixer(x[:, :t], cache)
    assert_rel_close(prefill, expected[:, :t])
    y = torch.stack([mixer.step(x[:, i], cache) for i in range(t, SEQLEN)], dim=1)
    assert_rel_close(y, expected[:, t:])


@torch.no_grad()
@pytest.mark.parametrize("chunks", [(5, 6), (1, 2, 3, 5), (4, 1, 1, 4, 1)], ids=str)
def test_chunked_forward_equals_forward(mixer, chunks):
    """Chunks shorter than d_conv − 1 check the conv state; chunks across chunk_size the SSD state."""
    x = inputs()
    cache = mixer.allocate_cache(BATCH, SEQLEN)
    y = torch.cat([mixer(part, cache) for part in x.split(list(chunks), dim=1)], dim=1)
    assert_rel_close(y, mixer(x))


def test_backward_reaches_every_parameter(mixer):
    mixer(inputs()).square().sum().backward()
    for name, p in mixer.named_parameters():
        assert p.grad is not None and torch.isfinite(p.grad).all() and p.grad.abs().sum() > 0, name


@torch.no_grad()
def test_state_size_grows_with_the_sequence_as_the_cache_does(mixer):
    """Zoology's accounting: a recurrent mixer's state is constant, attention's grows with seq_len."""
    def numel(cache):
        return sum(v.numel() for v in vars(cache).values() if isinstance(v, torch.Tensor))

    short, long = mixer.state_size(8), mixer.state_size(64)
    assert isinstance(short, int) and 0 < short <= long
    assert (long > short) == (numel(mixer.allocate_cache(1, 64)) > numel(mixer.allocate_cache(1, 8)))


def test_declarations(mixer):
    """What the LM reads from a mixer: its Config (d_model first), its init and its out_proj."""
    assert dataclasses.is_dataclass(mixer.Config) and mixer.hyperparameters()[0] == "d_model"
    assert mixer.reference_init in ("gpt2", "mamba_ssm")
    assert isinstance(mixer.out_proj, torch.nn.Linear)


def test_registry():
    assert {"attention", "mamba1", "mamba2"} <= set(available_mixers())
    assert mixer_class("mamba2") is Mamba2 and mixer_class("attention") is Attention
    for bad in ("rnn", "base", "ssm", "../lm", 3):
        with pytest.raises(ValueError, match=r"^mixer=.*: must be one of attention, mamba1, mamba2"):
            mixer_class(bad)


def test_make_mixer_takes_only_its_own_hyperparameters():
    assert make_mixer("mamba1", D_MODEL, d_state=4).d_state == 4
    with pytest.raises(TypeError, match=r"^n_heads=2: not a parameter of mixer 'mamba1' \(allowed: d_state, "):
        make_mixer("mamba1", D_MODEL, n_heads=2)
    with pytest.raises(TypeError, match=r"^d_stat=4: not a parameter of mixer 'mamba2'"):
        make_mixer("mamba2", D_MODEL, d_stat=4)


def test_state_size():
    assert Attention(D_MODEL, n_heads=2).state_size(100) == 2 * D_MODEL * 100
    # Zoology's count for Mamba: 2·d_model·N, whatever the sequence length.
    for m in (Mamba1(D_MODEL, d_state=4), Mamba2(D_MODEL, d_state=8, headdim=8)):
        assert m.state_size(10) == m.state_size(10_000) == 2 * D_MODEL * m.d_state


def test_cache_layout():
    m1 = Mamba1(D_MODEL, d_state=4, d_conv=3, expand=2).to(torch.float64)
    c1 = m1.allocate_cache(3, 99)
    assert c1.conv_state.shape == (3, 32, 2) and c1.conv_state.dtype == torch.float64
    assert c1.ssm_state.shape == (3, 32, 4) and c1.ssm_state.dtype == torch.float32
    m2 = Mamba2(D_MODEL, d_state=8, d_conv=4, expand=2, headdim=8, ngroups=2)
    c2 = m2.allocate_cache(3, 99)
    assert c2.conv_state.shape == (3, 32 + 2 * 2 * 8, 3)
    assert c2.ssm_state.shape == (3, 4, 8, 8) and c2.ssm_state.dtype == torch.float32
    ca = Attention(D_MODEL, n_heads=2).allocate_cache(3, 99)
    assert ca.k.shape == ca.v.shape == (3, 2, 99, 8) and ca.seqlen == 0


def test_no_weight_decay_marks():
    for m, names in [
        (Mamba1(D_MODEL), {"A_log", "D", "dt_proj.bias"}),
        (Mamba2(D_MODEL, headdim=8), {"A_log", "D", "dt_bias"}),
    ]:
        marked = {n for n, p in m.named_parameters() if getattr(p, "_no_weight_decay", False)}
        assert marked == names
        assert m.A_log.dtype == torch.float32


def test_dt_init_range():
    torch.manual_seed(0)
    m1 = Mamba1(D_MODEL, dt_min=0.01, dt_max=0.05)
    m2 = Mamba2(D_MODEL, headdim=2, dt_min=0.01, dt_max=0.05)
    for dt_bias in (m1.dt_proj.bias, m2.dt_bias):
        dt = F.softplus(dt_bias.detach())
        assert (dt >= 0.01 - 1e-6).all() and (dt <= 0.05 + 1e-6).all()


def test_attention_cache_overflow():
    m = Attention(D_MODEL, n_heads=2)
    cache = m.allocate_cache(1, 4)
    m(torch.randn(1, 3, D_MODEL), cache)
    with pytest.raises(ValueError, match="holds at most 4 tokens"):
        m(torch.randn(1, 2, D_MODEL), cache)


def test_rope_beyond_max_seqlen():
    with pytest.raises(ValueError, match="max_seqlen=8"):
        Attention(D_MODEL, n_heads=2, pos="rope", max_seqlen=8)(torch.randn(1, 9, D_MODEL))


def test_rope_scores_depend_on_relative_position_only():
    m = Attention(D_MODEL, n_heads=1, pos="rope", max_seqlen=64)
    q, k = torch.randn(2, D_MODEL)

    def score(i, j):
        qi = apply_rope(q.view(1, 1, 1, -1), m.rope_cos[i : i + 1], m.rope_sin[i : i + 1])
        kj = apply_rope(k.view(1, 1, 1, -1), m.rope_cos[j : j + 1], m.rope_sin[j : j + 1])
        return (qi * kj).sum()

    torch.testing.assert_close(score(7, 3), score(40, 36))
    assert not torch.allclose(score(7, 3), score(7, 4))


def test_gated_rmsnorm_gates_then_normalises_each_group():
    norm = GatedRMSNorm(8, group_size=4)
    with torch.no_grad():
        norm.weight.copy_(torch.arange(1.0, 9.0))
    y, z = torch.randn(3, 8), torch.randn(3, 8)
    g = (y * F.silu(z)).view(3, 2, 4)
    expected = (g / g.pow(2).mean(-1, keepdim=True).add(1e-5).sqrt()).view(3, 8) * norm.weight
    torch.testing.assert_close(norm(y, z), expected)


VALIDATION = {
    "mamba2-headdim": (Mamba2, dict(expand=2, headdim=48), r"^headdim=48: must divide d_inner=expand\*d_model=128$"),
    "mamba2-ngroups": (Mamba2, dict(headdim=16, ngroups=3), r"^ngroups=3: must divide nheads=d_inner/headdim=8$"),
    "mamba2-d_state-str": (Mamba2, dict(d_state="abc"), r"^d_state='abc': must be a positive integer$"),
    "mamba2-chunk_size-0": (Mamba2, dict(chunk_size=0), r"^chunk_size=0: must be a positive integer$"),
    "mamba2-A_init_range": (Mamba2, dict(A_init_range=(0, 16)), r"^A_init_range=\(0, 16\): must be"),
    "mamba1-d_state-float": (Mamba1, dict(d_state=16.0), r"^d_state=16.0: must be a positive integer$"),
    "mamba1-expand-bool": (Mamba1, dict(expand=True), r"^expand=True: must be a positive integer$"),
    "mamba1-dt_rank": (Mamba1, dict(dt_rank="big"), r"^dt_rank='big': must be a positive integer or 'auto'$"),
    "mamba1-dt-range": (Mamba1, dict(dt_min=0.2, dt_max=0.1), r"^dt_min=0.2, dt_max=0.1: must satisfy"),
    "attention-n_heads": (Attention, dict(n_heads=3), r"^n_heads=3: must divide d_model=64$"),
    "attention-n_heads-0": (Attention, dict(n_heads=0), r"^n_heads=0: must be a positive integer$"),
    "attention-rope-odd": (Attention, dict(n_heads=64, pos="rope"), r"^n_heads=64: pos='rope' needs an even head_dim"),
    "attention-pos": (Attention, dict(pos="learned"), r"^pos='learned': must be one of none, rope$"),
}


@pytest.mark.parametrize("cls, kwargs, match", list(VALIDATION.values()), ids=list(VALIDATION))
def test_validation(cls, kwargs, match):
    with pytest.raises(ValueError, match=match):
        cls(64, **kwargs)
