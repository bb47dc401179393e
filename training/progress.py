"""The run's progress and state as one plain dict: what a checkpoint holds, and how it comes back.

``RunState.state_dict()`` is what a checkpoint holds, a plain dict of tensors, numbers, strings, lists
and dicts (no pickled classes), so ``torch.load(weights_only=True)`` reads it:

    format_version, model, ema, optimizer, scaler, epoch (last completed, 0-based), stage,
    global_step, unfreeze_level, best {metric, value, epoch}, bad_epochs, history [rows], restart_at,
    partial, periodic_copies [names], periodic_dir, guards {...}, divergence_guard {losses, bad_in_row,
    first}, rng {...}, rng_ranks [...], world_size, config {...}

``RunState`` restores the weights (``load_weights``: model, EMA, optimizer moments, loss scale) and
the progress (``load_progress``: ``Progress``, the guard's window, RNG) separately: a resume and a
rollback load both, the plateau breaker's restart from the best weights only the weights. Writing
and reading the files is ``core.checkpoint``'s.
"""

from __future__ import annotations

import copy
import logging
import math
import random
from dataclasses import dataclass, field
from typing import Any, Optional

import numpy as np
import torch

from core.checkpoint import load_model_weights, model_state_of
from core.runtime import unwrap

FORMAT_VERSION = 1
log = logging.getLogger("cod")


# ---- RNG state as plain data ------------------------------------------------------------------

def rng_state() -> dict:
    np_state = np.random.get_state()
    state: dict[str, Any] = {
        "python": _to_plain(random.getstate()),
        "numpy": [np_state[0], torch.from_numpy(np_state[1].astype(np.int64)), int(np_state[2]),
                  int(np_state[3]), float(np_state[4])],
        "torch": torch.get_rng_state(),
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict) -> None:
    if not state:
        return
    random.setstate(_to_tuple(state["python"]))
    kind, keys, pos, has_gauss, cached = state["numpy"]
    np.random.set_state((kind, keys.numpy().astype(np.uint32), pos, has_gauss, cached))
    torch.set_rng_state(state["torch"])
    # a run resumed on another machine may see fewer or more GPUs (or none): restore what fits
    if "cuda" in state and torch.cuda.is_available():
        for i, s in enumerate(state["cuda"][:torch.cuda.device_count()]):
            torch.cuda.set_rng_state(s, i)


def _to_plain(x):
    if isinstance(x, tuple):
        return [_to_plain(v) for v in x]
    return x


def _to_tuple(x):
    if isinstance(x, list):
        return tuple(_to_tuple(v) for v in x)
    return x


# ---- the run's state ----------------------------------------------------------------------------

@dataclass
class Progress:
    """How far the run got, and what it met on the way: the numbers a checkpoint restores (everything
    else is derived from them), the history of epochs and the events (rollbacks, restarts)."""
    epoch: int = -1                 # last completed epoch (0-based); -1 = none yet
    global_step: int = 0            # optimizer updates so far, all stages
    best_value: Optional[float] = None
    best_epoch: Optional[int] = None
    history: list = field(default_factory=list)
    bad_epochs: int = 0             # epochs without improvement (early stopping)
    restart_at: Optional[int] = None  # epoch where a plateau-breaking resume restarted the schedule
    partial: Optional[dict] = None    # an epoch cut short by a stop request: how far it got
    periodic: list = field(default_factory=list)  # epoch_NNNN.pth copies this run wrote, oldest first
    periodic_dir: Optional[str] = None  # the folder they are in (a resume elsewhere must not prune there)
    unfreeze_floor: int = 0         # the deepest unfreeze level reached: a resume never re-freezes
    # the guards (training/guards.py)
    backoff: float = 1.0            # product of the rollbacks' --lr-backoff (multiplies the LR)
    warmup_from: Optional[int] = None  # global step of the last rollback, start of its warm-up
    warmup_steps: int = 0
    rollbacks: int = 0
    plateau_bad: int = 0            # epochs without an improvement by --plateau-min-delta
    plateau_restarts: int = 0
    peak_scale: float = 1.0         # product of the plateau restarts' --plateau-lr-factor
    events: list = field(default_factory=list)  # {"epoch", "kind": rollback|restart, "text"}

    def add_event(self, epoch: int, kind: str, text: str) -> None:
        """An event (``rollback``, ``restart``) of 0-based ``epoch``: the epoch it belongs to, marked in
        that epoch's row of metrics.csv (``events``) and drawn where it begins on curves.png."""
        self.events.append({"epoch": epoch + 1, "kind": kind, "text": text})

    def record_epoch(self, row: dict, value: float, higher_is_better: bool) -> tuple[bool, float]:
        """Add an epoch's ``row`` (its events marked in it) and update the best record and early
        stopping's count with its monitored ``value``. Returns whether it is a new best, and its gain
        over the previous best (inf for the first, -inf for a non-finite value)."""
        self.epoch = row["epoch"] - 1
        events = [e["kind"] for e in self.events if e["epoch"] == row["epoch"]]
        if events:
            row["events"] = "+".join(events)
        self.history.append(row)
        finite = math.isfinite(value)
        gain = (-math.inf if not finite else math.inf if self.best_value is None
                else (value - self.best_value) * (1 if higher_is_better else -1))
        improved = finite and gain > 0
        if improved:
            self.best_value, self.best_epoch, self.bad_epochs = value, self.epoch, 0
        else:
            self.bad_epochs += 1
        return improved, gain

    GUARD_FIELDS = ("unfreeze_floor", "backoff", "warmup_from", "warmup_steps", "rollbacks", "plateau_bad",
                    "plateau_restarts", "peak_scale", "events")


@dataclass
class RunState:
    """Model (unwrapped), EMA, optimizer, scaler, progress and the divergence guard: what a checkpoint
    saves and restores."""
    model: torch.nn.Module
    optimizer: torch.optim.Optimizer
    scaler: Optional[torch.amp.GradScaler]
    ema: Any  # training.ema.ModelEma or None
    config: dict
    monitor: str
    progress: Progress = field(default_factory=Progress)
    guard: Any = None  # training.guards.DivergenceGuard (its loss window) or None


    def state_dict(self, stage: int, unfreeze_level: int, rng_ranks: Optional[list] = None) -> dict:
        c = self.progress
        return {
            "format_version": FORMAT_VERSION,
            "model": unwrap(self.model).state_dict(),
            "ema": self.ema.state_dict() if self.ema is not None else None,
            "optimizer": self.optimizer.state_dict(),
            "scaler": self.scaler.state_dict() if self.scaler is not None else None,
            "epoch": c.epoch,
            "stage": stage,
            "global_step": c.global_step,
            "unfreeze_level": unfreeze_level,
            "best": {"metric": self.monitor, "value": c.best_value, "epoch": c.best_epoch},
            "bad_epochs": c.bad_epochs,
            "history": [dict(r) for r in c.history],
            "restart_at": c.restart_at,
            "partial": c.partial,
            "periodic_copies": list(c.periodic),
            "periodic_dir": c.periodic_dir,
            "guards": {k: copy.deepcopy(getattr(c, k)) for k in Progress.GUARD_FIELDS},
            "divergence_guard": self.guard.state_dict() if self.guard is not None else None,
            "rng": rng_state(),
            "rng_ranks": rng_ranks,
            "world_size": len(rng_ranks) if rng_ranks else 1,
            "config": dict(self.config),
        }

    def load_state_dict(self, obj: dict, path: str = "<memory>", rank: int = 0, world_size: int = 1,
                        quiet: bool = False) -> None:
        """Restore a full checkpoint (see ``is_full_checkpoint``) onto the run's device: the weights
        and the progress. Tensors come back wherever the model, EMA and optimizer live, whichever
        device wrote them. ``quiet``: no log lines (a rollback to a state kept in memory)."""
        self.load_weights(obj, path, quiet)
        self.load_progress(obj, path, rank, world_size, quiet)

    def load_weights(self, obj: dict, path: str = "<memory>", quiet: bool = False) -> None:
        """The model, EMA, optimizer moments and loss scale only (the plateau breaker's restart from
        the best weights): the progress, the guard's window and the RNG go on."""
        info = (lambda *a: None) if quiet else log.info
        load_model_weights(self.model, model_state_of(obj), path)
        try:
            self.optimizer.load_state_dict(obj["optimizer"])  # moves the moments to the params' device
        except (ValueError, KeyError):
            info("Resume: the optimizer state does not fit this model: fresh optimizer moments")
        if self.scaler is not None and obj.get("scaler"):
            self.scaler.load_state_dict(obj["scaler"])
        elif self.scaler is not None or obj.get("scaler"):
            info("Resume: the checkpoint was trained %s fp16 loss scaling and this run %s: the loss "
                     "scale starts afresh", "with" if obj.get("scaler") else "without",
                     "uses it" if self.scaler is not None else "does not (CPU, bf16 or --amp off)")
        if self.ema is not None:
            if obj.get("ema"):
                self.ema.load_state_dict(obj["ema"])
            else:
                self.ema.module.load_state_dict(unwrap(self.model).state_dict())

    def load_progress(self, obj: dict, path: str = "<memory>", rank: int = 0, world_size: int = 1,
                      quiet: bool = False) -> None:
        """The progress (counters, history, best record, guard state and RNG) of a full checkpoint."""
        info = (lambda *a: None) if quiet else log.info
        c = self.progress
        c.epoch, c.global_step = int(obj["epoch"]), int(obj["global_step"])
        c.history = [dict(r) for r in obj.get("history", []) if r["epoch"] <= c.epoch + 1]
        c.partial = obj.get("partial")
        if c.partial and int(obj.get("world_size", 1)) != world_size:
            info("Resume: %s stopped inside epoch %d on %d processes, this run has %d: the epoch "
                     "is trained again from its start", path, c.partial["epoch"] + 1,
                     int(obj.get("world_size", 1)), world_size)
            c.partial = None
        if obj["best"].get("metric") == self.monitor:
            c.best_value, c.best_epoch = obj["best"]["value"], obj["best"]["epoch"]
            c.bad_epochs = int(obj.get("bad_epochs", 0))
        else:
            c.best_value, c.best_epoch, c.bad_epochs = None, None, 0
            info("Resume: --monitor changed from %s to %s: the best-model record starts anew",
                     obj["best"].get("metric"), self.monitor)
        c.restart_at = obj.get("restart_at")
        c.periodic, c.periodic_dir = list(obj.get("periodic_copies", [])), obj.get("periodic_dir")
        defaults = Progress()
        guards = dict(obj.get("guards", {}))
        guards.setdefault("backoff", guards.get("lr_scale", defaults.backoff))  # its name until 2026-12
        for k in Progress.GUARD_FIELDS:
            setattr(c, k, copy.deepcopy(guards.get(k, getattr(defaults, k))))
        if self.guard is not None:
            self.guard.load_state_dict(obj.get("divergence_guard"))
        ranks = obj.get("rng_ranks")
        set_rng_state(ranks[rank] if ranks and len(ranks) == world_size else obj.get("rng"))
