"""SegMetrics against PySODMetrics called directly, and IoU/Dice/table/monitor on hand-made cases."""

import warnings

import cv2
import numpy as np
import py_sod_metrics
import pytest
import torch

from evaluation import (
    HIGHER_IS_BETTER,
    METRIC_KEYS,
    SegMetrics,
    binary_iou_dice,
    format_table,
    resolve_monitor,
)

SOD_KEYS = tuple(k for k in METRIC_KEYS if k not in ("iou", "dice"))


# ---------------------------------------------------------------------------------------------
# cases (non-square on purpose, so a swapped H/W shows up)
# ---------------------------------------------------------------------------------------------

def disk(h=72, w=96, cy=30, cx=50, r=18) -> np.ndarray:
    yy, xx = np.mgrid[:h, :w]
    return ((yy - cy) ** 2 + (xx - cx) ** 2 <= r * r).astype(np.uint8)  # 0/1, as data.load_mask gives


def blurred(mask: np.ndarray, shift=(3, -4), sigma=3.0) -> np.ndarray:
    """A soft prediction: the mask, shifted and Gaussian-blurred, as float probabilities in [0, 1]."""
    moved = np.roll(mask.astype(np.float32), shift, axis=(0, 1))
    return np.clip(cv2.GaussianBlur(moved, (0, 0), sigma), 0.0, 1.0)


def noisy(mask: np.ndarray, seed=0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    return np.clip(0.6 * blurred(mask) + 0.4 * rng.random(mask.shape, dtype=np.float32), 0.0, 1.0)


def reference(pairs) -> dict:
    """PySODMetrics fed directly: pred rounded to uint8 0-255 (resized bilinear first), gt 0/255."""
    sm, wfm, em, mae = (py_sod_metrics.Smeasure(), py_sod_metrics.WeightedFmeasure(),
                        py_sod_metrics.Emeasure(), py_sod_metrics.MAE())
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # Fmeasure warns that it is deprecated in favour of FmeasureV2
        fm = py_sod_metrics.Fmeasure(beta=0.3)
    for prob, gt in pairs:
        h, w = gt.shape
        if prob.shape != gt.shape:
            prob = cv2.resize(prob.astype(np.float32), (w, h), interpolation=cv2.INTER_LINEAR)
        pred = np.rint(np.clip(prob, 0, 1) * 255).astype(np.uint8)
        gt255 = (gt > 0).astype(np.uint8) * 255
        for m in (sm, wfm, em, mae, fm):
            m.step(pred=pred, gt=gt255)
    e, f = em.get_results()["em"], fm.get_results()["fm"]
    return {"sm": sm.get_results()["sm"], "wfm": wfm.get_results()["wfm"],
            "em_mean": e["curve"].mean(), "em_adp": e["adp"], "em_max": e["curve"].max(),
            "fm_mean": f["curve"].mean(), "fm_adp": f["adp"], "fm_max": f["curve"].max(),
            "mae": mae.get_results()["mae"]}


def scored(pairs, threshold=0.5) -> dict:
    m = SegMetrics(threshold=threshold)
    for prob, gt in pairs:
        m.step(prob, gt)
    assert len(m) == len(pairs)
    return m.results()


def assert_matches_reference(pairs):
    got, want = scored(pairs), reference(pairs)
    assert set(got) == set(METRIC_KEYS)
    assert all(type(v) is float for v in got.values())
    for key in SOD_KEYS:
        assert got[key] == pytest.approx(want[key], rel=1e-9, abs=1e-12), key


# ---------------------------------------------------------------------------------------------
# agreement with PySODMetrics
# ---------------------------------------------------------------------------------------------

@pytest.mark.parametrize("case", ["blob_blurred", "blob_noisy", "empty_gt", "full_gt"])
def test_single_image_matches_pysodmetrics(case):
    gt = disk()
    prob = {"blob_blurred": blurred(gt), "blob_noisy": noisy(gt),
            "empty_gt": 0.3 * blurred(gt), "full_gt": noisy(gt)}[case]
    if case == "empty_gt":
        gt = np.zeros_like(gt)
    if case == "full_gt":
        gt = np.ones_like(gt)
    assert_matches_reference([(prob, gt)])


def test_prediction_at_another_size_is_resized_bilinear_to_gt():
    gt = disk(h=97, w=131, cy=40, cx=70, r=25)
    prob = cv2.resize(blurred(gt), (50, 36), interpolation=cv2.INTER_AREA)  # network output size
    assert prob.shape != gt.shape
    assert_matches_reference([(prob, gt)])
    # and the resize matters: scoring the small map against a nearest-resized GT gives other numbers
    small_gt = cv2.resize(gt, (50, 36), interpolation=cv2.INTER_NEAREST)
    assert scored([(prob, small_gt)])["sm"] != pytest.approx(scored([(prob, gt)])["sm"], abs=1e-6)


def test_several_images_accumulate_like_pysodmetrics():
    pairs = [
        (blurred(disk()), disk()),
        (noisy(disk(h=64, w=64, cy=20, cx=40, r=10), seed=1), disk(h=64, w=64, cy=20, cx=40, r=10)),
        (0.2 * noisy(disk(), seed=2), np.zeros((72, 96), np.uint8)),
        (cv2.resize(blurred(disk(80, 60, 40, 30, 20)), (30, 40)), disk(80, 60, 40, 30, 20)),
    ]
    assert_matches_reference(pairs)
    # iou/dice are plain means of the per-image values
    per_image = [scored([p]) for p in pairs]
    got = scored(pairs)
    for key in ("iou", "dice"):
        assert got[key] == pytest.approx(np.mean([r[key] for r in per_image]))


def test_fmeasure_v2_handler_equals_deprecated_fmeasure():
    """SegMetrics uses FmeasureV2; the field's numbers come from the old Fmeasure class."""
    pairs = [(noisy(disk(), seed=s), disk()) for s in range(3)] + [(blurred(disk()), np.zeros((72, 96), np.uint8))]
    got, want = scored(pairs), reference(pairs)
    for key in ("fm_mean", "fm_adp", "fm_max"):
        assert got[key] == pytest.approx(want[key], rel=1e-12), key


# ---------------------------------------------------------------------------------------------
# golden values and conventions
# ---------------------------------------------------------------------------------------------

def test_perfect_prediction():
    gt = disk()
    r = scored([(gt.astype(np.float32), gt)])
    assert r["sm"] == pytest.approx(1.0)
    assert r["mae"] == 0.0
    assert r["iou"] == 1.0 and r["dice"] == 1.0
    assert r["wfm"] == pytest.approx(1.0)
    assert r["em_max"] == pytest.approx(1.0, abs=1e-3)
    assert r["fm_max"] == pytest.approx(1.0)


def test_empty_gt_conventions():
    """Empty GT and empty prediction: sm/iou/dice 1, mae 0; PySODMetrics scores wfm and fm 0."""
    gt = np.zeros((40, 50), np.uint8)
    r = scored([(np.zeros((40, 50), np.float32), gt)])
    assert r["sm"] == 1.0 and r["mae"] == 0.0
    assert r["iou"] == 1.0 and r["dice"] == 1.0
    assert r["wfm"] == 0.0 and r["fm_max"] == 0.0


def test_gt_and_pred_encodings_agree():
    gt01 = disk()
    prob = noisy(gt01)
    base = scored([(prob, gt01)])
    pred_u8 = np.rint(prob * 255).astype(np.uint8)
    for pred, gt in [(prob, gt01 * 255), (prob, gt01.astype(bool)), (prob, gt01.astype(np.float32)),
                     (pred_u8, gt01)]:
        r = scored([(pred, gt)])
        for key in METRIC_KEYS:
            assert r[key] == pytest.approx(base[key], abs=1e-6), key


def test_torch_tensors_and_1xhxw_inputs():
    gt = disk()
    prob = noisy(gt)
    base = scored([(prob, gt)])
    variants = [
        (torch.from_numpy(prob), torch.from_numpy(gt)),
        (torch.from_numpy(prob)[None], torch.from_numpy(gt)[None]),  # 1xHxW
        (prob[None], gt[None]),
        (torch.from_numpy(prob)[None, None].to(torch.float64), torch.from_numpy(gt).bool()),  # 1x1xHxW
    ]
    for pred, g in variants:
        assert scored([(pred, g)]) == base
    half = scored([(torch.from_numpy(prob).half(), torch.from_numpy(gt))])  # AMP output
    assert half["sm"] == pytest.approx(base["sm"], abs=1e-2)


def test_bad_inputs_are_rejected():
    m = SegMetrics()
    gt = disk()
    with pytest.raises(ValueError, match="sigmoid"):
        m.step(blurred(gt) * 6 - 3, gt)  # logits
    with pytest.raises(ValueError, match="sigmoid"):
        m.step(np.full(gt.shape, np.nan, np.float32), gt)
    with pytest.raises(ValueError, match="HxW"):
        m.step(np.zeros((2, 72, 96), np.float32), gt)
    with pytest.raises(RuntimeError, match="no images"):
        m.results()
    with pytest.raises(ValueError, match="threshold"):
        SegMetrics(threshold=1.0)


# ---------------------------------------------------------------------------------------------
# IoU / Dice by hand
# ---------------------------------------------------------------------------------------------

def test_iou_dice_hand_computed():
    gt = np.zeros((4, 4), bool)
    gt[:2, :2] = True                       # 4 px
    pred = np.zeros((4, 4), bool)
    pred[:2, 1:3] = True                    # 4 px, 2 of them on the GT
    assert binary_iou_dice(pred, gt) == pytest.approx((2 / 6, 2 * 2 / 8))
    assert binary_iou_dice(gt, gt) == (1.0, 1.0)
    empty = np.zeros((4, 4), bool)
    assert binary_iou_dice(empty, empty) == (1.0, 1.0)   # both empty: correct answer
    assert binary_iou_dice(empty, gt) == (0.0, 0.0)      # missed object
    assert binary_iou_dice(gt, empty) == (0.0, 0.0)      # false alarm


def test_iou_dice_threshold_is_strict_on_raw_probability():
    gt = np.tile(np.array([[1, 1, 0, 0]], np.uint8), (4, 1))  # 4 rows: PySODMetrics' Sm needs > 1 row
    prob = np.tile(np.array([[0.9, 0.5, 0.4, 0.0]], np.float32), (4, 1))
    r = scored([(prob, gt)])                 # 0.5 is background: P = {0}
    assert (r["iou"], r["dice"]) == pytest.approx((1 / 2, 2 / 3))
    r = scored([(prob, gt)], threshold=0.3)  # P = {0, 1, 2}
    assert (r["iou"], r["dice"]) == pytest.approx((2 / 3, 4 / 5))
    # the binarisation uses the raw map, not PySODMetrics' min-max stretched one
    faint = np.tile(np.array([[0.2, 0.2, 0.0, 0.0]], np.float32), (4, 1))
    assert scored([(faint, gt)])["iou"] == 0.0


def test_iou_dice_both_empty_and_missed_through_segmetrics():
    empty_gt = np.zeros((8, 8), np.uint8)
    gt = np.zeros((8, 8), np.uint8)
    gt[2:5, 2:5] = 1
    low = np.full((8, 8), 0.1, np.float32)
    r = scored([(low, empty_gt), (low, gt)])
    assert r["iou"] == pytest.approx(0.5) and r["dice"] == pytest.approx(0.5)


# ---------------------------------------------------------------------------------------------
# monitor names and the table
# ---------------------------------------------------------------------------------------------

def test_resolve_monitor():
    assert resolve_monitor("em") == ("em_mean", True)
    assert resolve_monitor("fm") == ("fm_mean", True)
    assert resolve_monitor("MAE") == ("mae", False)
    assert resolve_monitor("loss") == ("loss", False)
    for name in ("iou", "dice", "sm", "wfm", "em", "mae", "loss"):  # training.config.MONITOR_CHOICES
        key, _ = resolve_monitor(name)
        assert key in METRIC_KEYS or key == "loss"
    assert all(k in HIGHER_IS_BETTER for k in METRIC_KEYS)
    with pytest.raises(ValueError, match="iou.*dice"):
        resolve_monitor("accuracy")


def test_format_table():
    rows = {"CAMO": {"sm": 0.81234, "wfm": 0.7, "em_mean": 0.88888, "mae": 0.0456, "iou": 0.65, "dice": 0.7777,
                     "loss": 0.3},
            "COD10K": {"sm": 0.8}}
    lines = format_table(rows).splitlines()
    assert lines[0].split() == ["Dataset", "Sm", "Fwb", "mE", "MAE", "IoU", "Dice"]
    assert lines[1] == "CAMO     0.812  0.700  0.889  0.046  0.650  0.778"
    assert lines[2].split() == ["COD10K", "0.800", "-", "-", "-", "-", "-"]
    assert len({len(line) for line in lines}) == 1
    with pytest.raises(ValueError, match="unknown column"):
        format_table(rows, columns=("sm", "nope"))
