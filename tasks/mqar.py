"""Multi-query associative recall (MQAR), as in Zoology (Arora et al. 2023).

Sources: the Zoology paper and HazyResearch/zoology `zoology/data/multiquery_ar.py` (its semantics,
reimplemented here with batched torch operations).
"""
import math
from dataclasses import dataclass

import torch

from tasks.base import (IGNORE, Task, TaskData, check_positive_int, per_example, row_chunks,
                        sample_distinct)


@dataclass
class MQAR(Task):
    """Recall the values of K keys, each queried once after all K key-value pairs were shown.

    Parameters: V = vocab_size, L = seq_len (even, L < V), K = num_kv_pairs (4·K <= L),
    a = power_a (> 0), random_non_queries.

    Token ids: keys are drawn from [1, V/2) and values from [V/2, V) (V/2 rounds down), K of each
    without replacement within an example; 0 is the filler.

    Layout of one example (positions 0-based):
        [0, 2K)     context: k_1 v_1 k_2 v_2 ... k_K v_K
        [2K, L)     query region: S = (L - 2K)/2 two-token slots; slot s covers positions
                    2K + 2s (where a key may go) and 2K + 2s + 1 (always filler).
    K distinct slots are drawn without replacement, each draw with probability ∝ a·g^(a-1) over
    gap g = s + 1 (a = 0.01 ≈ 1/g bunches queries near the start of the query region; a = 1 is
    uniform). The i-th drawn slot holds key k_i, so each key is queried once, in random order.
    Every other query-region token is 0, or, with random_non_queries, uniform over the whole
    vocabulary [0, V) (as Zoology does: such a filler may repeat a key or value, unscored).

    Labels: the queried key's value v_i at the key's own position 2K + 2s_i (the model outputs the
    value while reading the key); the other L - K positions are -100.

        inputs: k1 v1 k2 v2  0  0 k2  0  0  0 k1  0      (L=12, K=2: slots 1 and 3 drawn)
        labels:  -  -  -  -  -  - v2  -  -  - v1  -

    Slices (constant per dataset, as in Zoology, so mixed datasets can be broken down):
        num_kv_pairs, seq_len.
    """

    num_kv_pairs: int
    power_a: float = 0.01
    random_non_queries: bool = False

    def __post_init__(self):
        super().__post_init__()
        L, V = self.seq_len, self.vocab_size
        check_positive_int("num_kv_pairs", self.num_kv_pairs)
        if L % 2:
            raise ValueError(f"seq_len={L}: must be even (the query region is two-token slots)")
        if V <= L:
            raise ValueError(f"vocab_size={V}: must be > seq_len={L} (Zoology's check)")
        # V > L >= 4K also leaves room for K distinct keys in [1, V/2) and values in [V/2, V).
        if 4 * self.num_kv_pairs > L:
            raise ValueError(f"num_kv_pairs={self.num_kv_pairs}: must satisfy 4*num_kv_pairs <= "
                             f"seq_len={L} (at most {L // 4})")
        a = self.power_a
        is_number = isinstance(a, (int, float)) and not isinstance(a, bool)
        if not (is_number and math.isfinite(a) and a > 0):
            raise ValueError(f"power_a={a!r}: must be a positive number "
                             f"(0.01 = Zoology, 1 = uniform)")
        if not isinstance(self.random_non_queries, bool):
            raise ValueError(f"random_non_queries={self.random_non_queries!r}: "
                             f"must be true or false")

    def _generate(self, num_examples, generator):
        N, L, V, K = num_examples, self.seq_len, self.vocab_size, self.num_kv_pairs
        device = generator.device
        half = V // 2
        keys = 1 + sample_distinct(generator, N, half - 1, K)  # (N, K) in [1, V/2)
        values = half + sample_distinct(generator, N, V - half, K)  # (N, K) in [V/2, V)

        num_slots = (L - 2 * K) // 2
        gap = torch.arange(1, num_slots + 1, dtype=torch.float64, device=device)
        # log of a·g^(a-1) up to a constant (only ratios matter); logs never over- or underflow.
        log_weight = ((self.power_a - 1) * gap.log()).float()  # (S,)
        slots = _weighted_draws(generator, N, log_weight, K)  # (N, K), the i-th draw is for key i
        query_pos = 2 * K + 2 * slots  # (N, K)

        inputs = torch.zeros(N, L, dtype=torch.int64, device=device)
        inputs[:, 0 : 2 * K : 2] = keys
        inputs[:, 1 : 2 * K : 2] = values
        if self.random_non_queries:
            inputs[:, 2 * K :] = torch.randint(0, V, (N, L - 2 * K), generator=generator, device=device)
        inputs.scatter_(1, query_pos, keys)
        labels = torch.full((N, L), IGNORE, dtype=torch.int64, device=device)
        labels.scatter_(1, query_pos, values)
        slices = {"num_kv_pairs": per_example(N, K, device), "seq_len": per_example(N, L, device)}
        return TaskData(inputs, labels, slices)


def _weighted_draws(generator, num_rows, log_weight, k):
    """Per row, k successive draws without replacement from [0, len(log_weight)), each with
    probability ∝ exp(log_weight) among the indices not yet drawn; returns (num_rows, k) in draw
    order.

    Exponential races: index s finishes at time E_s / w_s with E_s ~ Exp(1); the order in which
    indices finish is exactly such a sequence of draws, so the k first finishers are it. Times
    are compared as logs, log E_s - log w_s, so extreme weights do not tie at 0 or inf.
    """
    device = log_weight.device
    out = torch.empty(num_rows, k, dtype=torch.int64, device=device)
    for rows in row_chunks(num_rows, log_weight.numel()):
        n = rows.stop - rows.start
        log_finish = torch.empty(n, log_weight.numel(), device=device).exponential_(generator=generator).log_()
        log_finish -= log_weight  # (n, S)
        out[rows] = log_finish.topk(k, dim=1, largest=False).indices  # first finisher first
    return out
