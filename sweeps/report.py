"""Paper-style figures and tables from a sweep's study: the best trial per cell, as the papers do.

A cell's result is its best finished trial over the `report.best_over` axes (the learning rates)
and the searched parameters. Three layouts (`report.kind`):

- capacity: accuracy against `x` (e.g. model.d_model), one line per `hue` (e.g. the mixer), one
  panel per `panel` (e.g. the sequence length): Zoology Fig. 2, Mamba-2 Fig. 8.
- table: one row per cell with its accuracy: Mamba Table 1 (selective copying).
- extrapolation: accuracy against the evaluation length, one line per cell, the table with one
  column per length ("OOM" where it did not fit): Mamba Table 11 (induction heads).

Where the preset gives the paper's values (`sweep.paper`), each is drawn beside ours (dashed lines,
hollow markers; a paper column or row in tables), and every cell gets `paper` and `difference`
(ours − paper) columns, empty where the paper gives none (per test length for extrapolation).

Used by `python sweep.py ... action=report` and by notebooks/sweep_analysis.ipynb.
"""
import csv
import math
from pathlib import Path

import optuna
from matplotlib.figure import Figure

from sweeps.extrapolate import OOM
from sweeps.spec import Sweep, paper_value
from sweeps.study import load_existing

EVAL_PREFIX = "eval@seq_len="


def load_study(sweep: Sweep) -> optuna.Study:
    return load_existing(sweep)


def trial_rows(study: optuna.Study) -> list[dict]:
    """One row per trial (duplicates, closed unrun, left out): number, state, params, value, user
    attrs (metrics, run_dir, fail_reason ...)."""
    rows = []
    for t in study.get_trials(deepcopy=False):
        if "duplicate_of" in t.user_attrs:
            continue
        rows.append({"number": t.number, "state": t.state.name, **t.params, "value": t.value,
                     **t.user_attrs})
    return rows


def cell_axes(sweep: Sweep) -> list[str]:
    return [a.name for a in sweep.cell_axes]


def _difference(ours, paper):
    ok = all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in (ours, paper))
    return ours - paper if ok else None


def add_paper(sweep: Sweep, row: dict) -> None:
    """The paper's value(s) of a reported cell and ours minus the paper's, None where either is
    missing: `paper` / `difference`, or per test length `paper@N` / `difference@N`."""
    paper = paper_value(sweep, row)
    if sweep.report["kind"] != "extrapolation":
        row.update(paper=paper, difference=_difference(row["value"], paper))
        return
    paper = {str(k): v for k, v in (paper or {}).items()}
    for n in eval_lengths(sweep):
        row[f"paper@{n}"] = paper.get(str(n))
        row[f"difference@{n}"] = _difference(row.get(f"{EVAL_PREFIX}{n}/acc"), row[f"paper@{n}"])


def best_per_cell(sweep: Sweep, rows: list[dict]) -> list[dict]:
    """One row per reported cell, in grid order: the cell's axes, the best trial's value and
    parameters, and how many of the cell's trials completed / were pruned / failed / are pending.
    A cell without a finished trial has value None and, if one failed, its reason."""
    axes = cell_axes(sweep)
    sign = 1 if sweep.direction == "maximize" else -1
    cells = {}
    for cell in sweep.cells():
        key = tuple(cell[a] for a in axes)
        cells.setdefault(key, {a: cell[a] for a in axes})
    out = []
    for key, head in cells.items():
        mine = [r for r in rows if all(r.get(a) == v for a, v in head.items())]
        done = [r for r in mine if r["state"] == "COMPLETE" and r["value"] is not None]
        row = dict(head)
        row.update({f"n_{s.lower()}": sum(r["state"] == s for r in mine)
                    for s in ("COMPLETE", "PRUNED", "FAIL", "RUNNING", "WAITING")})
        if done:
            best = max(done, key=lambda r: sign * r["value"])
            row.update({"value": best["value"], "trial": best["number"], "run_dir": best.get("run_dir")})
            row.update({p: best.get(p) for p in sweep.parameters if p not in axes})
            row.update({f"{EVAL_PREFIX}{n}/acc": best.get(f"{EVAL_PREFIX}{n}/acc") for n in eval_lengths(sweep)})
            for k in ("model/params", "model/state_size", "train/steps", "train/seconds"):
                if k in best:
                    row[k] = best[k]
        else:
            failed = [r for r in mine if r["state"] == "FAIL"]
            row.update({"value": None, "note": failed[-1].get("fail_reason", "failed") if failed else "pending"})
        if sweep.paper:
            add_paper(sweep, row)
        out.append(row)
    return out


# -- figures ---------------------------------------------------------------------------------------
def _number(label):
    """A grid label as a number for an axis (labels of named axes are strings like "256")."""
    if isinstance(label, (int, float)) and not isinstance(label, bool):
        return label
    try:
        return float(label)
    except (TypeError, ValueError):
        return None


def _title(sweep):
    return sweep.report["title"] or sweep.study_name


def _label(axis, value):
    return f"{axis}={value}" if axis else str(value)


def _paper_line(ax, xs, papers, ours) -> None:
    """The paper's points of one of our lines: its colour, dashed, hollow markers."""
    points = [(x, p) for x, p in zip(xs, papers) if isinstance(p, (int, float))]
    if points:
        ax.plot(*zip(*points), linestyle="--", marker="o", markerfacecolor="none", color=ours.get_color())


def _paper_legend(ax, sweep: Sweep) -> None:
    if sweep.paper:
        ax.plot([], [], linestyle="--", marker="o", markerfacecolor="none", color="grey", label="paper")


def capacity_figure(sweep: Sweep, best: list[dict]) -> Figure:
    rep = sweep.report
    x_axis, hue, panel = rep["x"], rep["hue"], rep["panel"]
    panels = list(dict.fromkeys(r[panel] for r in best)) if panel else [None]
    fig = Figure(figsize=(3.6 * len(panels) + 0.8, 3.4), layout="constrained")
    axes = fig.subplots(1, len(panels), sharey=True, squeeze=False)[0]
    for ax, p in zip(axes, panels):
        mine = [r for r in best if panel is None or r[panel] == p]
        for h in dict.fromkeys(r[hue] for r in mine) if hue else [None]:
            line = sorted((r for r in mine if hue is None or r[hue] == h), key=lambda r: _number(r[x_axis]))
            xs = [_number(r[x_axis]) for r in line]
            ys = [r["value"] if r["value"] is not None else math.nan for r in line]
            (drawn,) = ax.plot(xs, ys, marker="o", label=str(h) if hue else None)
            _paper_line(ax, xs, [r.get("paper") for r in line], drawn)
        ax.set_xscale("log", base=2)
        xticks = sorted({_number(r[x_axis]) for r in mine})
        ax.set_xticks(xticks, [f"{v:g}" for v in xticks])
        ax.minorticks_off()
        ax.set_xlabel(x_axis)
        ax.set_ylim(-0.02, 1.02)
        ax.grid(alpha=0.3)
        if panel:
            ax.set_title(_label(panel, p))
    axes[0].set_ylabel(rep["ylabel"] or sweep.objective)
    _paper_legend(axes[-1], sweep)
    if hue:
        axes[-1].legend(title=hue, fontsize="small")
    fig.suptitle(_title(sweep))
    return fig


def state_size_figure(sweep: Sweep, best: list[dict]) -> Figure:
    """Accuracy against the recurrent state size (Zoology's accounting, `model/state_size`), one
    line per `hue`, all panels together: how much memory each mixer needs for recall."""
    hue, panel = sweep.report["hue"], sweep.report["panel"]
    fig = Figure(figsize=(5.2, 3.6), layout="constrained")
    ax = fig.subplots()
    for h in dict.fromkeys(r[hue] for r in best) if hue else [None]:
        mine = [r for r in best if (hue is None or r[hue] == h) and r.get("model/state_size")]
        for p in dict.fromkeys(r[panel] for r in mine) if panel else [None]:
            line = sorted((r for r in mine if panel is None or r[panel] == p), key=lambda r: r["model/state_size"])
            ys = [r["value"] if r["value"] is not None else math.nan for r in line]
            label = ", ".join(_label(a, v) for a, v in ((hue, h), (panel, p)) if a)
            ax.plot([r["model/state_size"] for r in line], ys, marker="o", label=label or None)
    ax.set_xscale("log", base=2)
    ax.set_ylim(-0.02, 1.02)
    ax.set_xlabel("state size (numbers per sequence)")
    ax.set_ylabel(sweep.report["ylabel"] or sweep.objective)
    ax.grid(alpha=0.3)
    if hue or panel:
        ax.legend(fontsize="x-small")
    ax.set_title(_title(sweep))
    return fig


def _fmt(value):
    if value is None:
        return "—"
    return f"{100 * value:.1f}" if isinstance(value, float) else str(value)


def table_figure(sweep: Sweep, header: list[str], rows: list[list]) -> Figure:
    fig = Figure(figsize=(max(4.0, 1.3 * len(header)), 0.9 + 0.32 * (len(rows) + 1)), layout="constrained")
    ax = fig.subplots()
    ax.axis("off")
    table = ax.table(cellText=[[_fmt(v) for v in row] for row in rows], colLabels=header, loc="center",
                     cellLoc="center")
    table.auto_set_font_size(False)
    table.set_fontsize(9)
    table.scale(1, 1.3)
    ax.set_title(_title(sweep))
    return fig


def eval_lengths(sweep: Sweep) -> list[int]:
    return sorted(sweep.eval["lengths"]) if sweep.eval else []


def extrapolation_figure(sweep: Sweep, best: list[dict]) -> Figure:
    axes_names = cell_axes(sweep)
    lengths = eval_lengths(sweep)
    fig = Figure(figsize=(6.4, 3.6), layout="constrained")
    ax = fig.subplots()
    any_oom = False
    for row in best:
        label = ", ".join(str(row[a]) for a in axes_names) or "model"
        values = [row.get(f"{EVAL_PREFIX}{n}/acc") for n in lengths]
        ys = [v if isinstance(v, float) else math.nan for v in values]
        (line,) = ax.plot(lengths, ys, marker="o", label=label)
        _paper_line(ax, lengths, [row.get(f"paper@{n}") for n in lengths], line)
        # Lengths the model ran out of memory at: a cross on the axis.
        oom = [n for n, v in zip(lengths, values) if v == OOM]
        ax.plot(oom, [0.0] * len(oom), "x", color=line.get_color(), markersize=9)
        any_oom = any_oom or bool(oom)
    if any_oom:
        ax.plot([], [], "x", color="black", label="out of memory")
    _paper_legend(ax, sweep)
    train_len = sweep.report.get("train_len")
    if train_len:
        ax.axvline(train_len, color="grey", linestyle=":", label="train length")
    ax.set_xscale("log", base=2)
    ax.set_ylim(-0.02, 1.02)
    ax.set_xlabel("test sequence length")
    ax.set_ylabel(sweep.report["ylabel"] or "accuracy")
    ax.grid(alpha=0.3)
    ax.legend(fontsize="small")
    ax.set_title(_title(sweep))
    return fig


def layout(sweep: Sweep, best: list[dict]) -> tuple[Figure, list[str], list[list]]:
    """The figure and the table (header, rows) of the sweep's report kind."""
    kind, axes = sweep.report["kind"], cell_axes(sweep)
    extra = [p for p in sweep.parameters if p not in axes]
    if kind == "extrapolation":
        lengths = eval_lengths(sweep)
        header = axes + [f"{n}" for n in lengths]
        rows = []
        for r in best:
            rows.append([r[a] for a in axes] + [r.get(f"{EVAL_PREFIX}{n}/acc") for n in lengths])
            if sweep.paper and any(r[f"paper@{n}"] is not None for n in lengths):
                rows.append([f"{r[a]} (paper)" for a in axes] + [r[f"paper@{n}"] for n in lengths])
        return extrapolation_figure(sweep, best), header, rows
    compared = ["paper", "difference"] if sweep.paper else []
    header = axes + [sweep.objective] + compared + extra
    rows = [[r[a] for a in axes] + [r["value"]] + [r[c] for c in compared] + [r.get(p) for p in extra] for r in best]
    if kind == "table":  # the figure shows ours and the paper's, in %
        shown = [*axes, f"{sweep.objective} (%)", *(f"{c} (%)" for c in compared[:1])]
        return table_figure(sweep, shown, [row[:len(shown)] for row in rows]), header, rows
    return capacity_figure(sweep, best), header, rows


def write(sweep: Sweep) -> list[Path]:
    """Write `<dir>/report/<study>.png` (the paper's layout) and `.csv` (every cell, every count)."""
    best = best_per_cell(sweep, trial_rows(load_study(sweep)))
    fig, _, _ = layout(sweep, best)
    out = sweep.dir / "report"
    out.mkdir(parents=True, exist_ok=True)
    png, table = out / f"{sweep.study_name}.png", out / f"{sweep.study_name}.csv"
    fig.savefig(png, dpi=130)
    columns = list(dict.fromkeys(k for row in best for k in row))
    with open(table, "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=columns)
        writer.writeheader()
        writer.writerows(best)
    return [png, table]
