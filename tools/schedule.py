"""``train_ultimate.py schedule``: the LR plan that ``train`` would follow, before any training."""

from __future__ import annotations

import logging
from typing import Optional

import schedulers
from core.errors import UserError, check_output_file
from training.config import Config
from training.stages import plan_stages

log = logging.getLogger("cod")


def preview_schedule(cfg: Config, steps_per_epoch: Optional[int] = None, out: Optional[str] = None,
                     plot: Optional[str] = None) -> schedulers.LRPlan:
    """Print the plan and an ASCII plot; optionally write the per-step CSV and a PNG.

    Steps per epoch are counted from ``--dataset-path`` exactly as ``train`` counts them (same
    validation split, batch sizes, accumulation and ``--limit-batches``), unless given directly.
    """
    from training.build import load_data, make_lr_plan  # the very functions train uses

    check_output_file("--out", out, "lr.csv")
    check_output_file("--plot", plot, "lr.png")
    restart_at = None
    if cfg.resume_from:  # what a resume would do: the same decision train makes
        from training.resume import decide_schedule, peek

        info = peek(cfg.resume_from)
        if info["full"]:
            restart_at, why = decide_schedule(cfg, info["config"], info["next_epoch"], info["restart_at"])
            if cfg.skip_stage1 and info["next_epoch"] < cfg.stage1_epochs:
                restart_at, why = None, "--skip-stage1: stage 2 starts with its own schedule"
            print(f"Resume from {cfg.resume_from} at epoch {info['next_epoch'] + 1}: {why}")
        else:
            print(f"Resume from {cfg.resume_from}: weights only, so the schedule starts fresh")
    stages = plan_stages(cfg, restart_at=restart_at)
    if cfg.skip_stage1:  # train never runs stage 1 then
        stages = [s for s in stages if s.name != "stage1"]
    if steps_per_epoch is not None:
        if steps_per_epoch < 1:
            raise UserError(f"--steps-per-epoch must be >= 1 (got {steps_per_epoch})")
        plan = make_lr_plan(cfg, stages, steps_per_epoch_override=steps_per_epoch)
    else:
        _, train, _ = load_data(cfg)
        plan = make_lr_plan(cfg, stages, n_train=len(train))
    print(schedulers.format_plan(plan))
    print(schedulers.ascii_plot(plan))
    if out:
        _write(schedulers.write_csv, plan, "--out", out)
        print(f"wrote {plan.total_steps} rows to {out}")
    if plot:
        _write(schedulers.plot_png, plan, "--plot", plot)
        print(f"wrote {plot}")
    return plan


def _write(write, plan: schedulers.LRPlan, flag: str, path: str) -> None:
    try:
        write(plan, path)
    except OSError as e:
        raise UserError(f"cannot write {flag} {path}: {e.strerror or e}; choose a writable file") from None
    except RuntimeError as e:  # matplotlib missing
        raise UserError(str(e)) from None
