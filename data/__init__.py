"""Datasets: find image/mask pairs, read them, augment them, and load them reproducibly.

    index = find_dataset("path/to/COD10K-v3")          # or a SINet-layout folder, or "demo"
    report = scan_samples(index.train, num_workers=4)  # every file read once: report.bad, report.good
    train, val = split_train_val(report.good, 0.1, seed)   # validation comes from Train, never Test
    loader = build_loader(SegDataset(train, 384, train=True, aug=aug_preset("moderate")),
                          batch_size=8, shuffle=True, num_workers=4, seed=seed)
    cache = build_cache(train, 384, num_workers=4)     # --cache: decoded once, then SegDataset(..., cache=cache)
"""

from .cache import ArrayCache, build_cache, build_caches
from .dataset import SegDataset
from .demo import make_demo_dataset
from .discovery import DEFAULT_SEED, DatasetIndex, Sample, find_dataset, split_train_val
from .images import load_image, load_mask
from .loader import ShardSampler, build_loader, usable_workers
from .scan import ScanReport, scan_samples
from .transforms import AUG_PRESETS, AugConfig, aug_preset

__all__ = [
    "DEFAULT_SEED",
    "AUG_PRESETS",
    "ArrayCache",
    "AugConfig",
    "DatasetIndex",
    "Sample",
    "ScanReport",
    "SegDataset",
    "ShardSampler",
    "aug_preset",
    "build_cache",
    "build_caches",
    "build_loader",
    "usable_workers",
    "find_dataset",
    "load_image",
    "load_mask",
    "make_demo_dataset",
    "scan_samples",
    "split_train_val",
]
