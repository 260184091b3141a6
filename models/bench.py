"""Benchmark: a small LM's whole training step, through run.py and as plain loops over the same model.

    PYTHONPATH=. python -m models.bench                 # every cell; GPU only
    PYTHONPATH=. python -m models.bench --cells mamba2_d64 --steps 400

Per cell (MQAR at Zoology's Fig. 2 size: batch 128 x 256 tokens, V=8192, bf16), ms per training step:
    run.py        `python run.py experiment=zoology_fig2 ...` as a user runs it (cuda_graph=true, and
                  `run.py eager` with cuda_graph=false): the median of its logged tokens/s over the
                  logging intervals, as ms/step; `start` is the process's wall time less its steps.
    plain eager   a loop over the very same `models.lm.LM`: the data on the GPU, scored positions
                  gathered with a fixed-size index, fused AdamW, bf16 autocast.
    plain graph   that step (forward, backward and the optimiser) captured as one CUDA graph.
and the kernels one eager plain step launches (torch.profiler). Ratios are against the plain graph.
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

import run
from models.lit import scored_loss
from tasks.data import batch_tensors

ROOT = Path(__file__).resolve().parents[1]
CELLS = {  # issue #19's table
    "attention_d128": ["model=attention", "model.n_heads=1", "model.d_model=128"],
    "mamba2_d128": ["model=mamba2", "model.n_layers=4", "model.d_model=128", "model.d_state=32",
                    "model.headdim=16"],
    "mamba1_d128": ["model=mamba1", "model.n_layers=4", "model.d_model=128"],
    "mamba2_d64": ["model=mamba2", "model.n_layers=2", "model.d_model=64", "model.d_state=64",
                   "model.headdim=32"],
}
PRESET = ["experiment=zoology_fig2"]


def plain_step(net, optimizer, data, rows):
    """One training step of the plain loop; `rows` (batch,) indexes the resident data."""
    with torch.autocast("cuda", dtype=torch.bfloat16):
        loss, _, _ = scored_loss(net, {k: data[k][rows] for k in ("inputs", "positions", "targets")})
    loss.backward()
    optimizer.step()
    optimizer.zero_grad(set_to_none=False)
    return loss


def plain(overrides, steps):
    """ms/step of the plain eager loop and of its CUDA graph, and the eager step's kernel count."""
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


def through_run_py(overrides, steps, cuda_graph):
    """(ms/step, start-up s) of run.py: steps from its logged tokens/s, start-up = wall − steps."""
    with tempfile.TemporaryDirectory() as tmp:
        args = [*PRESET, *overrides, f"trainer.max_steps={steps}", "target_acc=null", f"cuda_graph={cuda_graph}",
                # one epoch longer than the run, so no validation falls inside it
                f"task.num_train={128 * (steps + 1)}", "trainer.log_every_n_steps=50", f"hydra.run.dir={tmp}"]
        start = time.perf_counter()
        proc = subprocess.run([sys.executable, "run.py", *args], cwd=ROOT, capture_output=True, text=True)
        if proc.returncode:
            raise RuntimeError(f"run.py {' '.join(args)} failed:\n{proc.stderr[-3000:]}")
        wall = time.perf_counter() - start
        rates = []
        for path in glob.glob(f"{tmp}/**/events.out.tfevents.*", recursive=True):  # training's and hparams'
            events = EventAccumulator(path).Reload()
            if "train/tokens_per_sec" in events.Tags()["scalars"]:
                rates += [e.value for e in events.Scalars("train/tokens_per_sec")]
    ms = 128 * 256 / statistics.median(rates) * 1e3
    return ms, wall - steps * ms / 1e3


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--cells", nargs="*", default=list(CELLS), choices=list(CELLS))
    parser.add_argument("--steps", type=int, default=500, help="timed steps per measurement")
    args = parser.parse_args()
    print(f"{torch.cuda.get_device_name()} · torch {torch.__version__}")
    rows = []
    for cell in args.cells:
        eager, graph, kernels = plain(CELLS[cell], args.steps)
        ours, start = through_run_py(CELLS[cell], args.steps, cuda_graph=True)
        ours_eager, _ = through_run_py(CELLS[cell], args.steps, cuda_graph=False)
        rows.append((cell, ours, ours_eager, eager, graph, kernels, start))
        print(f"{cell}: run.py {ours:.2f} ms, run.py eager {ours_eager:.2f}, plain eager {eager:.2f}, "
              f"plain graph {graph:.2f}, {kernels} kernels, start {start:.1f} s", flush=True)
    print("\n| cell | run.py | run.py eager | plain eager | plain graph | run.py / graph | tokens/s (run.py) "
          "| kernels/step | run.py start-up |")
    print("|---|---|---|---|---|---|---|---|---|")
    for cell, ours, ours_eager, eager, graph, kernels, start in rows:
        print(f"| {cell} | {ours:.2f} ms | {ours_eager:.2f} | {eager:.2f} | {graph:.2f} | {ours / graph:.2f}x "
              f"| {128 * 256 / ours * 1e3:,.0f} | {kernels} | {start:.1f} s |")


if __name__ == "__main__":
    main()
