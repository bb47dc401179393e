"""Resume you can trust: pieces == one straight run, plateau-breaking restarts, signals, no lost rows."""

import math
import os
import signal

import pytest
import torch

import schedulers
import train_ultimate
from tests.helpers import assert_same_run, rows
from core import checkpoint as ckpt
from training import loop

pytestmark = pytest.mark.e2e

# accumulation 2 with 3 batches (a partial last group), warm-up, progressive unfreeze, deep
# supervision, EMA, dropout and drop-path (so the RNG state matters), 4 epochs over both stages
FLAGS = ["--backbone", "edgenext_xx_small", "--no-pretrained", "--img-size", "64", "--num-workers", "0",
         "--no-progress", "--num-experts", "3", "--batch-size", "4", "--accumulation-steps", "2",
         "--limit-batches", "3", "--epochs", "4", "--stage1-epochs", "1", "--warmup-epochs", "1",
         "--scheduler", "cosine", "--lr", "1e-3", "--stage2-lr", "5e-4", "--min-lr", "1e-5",
         "--progressive-unfreeze", "--unfreeze-interval", "1", "--deep-supervision", "--ema",
         "--dropout", "0.1", "--drop-path", "0.1", "--seed", "5", "--no-curves"]


@pytest.fixture(scope="module")
def root(demo):
    return demo(n_train=20, n_test=2, size=64, seed=2)


@pytest.fixture(scope="module")
def straight(root, tmp_path_factory):
    out = str(tmp_path_factory.mktemp("straight"))
    assert train_ultimate.main(["train", "--dataset-path", root, "--checkpoint-dir", out, *FLAGS]) == 0
    return out


def test_four_single_epoch_pieces_equal_one_straight_run(root, straight, tmp_path):
    out = str(tmp_path / "pieces")
    base = ["train", "--dataset-path", root, "--checkpoint-dir", out, *FLAGS, "--run-epochs", "1"]
    assert train_ultimate.main(base) == 0
    for _ in range(3):
        assert train_ultimate.main([*base, "--resume-from", os.path.join(out, "last.pth")]) == 0
    assert [r["epoch"] for r in rows(out)] == ["1", "2", "3", "4"]
    assert_same_run(straight, out)


def test_sigterm_mid_epoch_saves_a_checkpoint_that_resumes_exactly(root, straight, tmp_path, monkeypatch,
                                                                  capsys):
    out = str(tmp_path / "killed")
    real_step = loop.optimizer_step
    calls = {"n": 0}

    def step_then_sigterm(*args, **kwargs):
        real_step(*args, **kwargs)
        calls["n"] += 1
        if calls["n"] == 3:  # first update of epoch 2 (2 updates per epoch)
            os.kill(os.getpid(), signal.SIGTERM)

    monkeypatch.setattr(loop, "optimizer_step", step_then_sigterm)
    args = ["train", "--dataset-path", root, "--checkpoint-dir", out, *FLAGS]
    assert train_ultimate.main(args) == 128 + signal.SIGTERM
    err = capsys.readouterr().err
    assert "SIGTERM" in err and "--resume-from" in err
    saved = ckpt.load(os.path.join(out, "last.pth"))
    assert saved["epoch"] == 0 and saved["partial"]["epoch"] == 1 and saved["partial"]["batches"] == 2
    monkeypatch.setattr(loop, "optimizer_step", real_step)
    assert train_ultimate.main([*args, "--resume-from", os.path.join(out, "last.pth")]) == 0
    assert_same_run(straight, out)


def test_changed_schedule_flags_on_resume_run_a_fresh_schedule_from_the_resume_epoch(root, straight, tmp_path):
    out = str(tmp_path / "restart")
    new = [*FLAGS, "--epochs", "7", "--stage2-lr", "8e-4", "--min-lr", "2e-5", "--warmup-epochs", "1"]
    args = ["train", "--dataset-path", root, "--checkpoint-dir", out, *new,
            "--resume-from", os.path.join(straight, "last.pth")]
    assert train_ultimate.main(args) == 0
    got = rows(out)
    assert [r["epoch"] for r in got] == [str(e) for e in range(1, 8)]
    assert got[:4] == rows(straight)  # history kept, not duplicated
    spe = 2
    fresh = schedulers.build_schedule("cosine", 8e-4, 2e-5, stage_epochs=3, steps_per_epoch=spe,
                                      warmup_steps=1 * spe)
    for e in range(4, 7):  # 0-based epochs 4..6 run the new curve; the logged LR is the epoch's last
        k = (e - 4) * spe + spe - 1
        assert math.isclose(float(got[e]["lr"]), fresh.lr_at(k), rel_tol=1e-5), e
    assert ckpt.load(os.path.join(out, "last.pth"))["restart_at"] == 4


def test_schedule_preview_shows_the_resume_decision(root, straight, capsys):
    base = ["schedule", "--dataset-path", root, *FLAGS, "--resume-from", os.path.join(straight, "last.pth")]
    assert train_ultimate.main([*base, "--epochs", "6"]) == 0
    assert "a fresh schedule starts at epoch 5" in capsys.readouterr().out
    assert train_ultimate.main([*base, "--epochs", "6", "--resume-schedule", "continue"]) == 0
    assert "continuing the saved schedule" in capsys.readouterr().out


def test_resume_from_best_rewinds_but_archives_the_abandoned_rows(root, tmp_path):
    out = str(tmp_path / "rewind")
    args = ["train", "--dataset-path", root, "--checkpoint-dir", out, *FLAGS, "--epochs", "3"]
    assert train_ultimate.main(args) == 0
    last = ckpt.load(os.path.join(out, "last.pth"))
    # make an earlier epoch's checkpoint to rewind to, as best_model.pth would be
    early = os.path.join(out, "early.pth")
    assert train_ultimate.main([*args, "--checkpoint-dir", str(tmp_path / "e"), "--epochs", "3",
                                "--run-epochs", "1"]) == 0
    os.replace(str(tmp_path / "e" / "last.pth"), early)
    assert train_ultimate.main([*args, "--resume-from", early]) == 0
    backups = [f for f in os.listdir(out) if f.startswith("metrics-until-epoch3")]
    assert len(backups) == 1
    assert [r["epoch"] for r in rows(out)] == ["1", "2", "3"]
    assert last["epoch"] == 2


def test_weights_only_file_starts_fresh_and_skip_stage1_jumps(root, straight, tmp_path, caplog):
    bare = str(tmp_path / "weights.pth")
    torch.save({"module." + k: v for k, v in ckpt.load(os.path.join(straight, "last.pth"))["model"].items()},
               bare)  # a DataParallel-style bare state_dict from another tool
    out = str(tmp_path / "bare")
    with caplog.at_level("INFO", logger="cod"):
        assert train_ultimate.main(["train", "--dataset-path", root, "--checkpoint-dir", out, *FLAGS,
                                    "--resume-from", bare, "--skip-stage1", "--epochs", "2"]) == 0
    text = caplog.text
    assert "weights only" in text and "--skip-stage1" in text
    assert [r["stage"] for r in rows(out)] == ["2"]


def test_save_every_keeps_the_newest_copies(root, tmp_path):
    out = str(tmp_path / "periodic")
    assert train_ultimate.main(["train", "--dataset-path", root, "--checkpoint-dir", out, *FLAGS,
                                "--save-every", "1", "--keep-last", "2"]) == 0
    assert sorted(f for f in os.listdir(out) if f.startswith("epoch_")) == ["epoch_0003.pth", "epoch_0004.pth"]


def test_time_limit_stops_cleanly_and_prints_how_to_go_on(root, tmp_path, caplog):
    out = str(tmp_path / "budget")
    with caplog.at_level("INFO", logger="cod"):
        assert train_ultimate.main(["train", "--dataset-path", root, "--checkpoint-dir", out, *FLAGS,
                                    "--time-limit", "0.001s"]) == 0
    assert [r["epoch"] for r in rows(out)] == ["1"]  # the first epoch always runs, then no time is left
    assert "--time-limit 0.001s" in caplog.text and "--resume-from" in caplog.text
