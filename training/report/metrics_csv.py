"""``metrics.csv``: one row per epoch, written whole from the history each epoch, and read back.

Its columns come from the rows themselves (the loss's terms, the scorer's metrics, each expert's
usage), so a new loss term or metric shows up without a change here. ``read_metrics_csv`` is the one
reader: ``resume``, the checkpoint folder, ``curves.png`` and ``compare`` all use it.
"""

from __future__ import annotations

import csv
import math

from core.io import atomic_write
from evaluation.metrics import HEADERS


def write_metrics_csv(history: list, path: str) -> None:
    """Rewritten whole from the history each epoch (atomically), so a resume never duplicates rows."""
    columns: list[str] = []
    for row in history:
        columns += [k for k in row if k not in columns]
    with atomic_write(path) as f:
        f.write(",".join(columns) + "\n")
        for row in history:
            f.write(",".join(_fmt(row.get(c, "")) for c in columns) + "\n")


def read_metrics_csv(path: str) -> list[dict]:
    """The rows of a ``metrics.csv`` as dicts of numbers (``epoch``, ``stage`` and ``unfreeze_level``
    as ints, the rest as floats; an empty cell is NaN), the form ``write_metrics_csv`` was given."""
    with open(path, newline="") as f:
        rows = list(csv.DictReader(f))
    out = []
    for row in rows:
        parsed = {}
        for k, v in row.items():
            if k is None:  # a row longer than the header
                continue
            try:
                x = float(v)
            except (TypeError, ValueError):
                x = math.nan
            parsed[k] = int(x) if k in ("epoch", "stage", "unfreeze_level") and x.is_integer() else x
        out.append(parsed)
    return out


def _fmt(v) -> str:
    if isinstance(v, float):
        return f"{v:.6g}"
    return str(v)


def column_label(column: str) -> str:
    """A column's name for people: ``val_iou`` -> ``IoU``, ``train_bce`` -> ``bce`` (the scorer's
    headers; anything else as it is, less its ``val_``/``train_`` prefix)."""
    name = column[4:] if column.startswith("val_") else column[6:] if column.startswith("train_") else column
    return HEADERS.get(name, name)
