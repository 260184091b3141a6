"""Train one model on one task.

    python run.py                                        # MQAR + Mamba-2 (the default job)
    python run.py task=mqar model=mamba2 model.d_state=32 task.seq_len=128
    python run.py task=induction_heads model=attention
    python run.py hydra.run.dir=runs/x ckpt_path=last    # resume the run in runs/x

Each run writes into its directory: config.yaml (resolved), TensorBoard events, checkpoints/
(last.ckpt, best.ckpt) and metrics.json. A mistake in the configuration is reported in one line
(`error: model.headdim=48: ...`) with exit status 2, before anything is written.
"""
import contextlib
import json
import os
import sys
import time
from pathlib import Path

import hydra
import lightning as L
import torch
from hydra.core.global_hydra import GlobalHydra
from hydra.errors import HydraException, MissingConfigException
from lightning.pytorch.callbacks import EarlyStopping, LearningRateMonitor, ModelCheckpoint, ThroughputMonitor
from omegaconf import DictConfig, OmegaConf
from omegaconf.errors import ConfigKeyError, OmegaConfBaseException

from models.lit import LitLM

CONF_DIR = str(Path(__file__).resolve().parent / "conf")
USER_ERROR_EXIT = 2
# The top level of conf/train.yaml: an experiment preset that adds other keys belongs to another script.
CONFIG_KEYS = ("task", "model", "trainer", "logger", "optimizer", "scheduler", "weight_decay_on", "seed",
               "target_acc", "ckpt_path", "run_dir")


class ConfigError(ValueError):
    """A user's mistake in the configuration: reported as one line, never as a traceback."""


@contextlib.contextmanager
def config_errors(group):
    """Turn the ValueError/TypeError a constructor raises into a ConfigError naming `group.key`."""
    try:
        yield
    except ConfigError:
        raise
    except (ValueError, TypeError, OmegaConfBaseException, HydraException) as e:
        while e.__cause__ is not None and isinstance(e, HydraException):  # unwrap instantiate()
            e = e.__cause__
        msg = str(e).splitlines()[0] if str(e) else type(e).__name__
        raise ConfigError(f"{group}.{msg}" if group else msg) from e


def build(cfg: DictConfig):
    """Everything a run needs, validated, before anything is generated or written.

    Returns: (datamodule, LitLM).
    """
    extra = sorted(set(cfg) - set(CONFIG_KEYS))
    if extra:
        raise ConfigError(f"{extra[0]}: not a run.py setting (an experiment preset of distill.py?); "
                          f"run.py takes {', '.join(CONFIG_KEYS)}")
    with config_errors("task"):
        datamodule = hydra.utils.instantiate(cfg.task)
    with config_errors("model"):
        net = hydra.utils.instantiate(cfg.model)
    # Optimiser and schedule are built once on a dummy parameter: their constructors check values.
    with config_errors("optimizer"):
        optimizer = hydra.utils.instantiate(cfg.optimizer)
        probe = optimizer([torch.nn.Parameter(torch.zeros(1))])
    with config_errors("scheduler"):
        scheduler = hydra.utils.instantiate(cfg.scheduler) if cfg.scheduler is not None else None
        if scheduler is not None:
            scheduler(probe, 100)
    target = cfg.target_acc
    if target is not None and not (isinstance(target, (int, float)) and 0 < target <= 1):
        raise ConfigError(f"target_acc={target!r}: must be a number in (0, 1], or null")
    ckpt = cfg.ckpt_path
    if ckpt is not None and ckpt != "last" and not Path(ckpt).is_file():
        raise ConfigError(f"ckpt_path={ckpt!r}: no such checkpoint file (give a .ckpt path or 'last')")
    with config_errors(""):
        module = LitLM(net, optimizer, scheduler, weight_decay_on=cfg.weight_decay_on)
    return datamodule, module


def _callbacks(cfg, run_dir):
    tokens = ThroughputMonitor(batch_size_fn=lambda b: b["inputs"].shape[0],
                               length_fn=lambda b: b["inputs"].numel())
    checkpoint = ModelCheckpoint(dirpath=run_dir / "checkpoints", filename="best", monitor="val/acc",
                                 mode="max", save_top_k=1, save_last=True)
    callbacks = [checkpoint, LearningRateMonitor(logging_interval="step"), tokens]
    if cfg.target_acc is not None:
        # Early stop is a threshold, not a plateau: patience is effectively infinite.
        callbacks.append(EarlyStopping(monitor="val/acc", mode="max", patience=10**9,
                                       stopping_threshold=float(cfg.target_acc), check_finite=True))
    return checkpoint, callbacks


def _flat(cfg: DictConfig) -> dict:
    out = {}
    for key, value in OmegaConf.to_container(cfg, resolve=True).items():
        if isinstance(value, dict):
            out.update({f"{key}.{k}": v for k, v in _flat(OmegaConf.create(value)).items()})
        else:
            out[key] = value
    return out


def _write_json(path: Path, obj):
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(obj, indent=2, sort_keys=True) + "\n")
    tmp.replace(path)  # atomic: metrics.json is either absent or complete


def train(cfg: DictConfig, callbacks=()) -> dict[str, float]:
    """Train `cfg.model` on `cfg.task`, test the best checkpoint, return flat metrics.

    `callbacks` are extra Lightning callbacks (an Optuna pruner, say).
    """
    L.seed_everything(cfg.seed, workers=True, verbose=False)  # before build: the model's init draws from it
    datamodule, module = build(cfg)
    run_dir = Path(cfg.run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    (run_dir / "config.yaml").write_text(OmegaConf.to_yaml(cfg, resolve=True))
    print(f"run dir: {run_dir.resolve()}", flush=True)

    logger = hydra.utils.instantiate(cfg.logger, save_dir=str(run_dir)) if cfg.logger else False
    checkpoint, own_callbacks = _callbacks(cfg, run_dir)
    # A curriculum picks its stage's training data when the loader is rebuilt, so rebuild it each epoch.
    reload = {"reload_dataloaders_every_n_epochs": 1} if datamodule.curriculum else {}
    trainer = hydra.utils.instantiate(cfg.trainer, default_root_dir=str(run_dir), logger=logger,
                                      callbacks=own_callbacks + list(callbacks), **reload)
    start = time.perf_counter()
    trainer.fit(module, datamodule=datamodule, ckpt_path=cfg.ckpt_path)
    seconds = time.perf_counter() - start
    steps, epochs = trainer.global_step, trainer.current_epoch

    tested = trainer.test(module, datamodule=datamodule,
                          ckpt_path="best" if checkpoint.best_model_path else None, verbose=False)
    metrics = {k: float(v) for result in tested for k, v in result.items()}
    metrics.update({
        "train/steps": float(steps),
        "train/epochs": float(epochs),
        "train/seconds": seconds,
        "val/acc_best": float(checkpoint.best_model_score) if checkpoint.best_model_score is not None
        else float("nan"),
        "model/params": float(module.net.num_params()),
        "model/state_size": float(module.net.state_size(datamodule.task.seq_len)),
    })
    if logger:
        hparams = {k: v if isinstance(v, (int, float, str, bool)) else str(v)
                   for k, v in _flat(cfg).items() if not k.startswith(("trainer.", "logger."))}
        logger.log_hyperparams(hparams, metrics={k: v for k, v in metrics.items() if k.startswith("test")})
        logger.finalize("success")
    _write_json(run_dir / "metrics.json", metrics)
    print(f"test/acc {metrics.get('test/acc', float('nan')):.4f}  ->  {run_dir / 'metrics.json'}", flush=True)
    return metrics


# -- command line ---------------------------------------------------------------------------------
def _describe_compose_error(e: Exception, overrides, config_name="train") -> str:
    """One line for a Hydra composition error: the key, the bad value, what is allowed."""
    if isinstance(e, MissingConfigException) and e.missing_cfg_file:
        group = os.path.dirname(e.missing_cfg_file)
        name = os.path.basename(e.missing_cfg_file)
        options = e.options or []
        return f"{group}={name}: unknown {group}; allowed: {', '.join(sorted(options))}"
    cause = e
    while cause.__cause__ is not None:
        cause = cause.__cause__
    if isinstance(cause, ConfigKeyError) or "not in struct" in str(cause):
        full_key = getattr(cause, "full_key", None) or ""
        bad = next((o for o in overrides if o.lstrip("+~").split("=", 1)[0] == full_key
                    or o.lstrip("+~").startswith(full_key + ".")), full_key)
        parent = full_key.rpartition(".")[0]
        # The keys that do exist, under the same group choices (task=..., model=...).
        groups = {p.name for p in Path(CONF_DIR).iterdir() if p.is_dir()}
        choices = [o for o in overrides if o.split("=", 1)[0] in groups]
        root = compose(choices, config_name)
        node = OmegaConf.select(root, parent) if parent else root
        allowed = ", ".join(k for k in node.keys() if not str(k).startswith("_")) if node else ""
        return f"{bad}: unknown key '{full_key}'; allowed in {parent or 'the config'}: {allowed}"
    return str(e).strip().splitlines()[0]


def compose(overrides, config_name="train") -> DictConfig:
    """Compose a config from `conf/` (for tests, sweeps and the pre-flight check), strict."""
    GlobalHydra.instance().clear()
    with hydra.initialize_config_dir(config_dir=CONF_DIR, version_base="1.3"):
        return hydra.compose(config_name=config_name, overrides=list(overrides))


def preflight(argv, config_name="train", check=build):
    """Compose and build once before Hydra creates a run directory, so a user's mistake exits with
    one line and leaves nothing behind. Hydra's own flags (-m, --cfg, ...) skip this: Hydra then
    reports composition errors itself."""
    if any(a.startswith("-") for a in argv):
        return
    try:
        cfg = compose(argv, config_name)
        with config_errors(""):
            check(cfg)
    except ConfigError as e:
        exit_user_error(str(e))
    except (HydraException, OmegaConfBaseException, ValueError) as e:
        exit_user_error(_describe_compose_error(e, argv, config_name))
    finally:
        GlobalHydra.instance().clear()


def exit_user_error(message):
    print(f"error: {message}", file=sys.stderr)
    sys.exit(USER_ERROR_EXIT)


@hydra.main(config_path="conf", config_name="train", version_base="1.3")
def main(cfg: DictConfig) -> None:
    try:
        train(cfg)
    except ConfigError as e:  # reached only when preflight was skipped (Hydra flags given)
        exit_user_error(str(e))


if __name__ == "__main__":
    preflight(sys.argv[1:])
    main()
