"""Checkpoint files: written so that an interruption never leaves half of one, read with
``torch.load(weights_only=True)`` and a one-line diagnosis of what is wrong with a bad one, and the
model weights inside them loaded into a model whatever wrapped it when it was saved.

Shared by training (``last.pth``, ``best_model.pth``) and inference (``evaluate``, ``predict``,
``export``): what a full training checkpoint holds is ``training/progress.py``'s business.
"""

from __future__ import annotations

import errno
import logging
import os

import torch

from core.errors import UserError
from core.io import atomic_write
from core.runtime import unwrap

log = logging.getLogger("cod")


def _write(state: dict, f) -> None:
    torch.save(state, f)


def save(state: dict, path: str) -> None:
    """Atomic (``core.io.atomic_write``): the previous file at ``path`` stays whole until the new one
    is complete. A full disk or an unwritable folder is a UserError saying so (the previous file is
    still there)."""
    folder = os.path.dirname(os.path.abspath(path))
    try:
        with atomic_write(path, "wb") as f:
            _write(state, f)
    except (OSError, RuntimeError) as e:
        if isinstance(e, RuntimeError) and "unexpected pos" not in str(e):
            raise
        if isinstance(e, RuntimeError):  # torch's zip writer on ENOSPC
            e = OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        kept = f"the previous {os.path.basename(path)} is kept" if os.path.exists(path) else \
            f"no {os.path.basename(path)} was written"
        what = "no space left in" if e.errno == errno.ENOSPC else f"cannot write ({e.strerror or e}) to"
        raise UserError(f"{what} {folder} while saving {os.path.basename(path)}: {kept}; free space "
                        "or fix the folder, then resume with --resume-from its last.pth") from None


def load(path: str) -> dict:
    """Load a checkpoint or a bare state_dict; a missing or unreadable file is a UserError.

    What torch.save wrote is a zip archive (its end record, which a cut-short copy lacks, lists a
    ``<name>/data.pkl``) or, in its legacy format, a pickle."""
    import zipfile

    if not os.path.isfile(path):
        raise UserError(f"checkpoint not found: {path} (check --resume-from / --checkpoint)")
    with open(path, "rb") as f:
        head = f.read(8)
    size, again = os.path.getsize(path), "copy it again, or pass another checkpoint (e.g. best_model.pth)"
    truncated = f"{path} is truncated ({size} bytes), probably an interrupted copy: {again}"
    not_torch = (f"{path} is not a checkpoint (not a file torch.save wrote): pass the last.pth or "
                 "best_model.pth of a run, or a state_dict saved with torch.save")
    if size == 0:
        raise UserError(f"{path} is empty (0 bytes), probably an interrupted copy: {again}")
    if head.startswith(b"PK\x03\x04"):
        try:
            with zipfile.ZipFile(path) as z:
                names = z.namelist()
        except zipfile.BadZipFile:  # no end record: the end of the file is missing
            raise UserError(truncated) from None
        if not any(n.endswith("/data.pkl") for n in names):
            raise UserError(not_torch)
    elif not head.startswith(b"\x80"):  # a pickle (protocol 2 or later)
        raise UserError(not_torch)
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True)
    except EOFError:  # a legacy-format file cut short
        raise UserError(truncated) from None
    except Exception as e:  # pickled objects, damage inside
        text = " ".join(str(e).split())
        if "Weights only load failed" in text:
            raise UserError(f"{path} holds pickled Python objects, which loading with weights_only=True "
                            "refuses: if you trust the file, re-save its tensors as a plain dict") from None
        raise UserError(f"cannot read checkpoint {path}: {text.split('. ')[0][:200] or type(e).__name__} "
                        "(is it a complete .pth written by torch.save?)") from None
    if not isinstance(obj, dict):
        raise UserError(f"{path} holds a {type(obj).__name__}, not a checkpoint or state_dict")
    return obj


def is_full_checkpoint(obj: dict) -> bool:
    return "format_version" in obj and "model" in obj


def model_state_of(obj: dict) -> dict:
    """The model weights inside a full checkpoint, a {'state_dict': ...} wrapper or a bare state_dict."""
    for key in ("model", "state_dict", "model_state_dict"):
        if key in obj and isinstance(obj[key], dict):
            return obj[key]
    return obj


def strip_module_prefix(state: dict) -> dict:
    """Remove the ``module.`` prefix that DataParallel/DDP add, so either kind loads anywhere."""
    if state and all(k.startswith("module.") for k in state):
        return {k[len("module."):]: v for k, v in state.items()}
    return state


def load_model_weights(model: torch.nn.Module, state: dict, path: str) -> None:
    """Load weights strictly, except for parts the model marks optional (``optional_state_prefixes``,
    e.g. the deep-supervision side heads): switching ``--deep-supervision`` on when resuming starts
    those heads fresh, switching it off drops them. Both are logged."""
    state = strip_module_prefix(state)
    target = unwrap(model)
    optional = tuple(getattr(target, "optional_state_prefixes", ()))
    missing, unexpected = _key_diff(target.state_dict(), state)
    if any(not k.startswith(optional) for k in missing + unexpected) or not optional:
        try:
            target.load_state_dict(state, strict=True)
            return
        except RuntimeError:
            raise UserError(
                f"weights in {path} do not fit this model ({len(missing)} missing, {len(unexpected)} "
                f"unexpected keys, e.g. {(missing or unexpected)[:2]}): use the same --backbone, "
                "--num-experts and --decoder-channels as the run that wrote it") from None
    target.load_state_dict({k: v for k, v in state.items() if k not in unexpected}, strict=False)
    if missing:
        log.info("Weights: %d tensors of %s are new in this model (%s...): they start fresh",
                 len(missing), path, missing[0])
    if unexpected:
        log.info("Weights: %d tensors in %s are not used by this model (%s...): dropped",
                 len(unexpected), path, unexpected[0])


def _key_diff(expected: dict, got: dict) -> tuple[list, list]:
    missing = [k for k in expected if k not in got]
    unexpected = [k for k in got if k not in expected]
    if not missing and not unexpected:  # same keys: a shape mismatch
        missing = [k for k in expected if tuple(expected[k].shape) != tuple(got[k].shape)]
    return missing, unexpected
