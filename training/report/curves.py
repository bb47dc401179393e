"""``curves.png``: a run's history on one page, redrawn after every epoch.

    loss            every train_* term (train_loss bold; a term that is 0 throughout, such as
                    train_ds without deep supervision, left out) and val_loss (dashed), log scale
    validation      the scorer's metrics, IoU and Dice first (Sm, Fwb, mE, mF, MAE, ...; the
                    adaptive and max E/F forms are left out: they stay in metrics.csv), 0..1
    learning rate   the head LR of each epoch's last update (dots), and of every update if given
    expert usage    each expert's share of the routing (when the rows have expert*_usage)

On every panel: the stage boundary (black dashed), unfreeze steps (grey dotted, where
``unfreeze_level`` changes) and events such as LR restarts and rollbacks (coloured, labelled).

The x axis counts epochs as ``metrics.csv`` does: the row of epoch ``e`` is drawn at ``x = e``, and
that epoch's updates lie in ``(e - 1, e]``; a marker "before epoch e" is drawn at ``x = e - 1``.
Drawing never stops training: a missing matplotlib is said once, any other error in one line.
"""

from __future__ import annotations

import logging
import math
import os
from typing import Iterable, Optional

from core.plots import figure, save_png
from training.report.metrics_csv import column_label

log = logging.getLogger("cod")

EVENT_COLORS = {"restart": "tab:red", "rollback": "tab:purple"}
LEFT_OUT = ("val_em_adp", "val_em_max", "val_fm_adp", "val_fm_max")  # in metrics.csv; too many lines here
_said_no_matplotlib = False


def draw_curves(checkpoint_dir: str, history: list, lr_steps: Optional[Iterable] = None,
                events: Optional[list] = None, path: Optional[str] = None) -> Optional[str]:
    """Draw ``history`` (the rows of metrics.csv, as numbers or strings) to ``<checkpoint_dir>/
    curves.png`` (or ``path``), atomically. ``lr_steps``: ``(x, lr)`` pairs for every update (see
    ``lr_steps_from_plan``); ``events``: dicts ``{"epoch": e, "kind": "restart" | "rollback" | ...,
    "text": "..."}`` (``Progress.events``: ``e`` is the metrics.csv epoch they belong to), drawn where
    that epoch begins, at ``x = e - 1``, as the stage and unfreeze marks. Returns the path, or None
    when nothing was drawn (the reason logged in one line; this never raises)."""
    global _said_no_matplotlib
    path = path or os.path.join(checkpoint_dir, "curves.png")
    try:
        _draw(path, [_numbers(r) for r in history], list(lr_steps or ()), list(events or ()))
        return path
    except ImportError:
        if not _said_no_matplotlib:
            log.info("curves.png: matplotlib is not installed (pip install matplotlib): not drawn")
            _said_no_matplotlib = True
    except Exception as e:  # a plot must never end a training run
        log.warning("curves.png not drawn: %s: %s", type(e).__name__, str(e).splitlines()[0][:200] if str(e) else "")
    return None


def lr_steps_from_plan(plan, max_points: int = 4000) -> list:
    """``(x, lr)`` of the updates of a ``schedulers.LRPlan`` on the curves' epoch axis (update k of a
    stage with ``spe`` updates per epoch at ``start_epoch + (k + 1) / spe``), thinned to about
    ``max_points``. Compute it once per plan, not every epoch."""
    total = sum(s.total_steps for s in plan.stages)
    stride = max(1, math.ceil(total / max_points))
    out = []
    for s in plan.stages:
        ks = list(range(0, s.total_steps, stride))
        if s.total_steps and ks[-1] != s.total_steps - 1:
            ks.append(s.total_steps - 1)
        out += [(s.start_epoch + (k + 1) / s.steps_per_epoch, s.lr_at(k)) for k in ks]
    return out


def _numbers(row: dict) -> dict:
    out = {}
    for k, v in row.items():
        try:
            out[k] = float(v)
        except (TypeError, ValueError):
            out[k] = math.nan
    return out


def _series(rows: list, key: str) -> list:
    return [r.get(key, math.nan) for r in rows]


def _markers(rows: list, events: list) -> list:
    """(x, colour, linestyle, text) of the stage boundary, unfreeze steps and events."""
    out = []
    for prev, row in zip(rows, rows[1:]):
        x = row["epoch"] - 1
        if row.get("stage") != prev.get("stage"):
            out.append((x, "black", "--", f"stage {row.get('stage', math.nan):.0f}"))
        elif row.get("unfreeze_level") != prev.get("unfreeze_level"):
            out.append((x, "grey", ":", f"unfreeze {row.get('unfreeze_level', math.nan):.0f}"))
    for ev in events:
        if isinstance(ev, dict) and isinstance(ev.get("epoch"), (int, float)):
            kind = str(ev.get("kind", "event"))
            out.append((float(ev["epoch"]) - 1, EVENT_COLORS.get(kind, "tab:brown"), "-",
                        str(ev.get("text") or kind)))
    return out


def _draw(path: str, rows: list, lr_steps: list, events: list) -> None:
    from matplotlib.ticker import MaxNLocator

    keys = list(dict.fromkeys(k for r in rows for k in r))
    train = [k for k in keys if k.startswith("train_") and any(v != 0 for v in _series(rows, k) if v == v)]
    val = [k for k in keys if k.startswith("val_") and k not in ("val_loss", *LEFT_OUT)]
    val.sort(key=lambda k: (k not in ("val_iou", "val_dice"), k != "val_iou"))  # IoU, Dice, then as logged
    experts = [k for k in keys if k.startswith("expert") and k.endswith("_usage")]
    panels = ["loss", "validation", "lr"] + (["experts"] if experts else [])
    x = [r["epoch"] for r in rows]  # a row without one is not a metrics.csv row: say so, draw nothing

    fig = figure(10, 1.2 + 2.3 * len(panels))
    axes = fig.subplots(len(panels), 1, sharex=True, squeeze=False)[:, 0]
    for ax, panel in zip(axes, panels):
        if panel == "loss":
            for k in train:
                ax.plot(x, _series(rows, k), lw=2.0 if k == "train_loss" else 1.0,
                        label="train " + ("loss" if k == "train_loss" else column_label(k)))
            if "val_loss" in keys:
                ax.plot(x, _series(rows, "val_loss"), "k--", lw=1.5, label="val loss")
            if all(v > 0 for k in train + ["val_loss"] if k in keys for v in _series(rows, k)
                   if not math.isnan(v)):
                ax.set_yscale("log")
            ax.set_ylabel("loss")
        elif panel == "validation":
            for k in val:
                ax.plot(x, _series(rows, k), lw=1.8 if k == "val_iou" else 1.0,
                        ls="--" if k == "val_mae" else "-",
                        label=column_label(k) + (" (lower is better)" if k == "val_mae" else ""))
            ax.set_ylabel("validation")
            if not val:
                ax.text(0.5, 0.5, "no validation split", ha="center", va="center", transform=ax.transAxes)
        elif panel == "lr":
            if lr_steps:
                ax.plot([p[0] for p in lr_steps], [p[1] for p in lr_steps], lw=0.8, color="tab:blue",
                        label="head LR per update")
            ax.plot(x, _series(rows, "lr"), "o", ms=3, color="tab:blue", label="head LR at epoch end")
            if all(v > 0 for v in _series(rows, "lr") + [p[1] for p in lr_steps] if not math.isnan(v)):
                ax.set_yscale("log")
            ax.set_ylabel("learning rate")
        else:
            for k in experts:
                ax.plot(x, _series(rows, k), lw=1.0, label=k.replace("_usage", ""))
            ax.set_ylabel("expert usage")
        ax.grid(alpha=0.3)
        if ax.get_legend_handles_labels()[0]:
            ax.legend(loc="upper left", bbox_to_anchor=(1.0, 1.0), fontsize=7, frameon=False)
    for mx, color, ls, text in _markers(rows, events):
        for ax in axes:
            ax.axvline(mx, color=color, ls=ls, lw=1.0, alpha=0.8)
        axes[0].text(mx, 0.97, text + " ", transform=axes[0].get_xaxis_transform(), rotation=90,
                     va="top", ha="right", fontsize=7, color=color,
                     bbox=dict(facecolor="white", alpha=0.7, edgecolor="none", pad=0.3))
    axes[-1].set_xlabel("epoch")
    axes[-1].xaxis.set_major_locator(MaxNLocator(integer=True))
    last = rows[-1] if rows else {}
    fig.suptitle(f"{os.path.basename(os.path.dirname(os.path.abspath(path)))}: {len(rows)} epochs"
                 + (f", last IoU {last['val_iou']:.4f}" if not math.isnan(last.get("val_iou", math.nan)) else ""),
                 fontsize=10, x=0.01, ha="left")
    h = fig.get_figheight()
    fig.subplots_adjust(left=0.08, right=0.8, top=1 - 0.45 / h, bottom=0.5 / h, hspace=0.12)
    save_png(fig, path)
