"""The checkpoint folder is sacred: a fresh run never replaces a trained one, two runs never share
one, and ``--keep-last`` deletes only the copies this run wrote.

    check_folder(cfg)            refuse a folder that holds a run, unless resuming it or --overwrite
    with FolderLock(dir): ...    one run at a time (an OS lock, released when the process ends)
    next_periodic_copy / write_periodic_copy   --save-every/--keep-last, never over a file it did not write
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import logging
import os
import shutil
import time
from typing import Optional

from core.errors import UserError
from core import checkpoint
from training.config import Config
from training.report.metrics_csv import read_metrics_csv

log = logging.getLogger("cod")

# What a run writes; epoch_NNNN.pth copies are matched separately.
RUN_FILES = ("best_model.pth", "last.pth", "metrics.csv", "config.json", "test_metrics.json", "train.log",
             "curves.png")
LOCK_NAME = ".cod-run.lock"


def run_files(folder: str) -> list[str]:
    """The files a run leaves (periodic ``epoch_*.pth`` copies are matched by name only when the
    folder holds a run: a user's own ``epoch_*`` file alone does not make a folder a run)."""
    if not os.path.isdir(folder):
        return []
    names = os.listdir(folder)
    found = [f for f in names if f in RUN_FILES
             or (f.startswith("metrics-until-epoch") and f.endswith(".csv"))]
    if found:
        found += [f for f in names if f.startswith("epoch_") and f.endswith(".pth")]
    return sorted(found)


def describe_run(folder: str) -> str:
    """'4 epoch(s) in metrics.csv', from the folder's metrics.csv if readable."""
    try:
        rows = read_metrics_csv(os.path.join(folder, "metrics.csv"))
        return f"{len(rows)} epoch(s) in metrics.csv" if rows else "an empty metrics.csv"
    except OSError:
        return "files of a run"


def check_folder(cfg: Config) -> None:
    """Before anything is written. A folder holding a run is refused unless ``--resume-from`` names a
    file in it (the run goes on) or ``--overwrite`` moves the old files into a subfolder."""
    folder = os.path.abspath(cfg.checkpoint_dir)
    resuming_here = cfg.resume_from and os.path.dirname(os.path.abspath(cfg.resume_from)) == folder
    if resuming_here and cfg.overwrite:
        raise UserError(
            f"--overwrite with --resume-from {cfg.resume_from} in the same --checkpoint-dir would move that "
            f"file aside: leave out --overwrite to go on with that run there, or pass another --checkpoint-dir "
            "to start a new run from it")
    found = run_files(folder)
    if not found or resuming_here:
        return
    if not cfg.overwrite:
        raise UserError(
            f"--checkpoint-dir {cfg.checkpoint_dir} already holds a run ({describe_run(folder)}; "
            f"{', '.join(found[:4])}{'...' if len(found) > 4 else ''}): go on with --resume-from "
            f"{os.path.join(cfg.checkpoint_dir, 'last.pth')}, use another --checkpoint-dir, or add "
            "--overwrite to move its files aside into a subfolder")


def move_aside(folder: str) -> Optional[str]:
    """``--overwrite``: the old run's files go to ``previous-<time>/`` inside the folder, not away."""
    found = run_files(folder)
    if not found:
        return None
    dest = os.path.join(folder, time.strftime("previous-%Y%m%d-%H%M%S"))
    n = 1
    while os.path.exists(dest):
        dest = f"{dest.rsplit('.', 1)[0]}.{n}"
        n += 1
    os.makedirs(dest)
    for name in found:
        shutil.move(os.path.join(folder, name), os.path.join(dest, name))
    log.info("--overwrite: the previous run's %d files moved to %s", len(found), dest)
    return dest


class FolderLock:
    """An exclusive ``flock`` on ``<folder>/.cod-run.lock`` for the life of the run. The OS releases
    it when the process ends, however it ends, so a killed run leaves no stale lock."""

    def __init__(self, folder: str):
        self.path = os.path.join(folder, LOCK_NAME)
        self.fd: Optional[int] = None

    def __enter__(self):
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as e:
            if e.errno not in (errno.EAGAIN, errno.EACCES):
                raise
            holder = os.read(fd, 200).decode(errors="replace").strip() or "another process"
            os.close(fd)
            raise UserError(f"--checkpoint-dir {os.path.dirname(self.path)} is in use by another run "
                            f"({holder}): wait for it to end, or use another --checkpoint-dir") from None
        os.ftruncate(fd, 0)
        os.write(fd, f"pid {os.getpid()}, started {time.strftime('%Y-%m-%d %H:%M:%S')}".encode())
        self.fd = fd
        return self

    def __exit__(self, *exc):
        if self.fd is not None:
            os.close(self.fd)  # releases the lock; the file may stay (it is empty of meaning)
            self.fd = None
        return False


def what_is_kept(cfg: Config) -> str:
    """Exactly what the folder holds after a divergence (nothing diverged is ever saved)."""
    kept = []
    for name in ("last.pth", "best_model.pth"):
        path = os.path.join(cfg.checkpoint_dir, name)
        if os.path.isfile(path):
            kept.append(f"{name} keeps epoch {checkpoint.load(path)['epoch'] + 1}")
    return ", ".join(kept)


def next_periodic_copy(run, epoch: int) -> Optional[tuple[str, list]]:
    """``--save-every N``: the name of epoch ``epoch``'s copy and the older copies ``--keep-last K``
    drops, or None. The run's list of copies is updated first, so the checkpoints of this epoch
    (last.pth, the copy itself) list exactly the copies there will be. Only copies this run wrote in
    this folder are listed: a file of that name that the run did not write is never replaced (the
    copy takes the next free name, epoch_NNNN-1.pth, ...) nor deleted; nor are the copies a resumed
    checkpoint lists in another folder."""
    cfg, c = run.cfg, run.progress
    if not cfg.save_every or (epoch + 1) % cfg.save_every:
        return None
    folder = os.path.realpath(cfg.checkpoint_dir)
    if c.periodic_dir != folder:
        if c.periodic:
            log.info("--keep-last: the %d periodic copies the resumed checkpoint lists were written in %s, "
                     "not in --checkpoint-dir %s: they are left alone", len(c.periodic),
                     c.periodic_dir or "a folder it does not name", cfg.checkpoint_dir)
        c.periodic, c.periodic_dir = [], folder
    name = own_or_free_name(cfg.checkpoint_dir, f"epoch_{epoch + 1:04d}", c.periodic)
    written = [n for n in c.periodic if n != name] + [name]
    keep = cfg.keep_last or len(written)
    c.periodic = written[-keep:]
    return name, written[:-keep]


def write_periodic_copy(run, full: dict, copy: Optional[tuple[str, list]]) -> None:
    """Write what ``next_periodic_copy`` planned: the copy, then delete the copies it drops."""
    if copy is not None:
        name, dropped = copy
        checkpoint.save(full, os.path.join(run.cfg.checkpoint_dir, name))
        for old in dropped:  # copies this run wrote in this folder (next_periodic_copy)
            with contextlib.suppress(FileNotFoundError):
                os.remove(os.path.join(run.cfg.checkpoint_dir, old))


def own_or_free_name(folder: str, stem: str, own: list) -> str:
    """``stem.pth``, unless a file of that name is there that this run did not write (not in ``own``):
    then the first of ``stem-1.pth``, ``stem-2.pth``, ... that is free or this run's, with a warning."""
    name, n = f"{stem}.pth", 0
    while name not in own and os.path.lexists(os.path.join(folder, name)):
        n += 1
        name = f"{stem}-{n}.pth"
    if n:
        log.info("Warning: %s was not written by this run: it is kept, and this periodic copy is %s",
                 os.path.join(folder, f"{stem}.pth"), name)
    return name
