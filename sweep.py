"""Optuna sweeps over train configs: a grid of cells, a learning-rate search inside each.

    python sweep.py sweep=smoke                            # run (or resume) the study
    python sweep.py sweep=mamba2_fig8 sweep.storage=postgresql://user@host/db   # one more worker
    python sweep.py sweep=mamba2_fig8 action=report        # figure (PNG) + table (CSV)
    python sweep.py sweep=zoology_fig2 trainer.max_epochs=8 sweep.study_name=zoology_fig2_short
    optuna-dashboard sqlite:///runs/sweeps/smoke/study.db  # live view

Arguments `sweep...` and `action=...` configure the sweep (conf/sweep.yaml, conf/sweep/*.yaml);
every other argument is a train override (as for run.py) added to every trial of the study.
On a host with GPUs the command starts `sweep.workers_per_gpu` (default 1) worker processes on every
GPU it sees; start it on more machines (with a shared storage) to add workers; each cell is trained
once. A mistake in the configuration is reported in one line with exit status 2, before anything trains.
"""
import os
import sys

import torch

from sweeps import driver, report
from sweeps.spec import load, split_args
from training import run
from training.config import ConfigError, compose, exit_user_error


def check_command(argv) -> None:
    """Raise ConfigError, with one line, if `python sweep.py argv` would stop on a mistake: the
    sweep config, and for action=run every cell of the grid built (sweeps.driver.check_cells)."""
    flags = [a for a in argv if a.startswith("-")]
    if flags:
        raise ConfigError(f"{flags[0]}: sweep.py takes no flags, only key=value overrides")
    sweep_args, train_args = split_args(argv)
    hydra_args = [a for a in train_args if a.lstrip("+~").startswith("hydra.")]
    if hydra_args:
        raise ConfigError(f"{hydra_args[0]}: sweep.py takes no hydra.* overrides (each trial's run dir is "
                              "under sweep.dir; set that instead)")

    def check(cfg):
        sweep = load(cfg, train_args)
        if cfg.action == "run":
            driver.check_cells(sweep)

    run.check_command(sweep_args, config_name="sweep", check=check)


def main(argv=None, train=run.train):
    """`train(cfg, callbacks=...) -> metrics` trains one trial (tests pass a cheap stand-in)."""
    argv = sys.argv[1:] if argv is None else list(argv)
    if any(a in ("-h", "--help") for a in argv):
        print(__doc__)
        return
    try:
        check_command(argv)
    except ConfigError as e:
        exit_user_error(str(e))
    sweep_args, train_args = split_args(argv)
    cfg = compose(sweep_args, config_name="sweep")
    try:
        sweep = load(cfg, train_args)
        if cfg.action == "run":
            gpus = driver.worker_gpus(torch.cuda.device_count(), sweep.workers_per_gpu,
                                      os.environ.get("CUDA_VISIBLE_DEVICES"))
            if len(gpus) > 1:  # a worker process per GPU (and per sweep.workers_per_gpu)
                sys.exit(driver.spawn_workers(argv, gpus))
            driver.work(sweep, train=train)
        else:
            for path in report.write(sweep):
                print(path)
    except ConfigError as e:  # the storage cannot be opened, or the study has other settings
        exit_user_error(str(e))


if __name__ == "__main__":
    main()
