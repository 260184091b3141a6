"""Benchmark: a small LM's whole training step, through run.py and as plain loops over the same model.

    PYTHONPATH=. python -m bench.train_step             # every cell; GPU only
    PYTHONPATH=. python -m bench.train_step --cells mamba2_d64 --steps 400

Per cell (MQAR at Zoology's Fig. 2 size: batch 128 x 256 tokens, V=8192, bf16), ms per training step:
    run.py        `python run.py experiment=zoology_fig2 ...` as a user runs it: the median of its
                  logged tokens/s over the logging intervals, as ms/step (`run.py eager`, with
                  --eager: `cuda_graph=false`).
    plain eager   a loop over the very same `models.lm.LM`: the data on the GPU, scored positions
                  gathered with a fixed-size index, gradients clipped at norm 1, fused AdamW, bf16 autocast.
    plain graph   that step (forward, backward and the optimiser) captured as one CUDA graph.
the kernels one eager plain step launches (torch.profiler), and `first step`: seconds from launching
run.py to the end of its first training step, with Triton's caches warm (the cell's runs before it).
Ratios are against the plain graph. --profile prints each cell's kernels by GPU time.
"""
import argparse
import glob
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import hydra
import torch
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from tasks.data import batch_tensors
from training import run
from training.lit import scored_loss

ROOT = Path(__file__).resolve().parents[1]
CELLS = {  # issue #19's table, and a Fig. 8 cell
    "attention_d128": ["model=attention", "model.n_heads=1", "model.d_model=128"],
    "mamba2_d128": ["model=mamba2", "model.n_layers=4", "model.d_model=128", "model.d_state=32",
                    "model.headdim=16"],
    "mamba1_d128": ["model=mamba1", "model.n_layers=4", "model.d_model=128"],
    "mamba2_d64": ["model=mamba2", "model.n_layers=2", "model.d_model=64", "model.d_state=64",
                   "model.headdim=32"],
    # mamba2_fig8's T=256 cell: the same model, 64 scored positions an example instead of 16
    "mamba2_d64_fig8": ["model=mamba2", "model.n_layers=2", "model.d_model=64", "model.d_state=64",
                        "model.headdim=32", "task.random_non_queries=true", "task.num_kv_pairs=64"],
}
PRESET = ["experiment=zoology_fig2"]


def plain_step(net, optimizer, data, rows):
    """One training step of the plain loop; `rows` (batch,) indexes the resident data."""
    with torch.autocast("cuda", dtype=torch.bfloat16):
        loss, _, _ = scored_loss(net, {k: data[k][rows] for k in ("inputs", "positions", "targets")})
    loss.backward()
    torch.nn.utils.clip_grad_norm_(net.parameters(), 1.0)  # run.py's gradient_clip_val
    optimizer.step()
    optimizer.zero_grad(set_to_none=False)
    return loss


def plain(overrides, steps, profile=False):
    """ms/step of the plain eager loop and of its CUDA graph, and the eager step's kernel count
    (with `profile`, also printed: the step's kernels by GPU time)."""
    cfg = run.compose([*PRESET, *overrides])
    torch.manual_seed(0)
    net = hydra.utils.instantiate(cfg.model).cuda()
    task = hydra.utils.instantiate(cfg.task).task
    data = {k: v.cuda() for k, v in batch_tensors(task.generate(cfg.task.batch_size * 64, 0)).items()}
    n, b = data["inputs"].shape[0], cfg.task.batch_size
    optimizer = torch.optim.AdamW(net.parameters(), lr=cfg.optimizer.lr, weight_decay=0.1, fused=True,
                                  capturable=True)
    orders = torch.randperm(n, device="cuda")[: n // b * b].view(-1, b)  # (batches, b)

    def time_loop(step):
        for i in range(10):
            step(orders[i % len(orders)])
        torch.cuda.synchronize()
        start = time.perf_counter()
        for i in range(steps):
            step(orders[i % len(orders)])
        torch.cuda.synchronize()
        return (time.perf_counter() - start) / steps * 1e3

    eager_ms = time_loop(lambda rows: plain_step(net, optimizer, data, rows))
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CUDA]) as prof:
        plain_step(net, optimizer, data, orders[0])
        torch.cuda.synchronize()
    kernels = sum(e.count for e in prof.key_averages() if e.device_type == torch.autograd.DeviceType.CUDA)
    if profile:
        print(prof.key_averages().table(sort_by="cuda_time_total", row_limit=25, max_name_column_width=70))

    rows = orders[0].clone()
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        for _ in range(3):
            plain_step(net, optimizer, data, rows)
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        plain_step(net, optimizer, data, rows)

    def replay(r):
        rows.copy_(r)
        graph.replay()

    return eager_ms, time_loop(replay), kernels


def scalars(run_dir, tag):
    """The TensorBoard events of `tag` in a run dir (its training's and its hparams' files)."""
    found = []
    for path in glob.glob(f"{run_dir}/**/events.out.tfevents.*", recursive=True):
        events = EventAccumulator(path).Reload()
        if tag in events.Tags()["scalars"]:
            found += events.Scalars(tag)
    return found


def _run_py(args, tmp):
    """Run `python run.py args` in run dir `tmp`; its launch time (time.time())."""
    launched = time.time()
    proc = subprocess.run([sys.executable, "run.py", *args, f"hydra.run.dir={tmp}"], cwd=ROOT, capture_output=True,
                          text=True)
    if proc.returncode:
        raise RuntimeError(f"run.py {' '.join(args)} failed:\n{proc.stderr[-3000:]}")
    return launched


def through_run_py(overrides, steps, extra=()):
    """run.py's ms/step, from its logged tokens/s."""
    with tempfile.TemporaryDirectory() as tmp:
        # one epoch longer than the run, so no validation falls inside it
        _run_py([*PRESET, *overrides, f"trainer.max_steps={steps}", "target_acc=null", *extra,
                 f"task.num_train={128 * (steps + 1)}", "trainer.log_every_n_steps=50"], tmp)
        rates = [e.value for e in scalars(tmp, "train/tokens_per_sec")]
    return 128 * 256 / statistics.median(rates) * 1e3


def first_step(overrides):
    """Seconds from launching run.py to the end of its first training step (the first train/loss
    event's time: logged every step here)."""
    with tempfile.TemporaryDirectory() as tmp:
        launched = _run_py([*PRESET, *overrides, "trainer.max_steps=1", "target_acc=null", "task.num_train=256",
                            "trainer.log_every_n_steps=1"], tmp)
        return min(e.wall_time for e in scalars(tmp, "train/loss")) - launched


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--cells", nargs="*", default=list(CELLS), choices=list(CELLS))
    parser.add_argument("--steps", type=int, default=500, help="timed steps per measurement")
    parser.add_argument("--eager", action="store_true", help="also time run.py with cuda_graph=false")
    parser.add_argument("--profile", action="store_true", help="print each cell's kernels by GPU time")
    args = parser.parse_args()
    print(f"{torch.cuda.get_device_name()} · torch {torch.__version__}")
    variants = {"run.py": []}
    if args.eager:
        variants["run.py eager"] = ["cuda_graph=false"]
    rows = []
    for cell in args.cells:
        eager, graph, kernels = plain(CELLS[cell], args.steps, args.profile)
        ours = {name: through_run_py(CELLS[cell], args.steps, extra) for name, extra in variants.items()}
        start = first_step(CELLS[cell])
        rows.append((cell, ours, eager, graph, kernels, start))
        print(f"{cell}: {', '.join(f'{k} {v:.2f} ms' for k, v in ours.items())}, plain eager {eager:.2f}, "
              f"plain graph {graph:.2f}, {kernels} kernels, first step {start:.1f} s", flush=True)
    print(f"\n| cell | {' | '.join(variants)} | plain eager | plain graph | run.py / graph | tokens/s (run.py) "
          "| kernels/step | first step |")
    print("|---|" + "---|" * (len(variants) + 7))
    for cell, ours, eager, graph, kernels, start in rows:
        print(f"| {cell} | {' | '.join(f'{v:.2f} ms' for v in ours.values())} | {eager:.2f} | {graph:.2f} "
              f"| {ours['run.py'] / graph:.2f}x | {128 * 256 / ours['run.py'] * 1e3:,.0f} | {kernels} | {start:.1f} s |")


if __name__ == "__main__":
    main()
