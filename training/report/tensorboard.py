"""``--tensorboard``: each epoch's row (the one metrics.csv gets) as TensorBoard scalars.

Tags group the columns: ``train/loss``, ``train/bce``, ``val/iou``, ``lr/head``, ``experts/expert0``,
``run/stage``, ``run/unfreeze_level``; the step is the epoch (1-based, as in metrics.csv). Without
the ``tensorboard`` package (``torch.utils.tensorboard`` needs it) one line says so and nothing is
written.
"""

from __future__ import annotations

import logging
import math

log = logging.getLogger("cod")


def tag_of(key: str) -> str:
    for prefix in ("train", "val"):
        if key.startswith(prefix + "_"):
            return f"{prefix}/{key[len(prefix) + 1:]}"
    if key.startswith("expert") and key.endswith("_usage"):
        return f"experts/{key[:-len('_usage')]}"
    if key == "lr":
        return "lr/head"
    return f"run/{key}"


class TensorBoardLogger:
    """``TensorBoardLogger(log_dir).log_epoch(row)`` after every epoch; ``close()`` at the end."""

    def __init__(self, log_dir: str):
        self.log_dir, self.writer = log_dir, None
        try:
            from torch.utils.tensorboard import SummaryWriter
        except ImportError:
            log.info("--tensorboard: tensorboard is not installed (pip install tensorboard): no event "
                     "files are written")
            return
        self.writer = SummaryWriter(log_dir)
        log.info("--tensorboard: event files in %s (tensorboard --logdir %s)", log_dir, log_dir)

    @property
    def enabled(self) -> bool:
        return self.writer is not None

    def log_epoch(self, row: dict) -> None:
        if self.writer is None:
            return
        step = int(row["epoch"])
        for key, value in row.items():
            if key == "epoch" or isinstance(value, bool) or not isinstance(value, (int, float)):
                continue
            if math.isfinite(value):
                self.writer.add_scalar(tag_of(key), float(value), step)
        self.writer.flush()

    def close(self) -> None:
        if self.writer is not None:
            self.writer.close()
            self.writer = None
