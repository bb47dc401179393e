"""train's ``--cache``: every sample read and resized once, kept as .npy arrays that all processes map.

    cache = build_cache(samples, img_size, cache_dir, num_workers)   # built once, then reused
    train_cache, val_cache = build_caches([train, val], ...)         # one free-space check for both
    ds = SegDataset(samples, img_size, train=True, aug=aug, cache=cache)

What is stored is what ``SegDataset`` computes before augmenting, ``read_resized``'s output, so items
are bit-identical with and without the cache (the augmentation seeds do not depend on it):

    images.npy  N x S x S x 3 uint8 (RGB)     masks.npy  N x S x S uint8 {0, 1}
    sizes.npy   N x 2 int64, [H, W] of each image file (``orig_size``)
    cache.json  what was built: format version, size, count, bytes, seconds

The folder is ``<cache_dir>/<key>``, the key a hash of the format version, OpenCV's version (its
resize decides the pixels), the size and each sample's image and mask path, file size,
modification time, inode and status-change time (``st_ctime_ns``), in order: changing a file, the
list of samples or ``img_size`` gives a new folder (old ones stay until deleted by hand). The
ctime is what notices a file replaced by one of the same size with its old mtime kept (``cp -p``,
``rsync -a``, ``touch -r``, unpacking an archive): writing a file or setting its times sets the
ctime to now, and nothing but the system clock sets it back. File contents are not hashed: that
would read every file again each time a loader opens the cache. It is written on ``num_workers``
threads, as ``data/scan.py`` reads (OpenCV releases the GIL while it decodes and resizes), into a temporary
sibling folder that is renamed into place when complete: an interrupted build leaves no half cache.
Before a folder is reused, each array's shape and dtype are checked against its file: a folder
damaged since (a truncated or missing ``.npy``) is deleted and built again, with one log line.

``ArrayCache`` opens the arrays with ``np.load(mmap_mode="r")`` on first use, in each process:
DataLoader workers share the operating system's page cache, and pickling the dataset for a worker
carries the folder name only.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from typing import Sequence

import cv2
import numpy as np
from numpy.lib.format import open_memmap

from core.errors import UserError

from .dataset import read_resized
from .discovery import CACHE_ROOT, Sample

log = logging.getLogger(__name__)

CACHE_VERSION = 1  # raise it when read_resized changes what it returns
DEFAULT_CACHE_DIR = os.path.join(CACHE_ROOT, "arrays")
ARRAYS = ("images", "masks", "sizes")
_META = "cache.json"
_HEADER = 128  # bytes of a .npy header


class ArrayCache:
    """The arrays of one cache folder, opened read-only and memory-mapped on first use in each process."""

    def __init__(self, folder: str, img_size: int, count: int):
        self.folder = folder
        self.img_size = int(img_size)
        self.count = int(count)
        self._arrays: tuple | None = None

    def __len__(self) -> int:
        return self.count

    def __getstate__(self) -> dict:
        """What a DataLoader worker receives: the folder, not the mapped arrays."""
        return {**self.__dict__, "_arrays": None}

    def _open(self) -> tuple:
        self._arrays = tuple(np.load(os.path.join(self.folder, f"{name}.npy"), mmap_mode="r") for name in ARRAYS)
        return self._arrays

    def item(self, i: int) -> tuple[np.ndarray, np.ndarray, tuple[int, int]]:
        """``read_resized``'s output for sample ``i``: copies of its image and mask, and its (H, W)."""
        images, masks, sizes = self._arrays or self._open()
        return np.array(images[i]), np.array(masks[i]), (int(sizes[i, 0]), int(sizes[i, 1]))


def cache_bytes(count: int, img_size: int) -> int:
    """Size on disk of the arrays of ``count`` samples at ``img_size``."""
    return count * (img_size * img_size * 4 + 16) + len(ARRAYS) * _HEADER


def cache_key(samples: Sequence[Sample], img_size: int) -> str:
    """The folder name: a hash of the format, the size and every file's path, size, mtime, inode and
    ctime, in order."""
    h = hashlib.sha256(json.dumps([CACHE_VERSION, cv2.__version__, int(img_size)]).encode())
    for s in samples:
        h.update(json.dumps([_file_id(s.image), _file_id(s.mask)]).encode())
    return h.hexdigest()[:24]


def _file_id(path: str | None) -> list:
    if not path:
        return ["", 0, 0, 0, 0]
    path = os.path.abspath(path)
    try:
        st = os.stat(path)
    except OSError:  # reading it fails later, with the reader's one-line message
        return [path, -1, -1, -1, -1]
    return [path, st.st_size, st.st_mtime_ns, st.st_ino, st.st_ctime_ns]


def _mib(n: int) -> str:
    mib = n / 2**20
    return f"{mib:,.1f} MiB" if mib < 10 else f"{mib:,.0f} MiB"


def _read_meta(folder: str) -> dict | None:
    try:
        with open(os.path.join(folder, _META)) as f:
            return json.load(f)
    except (OSError, ValueError):
        return None


def _is_complete(folder: str, count: int, img_size: int) -> bool:
    return _damage(folder, count, img_size) is None


def _damage(folder: str, count: int, img_size: int) -> str | None:
    """None when ``folder`` holds the whole cache of ``count`` samples at ``img_size``, else what is
    missing or wrong: cache.json, or an array whose file does not hold its shape and dtype."""
    meta = _read_meta(folder)
    if not meta or (meta.get("version"), meta.get("count"), meta.get("img_size")) != (CACHE_VERSION, count, img_size):
        return f"{_META} missing or of another cache"
    s = img_size
    for name, shape, dtype in (("images", (count, s, s, 3), np.uint8), ("masks", (count, s, s), np.uint8),
                               ("sizes", (count, 2), np.int64)):
        try:
            array = np.load(os.path.join(folder, f"{name}.npy"), mmap_mode="r")
        except (OSError, ValueError, EOFError) as e:  # missing, truncated ("mmap length is greater..."), no header
            return f"{name}.npy: {getattr(e, 'strerror', None) or e}"
        if array.shape != shape or array.dtype != dtype:
            return f"{name}.npy holds {array.dtype} {array.shape}, not {np.dtype(dtype)} {shape}"
    return None


def _root(cache_dir: str | None) -> str:
    return os.path.abspath(os.path.expanduser(cache_dir or DEFAULT_CACHE_DIR))


def _make_root(root: str) -> None:
    try:
        os.makedirs(root, exist_ok=True)
    except OSError as e:
        raise UserError(f"--cache-dir {root}: cannot create it ({e.strerror or e}); pass a folder you can "
                        "write to, or leave out --cache") from None


def check_free_space(folder: str, need: int) -> None:
    """A one-line ``UserError`` unless ``need`` bytes fit on the disk of ``folder``."""
    free = shutil.disk_usage(folder).free
    if need > free:
        raise UserError(f"--cache: the arrays need {_mib(need)} but only {_mib(free)} is free in {folder}; "
                        "pass --cache-dir on a disk with more room, or leave out --cache")


def build_caches(splits: Sequence[Sequence[Sample]], img_size: int, cache_dir: str | None = None,
                 num_workers: int = 0) -> list[ArrayCache]:
    """``build_cache`` for each split, after one free-space check for all those not built yet."""
    splits = [list(s) for s in splits]
    root = _root(cache_dir)
    todo = [s for s in splits if s and not _is_complete(os.path.join(root, cache_key(s, img_size)), len(s), img_size)]
    if todo:
        _make_root(root)
        check_free_space(root, sum(cache_bytes(len(s), img_size) for s in todo))
    return [build_cache(s, img_size, root, num_workers) for s in splits]


def build_cache(samples: Sequence[Sample], img_size: int, cache_dir: str | None = None,
                num_workers: int = 0) -> ArrayCache:
    """The ``ArrayCache`` of ``samples`` at ``img_size`` under ``cache_dir`` (default
    ``~/.cache/cod_ultimate/arrays``): reused if this exact one was built before, else built now. An
    unreadable file stops the build with its reader's one-line ``UserError``."""
    samples = list(samples)
    if not samples or num_workers < 0:
        raise ValueError(f"build_cache needs samples and num_workers >= 0 (got {len(samples)}, {num_workers})")
    root = _root(cache_dir)
    folder = os.path.join(root, cache_key(samples, img_size))
    damage = _damage(folder, len(samples), img_size)
    if damage is None:
        log.info("Cache: reused %s (%d images of %d px, %s)", folder, len(samples), img_size,
                 _mib(_read_meta(folder)["bytes"]))
        return ArrayCache(folder, img_size, len(samples))
    if os.path.isdir(folder):  # a complete folder is renamed into place: this one was damaged since
        log.warning("Cache: %s is damaged (%s); rebuilding it", folder, damage)
        shutil.rmtree(folder, ignore_errors=True)
    _make_root(root)
    need = cache_bytes(len(samples), img_size)
    check_free_space(root, need)
    start = time.perf_counter()
    tmp = None
    try:
        tmp = tempfile.mkdtemp(prefix=f".{os.path.basename(folder)}.tmp-", dir=root)
        _write_arrays(tmp, samples, img_size, num_workers)
        seconds = time.perf_counter() - start
        size = sum(os.path.getsize(os.path.join(tmp, f"{name}.npy")) for name in ARRAYS)
        with open(os.path.join(tmp, _META), "w") as f:
            json.dump({"version": CACHE_VERSION, "img_size": img_size, "count": len(samples), "bytes": size,
                       "seconds": round(seconds, 3), "first_image": os.path.abspath(samples[0].image)}, f)
        try:
            os.rename(tmp, folder)
        except OSError:
            if not _is_complete(folder, len(samples), img_size):
                raise
            log.info("Cache: %s was built by another process meanwhile; using it", folder)
    except OSError as e:
        raise UserError(f"--cache: cannot write the arrays to {root} ({e.strerror or e}); free some space or "
                        "pass --cache-dir elsewhere, or leave out --cache") from None
    finally:
        if tmp is not None:
            shutil.rmtree(tmp, ignore_errors=True)
    log.info("Cache: built %s in %.1f s, %s (%d images of %d px)", folder, seconds, _mib(size),
             len(samples), img_size)
    return ArrayCache(folder, img_size, len(samples))


def _write_arrays(folder: str, samples: list[Sample], img_size: int, num_workers: int) -> None:
    """images.npy and masks.npy filled in place (never whole in memory), then sizes.npy."""
    n, s = len(samples), img_size
    images = open_memmap(os.path.join(folder, "images.npy"), mode="w+", dtype=np.uint8, shape=(n, s, s, 3))
    masks = open_memmap(os.path.join(folder, "masks.npy"), mode="w+", dtype=np.uint8, shape=(n, s, s))
    sizes = np.zeros((n, 2), np.int64)

    def one(i: int) -> None:
        images[i], masks[i], sizes[i] = read_resized(samples[i], img_size)

    if num_workers == 0 or n < 2:
        for i in range(n):
            one(i)
    else:
        with ThreadPoolExecutor(max_workers=num_workers, thread_name_prefix="cache") as pool:
            try:
                list(pool.map(one, range(n)))
            except BaseException:  # a bad file, Ctrl-C: stop at once instead of reading the rest
                pool.shutdown(cancel_futures=True)
                raise
    images.flush()
    masks.flush()
    np.save(os.path.join(folder, "sizes.npy"), sizes)
