"""A procedural camouflage dataset, so the tool runs end to end without downloading anything.

Each image is a smooth random texture (a few oriented sinusoids plus blurred noise, mapped through a
random three-colour palette) with one or two smooth blob-shaped objects painted in a texture of
*similar* colour: the object's palette is the background's shifted by 35-50 RGB levels, and its
texture has another frequency and orientation and less contrast. The edge is anti-aliased, and a
global shading plus pixel noise lies over everything. Objects cover roughly 5-30 % of the image.
Absolute colour says nothing (every image has its own palette): a model has to compare an area
with its surroundings. Measured once: ``edgenext_xx_small`` from scratch with a 1x1 lateral FPN
head, BCE, AdamW 1e-3, batch 16, 64 px, 'light' augmentation, 2 CPU threads, 160 training images,
reached IoU 0.40 on the 40 test images after 2 minutes (train loss 0.05: it learns, and overfits).

Written in the SINet layout (``TrainDataset/{Imgs,GT}``, ``TestDataset/demo/{Imgs,GT}``); images are
JPEG (quality 95), masks PNG 0/255. Every image comes from its own seed ``(seed, split, i)``, so the
same seed writes identical bytes. The folder is written to a temporary sibling and moved into
place with ``os.replace``: a killed generation never leaves a half dataset behind.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import tempfile

import cv2
import numpy as np

from core.errors import UserError

log = logging.getLogger(__name__)

DEMO_SIZE = 96
_VERSION = 1
_MARKER = "demo.json"


def _texture(rng: np.random.Generator, h: int, w: int, period: float, angle: float) -> np.ndarray:
    """A smooth HxW field in [0, 1]: three sinusoids near ``angle``/``period`` plus blurred noise."""
    yy, xx = np.mgrid[0:h, 0:w].astype(np.float64)
    t = np.zeros((h, w))
    for _ in range(3):
        a = angle + rng.normal(0.0, 0.35)
        f = 2 * np.pi / (period * rng.uniform(0.75, 1.33))
        t += rng.uniform(0.5, 1.0) * np.sin(f * (xx * np.cos(a) + yy * np.sin(a)) + rng.uniform(0, 2 * np.pi))
    coarse = rng.normal(0.0, 1.0, (max(2, h // 12), max(2, w // 12)))
    t += 1.2 * cv2.resize(coarse, (w, h), interpolation=cv2.INTER_CUBIC)
    t -= t.min()
    return t / max(t.max(), 1e-9)


def _paint(t: np.ndarray, palette: np.ndarray) -> np.ndarray:
    """Map a [0, 1] field through a piecewise-linear palette (K x 3) to HxWx3 float colours."""
    stops = np.linspace(0.0, 1.0, len(palette))
    return np.stack([np.interp(t, stops, palette[:, c]) for c in range(3)], axis=-1)


def _blob(rng: np.random.Generator, h: int, w: int, area: float) -> np.ndarray:
    """Signed distance-like field (> 0 inside) of a smooth star-shaped blob covering about ``area`` of the image."""
    r0 = np.sqrt(area * h * w / np.pi)
    margin = 0.8 * r0
    cy = rng.uniform(margin, h - margin)
    cx = rng.uniform(margin, w - margin)
    yy, xx = np.mgrid[0:h, 0:w].astype(np.float64)
    dy, dx = yy - cy, xx - cx
    stretch = rng.uniform(0.7, 1.4)  # elongate along a random axis
    rot = rng.uniform(0, np.pi)
    u = dx * np.cos(rot) + dy * np.sin(rot)
    v = -dx * np.sin(rot) + dy * np.cos(rot)
    u, v = u / np.sqrt(stretch), v * np.sqrt(stretch)
    theta = np.arctan2(v, u)
    r = np.full_like(theta, r0)
    for k in (2, 3, 4, 5):
        r += r0 * rng.uniform(0.0, 0.28 / k) * np.cos(k * theta + rng.uniform(0, 2 * np.pi))
    return r - np.hypot(u, v)


def _palette(rng: np.random.Generator) -> np.ndarray:
    base = rng.uniform(50, 190, 3)
    return np.clip(base + rng.normal(0.0, 32.0, (3, 3)), 0, 255)


def demo_pair(seed: int, split: int, i: int, size: int = DEMO_SIZE) -> tuple[np.ndarray, np.ndarray]:
    """One (RGB uint8 image, {0, 255} uint8 mask) pair, a pure function of ``(seed, split, i, size)``."""
    rng = np.random.default_rng(np.random.SeedSequence([int(seed) % 2**64, split, i]))
    h = w = size
    palette = _palette(rng)
    period = rng.uniform(6.0, 14.0) * size / 96
    angle = rng.uniform(0, np.pi)
    img = _paint(_texture(rng, h, w, period, angle), palette)

    areas = [rng.uniform(0.07, 0.22)] if rng.random() < 0.65 else [rng.uniform(0.05, 0.14), rng.uniform(0.04, 0.09)]
    mask = np.zeros((h, w), bool)
    for area in areas:
        sdf = _blob(rng, h, w, area)
        alpha = np.clip(sdf / 1.5 + 0.5, 0.0, 1.0)[..., None]  # about 1.5 px anti-aliased edge
        shift = rng.normal(0.0, 1.0, 3)
        shift *= rng.uniform(35.0, 50.0) / np.linalg.norm(shift)
        obj_period = period * (rng.uniform(0.45, 0.65) if rng.random() < 0.5 else rng.uniform(1.5, 2.0))
        obj_angle = angle + rng.choice([-1, 1]) * rng.uniform(np.pi / 4, np.pi / 2)
        obj = _paint(0.25 + 0.5 * _texture(rng, h, w, obj_period, obj_angle), np.clip(palette + shift, 0, 255))
        img = img * (1 - alpha) + obj * alpha
        mask |= sdf > 0

    yy, xx = np.mgrid[0:h, 0:w] / size
    g = rng.normal(0.0, 1.0, 2)
    shading = 1.0 + 0.15 * np.tanh(g[0] * (yy - 0.5) + g[1] * (xx - 0.5))
    img = img * shading[..., None] + rng.normal(0.0, 5.0, img.shape)
    return np.clip(np.rint(img), 0, 255).astype(np.uint8), mask.astype(np.uint8) * 255


def _write(path: str, arr: np.ndarray, params: list[int]) -> None:
    ok, buf = cv2.imencode(os.path.splitext(path)[1], arr, params)
    assert ok, path
    with open(path, "wb") as f:
        f.write(buf.tobytes())


def _is_complete(root: str, params: dict) -> bool:
    try:
        with open(os.path.join(root, _MARKER)) as f:
            return json.load(f) == params
    except (OSError, ValueError):
        return False


def make_demo_dataset(out_dir: str, n_train: int = 160, n_test: int = 40, size: int = DEMO_SIZE,
                      seed: int = 0) -> str:
    """Write the demo dataset (SINet layout) to ``out_dir`` unless it already holds this exact one; return it."""
    if n_train < 1 or n_test < 0 or size < 16:
        raise ValueError(f"bad demo dataset size: n_train={n_train} n_test={n_test} size={size}")
    root = os.path.abspath(os.path.expanduser(os.fspath(out_dir)))
    params = {"version": _VERSION, "n_train": n_train, "n_test": n_test, "size": size, "seed": seed}
    if _is_complete(root, params):
        log.info("reusing demo dataset at %s", root)
        return root
    if os.path.isdir(root) and os.listdir(root) and not os.path.exists(os.path.join(root, _MARKER)):
        raise UserError(f"{root} exists and is not a generated demo dataset; delete it or choose another cache folder")

    parent = os.path.dirname(root)
    try:
        os.makedirs(parent, exist_ok=True)
        tmp = tempfile.mkdtemp(prefix=f".{os.path.basename(root)}.tmp-", dir=parent)
    except OSError as e:
        raise UserError(f"cannot write the demo dataset to {parent}: {e.strerror or e}; "
                        "choose a writable cache folder") from None
    log.info("generating demo dataset (%d train, %d test, %d px) at %s", n_train, n_test, size, root)
    try:
        for split, (folder, n, prefix) in enumerate(
            [(os.path.join(tmp, "TrainDataset"), n_train, "train"),
             (os.path.join(tmp, "TestDataset", "demo"), n_test, "test")]
        ):
            os.makedirs(os.path.join(folder, "Imgs"))
            os.makedirs(os.path.join(folder, "GT"))
            for i in range(n):
                img, mask = demo_pair(seed, split, i, size)
                name = f"{prefix}-{i:04d}"
                _write(os.path.join(folder, "Imgs", name + ".jpg"), img[:, :, ::-1], [cv2.IMWRITE_JPEG_QUALITY, 95])
                _write(os.path.join(folder, "GT", name + ".png"), mask, [cv2.IMWRITE_PNG_COMPRESSION, 3])
        with open(os.path.join(tmp, _MARKER), "w") as f:
            json.dump(params, f)
        if not _is_complete(root, params):  # else another process finished first: keep its copy
            if os.path.exists(os.path.join(root, _MARKER)):
                shutil.rmtree(root)  # an older demo (other settings) that this function wrote
            elif os.path.isdir(root):
                os.rmdir(root)  # empty
            try:
                os.replace(tmp, root)
            except OSError:
                if not _is_complete(root, params):  # lost a race to another process: fine
                    raise
    except OSError as e:
        raise UserError(f"cannot write the demo dataset to {root}: {e.strerror or e}; "
                        "free some space or choose another cache folder") from None
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return root
