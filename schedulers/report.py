"""Showing an LRPlan before step 0: a text summary, a terminal plot, a CSV and a PNG.

All four read the same ``LRPlan.rows()`` / ``describe()`` the trainer steps through, so a preview
cannot disagree with training. Epochs are shown 1-based in the text and plots (as the training log
counts them); the CSV's ``epoch`` column is the 0-based epoch index, as in checkpoints.
"""

from __future__ import annotations

import csv

from core.io import atomic_write
from core.plots import figure, save_png

from .plan import LRPlan, StagePlan

_MAX_LISTED = 8  # restarts listed by name in format_plan before "..."


def _lr(v) -> str:
    return "-" if v is None else f"{v:.3e}"


def _epochs(steps: float, spe: int) -> str:
    e = steps / spe
    return f"{e:g}" if e == int(e) else f"{e:.2f}"


def _epoch_range(stage: StagePlan) -> str:
    first, last = stage.start_epoch + 1, stage.end_epoch
    return f"epoch {first}" if first == last else f"epochs {first}-{last}"


def _where(stage: StagePlan, k: int) -> str:
    """'epoch N' (1-based) for a step at an epoch start, else 'epoch N step i'."""
    epoch, within = stage.epoch_of(k) + 1, k % stage.steps_per_epoch
    return f"epoch {epoch}" if within == 0 else f"epoch {epoch} step {within}"


def _stage_lines(stage: StagePlan, offset: int) -> list[str]:
    d = stage.schedule.describe()
    spe, total, w = stage.steps_per_epoch, stage.total_steps, d["warmup_steps"]
    lines = [f"{stage.name}: {_epoch_range(stage)} ({stage.epochs} x "
             f"{spe} updates/epoch = {total} updates, global updates {offset}-{offset + total - 1}), "
             f"scheduler {d['kind']}"]
    if total == 0:
        return lines + ["  no optimizer steps"]
    lines.append(f"  LR start {_lr(d['start_lr'])} -> peak {_lr(d['peak_lr'])} at stage update "
                 f"{d['peak_step']} -> end {_lr(d['end_lr'])} (base {_lr(d['base_lr'])}, "
                 f"min_lr {_lr(d['min_lr'])})")
    if d["kind"] == "onecycle":
        ramp = (f"ramp = warm-up of {w} updates ({_epochs(w, spe)} epochs)" if w
                else f"ramp over pct_start {d['pct_start']:g} of the stage")
        lines.append(f"  {ramp} from base/div_factor; div_factor {d['div_factor']:g}, "
                     f"final_div_factor {d['final_div_factor']:g}")
    elif w:
        lines.append(f"  warm-up {w} updates ({_epochs(w, spe)} epochs), linear from min_lr")
    else:
        lines.append("  no warm-up")
    if w >= total:
        lines.append("  warm-up is at least as long as the stage: the LR stays on the ramp")
    if d["kind"] == "cosine_restart" and not d["cycle_steps"]:
        lines.append("  no cosine cycle: the warm-up fills the stage")
    elif d["kind"] == "cosine_restart":
        lengths = [_epochs(c, spe) for c in d["cycle_steps"]]
        cycles = lengths[0] if d["t_mult"] == 1 else ", ".join(lengths[:_MAX_LISTED])
        if d["t_mult"] != 1 and len(lengths) > _MAX_LISTED:
            cycles += ", ..."
        restarts = d["restart_steps"]
        where = ", ".join(_where(stage, k) for k in restarts[:_MAX_LISTED])
        if len(restarts) > _MAX_LISTED:
            where += f", ... ({len(restarts)} in all)"
        cut = "; the last one cut off by the stage end" if sum(d["cycle_steps"]) > total - w else ""
        lines.append(f"  cosine cycles of {cycles} epochs (restart_epochs {d['restart_epochs']}, "
                     f"t_mult {d['t_mult']}{cut})")
        lines.append(f"  restarts (LR jumps back to the peak): {where or 'none inside this stage'}")
    return lines


def format_plan(plan: LRPlan) -> str:
    """The plan as text, one block per stage: epochs, updates per epoch, kind, start/peak/end LR,
    warm-up, restarts."""
    if not plan.stages:
        return "LR plan: no stages, no optimizer steps"
    lines = [f"LR plan: {len(plan.stages)} stage(s), {plan.total_steps} optimizer updates; the LR is "
             f"stepped per optimizer update (after gradient accumulation)"]
    for stage, offset in zip(plan.stages, plan.offsets()):
        lines += _stage_lines(stage, offset)
    lines.append("Parameter groups with lr_scale r (the backbone) get r x these LRs, floor included. "
                 "Epochs counted from 1.")
    return "\n".join(lines)


def ascii_plot(plan: LRPlan, width: int = 72, height: int = 12) -> str:
    """A terminal plot of the head LR over global optimizer steps, ``height + 3`` lines of at most
    ``width`` characters: ``height`` plot rows (y labels: max, middle, min), the x axis (``+`` at a
    stage boundary, ``r`` at a restart), step labels, and a legend. An empty plan gives one line."""
    lrs = [lr for *_, lr in plan.rows()]
    n = len(lrs)
    if n == 0:
        return "(LR plan has no optimizer steps)"
    lo, hi = min(lrs), max(lrs)
    labels = {0: f"{hi:.2e}", height - 1: f"{lo:.2e}", (height - 1) // 2: f"{(hi + lo) / 2:.2e}"}
    if hi == lo:  # a flat line is drawn on the middle row
        labels = {0: "", height - 1: "", (height - 1) // 2: f"{hi:.2e}"}
    gutter = max(len(s) for s in labels.values()) + 2
    cols = width - gutter
    if height < 3 or cols < 16:
        raise ValueError(f"ascii_plot needs height >= 3 and width >= {gutter + 16} "
                         f"(got width={width}, height={height})")

    def row(v: float) -> int:  # 0 = top row
        return (height - 1) // 2 if hi == lo else round((hi - v) / (hi - lo) * (height - 1))

    def col(step: int) -> int:
        return min(cols - 1, step * cols // n)

    grid = [[" "] * cols for _ in range(height)]
    for c in range(cols):  # each column shows the min..max of the steps it covers
        a, nxt = c * n // cols, (c + 1) * n // cols
        b = max(a + 1, nxt)
        seg = lrs[a:b + 1] if b == nxt else lrs[a:b]  # + the next column's first step: no gaps
        for r in range(row(max(seg)), row(min(seg)) + 1):
            grid[r][c] = "*"
    axis = ["-"] * cols
    bounds = [(col(off), off, s) for s, off in zip(plan.stages[1:], plan.offsets()[1:])]
    for c, _, _ in bounds:
        axis[c] = "+"
        for r in range(height):
            if grid[r][c] == " ":
                grid[r][c] = "|"
    for g in plan.restart_steps():
        axis[col(g)] = "r"

    out = [labels.get(r, "").rjust(gutter - 2) + " |" + "".join(grid[r]) for r in range(height)]
    out.append(" " * (gutter - 1) + "+" + "".join(axis))
    ticks = [" "] * cols
    marks = [(0, "0")] + [(c, str(off)) for c, off, _ in bounds] + [(cols - len(str(n - 1)), str(n - 1))]
    free = 0
    for c, text in marks:  # left to right, skipping a label that would overlap the previous one
        c = max(0, min(c, cols - len(text)))
        if c >= free:
            ticks[c:c + len(text)] = text
            free = c + len(text) + 1
    out.append(" " * gutter + "".join(ticks))
    legend = "x: optimizer update  * head LR"
    if bounds:
        legend += "  | " + ", ".join(f"{s.name} (epoch {s.start_epoch + 1})" for _, _, s in bounds)
    if plan.restart_steps():
        legend += "  r restart"
    out.append((" " * gutter + legend)[:width])
    return "\n".join(line.rstrip() for line in out)


def write_csv(plan: LRPlan, path) -> None:
    """One row per optimizer step: ``step,epoch,stage,lr`` (global step and 0-based epoch; the LR
    written with ``repr`` so it reads back as the same float)."""
    with atomic_write(str(path), "w") as f:
        out = csv.writer(f, lineterminator="\n")
        out.writerow(["step", "epoch", "stage", "lr"])
        for step, epoch, name, lr in plan.rows():
            out.writerow([step, epoch, name, repr(lr)])


def plot_png(plan: LRPlan, path) -> None:
    """The head LR over global optimizer steps as a PNG, with stage boundaries and restarts marked.
    Uses matplotlib's Agg canvas directly (no pyplot, no global backend switch)."""
    try:
        from matplotlib.ticker import FormatStrFormatter

        fig = figure(10, 4.5, dpi=100)
    except ImportError:
        raise RuntimeError("matplotlib is needed for --plot: pip install matplotlib") from None
    rows = list(plan.rows())
    ax = fig.add_subplot(1, 1, 1)
    kinds = list(dict.fromkeys(stage.schedule.kind for stage in plan.stages))
    one_kind = len(kinds) == 1  # the usual case: name the kind once, in the legend
    if rows:
        ax.plot([r[0] for r in rows], [r[3] for r in rows], lw=1.4, color="tab:blue",
                label=f"head LR ({kinds[0]})" if one_kind else "head LR")
    else:
        ax.text(0.5, 0.5, "no optimizer steps", ha="center", va="center", transform=ax.transAxes)
    for i, (stage, off) in enumerate(zip(plan.stages, plan.offsets())):
        if i > 0:
            ax.axvline(off, color="black", ls="--", lw=1,
                       label="stage boundary" if i == 1 else None)
        ax.text(off, 1.0, f" {stage.name}: {_epoch_range(stage)}"
                + ("" if one_kind else f", {stage.schedule.kind}"),
                transform=ax.get_xaxis_transform(), va="bottom", fontsize=8)
    for j, g in enumerate(plan.restart_steps()):
        ax.axvline(g, color="tab:red", ls=":", lw=1, label="restart" if j == 0 else None)
    ax.set_xlabel("optimizer update (global, after gradient accumulation)")
    ax.set_ylabel("learning rate (head group)")
    ax.yaxis.set_major_formatter(FormatStrFormatter("%.1e"))  # no offset text over the stage labels
    ax.grid(alpha=0.3)
    if rows:
        ax.legend(loc="best", fontsize=8, framealpha=0.9)
    fig.tight_layout()
    save_png(fig, path)
