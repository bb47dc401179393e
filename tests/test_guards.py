"""The guards (docs/plateaus.md): a planted NaN and a planted loss spike roll back and the run
finishes with a finite best model; a flat metric restarts the schedule by the rule; a resume with a
larger --epochs never re-freezes what was trained."""

import csv
import logging
import math
import os

import pytest
import torch

import schedulers
import train_ultimate
from data import make_demo_dataset
from training import state as ckpt
from training import trainer
from training.guards import DivergenceGuard

FLAGS = ["--backbone", "edgenext_xx_small", "--no-pretrained", "--img-size", "64", "--num-workers", "0",
         "--no-progress", "--num-experts", "2", "--batch-size", "2", "--limit-batches", "6", "--seed", "7",
         "--scheduler", "cosine", "--lr", "1e-3", "--min-lr", "1e-5"]


@pytest.fixture(scope="module")
def root(tmp_path_factory):
    return make_demo_dataset(str(tmp_path_factory.mktemp("guards")), n_train=20, n_test=2, size=64, seed=6)


def rows(folder):
    with open(os.path.join(folder, "metrics.csv")) as f:
        return list(csv.DictReader(f))


def plant(monkeypatch, bad_calls: set, how):
    """Wrap the loss so that its n-th calls (training and validation alike, counted from 1) return
    ``how(loss)``."""
    real_build, calls = trainer.build_loss, [0]

    def build_loss(**kwargs):
        real = real_build(**kwargs)

        def loss_fn(outputs, mask):
            loss, terms = real(outputs, mask)
            calls[0] += 1
            return (how(loss) if calls[0] in bad_calls else loss), terms
        return loss_fn

    monkeypatch.setattr(trainer, "build_loss", build_loss)


def assert_finite_best(folder):
    best = ckpt.load(os.path.join(folder, "best_model.pth"))
    assert all(torch.isfinite(t).all() for t in best["model"].values() if t.is_floating_point())


def test_guard_rule_on_a_sequence():
    guard = DivergenceGuard(spike_factor=5.0, max_bad_steps=3)
    assert all(guard.after_step(1.0 + 0.01 * i, True) is None for i in range(12))
    assert "above 5 x the running median" in guard.after_step(6.0, True)
    guard = DivergenceGuard(spike_factor=5.0, max_bad_steps=3)
    assert guard.after_step(float("nan"), True) is None and guard.after_step(1.0, False) is None
    assert "3 optimizer steps in a row" in guard.after_step(float("inf"), True)


def test_planted_nan_rolls_back_and_finishes(root, tmp_path, monkeypatch, caplog):
    out = str(tmp_path / "nan")
    # 6 training batches and 1 validation batch an epoch: calls 1-6 and 7, then 8-13 and 14, ...
    plant(monkeypatch, {9, 10, 11}, lambda loss: loss * float("nan"))  # 3 steps of epoch 2 in a row
    with caplog.at_level(logging.INFO, logger="cod"):
        assert train_ultimate.main(["train", "--dataset-path", root, "--checkpoint-dir", out, *FLAGS,
                                    "--epochs", "3", "--stage1-epochs", "1"]) == 0
    assert "rolled back" in caplog.text and "non-finite" in caplog.text
    got = rows(out)
    assert [r["epoch"] for r in got] == ["1", "2", "3"]
    assert got[1]["events"] == "rollback" and all(math.isfinite(float(r["train_loss"])) for r in got)
    assert_finite_best(out)
    last = ckpt.load(os.path.join(out, "last.pth"))
    assert last["guards"]["rollbacks"] == 1 and last["guards"]["lr_scale"] == pytest.approx(0.7)


def test_planted_spike_rolls_back_and_lowers_the_lr(root, tmp_path, monkeypatch, caplog):
    out = str(tmp_path / "spike")
    plant(monkeypatch, {20}, lambda loss: loss * 1000.0)  # epoch 3, after 12+ steps of history
    with caplog.at_level(logging.INFO, logger="cod"):
        assert train_ultimate.main(["train", "--dataset-path", root, "--checkpoint-dir", out, *FLAGS,
                                    "--epochs", "4", "--stage1-epochs", "1", "--scheduler", "none"]) == 0
    assert "rolled back" in caplog.text and "running median" in caplog.text
    got = rows(out)
    assert [r["epoch"] for r in got] == ["1", "2", "3", "4"] and got[2]["events"] == "rollback"
    # --scheduler none: the LR is the flat 1e-3 until the rollback, then x0.7 once warmed up
    assert float(got[1]["lr"]) == pytest.approx(1e-3) and float(got[3]["lr"]) == pytest.approx(7e-4)
    assert_finite_best(out)


def test_too_many_rollbacks_stop_with_the_last_good_checkpoint(root, tmp_path, monkeypatch, capsys):
    out = str(tmp_path / "hopeless")
    plant(monkeypatch, set(range(9, 10_000)), lambda loss: loss * float("nan"))  # from epoch 2 on
    rc = train_ultimate.main(["train", "--dataset-path", root, "--checkpoint-dir", out, *FLAGS,
                              "--epochs", "3", "--stage1-epochs", "1", "--max-rollbacks", "2"])
    err = capsys.readouterr().err
    assert rc == 2 and "after 2 rollback(s)" in err and "last.pth keeps epoch 1" in err
    assert "Traceback" not in err
    assert ckpt.load(os.path.join(out, "last.pth"))["epoch"] == 0


def test_flat_metric_restarts_the_schedule_by_the_rule(root, tmp_path, monkeypatch, caplog):
    out = str(tmp_path / "plateau")
    flat = {"loss": 1.0, "sm": 0.5, "wfm": 0.3, "em_mean": 0.5, "em_adp": 0.5, "em_max": 0.5, "fm_mean": 0.3,
            "fm_adp": 0.3, "fm_max": 0.3, "mae": 0.2, "iou": 0.4, "dice": 0.5}
    monkeypatch.setattr(trainer, "validate_epoch", lambda run, loader: dict(flat))
    spe = 6  # 12 training images of 20 at val-split 0.1 -> 18 // 2 = 9 batches, capped at 6
    with caplog.at_level(logging.INFO, logger="cod"):
        assert train_ultimate.main(["train", "--dataset-path", root, "--checkpoint-dir", out, *FLAGS,
                                    "--epochs", "8", "--stage1-epochs", "1", "--stage2-lr", "4e-4",
                                    "--plateau-patience", "2", "--plateau-max-restarts", "1"]) == 0
    assert "Plateau breaker" in caplog.text
    got = rows(out)
    assert [r["epoch"] for r in got] == [str(e) for e in range(1, 9)]
    # best at epoch 1 (then flat): epochs 2 and 3 without a gain -> restart at epoch 4 (0-based 3)
    assert [r["events"] for r in got] == ["", "", "", "restart", "", "", "", ""]
    fresh = schedulers.build_schedule("cosine", 4e-4 * 1.5, 1e-5, stage_epochs=5, steps_per_epoch=spe,
                                      warmup_steps=1 * spe)  # at least one epoch of warm-up
    for e in range(3, 8):
        k = (e - 3) * spe + spe - 1  # the logged LR is the epoch's last step's
        assert float(got[e]["lr"]) == pytest.approx(fresh.lr_at(k), rel=1e-5), e
    last = ckpt.load(os.path.join(out, "last.pth"))
    assert last["restart_at"] == 3 and last["guards"]["peak_scale"] == pytest.approx(1.5)
    assert last["guards"]["plateau_restarts"] == 1


def test_resume_with_more_epochs_never_refreezes(root, tmp_path, caplog):
    out = str(tmp_path / "unfreeze")
    base = ["train", "--dataset-path", root, "--checkpoint-dir", out, *FLAGS, "--stage1-epochs", "1",
            "--progressive-unfreeze", "--limit-batches", "1"]
    assert train_ultimate.main([*base, "--epochs", "4"]) == 0
    levels = [int(r["unfreeze_level"]) for r in rows(out)]
    assert levels == [0, 1, 2, 3]
    with caplog.at_level(logging.INFO, logger="cod"):
        assert train_ultimate.main([*base, "--epochs", "20", "--run-epochs", "2",
                                    "--resume-from", os.path.join(out, "last.pth")]) == 0
    assert "Unfreeze plan" in caplog.text and "--resume-schedule continue" in caplog.text
    levels = [int(r["unfreeze_level"]) for r in rows(out)]
    assert levels[:4] == [0, 1, 2, 3] and min(levels[4:]) >= 3
