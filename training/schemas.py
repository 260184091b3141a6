"""Structured-config schemas: the type of every setting, and the range of those a type cannot say.

Hydra composes each config onto its schema (conf/*.yaml's defaults list names it), so a misspelled
key or a value of the wrong type fails at composition; a field's `Rule` (its `metadata`) says what
else it allows. training.config reads these declarations both ways: `check_schema` enforces the
rules before anything is built, and the one-line error path says what a key allows.

    schema/train     run.py          TrainConfig
    schema/distill   distill.py      DistillConfig
    schema/sweep     sweep.py        SweepCommand (the sweep itself: SweepConfig)
    schema/task/<t>  conf/task/<t>   the task's own dataclass (tasks/<t>.py) and the data's settings

The values live in conf/; a schema default is given only where a config leaves a section null and
a preset may fill it in part (sweep.pruner, sweep.eval). Models are checked by their constructors
(models/), the trainer by Lightning's signature (training.run.check_trainer).
"""
import dataclasses
from dataclasses import MISSING, dataclass, field
from typing import Any, Callable, List, Optional

from hydra.core.config_store import ConfigStore

import tasks
from training.lit import WEIGHT_DECAY_ON


@dataclass(frozen=True)
class Rule:
    """What a setting allows beyond its type: `says` completes "must be ...", `allows` checks a value."""

    says: str
    allows: Callable[[Any], bool]


def _int(v) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def _stages(v) -> bool:
    return isinstance(v, list) and bool(v) and all(_int(s) and s in (1, 2, 3) for s in v) and v == sorted(set(v))


# A true/false setting is declared `Any` with this rule: omegaconf would take 3 or "yes" for true.
BOOL = Rule("true or false", lambda v: isinstance(v, bool))
POSITIVE = Rule("a positive integer", lambda v: _int(v) and v > 0)
NON_NEGATIVE = Rule("a non-negative integer", lambda v: _int(v) and v >= 0)
NON_EMPTY = Rule("a non-empty string", lambda v: isinstance(v, str) and v != "")
STAGES = Rule("a non-empty increasing list of stages from 1, 2, 3", _stages)
STAGE_LISTS = Rule("null or a non-empty list of stage lists, e.g. [[3],[2,3],[1,2,3]]",
                   lambda v: isinstance(v, list) and bool(v))


def one_of(*values) -> Rule:
    return Rule(f"one of {', '.join(values)}", lambda v: v in values)


def setting(rule: Rule | None = None, each: Rule | None = None, default=MISSING, factory=MISSING):
    """A schema field with its rule (for the value) or `each` (for every element of a list)."""
    return field(default=default, default_factory=factory, metadata={"rule": rule, "each": each})


def section(schema: type):
    """An optional mapping typed by `schema` once it is given (null: absent). Declared `Any`, and
    typed by the check (training.config.check_schema): omegaconf 2.3 cannot merge a command-line
    mapping (`sweep.eval={lengths: [64]}`) into a typed null."""
    return field(default=None, metadata={"section": schema})


# -- run.py and distill.py ------------------------------------------------------------------------
TARGET_ACC = Rule("a number in (0, 1], or null", lambda v: isinstance(v, (int, float)) and 0 < v <= 1)
ACTIONS = ("run", "report")
REPORT_KINDS = ("capacity", "table", "extrapolation")
DIRECTIONS = ("maximize", "minimize")


@dataclass
class TrainingConfig:
    """What run.py's runs and distill.py's teacher both train with. The groups (task, model, trainer,
    logger) and the optimiser and scheduler (`_partial_` constructors) are checked by what builds them."""

    task: Any = MISSING
    model: Any = MISSING
    trainer: Any = MISSING
    logger: Any = MISSING
    seed: int = MISSING
    target_acc: Optional[float] = setting(TARGET_ACC)
    run_dir: str = MISSING
    optimizer: Any = MISSING
    weight_decay_on: str = setting(one_of(*WEIGHT_DECAY_ON))
    cuda_graph: Any = setting(BOOL)
    scheduler: Any = MISSING


@dataclass
class TrainConfig(TrainingConfig):
    """conf/train.yaml."""

    ckpt_path: Optional[str] = MISSING


@dataclass
class StageConfig:
    tokens: int = setting(POSITIVE)
    optimizer: Any = MISSING


@dataclass
class DistillationConfig:
    """Stage 3's settings; training.distill.KnowledgeDistillation checks their ranges."""

    temperature: float = MISSING
    hard_weight: float = MISSING
    optimizer: Any = MISSING


@dataclass
class DistillConfig(TrainingConfig):
    """conf/distill.yaml: the teacher's training settings (as run.py's) and the stages'."""

    student: Any = MISSING
    teacher: Optional[str] = MISSING
    # Lists of Any: the rules say what their elements must be, for any element.
    stages: List[Any] = setting(STAGES)
    ablation: Optional[List[Any]] = setting(STAGE_LISTS, each=STAGES)
    scratch: Any = setting(BOOL)
    total_tokens: int = setting(POSITIVE)
    evals_per_stage: int = setting(POSITIVE)
    stage1: StageConfig = MISSING
    stage2: StageConfig = MISSING
    stage3: DistillationConfig = MISSING


# -- sweep.py -------------------------------------------------------------------------------------
@dataclass
class SamplerConfig:
    n_startup_trials: int = setting(POSITIVE)
    seed: Optional[int] = MISSING


@dataclass
class PrunerConfig:
    monitor: str = setting(NON_EMPTY, default="val/acc")
    n_startup_trials: int = 2
    n_warmup_steps: int = 0


@dataclass
class EvalConfig:
    lengths: List[int] = setting(Rule("a non-empty list of the sequence lengths to evaluate at", bool),
                                 each=POSITIVE, factory=list)
    num_examples: int = setting(POSITIVE, default=64)
    batch_tokens: int = setting(POSITIVE, default=2**20)
    chunk_len: int = setting(POSITIVE, default=4096)
    seed: int = 12345
    max_seconds: int = setting(POSITIVE, default=1800)


@dataclass
class ReportConfig:
    kind: str = setting(one_of(*REPORT_KINDS))
    x: Optional[str] = MISSING
    hue: Optional[str] = MISSING
    panel: Optional[str] = MISSING
    best_over: List[str] = MISSING
    title: Optional[str] = MISSING
    ylabel: Optional[str] = MISSING
    train_len: Optional[int] = MISSING


@dataclass
class PaperConfig:
    """A paper's own numbers, for the report to set beside the sweep's: where they are from, and
    the values (a mapping whose shape depends on report.kind)."""

    source: str = setting(NON_EMPTY)
    values: Any = setting(Rule("a non-empty mapping of the reported cells to the paper's values",
                               lambda v: isinstance(v, dict) and bool(v)))  # its shape: sweeps.spec.check_paper


@dataclass(kw_only=True)  # a section (default null) may come before a required setting
class SweepConfig:
    """conf/sweep/base.yaml; the grid and search syntax is sweeps/spec.py's."""

    name: str = setting(NON_EMPTY)
    description: str = MISSING
    study_name: str = setting(NON_EMPTY)
    dir: str = setting(NON_EMPTY)
    storage: Optional[str] = setting(NON_EMPTY)
    train: List[str] = setting(each=NON_EMPTY)
    grid: List[Any] = MISSING
    search: List[Any] = MISSING
    trials_per_cell: int = setting(POSITIVE)
    n_trials: Optional[int] = setting(POSITIVE)
    objective: str = setting(NON_EMPTY)
    direction: str = setting(one_of(*DIRECTIONS))
    sampler: SamplerConfig = MISSING
    pruner: Any = section(PrunerConfig)
    heartbeat_interval: int = setting(POSITIVE)
    grace_period: Optional[int] = setting(POSITIVE)
    max_retries: int = setting(NON_NEGATIVE)
    workers_per_gpu: int = setting(POSITIVE)
    eval: Any = section(EvalConfig)
    report: ReportConfig = MISSING
    paper: Any = section(PaperConfig)


@dataclass
class SweepCommand:
    """conf/sweep.yaml."""

    sweep: SweepConfig = MISSING
    action: str = setting(one_of(*ACTIONS))


# -- tasks ----------------------------------------------------------------------------------------
@dataclass
class DataConfig:
    """The data's settings of every task config (tasks.data.TaskDataModule's, which checks them)."""

    num_train: int = MISSING
    num_val: int = MISSING
    num_test: int = MISSING
    batch_size: int = MISSING
    seed: int = MISSING
    test_seq_lens: List[Any] = MISSING  # lengths: checked by TaskDataModule
    fresh_train: Any = MISSING  # true or false (typed Any: see BOOL)
    curriculum: Any = MISSING  # stages: checked by tasks.data.parse_curriculum
    curriculum_cycle: Any = MISSING  # true or false (see fresh_train)


def task_schema(name: str) -> type:
    """conf/task/<name>.yaml: the task's own dataclass fields (tasks/<name>.py, defaults and all),
    then the data's; the task checks its values when it is built."""
    task_fields = [(f.name, Any if f.type is bool else f.type,  # see BOOL; the task checks its own
                    field(default=f.default, default_factory=f.default_factory))
                   for f in dataclasses.fields(tasks.task_class(name)) if f.init]
    data_fields = [(f.name, f.type, f.default) for f in dataclasses.fields(DataConfig)]
    return dataclasses.make_dataclass(f"{tasks.task_class(name).__name__}Config",
                                      [("_target_", str, MISSING), ("name", str, MISSING), *task_fields, *data_fields],
                                      kw_only=True)  # the task's defaults may come before the data's required fields


SCHEMAS = {"train": TrainConfig, "distill": DistillConfig, "sweep": SweepCommand}


def register() -> None:
    """Put the schemas where conf/'s defaults lists find them: `schema: <config name>` first in a
    top config's, `/schema/task@_here_: <task>` first in a task config's."""
    store = ConfigStore.instance()
    for name, schema in SCHEMAS.items():
        store.store(group="schema", name=name, node=schema, package="_global_")
    for name in tasks.available_tasks():
        store.store(group="schema/task", name=name, node=task_schema(name))
