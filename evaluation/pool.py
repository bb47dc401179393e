"""Scoring in worker processes: the PySODMetrics work of ``Scorer`` done beside the model, not after it.

    with MetricPool(workers=3) as pool:       # processes start on first use; ended here (and at exit)
        scorer = pool.scorer(threshold=0.5)   # one per validation pass or test set (0 workers: a Scorer)
        scorer.add(probs, mask_paths)         # copied to the host, queued in chunks of CHUNK images
        scorer.results(rt)                    # waits for the chunks: the in-process numbers, exactly

A worker scores a chunk with a fresh ``SegMetrics``, reading the masks itself (``data.load_mask``),
and sends back ``SegMetrics.state()``; the main process merges the chunks with ``SegMetrics.extend``
(the mechanism DDP validation uses) in the order the images were added. So every per-image value,
and every mean, is the one ``Scorer`` computes in the main process.

The workers are started once per pool (a run, an ``evaluate``) and serve every scorer after that,
one at a time. They come from a 'forkserver' (never forked from a process that may hold CUDA and
thread pools), with SIGINT and SIGTERM blocked from the start and then ignored: a signal to the
process group (Ctrl-C, ``timeout``, Kaggle's stop) reaches only the main process, which stops
cleanly. ``close()`` lets idle workers exit and kills them when chunks are still pending (a
validation cut short by a signal does not wait for its images); a worker whose main process is gone
(killed, say) exits by itself at once, even in the middle of reading a chunk.
"""

from __future__ import annotations

import atexit
import logging
import multiprocessing
import os
import queue
import signal
import threading
import traceback
from typing import Optional, Sequence

import numpy as np
import torch

import data as cod_data
from core.errors import UserError
from evaluation.metrics import DEFAULT_THRESHOLD, SegMetrics
from evaluation.scorer import Scorer

log = logging.getLogger(__name__)

CHUNK = 2               # images per task: a batch is spread over the workers, one chunk is a short wait
QUEUED_PER_WORKER = 8   # chunks sent and not yet answered, per worker, before ``add`` waits (host memory)
SIGNALS = {signal.SIGINT, signal.SIGTERM}
_running: set = set()   # pools with live workers, closed at exit


def default_metric_workers(num_workers: int) -> int:
    """``--metric-workers`` when not given: ``--num-workers``, at most the CPUs per local process - 1.

    Validation runs while the training loader's workers are stopped (they are not persistent), so the
    CPUs given to data loading are free to score; one CPU stays with the main process, which drives
    the model and the validation loader. ``--num-workers 0`` keeps the scoring in the main process
    too. The CPUs are those this process may run on, shared by the processes of a torchrun node
    (``LOCAL_WORLD_SIZE``)."""
    try:
        cpus = len(os.sched_getaffinity(0))
    except AttributeError:  # not on Linux
        cpus = os.cpu_count() or 1
    per_process = cpus // max(1, int(os.environ.get("LOCAL_WORLD_SIZE", "1")))
    return max(0, min(int(num_workers), per_process - 1))


def _score_chunk(task_id, threshold: float, probs: list, paths: list) -> tuple:
    """``(task_id, SegMetrics.state(), None)``, or ``(task_id, None, (kind, text))`` for an error:
    'user' with a ``UserError``'s one-line message (an unreadable mask), 'bug' with a traceback."""
    try:
        metrics = SegMetrics(threshold=threshold)
        for prob, path in zip(probs, paths):
            metrics.step(prob, cod_data.load_mask(path))
        return task_id, metrics.state(), None
    except UserError as e:
        return task_id, None, ("user", str(e))
    except Exception:
        return task_id, None, ("bug", traceback.format_exc())


def _work(tasks, results, main_alive) -> None:
    """A worker: score chunks until a ``None``, or until the main process is gone: ``main_alive`` is
    the read end of a pipe only it holds open, at EOF then. (The forkserver, the workers' parent,
    does not end with it: the workers keep it alive.) Signals arrive blocked (see
    ``MetricPool.start``); ignored from here."""
    for sig in SIGNALS:
        signal.signal(sig, signal.SIG_IGN)
    signal.pthread_sigmask(signal.SIG_UNBLOCK, SIGNALS)
    results.cancel_join_thread()  # exit even when nobody reads the answers any more
    # and exit at once when the main process is gone, whatever this thread is doing: a main process
    # killed while it was writing a chunk leaves half a message in the task pipe, and reading the rest
    # would wait forever (this worker holds a write end of that pipe too)
    threading.Thread(target=_exit_when_gone, args=(main_alive,), daemon=True).start()
    while True:
        try:
            task = tasks.get(timeout=1.0)
        except queue.Empty:
            if main_alive.poll():  # nothing is ever written: readable means EOF
                return
            continue
        if task is None:
            return
        results.put(_score_chunk(*task))


def _exit_when_gone(main_alive) -> None:
    main_alive.poll(None)  # nothing is ever written: this returns at EOF
    os._exit(0)


def _host_copy(prob) -> np.ndarray:
    """One map as a numpy copy on the host; a tensor as ``SegMetrics`` reads it (floats as float32)."""
    if torch.is_tensor(prob):
        prob = prob.detach().cpu()
        prob = (prob.float() if prob.is_floating_point() else prob).numpy()
    return np.array(prob)


def _raise(error: tuple) -> None:
    kind, text = error
    if kind == "user":
        raise UserError(text)
    raise RuntimeError(f"a metric worker failed (--metric-workers 0 scores in the main process):\n{text}")


class MetricPool:
    """``workers`` processes that score for the scorers ``scorer()`` hands out (0: no process,
    ``scorer()`` gives an in-process ``Scorer``)."""

    def __init__(self, workers: int):
        self.workers = int(workers)
        if self.workers < 0:
            raise ValueError(f"workers must be >= 0 (got {workers})")
        self._procs: list = []
        self._tasks = self._results = self._alive = None
        self._round = 0          # the scorer being served; answers to earlier ones are dropped
        self._sent = 0
        self._inflight: set = set()   # task ids sent and not yet answered
        self._answers: dict = {}      # task id -> (state, error), answered and not yet taken

    def __enter__(self) -> "MetricPool":
        return self

    def __exit__(self, *exc) -> bool:
        self.close()
        return False

    @property
    def pids(self) -> list[int]:
        return [p.pid for p in self._procs]

    def scorer(self, threshold: float = DEFAULT_THRESHOLD) -> Scorer:
        """A scorer for one pass; it replaces the previous one (whose pending chunks are dropped)."""
        if not self.workers:
            return Scorer(threshold=threshold)
        self._round += 1
        self._answers.clear()
        return PoolScorer(self, threshold, self._round)

    def start(self) -> None:
        """Start the workers now (else the first chunk does); nothing when they run or with 0 workers."""
        if self._procs or not self.workers:
            return
        ctx = multiprocessing.get_context("forkserver")
        # the forkserver imports this module (torch, cv2, PySODMetrics) once, when it can, and every
        # worker forks from it
        ctx.set_forkserver_preload([__name__])
        # the queues start multiprocessing's resource tracker, which unblocks SIGINT/SIGTERM once it is
        # up: so before the block, which the forkserver and the workers inherit (a forkserver started
        # earlier by other code does not)
        self._tasks, self._results = ctx.Queue(), ctx.Queue()
        main_alive, self._alive = ctx.Pipe(duplex=False)  # this process keeps the write end, the workers the other
        blocked = signal.pthread_sigmask(signal.SIG_BLOCK, SIGNALS)
        try:
            for k in range(self.workers):
                p = ctx.Process(target=_work, args=(self._tasks, self._results, main_alive), daemon=True,
                                name=f"metric-worker-{k}")
                p.start()
                self._procs.append(p)
        finally:
            signal.pthread_sigmask(signal.SIG_SETMASK, blocked)
            main_alive.close()  # the workers have their own copies
        self._tasks.cancel_join_thread()  # exit does not wait to send chunks nobody will score
        _running.add(self)
        log.info("Metrics: scored in %d worker process%s (--metric-workers)", self.workers,
                 "es" if self.workers > 1 else "")

    def submit(self, round_: int, threshold: float, probs: list, paths: list) -> tuple:
        """Queue one chunk for scorer ``round_``; returns its task id. Waits while too many are pending."""
        self.start()
        while len(self._inflight) >= QUEUED_PER_WORKER * self.workers:
            self._receive(timeout=1.0)
        task_id = (round_, self._sent)
        self._sent += 1
        self._inflight.add(task_id)
        self._tasks.put((task_id, threshold, probs, paths))
        return task_id

    def answered(self, task_id: tuple) -> bool:
        """Whether ``task_id``'s answer is here (takes what has arrived, without waiting)."""
        while task_id not in self._answers and self._receive(timeout=0):
            pass
        return task_id in self._answers

    def answer(self, task_id: tuple) -> tuple:
        """``(state, error)`` of ``task_id``, waiting for it."""
        if task_id[0] != self._round:
            raise RuntimeError("a MetricPool serves one scorer at a time; this one was replaced")
        while task_id not in self._answers:
            self._receive(timeout=1.0)
        return self._answers.pop(task_id)

    def _receive(self, timeout: float) -> bool:
        """Take one answer off the queue; False if none came within ``timeout`` (the workers are
        checked then: one that died ends the pool with a one-line error)."""
        try:
            task_id, state, error = self._results.get(timeout=timeout)
        except queue.Empty:
            self._check_alive()
            return False
        self._inflight.discard(task_id)
        if task_id[0] == self._round:
            self._answers[task_id] = (state, error)
        return True

    def _check_alive(self) -> None:
        dead = [p for p in self._procs if p.exitcode is not None]
        if dead:
            code = dead[0].exitcode
            self.close()
            raise UserError(f"a metric worker process ended (exit code {code}"
                            f"{', killed: out of memory?' if code < 0 else ''}): score in the main process "
                            "with --metric-workers 0")

    def close(self) -> None:
        """End the workers: idle ones exit, and all are killed when chunks are still pending."""
        procs, self._procs = self._procs, []
        _running.discard(self)
        if not procs:
            return
        if self._inflight:
            for p in procs:
                p.kill()
        else:
            for _ in procs:
                self._tasks.put(None)
        for p in procs:
            p.join(timeout=5.0)
            if p.exitcode is None:
                p.kill()
                p.join()
        self._tasks.close()
        self._results.close()
        self._alive.close()
        self._tasks = self._results = self._alive = None
        self._inflight.clear()
        self._answers.clear()


@atexit.register
def _close_pools_at_exit() -> None:
    """Pools left open (an exception in the loop): end their workers before ``multiprocessing``'s own
    exit handler, which would SIGTERM them (ignored) and wait; ``data.loader``'s hook runs after this."""
    for pool in list(_running):
        pool.close()


class PoolScorer(Scorer):
    """``Scorer`` whose images are scored by a ``MetricPool``'s workers (get one from
    ``MetricPool.scorer``). ``len()`` counts the images added, scored or not yet."""

    def __init__(self, pool: MetricPool, threshold: float, round_: int):
        super().__init__(threshold)
        self.pool, self._round = pool, round_
        self._probs, self._paths = [], []   # the chunk being filled
        self._pending: list = []            # task ids, in the order their images were added
        self._added = 0

    def __len__(self) -> int:
        return self._added

    def add(self, probs, mask_paths: Sequence[str]) -> None:
        """Copy the probability maps to the host (a B x 1 x S x S tensor as float32, or S x S maps)
        and queue them with their masks' paths; an error of a chunk already scored is raised here."""
        if torch.is_tensor(probs):
            probs = probs.detach().float().cpu()
        for prob, path in zip(probs, mask_paths):
            self._probs.append(_host_copy(prob))
            self._paths.append(str(path))
            self._added += 1
            if len(self._probs) == CHUNK:
                self._submit()
        self._merge(wait=False)

    def _submit(self) -> None:
        if self._probs:
            self._pending.append(self.pool.submit(self._round, self.threshold, self._probs, self._paths))
            self._probs, self._paths = [], []

    def _merge(self, wait: bool) -> None:
        """Merge the answered chunks at the head of the queue (all of them with ``wait``), in order."""
        while self._pending and (wait or self.pool.answered(self._pending[0])):
            state, error = self.pool.answer(self._pending.pop(0))
            if error:
                _raise(error)
            self.metrics.extend(state)

    def results(self, rt=None) -> Optional[dict]:
        """Wait for every chunk, then as ``Scorer.results``."""
        self._submit()
        self._merge(wait=True)
        return super().results(rt)
