"""Train one model on one task.

    python run.py                                        # MQAR + Mamba-2 (the default job)
    python run.py task=mqar model=mamba2 model.d_state=32 task.seq_len=128 task.vocab_size=256
    python run.py hydra.run.dir=runs/x trainer.max_epochs=2
    python run.py hydra.run.dir=runs/x ckpt_path=last    # resume the run in runs/x: its own config

Each run writes into its directory: config.yaml (resolved), TensorBoard events, checkpoints/
(last.ckpt, best.ckpt) and metrics.json. A mistake in the configuration is reported in one line
(`error: model.headdim=48: ...`) with exit status 2, before anything is written; a run whose loss
turns NaN stops with one line and exit status 1, keeping its last checkpoint from before.
The work is training.run's.
"""
import sys

import hydra
from hydra.core.hydra_config import HydraConfig
from omegaconf import DictConfig

from training import run


@hydra.main(config_path="conf", config_name="train", version_base="1.3")
def main(cfg: DictConfig) -> None:
    run.main(cfg, HydraConfig.get().overrides.task)


if __name__ == "__main__":
    run.preflight(sys.argv[1:])
    main()
