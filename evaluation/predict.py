"""``predict``: masks for a folder of images (or one image), at each image's original size.

For every input ``<stem>.<ext>`` it writes ``<output>/<stem>.png``, 8-bit single channel:
``round(255 * p)`` of the foreground probability ``p``, or 0/255 for ``p > threshold`` with
``--threshold``. ``p`` comes from the model at its square size (see ``evaluation.evaluate``) and is
resized to the image's own size bilinearly (on float32, as ``SegMetrics`` resizes predictions), so
scoring the saved probability PNGs against the masks gives ``evaluate``'s numbers.
``--overlay`` adds ``<output>/overlay/<stem>_overlay.jpg`` (the image, tinted red by the mask at up
to 50 %); ``--zip FILE`` packs the PNGs, flat, under their file names.
"""

from __future__ import annotations

import logging
import os
import zipfile
from dataclasses import dataclass
from typing import Optional

import cv2
import numpy as np

import data as cod_data
from data.images import IMAGE_EXTS
from core.errors import UserError, check_output_file
from evaluation.evaluate import InferenceOptions, iterate_probs, load_model

log = logging.getLogger(__name__)

OVERLAY_COLOR = np.array([255, 0, 0], np.float32)  # RGB red
OVERLAY_ALPHA = 0.5


@dataclass
class PredictOptions(InferenceOptions):
    input: str = ""
    output: str = ""
    threshold: Optional[float] = None  # None: probability PNGs; else binary 0/255 masks
    zip: Optional[str] = None
    overlay: bool = False
    overwrite: bool = False  # replace existing output files (never an input image)

    def validate(self) -> None:
        super().validate()
        if self.threshold is not None and not 0.0 < self.threshold < 1.0:
            raise UserError(f"--threshold must be in (0, 1) (got {self.threshold})")
        if not self.output:
            raise UserError("--output: name the folder the masks go to")
        if os.path.exists(self.input):  # a missing --input is list_inputs' to report
            self._check_output_apart()

    def _check_output_apart(self) -> None:
        """--output must not be the folder of the input images (or, for a folder, inside it)."""
        is_dir = os.path.isdir(self.input)
        images = os.path.realpath(self.input if is_dir else os.path.dirname(self.input) or ".")
        output = os.path.realpath(self.output)
        if output == images or (is_dir and os.path.commonpath([images, output]) == images):
            where = "the folder" if output == images else "inside the folder"
            raise UserError(f"--output {self.output} is {where} of the --input images ({images}): the masks "
                            "would mix with the images; choose an --output folder outside it")


def list_inputs(path: str) -> list[str]:
    """One file, or the image files (``IMAGE_EXTS``, hidden ones skipped) of one folder, sorted by name,
    not recursive. Two inputs with the same stem would write the same PNG: a UserError."""
    if os.path.isfile(path):
        return [path]
    if not os.path.isdir(path):
        raise UserError(f"--input {path}: no such file or folder; pass an image or a folder of images")
    paths = sorted(e.path for e in os.scandir(path)
                   if e.is_file() and not e.name.startswith(".") and os.path.splitext(e.name)[1].lower() in IMAGE_EXTS)
    if not paths:
        raise UserError(f"--input {path}: no images ({', '.join(IMAGE_EXTS)}) in this folder; "
                        "point --input at the folder that holds them")
    seen: dict[str, str] = {}
    for p in paths:
        stem = _stem(p)
        if stem in seen:
            raise UserError(f"--input {path}: {os.path.basename(seen[stem])} and {os.path.basename(p)} would both "
                            f"write {stem}.png; rename or remove one")
        seen[stem] = p
    return paths


def _stem(path: str) -> str:
    return os.path.splitext(os.path.basename(path))[0]


def to_png(prob: np.ndarray, size: tuple[int, int], threshold: Optional[float]) -> np.ndarray:
    """S x S probabilities -> H x W uint8: bilinear resize to ``size``, then 0-255 or binary 0/255."""
    h, w = size
    if prob.shape != (h, w):
        prob = np.clip(cv2.resize(prob.astype(np.float32), (w, h), interpolation=cv2.INTER_LINEAR), 0.0, 1.0)
    if threshold is not None:
        return (prob > threshold).astype(np.uint8) * 255
    return np.rint(prob * 255.0).astype(np.uint8)


def overlay(image: np.ndarray, mask_u8: np.ndarray) -> np.ndarray:
    """RGB uint8 image with red mixed in at ``OVERLAY_ALPHA * mask / 255`` per pixel."""
    a = (OVERLAY_ALPHA / 255.0) * mask_u8.astype(np.float32)[:, :, None]
    return np.rint(image.astype(np.float32) * (1.0 - a) + OVERLAY_COLOR * a).astype(np.uint8)


def write_image(path: str, array: np.ndarray) -> None:
    """PNG or JPEG by extension; any path (encode + tofile, as ``load_image`` reads with fromfile)."""
    ext = os.path.splitext(path)[1].lower()
    if array.ndim == 3:
        array = cv2.cvtColor(array, cv2.COLOR_RGB2BGR)
    params = [cv2.IMWRITE_JPEG_QUALITY, 95] if ext in (".jpg", ".jpeg") else []
    ok, buf = cv2.imencode(ext, array, params)
    try:
        if not ok:
            raise OSError(f"cannot encode {ext}")
        buf.tofile(path)
    except OSError as e:
        raise UserError(f"cannot write {path}: {e.strerror or e}; pass a writable --output") from None


def predict_images(opts: PredictOptions) -> list[str]:
    """Write one PNG per input (and overlays, zip); return the PNG paths in input order."""
    opts.validate()
    paths = list_inputs(opts.input)
    out_dir = os.path.abspath(opts.output)
    pngs = [os.path.join(out_dir, _stem(p) + ".png") for p in paths]  # never an input: validate()
    overlay_dir = os.path.join(out_dir, "overlay")
    overlays = [os.path.join(overlay_dir, _stem(p) + "_overlay.jpg") for p in paths] if opts.overlay else []
    check_targets(opts, paths, pngs, overlays)
    try:
        os.makedirs(overlay_dir if opts.overlay else out_dir, exist_ok=True)
    except OSError as e:
        raise UserError(f"cannot create {out_dir}: {e.strerror or e}; pass a writable --output") from None

    model, cfg, device, dtype = load_model(opts)
    mode = f"binary masks (p > {opts.threshold:g})" if opts.threshold is not None else "probabilities (0-255)"
    log.info("Predict: %d image(s) from %s | %s | TTA %s | device %s", len(paths), opts.input, mode, opts.tta,
             device)
    for i, prob, size in iterate_probs(model, paths, opts, cfg["img_size"], device, dtype, desc="predict"):
        mask = to_png(prob, size, opts.threshold)
        write_image(pngs[i], mask)
        if opts.overlay:
            write_image(overlays[i], overlay(cod_data.load_image(paths[i]), mask))

    if opts.zip:
        write_zip(opts.zip, pngs)
    log.info("Wrote %d mask(s) to %s%s%s", len(pngs), out_dir,
             f", overlays to {overlay_dir}" if opts.overlay else "",
             f", zip {os.path.abspath(opts.zip)}" if opts.zip else "")
    return pngs


def check_targets(opts: PredictOptions, inputs: list[str], pngs: list[str], overlays: list[str]) -> None:
    """Before anything is written: no output is an input image or another output, and an existing file
    is replaced only with ``--overwrite`` (nothing tells whether the user or an earlier predict wrote it)."""
    check_output_file("--zip", opts.zip, "masks.zip")
    targets = ([("--zip", opts.zip)] if opts.zip else []) + [("--output", p) for p in pngs] + \
        [("--overlay", p) for p in overlays]
    real_inputs = {os.path.realpath(p) for p in inputs}
    for flag, path in targets:
        if os.path.realpath(path) in real_inputs:
            raise UserError(f"{flag} {path} is one of the --input images: it would be replaced; choose another {flag}")
    written = [opts.output, *pngs, *([os.path.dirname(overlays[0])] if overlays else []), *overlays]
    if opts.zip and os.path.realpath(opts.zip) in {os.path.realpath(p) for p in written}:
        raise UserError(f"--zip {opts.zip} is the --output folder or one of the files predict writes; choose "
                        "another --zip")
    existing = [(flag, path) for flag, path in targets if os.path.lexists(path)]
    if existing and not opts.overwrite:
        flag, path = existing[0]
        more = f" (and {len(existing) - 1} more file(s) predict would write)" if len(existing) > 1 else ""
        raise UserError(f"{flag}: {path} already exists{more}: add --overwrite to replace, or choose another {flag}")


def write_zip(zip_path: str, files: list[str]) -> None:
    """The files under their base names (flat), written to a temporary file and renamed into place."""
    zip_path = os.path.abspath(zip_path)
    tmp = zip_path + ".tmp"
    try:
        os.makedirs(os.path.dirname(zip_path), exist_ok=True)
        with zipfile.ZipFile(tmp, "w", compression=zipfile.ZIP_DEFLATED) as z:
            for f in files:
                z.write(f, arcname=os.path.basename(f))
        os.replace(tmp, zip_path)
    except OSError as e:
        if os.path.exists(tmp):
            os.remove(tmp)
        raise UserError(f"cannot write --zip {zip_path}: {e.strerror or e}; choose a writable path") from None
