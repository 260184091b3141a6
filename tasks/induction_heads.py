"""Induction heads, after the Mamba paper (Gu & Dao 2023, §4.1, Table 11 and App. E.1).

Paper setting: vocab_size=16, train at seq_len=256, test at 2^6 ... 2^20. The layout below is
ours (in the spirit of HazyResearch/safari's synthetic induction-head data).
"""
from dataclasses import dataclass

import torch

from tasks.base import IGNORE, Task, TaskData, per_example

TRIGGER = 0  # the special token; content tokens are [1, vocab_size)


@dataclass
class InductionHeads(Task):
    """After the trigger reappears at the end, output the token that followed its first occurrence.

    Parameters: V = vocab_size (>= 3), L = seq_len (>= 3).

    Token ids: 0 = trigger, [1, V) = content tokens (V - 1 of them).

    Layout of one example (positions 0-based):
        every position holds a content token drawn uniformly from [1, V), except
        p               the first trigger, p drawn uniformly from [0, L - 3];
        p + 1           the target: the content token that happens to follow it;
        L - 1           the trigger again.
    The trigger occurs exactly twice. Only the last position is scored, with the target as its
    label; all other labels are -100.

        inputs:  5  9  T  7  2 11  4  T      (L=8, p=2, T = the trigger)
        labels:  -  -  -  -  -  -  -  7

    Generation costs O(N·L) time and memory (no wider temporaries), so test sets at L = 2^20 are
    cheap for a handful of examples; each example takes 16 MiB there (int64 inputs and labels).

    Slices (constant per dataset, so test sets of several lengths can be told apart): seq_len.
    """

    def __post_init__(self):
        super().__post_init__()
        if self.vocab_size < 3:
            raise ValueError(f"vocab_size={self.vocab_size}: must be >= 3 (trigger 0 and at least "
                             f"two content tokens)")
        if self.seq_len < 3:
            raise ValueError(f"seq_len={self.seq_len}: must be >= 3 "
                             f"(trigger, target, final trigger)")

    def _generate(self, num_examples, generator):
        N, L, V, device = num_examples, self.seq_len, self.vocab_size, generator.device
        inputs = torch.randint(TRIGGER + 1, V, (N, L), generator=generator, device=device)  # (N, L)
        first = torch.randint(0, L - 2, (N,), generator=generator, device=device)  # (N,) first trigger's position
        example = torch.arange(N, device=device)
        inputs[example, first] = TRIGGER
        inputs[:, -1] = TRIGGER
        labels = torch.full((N, L), IGNORE, dtype=torch.int64, device=device)
        labels[:, -1] = inputs[example, first + 1]
        return TaskData(inputs, labels, {"seq_len": per_example(N, L, device)})
