"""Tests of data/scan.py: every sample of a split is read before training; bad files are named."""

from __future__ import annotations

import os

import cv2
import numpy as np
import pytest

from data import Sample, find_dataset, make_demo_dataset
from data.scan import EMPTY_FRACTION, scan_samples
from core.errors import UserError


@pytest.fixture(scope="module")
def broken_demo(tmp_path_factory):
    """A small demo dataset (SINet layout) with one corrupt training image and one image without a mask."""
    root = make_demo_dataset(str(tmp_path_factory.mktemp("scan") / "demo"), n_train=12, n_test=4, size=48)
    imgs, gts = os.path.join(root, "TrainDataset", "Imgs"), os.path.join(root, "TrainDataset", "GT")
    corrupt = os.path.join(imgs, "train-0003.jpg")
    with open(corrupt, "wb") as f:
        f.write(np.random.default_rng(0).integers(0, 256, 4096, dtype=np.uint8).tobytes())
    os.remove(os.path.join(gts, "train-0007.png"))
    return root, corrupt, os.path.join(imgs, "train-0007.jpg")


def test_missing_mask_is_an_error_unless_allowed(broken_demo):
    root, _, unpaired = broken_demo
    with pytest.raises(UserError, match="train-0007.jpg"):
        find_dataset(root)
    idx = find_dataset(root, allow_missing_masks=True)
    assert [s.mask for s in idx.train if s.image == unpaired] == [None]


@pytest.mark.parametrize("num_workers", [0, 2])
def test_scan_names_the_corrupt_image_and_the_unpaired_one(broken_demo, num_workers):
    root, corrupt, unpaired = broken_demo
    idx = find_dataset(root, allow_missing_masks=True)
    report = scan_samples(idx.train, num_workers=num_workers)
    assert [b.path for b in report.bad] == [corrupt, unpaired]
    assert "cannot decode image" in report.bad[0].reason and "no mask" in report.bad[1].reason
    for b in report.bad:
        assert b.path in b.reason and "\n" not in b.reason
    assert report.good == [s for s in idx.train if s.image not in (corrupt, unpaired)]  # order kept
    assert len(report.good) == 10 and report.empty == [] and report.empty_fraction == 0.0
    assert "2 bad" in report.summary()

    test = scan_samples(idx.tests["demo"], num_workers=num_workers)  # test splits alike
    assert test.bad == [] and len(test.good) == 4


def test_scan_counts_empty_masks_and_unreadable_masks(tmp_path):
    img = np.full((40, 50, 3), 90, np.uint8)
    samples = []
    for i, fg in enumerate([0, 1, 200, 2000]):  # pixels of foreground out of 2000
        mask = np.zeros(2000, np.uint8)
        mask[:fg] = 255
        cv2.imwrite(str(tmp_path / f"{i}.jpg"), img)
        cv2.imwrite(str(tmp_path / f"{i}.png"), mask.reshape(40, 50))
        samples.append(Sample(str(tmp_path / f"{i}.jpg"), str(tmp_path / f"{i}.png"), str(i)))
    (tmp_path / "bad.png").write_bytes(b"\x89PNG\r\n\x1a\n truncated")
    samples.append(Sample(samples[0].image, str(tmp_path / "bad.png"), "x"))
    noise = np.random.default_rng(0).integers(0, 256, (40, 50, 3), dtype=np.uint8)
    whole = cv2.imencode(".jpg", noise)[1].tobytes()
    (tmp_path / "cut.jpg").write_bytes(whole[: len(whole) // 2])  # a valid header, half a body
    samples.append(Sample(str(tmp_path / "cut.jpg"), samples[0].mask, "cut"))

    report = scan_samples(samples)
    assert 1 / 2000 < EMPTY_FRACTION  # one pixel in 2000 counts as empty
    assert [s.name for s in report.empty] == ["0", "1"] and report.empty_fraction == 0.5
    assert [b.path for b in report.bad] == [str(tmp_path / "bad.png"), str(tmp_path / "cut.jpg")]
    assert "mask" in report.bad[0].reason and "image" in report.bad[1].reason
    with pytest.raises(ValueError):
        scan_samples(samples, num_workers=-1)
