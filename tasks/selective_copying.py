"""Selective copying, after the Mamba paper (Gu & Dao 2023, §4.1 and App. E.1).

The authors never released this task's generator (state-spaces/mamba #343); the layout below is
ours. Paper setting: seq_len=4096, vocab_size=16, num_tokens_to_copy=16.
"""
from dataclasses import dataclass

import torch

from tasks.base import IGNORE, Task, TaskData, check_positive_int, per_example, sample_distinct

NOISE = 0  # the "white" token that fills the data region between data tokens
MARKER = 1  # announces the answer region: "start copying now"
FIRST_DATA_TOKEN = 2  # data tokens are [2, vocab_size)


@dataclass
class SelectiveCopying(Task):
    """Reproduce, in order, M data tokens scattered among noise tokens.

    Parameters: V = vocab_size (>= 4), L = seq_len, M = num_tokens_to_copy (2·M <= L).

    Token ids: 0 = noise, 1 = marker, [2, V) = data tokens (V - 2 of them; the paper's vocabulary
    of 16 "including the noise token" leaves 14 here, since our layout also needs the marker).

    Layout of one example (positions 0-based), with d_1 ... d_M drawn uniformly (with replacement)
    from the data tokens:
        [0, L - M)      data region: d_1 ... d_M at M distinct positions drawn uniformly, in
                        order of position; every other position is noise (0).
        [L - M, L)      answer region, teacher forced: inputs are MARKER, d_1, ..., d_{M-1};
                        labels are d_1, ..., d_M.
    So the label at answer position L - M + i (i = 0..M-1) is d_{i+1}, predicted from the inputs
    up to it: the marker says where copying starts and the previously copied tokens are inputs,
    which a causal LM needs. Only the M answer positions are scored; all other labels are -100.

        inputs:  0 d1  0  0 d2  0 d3  0  * d1 d2      (L=11, M=3, * = the marker)
        labels:  -  -  -  -  -  -  -  - d1 d2 d3

    Slices (constant per dataset): seq_len, num_tokens_to_copy.
    """

    num_tokens_to_copy: int

    def __post_init__(self):
        super().__post_init__()
        if self.vocab_size < FIRST_DATA_TOKEN + 2:
            raise ValueError(f"vocab_size={self.vocab_size}: must be >= 4 (noise 0, marker 1 and "
                             f"at least two data tokens)")
        M, L = self.num_tokens_to_copy, self.seq_len
        check_positive_int("num_tokens_to_copy", M)
        if 2 * M > L:
            raise ValueError(f"num_tokens_to_copy={M}: must satisfy 2*num_tokens_to_copy <= "
                             f"seq_len={L} (at most {L // 2})")

    def _generate(self, num_examples, generator):
        N, L, V, M = num_examples, self.seq_len, self.vocab_size, self.num_tokens_to_copy
        device = generator.device
        region = L - M  # data-region length; the answer region is the last M positions
        positions = sample_distinct(generator, N, region, M).sort(dim=1).values  # (N, M)
        data = torch.randint(FIRST_DATA_TOKEN, V, (N, M), generator=generator, device=device)  # (N, M)

        inputs = torch.full((N, L), NOISE, dtype=torch.int64, device=device)
        inputs.scatter_(1, positions, data)
        inputs[:, region] = MARKER
        inputs[:, region + 1 :] = data[:, :-1]
        labels = torch.full((N, L), IGNORE, dtype=torch.int64, device=device)
        labels[:, region:] = data
        slices = {"seq_len": per_example(N, L, device), "num_tokens_to_copy": per_example(N, M, device)}
        return TaskData(inputs, labels, slices)
