"""Learning-rate schedules: the LR as a pure function of (stage, optimizer step).

The clock is the optimizer step (after gradient accumulation). Each stage has its own schedule over
its own ``S = stage_epochs * steps_per_epoch`` steps; the formulas and edge cases are in
``schedules.py``. The trainer builds an ``LRPlan``, asks ``plan.stages[i].lr_at(k)`` (or
``plan.lr_at(global_step)``) before each optimizer step and writes it with ``apply_lr``; the
``schedule`` command prints the same plan with ``format_plan`` / ``ascii_plot`` / ``write_csv`` /
``plot_png``.

    plan = build_plan("cosine", [dict(name="stage1", start_epoch=0, end_epoch=30,
                                      steps_per_epoch=100, base_lr=2.5e-4),
                                 dict(name="stage2", start_epoch=30, end_epoch=120,
                                      steps_per_epoch=200, base_lr=2e-4, warmup_steps=3 * 200)],
                      min_lr=1e-6)
    stage, k = plan.locate(global_step)
    apply_lr(optimizer, stage.lr_at(k))   # group lr = lr * group.get('lr_scale', 1.0)
"""

from .plan import LRPlan, StagePlan, apply_lr, build_plan
from .report import ascii_plot, format_plan, plot_png, write_csv
from .schedules import (KINDS, Constant, Cosine, CosineRestart, OneCycle, Schedule, WarmupWrapper,
                        build_schedule)

__all__ = [
    "KINDS", "Schedule", "Constant", "Cosine", "CosineRestart", "OneCycle", "WarmupWrapper",
    "build_schedule", "StagePlan", "LRPlan", "build_plan", "apply_lr",
    "format_plan", "ascii_plot", "write_csv", "plot_png",
]
