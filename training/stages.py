"""The two-stage timeline as data, and everything that is a pure function of the epoch.

Stage 1 = epochs ``[0, E1)`` with the backbone frozen; stage 2 = ``[E1, E)`` with the backbone
unfrozen (all at once, or progressively from the deepest stage up). Epochs are 0-based here and in
checkpoints; logs and ``metrics.csv`` show them 1-based, as people count.
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass
from typing import Optional

from training.config import Config

log = logging.getLogger("cod")


@dataclass(frozen=True)
class Stage:
    name: str            # 'stage1' | 'stage2'
    index: int           # 0 | 1
    start_epoch: int     # first epoch of the stage (inclusive)
    end_epoch: int       # exclusive
    base_lr: float       # peak LR of the head group
    batch_size: int
    warmup_epochs: int   # stage 2 only
    schedule_start: int  # epoch the stage's LR schedule starts from (== start_epoch unless restarted)

    @property
    def epochs(self) -> int:
        return self.end_epoch - self.start_epoch

    @property
    def schedule_epochs(self) -> int:
        return self.end_epoch - self.schedule_start


def plan_stages(cfg: Config, restart_at: Optional[int] = None, peak_scale: float = 1.0) -> list[Stage]:
    """The stages with at least one epoch. ``restart_at`` (a resume epoch, or the plateau breaker's)
    starts a fresh schedule there for the stage that contains it, its peak LR x ``peak_scale``; a
    scaled restart (the plateau breaker's) warms up for at least one epoch."""
    specs = [
        ("stage1", 0, 0, cfg.stage1_epochs, cfg.lr, cfg.batch_size, 0),
        ("stage2", 1, cfg.stage1_epochs, cfg.epochs, cfg.effective_stage2_lr, cfg.effective_stage2_batch_size,
         cfg.warmup_epochs),
    ]
    stages = []
    for name, index, start, end, lr, bs, warm in specs:
        if end <= start:
            continue
        sched_start = start
        if restart_at is not None and start <= restart_at < end:
            sched_start = restart_at
            if peak_scale != 1.0:
                lr, warm = lr * peak_scale, max(warm, 1)
        stages.append(Stage(name, index, start, end, lr, bs, warm, sched_start))
    return stages


def stage_of_epoch(stages: list[Stage], epoch: int) -> Stage:
    for s in stages:
        if s.start_epoch <= epoch < s.end_epoch:
            return s
    raise ValueError(f"epoch {epoch} is outside every stage")


def full_unfreeze_level(num_backbone_stages: int) -> int:
    """Levels count unfrozen backbone stages from the deepest; one more level adds the stem."""
    return num_backbone_stages + 1


def unfreeze_interval(cfg: Config, num_backbone_stages: int) -> int:
    if cfg.unfreeze_interval is not None:
        return cfg.unfreeze_interval
    # by default the whole backbone is trainable by the middle of stage 2
    return max(1, cfg.stage2_epochs // (2 * full_unfreeze_level(num_backbone_stages)))


def unfreeze_level(cfg: Config, epoch: int, num_backbone_stages: int) -> int:
    """How much of the backbone trains in ``epoch``: 0 in stage 1; in stage 2 everything, or with
    ``--progressive-unfreeze`` one more stage every ``unfreeze_interval`` epochs, deepest first."""
    full = full_unfreeze_level(num_backbone_stages)
    if epoch < cfg.stage1_epochs:
        return 0
    if not cfg.progressive_unfreeze:
        return full
    step = unfreeze_interval(cfg, num_backbone_stages)
    return min(full, 1 + (epoch - cfg.stage1_epochs) // step)


def batches_per_epoch(num_samples: int, batch_size: int, limit_batches: Optional[int]) -> int:
    """Micro-batches per epoch; the train loader drops the last partial batch when it can."""
    n = num_samples // batch_size if num_samples >= batch_size else 1
    return min(n, limit_batches) if limit_batches else n


def steps_per_epoch(num_batches: int, accumulation_steps: int) -> int:
    """Optimizer updates per epoch: a final partial accumulation group still makes an update."""
    return math.ceil(num_batches / accumulation_steps)


def current_unfreeze_level(run, epoch: int) -> int:
    """The plan's level, never below what the run already unfroze (a resume with a larger --epochs
    recomputes the interval; what was trained stays trainable)."""
    c = run.progress
    level = unfreeze_level(run.cfg, epoch, run.net.num_backbone_stages)
    if epoch >= run.cfg.stage1_epochs:
        level = max(level, c.unfreeze_floor)
        c.unfreeze_floor = level
    return level


def log_unfreeze_plan(run, start_epoch: int) -> None:
    cfg, n = run.cfg, run.net.num_backbone_stages
    if not cfg.progressive_unfreeze or start_epoch >= cfg.epochs:
        return
    steps, last = [], None
    for e in range(max(start_epoch, cfg.stage1_epochs), cfg.epochs):
        level = max(unfreeze_level(cfg, e, n), run.progress.unfreeze_floor)
        if level != last:
            steps.append(f"epoch {e + 1}: {level}")
            last = level
    log.info("Unfreeze plan (backbone levels trained, of %d): %s", n + 1, ", ".join(steps))
