"""The divergence guard: what the users' guides tell people to do by hand when a run blows up.

- ``DivergenceGuard`` (every optimizer step): a non-finite loss or gradient skips the step (the
  runtime does that; GradScaler too under fp16); several non-finite steps in a row, or a loss above
  ``--spike-factor`` x the running median of recent losses, ask for a rollback.
- ``rollback``: back to the last good state kept in memory (the end of the last good epoch), the LR
  multiplied by ``--lr-backoff`` from then on, with a short linear warm-up; after
  ``--max-rollbacks`` the run stops, with the last good checkpoint on disk intact, and
  ``after_divergence`` says where to resume from.

Everything they change lives in the run's progress and the guard's window, so it is saved in
checkpoints and a resume continues with the same LR factor, the same counts and the same window.
The plateau breaker is ``training/plateau.py``.
"""

from __future__ import annotations

import copy
import logging
import math
import os
import statistics
from collections import deque
from typing import TYPE_CHECKING, Optional

import torch

from core.checkpoint import load as load_checkpoint
from core.errors import UserError
from evaluation.metrics import resolve_monitor
from training.progress import Progress

if TYPE_CHECKING:
    from training.config import Config

log = logging.getLogger("cod")

ROLLBACK_WARMUP_STEPS = 20  # optimizer steps of linear warm-up after a rollback (fewer in short epochs)
MIN_HISTORY = 10            # losses seen before a spike (> spike factor x median) is judged; before
                            # that, only a blow-up (> spike factor ** 2 x median)


class TrainingDiverged(UserError):
    """The run diverged and stops; the trainer adds what the checkpoint folder keeps."""


class RollbackNeeded(Exception):
    """Raised inside an epoch when the divergence guard asks to go back to the last good state."""


class DivergenceGuard:
    def __init__(self, spike_factor: float, max_bad_steps: int = 3, window: int = 100):
        self.spike_factor = spike_factor
        self.max_bad_steps = max_bad_steps
        self.losses: deque = deque(maxlen=window)
        self.bad_in_row = 0
        self.first: Optional[float] = None  # the run's first finite step loss: the untrained model's

    def reset(self) -> None:
        self.bad_in_row = 0

    def state_dict(self) -> dict:
        """The recent losses, the count of bad steps and the first loss: saved in checkpoints, so a
        resumed run judges spikes against the same window as the straight run."""
        return {"losses": list(self.losses), "bad_in_row": self.bad_in_row, "first": self.first}

    def load_state_dict(self, state: Optional[dict]) -> None:
        """Restore ``state_dict()``; None (a checkpoint written before it was saved) starts afresh."""
        self.losses.clear()
        self.losses.extend(float(v) for v in (state or {}).get("losses", []))
        self.bad_in_row = int((state or {}).get("bad_in_row", 0))
        self.first = (state or {}).get("first")

    def after_step(self, loss: float, stepped: bool) -> Optional[str]:
        """Why the run must roll back now, or None. ``loss`` is the optimizer step's mean loss,
        ``stepped`` whether the optimizer applied the update (False for non-finite gradients)."""
        if not math.isfinite(loss) or not stepped:
            self.bad_in_row += 1
            if self.bad_in_row >= self.max_bad_steps:
                return f"{self.bad_in_row} optimizer steps in a row with a non-finite loss or gradient"
            return None
        self.bad_in_row = 0
        if self.losses:
            median = statistics.median(self.losses)
            # a spike is judged once MIN_HISTORY losses are known; before that, only a blow-up
            factor = self.spike_factor if len(self.losses) >= MIN_HISTORY else self.spike_factor ** 2
            if loss > factor * median:
                return f"loss {loss:.4g} above {factor:g} x the running median {median:.4g}"
        self.first = loss if self.first is None else self.first
        self.losses.append(loss)
        return None

    def check_epoch(self, train_stats: dict, val_stats: dict, history: list) -> None:
        """Raise ``RollbackNeeded`` for a finished epoch that blew up by orders of magnitude, which the
        step check can miss (losses that grew step by step, or a last update that only validation
        sees): its mean training loss or its validation loss above ``spike_factor ** 2`` x the lowest
        of the run's first step loss (the untrained model's) and the earlier epochs' (``history``)."""
        factor = self.spike_factor ** 2
        for name, value, column in (("the epoch's training loss", train_stats["train_loss"], "train_loss"),
                                    ("the validation loss", val_stats.get("loss"), "val_loss")):
            past = [float(r[column]) for r in history if column in r and math.isfinite(float(r[column]))]
            lowest = min(past + ([self.first] if self.first is not None else []), default=None)
            if value is not None and lowest is not None and value > factor * lowest:
                raise RollbackNeeded(f"{name} {value:.4g} above {factor:g} x the run's lowest loss {lowest:.4g}")


def lr_factor(c: Progress, global_step: int) -> float:
    """What multiplies the scheduled LR: the rollbacks' back-off, ramped up linearly over the steps
    after the last rollback."""
    if c.warmup_from is None or c.warmup_steps <= 0:
        return c.backoff
    done = global_step - c.warmup_from
    return c.backoff * min(1.0, (done + 1) / c.warmup_steps) if done < c.warmup_steps else c.backoff


def snapshot(state_dict: dict) -> dict:
    """A copy of a state on the CPU that later training cannot change (the rollback point)."""
    return {k: _to_cpu(v) for k, v in state_dict.items()}


def _to_cpu(x):
    if torch.is_tensor(x):
        return x.detach().to("cpu", copy=True)
    if isinstance(x, dict):
        return {k: _to_cpu(v) for k, v in x.items()}
    if isinstance(x, list):
        return [_to_cpu(v) for v in x]
    return copy.deepcopy(x)


def rollback(run, good: dict, reason: str, epoch: int, steps_per_epoch: int) -> None:
    """Restore ``good`` (a ``snapshot``) into ``run`` and lower the LR; or stop after too many."""
    cfg, c = run.cfg, run.progress
    done = c.rollbacks
    if done >= cfg.max_rollbacks:
        raise TrainingDiverged(f"diverged in epoch {epoch + 1} ({reason}) after {done} rollback(s) "
                               f"(--max-rollbacks {cfg.max_rollbacks})")
    events, backoff = list(c.events), c.backoff
    run.state.load_state_dict(good, "<the last good state>", run.rt.rank, run.rt.world_size, quiet=True)
    c.rollbacks, c.events = done + 1, events
    c.backoff = backoff * cfg.lr_backoff
    if cfg.lr_backoff < 1:
        c.warmup_from, c.warmup_steps = c.global_step, max(1, min(ROLLBACK_WARMUP_STEPS, steps_per_epoch))
    c.add_event(epoch, "rollback", reason)
    log.info("Divergence guard in epoch %d: %s: rolled back to %s; the LR is now x%.3g of the schedule%s "
             "(rollback %d of at most %d)", epoch + 1, reason,
             f"the end of epoch {c.epoch + 1}" if c.epoch >= 0 else "the initial weights", c.backoff,
             f", after a {c.warmup_steps}-step warm-up" if cfg.lr_backoff < 1 else "", c.rollbacks,
             cfg.max_rollbacks)


def collapsed(checkpoint: dict) -> bool:
    """Whether a checkpoint's epoch scored its monitored value far from the run's best: under half of
    it (a higher-is-better ``--monitor``), above twice it (lower-is-better), or not finite."""
    best, history = checkpoint.get("best") or {}, checkpoint.get("history") or []
    if best.get("value") is None or not history:
        return False
    key, higher_is_better = resolve_monitor(best["metric"])
    row = history[-1]
    if f"val_{key}" in row:
        value = float(row[f"val_{key}"])
    else:  # no validation split: the training loss was monitored
        value, higher_is_better = float(row["train_loss"]), False
    if not math.isfinite(value):
        return True
    return value < 0.5 * best["value"] if higher_is_better else value > 2.0 * best["value"]


def after_divergence(cfg: Config) -> str:
    """What the folder keeps after a run stopped diverging, and where to resume: last.pth, unless its
    epoch ``collapsed`` against the best; then best_model.pth."""
    from training.folder import what_is_kept

    fix = "a lower --lr/--stage2-lr or more --warmup-epochs"
    kept = what_is_kept(cfg)
    if not kept:
        return f"no checkpoint was written to {cfg.checkpoint_dir}: start again with {fix}"
    last = os.path.join(cfg.checkpoint_dir, "last.pth")
    best = os.path.join(cfg.checkpoint_dir, "best_model.pth")
    if os.path.isfile(last) and os.path.isfile(best) and collapsed(load_checkpoint(last)):
        return (f"{kept}: last.pth scored far below the best, so resume from best_model.pth (--resume-from "
                f"{best}) with {fix}")
    return f"{kept}: resume from last.pth with {fix}"


def check_finite_output(run, epoch: int) -> None:
    """Without a validation split nothing runs the weights after the epoch's last update: one forward
    pass of a fixed input checks that they still give finite predictions before they are saved."""
    size = run.cfg.img_size
    x = torch.randn(1, 3, size, size, generator=torch.Generator().manual_seed(0)).to(run.rt.device)
    model = run.eval_model()
    was = model.training
    model.eval()
    with torch.no_grad(), run.rt.autocast():
        finite = bool(torch.isfinite(model(x)["main"].float()).all())
    model.train(was)
    if not finite:
        raise TrainingDiverged(f"the model's predictions became NaN or inf after epoch {epoch + 1}")
