"""Every config in every group composes and builds (a broken _target_ or key fails here)."""
import functools
from pathlib import Path

import hydra
import pytest
import torch
from omegaconf import OmegaConf

from training import run
from training.lit import LitLM
from tasks.data import TaskDataModule

CONF = Path(run.CONF_DIR)


def options(group):
    return sorted(p.stem for p in (CONF / group).glob("*.yaml"))


RUN_EXPERIMENTS = [e for e in options("experiment") if not e.startswith("mohawk")]  # mohawk_*: distill.py's


@pytest.mark.parametrize("model", options("model"))
@pytest.mark.parametrize("task", options("task"))
def test_task_model_builds(task, model):
    cfg = run.compose([f"task={task}", f"model={model}"])
    datamodule, module = run.build(cfg)
    assert isinstance(datamodule, TaskDataModule) and isinstance(module, LitLM)
    assert module.net.head.out_features == datamodule.vocab_size == cfg.task.vocab_size


# A GPU preset on a machine without one is refused (test_cli); CI builds it for the CPU.
ON_THIS_MACHINE = [] if torch.cuda.is_available() else ["trainer=cpu"]


@pytest.mark.parametrize("model", options("model"))
@pytest.mark.parametrize("experiment", RUN_EXPERIMENTS)
def test_experiment_builds(experiment, model):
    cfg = run.compose([f"experiment={experiment}", f"model={model}", *ON_THIS_MACHINE])
    datamodule, module = run.build(cfg)
    assert datamodule.task.seq_len == cfg.task.seq_len
    assert module.net.num_params() > 0


@pytest.mark.parametrize("experiment", RUN_EXPERIMENTS)
def test_experiment_settings_win_over_the_defaults(experiment):
    """A preset's top-level settings (optimizer, scheduler, target_acc) reach the composed config."""
    preset = OmegaConf.load(CONF / "experiment" / f"{experiment}.yaml")
    cfg = run.compose([f"experiment={experiment}"])
    for key in ("optimizer", "scheduler", "target_acc", "seed"):
        if key not in preset:
            continue
        if OmegaConf.is_dict(preset[key]):
            for name, value in preset[key].items():
                assert cfg[key][name] == value, f"{key}.{name}"
        else:
            assert cfg[key] == preset[key], key


@functools.cache
def recipe_keys(model) -> frozenset:
    """The dotted keys whose values a model's recipe (conf/recipe/<model>.yaml and what it includes)
    changes: the model's config composed with and without it."""
    with_recipe = run._flat(run.compose([f"model={model}", "run_dir=."]))
    without = run._flat(run.compose([f"model={model}", "run_dir=.", "~recipe"]))
    return frozenset(k for k, v in with_recipe.items() if without.get(k, "<unset>") != v)


@pytest.mark.parametrize("experiment", RUN_EXPERIMENTS)
@pytest.mark.parametrize("recipe", options("recipe"))
def test_recipes_do_not_reach_paper_presets(recipe, experiment):
    """A model's recipe (conf/recipe/) is how its CPU default trains: every key it sets, each paper
    preset sets itself, so `experiment=E model=M` trains with the paper's settings for every M."""
    keys = recipe_keys(recipe)
    assert keys, f"recipe/{recipe}.yaml changes nothing"
    preset = OmegaConf.load(CONF / "experiment" / f"{experiment}.yaml")
    missing = sorted(k for k in keys if OmegaConf.select(preset, k, default="<unset>") == "<unset>")
    assert not missing, f"experiment/{experiment}.yaml leaves {missing} to recipe/{recipe}.yaml"
    with_recipe = run.compose([f"experiment={experiment}", f"model={recipe}", *ON_THIS_MACHINE])
    for key in keys:
        assert OmegaConf.select(with_recipe, key) == OmegaConf.select(preset, key), key


@pytest.mark.parametrize("trainer", options("trainer"))
def test_trainer_configs_instantiate(trainer, tmp_path):
    cfg = run.compose([f"trainer={trainer}", f"run_dir={tmp_path}"])
    # The CI machine has no GPU: build every trainer on the CPU, keeping its other settings.
    cpu = {"accelerator": "cpu", "devices": 1, "precision": "32-true", "strategy": "auto"}
    trainer = hydra.utils.instantiate(cfg.trainer, **cpu, logger=False, enable_checkpointing=False)
    assert trainer.max_epochs == cfg.trainer.max_epochs


@pytest.mark.parametrize("logger", options("logger"))
def test_logger_configs_instantiate(logger, tmp_path):
    cfg = run.compose([f"logger={logger}", f"run_dir={tmp_path}"])
    assert hydra.utils.instantiate(cfg.logger).save_dir == str(tmp_path)
