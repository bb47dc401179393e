"""What a run says to people: the per-epoch line, ``train.log`` and the start-up summary.

The epoch line keeps the users' guides' layout: ``Epoch N/M [stage]: Loss | IoU | Dice | Sm | Val
loss | LR``.
"""

from __future__ import annotations

import logging
import os
from logging.handlers import MemoryHandler
from typing import Optional

from training.config import Config

log = logging.getLogger("cod")

# (label, row key) of the epoch line, after the training loss; keys missing from a row are left out
EPOCH_LINE = (("IoU", "val_iou"), ("Dice", "val_dice"), ("Sm", "val_sm"), ("Val loss", "val_loss"))


def format_lr(lr: float) -> str:
    """The users' fixed-point format, switching to exponent form where it would print 0.000000."""
    return f"{lr:.6f}" if lr >= 1e-5 or lr == 0 else f"{lr:.2e}"


def format_epoch_line(row: dict, cfg: Config) -> str:
    head = f"Epoch {row['epoch']}/{cfg.epochs}"
    has_val = any(key in row for _, key in EPOCH_LINE)
    parts = [f"Loss: {row['train_loss']:.4f}"]
    parts += [f"{label}: {row[key]:.4f}" for label, key in EPOCH_LINE if key in row]
    parts.append(f"LR: {format_lr(row['lr'])}")
    return f"{head} [{row['stage']}]: " + " | ".join(parts) if has_val else f"{head}: " + " | ".join(parts)


def start_logging(is_main: bool) -> Optional[MemoryHandler]:
    """At the start of a run. The other processes of a DDP run only report warnings, so that every
    line is printed once. The main process keeps its lines in memory until ``setup_logging`` has
    a train.log to put them in: a start that fails (a typo in a path) leaves the folder untouched."""
    if not is_main:
        logging.getLogger().setLevel(logging.WARNING)  # the data and model modules' loggers too
        logging.getLogger("cod").setLevel(logging.WARNING)
        return None
    early = MemoryHandler(capacity=1_000_000, flushLevel=logging.CRITICAL + 1)
    logging.getLogger().addHandler(early)
    return early


def setup_logging(folder: str, early: Optional[MemoryHandler] = None) -> None:
    """``train.log`` in ``folder``, starting with the lines logged since ``start_logging``.

    The file takes what the console shows: its handler sits on the root logger, which the data and
    model modules' loggers (``logging.getLogger(__name__)``) reach as well as ``cod``. A handler
    left by an earlier run in this process (a notebook, the tests) is replaced, not added to."""
    root = logging.getLogger()
    for h in [h for h in root.handlers if getattr(h, "cod_train_log", False)]:
        root.removeHandler(h)
        h.close()
    fh = logging.FileHandler(os.path.join(folder, "train.log"))
    fh.setFormatter(logging.Formatter("%(asctime)s %(message)s", "%Y-%m-%d %H:%M:%S"))
    fh.cod_train_log = True
    root.addHandler(fh)
    if early is not None:
        early.setTarget(fh)
        early.flush()


def stop_buffering(early: Optional[MemoryHandler]) -> None:
    """Drop the start-up buffer (its lines are in train.log by now, or the start failed)."""
    if early is not None:
        logging.getLogger().removeHandler(early)
        early.buffer.clear()
        early.close()


def log_model_summary(cfg: Config, model, device, gflops: float) -> None:
    counts = model.param_counts()
    log.info("Model: %s, %d experts (top-%d), deep supervision %s | params: %s | %.2f GFLOPs per "
             "%d px image (forward)", cfg.backbone, cfg.num_experts, cfg.moe_top_k,
             "on" if cfg.deep_supervision else "off",
             ", ".join(f"{k} {v / 1e6:.2f}M" for k, v in counts.items()), gflops, cfg.img_size)
    log.info("Regularisation: weight decay %g (not on norms/biases) | drop-path %g | dropout %g | "
             "label smoothing %g | grad clip %g", cfg.weight_decay, cfg.drop_path, cfg.dropout,
             cfg.label_smoothing, cfg.grad_clip)
