"""The plateau breaker: when the monitored metric has not improved by ``--plateau-min-delta`` for
``--plateau-patience`` epochs of stage 2, the schedule restarts from the next epoch with its peak
scaled by ``--plateau-lr-factor``, from the best or the current weights, at most
``--plateau-max-restarts`` times.

Everything it changes lives in the run's progress (``restart_at``, ``peak_scale``, the counts and
an event), decided before the epoch's checkpoints are written: a stop right after the epoch
resumes with the restart.
"""

from __future__ import annotations

import logging
import os
from typing import TYPE_CHECKING, Optional

from core import checkpoint as ckpt
from training.progress import Progress

if TYPE_CHECKING:
    from training.config import Config

log = logging.getLogger("cod")


def plateau_step(run, epoch: int) -> Optional[str]:
    """After an epoch's record: restart the schedule if the plateau is reached. Returns the line to
    log after the epoch's own (None: no restart)."""
    cfg, c = run.cfg, run.progress
    if not plateau_reached(cfg, c, epoch):
        return None
    best_path = os.path.join(cfg.checkpoint_dir, "best_model.pth")
    best = None
    if c.best_epoch != epoch and cfg.plateau_from == "best":  # this epoch's best would be the current weights
        run.rt.barrier()  # every process reads best_model.pth, which the main one wrote
        best = ckpt.load(best_path) if os.path.isfile(best_path) else None
    return plateau_restart(run, epoch, best)


def count_plateau(cfg: Config, c: Progress, stage_index: int, gain: float) -> None:
    """After an epoch whose monitored value beat the best by ``gain`` (inf for the first, -inf for a
    non-finite value): the plateau breaker's count of stage-2 epochs without a gain above
    ``--plateau-min-delta``. Stage 1 never counts: the count starts with stage 2."""
    if stage_index == 0:
        c.plateau_bad = 0
    else:
        c.plateau_bad = 0 if gain > cfg.plateau_min_delta else c.plateau_bad + 1


def plateau_reached(cfg: Config, c: Progress, epoch: int) -> bool:
    """Stage 2, patience run out, restarts left."""
    return (cfg.plateau_patience is not None and epoch >= cfg.stage1_epochs and epoch + 1 < cfg.epochs
            and c.plateau_bad >= cfg.plateau_patience and c.plateau_restarts < cfg.plateau_max_restarts)


def plateau_restart(run, epoch: int, best: Optional[dict]) -> str:
    """Restart the schedule at ``epoch + 1`` with its peak x ``--plateau-lr-factor``, from the best
    weights (``best``, a checkpoint dict; None when they are the current ones) or the current ones.
    The progress goes on. Returns the line that says so."""
    cfg, c = run.cfg, run.progress
    source = "the current weights"
    if cfg.plateau_from == "best" and best is not None:
        run.state.load_weights(best, "best_model.pth", quiet=True)  # the progress and the RNG go on
        source = f"the best weights (epoch {best['epoch'] + 1})"
    elif cfg.plateau_from == "best" and c.best_epoch == epoch:
        source = f"the best weights (epoch {epoch + 1}, this one)"
    c.plateau_restarts += 1
    c.plateau_bad = 0
    c.peak_scale *= cfg.plateau_lr_factor
    c.restart_at = epoch + 1
    c.add_event(epoch + 1, "restart", f"plateau: schedule restarted, peak x{c.peak_scale:.3g}")  # its first epoch
    return (f"Plateau breaker: {cfg.monitor} has not improved by {cfg.plateau_min_delta:g} for "
            f"{cfg.plateau_patience} epochs: the schedule restarts at epoch {epoch + 2} with its peak "
            f"x{c.peak_scale:.3g}, from {source} (restart {c.plateau_restarts} of at most {cfg.plateau_max_restarts})")
