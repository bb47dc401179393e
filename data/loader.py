"""``build_loader``: a DataLoader whose order *and* augmentation follow from one seed.

One ``torch.Generator`` seeded with ``seed`` drives everything. Every ``iter(loader)`` draws, in this
order and whatever ``num_workers`` is:
- a pass seed, given to the dataset (``reseed``) before any worker starts: ``SegDataset`` augments
  item ``i`` with ``mix_seeds(pass_seed, i)``, whichever process reads it;
- PyTorch's ``base_seed`` (worker ``k`` gets ``base_seed + k``; ``worker_init_fn`` seeds numpy and
  ``random`` from it, which the augmentation does not use);
- the shuffle order (the sampler draws from it).

So two loaders built with the same seed yield identical batches, epoch after epoch, for any
``num_workers`` (0, 1, 2 are compared in tests/test_data.py); torch's global RNG is never used.
``set_epoch(e)`` re-seeds the generator from ``(seed, e)``, making epoch ``e`` a function of the
epoch number alone (what a resumed run needs); without it epochs simply follow one another from the
initial seed.
"""

from __future__ import annotations

import atexit
import multiprocessing
import os
import random
import signal
from typing import Optional

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset, Sampler

from core.errors import UserError


def usable_workers(num_workers: int) -> int:
    """``--num-workers``, at most the CPUs: more workers (or reading threads) than cores only adds
    overhead."""
    return min(int(num_workers), os.cpu_count() or 1)


def mix_seeds(*values: int) -> int:
    """A well-mixed 64-bit seed from a few integers (numpy's SeedSequence)."""
    return int(np.random.SeedSequence([int(v) % 2**64 for v in values]).generate_state(1, np.uint64)[0])


def reseed_dataset(dataset: Dataset, seed: int) -> None:
    """Reseed the augmentation of ``dataset`` (or of the datasets inside a Subset / ConcatDataset)."""
    if hasattr(dataset, "reseed"):
        dataset.reseed(seed)
    elif hasattr(dataset, "datasets"):  # ConcatDataset
        for k, d in enumerate(dataset.datasets):
            reseed_dataset(d, mix_seeds(seed, k))
    elif hasattr(dataset, "dataset"):  # Subset
        reseed_dataset(dataset.dataset, seed)


def _kill_workers_at_exit() -> None:
    """Workers ignore SIGTERM (see ``seed_worker``), and at interpreter exit ``multiprocessing``
    terminates its daemonic children with SIGTERM and then waits for them: a run that dies with a
    loader still alive (an exception inside the loop, CUDA out of memory) would hang there. This
    runs first (atexit is last-in, first-out) and kills any worker left, so the process exits."""
    children = [c for c in multiprocessing.active_children() if c.daemon]
    if children:
        signal.signal(signal.SIGCHLD, signal.SIG_DFL)  # torch's handler would report them as failures
        for child in children:
            child.kill()


atexit.register(_kill_workers_at_exit)


def seed_worker(worker_id: int) -> None:
    """worker_init_fn: ignore SIGINT/SIGTERM, and seed numpy and random from the worker's torch seed
    (the dataset's augmentation seed came with the dataset, set before the workers started).

    ``timeout``, Ctrl-C in a terminal, ``docker stop`` and a notebook's stop signal the whole process
    group. The main process handles the signal (it finishes the optimizer step, which may need more
    batches, and saves); a worker killed by it would crash the main process instead. Workers still
    exit when the main process shuts the loader down, or dies."""
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, signal.SIG_IGN)
    seed = torch.initial_seed()  # base_seed + worker_id, base_seed drawn from the loader's generator
    np.random.seed(seed % 2**32)
    random.seed(seed)


class SeededDataLoader(DataLoader):
    """A DataLoader with a private seeded generator; see the module docstring."""

    def __init__(self, *args, seed: int, **kwargs):
        super().__init__(*args, **kwargs)
        self.seed = int(seed)

    def set_epoch(self, epoch: int) -> None:
        """Make the next pass's order and augmentation a function of ``(seed, epoch)`` only."""
        self.generator.manual_seed(mix_seeds(self.seed, epoch))
        if hasattr(self.sampler, "set_epoch"):
            self.sampler.set_epoch(epoch)

    def __iter__(self):
        # Before super().__iter__() starts the workers, which take a copy of the dataset with this seed.
        reseed_dataset(self.dataset, int(torch.randint(0, 2**62, (), generator=self.generator).item()))
        return _raising_item_errors(super().__iter__())


def _raising_item_errors(batches):
    """Yield the batches; raise an item's ``error`` (a dataset's one-line UserError message) here, in
    the main process, after stopping the workers (a worker's own exception would come with its
    traceback, and workers still running at exit, which ignore SIGTERM, would hang it)."""
    try:
        for batch in batches:
            errors = batch.get("error") if isinstance(batch, dict) else None
            first = next((e for e in errors or () if e), None)
            if first:
                raise UserError(first)
            yield batch
    finally:
        shutdown = getattr(batches, "_shutdown_workers", None)  # torch's multi-process iterator
        if shutdown is not None:
            shutdown()


class ShardSampler(Sampler):
    """Indices ``rank, rank + world, ...`` in order: each process of a DDP run scores its own images
    and every image exactly once (``DistributedSampler`` pads with repeats instead)."""

    def __init__(self, size: int, rank: int, world_size: int):
        self.indices = list(range(rank, size, world_size))

    def __iter__(self):
        return iter(self.indices)

    def __len__(self) -> int:
        return len(self.indices)


def build_loader(dataset: Dataset, batch_size: int, shuffle: bool, num_workers: int, seed: int,
                 drop_last: bool = False, sampler: Optional[Sampler] = None) -> SeededDataLoader:
    """A reproducible DataLoader: the same ``seed`` gives the same batches, for any ``num_workers``.
    A ``sampler`` (DDP: ``DistributedSampler`` or ``ShardSampler``) replaces ``shuffle``; its
    ``set_epoch`` is called with the loader's.

    ``persistent_workers`` stays False: workers that outlived a pass would keep the old pass seed."""
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1 (got {batch_size})")
    if num_workers < 0:
        raise ValueError(f"num_workers must be >= 0 (got {num_workers})")
    generator = torch.Generator()
    generator.manual_seed(int(seed))
    return SeededDataLoader(
        dataset,
        batch_size=batch_size,
        shuffle=shuffle and sampler is None,
        sampler=sampler,
        num_workers=num_workers,
        drop_last=drop_last,
        pin_memory=torch.cuda.is_available(),
        worker_init_fn=seed_worker,
        generator=generator,
        persistent_workers=False,  # fresh workers each pass, with that pass's dataset seed
        seed=seed,
    )
