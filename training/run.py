"""run.py's work: build a run from its config, check its run directory, train, test and write metrics.json.

`train(cfg)` is the whole run; `build` and `check_run` are its checks (every one before anything is
written); `resume_config` gives a resume its run's own config; `check_command` and `preflight` check
a command line as a script runs it, so that a mistake is one line with nothing written.
"""
import contextlib
import ctypes
import ctypes.util
import dataclasses
import functools
import json
import logging
import math
import os
import sys
import time
import types
import typing
import warnings
import zipfile
from pathlib import Path

import hydra
import lightning as L
import torch
from hydra.core.global_hydra import GlobalHydra
from hydra.core.override_parser.overrides_parser import OverridesParser
from hydra.errors import HydraException
from lightning.pytorch.callbacks import EarlyStopping, LearningRateMonitor, ModelCheckpoint
from omegaconf import DictConfig, ListConfig, OmegaConf, open_dict
from omegaconf.errors import OmegaConfBaseException

from training.callbacks import Diverged, FiniteLoss, ProgressBar, Throughput
from training.config import (CONF_DIR, ConfigError, check_schema, compose, config_errors, describe_compose_error,
                             exit_user_error, show)
from training.files import load_checkpoint, write_json
from training.lit import LitLM
from training.schemas import TrainConfig

DIVERGED_EXIT = 1
# The top level of conf/train.yaml (what distill.py passes on to train its teacher).
CONFIG_KEYS = tuple(f.name for f in dataclasses.fields(TrainConfig))
# What a resume may change: how long the run trains, where, and how it reports. Anything else
# would make it another run. The first two may grow, not shrink.
LONGER = ("trainer.max_epochs", "trainer.max_steps")
MAY_CHANGE = (*LONGER, "target_acc", "cuda_graph", "trainer.accelerator", "trainer.enable_progress_bar",
              "trainer.log_every_n_steps", "trainer.enable_model_summary")
# Where the run is, what it resumes from and where it logs (logger.save_dir is the run dir) are the
# command's: never compared with the saved config.
NOT_COMPARED = ("run_dir", "ckpt_path", "logger")

# Messages that ask nothing of the user: torch's deprecation of a pytree class that Lightning
# still uses, a resumed run's checkpoints/ not being empty (check_run keeps new runs out of a run
# dir that holds one), a cloud-logging advert, how Lightning counts the steps of the LR schedule.
warnings.filterwarnings("ignore", message=r"`isinstance\(treespec, LeafSpec\)` is deprecated",
                        category=FutureWarning)
warnings.filterwarnings("ignore", message=r"Checkpoint directory .* exists and is not empty")
_SILENCED_INFO = ("💡 Tip:", "Loading `train_dataloader` to estimate number of stepping batches")
for _name in ("lightning.pytorch.utilities.rank_zero", "lightning.fabric.utilities.rank_zero"):
    logging.getLogger(_name).addFilter(lambda record: not record.getMessage().startswith(_SILENCED_INFO))


# -- checks -------------------------------------------------------------------------------------
def _fits(value, hint) -> bool:
    """Whether a config value has the type `hint` of a constructor argument (classes, callables and
    other objects a config cannot hold are left to the constructor)."""
    origin, args = typing.get_origin(hint), typing.get_args(hint)
    if origin in (typing.Union, types.UnionType):
        return any(_fits(value, a) for a in args)
    if origin is typing.Literal:
        return any(value == a and type(value) is type(a) for a in args)
    if hint is type(None):
        return value is None
    if hint in (bool, str):
        return isinstance(value, hint)
    if hint in (int, float):  # a bool is no number here, an int is a float
        return isinstance(value, int if hint is int else (int, float)) and not isinstance(value, bool)
    if origin in (list, tuple) or hint in (list, tuple):
        return isinstance(value, (list, tuple, ListConfig))
    return True


def _type_name(hint) -> str:
    """`int or null`, `one of 64, 32, '32-true', ...`: a constructor's type hint, said as config values."""
    union = typing.get_origin(hint) in (typing.Union, types.UnionType)
    names = []
    for arg in typing.get_args(hint) if union else (hint,):
        if typing.get_origin(arg) is typing.Literal:
            names += [repr(v) for v in typing.get_args(arg)]
        else:
            names.append("null" if arg is type(None) else getattr(typing.get_origin(arg) or arg, "__name__", str(arg)))
    return " or ".join(names) if len(names) <= 2 else "one of " + ", ".join(names)


@contextlib.contextmanager
def _quiet():
    """No info lines or warnings from a constructor that is only being tried."""
    logging.disable(logging.INFO)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            yield
    finally:
        logging.disable(logging.NOTSET)


def check_trainer(trainer_cfg: DictConfig) -> None:
    """The trainer config as its class takes it: argument types, the values Lightning checks when it
    is built, and an accelerator this machine has (a GPU preset on a CPU machine says how to run)."""
    target = hydra.utils.get_class(trainer_cfg._target_)
    hints = typing.get_type_hints(target.__init__)
    values = OmegaConf.to_container(trainer_cfg, resolve=True)
    for key, value in values.items():
        if key in hints and not _fits(value, hints[key]):
            raise ConfigError(f"trainer.{key}={show(value)}: must be {_type_name(hints[key])} "
                              f"(the type {trainer_cfg._target_} takes)")
    if values.get("accelerator") in ("gpu", "cuda") and not torch.cuda.is_available():
        raise ConfigError(f"trainer.accelerator={values['accelerator']}: this machine has no GPU (a GPU preset "
                          "or trainer=gpu/ddp asks for one); add trainer=cpu to run it on the CPU")
    with config_errors("trainer", trainer_cfg, catch=Exception), _quiet():
        hydra.utils.instantiate(trainer_cfg, logger=False, enable_checkpointing=False, callbacks=[])


@functools.cache  # a process setting: once, however many trainers a sweep worker builds
def keep_freed_memory() -> None:
    """Have glibc's malloc keep freed memory for the next step instead of handing it back to the OS.

    A training step on the CPU frees and reallocates the same large tensors every step (at V=8192 the
    (rows, V) logits and their gradients, 8 MB each). By default glibc serves such blocks from fresh
    mmap'd pages, with a threshold it moves as it goes, and trims the heap's free top, so every step
    zero-fills new pages (README, "CPU defaults"). A no-op without glibc's mallopt.
    """
    try:
        mallopt = ctypes.CDLL(ctypes.util.find_library("c")).mallopt
    except (OSError, AttributeError):
        return
    M_TRIM_THRESHOLD, M_MMAP_THRESHOLD = -1, -3  # <malloc.h>
    mallopt(M_MMAP_THRESHOLD, 32 << 20)  # glibc's largest; blocks under it come from the reused heap
    mallopt(M_TRIM_THRESHOLD, 1 << 30)  # keep up to 1 GiB of freed heap top


def make_trainer(trainer_cfg: DictConfig, **kwargs) -> L.Trainer:
    """`trainer_cfg` built; `enable_progress_bar: null` shows the bar only on a terminal (a log file
    would get every redraw)."""
    if trainer_cfg.get("enable_progress_bar") is None:
        kwargs.setdefault("enable_progress_bar", sys.stdout.isatty())
    if kwargs.get("enable_progress_bar", trainer_cfg.get("enable_progress_bar")):
        # Redrawn at logging steps only: each redraw reads the loss, which waits for the GPU.
        every = trainer_cfg.get("log_every_n_steps") or 1
        kwargs["callbacks"] = [*kwargs.get("callbacks", []), ProgressBar(refresh_rate=every)]
    keep_freed_memory()
    return hydra.utils.instantiate(trainer_cfg, **kwargs)


def build(cfg: DictConfig):
    """Everything a run needs, validated, before anything is generated or written.

    Returns: (datamodule, LitLM).
    """
    check_schema(cfg, TrainConfig)
    with config_errors("task", cfg.task):
        datamodule = hydra.utils.instantiate(cfg.task)
    with config_errors("model", cfg.model):
        net = hydra.utils.instantiate(cfg.model)
    check_positions(datamodule, net)
    # Optimiser and schedule are built once on a dummy parameter: their constructors check values.
    with config_errors("optimizer", cfg.optimizer):
        optimizer = hydra.utils.instantiate(cfg.optimizer)
        probe = optimizer([torch.nn.Parameter(torch.zeros(1))])
    with config_errors("scheduler", cfg.scheduler):
        scheduler = hydra.utils.instantiate(cfg.scheduler) if cfg.scheduler is not None else None
        if scheduler is not None:
            scheduler(probe, 100)
    check_trainer(cfg.trainer)
    if cfg.cuda_graph and str(cfg.trainer.get("precision")) in ("16", "16-mixed"):
        raise ConfigError(f"cuda_graph=true: not with trainer.precision={cfg.trainer.precision} (its loss scaling "
                          "happens outside the graph); allowed: trainer.precision=bf16-mixed or 32-true, or cuda_graph=false")
    with config_errors(""):
        module = LitLM(net, optimizer, scheduler, weight_decay_on=cfg.weight_decay_on, cuda_graph=cfg.cuda_graph)
    return datamodule, module


def check_positions(datamodule, net) -> None:
    """Every length the run trains or tests on has positions in the model (learned and RoPE tables
    end at model.max_seqlen), so that no test set fails after training."""
    if getattr(net, "pos", "none") == "none":
        return
    too_long = [n for n in [datamodule.task.seq_len, *datamodule.test_tasks] if n > net.max_seqlen]
    if too_long:
        key = "task.seq_len" if datamodule.task.seq_len in too_long else "task.test_seq_lens"
        value = datamodule.task.seq_len if key == "task.seq_len" else list(datamodule.test_tasks)
        raise ConfigError(f"{key}={value}: model.pos={net.pos} has positions only below model.max_seqlen="
                          f"{net.max_seqlen}; allowed: lengths <= {net.max_seqlen}, a larger model.max_seqlen, "
                          "or model.pos=none")


# -- the run directory: a new run, or the same run resumed -----------------------------------------
def _flat(cfg: DictConfig) -> dict:
    out = {}
    for key, value in OmegaConf.to_container(cfg, resolve=True).items():
        if isinstance(value, dict):
            out.update({f"{key}.{k}": v for k, v in _flat(OmegaConf.create(value)).items()})
        else:
            out[key] = value
    return out


def _leaves(cfg: DictConfig) -> dict:
    """The config's values by dotted key, without the keys that are the command's own."""
    return _flat(OmegaConf.masked_copy(cfg, [k for k in cfg if k not in (*NOT_COMPARED, "hydra")]))


def _limit(value) -> float:
    return math.inf if value in (None, -1) else value


def checkpoint_path(cfg: DictConfig) -> Path | None:
    """The file `ckpt_path` names (`last`: the run dir's checkpoints/last.ckpt), which must exist."""
    if cfg.ckpt_path is None:
        return None
    if cfg.ckpt_path == "last":
        path = Path(cfg.run_dir) / "checkpoints" / "last.ckpt"
        if not path.is_file():
            started = (Path(cfg.run_dir) / "config.yaml").is_file()
            why = ("its run stopped before its first validation, which saves the first checkpoint; "
                   "start again in a new hydra.run.dir") if started else \
                "give the run to resume with hydra.run.dir=<its directory>"
            raise ConfigError(f"ckpt_path=last: {cfg.run_dir} has no checkpoints/last.ckpt ({why})")
        return path
    path = Path(cfg.ckpt_path)
    if not path.is_file():
        raise ConfigError(f"ckpt_path={cfg.ckpt_path!r}: no such checkpoint file (give a .ckpt path or 'last')")
    return path


def check_checkpoint(path: Path, module: L.LightningModule) -> None:
    """`path` is a Lightning checkpoint of this model that loads safely (weights_only: no code runs)."""
    if not zipfile.is_zipfile(path):  # torch.save writes a zip archive, its directory last
        raise ConfigError(f"ckpt_path={str(path)!r}: not a checkpoint (not a torch.save archive, or one cut short)")
    try:
        ckpt = load_checkpoint(path)
    except Exception as e:  # a damaged archive, a pickle that would run code
        reason = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise ConfigError(f"ckpt_path={str(path)!r}: cannot load it with weights_only=True, which runs no code "
                          f"from the file ({reason})") from None
    if not (isinstance(ckpt, dict) and isinstance(ckpt.get("state_dict"), dict) and "loops" in ckpt):
        raise ConfigError(f"ckpt_path={str(path)!r}: not a Lightning training checkpoint (no state_dict "
                          "and loop state)")
    want = {k: tuple(v.shape) for k, v in module.state_dict().items()}
    have = {k: tuple(v.shape) for k, v in ckpt["state_dict"].items()}
    for key in sorted(want.keys() | have.keys()):
        if want.get(key) != have.get(key):
            raise ConfigError(f"ckpt_path={str(path)!r}: a checkpoint of another model ({key}: "
                              f"{have.get(key, 'missing')} in the checkpoint, {want.get(key, 'absent')} in this one)")


def saved_config(cfg: DictConfig) -> tuple[DictConfig, Path] | None:
    """(config, its file) of the run a resume continues: the run dir's config.yaml, else the one
    beside the checkpoint's checkpoints/ folder; None for a checkpoint without one."""
    ckpt = checkpoint_path(cfg)
    for path in (Path(cfg.run_dir) / "config.yaml", ckpt.parent.parent / "config.yaml"):
        if path.is_file():
            return OmegaConf.load(path), path
    return None


def check_resume(cfg: DictConfig, saved: DictConfig, where: Path) -> list[str]:
    """The keys in which `cfg` differs from the run's saved config, all of which a resume may change;
    a ConfigError for any other."""
    new, old = _leaves(cfg), _leaves(saved)
    changed = [k for k in sorted(new.keys() | old.keys()) if new.get(k, ...) != old.get(k, ...)]
    for key in sorted(changed, key=lambda k: k not in new or k not in old):  # changed values first
        value, before = show(new.get(key, "absent")), show(old.get(key, "absent"))
        if key not in MAY_CHANGE:
            raise ConfigError(f"{key}={value}: the run was made with {key}={before} ({where}); a resume continues "
                              f"the same run and may change only {', '.join(MAY_CHANGE)}")
        if key in LONGER and _limit(new[key]) < _limit(old[key]):
            raise ConfigError(f"{key}={value}: the run was made with {key}={before} ({where}); a resume may "
                              "raise it, not lower it")
    return changed


def check_run(cfg: DictConfig, module: L.LightningModule) -> tuple[Path | None, dict | None]:
    """What `cfg` does with its run dir, checked before anything is written there.

    Returns (the checkpoint to resume from, or None for a new run; the metrics of a run that has
    finished and that the command does not extend, else None). A new run needs a run dir without
    a run; a resume needs a checkpoint of this model and the run's own config (check_resume).
    """
    run_dir = Path(cfg.run_dir)
    ckpt = checkpoint_path(cfg)
    if ckpt is None:
        if (run_dir / "config.yaml").exists():
            raise ConfigError(f"hydra.run.dir={run_dir}: already holds a run (its config.yaml); resume it "
                              "with ckpt_path=last, or give another hydra.run.dir")
        return None, None
    saved = saved_config(cfg)
    changed = check_resume(cfg, *saved) if saved is not None else []
    check_checkpoint(ckpt, module)
    metrics = run_dir / "metrics.json"
    if metrics.is_file() and not set(changed) & {*LONGER, "target_acc"}:
        return ckpt, json.loads(metrics.read_text())
    return ckpt, None


def resume_config(cfg: DictConfig, overrides, config_name="train") -> DictConfig:
    """The config that `cfg`, composed from the command line `overrides`, trains: itself for a new
    run; for a resume (`ckpt_path`), the run's saved config with only what the overrides set taken
    from `cfg`, so that the defaults of today's conf/ never replace the run's own values.
    An override that sets a group (`model=...`) sets whatever that group changes in the composition."""
    if cfg.get("ckpt_path") is None:
        return cfg
    saved = saved_config(cfg)
    if saved is None:
        return cfg
    new, old = _leaves(cfg), _leaves(saved[0])
    touched = set()
    for override in OverridesParser.create().parse_overrides(list(overrides)):
        key = override.key_or_group
        if key.split(".")[0] in ("hydra", *NOT_COMPARED):
            continue
        if (Path(CONF_DIR) / key).is_dir():
            rest = _leaves(compose([o for o in overrides if o != override.input_line], config_name))
            touched |= {k for k in new.keys() | rest.keys() if new.get(k, ...) != rest.get(k, ...)}
        else:
            touched |= {k for k in new.keys() | old.keys() if k == key or k.startswith(key + ".")}
    resumed = OmegaConf.merge(saved[0], {k: cfg[k] for k in NOT_COMPARED})
    with open_dict(resumed):
        for key in sorted(touched):
            if key in new:
                OmegaConf.update(resumed, key, new[key], merge=False)
            elif key in old:
                parent, _, name = key.rpartition(".")
                del (OmegaConf.select(resumed, parent) if parent else resumed)[name]
    return resumed


def last_checkpoint(dirpath) -> ModelCheckpoint:
    """`dirpath`/last.ckpt, written at every validation: the newest state, to resume from. Not
    ModelCheckpoint's `save_last`, which (Lightning 2.6) writes last.ckpt only when it also writes a
    monitored checkpoint: a run whose val/acc stalled kept an old last.ckpt, and its resume trained
    the stalled epochs again."""
    return ModelCheckpoint(dirpath=dirpath, filename="last", enable_version_counter=False)


def _callbacks(cfg, run_dir):
    checkpoint = ModelCheckpoint(dirpath=run_dir / "checkpoints", filename="best", monitor="val/acc",
                                 mode="max", save_top_k=1)
    # Early stop is a threshold, not a plateau: patience is effectively infinite. Always present (a
    # null target never stops), so that a resume may change target_acc and still restore its state.
    target = float(cfg.target_acc) if cfg.target_acc is not None else None
    # Not strict: a run stopped by trainer.max_steps before its first validation has no val/acc.
    stop = EarlyStopping(monitor="val/acc", mode="max", patience=10**9, stopping_threshold=target,
                         check_finite=True, strict=False)
    # Throughput after FiniteLoss: it times the logging interval once FiniteLoss has waited for the GPU.
    last = last_checkpoint(run_dir / "checkpoints")
    return checkpoint, [checkpoint, last, LearningRateMonitor(logging_interval="step"), stop, FiniteLoss(), Throughput()]


def _hparams(cfg: DictConfig) -> dict:
    """The run's settings for TensorBoard's HParams: every key but the run's own (where it is, what it
    resumed from, the logger's) and Hydra's (`_target_`); null values are left out (TensorBoard has
    no null)."""
    return {k: v if isinstance(v, (int, float, str, bool)) else str(v) for k, v in _leaves(cfg).items()
            if v is not None and not k.rpartition(".")[2].startswith("_")}


def train(cfg: DictConfig, callbacks=()) -> dict[str, float]:
    """Train `cfg.model` on `cfg.task`, test the best checkpoint, return flat metrics.

    `callbacks` are extra Lightning callbacks (an Optuna pruner, say). With `cfg.ckpt_path`, the run
    in `cfg.run_dir` is resumed (check_run); a finished run returns its metrics without training.
    Raises ConfigError for a mistake in `cfg` (before anything is written) and Diverged when the loss
    becomes non-finite.
    """
    L.seed_everything(cfg.seed, workers=True, verbose=False)  # before build: the model's init draws from it
    datamodule, module = build(cfg)
    ckpt, finished = check_run(cfg, module)
    run_dir = Path(cfg.run_dir)
    print(f"run dir: {run_dir.resolve()}", flush=True)
    if finished is not None:
        print(f"finished already (its metrics are in {run_dir / 'metrics.json'}); to train it on, raise "
              f"trainer.max_epochs (now {cfg.trainer.max_epochs}) or change target_acc (now {cfg.target_acc})",
              flush=True)
        return finished
    run_dir.mkdir(parents=True, exist_ok=True)
    (run_dir / "config.yaml").write_text(OmegaConf.to_yaml(cfg, resolve=True))

    logger = hydra.utils.instantiate(cfg.logger, save_dir=str(run_dir)) if cfg.logger else False
    if logger:
        # Lightning writes hparams.yaml only when it is missing: a resume rewrites it here.
        (run_dir / "hparams.yaml").unlink(missing_ok=True)
        logger.log_hyperparams(_hparams(cfg))
    checkpoint, own_callbacks = _callbacks(cfg, run_dir)
    # A curriculum's stage and fresh data are picked when the loader is rebuilt: rebuild it each epoch.
    reload = {"reload_dataloaders_every_n_epochs": 1} if datamodule.reloads_every_epoch else {}
    trainer = make_trainer(cfg.trainer, default_root_dir=str(run_dir), logger=logger,
                           callbacks=own_callbacks + list(callbacks), **reload)
    start = time.perf_counter()
    try:
        trainer.fit(module, datamodule=datamodule, ckpt_path=ckpt, weights_only=True)
    except Diverged as e:
        last = run_dir / "checkpoints" / "last.ckpt"
        kept = f"its last good checkpoint: {last}" if last.is_file() else "no checkpoint was saved before it"
        raise Diverged(f"{e} (now {cfg.optimizer.get('lr')}); {kept}") from None
    seconds = time.perf_counter() - start
    steps, epochs = trainer.global_step, trainer.current_epoch

    # Tested without the logger: the test metrics reach TensorBoard once, below, with the settings
    # that produced them.
    trainer.loggers = []
    # The best checkpoint by path: ckpt_path="best" warns on every run that there are two ModelCheckpoints.
    tested = trainer.test(module, datamodule=datamodule, ckpt_path=checkpoint.best_model_path or None,
                          verbose=False, weights_only=True)
    metrics = {k: float(v) for result in tested for k, v in result.items()}
    test_metrics = dict(metrics)
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
        logger.log_hyperparams(_hparams(cfg), metrics=test_metrics, step=steps)
        logger.finalize("success")
    write_json(run_dir / "metrics.json", metrics)
    print(f"test/acc {metrics.get('test/acc', float('nan')):.4f}  ->  {run_dir / 'metrics.json'}", flush=True)
    return metrics


# -- command line ---------------------------------------------------------------------------------
def command_config(argv, config_name="train") -> DictConfig:
    """The config that `python <script> argv` runs, without Hydra's flags: composed, with its run dir
    (hydra.run.dir) and, for a resume, the run's own config (resume_config). ConfigError (or Hydra's
    composition error) for a mistake."""
    cfg = compose(argv, config_name, hydra_config=True)
    with open_dict(cfg):
        if "run_dir" in cfg and OmegaConf.is_interpolation(cfg, "run_dir"):
            cfg.run_dir = os.path.abspath(cfg.hydra.run.dir)
        del cfg["hydra"]
    return resume_config(cfg, argv, config_name)


def check(cfg: DictConfig) -> None:
    """run.py's pre-flight check: the run builds and its run dir can take it."""
    _, module = build(cfg)
    check_run(cfg, module)


def check_command(argv, config_name="train", check=check) -> None:
    """Raise ConfigError, with one line, if `python <script> argv` would stop on a mistake."""
    try:
        cfg = command_config(argv, config_name)
        with config_errors(""):
            check(cfg)
    except ConfigError:
        raise
    except (HydraException, OmegaConfBaseException, ValueError) as e:
        raise ConfigError(describe_compose_error(e, argv, config_name)) from e
    finally:
        GlobalHydra.instance().clear()


def preflight(argv, config_name="train", check=check):
    """Check the command before Hydra creates a run directory, so that a user's mistake exits with
    one line and leaves nothing behind. Hydra's own flags (-m, --cfg, ...) skip this: Hydra then
    reports composition errors itself."""
    if any(a.startswith("-") for a in argv):
        return
    try:
        check_command(argv, config_name, check)
    except ConfigError as e:
        exit_user_error(str(e))


@contextlib.contextmanager
def one_line_errors():
    """A script's mistakes and diverged runs as one line: `error: ...`, exit 2 (a user's mistake the
    pre-flight check did not see: Hydra's flags skip it) or 1 (the loss went non-finite)."""
    try:
        yield
    except ConfigError as e:
        exit_user_error(str(e))
    except Diverged as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(DIVERGED_EXIT)


def main(cfg: DictConfig, overrides) -> None:
    """`python run.py overrides` inside Hydra's app, `cfg` composed from them."""
    with one_line_errors():
        train(resume_config(cfg, overrides))
