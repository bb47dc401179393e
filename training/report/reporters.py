"""What a run writes after each epoch: one reporter per output, all called from one place.

    end = EpochEnd(epoch, row, improved, state, seconds)    # built by the trainer after each epoch
    report_epoch(run, end)                                  # every reporter of run.reporters, in order

Reporters (``make_reporters``): the epoch line (the log and ``train.log``), the checkpoints
(``last.pth``, ``best_model.pth``, periodic copies), ``metrics.csv``, ``curves.png`` and
TensorBoard. A new output is one more class here with ``epoch_end(run, end)`` and one line in
``make_reporters``; the trainer does not change.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Optional, Protocol

from core import checkpoint as ckpt
from training.folder import next_periodic_copy, write_periodic_copy
from training.report.curves import draw_curves
from training.report.log import log, format_epoch_line
from training.report.metrics_csv import write_metrics_csv
from training.report.tensorboard import TensorBoardLogger


@dataclass
class EpochEnd:
    epoch: int                 # 0-based
    row: dict                  # the epoch's row of metrics.csv
    improved: bool             # a new best --monitor value
    state: Optional[dict]      # the run's checkpoint after this epoch (main process; None elsewhere)
    seconds: float


class Reporter(Protocol):
    def epoch_end(self, run, end: EpochEnd) -> None: ...

    def close(self) -> None: ...


class EpochLine:
    """``Epoch N/M [stage]: Loss ... | LR ... | 12s  * best`` to the log (and so to train.log)."""

    def epoch_end(self, run, end: EpochEnd) -> None:
        log.info("%s | %.0fs%s", format_epoch_line(end.row, run.cfg), end.seconds, "  * best" if end.improved else "")

    def close(self) -> None:
        pass


class Checkpoints:
    """last.pth after every epoch, best_model.pth when it improved, the periodic copies of
    --save-every (never over a file this run did not write; --keep-last prunes only its own)."""

    def epoch_end(self, run, end: EpochEnd) -> None:
        folder = run.cfg.checkpoint_dir
        copy = next_periodic_copy(run, end.epoch)  # updates the list of copies this state names
        state = {**end.state, "periodic_copies": list(run.progress.periodic),
                 "periodic_dir": run.progress.periodic_dir}
        if end.improved:
            ckpt.save(state, os.path.join(folder, "best_model.pth"))
        ckpt.save(state, os.path.join(folder, "last.pth"))
        write_periodic_copy(run, state, copy)

    def close(self) -> None:
        pass


class MetricsCsv:
    def epoch_end(self, run, end: EpochEnd) -> None:
        write_metrics_csv(run.progress.history, os.path.join(run.cfg.checkpoint_dir, "metrics.csv"))

    def close(self) -> None:
        pass


class CurvesPng:
    def epoch_end(self, run, end: EpochEnd) -> None:
        draw_curves(run.cfg.checkpoint_dir, run.progress.history, lr_steps=run.lr_steps,
                    events=run.progress.events)

    def close(self) -> None:
        pass


class TensorBoard:
    def __init__(self, folder: str):
        self.logger = TensorBoardLogger(os.path.join(folder, "tensorboard"))

    def epoch_end(self, run, end: EpochEnd) -> None:
        self.logger.log_epoch(end.row)

    def close(self) -> None:
        self.logger.close()


def make_reporters(cfg, is_main: bool) -> list:
    """The epoch line on every process (the others log warnings only); the files on the main one."""
    if not is_main:
        return [EpochLine()]
    reporters = [EpochLine(), Checkpoints(), MetricsCsv()] + ([CurvesPng()] if cfg.curves else [])
    if cfg.tensorboard:
        reporters.append(TensorBoard(cfg.checkpoint_dir))
    return reporters


def report_epoch(run, end: EpochEnd) -> None:
    for reporter in run.reporters:
        reporter.epoch_end(run, end)
