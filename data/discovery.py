"""Finding the image/mask pairs of a dataset folder, and the seeded train/validation split.

Accepted layouts (folder names are matched case-insensitively):

* COD10K-v3: ``ROOT/Train/Image/*.jpg`` + ``ROOT/Train/GT_Object/*.png`` and ``ROOT/Test/{Image,GT_Object}``
  (test set ``COD10K``); ``ROOT`` may also be the folder that contains ``COD10K-v3/``.
* SINet: ``ROOT/TrainDataset/{Imgs,GT}`` and ``ROOT/TestDataset/<name>/{Imgs,GT}`` (one test set per
  sub-folder).
* ``demo``: generated procedural camouflage in the SINet structure (see ``data/demo.py``).

Images and masks are paired by file stem. COD10K's NonCAM images (``-NonCAM-`` in the name) have
empty masks and are dropped unless ``include_noncam``. The test sets stay separate from the
validation split, which ``split_train_val`` takes from the training images only.
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass, field
from typing import NamedTuple, Sequence

import numpy as np

from core.errors import UserError

from .images import IMAGE_EXTS, MASK_EXTS

log = logging.getLogger(__name__)

# Accepted sub-folder names, lower case, in order of preference.
_COD_TRAIN, _COD_TEST = ("train",), ("test",)
_COD_IMAGES = ("image", "images", "imgs", "img")
_COD_MASKS = ("gt_object", "gt", "gts", "mask", "masks")
_SINET_TRAIN, _SINET_TEST = ("traindataset",), ("testdataset",)
_SINET_IMAGES = ("imgs", "images", "image", "img")
_SINET_MASKS = ("gt", "gts", "gt_object", "masks", "mask")
_COD_PARENT = ("cod10k-v3", "cod10k")
DEMO_TEST_NAME = "demo"
DEFAULT_SEED = 42  # train's --seed: the validation split and the demo data follow from it
CACHE_ROOT = os.path.join("~", ".cache", "cod_ultimate")  # the demo data and --cache's arrays; ~ expanded at use
COD10K_TEST_NAME = "COD10K"


class Sample(NamedTuple):
    image: str
    mask: str | None
    name: str  # file stem


@dataclass
class DatasetIndex:
    root: str
    layout: str  # 'cod10k' | 'sinet' | 'demo'
    train: list[Sample]
    tests: dict[str, list[Sample]] = field(default_factory=dict)

    def summary(self) -> str:
        tests = ", ".join(f"{k}: {len(v)}" for k, v in self.tests.items()) or "none"
        return f"{self.layout} dataset at {self.root}: {len(self.train)} training pairs; test sets: {tests}"


def _subdir(parent: str, names: Sequence[str]) -> str | None:
    """The sub-folder of ``parent`` whose lower-cased name comes first in ``names``, or None."""
    try:
        entries = {e.name.lower(): e.path for e in os.scandir(parent) if e.is_dir()}
    except OSError:
        return None
    for n in names:
        if n in entries:
            return entries[n]
    return None


def _files(folder: str, exts: Sequence[str]) -> dict[str, str]:
    """stem -> path of the files in ``folder`` with one of ``exts`` (hidden files skipped)."""
    out: dict[str, str] = {}
    for e in sorted(os.scandir(folder), key=lambda e: e.name):
        stem, ext = os.path.splitext(e.name)
        if e.name.startswith(".") or ext.lower() not in exts or not e.is_file():
            continue
        if stem in out:
            raise UserError(f"two files named {stem!r} in {folder} ({os.path.basename(out[stem])}, {e.name}); "
                            "keep one per name")
        out[stem] = e.path
    return out


def _pairs(img_dir: str, mask_dir: str | None, include_noncam: bool,
           allow_missing_masks: bool = False) -> list[Sample]:
    images = _files(img_dir, IMAGE_EXTS)
    if not images:
        raise UserError(f"no images ({', '.join(IMAGE_EXTS)}) in {img_dir}; put the images there or fix --dataset-path")
    if mask_dir is None:
        raise UserError(f"no mask folder (GT) next to {img_dir}; add the ground-truth masks as "
                        f"{os.path.join(os.path.dirname(img_dir), 'GT')}")
    masks = _files(mask_dir, MASK_EXTS)
    missing = [s for s in images if s not in masks]
    if missing and not allow_missing_masks:
        shown = ", ".join(os.path.basename(images[s]) for s in missing[:5])
        more = f" and {len(missing) - 5} more" if len(missing) > 5 else ""
        raise UserError(f"{len(missing)} image(s) in {img_dir} have no mask of the same name in {mask_dir}: "
                        f"{shown}{more}; add the masks or remove those images")
    samples = [Sample(images[s], masks.get(s), s) for s in sorted(images)]
    if not include_noncam:
        kept = [s for s in samples if "-noncam-" not in s.name.lower()]
        if len(kept) < len(samples):
            log.info("dropped %d NonCAM images of %s (empty ground truth; --include-noncam keeps them)",
                     len(samples) - len(kept), img_dir)
        if not kept:
            raise UserError(f"all {len(samples)} images in {img_dir} are NonCAM (no object); "
                            "pass --include-noncam to use them")
        samples = kept
    return samples


def _cod10k(root: str, include_noncam: bool, require_train: bool = True,
            allow_missing_masks: bool = False) -> DatasetIndex | None:
    train = _subdir(root, _COD_TRAIN)
    img = train and _subdir(train, _COD_IMAGES)
    test = _subdir(root, _COD_TEST)
    test_img = test and _subdir(test, _COD_IMAGES)
    if not img and (require_train or not test_img):
        return None
    index = DatasetIndex(root, "cod10k",
                         _pairs(img, _subdir(train, _COD_MASKS), include_noncam, allow_missing_masks) if img else [])
    if test_img:
        index.tests[COD10K_TEST_NAME] = _pairs(test_img, _subdir(test, _COD_MASKS), include_noncam,
                                               allow_missing_masks)
    return index


def _sinet(root: str, include_noncam: bool, layout: str = "sinet", require_train: bool = True,
           allow_missing_masks: bool = False) -> DatasetIndex | None:
    train = _subdir(root, _SINET_TRAIN)
    img = train and _subdir(train, _SINET_IMAGES)
    test_root = _subdir(root, _SINET_TEST)
    if not img and (require_train or not test_root):
        return None
    index = DatasetIndex(root, layout,
                         _pairs(img, _subdir(train, _SINET_MASKS), include_noncam, allow_missing_masks) if img else [])
    if test_root:
        for entry in sorted(os.scandir(test_root), key=lambda e: e.name):
            test_img = entry.is_dir() and _subdir(entry.path, _SINET_IMAGES)
            if test_img:
                index.tests[entry.name] = _pairs(test_img, _subdir(entry.path, _SINET_MASKS), include_noncam,
                                                 allow_missing_masks)
    return index


def _layout_help(root: str) -> str:
    return (f"no dataset found in {root}; expected COD10K-v3 (Train/Image + Train/GT_Object, Test/...) "
            "or SINet (TrainDataset/Imgs + TrainDataset/GT, TestDataset/<name>/...), or --dataset-path demo")


def find_dataset(root: str, include_noncam: bool = False, cache_dir: str | None = None,
                 seed: int = 0, require_train: bool = True, allow_missing_masks: bool = False) -> DatasetIndex:
    """Index the image/mask pairs under ``root`` (or generate and index the demo data if ``root`` is 'demo').

    ``cache_dir`` and ``seed`` only matter for 'demo': the data is generated once into
    ``<cache_dir>/demo-<seed>-<size>`` (``cache_dir`` defaults to ``~/.cache/cod_ultimate``) and reused.
    ``require_train=False`` (evaluation) also accepts a root that holds only test sets (``Test/`` or
    ``TestDataset/``); its ``train`` list is then empty. An image without a mask of the same name is an
    error, unless ``allow_missing_masks``: it is then a ``Sample`` with ``mask=None``, for
    ``data.scan.scan_samples`` to report (``SegDataset`` would read it as an empty mask).
    """
    if str(root).strip().lower() == "demo":
        from .demo import DEMO_SIZE, make_demo_dataset

        parent = cache_dir or os.path.expanduser(CACHE_ROOT)
        demo_root = make_demo_dataset(os.path.join(parent, f"demo-{seed}-{DEMO_SIZE}"), size=DEMO_SIZE, seed=seed)
        index = _sinet(demo_root, include_noncam=True, layout="demo", allow_missing_masks=allow_missing_masks)
        assert index is not None and DEMO_TEST_NAME in index.tests, demo_root
        log.info(index.summary())
        return index

    root = os.path.abspath(os.path.expanduser(os.fspath(root)))
    if os.path.isfile(root):
        raise UserError(f"--dataset-path {root} is a file; pass the dataset folder (the one holding Train/ and "
                        "Test/, or TrainDataset/ and TestDataset/), unpacked if it is an archive, or demo")
    if not os.path.isdir(root):
        raise UserError(f"dataset folder {root} does not exist; fix --dataset-path (or use --dataset-path demo)")
    candidates = [root]
    parent_of_cod = _subdir(root, _COD_PARENT)
    if parent_of_cod:
        candidates.append(parent_of_cod)
    for folder in candidates:
        index = (_cod10k(folder, include_noncam, require_train, allow_missing_masks)
                 or _sinet(folder, include_noncam, "sinet", require_train, allow_missing_masks))
        if index is not None and (index.train or index.tests):
            log.info(index.summary())
            return index
    raise UserError(_layout_help(root))


def split_train_val(samples: Sequence[Sample], val_split: float, seed: int) -> tuple[list[Sample], list[Sample]]:
    """Seeded random hold-out of ``val_split`` of ``samples``; both parts keep the input order.

    At least one validation sample when ``val_split > 0`` and there are two or more samples.
    """
    if not 0.0 <= val_split < 1.0:
        raise UserError(f"--val-split must be in [0, 1) (got {val_split})")
    samples = list(samples)
    n = len(samples)
    if val_split == 0.0 or n < 2:
        return samples, []
    n_val = min(max(1, round(n * val_split)), n - 1)
    val_idx = set(np.random.default_rng(seed).permutation(n)[:n_val].tolist())
    train = [s for i, s in enumerate(samples) if i not in val_idx]
    val = [s for i, s in enumerate(samples) if i in val_idx]
    return train, val
