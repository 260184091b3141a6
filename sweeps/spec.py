"""A sweep definition (`conf/sweep/<name>.yaml`), checked: its cells, its search and its trial slots.

A sweep is a **grid** of cells with an optional **search** inside each cell:

    grid:                                   # every combination is a cell
      - model.d_model=64,128,256            # Hydra's sweep syntax: any train-config key
      - optimizer.lr=1e-4,1e-3              # a learning-rate list is just another axis
      - seq_len:                            # a named axis: label -> train overrides
          "64": [task.seq_len=64, task.num_kv_pairs=4]
          "128": [task.seq_len=128, task.num_kv_pairs=8]
    search:                                 # sampled per trial by TPE, within the trial's cell
      - optimizer.lr=tag(log, interval(1e-4, 1e-2))
      - model.d_state=choice(16, 32, 64)    # int(interval(a, b)) gives integers

Each grid axis is one Optuna parameter (named by its key or axis name), so a cell is a set of
fixed parameters. A **slot** is one trial the study owes: `trials_per_cell` slots per cell (one when
there is no search), or `n_trials` slots in all, dealt round-robin over the cells. The driver
enqueues every slot once and every slot ends with exactly one finished trial.
"""
import itertools
import math
import re
from dataclasses import dataclass, field
from pathlib import Path

import optuna
from hydra.core.override_parser.overrides_parser import OverridesParser
from hydra.core.override_parser.types import ChoiceSweep, IntervalSweep, RangeSweep
from hydra.errors import HydraException
from omegaconf import DictConfig, OmegaConf

from training.config import check_schema, compose
from training.schemas import SweepCommand


@dataclass(frozen=True)
class Axis:
    """One grid axis: the Optuna parameter `name` takes one of `labels`; label -> train overrides."""

    name: str
    labels: tuple
    overrides: dict


@dataclass(frozen=True)
class Slot:
    """One trial the study owes: `key` is unique in the study, `params` are the cell's fixed values."""

    key: str
    cell: str
    params: dict


@dataclass
class Sweep:
    """A checked sweep definition (`load` checks the config, `from_cfg` the grid and search)."""

    name: str
    study_name: str
    dir: Path
    storage: str
    train: list[str]
    axes: list[Axis]
    search: dict[str, optuna.distributions.BaseDistribution]
    trials_per_cell: int
    n_trials: int | None
    objective: str
    direction: str
    sampler: dict
    pruner: dict | None
    heartbeat_interval: int
    grace_period: int | None
    max_retries: int
    workers_per_gpu: int
    eval: dict | None
    report: dict
    paper: dict | None = None
    description: str = ""
    _cells: list[dict] = field(default_factory=list, repr=False)

    # -- construction ----------------------------------------------------------------------------
    @classmethod
    def from_cfg(cls, cfg: DictConfig, extra_train=()) -> "Sweep":
        """`cfg` is the `sweep` node, composed onto its schema and checked (`load`); `extra_train` are
        train overrides given on the command line."""
        c = OmegaConf.to_container(cfg, resolve=True)
        directory = Path(c["dir"]).resolve()
        axes = [_axis(i, item) for i, item in enumerate(c["grid"])]
        search = dict(_search(i, item) for i, item in enumerate(c["search"]))
        names = [a.name for a in axes] + list(search)
        if len(set(names)) != len(names):
            dup = next(n for n in names if names.count(n) > 1)
            raise ValueError(f"sweep.grid/search: parameter {dup!r} appears twice; each key is one axis")
        if not axes and not search:
            raise ValueError("sweep.grid=[]: empty; give at least one grid axis or a sweep.search space")
        if c["grace_period"] is not None and c["grace_period"] <= c["heartbeat_interval"]:
            raise ValueError(f"sweep.grace_period={c['grace_period']}: must exceed "
                             f"heartbeat_interval={c['heartbeat_interval']}")
        # The schema's keys are Sweep's fields, but for the grid (parsed into axes) and the ones set here.
        sweep = cls(**{k: v for k, v in c.items() if k != "grid"} | dict(
            dir=directory, storage=c["storage"] or f"sqlite:///{directory / 'study.db'}",
            train=c["train"] + list(extra_train), axes=axes, search=search))
        sweep._check_counts()
        return sweep

    def _check_counts(self):
        if self.search:
            return
        if self.trials_per_cell != 1:
            raise ValueError(f"sweep.trials_per_cell={self.trials_per_cell}: must be 1 without a "
                             "sweep.search (a grid cell is trained once)")
        if self.n_trials is not None and self.n_trials > len(self.cells()):
            raise ValueError(f"sweep.n_trials={self.n_trials}: the grid has {len(self.cells())} cells "
                             "and no sweep.search, so at most that many trials")

    # -- cells and slots -------------------------------------------------------------------------
    def cells(self) -> list[dict]:
        """Every combination of the grid axes, in grid order: [{axis name: label}]."""
        if not self._cells:
            self._cells = [dict(zip([a.name for a in self.axes], labels))
                           for labels in itertools.product(*(a.labels for a in self.axes))]
        return self._cells

    def slots(self) -> list[Slot]:
        """The trials the study owes, dealt round-robin over the cells (so a capped study covers
        every cell before it repeats one)."""
        cells = self.cells()
        total = self.n_trials if self.n_trials is not None else len(cells) * self.trials_per_cell
        per_cell = math.ceil(total / len(cells))
        slots = []
        for k in range(per_cell):
            for params in cells:
                cell = cell_name(params)
                key = f"{cell}#{k}" if self.search else cell
                slots.append(Slot(key=key, cell=cell, params=params))
        return slots[:total]

    def overrides(self, params: dict) -> list[str]:
        """Train overrides of one trial: the shared ones, then each axis's, then the searched."""
        out = list(self.train)
        for axis in self.axes:
            out += axis.overrides[params[axis.name]]
        for key in self.search:
            if key in params:
                out.append(f"{key}={_literal(params[key])}")
        return out

    def run_dir(self, slot_key: str, params: dict) -> Path:
        """Where a trial writes (TensorBoard events, metrics.json, checkpoints), named by its slot
        (the cell's parameters) and its searched parameters."""
        searched = cell_name({k: v for k, v in params.items() if k in self.search})
        return self.dir / "trials" / ",".join(p for p in (slot_key, searched) if p)

    @property
    def parameters(self) -> list[str]:
        return [a.name for a in self.axes] + list(self.search)

    @property
    def cell_axes(self) -> list[Axis]:
        """The axes a reported cell is made of: the grid axes not optimised over."""
        return [a for a in self.axes if a.name not in self.report["best_over"]]


def split_args(argv) -> tuple[list[str], list[str]]:
    """(sweep overrides, train overrides) of a sweep.py command line: `sweep*` and `action` keys
    configure the sweep (conf/sweep.yaml), every other key is a train override for all trials."""
    def is_sweep(arg):
        key = arg.lstrip("+~").split("=", 1)[0]
        return key in ("sweep", "action") or key.startswith("sweep.")
    return [a for a in argv if is_sweep(a)], [a for a in argv if not is_sweep(a)]


def load(cfg: DictConfig, train_args=()) -> Sweep:
    """The Sweep of a composed `conf/sweep.yaml` (checked, but its cells are not built here)."""
    if OmegaConf.is_missing(cfg.sweep, "name"):
        raise ValueError("sweep.name: missing (conf/sweep/base.yaml is what presets start from, "
                         "not a sweep itself)")
    check_schema(cfg, SweepCommand)  # types and ranges (training.schemas.SweepConfig)
    sweep = Sweep.from_cfg(cfg.sweep, extra_train=train_args)
    check_report_axes(sweep)
    check_paper(sweep)
    return sweep


def from_overrides(argv) -> Sweep:
    """The Sweep named by a sweep.py command line (e.g. ["sweep=smoke", "sweep.dir=/tmp/s"])."""
    sweep_args, train_args = split_args(argv)
    return load(compose(sweep_args, config_name="sweep"), train_args)


def cell_name(params: dict) -> str:
    """`model=attention,model.d_model=64` (Hydra's override_dirname style, safe as a file name)."""
    parts = []
    for key, value in params.items():
        text = f"{value:.4g}" if isinstance(value, float) else str(value)
        parts.append(f"{key}={re.sub(r'[^A-Za-z0-9_.+-]', '_', text)}")
    return ",".join(parts)


# -- parsing helpers -----------------------------------------------------------------------------
_PARSER = OverridesParser.create()


def _literal(value) -> str:
    """A Python value as a Hydra override value (floats keep every digit)."""
    return repr(value) if isinstance(value, float) else str(value)


def _parse(where, text):
    if not isinstance(text, str):
        raise ValueError(f"{where}={text!r}: must be an override string like 'model.d_model=64,128'")
    try:
        override = _PARSER.parse_override(text)
    except HydraException as e:
        raise ValueError(f"{where}={text!r}: not a Hydra override ({str(e).splitlines()[0]})") from None
    if override.is_add() or override.is_delete() or override.is_force_add() or override.package:
        raise ValueError(f"{where}={text!r}: give a plain 'key=values' override")
    return override


def _axis(i, item) -> Axis:
    where = f"sweep.grid[{i}]"
    if isinstance(item, dict):
        if len(item) != 1:
            raise ValueError(f"{where}: a named axis is one mapping 'name: {{label: [overrides]}}'")
        (name, options), = item.items()
        if not isinstance(options, dict) or not options:
            raise ValueError(f"{where}.{name}={options!r}: must map each label to a list of train overrides")
        overrides = {}
        for label, over in options.items():
            if not isinstance(over, list) or not all(isinstance(o, str) and "=" in o for o in over):
                raise ValueError(f"{where}.{name}.{label}={over!r}: must be a list of 'key=value' overrides")
            overrides[str(label)] = tuple(over)
        return Axis(str(name), tuple(overrides), overrides)
    override = _parse(where, item)
    key = override.key_or_group
    if override.is_sweep_override():
        value = override.value()
        if not isinstance(value, (ChoiceSweep, RangeSweep)):
            raise ValueError(f"{where}={item!r}: a grid axis lists values ('{key}=a,b,c' or range(..)); "
                             "intervals belong in sweep.search")
        labels, texts = list(override.sweep_iterator()), list(override.sweep_string_iterator())
    else:
        labels, texts = [override.value()], [override.get_value_string()]
    if not labels:
        raise ValueError(f"{where}={item!r}: no values; list at least one")
    for label in labels:
        if not (label is None or isinstance(label, (bool, int, float, str))):
            raise ValueError(f"{where}={item!r}: values must be numbers or strings "
                             "(use a named axis for lists and groups of keys)")
    if len(set(labels)) != len(labels):
        raise ValueError(f"{where}={item!r}: a value appears twice")
    return Axis(key, tuple(labels), {lab: (f"{key}={text}",) for lab, text in zip(labels, texts)})


def _search(i, item):
    where = f"sweep.search[{i}]"
    override = _parse(where, item)
    key, value = override.key_or_group, override.value()
    if isinstance(value, IntervalSweep):
        log = "log" in value.tags
        if not value.start < value.end or (log and value.start <= 0):
            raise ValueError(f"{where}={item!r}: needs low < high (and low > 0 with tag(log, ..))")
        if isinstance(value.start, int) and isinstance(value.end, int):
            return key, optuna.distributions.IntDistribution(value.start, value.end, log=log)
        return key, optuna.distributions.FloatDistribution(float(value.start), float(value.end), log=log)
    if isinstance(value, ChoiceSweep):
        return key, optuna.distributions.CategoricalDistribution(list(override.sweep_iterator()))
    raise ValueError(f"{where}={item!r}: a search dimension is '{key}=interval(a, b)' "
                     "(tag(log, ..) / int(..) allowed) or '{key}=choice(a, b, ..)'")


def check_paper(sweep: Sweep):
    """The paper's values nest by the reported cell axes, in grid order, each key a label of its
    axis (numbers and strings alike, compared as text); a leaf is an accuracy in [0, 1], or for an
    extrapolation report a mapping test length -> accuracy or a mark such as "OOM"."""
    if sweep.paper is None:
        return

    def leaf(where, v):
        if isinstance(v, str) and sweep.report["kind"] == "extrapolation":
            return
        if not (isinstance(v, (int, float)) and not isinstance(v, bool) and 0 <= v <= 1):
            raise ValueError(f"sweep.paper.values{where}={v!r}: must be an accuracy in [0, 1]")

    def walk(where, node, axes):
        if not axes:
            if sweep.report["kind"] != "extrapolation":
                return leaf(where, node)
            if not isinstance(node, dict):
                raise ValueError(f"sweep.paper.values{where}={node!r}: must map test lengths to accuracies")
            for n, v in node.items():
                if str(n) not in map(str, sweep.eval["lengths"]):
                    raise ValueError(f"sweep.paper.values{where}.{n}: not in sweep.eval.lengths")
                leaf(f"{where}.{n}", v)
            return
        axis, rest = axes[0], axes[1:]
        if not isinstance(node, dict):
            raise ValueError(f"sweep.paper.values{where}={node!r}: must map labels of axis {axis.name!r}")
        labels = [str(label) for label in axis.labels]
        for key, child in node.items():
            if str(key) not in labels:
                raise ValueError(f"sweep.paper.values{where}.{key}: not a label of axis {axis.name!r}; "
                                 f"labels: {', '.join(labels)}")
            walk(f"{where}.{key}", child, rest)

    walk("", sweep.paper["values"], sweep.cell_axes)


def paper_value(sweep: Sweep, cell: dict):
    """The paper's value for a reported cell ({axis name: label}), or None where it gives none."""
    node = sweep.paper["values"] if sweep.paper else None
    for axis in sweep.cell_axes:
        if not isinstance(node, dict):
            return None
        node = {str(k): v for k, v in node.items()}.get(str(cell[axis.name]))
    return node


def check_report_axes(sweep: Sweep):
    """The report's x / hue / panel / best_over must name grid axes or search parameters."""
    known = set(sweep.parameters)
    for key in ("x", "hue", "panel"):
        name = sweep.report[key]
        if name is not None and name not in known:
            raise ValueError(f"sweep.report.{key}={name!r}: not a grid axis; axes: {', '.join(sweep.parameters)}")
    for name in sweep.report["best_over"]:
        if name not in known:
            raise ValueError(f"sweep.report.best_over={name!r}: not a grid axis or search parameter; "
                             f"axes: {', '.join(sweep.parameters)}")
    if sweep.report["kind"] == "capacity":
        x = sweep.report["x"]
        axis = next((a for a in sweep.axes if a.name == x), None)
        if axis is None:
            raise ValueError(f"sweep.report.x={x!r}: a capacity report needs a numeric grid axis as x")
        for label in axis.labels:
            try:
                if float(label) <= 0:
                    raise ValueError
            except (TypeError, ValueError):
                raise ValueError(f"sweep.report.x={x!r}: value {label!r} is not a positive number "
                                 "(the x axis is logarithmic)") from None
    if sweep.report["kind"] == "extrapolation" and sweep.eval is None:
        raise ValueError("sweep.report.kind='extrapolation': needs sweep.eval.lengths")
