"""The LR of a whole run: stages in order, each with its own schedule, on one optimizer-step clock.

A global optimizer step counts from 0 over all stages of the plan in order; ``LRPlan.locate`` turns
it into (stage, k). Epochs are 0-based global epoch indices, as in checkpoints.
"""

from __future__ import annotations

import operator
from dataclasses import dataclass, field
from typing import Iterator, Optional

from .schedules import Schedule, build_schedule


@dataclass(frozen=True)
class StagePlan:
    """One stage: epochs ``[start_epoch, end_epoch)`` of ``steps_per_epoch`` optimizer steps each."""

    name: str             # 'stage1' | 'stage2'
    index: int            # 0 | 1
    start_epoch: int
    end_epoch: int        # exclusive
    steps_per_epoch: int
    schedule: Schedule

    def __post_init__(self):
        if self.end_epoch < self.start_epoch or self.start_epoch < 0:
            raise ValueError(f"{self.name}: bad epoch range [{self.start_epoch}, {self.end_epoch})")
        if self.steps_per_epoch < 1:
            raise ValueError(f"{self.name}: steps_per_epoch must be >= 1 (got {self.steps_per_epoch})")
        if self.schedule.total_steps != self.epochs * self.steps_per_epoch:
            raise ValueError(f"{self.name}: the schedule has {self.schedule.total_steps} steps, but "
                             f"{self.epochs} epochs x {self.steps_per_epoch} steps/epoch = "
                             f"{self.epochs * self.steps_per_epoch}")

    @property
    def epochs(self) -> int:
        return self.end_epoch - self.start_epoch

    @property
    def total_steps(self) -> int:
        return self.schedule.total_steps

    def lr_at(self, k: int) -> float:
        """Head-group LR at stage step k (clamped to the last step past the end)."""
        return self.schedule.lr_at(k)

    def epoch_of(self, k: int) -> int:
        """Global 0-based epoch of stage step k (clamped to the last epoch past the end)."""
        k = operator.index(k)
        if k < 0:
            raise ValueError(f"step must be >= 0 (got {k})")
        if self.total_steps == 0:
            raise ValueError(f"{self.name} has no steps")
        return self.start_epoch + min(k, self.total_steps - 1) // self.steps_per_epoch

    def restart_epochs(self) -> list[int]:
        """Global 0-based epochs in which a cosine_restart cycle starts again at the peak LR (for
        early stopping that must not fire in a restart dip). Empty for the other kinds."""
        return [self.epoch_of(k) for k in self.schedule.restart_steps()]


@dataclass
class LRPlan:
    """The stages with steps, in training order; their epoch ranges ascend and do not overlap (a gap
    is allowed: a resumed run may restart a schedule later than its stage began)."""

    stages: list[StagePlan] = field(default_factory=list)

    def __post_init__(self):
        for a, b in zip(self.stages, self.stages[1:]):
            if b.start_epoch < a.end_epoch:
                raise ValueError(f"{b.name} starts at epoch {b.start_epoch}, inside {a.name} "
                                 f"[{a.start_epoch}, {a.end_epoch})")
        names = [s.name for s in self.stages]
        if len(set(names)) != len(names):
            raise ValueError(f"stage names repeat: {names}")

    @property
    def total_steps(self) -> int:
        return sum(s.total_steps for s in self.stages)

    def offsets(self) -> list[int]:
        """Global step at which each stage begins."""
        out, at = [], 0
        for s in self.stages:
            out.append(at)
            at += s.total_steps
        return out

    def locate(self, global_step: int) -> tuple[StagePlan, int]:
        """(stage, k) of a global optimizer step. Past the end: the last stage with k past its end
        (its ``lr_at`` then gives the final LR)."""
        g = operator.index(global_step)
        if g < 0:
            raise ValueError(f"global step must be >= 0 (got {g})")
        last: Optional[tuple[StagePlan, int]] = None
        for stage, offset in zip(self.stages, self.offsets()):
            if stage.total_steps == 0:
                continue
            if g < offset + stage.total_steps:
                return stage, g - offset
            last = (stage, offset)
        if last is None:
            raise ValueError("the LR plan has no steps")
        return last[0], g - last[1]

    def lr_at(self, global_step: int) -> float:
        stage, k = self.locate(global_step)
        return stage.lr_at(k)

    def rows(self) -> Iterator[tuple[int, int, str, float]]:
        """(global step, global 0-based epoch, stage name, head LR) for every optimizer step."""
        step = 0
        for stage in self.stages:
            for k in range(stage.total_steps):
                yield step, stage.epoch_of(k), stage.name, stage.lr_at(k)
                step += 1

    def restart_steps(self) -> list[int]:
        """Global steps where a cosine_restart cycle begins again."""
        return [off + k for s, off in zip(self.stages, self.offsets()) for k in s.schedule.restart_steps()]


def apply_lr(optimizer, lr: float) -> None:
    """Write the schedule's LR into every parameter group, times the group's ``lr_scale`` (default
    1.0). ``initial_lr`` is neither read nor written: the schedule is the only source of the LR."""
    for group in optimizer.param_groups:
        value = lr * group.get("lr_scale", 1.0)
        if hasattr(group["lr"], "fill_"):  # a tensor LR (capturable/fused optimizers): keep it a tensor
            group["lr"].fill_(value)
        else:
            group["lr"] = value


_SPEC_KEYS = {"name", "start_epoch", "end_epoch", "steps_per_epoch", "base_lr"}
_SPEC_OPTIONAL = {"warmup_steps", "index", "kind"}


def build_plan(kind: str, stage_specs: list[dict], min_lr: float, restart_epochs: Optional[int] = None,
               t_mult: int = 2, onecycle_pct_start: float = 0.1,
               onecycle_div_factor: float = 25.0) -> LRPlan:
    """An LRPlan from one dict per stage: ``name, start_epoch, end_epoch, steps_per_epoch, base_lr``
    and optionally ``warmup_steps`` (default 0), ``index`` (default: N-1 for a name 'stageN', else the
    position in the list) and ``kind`` (default: ``kind``). Stages with 0 epochs are left out.
    Raises ValueError naming the stage for anything invalid."""
    stages = []
    for pos, spec in enumerate(stage_specs):
        missing, unknown = _SPEC_KEYS - spec.keys(), spec.keys() - _SPEC_KEYS - _SPEC_OPTIONAL
        if missing or unknown:
            raise ValueError(f"stage spec {pos}: missing {sorted(missing)}, unknown {sorted(unknown)}")
        name = spec["name"]
        epochs = spec["end_epoch"] - spec["start_epoch"]
        if epochs < 0:
            raise ValueError(f"{name}: end_epoch {spec['end_epoch']} is before start_epoch "
                             f"{spec['start_epoch']}")
        if epochs == 0:
            continue
        index = spec.get("index")
        if index is None:
            index = int(name[5:]) - 1 if name.startswith("stage") and name[5:].isdigit() else pos
        try:
            schedule = build_schedule(spec.get("kind", kind), spec["base_lr"], min_lr, epochs,
                                      spec["steps_per_epoch"], spec.get("warmup_steps", 0),
                                      restart_epochs=restart_epochs, t_mult=t_mult,
                                      onecycle_pct_start=onecycle_pct_start,
                                      onecycle_div_factor=onecycle_div_factor)
        except ValueError as e:
            raise ValueError(f"{name}: {e}") from None
        stages.append(StagePlan(name, index, spec["start_epoch"], spec["end_epoch"],
                                spec["steps_per_epoch"], schedule))
    return LRPlan(stages)
