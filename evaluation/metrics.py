"""COD metrics per image at the ground truth's own resolution, scored by PySODMetrics.

``SegMetrics.step(pred, gt)`` takes one probability map and its ground-truth mask; ``results()``
returns the field's standard numbers (S-measure, weighted F, E-measure and F-measure in their
adaptive/mean/max forms, MAE) plus IoU and Dice at a fixed threshold.

What is fed to PySODMetrics is what the field's evaluation scripts read from saved PNGs:

* the prediction is resized to the ground truth's size (bilinear, on float32), then quantised to
  uint8 with ``round(prob * 255)``;
* the ground truth is a 0/255 uint8 mask.

PySODMetrics then divides the prediction by 255 and min-max stretches it to [0, 1] per image
(MATLAB's ``mapminmax``; a constant map is left as is) and binarises the ground truth at > 128. So
its metrics, MAE included, are scored on the *stretched* map, exactly as in published COD tables.
Its conventions for an empty ground truth are kept: ``sm = 1 - mean(pred)``, ``wfm = 0`` and
``fm = 0`` whatever the prediction, E-measure counts the pixels predicted as background.

IoU and Dice are computed here from the raw (resized, un-stretched) probability binarised at
``prob > threshold``, the decision the model actually makes, per image and then averaged.
"""

from __future__ import annotations

import cv2
import numpy as np
import py_sod_metrics

METRIC_KEYS = ("sm", "wfm", "em_mean", "em_adp", "em_max", "fm_mean", "fm_adp", "fm_max", "mae", "iou", "dice")

_ALIASES = {"em": "em_mean", "fm": "fm_mean"}

HIGHER_IS_BETTER = {**{key: key != "mae" for key in METRIC_KEYS}, "em": True, "fm": True, "loss": False}

HEADERS = {
    "sm": "Sm", "wfm": "Fwb", "em_mean": "mE", "em_adp": "adpE", "em_max": "maxE",
    "fm_mean": "mF", "fm_adp": "adpF", "fm_max": "maxF", "mae": "MAE", "iou": "IoU", "dice": "Dice",
    "loss": "Loss",
}

DEFAULT_THRESHOLD = 0.5  # IoU/Dice: foreground where prob > 0.5 (train's --threshold default)

# beta^2 of the F-measure, the field's choice (Achanta et al. 2009); PySODMetrics' default too.
FMEASURE_BETA2 = 0.3


def resolve_monitor(name: str) -> tuple[str, bool]:
    """Map a ``--monitor`` name to ``(results key, higher_is_better)``.

    Accepts every key of ``HIGHER_IS_BETTER``: the result keys, the aliases ``em`` -> ``em_mean``
    and ``fm`` -> ``fm_mean``, and ``loss`` (validation loss, lower is better).
    """
    key = str(name).strip().lower()
    if key not in HIGHER_IS_BETTER:
        raise ValueError(f"unknown monitor {name!r}; choose one of: {', '.join(HIGHER_IS_BETTER)}")
    return _ALIASES.get(key, key), HIGHER_IS_BETTER[key]


def _to_numpy_2d(x, name: str) -> np.ndarray:
    """A numpy array or torch tensor, HxW or with leading singleton dims (1xHxW), as HxW numpy."""
    if not isinstance(x, np.ndarray) and hasattr(x, "detach"):  # torch tensor, without importing torch
        x = x.detach().cpu()
        if x.is_floating_point():
            x = x.float()  # float16 / bfloat16 -> float32 (numpy has no bfloat16)
        x = x.numpy()
    x = np.asarray(x)
    shape = x.shape
    while x.ndim > 2 and x.shape[0] == 1:
        x = x[0]
    if x.ndim != 2 or x.size == 0:
        raise ValueError(f"{name} must be a non-empty HxW or 1xHxW map, got shape {shape}")
    return x


def to_probability(pred) -> np.ndarray:
    """HxW float32 probabilities in [0, 1] from floats in [0, 1], uint8 0-255 or bool."""
    pred = _to_numpy_2d(pred, "pred")
    if pred.dtype == np.uint8:
        return pred.astype(np.float32) / 255.0
    if pred.dtype == bool:
        return pred.astype(np.float32)
    if not np.issubdtype(pred.dtype, np.floating):
        raise TypeError(f"pred must be float probabilities in [0, 1] or uint8 0-255, got dtype {pred.dtype}")
    pred = pred.astype(np.float32)
    lo, hi = float(pred.min()), float(pred.max())
    if not (lo >= -1e-6 and hi <= 1.0 + 1e-6):  # also catches NaN
        raise ValueError(f"pred must be probabilities in [0, 1], got min {lo:.4g}, max {hi:.4g}; "
                         "apply sigmoid to logits first")
    return np.clip(pred, 0.0, 1.0)


def to_mask(gt) -> np.ndarray:
    """HxW bool foreground mask from bool, 0/1 (int or float) or 0-255 grey (foreground > 128, as PySODMetrics)."""
    gt = _to_numpy_2d(gt, "gt")
    if gt.dtype == bool:
        return gt
    if not (np.issubdtype(gt.dtype, np.integer) or np.issubdtype(gt.dtype, np.floating)):
        raise TypeError(f"gt must be a bool, 0/1 or 0-255 mask, got dtype {gt.dtype}")
    return gt > 0.5 if gt.max() <= 1 else gt > 128


def binary_iou_dice(pred_mask: np.ndarray, gt_mask: np.ndarray) -> tuple[float, float]:
    """IoU = |P&G| / |P|G| and Dice = 2|P&G| / (|P| + |G|) of two bool masks.

    Both empty scores 1.0 for both (nothing to find, nothing predicted: a correct answer);
    exactly one empty scores 0.0.
    """
    inter = int(np.count_nonzero(pred_mask & gt_mask))
    p, g = int(np.count_nonzero(pred_mask)), int(np.count_nonzero(gt_mask))
    if p + g == 0:
        return 1.0, 1.0
    return inter / (p + g - inter), 2.0 * inter / (p + g)


class SegMetrics:
    """Accumulates one image at a time; ``results()`` gives the mean over images of ``METRIC_KEYS``.

    ``step(pred, gt)``:
      * ``pred``: HxW (or 1xHxW) numpy array or torch tensor, float probabilities in [0, 1]
        (logits are rejected) or uint8 0-255;
      * ``gt``: HxW (or 1xHxW) bool, 0/1 or 0/255 mask at the ground truth's *own* resolution.
        A ``pred`` of another size is resized to it with ``cv2.INTER_LINEAR`` on float32.

    ``sm``, ``wfm``, ``mae`` and the adaptive scores are means over images of PySODMetrics'
    per-image values; ``em_mean``/``fm_mean`` and ``em_max``/``fm_max`` are the mean and max of the
    per-threshold curve averaged over images (PySODMetrics' convention: max of the mean curve, not
    mean of per-image maxima). F-measure uses beta^2 = 0.3, weighted F beta = 1. ``iou`` and
    ``dice`` binarise the raw probability at ``prob > threshold`` (see ``binary_iou_dice``).
    """

    def __init__(self, threshold: float = DEFAULT_THRESHOLD):
        if not 0.0 < threshold < 1.0:
            raise ValueError(f"threshold must be in (0, 1), got {threshold}")
        self.threshold = float(threshold)
        self._sm = py_sod_metrics.Smeasure()
        self._wfm = py_sod_metrics.WeightedFmeasure()
        self._em = py_sod_metrics.Emeasure()
        self._mae = py_sod_metrics.MAE()
        # FmeasureV2's handler gives the same numbers as the deprecated ``Fmeasure`` class (tested).
        self._fm = py_sod_metrics.FmeasureV2(
            {"fm": py_sod_metrics.FmeasureHandler(with_dynamic=True, with_adaptive=True, beta=FMEASURE_BETA2)})
        self._ious: list[float] = []
        self._dices: list[float] = []

    def __len__(self) -> int:
        return len(self._ious)

    def step(self, pred, gt) -> None:
        gt_mask = to_mask(gt)
        prob = to_probability(pred)
        h, w = gt_mask.shape
        if prob.shape != (h, w):
            prob = np.clip(cv2.resize(prob, (w, h), interpolation=cv2.INTER_LINEAR), 0.0, 1.0)

        pred_u8 = np.rint(prob * 255.0).astype(np.uint8)
        gt_u8 = gt_mask.astype(np.uint8) * 255
        for metric in (self._sm, self._wfm, self._em, self._mae, self._fm):
            metric.step(pred=pred_u8, gt=gt_u8)

        iou, dice = binary_iou_dice(prob > self.threshold, gt_mask)
        self._ious.append(iou)
        self._dices.append(dice)

    # ---- merging the images scored by several processes (DDP validation) ----------------------
    def _accumulators(self) -> list[list]:
        """Every per-image list this object and PySODMetrics' objects append to, in a fixed order
        (found by walking their attributes, so a PySODMetrics release that adds one is covered)."""
        found: list[list] = []

        def walk(obj, depth=0):
            for _, value in sorted(vars(obj).items()):
                if isinstance(value, list):
                    found.append(value)
                elif isinstance(value, dict) and depth < 3:
                    for _, v in sorted(value.items()):
                        if hasattr(v, "__dict__"):
                            walk(v, depth + 1)
                elif hasattr(value, "__dict__") and type(value).__module__.startswith("py_sod_metrics") \
                        and depth < 3:
                    walk(value, depth + 1)

        for metric in (self._sm, self._wfm, self._em, self._mae, self._fm):
            walk(metric)
        return [*found, self._ious, self._dices]

    def state(self) -> list[list]:
        """The per-image values scored so far (picklable), for ``extend`` in another process."""
        return [list(acc) for acc in self._accumulators()]

    def extend(self, state: list[list]) -> None:
        """Add the images another ``SegMetrics`` scored (its ``state()``), as if scored here."""
        accs = self._accumulators()
        if len(accs) != len(state):
            raise ValueError("SegMetrics.extend: a state from another PySODMetrics version")
        for acc, values in zip(accs, state):
            acc.extend(values)

    def results(self) -> dict[str, float]:
        if not len(self):
            raise RuntimeError("SegMetrics.results() called before any step(): no images were scored")
        em = self._em.get_results()["em"]
        fm = self._fm.get_results()["fm"]
        out = {
            "sm": self._sm.get_results()["sm"],
            "wfm": self._wfm.get_results()["wfm"],
            "em_mean": em["curve"].mean(),
            "em_adp": em["adp"],
            "em_max": em["curve"].max(),
            "fm_mean": fm["dynamic"].mean(),
            "fm_adp": fm["adaptive"],
            "fm_max": fm["dynamic"].max(),
            "mae": self._mae.get_results()["mae"],
            "iou": np.mean(self._ious),
            "dice": np.mean(self._dices),
        }
        return {key: float(out[key]) for key in METRIC_KEYS}


def format_table(rows: dict[str, dict[str, float]],
                 columns: tuple[str, ...] = ("sm", "wfm", "em_mean", "mae", "iou", "dice"),
                 digits: int = 3) -> str:
    """One line per dataset, the field's layout: ``Dataset  Sm  Fwb  mE  MAE  IoU  Dice``.

    Extra keys in a row (e.g. ``loss``) are ignored; a missing one prints ``-``.
    """
    unknown = [c for c in columns if c not in HEADERS]
    if unknown:
        raise ValueError(f"unknown column(s) {unknown}; choose from: {', '.join(HEADERS)}")
    name_w = max([len("Dataset"), *map(len, rows)])
    col_w = max(digits + 2, *(len(HEADERS[c]) for c in columns))

    def cell(row: dict, key: str) -> str:
        return f"{row[key]:.{digits}f}" if key in row else "-"

    lines = ["  ".join([f"{'Dataset':<{name_w}}", *(f"{HEADERS[c]:>{col_w}}" for c in columns)])]
    for name, row in rows.items():
        lines.append("  ".join([f"{name:<{name_w}}", *(f"{cell(row, c):>{col_w}}" for c in columns)]))
    return "\n".join(lines)
