"""Every config is composed onto its schema (training/schemas.py), and what the schema refuses (a value
of the wrong type, a value out of its range, a missing one) is one line naming the key, the value and
what is allowed."""
from pathlib import Path

import pytest
from omegaconf import OmegaConf

import sweep
from sweeps.spec import from_overrides
from training import distill, run, schemas
from training.config import CONF_DIR, ConfigError, compose


@pytest.mark.parametrize("config_name", ["train", "distill", "sweep"])
def test_each_top_config_is_composed_onto_its_schema(config_name):
    assert OmegaConf.get_type(compose([], config_name)) is schemas.SCHEMAS[config_name]


@pytest.mark.parametrize("task", ["induction_heads", "mqar", "selective_copying"])
def test_a_task_config_is_typed_by_its_tasks_own_dataclass(task):
    cfg = compose([f"task={task}", "run_dir=."])
    typed = OmegaConf.get_type(cfg.task)
    assert typed.__name__.endswith("Config") and {"vocab_size", "seq_len", "batch_size"} <= set(cfg.task)


BAD = {
    # wrong type: refused when Hydra composes, said with the schema's rule or type
    "bool": ("train", ["task.fresh_train=maybe"], "task.fresh_train='maybe': must be true or false"),
    "rule-type": ("train", ["target_acc=abc"], "target_acc='abc': must be a number in (0, 1], or null"),
    "choice": ("train", ["weight_decay_on=norms"], "weight_decay_on='norms': must be one of all, matrices"),
    "type": ("train", ["seed=abc"], "seed='abc': must be an integer"),
    "strict-bool": ("train", ["cuda_graph=3"], "cuda_graph=3: must be true or false"),  # omegaconf would take it
    # a wrong type in a node Hydra builds: what its constructor says (the task's own check)
    "task-type": ("train", ["task.seq_len=abc"], "task.seq_len='abc': must be a positive integer"),
    "range": ("train", ["target_acc=2"], "target_acc=2: must be a number in (0, 1], or null"),
    "stage-lists": ("distill", ["ablation=3"],
                    "ablation=3: must be null or a non-empty list of stage lists, e.g. [[3],[2,3],[1,2,3]]"),
    "stage-list": ("distill", ["ablation=[[3],[3,2]]"],
                   "ablation[1]=[3, 2]: must be a non-empty increasing list of stages from 1, 2, 3"),
    "positive": ("distill", ["evals_per_stage=abc"], "evals_per_stage='abc': must be a positive integer"),
}


@pytest.mark.parametrize("case", BAD)
def test_what_a_schema_refuses_is_one_line(case):
    config_name, overrides, line = BAD[case]
    check = distill.build if config_name == "distill" else run.check
    with pytest.raises(ConfigError) as error:
        run.check_command([*overrides, "run_dir=."], config_name, check=check)
    assert str(error.value) == line


SWEEP_BAD = {
    "type": (["sweep.trials_per_cell=abc"], "sweep.trials_per_cell='abc': must be a positive integer"),
    "nested": (["sweep.sampler.n_startup_trials=0"], "sweep.sampler.n_startup_trials=0: must be a positive integer"),
    "element": (["sweep.eval={lengths:[64,0]}"], "sweep.eval.lengths[1]=0: must be a positive integer"),
    "list": (["sweep.grid=3"], "sweep.grid=3: must be a list"),
    "paper-source": (["sweep.paper={values:{a:1}}"], "sweep.paper.source: missing; give it a value"),
}


@pytest.mark.parametrize("case", SWEEP_BAD)
def test_what_the_sweep_schema_refuses_is_one_line(case):
    overrides, line = SWEEP_BAD[case]
    with pytest.raises(ConfigError) as error:
        sweep.check_command(["sweep=smoke", "action=report", *overrides])
    assert str(error.value) == line


def test_a_sweep_may_carry_the_papers_numbers():
    spec = from_overrides(["sweep=smoke", "sweep.paper={source:'Zoology Fig. 2',values:{attention:{32:0.9}}}"])
    assert spec.paper == {"source": "Zoology Fig. 2", "values": {"attention": {32: 0.9}}}
    assert from_overrides(["sweep=smoke"]).paper is None


def test_distill_presets_are_distill_py_s_own():
    """conf/distill/experiment/ holds distill.py's presets: distill.py takes them (and run.py's) as
    `experiment=`; run.py does not, and says whose they are."""
    assert compose(["experiment=mohawk_smoke"], "distill").total_tokens > 0
    assert compose(["experiment=zoology_fig2"], "distill").task.vocab_size == 8192
    with pytest.raises(ConfigError, match=r"mohawk_smoke is a preset of distill.py"):
        run.check_command(["experiment=mohawk_smoke"])
    assert not list((Path(CONF_DIR) / "experiment").glob("mohawk*"))
