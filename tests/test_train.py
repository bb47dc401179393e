"""End-to-end training runs on generated data (CPU, edgenext_xx_small, 64 px, a few batches)."""

import json

import pytest
import torch

import train_ultimate
from core.errors import UserError
from tests.helpers import rows as read_rows
from core import checkpoint as ckpt

TINY = ["--backbone", "edgenext_xx_small", "--no-pretrained", "--img-size", "64", "--num-workers", "0",
        "--no-progress", "--num-experts", "3", "--batch-size", "4", "--no-curves"]


@pytest.fixture(scope="module")
def demo_root(demo):
    return demo(n_train=24, n_test=6, size=64, seed=3)


def run(args):
    return train_ultimate.main(["train", *args])


@pytest.mark.e2e
def test_two_stage_run_writes_checkpoints_metrics_and_test_scores(demo_root, tmp_path):
    out = tmp_path / "ckpt"
    rc = run(["--dataset-path", demo_root, "--checkpoint-dir", str(out), "--epochs", "3",
              "--stage1-epochs", "1", "--limit-batches", "3", "--accumulation-steps", "2",
              "--deep-supervision", "--ema", *TINY])
    assert rc == 0
    for name in ("best_model.pth", "last.pth", "metrics.csv", "config.json", "train.log",
                 "test_metrics.json"):
        assert (out / name).is_file(), name
    assert not (out / "curves.png").exists()  # --no-curves
    rows = read_rows(out)
    assert [r["epoch"] for r in rows] == ["1", "2", "3"]
    assert [r["stage"] for r in rows] == ["1", "2", "2"]
    assert rows[0]["unfreeze_level"] == "0" and rows[1]["unfreeze_level"] == "5"
    for col in ("lr", "train_loss", "val_loss", "val_iou", "val_dice", "val_sm", "val_mae",
                # every named loss term, and the experts' routing share (a collapse must be visible)
                "train_bce", "train_iou", "train_dice", "train_ds", "train_moe_aux",
                "expert0_usage", "expert1_usage", "expert2_usage"):
        assert col in rows[0] and rows[0][col] != "", col
    usage = [float(rows[-1][f"expert{e}_usage"]) for e in range(3)]
    assert abs(sum(usage) - 1.0) < 1e-4 and float(rows[1]["train_ds"]) > 0
    last = ckpt.load(str(out / "last.pth"))  # weights_only=True inside
    assert last["epoch"] == 2 and last["stage"] == 2
    # 3 micro-batches with accumulation 2 -> 2 optimizer updates per epoch
    assert last["global_step"] == 6
    assert last["config"]["backbone"] == "edgenext_xx_small"
    assert last["ema"] is not None
    test = json.loads((out / "test_metrics.json").read_text())
    assert "demo" in test["results"] and 0.0 <= test["results"]["demo"]["iou"] <= 1.0


@pytest.mark.e2e
def test_stage1_leaves_backbone_untouched_and_trains_decoder(demo_root, tmp_path):
    from models import build_model

    out = tmp_path / "s1"
    assert run(["--dataset-path", demo_root, "--checkpoint-dir", str(out), "--epochs", "1",
                "--stage1-epochs", "1", "--limit-batches", "2", "--seed", "7", *TINY]) == 0
    torch.manual_seed(7)
    initial = build_model(backbone="edgenext_xx_small", num_experts=3, pretrained=False).state_dict()
    trained = ckpt.load(str(out / "last.pth"))["model"]
    enc = [k for k in initial if k.startswith("encoder.")]
    dec = [k for k in initial if not k.startswith("encoder.") and initial[k].dtype.is_floating_point]
    assert enc and dec
    assert all(torch.equal(initial[k], trained[k]) for k in enc)
    assert any(not torch.equal(initial[k], trained[k]) for k in dec)


@pytest.mark.e2e
def test_limit_batches_caps_optimizer_steps(demo_root, tmp_path):
    out = tmp_path / "lim"
    assert run(["--dataset-path", demo_root, "--checkpoint-dir", str(out), "--epochs", "2",
                "--stage1-epochs", "1", "--limit-batches", "1", *TINY]) == 0
    assert ckpt.load(str(out / "last.pth"))["global_step"] == 2


@pytest.mark.e2e
def test_resume_and_skip_stage1_continue_history(demo_root, tmp_path):
    out = tmp_path / "res"
    base = ["--dataset-path", demo_root, "--checkpoint-dir", str(out), "--stage1-epochs", "1",
            "--limit-batches", "1", *TINY]
    assert run([*base, "--epochs", "2"]) == 0
    assert run([*base, "--epochs", "3", "--resume-from", str(out / "last.pth")]) == 0
    rows = read_rows(out)
    assert [r["epoch"] for r in rows] == ["1", "2", "3"]
    skip = tmp_path / "skip"
    assert run(["--dataset-path", demo_root, "--checkpoint-dir", str(skip), "--epochs", "3",
                "--stage1-epochs", "2", "--limit-batches", "1", "--skip-stage1", *TINY]) == 0
    rows = read_rows(skip)
    assert [(r["epoch"], r["stage"]) for r in rows] == [("3", "2")]


@pytest.mark.parametrize("argv, needle", [
    (["--resume-from", "does/not/exist.pth"], "does/not/exist.pth"),
    (["--stage1-epochs", "5", "--epochs", "2"], "--stage1-epochs"),
    (["--min-lr", "1", "--lr", "0.1"], "--min-lr"),
])
def test_bad_input_is_one_line_error(demo_root, tmp_path, capsys, argv, needle):
    rc = run(["--dataset-path", demo_root, "--checkpoint-dir", str(tmp_path / "x"), *TINY, *argv])
    err = capsys.readouterr().err.strip()
    assert rc == 2
    assert err.startswith("error: ") and needle in err and "\n" not in err


def test_corrupt_checkpoint_is_one_line_error(demo_root, tmp_path, capsys):
    bad = tmp_path / "bad.pth"
    bad.write_bytes(b"not a checkpoint")
    rc = run(["--dataset-path", demo_root, "--checkpoint-dir", str(tmp_path / "x"), "--epochs", "1",
              "--stage1-epochs", "0", "--resume-from", str(bad), *TINY])
    err = capsys.readouterr().err.strip()
    assert rc == 2 and str(bad) in err and "\n" not in err


def test_atomic_save_keeps_old_file_when_writing_fails(tmp_path, monkeypatch):
    path = str(tmp_path / "last.pth")
    ckpt.save({"format_version": 1, "model": {}, "epoch": 1}, path)

    def boom(*a, **k):
        raise OSError("disk full")

    monkeypatch.setattr(torch, "save", boom)
    with pytest.raises(UserError, match=r"cannot write \(disk full\) to .*: the previous last.pth is kept"):
        ckpt.save({"format_version": 1, "model": {}, "epoch": 2}, path)
    assert ckpt.load(path)["epoch"] == 1
    assert [p.name for p in tmp_path.iterdir()] == ["last.pth"]  # no temp file left behind
