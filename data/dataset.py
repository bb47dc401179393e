"""``SegDataset``: samples -> normalised tensors of one fixed square size, augmented when training.

Per item: load (``load_image``/``load_mask``) -> resize to ``img_size`` (image bilinear, mask bilinear
re-binarised at 0.5: ``resize_mask``) -> augment (train only) -> normalise. The mask is exactly {0, 1}
at every step.

Determinism: each item draws a fresh augmentation seed and reseeds the ``A.Compose`` with it. The
seed comes from the dataset's own generator once ``reseed(seed)`` has been called (``build_loader``
does so from its seeded generator: every epoch in the main process, per worker in worker processes),
otherwise from torch's global RNG, which PyTorch seeds differently in every DataLoader worker.
"""

from __future__ import annotations

import os
from typing import Sequence

import numpy as np
import torch
from torch.utils.data import Dataset

from errors import UserError

from .discovery import Sample
from .images import load_image, load_mask
from .transforms import AugConfig, build_augmentation, normalize, resize_pair


class SegDataset(Dataset):
    """Items are dicts: image 3xSxS float32 (ImageNet-normalised), mask 1xSxS float32 in {0, 1}, name,
    image_path, mask_path ('' for a sample without mask: the mask is then all zeros) and orig_size
    [H, W] int64. ``aug`` only applies when ``train``; ``train=True`` with ``aug=None`` means ``AugConfig()``."""

    def __init__(self, samples: Sequence[Sample], img_size: int, train: bool, aug: AugConfig | None = None):
        if img_size < 8:
            raise UserError(f"--img-size must be >= 8 (got {img_size})")
        self.samples = list(samples)
        self.img_size = int(img_size)
        self.train = bool(train)
        self.aug = (aug if aug is not None else AugConfig()) if train else None
        self._transform = build_augmentation(self.aug)
        self._rng: np.random.Generator | None = None
        self._rng_pid = 0  # a forked worker must not replay the parent's generator

    def __len__(self) -> int:
        return len(self.samples)

    def reseed(self, seed: int | None) -> None:
        """Draw augmentation seeds from a generator seeded with ``seed`` (None: from torch's global RNG)."""
        self._rng = None if seed is None else np.random.default_rng(int(seed) % 2**63)
        self._rng_pid = os.getpid()

    def _next_seed(self) -> int:
        if self._rng is not None and self._rng_pid == os.getpid():
            return int(self._rng.integers(0, 2**31 - 1))
        return int(torch.randint(0, 2**31 - 1, ()).item())

    def __getitem__(self, i: int) -> dict:
        s = self.samples[i]
        image = load_image(s.image)
        h, w = image.shape[:2]
        mask = load_mask(s.mask) if s.mask else np.zeros((h, w), np.uint8)
        image, mask = resize_pair(image, mask, self.img_size)
        if self._transform is not None:
            self._transform.set_random_seed(self._next_seed())
            out = self._transform(image=image, mask=mask)
            image, mask = out["image"], out["mask"]
        return {
            "image": torch.from_numpy(normalize(image)),
            "mask": torch.from_numpy(mask.astype(np.float32)[None]),
            "name": s.name,
            "image_path": s.image,
            "mask_path": s.mask or "",
            "orig_size": torch.tensor([h, w], dtype=torch.int64),
        }
