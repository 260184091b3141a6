"""Lightning data module: any task from `tasks/` as train / val / test loaders.

The task's parameters are validated when the module is built (before anything is generated or
written); the data itself is generated in `setup`, from a different seed per split, on the device
that trains (on 2 CPU cores the Fig. 8 cell's 100k examples took 5.6 s, a wait before every run and
curriculum stage on the GPU), and batches are rows taken from it by index.
"""
from collections.abc import Sequence
from dataclasses import dataclass

import lightning as L
import torch
from lightning.pytorch.utilities import rank_zero_info
from torch import Tensor

from tasks import make_task
from tasks.base import IGNORE, Task, TaskData, check_positive_int

# Each split draws from its own seed so train, val and test never share a stream; curriculum
# stage i trains on seed offset CURRICULUM_SEED_OFFSET + i.
SPLIT_SEED_OFFSET = {"train": 0, "val": 1, "test": 2}
CURRICULUM_SEED_OFFSET = 3
MAX_STAGES = 100 - CURRICULUM_SEED_OFFSET  # offsets stay below the seed's stride of 100
# Fresh training data is generated in blocks of whole batches of about this many tokens: one block's
# generation waits for the device once, and an epoch of the Mamba paper's selective copying (6.4M
# examples of 4096 tokens) never has to be held at once.
FRESH_BLOCK_TOKENS = 1 << 24


@dataclass
class Stage:
    """`epochs` epochs of training on `task` (a variant of the data module's task)."""

    epochs: int
    task: Task
    overrides: dict


def parse_curriculum(name: str, params: dict, curriculum) -> list[Stage]:
    """Stages from config entries `{epochs: E, <task parameter>: value, ...}`, in order.

    Each stage is the task with its parameters overridden (validated now, so a bad stage fails
    before anything is generated); errors name the entry, `curriculum[i].key=value: ...`.
    """
    if not isinstance(curriculum, Sequence) or isinstance(curriculum, str):  # a list, or Hydra's ListConfig
        raise ValueError(f"curriculum={curriculum!r}: must be a list of stages "
                         f"like {{epochs: 4, num_kv_pairs: 8}}")
    if len(curriculum) > MAX_STAGES:
        raise ValueError(f"curriculum: {len(curriculum)} stages; at most {MAX_STAGES}")
    stages = []
    for i, entry in enumerate(curriculum):
        if not hasattr(entry, "items"):
            raise ValueError(f"curriculum[{i}]={entry!r}: must be a mapping like {{epochs: 4, num_kv_pairs: 8}}")
        overrides = {str(k): v for k, v in entry.items()}
        epochs = overrides.pop("epochs", None)
        if epochs is None:
            raise ValueError(f"curriculum[{i}].epochs: missing; each stage says how many epochs it trains")
        try:
            check_positive_int("epochs", epochs)
            if overrides.get("seq_len", 0) > params.get("seq_len", 0):
                raise ValueError(f"seq_len={overrides['seq_len']}: a stage may not be longer than the task's "
                                 f"seq_len={params.get('seq_len')} (the model is sized for it)")
            task = make_task(name, **{**params, **overrides})
        except ValueError as e:
            raise ValueError(f"curriculum[{i}].{e}") from e
        stages.append(Stage(epochs, task, overrides))
    return stages


def scored(labels: Tensor) -> tuple[Tensor, Tensor]:
    """The scored positions of each example as fixed-size rows, so a training step gathers them with
    static shapes (no `nonzero`, which waits for the device and gives a data-dependent size).

    labels: (n, l) -> positions (n, S) int64 and targets (n, S) int64, S = the most scored positions
    of any example; rows with fewer are padded with position 0 and target IGNORE.
    """
    mask = labels != IGNORE  # (n, l)
    S = int(mask.sum(1).max()) if labels.numel() else 0
    # A stable sort puts each row's scored positions first, in order.
    positions = (~mask).to(torch.int8).argsort(dim=1, stable=True)[:, :S]  # (n, S)
    targets = labels.gather(1, positions)
    valid = mask.gather(1, positions)
    return positions.masked_fill(~valid, 0), targets.masked_fill(~valid, IGNORE)


def batch_tensors(data: TaskData) -> dict[str, Tensor]:
    """What a batch holds, per example: inputs (l,), labels (l,), positions (S,), targets (S,) (see
    `scored`) and one scalar per slice (`slice/<name>`)."""
    positions, targets = scored(data.labels)
    return {"inputs": data.inputs, "labels": data.labels, "positions": positions, "targets": targets,
            **{f"slice/{k}": v for k, v in data.slices.items()}}


class Batches:
    """Batches of a dataset that is held whole as tensors on the training device: a batch is rows
    taken by index, so a step needs no collation and no host-to-device copy.

    Shuffled, epoch e's order is a permutation drawn from (seed, e) alone, so a resumed run sees
    the order the uninterrupted run would have. Under several processes (DDP) each takes every
    `world`-th example of that order, padded by wrapping so that every process has as many
    batches (as Lightning's DistributedSampler does).
    """

    def __init__(self, tensors: dict[str, Tensor], batch_size: int, shuffle: bool = False, seed: int = 0,
                 epoch_fn=lambda: 0, rank: int = 0, world: int = 1):
        self.tensors, self.batch_size, self.shuffle = tensors, batch_size, shuffle
        self.seed, self.epoch_fn, self.rank, self.world = seed, epoch_fn, rank, world
        first = next(iter(tensors.values()))
        self.total, self.device = first.shape[0], first.device
        self.n = -(-self.total // world)  # examples per process

    def __len__(self):
        return -(-self.n // self.batch_size)

    def __iter__(self):
        if self.shuffle:
            generator = torch.Generator().manual_seed((self.seed * 1_000_003 + self.epoch_fn()) % 2**63)
            order = torch.randperm(self.total, generator=generator)
        else:
            order = torch.arange(self.total)
        if self.world > 1:
            order = order.repeat(-(-self.n * self.world // self.total))[: self.n * self.world][self.rank :: self.world]
        order = order.to(self.device)  # one copy an epoch
        for start in range(0, self.n, self.batch_size):
            rows = order[start : start + self.batch_size]
            yield {k: v[rows] for k, v in self.tensors.items()}


class FreshBatches:
    """Newly generated training batches every epoch (the Mamba paper's synthetic setting), made on
    `device` in blocks of whole batches (FRESH_BLOCK_TOKENS tokens or one batch, whichever is more).

    Block c of epoch e is generated from seed (seed, e, c) (and the process's rank under DDP, each
    process drawing its own share of `num_examples`), so a run is reproducible and a resumed run
    continues the same stream.
    """

    def __init__(self, task: Task, num_examples: int, batch_size: int, seed: int, epoch_fn, device="cpu",
                 rank: int = 0, world: int = 1):
        self.task, self.batch_size, self.seed, self.epoch_fn = task, batch_size, seed, epoch_fn
        self.device, self.rank, self.world = device, rank, world
        self.n = -(-num_examples // world)  # examples per process
        self.block = max(1, FRESH_BLOCK_TOKENS // (batch_size * task.seq_len)) * batch_size

    def __len__(self):
        return -(-self.n // self.batch_size)

    def __iter__(self):
        epoch = self.epoch_fn()
        for c, start in enumerate(range(0, self.n, self.block)):
            seed = ((self.seed * 1_000_003 + epoch) * 1_000_003 + c) * 1_000_003 + self.rank
            data = self.task.generate(min(self.block, self.n - start), seed % 2**63, self.device)
            yield from Batches(batch_tensors(data), self.batch_size)


class TaskDataModule(L.LightningDataModule):
    """Train / val / test sets of one task.

    Args:
        name: the task's module in `tasks/` (e.g. "mqar").
        batch_size: examples per training batch.
        num_train, num_val, num_test: examples per split.
        seed: base seed; split s uses `seed * 100 + offset(s)`.
        test_seq_lens: extra test sets at these lengths (length extrapolation, e.g. induction
            heads); each is logged as `test@seq_len=L/...`.
        fresh_train: generate `num_train` new training examples every epoch instead of one fixed
            training set (the Mamba paper's selective copying and induction heads); the Trainer must
            reload the training loader every epoch (`reloads_every_epoch`).
        curriculum: training stages before the task itself, e.g. `[{epochs: 4, num_kv_pairs: 8},
            {epochs: 4, num_kv_pairs: 16}]`: stage i trains for its `epochs` on the task with its
            parameters overridden (num_train examples, its own seed), then training continues on the
            task. Validation and test always use the task itself. The stage is a function of the
            epoch, so a resumed run picks up where it stopped; the Trainer must reload the training
            loader every epoch (`run.train` sets `reload_dataloaders_every_n_epochs=1`).
        curriculum_cycle: instead of training on the task after the stages, cycle through the stages
            and then one epoch of the task until training ends (Mamba-2 App. D.1: "training cycles
            through datasets using (T/32, T/16, T/8, T/4) key-value pairs"); each stage's training
            set is the same in every cycle.
        **params: the task's own parameters (vocab_size, seq_len, ...).
    """

    def __init__(self, name, batch_size, num_train, num_val, num_test, seed=0, test_seq_lens=(),
                 fresh_train=False, curriculum=(), curriculum_cycle=False, **params):
        super().__init__()
        sizes = {"batch_size": batch_size, "num_train": num_train, "num_val": num_val,
                 "num_test": num_test}
        for key, value in sizes.items():
            check_positive_int(key, value)
        if not isinstance(seed, int) or isinstance(seed, bool) or seed < 0:
            raise ValueError(f"seed={seed!r}: must be a non-negative integer")
        for key, value in {"fresh_train": fresh_train, "curriculum_cycle": curriculum_cycle}.items():
            if not isinstance(value, bool):
                raise ValueError(f"{key}={value!r}: must be true or false")
        self.name, self.batch_size, self.seed, self.fresh_train = name, batch_size, seed, fresh_train
        self.sizes = {"train": num_train, "val": num_val, "test": num_test}
        self.task = make_task(name, **params)  # validates the task's parameters now
        self.curriculum = parse_curriculum(name, params, curriculum or [])
        if curriculum_cycle and not self.curriculum:
            raise ValueError("curriculum_cycle=true: needs curriculum stages to cycle through")
        self.curriculum_cycle = curriculum_cycle
        self._train_stage = None  # the stage whose training set self.data["train"] holds
        self.test_tasks = {}
        for seq_len in test_seq_lens or ():
            check_positive_int("test_seq_lens[]", seq_len)
            self.test_tasks[seq_len] = make_task(name, **{**params, "seq_len": seq_len})
        self.vocab_size = self.task.vocab_size
        self.data: dict[str, TaskData] = {}
        self._on_device: dict[str, tuple] = {}  # split -> (its data, the device, its batch tensors there)

    @property
    def reloads_every_epoch(self) -> bool:
        """Whether the training loader changes between epochs (a curriculum's stages, fresh data):
        the Trainer must then rebuild it every epoch (`reload_dataloaders_every_n_epochs=1`)."""
        return bool(self.curriculum) or self.fresh_train

    def _shard(self) -> dict:
        """This process's place among the Trainer's (`rank`, `world`): none without a Trainer."""
        return {"rank": self.trainer.global_rank, "world": self.trainer.world_size} if self.trainer is not None else {}

    def _device(self) -> torch.device:
        """Where the data is made and held: the Trainer's device (the CPU without a Trainer)."""
        return self.trainer.strategy.root_device if self.trainer is not None else torch.device("cpu")

    def _seed(self, split):
        return self.seed * 100 + SPLIT_SEED_OFFSET[split]

    def stage_at(self, epoch: int) -> int:
        """The curriculum stage that trains epoch `epoch`; len(curriculum) = the task itself."""
        if self.curriculum_cycle:  # a cycle: every stage for its epochs, then the task for one
            epoch %= sum(stage.epochs for stage in self.curriculum) + 1
        end = 0
        for i, stage in enumerate(self.curriculum):
            end += stage.epochs
            if epoch < end:
                return i
        return len(self.curriculum)

    def _train_task(self, stage: int) -> tuple[Task, int]:
        """The task and the seed that training stage `stage` draws from."""
        if stage == len(self.curriculum):
            return self.task, self._seed("train")
        return self.curriculum[stage].task, self.seed * 100 + CURRICULUM_SEED_OFFSET + stage

    def setup(self, stage=None):
        if self.data:
            return
        device = self._device()
        for split, n in self.sizes.items():
            if split != "train":
                self.data[split] = self.task.generate(n, self._seed(split), device)
        for seq_len, task in self.test_tasks.items():
            self.data[f"test@seq_len={seq_len}"] = task.generate(self.sizes["test"], self._seed("test"), device)

    @property
    def test_names(self) -> list[str]:
        """Names of the test sets, in the order of `test_dataloader()`: "test" first."""
        return ["test"] + [f"test@seq_len={n}" for n in self.test_tasks]

    @property
    def slice_values(self) -> dict[str, list[int]]:
        """Every value each slice takes in the val and test sets (so metrics exist on every rank)."""
        values: dict[str, set] = {}
        for split, data in self.data.items():
            if split == "train":
                continue
            for k, v in data.slices.items():
                values.setdefault(k, set()).update(v.unique().tolist())
        return {k: sorted(v) for k, v in values.items()}

    def _epoch(self) -> int:
        return self.trainer.current_epoch if self.trainer is not None else 0

    def _loader(self, split, shuffle=False, batch_size=None):
        """`Batches` of split `split`, its tensors moved to the Trainer's device once (data made
        before the Trainer's device was known). The shuffled order follows the run's `seed` (torch's
        global seed, which Lightning's seed_everything sets)."""
        device = self._device()
        data, where, tensors = self._on_device.get(split, (None, None, None))
        if data is not self.data[split] or where != device:
            tensors = {k: v.to(device) for k, v in batch_tensors(self.data[split]).items()}
            self._on_device[split] = (self.data[split], device, tensors)
        return Batches(tensors, batch_size or self.batch_size, shuffle=shuffle, seed=torch.initial_seed(),
                       epoch_fn=self._epoch, **self._shard())

    def transfer_batch_to_device(self, batch, device, dataloader_idx):
        """Batches are made on the device (`Batches`, `FreshBatches`): handed on as they are, without
        Lightning's walk over the batch, which costs host time every step."""
        if all(v.device == device for v in batch.values()):
            return batch
        return super().transfer_batch_to_device(batch, device, dataloader_idx)

    def train_dataloader(self):
        stage = self.stage_at(self._epoch())
        if self.reloads_every_epoch:
            reload = self.trainer.reload_dataloaders_every_n_epochs if self.trainer is not None else 1
            if reload != 1:
                what = "curriculum" if self.curriculum else "fresh_train"
                raise ValueError(f"{what}: the Trainer must reload the training data every epoch "
                                 f"(reload_dataloaders_every_n_epochs=1, not {reload})")
            if self.curriculum and stage != self._train_stage:
                what = ("the task" if stage == len(self.curriculum)
                        else ", ".join(f"{k}={v}" for k, v in self.curriculum[stage].overrides.items()))
                rank_zero_info(f"curriculum: epoch {self._epoch()} trains on stage {stage + 1}/"
                               f"{len(self.curriculum) + 1} ({what})")
        task, seed = self._train_task(stage)
        if not self.fresh_train and stage != self._train_stage:  # one stage's training set in memory
            self.data["train"] = task.generate(self.sizes["train"], seed, self._device())
        self._train_stage = stage
        if self.fresh_train:
            return FreshBatches(task, self.sizes["train"], self.batch_size, seed, self._epoch, self._device(),
                                **self._shard())
        return self._loader("train", shuffle=True)

    def val_dataloader(self):
        return self._loader("val")

    def test_dataloader(self):
        # Long extrapolation sets keep the tokens per batch of the training batches.
        seq_len = self.task.seq_len
        return [self._loader("test")] + [
            self._loader(f"test@seq_len={n}", batch_size=max(1, self.batch_size * seq_len // n))
            for n in self.test_tasks
        ]
