"""``--resume-from``: restore a run's state, and decide whether its LR schedule continues or restarts.

Continue (flags unchanged): the run goes on exactly as if it had never stopped. Restart (schedule
flags changed, the plateau-breaking move, or ``--resume-schedule restart``): a fresh schedule of the
new kind runs from the resume epoch to ``--epochs``, with its warm-up.
"""

from __future__ import annotations

import logging
import os
import shutil
import time
from typing import Optional

from core import checkpoint as ckpt
from training.config import Config
from training.report.metrics_csv import read_metrics_csv

log = logging.getLogger("cod")

# Flags whose change makes the saved LR curve the wrong one: under --resume-schedule auto they
# restart the schedule at the resume epoch.
SCHEDULE_FLAGS = ("scheduler", "lr", "stage2_lr", "min_lr", "warmup_epochs", "epochs", "stage1_epochs",
                  "t_mult", "restart_epochs", "onecycle_pct_start", "onecycle_div_factor",
                  "batch_size", "stage2_batch_size", "accumulation_steps", "limit_batches")


def schedule_changed(saved: dict, cfg: Config) -> list[str]:
    new = cfg.to_dict()
    return [k for k in SCHEDULE_FLAGS if k in saved and saved[k] != new[k]]


def decide_schedule(cfg: Config, saved_config: dict, next_epoch: int,
                    saved_restart_at: Optional[int]) -> tuple[Optional[int], str]:
    """(epoch where the schedule restarts or None, and the reason in words) for a resume at
    ``next_epoch`` (0-based) from a checkpoint written with ``saved_config``."""
    changed = schedule_changed(saved_config, cfg)
    if cfg.resume_schedule == "restart" or (cfg.resume_schedule == "auto" and changed):
        why = ("--resume-schedule restart" if cfg.resume_schedule == "restart"
               else "schedule flags changed: " + ", ".join(f"--{k.replace('_', '-')}" for k in changed)
               + "; add --resume-schedule continue to follow the saved curve instead")
        return next_epoch, f"a fresh schedule starts at epoch {next_epoch + 1} ({why})"
    why = ("--resume-schedule continue" if changed else "schedule flags unchanged")
    return saved_restart_at, f"continuing the saved schedule ({why})"


def peek(path: str) -> dict:
    """What a resume from ``path`` would start from, without building anything (for ``schedule``)."""
    obj = ckpt.load(path)
    if not ckpt.is_full_checkpoint(obj):
        return {"full": False}
    partial = obj.get("partial")
    return {"full": True, "config": obj.get("config", {}), "restart_at": obj.get("restart_at"),
            "next_epoch": partial["epoch"] if partial else int(obj["epoch"]) + 1}


def archive_abandoned_history(metrics_csv: str, keep_through_epoch: int) -> Optional[str]:
    """Resuming from an earlier epoch than the run reached (e.g. from best_model.pth) rewrites
    metrics.csv from that epoch on. The old file is kept beside it first, so no row is lost."""
    if not os.path.isfile(metrics_csv):
        return None
    epochs = [r["epoch"] for r in read_metrics_csv(metrics_csv) if isinstance(r.get("epoch"), int)]
    if not epochs or max(epochs) <= keep_through_epoch:
        return None
    backup = os.path.join(os.path.dirname(metrics_csv),
                          f"metrics-until-epoch{max(epochs)}-{time.strftime('%Y%m%d-%H%M%S')}.csv")
    shutil.copyfile(metrics_csv, backup)
    log.info("Resume: metrics.csv went on to epoch %d; kept as %s before rewriting from epoch %d",
             max(epochs), backup, keep_through_epoch + 1)
    return backup


def resume_run(run) -> None:
    """Restore what ``--resume-from`` holds into ``run`` (a ``training.loop.Run``) and decide the
    schedule. A weights-only file starts a fresh schedule from those weights."""
    cfg, c = run.cfg, run.progress
    obj = ckpt.load(cfg.resume_from)
    if not ckpt.is_full_checkpoint(obj):
        ckpt.load_model_weights(run.net, ckpt.model_state_of(obj), cfg.resume_from)
        log.info("Resume: %s holds weights only: training starts from them with a fresh schedule",
                 cfg.resume_from)
        if run.state.ema is not None:
            run.state.ema.module.load_state_dict(run.net.state_dict())
        return
    run.state.load_state_dict(obj, cfg.resume_from, run.rt.rank, run.rt.world_size)
    next_epoch = c.partial["epoch"] if c.partial else c.epoch + 1
    c.restart_at, why = decide_schedule(cfg, obj.get("config", {}), next_epoch, obj.get("restart_at"))
    if c.partial and c.restart_at == next_epoch:
        c.partial = None  # a fresh schedule starts at an epoch boundary: redo the cut-short epoch
    log.info("Resume: %s after epoch %d%s (stage %s); best %s so far: %s; %s", cfg.resume_from,
             c.epoch + 1, f" + {c.partial['batches']} batches" if c.partial else "", obj.get("stage"),
             cfg.monitor, "none" if c.best_value is None else f"{c.best_value:.4f} at epoch {c.best_epoch + 1}",
             why)
    if run.rt.is_main and not cfg.overwrite:  # --overwrite moves the whole old run aside instead
        archive_abandoned_history(os.path.join(cfg.checkpoint_dir, "metrics.csv"), c.epoch + 1)
