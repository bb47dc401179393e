"""``train_ultimate.py compare RUN_DIR [RUN_DIR ...]``: several runs side by side.

One table, a row per run (named by its folder): the epochs it trained, the best epoch and the best
and last value of ``--metric``, the best and last IoU / Dice / Sm (those the runs have), and every
flag whose value differs between the runs' ``config.json`` (``--checkpoint-dir`` left out: it is
the run's name). One PNG with the runs' validation curves overlaid: ``--metric`` first, then IoU,
Dice, Sm and the validation loss. Everything comes from each folder's ``metrics.csv`` and
``config.json``; nothing in the folders is written.
"""

from __future__ import annotations

import csv
import json
import logging
import math
import os
from dataclasses import dataclass, field
from typing import Optional

from core.errors import UserError, check_output_file
from evaluation.metrics import resolve_monitor
from core.plots import figure, save_png
from training.report.metrics_csv import column_label, read_metrics_csv

log = logging.getLogger("cod")

ALSO_SHOWN = ("val_iou", "val_dice", "val_sm")
NOT_COMPARED = ("checkpoint_dir",)
MAX_CELL = 32


@dataclass
class RunRecord:
    folder: str
    name: str = ""
    history: list = field(default_factory=list)
    config: Optional[dict] = None


def load_runs(folders: list) -> list[RunRecord]:
    """Each folder's metrics.csv and config.json; a folder without metrics.csv is a UserError naming it."""
    runs = []
    for folder in folders:
        metrics = os.path.join(folder, "metrics.csv")
        if not os.path.isdir(folder):
            raise UserError(f"compare: {folder} is not a folder")
        if not os.path.isfile(metrics):
            raise UserError(f"compare: {folder} has no metrics.csv (is it a train --checkpoint-dir?)")
        config_path = os.path.join(folder, "config.json")
        config = None
        if os.path.isfile(config_path):
            try:
                with open(config_path) as f:
                    config = json.load(f)
            except (OSError, ValueError) as e:
                raise UserError(f"compare: cannot read {config_path} ({' '.join(str(e).split())}): it is not "
                                "the config.json train writes; fix or remove it") from None
            if not isinstance(config, dict):
                raise UserError(f"compare: {config_path} is not the config.json train writes (not a JSON "
                                "object); fix or remove it")
        runs.append(RunRecord(folder, history=_read_history(metrics), config=config))
    for run, name in zip(runs, run_names([r.folder for r in runs])):
        run.name = name
    return runs


def _read_history(metrics: str) -> list[dict]:
    """The rows of a metrics.csv that train wrote; any other file is a UserError naming it."""
    try:
        history = read_metrics_csv(metrics)
    except (OSError, UnicodeDecodeError, csv.Error) as e:
        raise UserError(f"compare: cannot read {metrics} ({' '.join(str(e).split())}): pass the "
                        "--checkpoint-dir of a train run") from None
    if any(not isinstance(r.get("epoch"), int) for r in history):
        raise UserError(f"compare: {metrics} is not a metrics.csv that train wrote (no whole-number 'epoch' "
                        "column): pass the --checkpoint-dir of a train run")
    return history


def run_names(folders: list) -> list[str]:
    """The folder's own name; where two runs share it, as many parent folders as tell them apart."""
    parts = [os.path.abspath(f).rstrip(os.sep).split(os.sep) for f in folders]
    depth = 1
    while True:
        names = [os.sep.join(p[-depth:]) for p in parts]
        if len(set(names)) == len(names) or depth >= max(len(p) for p in parts):
            break
        depth += 1
    return [n if names.count(n) == 1 else f"{n}#{i + 1}" for i, n in enumerate(names)]


def best_and_last(history: list, key: str, higher_is_better: bool) -> tuple:
    """(best value, its epoch, last value) of column ``key``; Nones where the column is missing."""
    points = [(r["epoch"], r[key]) for r in history if not math.isnan(r.get(key, math.nan))]
    if not points:
        return None, None, None
    pick = max if higher_is_better else min
    epoch, value = pick(points, key=lambda p: p[1])  # the first epoch that reached it
    return value, epoch, points[-1][1]


def differing_flags(runs: list[RunRecord]) -> list[str]:
    """Config keys whose values are not the same in every run that has a config.json."""
    configs = [r.config for r in runs if r.config is not None]
    keys = list(dict.fromkeys(k for c in configs for k in c if k not in NOT_COMPARED))
    return [k for k in keys if len({json.dumps(c.get(k, "(absent)"), sort_keys=True) for c in configs}) > 1]


def _cell(v) -> str:
    if v is None:
        return "-"
    if isinstance(v, float):
        return f"{v:.4f}" if abs(v) >= 1e-3 or v == 0 else f"{v:.2e}"
    text = json.dumps(v) if isinstance(v, (list, dict)) else str(v)
    return text if len(text) <= MAX_CELL else "..." + text[-(MAX_CELL - 3):]


def flag_cell(config: Optional[dict], key: str) -> str:
    if config is None:
        return "?"
    if key not in config:
        return "(absent)"  # a config.json from before the flag existed
    value = config[key]
    if value is None:
        return "(default)"
    return f"{value:g}" if isinstance(value, float) else _cell(value)


def comparison_table(runs: list[RunRecord], column: str, higher_is_better: bool) -> str:
    label = column_label(column)
    header = ["run", "epochs", "best epoch", f"best {label}", f"last {label}"]
    shown = [k for k in ALSO_SHOWN if k != column and any(k in r for run in runs for r in run.history)]
    for k in shown:
        header += [f"best {column_label(k)}", f"last {column_label(k)}"]
    flags = differing_flags(runs)
    header += ["--" + k.replace("_", "-") for k in flags]
    lines = []
    for run in runs:
        best, epoch, last = best_and_last(run.history, column, higher_is_better)
        cells = [run.name, run.history[-1]["epoch"] if run.history else 0, epoch, best, last]
        for k in shown:
            b, _, lst = best_and_last(run.history, k, True)
            cells += [b, lst]
        cells += [flag_cell(run.config, k) for k in flags]
        lines.append([_cell(c) for c in cells])
    widths = [max(len(h), *(len(line[i]) for line in lines)) for i, h in enumerate(header)]
    out = ["  ".join(h.ljust(w) for h, w in zip(header, widths)).rstrip()]
    out += ["  ".join(c.ljust(w) for c, w in zip(line, widths)).rstrip() for line in lines]
    missing = [r.name for r in runs if r.config is None]
    if missing:
        out.append(f"(no config.json in {', '.join(missing)}: its flags are shown as ?)")
    return "\n".join(out)


def compare_runs(folders: list, out: str = "compare.png", metric: str = "iou") -> list[RunRecord]:
    """Print the table and write the plot to ``out``."""
    key, higher = resolve_monitor(metric)
    column = f"val_{key}"
    check_output_file("--out", out, "compare.png")
    runs = load_runs(folders)
    if os.path.isfile(out) and os.path.dirname(os.path.realpath(out)) in {os.path.realpath(f) for f in folders}:
        raise UserError(f"--out {out} is a file of one of the runs compared: compare writes nothing into "
                        "them; choose another --out")
    if not any(column in r for run in runs for r in run.history):
        raise UserError(f"compare: no run has a {column} column in metrics.csv (choose another --metric)")
    print(comparison_table(runs, column, higher))
    try:
        plot_runs(runs, column, higher, out)
        print(f"wrote {out}")
    except ImportError:
        print(f"compare: matplotlib is not installed (pip install matplotlib): {out} not written")
    return runs


def plot_runs(runs: list[RunRecord], column: str, higher_is_better: bool, out: str) -> None:
    from matplotlib.ticker import MaxNLocator

    present = {k for run in runs for r in run.history for k in r}
    panels = [column] + [k for k in (*ALSO_SHOWN, "val_loss") if k != column and k in present]
    cols = 1 if len(panels) == 1 else 2
    rows = math.ceil(len(panels) / cols)
    fig = figure(6 * cols, 3.4 * rows + 0.6)
    axes = fig.subplots(rows, cols, squeeze=False).ravel()
    colors = [f"C{i % 10}" for i in range(len(runs))]
    for ax, key in zip(axes, panels):
        for run, color in zip(runs, colors):
            x = [r["epoch"] for r in run.history]
            ax.plot(x, [r.get(key, math.nan) for r in run.history], lw=1.3, color=color, label=run.name)
            for prev, row in zip(run.history, run.history[1:]):
                if row.get("stage") != prev.get("stage"):  # this run's stage 2 begins
                    ax.axvline(row["epoch"] - 1, color=color, ls="--", lw=0.8, alpha=0.5)
            if key == column:
                best, epoch, _ = best_and_last(run.history, key, higher_is_better)
                if best is not None:
                    ax.plot([epoch], [best], "*", ms=10, color=color)
        ax.set_title(f"validation {column_label(key)}" + (" (* best)" if key == column else ""), fontsize=10)
        ax.set_xlabel("epoch")
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        ax.grid(alpha=0.3)
    for ax in axes[len(panels):]:
        ax.set_visible(False)
    axes[0].legend(fontsize=8, loc="best")
    fig.tight_layout()
    save_png(fig, out)
