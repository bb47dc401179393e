"""The run tools: ``lr-find``, ``curves.png``, ``compare`` and the TensorBoard logger.

Runs are tiny (CPU, edgenext_xx_small, 64 px, 2 experts, a few batches) on generated data.
"""

import csv
import logging
import math
import os
import re
import sys
import types

import cv2
import numpy as np
import pytest
import torch

import train_ultimate
from training.report.curves import draw_curves
from tools.lr_find import LRFindResult, suggest
from training.report.tensorboard import TensorBoardLogger

TINY = ["--backbone", "edgenext_xx_small", "--no-pretrained", "--img-size", "64", "--num-workers", "0",
        "--no-progress", "--num-experts", "2", "--decoder-channels", "16", "--batch-size", "2"]
PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    """Tiny runs on a shared 2-core box: a second intra-op thread mostly waits."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="module")
def runs(demo, tmp_path_factory):
    """Two tiny 3-epoch runs (stage 1 then 2) that differ in --lr: {'data': root, 'a': dir, 'b': dir}.
    The only training runs of the suite that draw curves.png (the others pass --no-curves)."""
    base = tmp_path_factory.mktemp("tools")
    root = demo(n_train=12, n_test=2, size=64, seed=3)
    out = {"data": root}
    for name, lr in (("run_a", "1e-3"), ("run_b", "3e-4")):
        folder = str(base / name)
        assert train_ultimate.main(["train", "--dataset-path", root, "--checkpoint-dir", folder, "--epochs", "3",
                                    "--stage1-epochs", "1", "--limit-batches", "2", "--lr", lr, *TINY]) == 0
        out[name[-1]] = folder
    # fit() leaves its train.log handler on the 'cod' logger (one process per run on the command line);
    # here, in one process, later commands' log lines would otherwise land in these runs' train.log
    cod = logging.getLogger("cod")
    for h in [h for h in cod.handlers if isinstance(h, logging.FileHandler)]:
        cod.removeHandler(h)
        h.close()
    return out


def snapshot(folder):
    return {name: open(os.path.join(folder, name), "rb").read() for name in sorted(os.listdir(folder))}


def assert_png(path):
    data = open(path, "rb").read()
    assert data[:8] == PNG_SIGNATURE, path
    img = cv2.imdecode(np.frombuffer(data, np.uint8), cv2.IMREAD_COLOR)
    assert img is not None and img.shape[0] > 100 and img.shape[1] > 100, path


def suggested_lr(out: str) -> float:
    m = re.search(r"^suggested LR: (\S+) \(rule: ", out, flags=re.M)
    assert m, out
    return float(m.group(1))


# ---- lr-find -----------------------------------------------------------------------------------

@pytest.mark.e2e
def test_lr_find_suggests_a_finite_lr_and_leaves_the_run_alone(runs, capsys):
    folder = runs["a"]
    before = snapshot(folder)
    assert train_ultimate.main(["lr-find", "--dataset-path", runs["data"], "--checkpoint-dir", folder,
                                "--resume-from", os.path.join(folder, "best_model.pth"),
                                "--lr-find-steps", "30", *TINY]) == 0
    lr = suggested_lr(capsys.readouterr().out)
    assert math.isfinite(lr) and 1e-8 <= lr <= 1.0
    after = snapshot(folder)
    assert set(after) - set(before) == {"lr_find.csv", "lr_find.png"}
    for name in before:  # best_model.pth, last.pth, config.json, metrics.csv, train.log ...
        assert after[name] == before[name], f"lr-find changed {name}"
    assert_png(os.path.join(folder, "lr_find.png"))
    with open(os.path.join(folder, "lr_find.csv"), newline="") as f:
        rows = list(csv.DictReader(f))
    assert list(rows[0]) == ["step", "lr", "loss", "smoothed"] and 2 <= len(rows) <= 30
    lrs = [float(r["lr"]) for r in rows]
    assert lrs[0] == pytest.approx(1e-7) and all(b > a for a, b in zip(lrs, lrs[1:]))
    assert float(rows[0]["smoothed"]) == float(rows[0]["loss"])  # bias-corrected EMA starts at the loss


@pytest.mark.e2e
def test_lr_find_stage1_stops_when_the_loss_blows_up(runs, tmp_path, capsys):
    out = tmp_path / "fresh"
    assert train_ultimate.main(["lr-find", "--dataset-path", runs["data"], "--checkpoint-dir", str(out),
                                "--stage", "1", "--accumulation-steps", "2", "--lr-find-steps", "30",
                                "--lr-find-start", "1e-3", "--lr-find-end", "1e4", *TINY]) == 0
    text = capsys.readouterr().out
    assert "stopped: the smoothed loss passed 4x its minimum" in text or "stopped: the loss became" in text
    assert math.isfinite(suggested_lr(text))
    assert sorted(os.listdir(out)) == ["lr_find.csv", "lr_find.png"]  # no config.json, train.log, ...


def test_lr_find_rejects_a_bad_range(capsys):
    assert train_ultimate.main(["lr-find", "--lr-find-start", "1", "--lr-find-end", "0.1"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: --lr-find-start")


def test_suggestion_is_the_smoothed_minimum_over_ten():
    lrs = list(np.logspace(-6, 0, 61))
    # falls fastest around 1e-3, bottoms out at 1e-1, then climbs
    smoothed = [2.0 - math.tanh(2 * (math.log10(lr) + 3)) + (max(0.0, math.log10(lr) + 1) * 10) ** 2
                for lr in lrs]
    smoothed[-1] = math.nan  # a diverged last update is left out
    res = suggest(LRFindResult(lrs=lrs, losses=smoothed, smoothed=smoothed))
    assert res.lr_min == pytest.approx(1e-1, rel=0.3)
    assert res.suggestion == pytest.approx(res.lr_min / 10)
    assert res.lr_steepest == pytest.approx(1e-3, rel=0.3)


# ---- curves.png --------------------------------------------------------------------------------

def synthetic_history(epochs=150, stage1=30):
    rows = []
    for e in range(1, epochs + 1):
        level = 0 if e <= stage1 else min(5, 1 + (e - stage1 - 1) // 10)
        rows.append({"epoch": e, "stage": 1 if e <= stage1 else 2, "unfreeze_level": level,
                     "lr": 2.5e-4 * (1 + math.cos(math.pi * (e % 40) / 40)) / 2 + 1e-6,
                     "train_loss": 2 / e ** 0.3, "train_bce": 1 / e ** 0.3, "train_iou": 0.6 / e ** 0.3,
                     "train_dice": 0.4 / e ** 0.3, "train_moe_aux": 0.01, "val_loss": 2.1 / e ** 0.25,
                     "val_iou": 0.7 * (1 - math.exp(-e / 30)), "val_dice": 0.8 * (1 - math.exp(-e / 30)),
                     "val_sm": 0.75, "val_wfm": 0.6, "val_em_mean": 0.8, "val_mae": 0.05,
                     "expert0_usage": 0.5, "expert1_usage": 0.5})
    return rows


def test_curves_png_from_a_synthetic_history(tmp_path):
    events = [{"epoch": 85, "kind": "restart", "text": "LR restart"},
              {"epoch": 100, "kind": "rollback", "text": "rollback to epoch 98"}]
    history = synthetic_history()
    lr_steps = [(e / 10, 1e-4) for e in range(1, 1501)]
    assert draw_curves(str(tmp_path), history, lr_steps=lr_steps, events=events) == str(tmp_path / "curves.png")
    draw_curves(str(tmp_path), history, lr_steps=lr_steps, events=events)  # again, over the first
    assert_png(tmp_path / "curves.png")
    assert os.listdir(tmp_path) == ["curves.png"]  # the temporary file was renamed, none left


@pytest.mark.e2e
def test_train_draws_curves_png_after_each_epoch(runs):
    for run in (runs["a"], runs["b"]):
        assert_png(os.path.join(run, "curves.png"))
        assert not [f for f in os.listdir(run) if f.startswith(".tmp-")]  # each drawing renamed into place


@pytest.mark.e2e
def test_curves_png_from_metrics_csv_strings_and_no_crash_on_bad_rows(runs, tmp_path, caplog):
    with open(os.path.join(runs["a"], "metrics.csv"), newline="") as f:
        rows = list(csv.DictReader(f))  # strings, as read back from disk
    assert draw_curves(runs["a"], rows, path=str(tmp_path / "curves.png")) is not None
    assert_png(tmp_path / "curves.png")
    with caplog.at_level(logging.INFO, logger="cod"):
        assert draw_curves(str(tmp_path), [{"no epoch": 1}], path=str(tmp_path / "bad.png")) is None
    lines = [r.getMessage() for r in caplog.records if "curves.png" in r.getMessage()]
    assert len(lines) == 1 and "\n" not in lines[0], lines
    assert sorted(os.listdir(tmp_path)) == ["curves.png"]


# ---- TensorBoard -------------------------------------------------------------------------------

def test_tensorboard_logger_says_once_when_tensorboard_is_missing(tmp_path, monkeypatch, caplog):
    monkeypatch.setitem(sys.modules, "torch.utils.tensorboard", None)  # import fails as if not installed
    with caplog.at_level(logging.INFO, logger="cod"):
        tb = TensorBoardLogger(str(tmp_path / "tb"))
    assert not tb.enabled
    assert [r.getMessage() for r in caplog.records if "tensorboard" in r.getMessage()] == [
        "--tensorboard: tensorboard is not installed (pip install tensorboard): no event files are written"]
    tb.log_epoch(synthetic_history(2)[0])
    tb.close()
    assert not (tmp_path / "tb").exists()


def test_tensorboard_logger_writes_each_column_as_a_scalar(tmp_path, monkeypatch):
    written = []

    class FakeWriter:
        def __init__(self, log_dir):
            self.log_dir = log_dir

        def add_scalar(self, tag, value, step):
            written.append((tag, value, step))

        def flush(self):
            pass

        def close(self):
            written.append("closed")

    monkeypatch.setitem(sys.modules, "torch.utils.tensorboard", types.SimpleNamespace(SummaryWriter=FakeWriter))
    tb = TensorBoardLogger(str(tmp_path / "tb"))
    row = {**synthetic_history(3)[2], "val_iou": float("nan")}
    tb.log_epoch(row)
    tb.close()
    tags = {t: (v, s) for t, v, s in written[:-1]}
    assert written[-1] == "closed"
    assert tags["train/loss"] == (pytest.approx(row["train_loss"]), 3)
    assert tags["lr/head"][1] == 3 and tags["val/dice"][1] == 3 and "experts/expert0" in tags
    assert tags["run/stage"] == (1.0, 3) and "val/iou" not in tags and "epoch" not in str(tags)


# ---- compare -----------------------------------------------------------------------------------

@pytest.mark.e2e
def test_compare_names_runs_by_folder_and_writes_the_plot(runs, tmp_path, capsys):
    out = tmp_path / "cmp.png"
    assert train_ultimate.main(["compare", runs["a"], runs["b"], "--out", str(out)]) == 0
    lines = capsys.readouterr().out.splitlines()
    header = lines[0].split()
    assert header[:2] == ["run", "epochs"] and "--lr" in header
    assert "--checkpoint-dir" not in header and "--seed" not in header  # only flags that differ
    assert lines[1].split()[0] == "run_a" and lines[2].split()[0] == "run_b"
    assert lines[1].split()[1] == "3"  # epochs
    assert "wrote" in lines[-1]
    assert_png(out)


@pytest.mark.e2e
def test_compare_a_folder_without_metrics_csv_is_one_error_line(runs, tmp_path, capsys):
    empty = tmp_path / "not_a_run"
    empty.mkdir()
    assert train_ultimate.main(["compare", runs["a"], str(empty), "--out", str(tmp_path / "x.png")]) == 2
    captured = capsys.readouterr()
    err = captured.err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: ") and str(empty) in err[0]
    assert not (tmp_path / "x.png").exists()
