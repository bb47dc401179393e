"""The run's state as one plain dict, and checkpoints of it that survive interruption.

``RunState.state_dict()`` is what a checkpoint holds, a plain dict of tensors, numbers, strings, lists
and dicts (no pickled classes), so ``torch.load(weights_only=True)`` reads it:

    format_version, model, ema, optimizer, scaler, epoch (last completed, 0-based), stage,
    global_step, unfreeze_level, best {metric, value, epoch}, bad_epochs, history [rows], restart_at,
    partial, periodic_copies [names], periodic_dir, guards {...}, divergence_guard {losses, bad_in_row,
    first}, rng {...}, rng_ranks [...], world_size, config {...}

``RunState.load_state_dict(obj)`` puts it back onto the run's device: resuming from a file and rolling
back to a state kept in memory are the same call. ``save`` writes a temporary file in the same
folder, fsyncs it and ``os.replace``s it over the target, so a kill at any moment leaves either the
old file or the new one, never half of one.
"""

from __future__ import annotations

import copy
import errno
import logging
import os
import random
import tempfile
from dataclasses import dataclass, field
from typing import Any, Optional

import numpy as np
import torch

from errors import UserError

FORMAT_VERSION = 1
log = logging.getLogger("cod")


def _write(state: dict, f) -> None:
    torch.save(state, f)


def save(state: dict, path: str) -> None:
    """Atomic: the previous file at ``path`` stays whole until the new one is complete. A full disk
    or an unwritable folder is a UserError saying so (the previous file is still there)."""
    folder = os.path.dirname(os.path.abspath(path))
    tmp = None
    try:
        os.makedirs(folder, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=".tmp-", suffix=".pth", dir=folder)
        with os.fdopen(fd, "wb") as f:
            _write(state, f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException as e:
        if tmp and os.path.exists(tmp):
            os.remove(tmp)
        if isinstance(e, RuntimeError) and "unexpected pos" in str(e):  # torch's zip writer on ENOSPC
            e = OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        if isinstance(e, OSError):
            kept = f"the previous {os.path.basename(path)} is kept" if os.path.exists(path) else \
                f"no {os.path.basename(path)} was written"
            what = "no space left in" if e.errno == errno.ENOSPC else f"cannot write ({e.strerror or e}) to"
            raise UserError(f"{what} {folder} while saving {os.path.basename(path)}: {kept}; free space "
                            "or fix the folder, then resume with --resume-from its last.pth") from None
        raise


def load(path: str) -> dict:
    """Load a checkpoint or a bare state_dict; a missing or unreadable file is a UserError.

    What torch.save wrote is a zip archive (its end record, which a cut-short copy lacks, lists a
    ``<name>/data.pkl``) or, in its legacy format, a pickle."""
    import zipfile

    if not os.path.isfile(path):
        raise UserError(f"checkpoint not found: {path} (check --resume-from / --checkpoint)")
    with open(path, "rb") as f:
        head = f.read(8)
    size, again = os.path.getsize(path), "copy it again, or pass another checkpoint (e.g. best_model.pth)"
    truncated = f"{path} is truncated ({size} bytes), probably an interrupted copy: {again}"
    not_torch = (f"{path} is not a checkpoint (not a file torch.save wrote): pass the last.pth or "
                 "best_model.pth of a run, or a state_dict saved with torch.save")
    if size == 0:
        raise UserError(f"{path} is empty (0 bytes), probably an interrupted copy: {again}")
    if head.startswith(b"PK\x03\x04"):
        try:
            with zipfile.ZipFile(path) as z:
                names = z.namelist()
        except zipfile.BadZipFile:  # no end record: the end of the file is missing
            raise UserError(truncated) from None
        if not any(n.endswith("/data.pkl") for n in names):
            raise UserError(not_torch)
    elif not head.startswith(b"\x80"):  # a pickle (protocol 2 or later)
        raise UserError(not_torch)
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True)
    except EOFError:  # a legacy-format file cut short
        raise UserError(truncated) from None
    except Exception as e:  # pickled objects, damage inside
        text = " ".join(str(e).split())
        if "Weights only load failed" in text:
            raise UserError(f"{path} holds pickled Python objects, which loading with weights_only=True "
                            "refuses: if you trust the file, re-save its tensors as a plain dict") from None
        raise UserError(f"cannot read checkpoint {path}: {text.split('. ')[0][:200] or type(e).__name__} "
                        "(is it a complete .pth written by torch.save?)") from None
    if not isinstance(obj, dict):
        raise UserError(f"{path} holds a {type(obj).__name__}, not a checkpoint or state_dict")
    return obj


def is_full_checkpoint(obj: dict) -> bool:
    return "format_version" in obj and "model" in obj


def model_state_of(obj: dict) -> dict:
    """The model weights inside a full checkpoint, a {'state_dict': ...} wrapper or a bare state_dict."""
    for key in ("model", "state_dict", "model_state_dict"):
        if key in obj and isinstance(obj[key], dict):
            return obj[key]
    return obj


def strip_module_prefix(state: dict) -> dict:
    """Remove the ``module.`` prefix that DataParallel/DDP add, so either kind loads anywhere."""
    if state and all(k.startswith("module.") for k in state):
        return {k[len("module."):]: v for k, v in state.items()}
    return state


def unwrap(model: torch.nn.Module) -> torch.nn.Module:
    return model.module if hasattr(model, "module") else model


def load_model_weights(model: torch.nn.Module, state: dict, path: str) -> None:
    """Load weights strictly, except for parts the model marks optional (``optional_state_prefixes``,
    e.g. the deep-supervision side heads): switching ``--deep-supervision`` on when resuming starts
    those heads fresh, switching it off drops them. Both are logged."""
    state = strip_module_prefix(state)
    target = unwrap(model)
    optional = tuple(getattr(target, "optional_state_prefixes", ()))
    missing, unexpected = _key_diff(target.state_dict(), state)
    if any(not k.startswith(optional) for k in missing + unexpected) or not optional:
        try:
            target.load_state_dict(state, strict=True)
            return
        except RuntimeError:
            raise UserError(
                f"weights in {path} do not fit this model ({len(missing)} missing, {len(unexpected)} "
                f"unexpected keys, e.g. {(missing or unexpected)[:2]}): use the same --backbone, "
                "--num-experts and --decoder-channels as the run that wrote it") from None
    target.load_state_dict({k: v for k, v in state.items() if k not in unexpected}, strict=False)
    if missing:
        log.info("Weights: %d tensors of %s are new in this model (%s...): they start fresh",
                 len(missing), path, missing[0])
    if unexpected:
        log.info("Weights: %d tensors in %s are not used by this model (%s...): dropped",
                 len(unexpected), path, unexpected[0])


def _key_diff(expected: dict, got: dict) -> tuple[list, list]:
    missing = [k for k in expected if k not in got]
    unexpected = [k for k in got if k not in expected]
    if not missing and not unexpected:  # same keys: a shape mismatch
        missing = [k for k in expected if tuple(expected[k].shape) != tuple(got[k].shape)]
    return missing, unexpected


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
class Counters:
    """The numbers a checkpoint restores; everything else is derived from them."""
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
    lr_scale: float = 1.0           # product of the rollbacks' LR back-offs
    warmup_from: Optional[int] = None  # global step of the last rollback, start of its warm-up
    warmup_steps: int = 0
    rollbacks: int = 0
    plateau_bad: int = 0            # epochs without an improvement by --plateau-min-delta
    plateau_restarts: int = 0
    peak_scale: float = 1.0         # product of the plateau restarts' --plateau-lr-factor
    events: list = field(default_factory=list)  # {"epoch", "kind": rollback|restart, "text"}

    GUARD_FIELDS = ("unfreeze_floor", "lr_scale", "warmup_from", "warmup_steps", "rollbacks", "plateau_bad",
                    "plateau_restarts", "peak_scale", "events")


@dataclass
class RunState:
    """Model (unwrapped), EMA, optimizer, scaler and counters: what a checkpoint saves and restores."""
    model: torch.nn.Module
    optimizer: torch.optim.Optimizer
    scaler: Optional[torch.amp.GradScaler]
    ema: Any  # training.ema.ModelEma or None
    config: dict
    monitor: str
    counters: Counters = field(default_factory=Counters)
    guard: Any = None  # training.guards.DivergenceGuard (its loss window) or None


    def state_dict(self, stage: int, unfreeze_level: int, rng_ranks: Optional[list] = None) -> dict:
        c = self.counters
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
            "guards": {k: copy.deepcopy(getattr(c, k)) for k in Counters.GUARD_FIELDS},
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
        the best weights): the counters, the guard's window and the RNG go on."""
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
        """The counters, history, best record, guard state and RNG of a full checkpoint."""
        info = (lambda *a: None) if quiet else log.info
        c = self.counters
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
        defaults = Counters()
        for k in Counters.GUARD_FIELDS:
            setattr(c, k, copy.deepcopy(obj.get("guards", {}).get(k, getattr(defaults, k))))
        if self.guard is not None:
            self.guard.load_state_dict(obj.get("divergence_guard"))
        ranks = obj.get("rng_ranks")
        set_rng_state(ranks[rank] if ranks and len(ranks) == world_size else obj.get("rng"))
