"""The task contract, checked on every task in `tasks/`, and each task's semantics."""
import inspect
import math
from pathlib import Path

import pytest
import torch
from omegaconf import OmegaConf

from tasks import available_tasks, make_dataset, make_task, task_class
from tasks.base import IGNORE, Task, TaskData, sample_distinct
from tasks.data import TaskDataModule
from tasks.induction_heads import TRIGGER
from tasks.selective_copying import MARKER, NOISE

TASKS = available_tasks()
CONF = Path(__file__).resolve().parents[1] / "conf" / "task"


def params_of(name) -> dict:
    """A task's parameters from its config (conf/task/<name>.yaml, CPU-sized), without the data
    module's own keys: what the contract tests use, so that a new task file is tested as it is added."""
    path = CONF / f"{name}.yaml"
    assert path.is_file(), f"tasks/{name}.py has no {path.name} in conf/task/ (README, 'Adding a task')"
    module_keys = {p.name for p in inspect.signature(TaskDataModule).parameters.values()
                   if p.kind is not p.VAR_KEYWORD}
    return {k: v for k, v in OmegaConf.to_container(OmegaConf.load(path)).items()
            if k not in module_keys and k not in ("_target_", "defaults")}


# Data is made on the training device: every task's contract and semantics hold on the GPU too.
DEVICES = ["cpu", pytest.param("cuda", marks=pytest.mark.gpu)]


def generate(name, num_examples, seed, device, **params) -> TaskData:
    """`name`'s data generated on `device`, brought to the CPU to be checked."""
    data = make_task(name, **params).generate(num_examples, seed, device)
    assert data.inputs.device.type == device and all(v.device.type == device for v in data.slices.values())
    return TaskData(data.inputs.cpu(), data.labels.cpu(), {k: v.cpu() for k, v in data.slices.items()})


def test_available_tasks_are_the_task_files():
    assert {"mqar", "selective_copying", "induction_heads"} <= set(TASKS)
    assert "base" not in TASKS and "data" not in TASKS


# -- the contract, for every task --------------------------------------------------------------
@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("name", TASKS)
def test_contract(name, device):
    params = params_of(name)
    N, L, V = 50, params["seq_len"], params["vocab_size"]
    data = generate(name, N, 0, device, **params)
    assert data.inputs.shape == data.labels.shape == (N, L)
    assert data.inputs.dtype == data.labels.dtype == torch.int64
    assert 0 <= data.inputs.min() and data.inputs.max() < V
    scored = data.labels != IGNORE
    assert scored.any(dim=1).all(), "every example has a scored position"
    assert (data.labels[scored] >= 0).all() and (data.labels[scored] < V).all()
    for key, value in data.slices.items():
        assert isinstance(key, str) and value.shape == (N,) and value.dtype == torch.int64

    task = make_task(name, **params)
    assert isinstance(task, task_class(name)) and isinstance(task, Task)
    assert (task.vocab_size, task.seq_len) == (V, L)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("name", TASKS)
def test_seeded_and_pure(name, device):
    a, b = (generate(name, 20, 3, device, **params_of(name)) for _ in range(2))
    c = generate(name, 20, 4, device, **params_of(name))
    assert torch.equal(a.inputs, b.inputs) and torch.equal(a.labels, b.labels)
    assert a.slices.keys() == b.slices.keys()
    assert all(torch.equal(a.slices[k], b.slices[k]) for k in a.slices)
    assert not torch.equal(a.inputs, c.inputs)
    assert not torch.equal(a.inputs[0], a.inputs[1]), "examples differ within a dataset"


# -- sampling helper ---------------------------------------------------------------------------
@pytest.mark.parametrize("device", DEVICES)
def test_sample_distinct_is_uniform_in_set_and_order(device):
    g = torch.Generator(device).manual_seed(0)
    N, P, k = 30_000, 5, 3
    draws = sample_distinct(g, N, P, k).cpu()  # (N, k)
    assert draws.shape == (N, k) and draws.min() >= 0 and draws.max() < P
    assert (draws.sort(dim=1).values.diff(dim=1) > 0).all(), "distinct within a row"
    # Every value is in a row with probability k/P, and in each column with probability 1/P.
    assert torch.allclose(torch.bincount(draws.flatten(), minlength=P) / N,
                          torch.full((P,), k / P), atol=0.02)
    for col in range(k):
        assert torch.allclose(torch.bincount(draws[:, col], minlength=P) / N,
                              torch.full((P,), 1 / P), atol=0.02)
    full = sample_distinct(g, 100, 7, 7).cpu()
    assert torch.equal(full.sort(dim=1).values, torch.arange(7).expand(100, 7))


# -- MQAR --------------------------------------------------------------------------------------
@pytest.mark.parametrize("device", DEVICES)
def test_mqar_by_brute_force(device):
    V, L, K = 64, 32, 4
    data = generate("mqar", 30, 0, device, vocab_size=V, seq_len=L, num_kv_pairs=K)
    for x, y in zip(data.inputs.tolist(), data.labels.tolist()):
        keys, values = x[0 : 2 * K : 2], x[1 : 2 * K : 2]
        assert len(set(keys)) == K and all(1 <= k < V // 2 for k in keys)
        assert len(set(values)) == K and all(V // 2 <= v < V for v in values)
        value_of = dict(zip(keys, values))
        scored = [t for t in range(L) if y[t] != IGNORE]
        assert all(t >= 2 * K and (t - 2 * K) % 2 == 0 for t in scored), "keys sit at slot starts"
        assert sorted(x[t] for t in scored) == sorted(keys), "each key queried exactly once"
        assert all(y[t] == value_of[x[t]] for t in scored)
        assert all(x[t] == 0 for t in range(2 * K, L) if t not in scored), "filler is 0"
    assert (data.slices["num_kv_pairs"] == K).all() and (data.slices["seq_len"] == L).all()


@pytest.mark.parametrize("device", DEVICES)
def test_mqar_random_non_queries(device):
    V, L, K = 64, 32, 4
    data = generate("mqar", 200, 0, device, vocab_size=V, seq_len=L, num_kv_pairs=K, random_non_queries=True)
    scored = data.labels != IGNORE
    filler = ~scored
    filler[:, : 2 * K] = False
    assert (data.inputs[filler] != 0).float().mean() > 0.9, "fillers are random tokens, not 0"
    assert (data.inputs[filler] >= V // 2).any(), "fillers come from the whole vocabulary"
    # The scored positions still hold the keys, labelled with their values.
    for x, y in zip(data.inputs[:10].tolist(), data.labels[:10].tolist()):
        value_of = dict(zip(x[0 : 2 * K : 2], x[1 : 2 * K : 2]))
        assert all(value_of[x[t]] == y[t] for t in range(L) if y[t] != IGNORE)


def _first_key_slot(data, K):
    """Slot index (0-based) where the first context key is queried, per example."""
    first_key = data.inputs[:, :1]  # (N, 1)
    pos = ((data.inputs == first_key) & (data.labels != IGNORE)).int().argmax(dim=1)
    return (pos - 2 * K) // 2


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("power_a", [0.01, 1.0])
def test_mqar_query_slot_distribution(power_a, device):
    # The first draw picks slot s with probability ∝ a·(s+1)^(a-1); k_1 goes to the first draw.
    V, L, K, N = 128, 64, 4, 20_000
    data = generate("mqar", N, 1, device, vocab_size=V, seq_len=L, num_kv_pairs=K, power_a=power_a)
    S = (L - 2 * K) // 2
    p = torch.tensor([power_a * g ** (power_a - 1) for g in range(1, S + 1)], dtype=torch.float64)
    freq = torch.bincount(_first_key_slot(data, K), minlength=S).double() / N
    assert torch.allclose(freq, p / p.sum(), atol=0.015)


def test_mqar_queries_bunch_near_the_start():
    V, L, K = 512, 256, 16
    skewed = make_dataset("mqar", num_examples=500, seed=0, vocab_size=V, seq_len=L, num_kv_pairs=K)
    uniform = make_dataset("mqar", num_examples=500, seed=0, vocab_size=V, seq_len=L,
                           num_kv_pairs=K, power_a=1.0)
    S = (L - 2 * K) // 2

    def early_fraction(data):  # share of queries in the first quarter of the slots
        pos = (data.labels != IGNORE).nonzero()[:, 1]
        return ((pos - 2 * K) // 2 < S // 4).float().mean().item()

    assert early_fraction(skewed) > 0.45
    assert abs(early_fraction(uniform) - 0.25) < 0.03


# -- selective copying -------------------------------------------------------------------------
@pytest.mark.parametrize("device", DEVICES)
def test_selective_copying_answer_is_the_data_in_order(device):
    V, L, M = 8, 32, 4
    data = generate("selective_copying", 100, 0, device, vocab_size=V, seq_len=L, num_tokens_to_copy=M)
    x, y = data.inputs, data.labels
    assert (y[:, : L - M] == IGNORE).all() and (y[:, L - M :] >= 2).all()
    region = x[:, : L - M]
    assert ((region == NOISE) | (region >= 2)).all(), "data region: noise and data tokens only"
    for row, answer in zip(region.tolist(), y[:, L - M :].tolist()):
        assert [t for t in row if t != NOISE] == answer
    assert (x[:, L - M] == MARKER).all() and ((x == MARKER).sum(dim=1) == 1).all()
    assert torch.equal(x[:, L - M + 1 :], y[:, L - M : -1]), "teacher forcing: previous answers"
    first = (region != NOISE).int().argmax(dim=1)
    assert first.unique().numel() > 5, "data positions are random"


# -- induction heads ---------------------------------------------------------------------------
@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("L", [8, 32, 2**20])
def test_induction_heads(L, device):
    N = 2 if L == 2**20 else 2000
    data = generate("induction_heads", N, 0, device, vocab_size=16, seq_len=L)
    x, y = data.inputs, data.labels
    is_trigger = x == TRIGGER
    assert (is_trigger.sum(dim=1) == 2).all() and is_trigger[:, -1].all()
    first = is_trigger.int().argmax(dim=1)  # (N,)
    assert (y[:, -1] == x[torch.arange(N), first + 1]).all()
    assert (y[:, :-1] == IGNORE).all()
    assert (data.slices["seq_len"] == L).all()
    if L == 8:  # the first trigger takes every position that leaves room for the target
        assert set(first.tolist()) == set(range(L - 2))


# -- validation --------------------------------------------------------------------------------
MQAR = dict(vocab_size=64, seq_len=32, num_kv_pairs=4)
COPY = dict(vocab_size=8, seq_len=32, num_tokens_to_copy=4)
BAD = [
    ("mqar", {**MQAR, "seq_len": 33}, r"^seq_len=33: must be even"),
    ("mqar", {**MQAR, "vocab_size": 32}, r"^vocab_size=32: must be > seq_len=32"),
    ("mqar", {**MQAR, "num_kv_pairs": 9},
     r"^num_kv_pairs=9: must satisfy 4\*num_kv_pairs <= seq_len=32 \(at most 8\)$"),
    ("mqar", {**MQAR, "num_kv_pairs": 0}, r"^num_kv_pairs=0: must be a positive integer$"),
    ("mqar", {**MQAR, "num_kv_pairs": 4.0}, r"^num_kv_pairs=4.0: must be a positive integer$"),
    ("mqar", {**MQAR, "num_kv_pairs": True}, r"^num_kv_pairs=True: must be a positive integer$"),
    ("mqar", {**MQAR, "seq_len": "32"}, r"^seq_len='32': must be a positive integer$"),
    ("mqar", {**MQAR, "vocab_size": -64}, r"^vocab_size=-64: must be a positive integer$"),
    ("mqar", {**MQAR, "power_a": 0}, r"^power_a=0: must be a positive number"),
    ("mqar", {**MQAR, "power_a": -0.5}, r"^power_a=-0.5: must be a positive number"),
    ("mqar", {**MQAR, "power_a": math.nan}, r"^power_a=nan: must be a positive number"),
    ("mqar", {**MQAR, "power_a": "0.01"}, r"^power_a='0.01': must be a positive number"),
    ("mqar", {**MQAR, "random_non_queries": "yes"},
     r"^random_non_queries='yes': must be true or false"),
    ("mqar", {**MQAR, "num_kv_pair": 4},
     r"^num_kv_pair=4: not a parameter of task 'mqar' "
     r"\(allowed: vocab_size, seq_len, num_kv_pairs, power_a, random_non_queries\)"),
    ("mqar", {"vocab_size": 64, "seq_len": 32}, r"^num_kv_pairs: missing, task 'mqar' requires it"),
    ("selective_copying", {**COPY, "vocab_size": 3}, r"^vocab_size=3: must be >= 4"),
    ("selective_copying", {**COPY, "num_tokens_to_copy": 17},
     r"^num_tokens_to_copy=17: must satisfy 2\*num_tokens_to_copy <= seq_len=32 \(at most 16\)$"),
    ("selective_copying", {**COPY, "num_tokens_to_copy": -1},
     r"^num_tokens_to_copy=-1: must be a positive integer$"),
    ("induction_heads", {"vocab_size": 2, "seq_len": 32}, r"^vocab_size=2: must be >= 3"),
    ("induction_heads", {"vocab_size": 16, "seq_len": 2}, r"^seq_len=2: must be >= 3"),
    ("nope", {}, r"^name='nope': unknown task \(available: .*mqar"),
    ("base", {}, r"^name='base': unknown task"),
    ("../mqar", {}, r"^name='../mqar': unknown task"),
]


@pytest.mark.parametrize("name, params, match", BAD, ids=[f"{n}-{m[1:24]}" for n, _, m in BAD])
def test_bad_parameters(name, params, match):
    with pytest.raises(ValueError, match=match) as err:
        make_dataset(name, num_examples=4, seed=0, **params)
    assert "\n" not in str(err.value)


@pytest.mark.parametrize("num_examples, seed, match", [
    (0, 0, r"^num_examples=0: must be a positive integer$"),
    (2.0, 0, r"^num_examples=2.0: must be a positive integer$"),
    (2, -1, r"^seed=-1: must be a non-negative integer$"),
    (2, 1.5, r"^seed=1.5: must be a non-negative integer$"),
])
def test_bad_generate_arguments(num_examples, seed, match):
    with pytest.raises(ValueError, match=match):
        make_task("mqar", **MQAR).generate(num_examples, seed)
