"""The data module: splits, and the curriculum's stages (which data each epoch trains on)."""
from types import SimpleNamespace

import pytest
import torch

from tasks.base import IGNORE
from tasks.data import Batches, TaskDataModule, scored

MQAR = dict(name="mqar", vocab_size=64, seq_len=32, num_kv_pairs=6, batch_size=16, num_train=64, num_val=32,
            num_test=32)
STAGES = [{"epochs": 1, "num_kv_pairs": 2}, {"epochs": 2, "num_kv_pairs": 4}]


def scored_per_example(batch) -> set[int]:
    return set((batch["labels"] != IGNORE).sum(1).tolist())


def at_epoch(dm, epoch, reload=1):
    """Attach a stand-in trainer at `epoch`, as Lightning's is when it rebuilds the loader."""
    dm.trainer = SimpleNamespace(current_epoch=epoch, reload_dataloaders_every_n_epochs=reload, global_rank=0,
                                 world_size=1, strategy=SimpleNamespace(root_device=torch.device("cpu")))
    return dm


def test_curriculum_trains_each_stage_for_its_epochs_then_the_task():
    dm = TaskDataModule(**MQAR, curriculum=STAGES)
    dm.setup()
    # epoch -> K: stage 1 for 1 epoch, stage 2 for 2, then the task (K=6) for the rest.
    for epoch, k in [(0, 2), (1, 4), (2, 4), (3, 6), (10, 6)]:
        loader = at_epoch(dm, epoch).train_dataloader()
        assert {n for b in loader for n in scored_per_example(b)} == {k}, epoch
        assert sum(len(b["inputs"]) for b in loader) == MQAR["num_train"]
    for loader in (dm.val_dataloader(), dm.test_dataloader()[0]):  # always the task itself
        assert {n for b in loader for n in scored_per_example(b)} == {6}


def test_a_cycled_curriculum_repeats_the_stages_then_one_epoch_of_the_task():
    dm = TaskDataModule(**MQAR, curriculum=STAGES, curriculum_cycle=True)
    dm.setup()
    # A cycle of 4 epochs: stage 1 (K=2) for 1, stage 2 (K=4) for 2, the task (K=6) for 1.
    first = {}
    for epoch, k in [(0, 2), (1, 4), (2, 4), (3, 6), (4, 2), (5, 4), (7, 6), (8, 2)]:
        loader = at_epoch(dm, epoch).train_dataloader()
        assert {n for b in loader for n in scored_per_example(b)} == {k}, epoch
        inputs = dm.data["train"].inputs
        assert torch.equal(first.setdefault(k, inputs.clone()), inputs), epoch  # the same set every cycle


def test_a_cycle_needs_stages():
    with pytest.raises(ValueError, match=r"^curriculum_cycle=true: needs curriculum stages"):
        TaskDataModule(**MQAR, curriculum_cycle=True)


def test_curriculum_stage_is_a_function_of_the_epoch():
    """A resumed run (Lightning restores current_epoch) trains on what an uninterrupted one did."""
    straight, resumed = TaskDataModule(**MQAR, curriculum=STAGES), TaskDataModule(**MQAR, curriculum=STAGES)
    straight.setup()
    resumed.setup()
    first_pairs = {}
    for epoch in range(4):
        at_epoch(straight, epoch).train_dataloader()
        first_pairs[epoch] = straight.data["train"].inputs[:, :4].clone()  # k1 v1 k2 v2
    for epoch in (2, 1, 3, 0):  # any order of visits gives the same data for the epoch
        at_epoch(resumed, epoch).train_dataloader()
        assert torch.equal(resumed.data["train"].inputs[:, :4], first_pairs[epoch])
    # Each stage draws from its own seed: no stage repeats another's (or the task's) examples.
    assert not torch.equal(first_pairs[0], first_pairs[1]) and not torch.equal(first_pairs[1], first_pairs[3])


def test_no_curriculum_is_the_task_every_epoch():
    dm = TaskDataModule(**MQAR)
    dm.setup()
    first = at_epoch(dm, 0, reload=0).train_dataloader().tensors["inputs"]
    assert torch.equal(at_epoch(dm, 5, reload=0).train_dataloader().tensors["inputs"], first)


def test_curriculum_with_fresh_data():
    dm = TaskDataModule(**MQAR, curriculum=STAGES, fresh_train=True)
    dm.setup()
    assert {n for b in at_epoch(dm, 0).train_dataloader() for n in scored_per_example(b)} == {2}
    assert {n for b in at_epoch(dm, 3).train_dataloader() for n in scored_per_example(b)} == {6}


def test_curriculum_needs_the_loader_rebuilt_every_epoch():
    dm = TaskDataModule(**MQAR, curriculum=STAGES)
    dm.setup()
    with pytest.raises(ValueError, match=r"reload_dataloaders_every_n_epochs=1, not 0"):
        at_epoch(dm, 0, reload=0).train_dataloader()


BAD = {
    "not-a-list": ({"epochs": 1}, r"^curriculum=\{'epochs': 1\}: must be a list of stages"),
    "not-a-mapping": ([3], r"^curriculum\[0\]=3: must be a mapping"),
    "no-epochs": ([{"num_kv_pairs": 2}], r"^curriculum\[0\].epochs: missing"),
    "zero-epochs": ([{"epochs": 0, "num_kv_pairs": 2}], r"^curriculum\[0\].epochs=0: must be a positive integer"),
    "unknown-key": ([{"epochs": 1, "num_kvpairs": 2}], r"^curriculum\[0\].num_kvpairs=2: not a parameter of task"),
    "bad-value": ([{"epochs": 1}, {"epochs": 1, "num_kv_pairs": 9}], r"^curriculum\[1\].num_kv_pairs=9: must satisfy"),
    "longer": ([{"epochs": 1, "seq_len": 64}], r"^curriculum\[0\].seq_len=64: a stage may not be longer"),
}


@pytest.mark.parametrize("curriculum, match", list(BAD.values()), ids=list(BAD))
def test_bad_curriculum(curriculum, match):
    with pytest.raises(ValueError, match=match):
        TaskDataModule(**MQAR, curriculum=curriculum)


def test_scored_positions_are_each_examples_labelled_positions_in_order():
    labels = torch.full((3, 8), IGNORE)
    labels[0, [1, 4, 6]] = torch.tensor([7, 8, 9])
    labels[1, [0]] = 5  # fewer than the others: padded
    positions, targets = scored(labels)
    assert positions.tolist() == [[1, 4, 6], [0, 0, 0], [0, 0, 0]]
    assert targets.tolist() == [[7, 8, 9], [5, IGNORE, IGNORE], [IGNORE] * 3]


def test_batches_cover_every_example_once_in_an_order_of_seed_and_epoch():
    n, epoch = 10, [0]
    tensors = {"inputs": torch.arange(n)[:, None].repeat(1, 3)}
    batches = Batches(tensors, batch_size=4, shuffle=True, seed=3, epoch_fn=lambda: epoch[0])
    order = lambda b: torch.cat([x["inputs"][:, 0] for x in b]).tolist()
    first = order(batches)
    assert len(batches) == 3 and sorted(first) == list(range(n)) and first != list(range(n))
    assert order(batches) == first  # the same epoch: the same order (a resumed run sees it again)
    epoch[0] = 1
    assert order(batches) != first
    assert order(Batches(tensors, batch_size=4)) == list(range(n))  # unshuffled: in order
    # Two processes: disjoint halves of the same order, padded to equal length by wrapping.
    shards = [order(Batches(tensors, 4, shuffle=True, seed=3, epoch_fn=lambda: 1, rank=r, world=3)) for r in range(3)]
    assert [len(s) for s in shards] == [4, 4, 4] and set(sum(shards, [])) == set(range(n))


def test_fresh_data_is_new_every_epoch_and_a_function_of_the_epoch(monkeypatch):
    """Each epoch trains on new examples, generated in blocks of whole batches; the same epoch gives
    the same examples (a resumed run sees what the uninterrupted one did)."""
    monkeypatch.setattr("tasks.data.FRESH_BLOCK_TOKENS", 3 * MQAR["batch_size"] * MQAR["seq_len"])  # 3 batches a block
    dm = TaskDataModule(**{**MQAR, "num_train": 100}, fresh_train=True)
    dm.setup()
    inputs = lambda epoch: torch.cat([b["inputs"] for b in at_epoch(dm, epoch).train_dataloader()])
    first = inputs(0)
    assert len(at_epoch(dm, 0).train_dataloader()) == 7 and len(first) == 100
    assert len({tuple(x) for x in first.tolist()}) == 100, "no block repeats another's examples"
    assert torch.equal(inputs(0), first) and not torch.equal(inputs(1)[:16], first[:16])
    with pytest.raises(ValueError, match=r"^fresh_train: .*reload_dataloaders_every_n_epochs=1, not 0"):
        at_epoch(dm, 0, reload=0).train_dataloader()


def test_fresh_data_under_ddp_is_each_processes_own_share():
    dm = TaskDataModule(**{**MQAR, "num_train": 100}, fresh_train=True)
    dm.setup()
    shares = []
    for rank in range(2):
        at_epoch(dm, 0).trainer.global_rank, dm.trainer.world_size = rank, 2
        shares.append(torch.cat([b["inputs"] for b in dm.train_dataloader()]))
    assert [len(s) for s in shares] == [50, 50] and not torch.equal(shares[0], shares[1])


@pytest.mark.gpu
@pytest.mark.parametrize("fresh_train", [False, True])
def test_data_is_made_on_the_trainers_device(fresh_train):
    dm = TaskDataModule(**MQAR, fresh_train=fresh_train)
    at_epoch(dm, 0).trainer.strategy.root_device = torch.device("cuda:0")
    dm.setup()
    assert dm.data["val"].inputs.is_cuda and dm.data["test"].labels.is_cuda
    assert all(v.is_cuda for b in dm.train_dataloader() for v in b.values())
