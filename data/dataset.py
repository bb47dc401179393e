"""``SegDataset``: samples -> normalised tensors of one fixed square size, augmented when training.

Per item: load (``load_image``/``load_mask``) -> resize to ``img_size`` (image bilinear, mask bilinear
re-binarised at 0.5: ``resize_mask``) -> augment (train only) -> normalise. The mask is exactly {0, 1}
at every step. The first two steps are ``read_resized``; with a ``cache`` (``data/cache.py``, train's
``--cache``) its output is read from arrays written once instead, and the rest is the same.

Determinism: each item reseeds the ``A.Compose`` with its own augmentation seed. Once
``reseed(seed)`` has been called (``build_loader`` does so before every pass, from its seeded
generator) item ``i`` uses ``mix_seeds(seed, i)``: a function of the pass seed and the index only, so
it does not matter which worker process reads it, or in which order. Reading the same index twice in
one pass repeats its augmentation. Before any ``reseed`` the seed comes from torch's global RNG,
which PyTorch seeds differently in every DataLoader worker.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Sequence

import numpy as np
import torch
from torch.utils.data import Dataset

from core.errors import UserError

from .discovery import Sample
from .images import load_image, load_mask
from .loader import mix_seeds
from .transforms import AugConfig, build_augmentation, normalize, resize_pair

if TYPE_CHECKING:
    from .cache import ArrayCache


def read_resized(sample: Sample, img_size: int) -> tuple[np.ndarray, np.ndarray, tuple[int, int]]:
    """``(image SxSx3 uint8, mask SxS uint8 {0, 1}, (H, W) of the image file)``: the sample read and
    resized (``resize_pair``); no mask reads as all zeros. An unreadable file raises its ``UserError``."""
    image = load_image(sample.image)
    h, w = image.shape[:2]
    mask = load_mask(sample.mask) if sample.mask else np.zeros((h, w), np.uint8)
    image, mask = resize_pair(image, mask, img_size)
    return image, mask, (h, w)


class SegDataset(Dataset):
    """Items are dicts: image 3xSxS float32 (ImageNet-normalised), mask 1xSxS float32 in {0, 1}, name,
    image_path, mask_path ('' for a sample without mask: the mask is then all zeros), orig_size
    [H, W] int64 and error ('' or the one line saying which file cannot be read: ``build_loader``
    raises it in the main process, where a worker's exception would come with its traceback).
    ``aug`` only applies when ``train``; ``train=True`` with ``aug=None`` means ``AugConfig()``.
    ``cache``: the ``ArrayCache`` of exactly these samples at ``img_size`` (``data.cache.build_cache``);
    items are then read from it, bit-identical to reading the files."""

    def __init__(self, samples: Sequence[Sample], img_size: int, train: bool, aug: AugConfig | None = None,
                 cache: ArrayCache | None = None):
        if img_size < 8:
            raise UserError(f"--img-size must be >= 8 (got {img_size})")
        if cache is not None and (len(cache) != len(samples) or cache.img_size != img_size):
            raise ValueError(f"the cache holds {len(cache)} items of {cache.img_size} px, not {len(samples)} "
                             f"of {img_size} px")
        self.samples = list(samples)
        self.cache = cache
        self.img_size = int(img_size)
        self.train = bool(train)
        self.aug = (aug if aug is not None else AugConfig()) if train else None
        self._transform = build_augmentation(self.aug)
        self._seed: int | None = None

    def __len__(self) -> int:
        return len(self.samples)

    def reseed(self, seed: int | None) -> None:
        """Augment item ``i`` with seed ``mix_seeds(seed, i)`` from now on (None: from torch's global RNG)."""
        self._seed = None if seed is None else int(seed)

    def _aug_seed(self, i: int) -> int:
        if self._seed is not None:
            return mix_seeds(self._seed, i) % 2**31
        return int(torch.randint(0, 2**31 - 1, ()).item())

    def __getitem__(self, i: int) -> dict:
        s = self.samples[i]
        try:
            image, mask, (h, w) = self.cache.item(i) if self.cache is not None else read_resized(s, self.img_size)
        except UserError as e:  # raised in the main process by the loader, as one line
            return self._failed(s, str(e))
        if self._transform is not None:
            self._transform.set_random_seed(self._aug_seed(i))
            out = self._transform(image=image, mask=mask)
            image, mask = out["image"], out["mask"]
        return {
            "image": torch.from_numpy(normalize(image)),
            "mask": torch.from_numpy(mask.astype(np.float32)[None]),
            "name": s.name,
            "image_path": s.image,
            "mask_path": s.mask or "",
            "orig_size": torch.tensor([h, w], dtype=torch.int64),
            "error": "",
        }

    def _failed(self, s: Sample, error: str) -> dict:
        """An item of the right shapes that carries the one-line ``error`` of an unreadable file."""
        n = self.img_size
        return {"image": torch.zeros(3, n, n), "mask": torch.zeros(1, n, n), "name": s.name,
                "image_path": s.image, "mask_path": s.mask or "", "orig_size": torch.zeros(2, dtype=torch.int64),
                "error": error}
