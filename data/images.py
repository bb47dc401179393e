"""Reading images and masks from disk into the two arrays everything else expects.

``load_image`` -> HxWx3 uint8 RGB and ``load_mask`` -> HxW uint8 in {0, 1}, whatever the file holds
(grey, RGBA, 16-bit; 0/1, 0/255 or 0/65535 masks, noisy JPEG masks: see ``binarize_mask``).
An unreadable file, or a float one with NaN or infinite pixels, is a ``UserError`` naming the file.
Pixels are read as stored (``IMREAD_UNCHANGED``), so JPEG EXIF orientation is not applied: the
image keeps the pixel grid its mask was drawn on.
"""

from __future__ import annotations

import os

import cv2
import numpy as np

from core.errors import UserError

IMAGE_EXTS = (".jpg", ".jpeg", ".png", ".bmp", ".tif", ".tiff")
MASK_EXTS = (".png", ".jpg", ".jpeg", ".bmp", ".tif", ".tiff")


def _read(path: str | os.PathLike, what: str) -> np.ndarray:
    path = os.fspath(path)
    try:
        # fromfile + imdecode instead of imread: works for any path (non-ASCII, long) on every OS.
        buf = np.fromfile(path, dtype=np.uint8)
    except OSError as e:
        raise UserError(f"cannot read {what} {path}: {e.strerror or e}; "
                        "check the file exists and is readable") from None
    arr = cv2.imdecode(buf, cv2.IMREAD_UNCHANGED) if buf.size else None
    if arr is None:
        raise UserError(f"cannot decode {what} {path}: not a readable image file; "
                        "re-export it as PNG or JPEG or remove it")
    return arr


def _to_uint8(arr: np.ndarray, path: str | os.PathLike, what: str) -> np.ndarray:
    if arr.dtype == np.uint8:
        return arr
    if arr.dtype == np.uint16:
        return ((arr.astype(np.uint32) + 128) // 257).astype(np.uint8)  # 65535 -> 255, rounded
    if arr.dtype in (np.float32, np.float64):
        a = _finite(arr.astype(np.float32), path, what)
        if a.max(initial=0.0) <= 1.0:
            a = a * 255.0
        return np.clip(np.rint(a), 0, 255).astype(np.uint8)
    raise UserError(f"{what} {os.fspath(path)} has unsupported pixel type {arr.dtype}; "
                    "save it as 8- or 16-bit PNG/JPEG")


def _finite(arr: np.ndarray, path: str | os.PathLike, what: str) -> np.ndarray:
    """A float image or mask with NaN or infinite pixels is a bad file: one +inf made the scale
    (1.0 or 255) unknowable and the rest read as black."""
    bad = int(arr.size - np.count_nonzero(np.isfinite(arr)))
    if bad:
        raise UserError(f"{what} {os.fspath(path)} has {bad} pixel(s) that are NaN or infinite; re-export it "
                        "without them or remove it")
    return arr


def load_image(path: str | os.PathLike) -> np.ndarray:
    """Read an image as HxWx3 uint8 RGB: grey is repeated to 3 channels, alpha dropped, 16-bit scaled."""
    arr = _to_uint8(_read(path, "image"), path, "image")
    if arr.ndim == 2:
        return np.ascontiguousarray(np.repeat(arr[:, :, None], 3, axis=2))
    channels = arr.shape[2]
    if channels == 1 or channels == 2:  # grey, grey + alpha
        return np.ascontiguousarray(np.repeat(arr[:, :, :1], 3, axis=2))
    if channels == 3:
        return cv2.cvtColor(arr, cv2.COLOR_BGR2RGB)
    if channels == 4:
        return cv2.cvtColor(arr, cv2.COLOR_BGRA2RGB)
    raise UserError(f"image {os.fspath(path)} has {channels} channels; save it as grey, RGB or RGBA")


def load_mask(path: str | os.PathLike, size: tuple[int, int] | None = None) -> np.ndarray:
    """Read a mask as HxW uint8 in {0, 1}, binarised on its own scale (``binarize_mask``): 0/1, 0/255 and
    0/65535 masks all work, in any container (8- or 16-bit PNG, JPEG, BMP, TIFF).

    Colour masks are converted to grey (alpha ignored), so noisy JPEG masks binarise cleanly.
    ``size=(H, W)`` resizes it with ``resize_mask`` (e.g. to its image's size).
    """
    arr = _read(path, "mask")
    if arr.dtype not in (np.uint8, np.uint16, np.float32, np.float64):
        arr = _to_uint8(arr, path, "mask")  # raises: unsupported pixel type
    if arr.dtype == np.float64:
        arr = arr.astype(np.float32)  # cvtColor takes 8U, 16U and 32F
    if arr.dtype == np.float32:
        _finite(arr, path, "mask")
    if arr.ndim == 3:
        channels = arr.shape[2]
        if channels == 3:
            arr = cv2.cvtColor(arr, cv2.COLOR_BGR2GRAY)
        elif channels == 4:
            arr = cv2.cvtColor(arr, cv2.COLOR_BGRA2GRAY)
        else:
            arr = arr[:, :, 0]
    mask = binarize_mask(arr, lossy=not _is_lossless(path))
    if size is not None:
        mask = resize_mask(mask, size)
    return mask


LABEL_MAP_MAX = 7  # a mask whose largest value is at most this is a 0/1 label map (JPEG noise adds a few levels)


def binarize_mask(values: np.ndarray, lossy: bool = False) -> np.ndarray:
    """HxW grey values (any dtype) -> uint8 {0, 1}: foreground is ``value > scale / 2``, where the scale
    follows from the mask's own largest value, not from its dtype or container:

    * max <= ``LABEL_MAP_MAX`` (7): a 0/1 label map, scale 1 (foreground is value >= 1 for integers).
      A JPEG of a 0/1 mask decodes to 0..2 or 3 (the object mostly 1, ringing at its edge), and comes
      out right. The guard, for lossy files only (``lossy``): a JPEG can also hold an empty mask whose
      background is faint noise (0..3), which this rule would turn into speckled foreground. So a lossy
      label map keeps its foreground only if it is solid: at least a quarter of its pixels have all 8
      neighbours in the foreground too; otherwise it is all background. Measured: speckle keeps none;
      0/1 JPEG objects of 6x6 px or more pass at quality 95 (smaller ones JPEG already damages, IoU
      < 0.75). Noise that a low JPEG quality has smoothed into solid blocks of 1 cannot be told from
      labels. Lossless 0/1 files are exact and never second-guessed.
    * max <= 255: scale 255 (foreground > 127, as 8-bit masks always were; also a 16-bit file of 0/255).
    * otherwise: scale 65535 (foreground > 32767, as 16-bit masks always were).

    A mask with no foreground (all zero, or below half of its scale) comes out empty; ``data.scan``
    counts those so that a caller can warn.
    """
    v = np.nan_to_num(values) if values.dtype.kind == "f" else values
    top = float(v.max(initial=0))
    scale = 1.0 if top <= LABEL_MAP_MAX else 255.0 if top <= 255 else 65535.0
    mask = (v > scale / 2).astype(np.uint8)
    if scale == 1.0 and lossy and not _is_solid(mask):
        mask[:] = 0
    return mask


def _is_solid(mask: np.ndarray) -> bool:
    """At least a quarter of the foreground survives a 3x3 erosion (pixels beyond the border count as foreground)."""
    area = int(mask.sum())
    return area > 0 and 4 * int(cv2.erode(mask, np.ones((3, 3), np.uint8)).sum()) >= area


def resize_mask(mask: np.ndarray, size: tuple[int, int]) -> np.ndarray:
    """Resize a {0, 1} mask to ``size=(H, W)``: bilinear on float32, then foreground where >= 0.5.

    The mask is sampled where ``cv2.INTER_LINEAR`` samples its image (at pixel centres), so the two stay
    aligned. Nearest neighbour samples at ``floor(x * scale)`` and so shifts the mask by up to half a
    (source) pixel towards the top left: +0.26..0.50 px in the output when shrinking to 96 or 384 px.
    """
    h, w = int(size[0]), int(size[1])
    if mask.shape[:2] == (h, w):
        return mask
    resized = cv2.resize(mask.astype(np.float32), (w, h), interpolation=cv2.INTER_LINEAR)
    return (resized >= 0.5).astype(np.uint8)


def _is_lossless(path) -> bool:
    return os.path.splitext(str(path))[1].lower() in (".png", ".bmp", ".tif", ".tiff")
