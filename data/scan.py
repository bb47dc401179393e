"""Checking every sample of a split before training, so a bad file fails (or is skipped) at start-up.

    report = scan_samples(index.train, num_workers=4)
    for bad in report.bad:
        log.warning("%s", bad.reason)        # one line each, naming the file
    if report.empty_fraction > 0.5:
        log.warning("most masks are empty: are they 0/1 masks?")
    train = report.good

Each sample is read exactly as ``SegDataset`` reads it (``load_image``, ``load_mask``): a full decode,
since a header says nothing about a corrupt or truncated body. A sample is bad when its image or its
mask cannot be read, or when it has no mask (``find_dataset(..., allow_missing_masks=True)`` lets
such images through to be reported here). The caller decides whether bad samples stop the run or
are skipped. Masks that come out empty (or nearly: less than ``EMPTY_FRACTION`` of their pixels) are
counted, because a split of mostly empty masks usually means a mask format the reader misjudged.

Decoding runs on ``num_workers`` threads: OpenCV releases the GIL while it decodes (a pure-Python
thread kept running at 60 % of its idle rate beside a decoding one), and threads need no pickling
or forking (safe after CUDA is initialised). Measured on generated COD10K-sized samples (1024x768
JPEG, quality 90, ~330 KB, plus a PNG mask): 7 ms of CPU per sample, i.e. about 140 samples/s per
free core, about 70 CPU-seconds for 10k images. On the 2 shared cores it was measured on (load
average 5-6, so this process got half a core) that was 62-76 samples/s with 0-4 threads, and 42-51/s
with a process pool of 2-4 (which also pays for pickling).
"""

from __future__ import annotations

import logging
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Sequence

from core.errors import UserError

from .discovery import Sample
from .images import load_image, load_mask

log = logging.getLogger(__name__)

EMPTY_FRACTION = 0.001  # a mask with less foreground than this (0.1 % of its pixels) counts as empty


@dataclass
class BadSample:
    sample: Sample
    path: str    # the file at fault (the image, or the mask)
    reason: str  # one line that names the file and says what is wrong


@dataclass
class ScanReport:
    good: list[Sample] = field(default_factory=list)  # input order kept
    bad: list[BadSample] = field(default_factory=list)
    empty: list[Sample] = field(default_factory=list)  # good samples whose mask is (nearly) empty
    seconds: float = 0.0

    @property
    def empty_fraction(self) -> float:
        """Fraction of the good samples whose mask is empty or nearly so (0.0 when there are none)."""
        return len(self.empty) / len(self.good) if self.good else 0.0

    def summary(self) -> str:
        n = len(self.good) + len(self.bad)
        rate = n / self.seconds if self.seconds > 0 else float("inf")
        return (f"checked {n} samples in {self.seconds:.1f} s ({rate:.0f}/s): {len(self.bad)} bad, "
                f"{len(self.empty)} of {len(self.good)} good masks empty")


def _one_line(e: Exception) -> str:
    return " ".join(str(e).split())


def check_sample(sample: Sample) -> tuple[BadSample | None, float]:
    """Read one sample as training would: (None, foreground fraction) or (BadSample, 0.0)."""
    try:
        load_image(sample.image)
    except UserError as e:
        return BadSample(sample, sample.image, _one_line(e)), 0.0
    except Exception as e:  # noqa: BLE001 - any file that breaks the reader is a bad file
        return BadSample(sample, sample.image, f"cannot read image {sample.image}: {type(e).__name__}: "
                                               f"{_one_line(e)}"), 0.0
    if not sample.mask:
        return BadSample(sample, sample.image, f"image {sample.image} has no mask of the same name"), 0.0
    try:
        mask = load_mask(sample.mask)
    except UserError as e:
        return BadSample(sample, sample.mask, _one_line(e)), 0.0
    except Exception as e:  # noqa: BLE001
        return BadSample(sample, sample.mask, f"cannot read mask {sample.mask}: {type(e).__name__}: "
                                              f"{_one_line(e)}"), 0.0
    return None, float(mask.mean()) if mask.size else 0.0


def scan_samples(samples: Sequence[Sample], num_workers: int = 0, name: str = "") -> ScanReport:
    """Read every sample (image and mask, fully decoded) and sort them into good and bad; see the module
    docstring. ``num_workers`` > 0 decodes on that many threads; 0 reads in the calling thread.
    ``name`` (e.g. the split) starts the summary line logged at the end."""
    if num_workers < 0:
        raise ValueError(f"num_workers must be >= 0 (got {num_workers})")
    samples = list(samples)
    start = time.perf_counter()
    if num_workers == 0 or len(samples) < 2:
        results = [check_sample(s) for s in samples]
    else:
        with ThreadPoolExecutor(max_workers=num_workers, thread_name_prefix="scan") as pool:
            results = list(pool.map(check_sample, samples))
    report = ScanReport()
    for s, (bad, fg) in zip(samples, results):
        if bad is not None:
            report.bad.append(bad)
        else:
            report.good.append(s)
            if fg < EMPTY_FRACTION:
                report.empty.append(s)
    report.seconds = time.perf_counter() - start
    log.info("%s%s", f"{name}: " if name else "", report.summary())
    return report
