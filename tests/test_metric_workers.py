"""Scoring in worker processes (evaluation/pool.py): the in-process numbers exactly, the in-process
one-line error for an unreadable mask, no process left behind."""

import os

import cv2
import numpy as np
import pytest
import torch

from errors import UserError
from evaluation.pool import CHUNK, MetricPool, PoolScorer
from evaluation.scorer import Scorer


@pytest.fixture
def started(monkeypatch):
    """The pids of every worker a MetricPool starts in this test."""
    pids, real = [], MetricPool._start

    def start(self):
        real(self)
        pids.extend(self.pids)

    monkeypatch.setattr(MetricPool, "_start", start)
    return pids


def gone(pid: int) -> bool:
    """No such process, or a zombie (it has exited)."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] == "Z"
    except FileNotFoundError:
        return True


def odd_masks(folder, n=11, seed=0):
    """``n`` 0/255 PNG masks of odd sizes (one empty, one full) and ``n`` 1 x 24 x 24 probability maps."""
    rng = np.random.default_rng(seed)
    paths = []
    for i in range(n):
        h, w = int(rng.integers(17, 90)) | 1, int(rng.integers(17, 90)) | 1
        mask = cv2.GaussianBlur(rng.random((h, w)), (0, 0), 3) > 0.5
        mask = np.zeros((h, w), bool) if i == 2 else np.ones((h, w), bool) if i == 5 else mask
        paths.append(str(folder / f"m{i:02d}.png"))
        cv2.imwrite(paths[-1], mask.astype(np.uint8) * 255)
    return torch.rand(n, 1, 24, 24, generator=torch.Generator().manual_seed(seed)), paths


def add_unevenly(scorer, probs, paths):
    """Batches of 3, 5 (as a list of numpy maps) and the rest: across the chunk boundaries."""
    assert CHUNK not in (3, 5)
    scorer.add(probs[:3], paths[:3])
    scorer.add([p.numpy() for p in probs[3:8]], paths[3:8])
    scorer.add(probs[8:], paths[8:])


def same_state(a, b) -> bool:
    return len(a) == len(b) and all(len(x) == len(y) and all(np.array_equal(u, v) for u, v in zip(x, y))
                                    for x, y in zip(a, b))


def test_the_pool_scores_exactly_as_the_main_process(tmp_path, started):
    probs, paths = odd_masks(tmp_path)
    ref = Scorer(threshold=0.4)
    add_unevenly(ref, probs, paths)
    expected = ref.results()
    order = np.random.default_rng(1).permutation(len(paths))
    with MetricPool(2) as pool:
        scorer = pool.scorer(threshold=0.4)
        assert isinstance(scorer, PoolScorer)
        add_unevenly(scorer, probs, paths)
        assert len(scorer) == len(paths)
        assert scorer.results() == expected  # every key, bit for bit
        assert same_state(scorer.metrics.state(), ref.metrics.state())  # every per-image value, in order

        shuffled = pool.scorer(threshold=0.4)  # the same workers, the images in another order
        shuffled.add(probs[order], [paths[i] for i in order])
        got = shuffled.results()
    assert got == pytest.approx(expected, rel=0, abs=1e-12)
    per_image = [[acc[i] for i in order] for acc in ref.metrics.state()]
    assert same_state(shuffled.metrics.state(), per_image)
    assert len(started) == 2 and all(gone(pid) for pid in started)
    assert isinstance(MetricPool(0).scorer(), Scorer) and not isinstance(MetricPool(0).scorer(), PoolScorer)


def test_an_unreadable_mask_is_the_in_process_one_line_error(tmp_path, started):
    probs, paths = odd_masks(tmp_path, n=6)
    with open(paths[4], "wb") as f:
        f.write(b"\x89PNG these bytes are no image")
    with pytest.raises(UserError) as in_process:
        Scorer().add(probs, paths)
    with MetricPool(2) as pool, pytest.raises(UserError) as in_workers:
        scorer = pool.scorer()
        scorer.add(probs, paths)
        scorer.results()
    assert str(in_workers.value) == str(in_process.value) and paths[4] in str(in_process.value)
    assert "\n" not in str(in_workers.value)
    assert len(started) == 2 and all(gone(pid) for pid in started)
