"""Benchmark: a sweep's throughput, as a user runs it (`python sweep.py sweep=<preset>`), for a fixed time.

    PYTHONPATH=. python -m bench.sweep --preset mamba2_fig8 --seconds 250 --workers 1 4   # GPU
    PYTHONPATH=. python -m bench.sweep --preset smoke --seconds 60                     # CPU

For each worker count W: a fresh study in a temporary sweep dir, `python sweep.py sweep=<preset>
sweep.workers_per_gpu=W` started and killed after --seconds (start-up, data, compiles included), then
read back: the trials completed, the epochs trained by all trials (their val/acc events, unfinished
trials included), seconds an epoch (each trial's median gap between validations), epochs and trials an
hour. Trials run in the preset's grid order, so a short run measures its first cells (mamba2_fig8: the
T=256 panel, attention first).
"""
import argparse
import os
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import optuna

from bench.train_step import scalars

ROOT = Path(__file__).resolve().parents[1]


def measure(preset: str, workers: int, seconds: float, extra=()) -> dict:
    """Run the preset's sweep with `workers` per GPU for `seconds` in a fresh study; what it did."""
    with tempfile.TemporaryDirectory() as tmp:
        storage = f"sqlite:///{tmp}/bench.db"
        cmd = [sys.executable, "sweep.py", f"sweep={preset}", f"sweep.dir={tmp}", f"sweep.storage={storage}",
               "sweep.study_name=bench", f"sweep.workers_per_gpu={workers}", *extra]
        with open(f"{tmp}/log.txt", "w") as log:
            start = time.perf_counter()
            # its own session, so the workers it spawns are killed with it
            proc = subprocess.Popen(cmd, cwd=ROOT, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
            try:
                proc.wait(timeout=seconds)
            except subprocess.TimeoutExpired:
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait()
            elapsed = time.perf_counter() - start  # shorter than `seconds` if the sweep ended
        if proc.returncode not in (0, -signal.SIGKILL):
            raise RuntimeError(f"{' '.join(cmd)} failed:\n{Path(tmp, 'log.txt').read_text()[-3000:]}")
        study = optuna.load_study(study_name="bench", storage=storage)
        completed = [t for t in study.trials if t.state == optuna.trial.TrialState.COMPLETE]
        epochs, gaps = 0, []
        for trial_dir in Path(tmp, "trials").glob("*/"):
            times = sorted(e.wall_time for e in scalars(trial_dir, "val/acc"))
            epochs += len(times)
            if len(times) > 1:
                gaps.append(statistics.median(b - a for a, b in zip(times, times[1:])))
    return {"workers": workers, "completed": len(completed), "epochs": epochs,
            "s_per_epoch": statistics.median(gaps) if gaps else float("nan"),
            "seconds": elapsed, "epochs_per_hour": epochs / elapsed * 3600,
            "trials_per_hour": len(completed) / elapsed * 3600}


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--preset", default="mamba2_fig8", help="a conf/sweep preset")
    parser.add_argument("--seconds", type=float, default=250, help="wall time of each sweep")
    parser.add_argument("--workers", type=int, nargs="*", default=[1], help="sweep.workers_per_gpu values")
    parser.add_argument("overrides", nargs="*", help="more sweep.py arguments, e.g. trainer.max_epochs=4")
    args = parser.parse_args()
    rows = []
    for workers in args.workers:
        rows.append(measure(args.preset, workers, args.seconds, args.overrides))
        print(f"{workers} worker(s): {rows[-1]}", flush=True)
    print(f"\n{args.preset}, at most {args.seconds:.0f} s a sweep\n")
    print("| workers per GPU | seconds | trials completed | epochs | s an epoch (a trial) | epochs / hour "
          "| trials / hour |")
    print("|---|---|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['workers']} | {r['seconds']:.0f} | {r['completed']} | {r['epochs']} | {r['s_per_epoch']:.2f} | "
              f"{r['epochs_per_hour']:.0f} | {r['trials_per_hour']:.0f} |")


if __name__ == "__main__":
    main()
