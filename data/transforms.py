"""Training augmentation (albumentations) and its presets.

Images reach these transforms already resized to ``img_size`` with their masks (``resize_pair``), so
augmentation runs on small arrays. Geometric transforms warp the uint8 {0, 1} mask bilinearly, like
the image, and OpenCV rounds the result back to {0, 1}: the mask is re-binarised at 0.5 and stays on
its object (LESSONS 9; nearest neighbour would jitter its edge by up to half a pixel). Randomness
comes only from the ``A.Compose`` generator, which ``SegDataset`` reseeds for every sample from
torch's RNG (see ``data/dataset.py``).
"""

from __future__ import annotations

import os
from dataclasses import asdict, dataclass

import cv2
import numpy as np

from core.errors import UserError

from .images import resize_mask

os.environ.setdefault("NO_ALBUMENTATIONS_UPDATE", "1")  # no network version check at import
import albumentations as A  # noqa: E402

IMAGENET_MEAN = np.array([0.485, 0.456, 0.406], dtype=np.float32)
IMAGENET_STD = np.array([0.229, 0.224, 0.225], dtype=np.float32)


@dataclass
class AugConfig:
    hflip: float = 0.5         # probability of a horizontal flip
    vflip: float = 0.0         # probability of a vertical flip
    rotate_deg: float = 15     # rotation drawn from [-rotate_deg, rotate_deg]
    scale: float = 0.1         # zoom drawn from [1 - scale, 1 + scale], the same for x and y
    color_jitter: float = 0.1  # brightness/contrast/saturation in [1 - c, 1 + c], hue +-c/5
    enabled: bool = True

    def __post_init__(self) -> None:
        for name in ("hflip", "vflip"):
            if not 0.0 <= getattr(self, name) <= 1.0:
                raise UserError(f"augmentation {name} is a probability in [0, 1] (got {getattr(self, name)})")
        if not 0.0 <= self.rotate_deg <= 180.0:
            raise UserError(f"augmentation rotate_deg must be in [0, 180] (got {self.rotate_deg})")
        for name in ("scale", "color_jitter"):
            if not 0.0 <= getattr(self, name) < 1.0:
                raise UserError(f"augmentation {name} must be in [0, 1) (got {getattr(self, name)})")

    def to_dict(self) -> dict:
        return asdict(self)


_PRESETS = {
    "none": AugConfig(enabled=False),
    "light": AugConfig(hflip=0.5, vflip=0.0, rotate_deg=0.0, scale=0.05, color_jitter=0.05),
    "moderate": AugConfig(),
    "strong": AugConfig(hflip=0.5, vflip=0.5, rotate_deg=30.0, scale=0.2, color_jitter=0.2),
}
AUG_PRESETS = tuple(_PRESETS)


def aug_preset(name: str) -> AugConfig:
    """The named preset: 'none' | 'light' | 'moderate' (the default) | 'strong'."""
    key = str(name).strip().lower()
    if key not in _PRESETS:
        raise UserError(f"unknown augmentation preset {name!r}; choose one of {', '.join(AUG_PRESETS)}")
    return AugConfig(**asdict(_PRESETS[key]))  # a copy: callers may edit it


def build_augmentation(cfg: AugConfig | None) -> A.Compose | None:
    """The albumentations pipeline for ``cfg``, or None when there is nothing to do."""
    if cfg is None or not cfg.enabled:
        return None
    ts: list = []
    if cfg.hflip > 0:
        ts.append(A.HorizontalFlip(p=cfg.hflip))
    if cfg.vflip > 0:
        ts.append(A.VerticalFlip(p=cfg.vflip))
    if cfg.rotate_deg > 0 or cfg.scale > 0:
        ts.append(A.Affine(rotate=(-cfg.rotate_deg, cfg.rotate_deg), scale=(1 - cfg.scale, 1 + cfg.scale),
                           keep_ratio=True,  # a zoom: without it x and y scales are drawn separately
                           interpolation=cv2.INTER_LINEAR, mask_interpolation=cv2.INTER_LINEAR,
                           border_mode=cv2.BORDER_REFLECT_101, p=1.0))
    if cfg.color_jitter > 0:
        c = cfg.color_jitter
        ts.append(A.ColorJitter(brightness=c, contrast=c, saturation=c, hue=c / 5, p=0.8))
    if not ts:
        return None
    # Compose's mask_interpolation overrides the transforms' own; uint8 {0, 1} in, {0, 1} out (rounded).
    return A.Compose(ts, mask_interpolation=cv2.INTER_LINEAR, seed=0)


def resize_pair(image: np.ndarray, mask: np.ndarray | None, size: int) -> tuple[np.ndarray, np.ndarray | None]:
    """Resize to ``size`` x ``size``: the image bilinear, the {0, 1} mask with ``resize_mask`` (bilinear,
    then >= 0.5), so the mask stays on its object."""
    if image.shape[:2] != (size, size):
        image = cv2.resize(image, (size, size), interpolation=cv2.INTER_LINEAR)
    if mask is not None:
        mask = resize_mask(mask, (size, size))
    return image, mask


def normalize(image: np.ndarray) -> np.ndarray:
    """HxWx3 uint8 RGB -> 3xHxW float32 normalised with the ImageNet mean and std."""
    x = (image.astype(np.float32) / 255.0 - IMAGENET_MEAN) / IMAGENET_STD
    return np.ascontiguousarray(x.transpose(2, 0, 1))
