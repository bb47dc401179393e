"""The LR schedule of one stage: pure math of the stage's optimizer-step count ``k``.

The clock is the optimizer step (one per update, after gradient accumulation). A stage of
``S = stage_epochs * steps_per_epoch`` steps has its own schedule over ``k = 0 .. S-1``. A schedule
gives the LR of the head group (ratio 1.0); a parameter group with ``lr_scale`` r gets
``r * lr_at(k)``, floor included (see ``apply_lr`` in ``plan.py``).

With eta = ``base_lr`` (the peak), m = ``min_lr`` (the floor) and w = ``warmup_steps``:

=================  ===========================================================================
warm-up, k < w     ``m + (eta - m) * k / w``  (cosine, cosine_restart and none; ``WarmupWrapper``)
cosine             ``m + (eta - m) * (1 + cos(pi * (k - w) / (S - w))) / 2``
cosine_restart     the same cosine inside cycles of ``R*spe, R*spe*t, R*spe*t^2, ...`` steps counted
                   after the warm-up (R = ``restart_epochs``, default ``max(1, stage_epochs // 4)``;
                   t = ``t_mult``); the last cycle is cut off by the stage end
none               ``eta`` (after the warm-up ramp, if any)
onecycle           ``torch.optim.lr_scheduler.OneCycleLR(max_lr=eta, total_steps=S, pct_start=p,
                   div_factor=d, final_div_factor=(eta/d)/m, anneal_strategy='cos',
                   three_phase=False)`` at step k, written out in plain Python; p = w/S when w > 0
                   (its ramp from eta/d is the warm-up), else ``onecycle_pct_start``. It ends at
                   exactly m at k = S-1 (unless p = 1: then it ends at the peak).
=================  ===========================================================================

Edge cases:

* ``k >= S`` is clamped: the LR stays at its last value ``lr_at(S-1)``. ``k < 0`` is a ValueError.
* ``S == 0`` (a stage without steps): the schedule can be built and described, but ``lr_at``
  raises ValueError, since there is no step to give an LR for.
* ``w >= S``: the whole stage is warm-up. The ramp keeps its slope and is cut off by the stage end,
  so the peak is not reached (``describe()['peak_lr']`` says what is). onecycle likewise rises from
  eta/d towards eta at ``k = w - 1`` and is cut off at ``S - 1``.
* onecycle phase of zero length (torch raises ZeroDivisionError, e.g. ``total_steps=10,
  pct_start=0.1`` or a 1-step warm-up): that step takes the phase's end value, so with w = 1 the
  peak is at k = 0. With S = 1 and no warm-up the single step is at m, as in torch.
* ``min_lr > base_lr`` is a ValueError for every kind; for onecycle so is ``min_lr >= base_lr / d``
  (the curve would have to rise at the end).
"""

from __future__ import annotations

import bisect
import math
import operator
from typing import Optional

KINDS = ("onecycle", "cosine", "cosine_restart", "none")


def _cosine(eta: float, m: float, pos: float, length: float) -> float:
    """Half-cosine from eta (pos = 0) towards m (pos = length)."""
    return m + (eta - m) * (1.0 + math.cos(math.pi * pos / length)) / 2.0


class Schedule:
    """Base class. Subclasses implement ``_lr(k)`` for ``0 <= k < total_steps``; ``lr_at`` does the
    checks and the clamping. Instances hold only their parameters (no counters, no history)."""

    kind = ""

    def __init__(self, total_steps: int, base_lr: float, min_lr: float, warmup_steps: int = 0):
        self.total_steps = int(total_steps)
        self.base_lr = float(base_lr)
        self.min_lr = float(min_lr)
        self.warmup_steps = int(warmup_steps)

    def lr_at(self, k: int) -> float:
        """LR of the head group at stage step ``k``; steps past the end get the final LR."""
        k = operator.index(k)
        if k < 0:
            raise ValueError(f"step must be >= 0 (got {k})")
        if self.total_steps == 0:
            raise ValueError(f"this {self.kind} schedule has no steps (total_steps=0)")
        return self._lr(min(k, self.total_steps - 1))

    def _lr(self, k: int) -> float:
        raise NotImplementedError

    def restart_steps(self) -> list[int]:
        """Steps ``k`` where the LR jumps back up to the peak (cosine_restart only)."""
        return []

    def knobs(self) -> dict:
        """Kind-specific settings for ``describe``."""
        return {}

    def _peak_candidates(self) -> list[int]:
        """Steps among which the largest LR lies (every curve here is piecewise monotone)."""
        return [0, self.total_steps - 1]

    def describe(self) -> dict:
        """What the plan printout needs; LR values are None for a schedule without steps."""
        start = peak = end = peak_step = None
        if self.total_steps > 0:
            steps = sorted({k for k in self._peak_candidates() if 0 <= k < self.total_steps})
            peak_step = max(steps, key=self.lr_at)  # first of equal maxima
            start, peak, end = self.lr_at(0), self.lr_at(peak_step), self.lr_at(self.total_steps - 1)
        return dict(kind=self.kind, start_lr=start, peak_lr=peak, peak_step=peak_step, end_lr=end,
                    base_lr=self.base_lr, min_lr=self.min_lr, warmup_steps=self.warmup_steps,
                    total_steps=self.total_steps, restart_steps=self.restart_steps(), **self.knobs())

    def __repr__(self) -> str:
        return (f"{type(self).__name__}(kind={self.kind!r}, total_steps={self.total_steps}, "
                f"base_lr={self.base_lr:g}, min_lr={self.min_lr:g}, warmup_steps={self.warmup_steps})")


class Constant(Schedule):
    """'none': the base LR at every step."""

    kind = "none"

    def _lr(self, k: int) -> float:
        return self.base_lr


class Cosine(Schedule):
    """'cosine': one half-cosine from base_lr at k = 0 towards min_lr at k = total_steps."""

    kind = "cosine"

    def _lr(self, k: int) -> float:
        return _cosine(self.base_lr, self.min_lr, k, self.total_steps)


class CosineRestart(Schedule):
    """'cosine_restart': half-cosines over cycles of ``first_cycle * t_mult**i`` steps; each cycle
    starts at base_lr. The last cycle is cut off by ``total_steps`` (it does not reach min_lr)."""

    kind = "cosine_restart"

    def __init__(self, total_steps: int, base_lr: float, min_lr: float, first_cycle: int,
                 t_mult: int = 2, restart_epochs: Optional[int] = None):
        super().__init__(total_steps, base_lr, min_lr)
        self.first_cycle, self.t_mult, self.restart_epochs = first_cycle, t_mult, restart_epochs
        self._starts: list[int] = []
        self._lengths: list[int] = []
        start, length = 0, first_cycle
        while start < self.total_steps:
            self._starts.append(start)
            self._lengths.append(length)
            start, length = start + length, length * t_mult

    def _lr(self, k: int) -> float:
        i = bisect.bisect_right(self._starts, k) - 1
        return _cosine(self.base_lr, self.min_lr, k - self._starts[i], self._lengths[i])

    def restart_steps(self) -> list[int]:
        return self._starts[1:]

    def knobs(self) -> dict:
        return dict(restart_epochs=self.restart_epochs, t_mult=self.t_mult,
                    cycle_steps=list(self._lengths))


class WarmupWrapper(Schedule):
    """Linear warm-up from min_lr over the first ``warmup_steps``, then ``inner`` from its own step 0
    (prefix semantics: the inner schedule starts at its peak, which is reached at k = w).

    ``inner`` covers the ``max(0, total_steps - warmup_steps)`` steps after the warm-up. The one place
    warm-up is written for cosine, cosine_restart and none (onecycle has its own ramp)."""

    def __init__(self, inner: Schedule, warmup_steps: int, total_steps: int):
        if inner.total_steps != max(0, total_steps - warmup_steps):
            raise ValueError(f"inner schedule has {inner.total_steps} steps, expected "
                             f"{max(0, total_steps - warmup_steps)}")
        super().__init__(total_steps, inner.base_lr, inner.min_lr, warmup_steps)
        self.inner = inner
        self.kind = inner.kind

    def _lr(self, k: int) -> float:
        w = self.warmup_steps
        if k < w:
            return self.min_lr + (self.base_lr - self.min_lr) * k / w
        return self.inner.lr_at(k - w)

    def restart_steps(self) -> list[int]:
        return [self.warmup_steps + r for r in self.inner.restart_steps()]

    def knobs(self) -> dict:
        return self.inner.knobs()

    def _peak_candidates(self) -> list[int]:
        return [0, self.total_steps - 1, self.warmup_steps]


class OneCycle(Schedule):
    """'onecycle': torch's ``OneCycleLR`` (cos annealing, two phases) in plain Python.

    Phase 1 rises from ``base_lr / div_factor`` to ``base_lr`` over steps ``0 .. end1`` with
    ``end1 = pct_start * S - 1`` (``w - 1`` when a warm-up of w steps is given; then
    ``pct_start = w / S``); phase 2 falls to ``min_lr`` at ``S - 1``.
    """

    kind = "onecycle"

    def __init__(self, total_steps: int, base_lr: float, min_lr: float, pct_start: float = 0.1,
                 div_factor: float = 25.0, warmup_steps: int = 0):
        super().__init__(total_steps, base_lr, min_lr, warmup_steps)
        self.div_factor = float(div_factor)
        self.initial_lr = self.base_lr / self.div_factor
        if self.min_lr >= self.initial_lr:
            raise ValueError(
                f"onecycle starts at base_lr/div_factor = {self.base_lr:g}/{self.div_factor:g} = "
                f"{self.initial_lr:g} and must end below that, but min_lr is {self.min_lr:g}: "
                f"lower min_lr or div_factor")
        if self.warmup_steps > 0:
            # Exact integer phase end (w/S*S can miss w by an ulp and flip a 1-step ramp).
            self.pct_start = self.warmup_steps / self.total_steps if self.total_steps else 1.0
            self._end1 = float(self.warmup_steps) - 1
        else:
            self.pct_start = float(pct_start)
            self._end1 = float(self.pct_start * self.total_steps) - 1  # as torch computes it
        self._end2 = float(self.total_steps - 1)

    def _lr(self, k: int) -> float:
        if k <= self._end1:
            start_step, end_step, start_lr, end_lr = 0.0, self._end1, self.initial_lr, self.base_lr
        else:
            start_step, end_step, start_lr, end_lr = self._end1, self._end2, self.base_lr, self.min_lr
        span = end_step - start_step
        pct = (k - start_step) / span if span != 0 else 1.0  # zero-length phase: its end value
        return end_lr + (start_lr - end_lr) / 2.0 * (math.cos(math.pi * pct) + 1)  # torch's order

    @property
    def final_div_factor(self) -> float:
        return self.initial_lr / self.min_lr if self.min_lr > 0 else math.inf

    def knobs(self) -> dict:
        return dict(pct_start=self.pct_start, div_factor=self.div_factor,
                    final_div_factor=self.final_div_factor)

    def _peak_candidates(self) -> list[int]:
        e = self._end1
        return [0, self.total_steps - 1] + ([math.floor(e), math.ceil(e)] if e >= 0 else [])


# ---------------------------------------------------------------------------------------------


def _int(name: str, value, minimum: int) -> int:
    if isinstance(value, bool):
        raise ValueError(f"{name} must be an integer >= {minimum} (got {value!r})")
    try:
        value = operator.index(value)
    except TypeError:
        raise ValueError(f"{name} must be an integer >= {minimum} (got {value!r})") from None
    if value < minimum:
        raise ValueError(f"{name} must be an integer >= {minimum} (got {value})")
    return value


def _float(name: str, value) -> float:
    try:
        value = float(value)
    except (TypeError, ValueError):
        raise ValueError(f"{name} must be a number (got {value!r})") from None
    if not math.isfinite(value):
        raise ValueError(f"{name} must be finite (got {value})")
    return value


def build_schedule(kind: str, base_lr: float, min_lr: float, stage_epochs: int, steps_per_epoch: int,
                   warmup_steps: int = 0, restart_epochs: Optional[int] = None, t_mult: int = 2,
                   onecycle_pct_start: float = 0.1, onecycle_div_factor: float = 25.0) -> Schedule:
    """The schedule of one stage of ``stage_epochs * steps_per_epoch`` optimizer steps.

    Only the knobs of ``kind`` are checked (``t_mult`` is ignored by 'cosine', ...). Raises
    ValueError with a one-line message for anything invalid.
    """
    if kind not in KINDS:
        raise ValueError(f"unknown scheduler {kind!r}: choose one of {', '.join(KINDS)}")
    eta, m = _float("base_lr", base_lr), _float("min_lr", min_lr)
    if eta <= 0:
        raise ValueError(f"base_lr must be > 0 (got {eta:g})")
    if m < 0:
        raise ValueError(f"min_lr must be >= 0 (got {m:g})")
    if m > eta:
        raise ValueError(f"min_lr ({m:g}) is above base_lr ({eta:g}): lower min_lr or raise the LR")
    epochs = _int("stage_epochs", stage_epochs, 0)
    spe = _int("steps_per_epoch", steps_per_epoch, 0)
    w = _int("warmup_steps", warmup_steps, 0)
    total = epochs * spe

    if kind == "onecycle":
        p = _float("onecycle_pct_start", onecycle_pct_start)
        if not 0.0 <= p <= 1.0:
            raise ValueError(f"onecycle_pct_start must be in [0, 1] (got {p:g})")
        d = _float("onecycle_div_factor", onecycle_div_factor)
        if d < 1.0:
            raise ValueError(f"onecycle_div_factor must be >= 1 (got {d:g}): the start LR is "
                             f"base_lr / div_factor")
        return OneCycle(total, eta, m, pct_start=p, div_factor=d, warmup_steps=w)

    rest = max(0, total - w)
    if kind == "cosine":
        inner: Schedule = Cosine(rest, eta, m)
    elif kind == "cosine_restart":
        r = max(1, epochs // 4) if restart_epochs is None else _int("restart_epochs", restart_epochs, 1)
        t = _int("t_mult", t_mult, 1)
        inner = CosineRestart(rest, eta, m, first_cycle=max(1, r * spe), t_mult=t, restart_epochs=r)
    else:
        inner = Constant(rest, eta, m)
    return WarmupWrapper(inner, w, total)
