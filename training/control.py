"""When a run stops early and on purpose: signals, a wall-clock budget, a per-invocation epoch cap.

In every case the run saves a resumable ``last.pth`` first, and says how to go on.
"""

from __future__ import annotations

import logging
import os
import shlex
import signal
import time
from typing import Optional

log = logging.getLogger("cod")


class RunInterrupted(Exception):
    """Raised after a signal, once the resumable checkpoint is saved; ``exit_code`` is 128 + signal."""

    def __init__(self, message: str, exit_code: int):
        super().__init__(message)
        self.exit_code = exit_code


class StopRequest:
    """SIGTERM/SIGINT set a flag that the loop reads after each optimizer step. A second SIGINT
    interrupts at once (the previous ``last.pth`` is still there)."""

    def __init__(self):
        self.signum: Optional[int] = None
        self._previous: dict = {}

    @property
    def requested(self) -> bool:
        return self.signum is not None

    def _handle(self, signum, frame):
        if self.signum is not None and signum == signal.SIGINT:
            raise KeyboardInterrupt
        self.signum = signum
        log.info("%s received: finishing the current optimizer step, then saving last.pth",
                 signal.Signals(signum).name)

    def agree(self, rt, flag: Optional[bool] = None) -> bool:
        """Whether the run stops here, the same answer on every process (``rt.any``): one process's
        signal stops them all at the same step. ``flag`` defaults to this process's request."""
        stop = rt.any(self.requested if flag is None else flag)
        if stop and self.signum is None:
            self.signum = int(signal.SIGTERM)  # another process was signalled
        return stop

    def __enter__(self):
        for sig in (signal.SIGTERM, signal.SIGINT):
            try:
                self._previous[sig] = signal.signal(sig, self._handle)
            except ValueError:  # not the main thread: leave signals alone
                pass
        return self

    def __exit__(self, *exc):
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)
        return False


class TimeBudget:
    """``--time-limit``: before each epoch, is there time for one more? The estimate is the longest
    epoch so far (training + validation + saving) plus 10%; the first epoch always runs."""

    def __init__(self, limit_s: Optional[float], start: Optional[float] = None):
        self.limit_s = limit_s
        self.start = time.time() if start is None else start
        self.longest = 0.0
        self.epochs = 0  # epochs finished in this invocation

    def record(self, epoch_seconds: float) -> None:
        self.longest = max(self.longest, epoch_seconds)
        self.epochs += 1

    def allows_another(self) -> bool:
        if self.limit_s is None or self.longest == 0.0:
            return True
        return time.time() - self.start + 1.1 * self.longest <= self.limit_s


def launcher() -> str:
    """What starts ``train_ultimate.py`` again as this process was started: ``python``, or under
    torchrun (its agent sets ``TORCHELASTIC_RUN_ID`` in each worker's environment) a torchrun with as
    many processes. Its own flags are not passed to the workers: one node is written
    ``--standalone``, which runs the same job; several nodes need the user's rendezvous flags."""
    if "TORCHELASTIC_RUN_ID" not in os.environ:
        return "python"
    nproc = os.environ.get("LOCAL_WORLD_SIZE", "1")
    nodes = int(os.environ.get("GROUP_WORLD_SIZE", "1"))
    if nodes == 1:
        return f"torchrun --standalone --nproc_per_node {nproc}"
    return f"torchrun --nnodes {nodes} --nproc_per_node {nproc} <your rendezvous flags, on each node>"


def continue_command(argv: Optional[list], last_path: str) -> str:
    """The command that goes on from ``last_path``: the same launcher (``launcher``) and arguments
    with ``--resume-from`` pointing at it (any earlier ``--resume-from`` replaced)."""
    if not argv:
        return f"{launcher()} train_ultimate.py train <same flags> --resume-from {last_path}"
    args, skip = [], False
    for a in argv:
        if skip:
            skip = False
            continue
        if a == "--resume-from":
            skip = True
            continue
        if a.startswith("--resume-from="):
            continue
        args.append(a)
    return f"{launcher()} train_ultimate.py " + shlex.join([*args, "--resume-from", last_path])
