"""Scoring in worker processes (``--metric-workers``, evaluation/pool.py): the in-process numbers exactly,
the in-process one-line error for an unreadable mask, no process left behind, and a signal to the
process group during validation stops the run as it does without workers."""

import csv
import json
import os
import shutil
import signal
import subprocess
import sys
import time

import cv2
import numpy as np
import pytest
import torch

import train_ultimate
from core.errors import UserError
from evaluation.pool import CHUNK, MetricPool, PoolScorer, default_metric_workers
from evaluation.scorer import Scorer
from losses import build_loss
from models import build_model
from tests.helpers import REPO, finish, wait_for
from training import loop
from training.config import Config
from core.runtime import Runtime
from training.build import load_data, make_loader

TRAIN = ["--backbone", "edgenext_xx_small", "--no-pretrained", "--img-size", "64", "--epochs", "2",
         "--stage1-epochs", "1", "--limit-batches", "2", "--num-workers", "0", "--device", "cpu", "--no-progress",
         "--no-curves"]


@pytest.fixture(scope="module")
def demo96(demo):
    """Demo data at 96 px: the 64 px predictions are resized to the masks' size before scoring."""
    return demo(n_train=16, n_test=8, size=96, seed=2)


@pytest.fixture
def started(monkeypatch):
    """The pids of every worker a MetricPool starts in this test."""
    pids, real = [], MetricPool.start

    def start(self):
        real(self)
        pids.extend(pid for pid in self.pids if pid not in pids)

    monkeypatch.setattr(MetricPool, "start", start)
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


ORPHAN = """
import os, signal, sys
sys.path.insert(0, {repo!r})
from evaluation.pool import MetricPool

if __name__ == "__main__":
    pool = MetricPool(2)
    pool.start()
    with open({pids!r}, "w") as f:
        f.write(" ".join(map(str, pool.pids)))
    if {mid_message!r}:  # killed while sending a chunk: its first bytes only are in the task pipe
        import struct
        os.write(pool._tasks._writer.fileno(), struct.pack("!i", 1 << 20) + bytes(100))
    os.kill(os.getpid(), signal.SIGKILL)  # no close(), no atexit: the workers must notice by themselves
"""


@pytest.mark.e2e
@pytest.mark.parametrize("mid_message", [False, True])
def test_the_workers_exit_when_the_main_process_is_killed(tmp_path, mid_message):
    """Mid-message, a worker used to wait forever for the rest of the chunk (and kept the forkserver
    alive with it)."""
    script, pids_file = tmp_path / "orphan.py", tmp_path / "pids"
    script.write_text(ORPHAN.format(repo=REPO, pids=str(pids_file), mid_message=mid_message))
    rc = subprocess.run([sys.executable, str(script)], cwd=REPO, stdin=subprocess.DEVNULL,
                        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, timeout=120).returncode
    assert rc == -signal.SIGKILL
    pids = [int(p) for p in pids_file.read_text().split()]
    for _ in range(150):  # they look every second
        if all(gone(pid) for pid in pids):
            break
        time.sleep(0.2)
    left = [pid for pid in pids if not gone(pid)]
    for pid in left:
        os.kill(pid, signal.SIGKILL)
    assert len(pids) == 2 and not left


def test_the_default_is_num_workers_within_the_cpus(monkeypatch):
    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: set(range(8)))
    monkeypatch.delenv("LOCAL_WORLD_SIZE", raising=False)
    assert [default_metric_workers(n) for n in (0, 2, 7, 16)] == [0, 2, 7, 7]  # one CPU for the main process
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "4")  # torchrun: 4 processes share the 8 CPUs
    assert default_metric_workers(4) == 1
    assert Config(num_workers=1).effective_metric_workers == 1
    assert Config(num_workers=1, metric_workers=0).effective_metric_workers == 0


def test_validate_in_two_workers_equals_the_main_process(demo96, started):
    results = []
    for workers in (2, 0):
        cfg = Config(dataset_path=demo96, backbone="edgenext_xx_small", pretrained=False, img_size=64,
                     num_workers=0, metric_workers=workers, device="cpu", amp="off", progress=False,
                     val_split=0.5).validate()
        torch.manual_seed(0)
        model = build_model(backbone="edgenext_xx_small", pretrained=False)
        rt = Runtime("cpu", "off")
        _, _, val = load_data(cfg)
        results.append(loop.validate(cfg, rt, model, build_loss(), make_loader(cfg, rt, val, 3, train=False)))
    assert results[0] == results[1] and {"loss", "sm", "wfm", "iou"} <= set(results[0])
    assert len(started) == 2 and all(gone(pid) for pid in started)  # validate() ended the pool it started


def train(root, out, workers):
    assert train_ultimate.main(["train", "--dataset-path", root, "--checkpoint-dir", str(out),
                                "--metric-workers", str(workers), *TRAIN]) == 0
    with open(out / "metrics.csv") as f:
        return list(csv.reader(f)), json.loads((out / "test_metrics.json").read_text())["results"]


@pytest.mark.e2e
def test_train_and_evaluate_with_workers_equal_the_main_process(demo96, tmp_path, started, capsys):
    rows, test = train(demo96, tmp_path / "w2", 2)
    assert len(started) == 2 and all(gone(pid) for pid in started)  # one pool for the whole run
    assert (rows, test) == train(demo96, tmp_path / "w0", 0)
    assert len(rows) == 3 and "val_sm" in rows[0]

    ckpt = str(tmp_path / "w2" / "best_model.pth")
    reports = []
    for workers in ("2", "0"):
        out = tmp_path / f"eval{workers}"
        assert train_ultimate.main(["evaluate", "--checkpoint", ckpt, "--dataset-path", demo96, "--device", "cpu",
                                    "--num-workers", "0", "--no-progress", "--out-dir", str(out),
                                    "--metric-workers", workers]) == 0
        reports.append(json.loads((out / "eval_results.json").read_text())["results"])
    assert reports[0] == reports[1] and len(started) == 4 and all(gone(pid) for pid in started)

    broken = tmp_path / "broken"
    shutil.copytree(demo96, broken)
    bad = sorted((broken / "TestDataset" / "demo" / "GT").iterdir())[5]
    bad.write_bytes(b"\x89PNG these bytes are no image")
    capsys.readouterr()
    assert train_ultimate.main(["evaluate", "--checkpoint", ckpt, "--dataset-path", str(broken), "--device", "cpu",
                                "--num-workers", "0", "--no-progress", "--out-dir", str(tmp_path / "evalbad"),
                                "--metric-workers", "2"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: ") and str(bad) in err and "\n" not in err
    assert len(started) == 6 and all(gone(pid) for pid in started)


DRIVER = """
import os, sys, time
sys.path.insert(0, {repo!r})
from evaluation import pool
import train_ultimate

real_add, real_score, marker = pool.PoolScorer.add, pool._score_chunk, os.environ.get("SIGNAL_MARKER", "")

def add(self, probs, paths):
    real_add(self, probs, paths)
    if marker and not os.path.exists(marker):
        with open(marker + ".tmp", "w") as f:
            f.write(" ".join(map(str, self.pool.pids)))
        os.replace(marker + ".tmp", marker)
        time.sleep(4)  # the test signals the group now, with this validation's chunks in the workers

def score_for_an_hour(*task):
    time.sleep(3600)
    return real_score(*task)

pool.PoolScorer.add = add
if __name__ == "__main__":
    sys.exit(train_ultimate.main(sys.argv[1:]))
else:  # a metric worker, which imports this file as __mp_main__: its chunks are pending when the run stops
    pool._score_chunk = score_for_an_hour
"""


@pytest.mark.e2e
def test_a_signal_to_the_group_during_validation_reaches_only_the_main_process(demo96, tmp_path):
    driver, marker, out = tmp_path / "driver.py", str(tmp_path / "marker"), str(tmp_path / "killed")
    driver.write_text(DRIVER.format(repo=REPO))
    proc = subprocess.Popen([sys.executable, str(driver), "train", "--dataset-path", demo96, "--checkpoint-dir", out,
                             *TRAIN, "--metric-workers", "2", "--val-split", "0.5"], cwd=REPO,
                            env={**os.environ, "SIGNAL_MARKER": marker, "PYTHONUNBUFFERED": "1"},
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, start_new_session=True)
    wait_for(marker, proc)
    pids = [int(p) for p in open(marker).read().split()]
    try:
        os.killpg(proc.pid, signal.SIGTERM)  # the main process, the workers and the forkserver
        time.sleep(1.0)  # the main process sleeps 4 s in the driver: the workers ignored it
        assert len(pids) == 2 and not any(gone(pid) for pid in pids)
        rc, text = finish(proc)  # the pending chunks (an hour each) are not waited for
        assert rc == 128 + signal.SIGTERM, text
        assert "Traceback" not in text and "before its validation" in text, text
        assert all(gone(pid) for pid in pids)
        assert os.path.isfile(os.path.join(out, "last.pth"))
    finally:
        for pid in pids:
            if not gone(pid):
                os.kill(pid, signal.SIGKILL)
