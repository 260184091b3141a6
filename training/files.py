"""What runs read and write besides their config: checkpoints and metrics.json.

Every checkpoint is loaded here, with `weights_only=True`: a checkpoint is a file that someone
else may have written, and unpickling anything else would run its code. Lightning's checkpoints hold
only tensors, numbers, strings and containers of them, which that mode loads.
"""
import json
import math
from pathlib import Path

import torch


def load_checkpoint(path) -> dict:
    """The checkpoint at `path`, on the CPU, memory-mapped (a resume check reads its shapes only)."""
    return torch.load(path, map_location="cpu", weights_only=True, mmap=True)


def net_weights(path) -> dict:
    """The `net.*` entries of a LitLM checkpoint's state_dict, as the network's own state_dict."""
    state = load_checkpoint(path)["state_dict"]
    return {k.removeprefix("net."): v for k, v in state.items() if k.startswith("net.")}


def write_json(path: Path, obj):
    """Strict JSON, atomically (the file is either absent or complete). A non-finite number (the
    loss of a run that never trained, say) is written as null, which every JSON reader takes."""
    clean = {k: None if isinstance(v, float) and not math.isfinite(v) else v for k, v in obj.items()}
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(clean, indent=2, sort_keys=True, allow_nan=False) + "\n")
    tmp.replace(path)
