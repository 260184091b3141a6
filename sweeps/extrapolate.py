"""Length extrapolation: a trained model's accuracy on sequences far longer than it saw.

Mamba's Table 11 tests induction heads trained at L=256 on L = 2^6 ... 2^20. Each test sequence is
read chunk by chunk with the model's cache carried between chunks (`LM.hidden(ids, cache)`), so a
recurrent model needs memory independent of L. Attention's cache is its K/V of every token (it
grows with L) and each chunk attends to all of it: where that does not fit, the result is "OOM",
as in the paper; learned absolute positions stop at their table ("no positions"). Attention's
time grows with L² even where it fits: lengths that would overrun the time budget are "skipped".
"""
import dataclasses
import time
from pathlib import Path

import hydra
import torch
from omegaconf import DictConfig

from training.files import net_weights

OOM = "OOM"
NO_POSITIONS = "no positions"
SKIPPED = "skipped"


def load_net(cfg: DictConfig, checkpoint: Path, max_seqlen: int):
    """The trained network, rebuilt for positions up to `max_seqlen` where its kind allows it.

    RoPE tables are not saved (they are recomputed for any length); a learned position table keeps
    its trained size.
    """
    weights = net_weights(checkpoint)
    extend = cfg.model.get("pos") != "learned"
    net = hydra.utils.instantiate(cfg.model, max_seqlen=max_seqlen if extend else cfg.model.max_seqlen)
    net.load_state_dict(weights)
    return net.eval()


@torch.no_grad()
def accuracy(net, task, num_examples: int, batch_size: int, chunk_len: int, seed: int, device) -> float:
    """Token accuracy at the scored positions of `num_examples` fresh examples of `task`.

    Each batch (batch_size, L) is fed in chunks of chunk_len tokens, carrying the cache.
    """
    correct = total = 0
    for start in range(0, num_examples, batch_size):
        n = min(batch_size, num_examples - start)
        data = task.generate(n, seed + start, device)
        ids, labels = data.inputs, data.labels  # (n, L)
        cache = net.allocate_cache(n, task.seq_len, device=device)
        for i in range(0, task.seq_len, chunk_len):
            h = net.hidden(ids[:, i:i + chunk_len], cache)  # (n, c, d)
            target = labels[:, i:i + chunk_len]  # (n, c)
            scored = target != -100
            if scored.any():
                predicted = net.head(h[scored]).argmax(-1)  # (s,)
                correct += int((predicted == target[scored]).sum())
                total += int(scored.sum())
        del cache
    return correct / max(total, 1)


def evaluate_lengths(cfg: DictConfig, checkpoint: Path, spec: dict, device=None) -> dict[str, float | str]:
    """`{"eval@seq_len=L/acc": accuracy, or "OOM" / "no positions" / "skipped"}` for every L in
    spec["lengths"], shortest first.

    spec: the sweep's `eval` mapping (lengths, num_examples, batch_tokens, chunk_len, seed,
    max_seconds). Once a length runs out of memory the longer ones are not tried (they need more);
    a length is skipped when the time so far plus 4x the last length's time (attention is quadratic
    in L) would pass max_seconds.
    """
    device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    lengths = sorted(spec["lengths"])
    net = load_net(cfg, checkpoint, max(lengths)).to(device)
    task = hydra.utils.instantiate(cfg.task).task
    results, out_of_memory, start, last = {}, False, time.perf_counter(), 0.0
    for length in lengths:
        key = f"eval@seq_len={length}/acc"
        if out_of_memory:
            results[key] = OOM
            continue
        begun = time.perf_counter()
        if begun - start + 4 * last > spec["max_seconds"]:
            results[key] = SKIPPED
            continue
        batch = max(1, min(spec["num_examples"], spec["batch_tokens"] // length))
        try:
            results[key] = accuracy(net, dataclasses.replace(task, seq_len=length), spec["num_examples"],
                                    batch, spec["chunk_len"], spec["seed"], device)
        except torch.OutOfMemoryError:
            out_of_memory, results[key] = True, OOM
        except ValueError as e:  # a learned position table ends before this length
            if "max_seqlen" not in str(e):
                raise
            results[key] = NO_POSITIONS
        if device.type == "cuda":
            torch.cuda.empty_cache()
        last = time.perf_counter() - begun
    return results
