"""The task contract: a `Task` is a dataclass of parameters that generates a `TaskData`.

A task file (`tasks/<name>.py`) holds exactly one `Task` subclass. Its fields are the task's
parameters, its `__post_init__` validates them (calling `super().__post_init__()` first), and its
`_generate(num_examples, generator)` builds the whole dataset with batched tensor operations (no
Python loop per example) on `generator.device`, drawing every random number from `generator` so that
the data is a pure function of the parameters, the seed and the kind of device (a training run
generates its data on its own device; CUDA's random streams are not the CPU's).

Also here: the validation and sampling helpers the tasks share.
"""
from dataclasses import dataclass, field

import torch
from torch import Tensor

IGNORE = -100  # label of a position that is not scored (PyTorch's cross-entropy ignore_index)

# Temporaries of shape (rows, width) are built this many elements at a time, so a large dataset
# (100k MQAR examples drawing keys from 4095 ids) never needs a giant intermediate.
_CHUNK_ELEMENTS = 1 << 24


@dataclass
class TaskData:
    """A generated dataset.

    inputs: (num_examples, seq_len) int64, token ids in [0, vocab_size)
    labels: (num_examples, seq_len) int64, the target at each position: a token id, or -100 where
        the position is not scored. The label at position t is predicted from inputs[..t].
    slices: name -> (num_examples,) int64, per-example condition values (e.g. num_kv_pairs) for
        breaking accuracy down by condition; may be empty.
    """

    inputs: Tensor
    labels: Tensor
    slices: dict[str, Tensor] = field(default_factory=dict)


@dataclass
class Task:
    """Base of every task: its parameters, validated on construction, and `generate`.

    Every task has a vocabulary of `vocab_size` token ids [0, vocab_size) and sequences of
    `seq_len` tokens; subclasses add their own fields.
    """

    vocab_size: int
    seq_len: int

    def __post_init__(self):
        check_positive_int("vocab_size", self.vocab_size)
        check_positive_int("seq_len", self.seq_len)

    def generate(self, num_examples: int, seed: int, device="cpu") -> TaskData:
        """`num_examples` examples on `device`, drawn from a fresh generator there seeded with `seed`.

        The same (parameters, num_examples, seed, device type) always give identical tensors.
        """
        check_positive_int("num_examples", num_examples)
        if not (isinstance(seed, int) and not isinstance(seed, bool) and seed >= 0):
            raise ValueError(f"seed={seed!r}: must be a non-negative integer")
        return self._generate(num_examples, torch.Generator(device).manual_seed(seed))

    def _generate(self, num_examples: int, generator: torch.Generator) -> TaskData:
        raise NotImplementedError(f"{type(self).__name__} must implement _generate")


def check_positive_int(name: str, value) -> None:
    """The contract's ValueError unless `value` is a real int > 0 (a bool is not an int here)."""
    if not (isinstance(value, int) and not isinstance(value, bool) and value > 0):
        raise ValueError(f"{name}={value!r}: must be a positive integer")


def per_example(num_examples: int, value: int, device) -> Tensor:
    """A slice that is constant over the dataset: (num_examples,) int64 filled with `value`."""
    return torch.full((num_examples,), value, dtype=torch.int64, device=device)


def row_chunks(num_rows: int, row_width: int):
    """Consecutive row ranges of at most _CHUNK_ELEMENTS elements (at least one row) each."""
    step = max(1, _CHUNK_ELEMENTS // max(1, row_width))
    for start in range(0, num_rows, step):
        yield slice(start, min(start + step, num_rows))


def sample_distinct(generator: torch.Generator, num_rows: int, population: int, k: int) -> Tensor:
    """Per row, k distinct integers drawn uniformly from [0, population), in uniformly random order.

    Returns: (num_rows, k) int64. Requires k <= population.

    Floyd's algorithm, vectorised over rows: step i (j = population - k + i) draws c uniformly
    from [0, j] and takes j instead when c is already taken. It needs k steps whatever the
    population size, and a flat (rows·population) bool mask makes each membership test one
    gather; drawing 64 keys from 4095 ids this is several times cheaper than a top-k over 4095
    random numbers per row.
    """
    device = generator.device
    out = torch.empty(num_rows, k, dtype=torch.int64, device=device)
    for rows in row_chunks(num_rows, population):
        n = rows.stop - rows.start
        row_start = torch.arange(n, device=device) * population  # (n,) offset of each row in the flat mask
        j = torch.arange(population - k, population, device=device).unsqueeze(1)  # (k, 1)
        # All k steps' draws at once, as flat mask indices: floor(U·(j+1)) is uniform on [0, j].
        u = torch.rand(k, n, generator=generator, dtype=torch.float64, device=device)
        draw = row_start + (u * (j + 1)).long()  # (k, n)
        fallback = row_start + j  # (k, n)
        taken = torch.zeros(n * population, dtype=torch.bool, device=device)  # (n·population,)
        for i in range(k):
            draw[i] = torch.where(taken[draw[i]], fallback[i], draw[i])
            taken[draw[i]] = True
        out[rows] = (draw - row_start).T
    # Floyd's subset is uniform but its order is not (large values come late): shuffle each row.
    order = torch.rand(num_rows, k, generator=generator, device=device).argsort(dim=1)
    return out.gather(1, order)
