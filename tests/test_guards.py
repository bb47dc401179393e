"""The guards (docs/plateaus.md): a planted NaN and a planted loss spike roll back and the run
finishes with a finite best model; a flat metric restarts the schedule by the rule; a resume with a
larger --epochs never re-freezes what was trained."""

import logging
import math
import os
import signal

import pytest
import torch

import schedulers
import train_ultimate
from tests.helpers import rows
from core import checkpoint as ckpt
from training import build, trainer
from training.guards import DivergenceGuard, RollbackNeeded

FLAGS = ["--backbone", "edgenext_xx_small", "--no-pretrained", "--img-size", "64", "--num-workers", "0",
         "--no-progress", "--num-experts", "2", "--batch-size", "2", "--limit-batches", "6", "--seed", "7",
         "--scheduler", "cosine", "--lr", "1e-3", "--min-lr", "1e-5", "--no-curves"]


FLAT = {"loss": 1.0, "sm": 0.5, "wfm": 0.3, "em_mean": 0.5, "em_adp": 0.5, "em_max": 0.5, "fm_mean": 0.3,
        "fm_adp": 0.3, "fm_max": 0.3, "mae": 0.2, "iou": 0.4, "dice": 0.5}  # a flat validation


@pytest.fixture(scope="module")
def root(demo):
    return demo(n_train=20, n_test=2, size=64, seed=6)


def plant(monkeypatch, bad_calls: set, how):
    """Wrap the loss so that its n-th calls (training and validation alike, counted from 1) return
    ``how(loss)``."""
    real_build, calls = build.build_loss, [0]

    def build_loss(**kwargs):
        real = real_build(**kwargs)

        def loss_fn(outputs, mask):
            loss, terms = real(outputs, mask)
            calls[0] += 1
            return (how(loss) if calls[0] in bad_calls else loss), terms
        return loss_fn

    monkeypatch.setattr(build, "build_loss", build_loss)


def assert_finite_best(folder):
    best = ckpt.load(os.path.join(folder, "best_model.pth"))
    assert all(torch.isfinite(t).all() for t in best["model"].values() if t.is_floating_point())


def run_args(root, out, *extra):
    return ["train", "--dataset-path", root, "--checkpoint-dir", out, *FLAGS, *extra]


def assert_same_run(a, b, events=True):
    """Same weights (model, optimizer moments), counters and metrics.csv (but for the ``events``
    column, when ``events`` is False: a retried epoch is marked there)."""
    la, lb = ckpt.load(os.path.join(a, "last.pth")), ckpt.load(os.path.join(b, "last.pth"))
    for key in la["model"]:
        torch.testing.assert_close(la["model"][key], lb["model"][key], rtol=0, atol=0, msg=key)
    for sa, sb in zip(la["optimizer"]["state"].values(), lb["optimizer"]["state"].values()):
        torch.testing.assert_close(sa["exp_avg"], sb["exp_avg"], rtol=0, atol=0)
    assert la["global_step"] == lb["global_step"]
    ra, rb = rows(a), rows(b)
    if not events:
        ra, rb = ([{k: v for k, v in r.items() if k != "events"} for r in rs] for rs in (ra, rb))
    assert ra == rb


@pytest.fixture(scope="module")
def fault_free(root, tmp_path_factory):
    """The run the planted faults are compared with: 3 epochs, stage 2 from epoch 2."""
    out = str(tmp_path_factory.mktemp("fault_free"))
    assert train_ultimate.main(run_args(root, out, "--epochs", "3", "--stage1-epochs", "1")) == 0
    return out


def test_guard_rule_on_a_sequence():
    guard = DivergenceGuard(spike_factor=5.0, max_bad_steps=3)
    assert all(guard.after_step(1.0 + 0.01 * i, True) is None for i in range(12))
    assert "above 5 x the running median" in guard.after_step(6.0, True)
    guard = DivergenceGuard(spike_factor=5.0, max_bad_steps=3)
    assert guard.after_step(float("nan"), True) is None and guard.after_step(1.0, False) is None
    assert "3 optimizer steps in a row" in guard.after_step(float("inf"), True)
    # before 10 losses only a blow-up counts: above 5 ** 2 x the median of what is known
    guard = DivergenceGuard(spike_factor=5.0)
    assert guard.after_step(2.0, True) is None and guard.after_step(40.0, True) is None  # 20x: no verdict
    assert "above 25 x the running median 2" in guard.after_step(1e4, True)
    # an epoch whose mean training or validation loss is above 25 x the run's lowest: its first step
    # loss (2.0 here, the untrained model's) or an earlier epoch's mean of the same kind
    history = [{"train_loss": 1.5, "val_loss": 1.8}, {"train_loss": 1.0, "val_loss": 1.6},
               {"train_loss": math.nan, "val_loss": math.nan}]
    guard.check_epoch({"train_loss": 20.0}, {"loss": 40.0}, history)  # 20x, 25x: no verdict
    with pytest.raises(RollbackNeeded, match="training loss 30 above 25 x the run's lowest loss 1$"):
        guard.check_epoch({"train_loss": 30.0}, {"loss": 1.0}, history)
    with pytest.raises(RollbackNeeded, match="validation loss 3e.10 above 25 x the run's lowest loss 1.6$"):
        guard.check_epoch({"train_loss": 1.0}, {"loss": 3e10}, history)
    with pytest.raises(RollbackNeeded, match="validation loss"):  # the first epoch: the first step's loss
        guard.check_epoch({"train_loss": 1.0}, {"loss": 51.0}, [])
    guard.check_epoch({"train_loss": 1.0}, {}, [])  # no validation split
    assert DivergenceGuard(5.0).check_epoch({"train_loss": 1e9}, {"loss": 1e9}, []) is None  # nothing known


def test_guard_window_round_trips_through_its_state():
    guard = DivergenceGuard(spike_factor=5.0)
    for v in (1.0, 1.1, 0.9, float("nan")):
        guard.after_step(v, True)
    again = DivergenceGuard(spike_factor=5.0)
    again.load_state_dict(guard.state_dict())
    assert list(again.losses) == [1.0, 1.1, 0.9] and again.bad_in_row == 1 and again.first == 1.0
    again.load_state_dict(None)  # a checkpoint written before the window was saved
    assert list(again.losses) == [] and again.bad_in_row == 0 and again.first is None


@pytest.mark.e2e
def test_planted_nan_rolls_back_to_exactly_the_fault_free_run(root, fault_free, tmp_path, monkeypatch,
                                                               caplog):
    """--lr-backoff 1 retries the epoch at the same LR: with the state restored (weights, optimizer,
    RNG, guard window), the retry is the epoch the fault-free run trained, to the last bit."""
    out = str(tmp_path / "nan")
    # 6 training batches and 1 validation batch an epoch: calls 1-6 and 7, then 8-13 and 14, ...
    plant(monkeypatch, {9, 10, 11}, lambda loss: loss * float("nan"))  # 3 steps of epoch 2 in a row
    with caplog.at_level(logging.INFO, logger="cod"):
        assert train_ultimate.main(run_args(root, out, "--epochs", "3", "--stage1-epochs", "1",
                                            "--lr-backoff", "1")) == 0
    assert "rolled back" in caplog.text and "non-finite" in caplog.text
    assert [r["events"] for r in rows(out)] == ["", "rollback", ""]
    assert_same_run(fault_free, out, events=False)
    last = ckpt.load(os.path.join(out, "last.pth"))
    assert last["guards"]["rollbacks"] == 1 and last["guards"]["backoff"] == 1.0


@pytest.mark.e2e
def test_planted_spike_rolls_back_to_exactly_the_fault_free_run(root, fault_free, tmp_path, monkeypatch,
                                                                 caplog):
    out = str(tmp_path / "spike")
    plant(monkeypatch, {20}, lambda loss: loss * 1000.0)  # epoch 3, after 12+ steps of history
    with caplog.at_level(logging.INFO, logger="cod"):
        assert train_ultimate.main(run_args(root, out, "--epochs", "3", "--stage1-epochs", "1",
                                            "--lr-backoff", "1")) == 0
    assert "rolled back" in caplog.text and "running median" in caplog.text
    assert [r["events"] for r in rows(out)] == ["", "", "rollback"]
    assert_same_run(fault_free, out, events=False)


@pytest.mark.e2e
def test_planted_spike_lowers_the_lr(root, tmp_path, monkeypatch):
    out = str(tmp_path / "spike")
    plant(monkeypatch, {20}, lambda loss: loss * 1000.0)  # epoch 3, after 12+ steps of history
    assert train_ultimate.main(run_args(root, out, "--epochs", "4", "--stage1-epochs", "1",
                                        "--scheduler", "none")) == 0
    got = rows(out)
    assert [r["epoch"] for r in got] == ["1", "2", "3", "4"] and got[2]["events"] == "rollback"
    # --scheduler none: the LR is the flat 1e-3 until the rollback, then x0.7 once warmed up
    assert float(got[1]["lr"]) == pytest.approx(1e-3) and float(got[3]["lr"]) == pytest.approx(7e-4)
    assert_finite_best(out)
    last = ckpt.load(os.path.join(out, "last.pth"))
    assert last["guards"]["rollbacks"] == 1 and last["guards"]["backoff"] == pytest.approx(0.7)


@pytest.mark.e2e
def test_a_resume_judges_spikes_against_the_saved_window(root, tmp_path, monkeypatch):
    """A x10 loss right after the resume point: the straight run's window (12 losses) calls it a
    spike; the resumed run must too, so the window travels in last.pth."""
    straight, split = str(tmp_path / "straight"), str(tmp_path / "split")
    args = ["--epochs", "3", "--stage1-epochs", "1", "--scheduler", "none"]
    plant(monkeypatch, {15}, lambda loss: loss * 10.0)  # the first step of epoch 3 (after 2 x (6 + 1) calls)
    assert train_ultimate.main(run_args(root, straight, *args)) == 0
    assert [r["events"] for r in rows(straight)] == ["", "", "rollback"]
    monkeypatch.undo()
    assert train_ultimate.main(run_args(root, split, *args, "--run-epochs", "2")) == 0
    plant(monkeypatch, {1}, lambda loss: loss * 10.0)  # the same step, first of the resumed process
    assert train_ultimate.main(run_args(root, split, *args, "--resume-from", os.path.join(split, "last.pth"))) == 0
    assert_same_run(straight, split)


@pytest.mark.e2e
def test_a_stop_before_validation_resumes_with_the_rollback_lr(root, tmp_path, monkeypatch):
    """A rollback in epoch 2 (LR x0.7), then a stop between epoch 3's training and its validation:
    the resumed epoch logs the LR training used (7e-4), as the straight run does."""
    straight, split = str(tmp_path / "straight"), str(tmp_path / "split")
    args = ["--epochs", "4", "--stage1-epochs", "1", "--scheduler", "none"]
    nan = lambda loss: loss * float("nan")  # noqa: E731
    plant(monkeypatch, {9, 10, 11}, nan)
    assert train_ultimate.main(run_args(root, straight, *args)) == 0
    monkeypatch.undo()
    plant(monkeypatch, {9, 10, 11}, nan)
    real = trainer.train_one_epoch

    def train_then_sigterm(run, loader, stage_plan, stage, epoch, partial=None):
        out = real(run, loader, stage_plan, stage, epoch, partial)
        if epoch == 2:
            os.kill(os.getpid(), signal.SIGTERM)  # after the epoch's last update, before its validation
        return out

    monkeypatch.setattr(trainer, "train_one_epoch", train_then_sigterm)
    assert train_ultimate.main(run_args(root, split, *args)) == 128 + signal.SIGTERM
    assert ckpt.load(os.path.join(split, "last.pth"))["partial"]["batches"] == 6
    monkeypatch.undo()
    assert train_ultimate.main(run_args(root, split, *args, "--resume-from", os.path.join(split, "last.pth"))) == 0
    assert float(rows(split)[2]["lr"]) == pytest.approx(7e-4)
    assert_same_run(straight, split)


@pytest.mark.parametrize("lr, batches, seen", [
    ("30", "3", "above 25 x the running median"),  # the second update's loss
    ("1e5", "1", "validation loss"),  # one update an epoch: only validation sees it (finite, 1e10)
])
@pytest.mark.e2e
def test_a_blow_up_in_the_first_steps_is_never_saved(root, tmp_path, capsys, lr, batches, seen):
    """The loss grows by orders of magnitude in the first updates, before a spike can be judged:
    the guard rolls back as for a NaN, and nothing of it is saved as best or last, or advised."""
    out = str(tmp_path / "blowup")
    rc = train_ultimate.main(run_args(root, out, "--epochs", "2", "--stage1-epochs", "1", "--scheduler", "none",
                                      "--lr", lr, "--limit-batches", batches))
    err = capsys.readouterr().err
    assert rc == 2 and seen in err and "after 3 rollback(s)" in err
    assert "no checkpoint was written" in err and "Traceback" not in err
    assert not any(f.endswith(".pth") for f in os.listdir(out))


@pytest.mark.e2e
def test_after_a_collapse_the_advice_is_best_model(root, tmp_path, monkeypatch, capsys):
    """Validation collapsed in epoch 2 (IoU 0.4 -> 0.1, finite), then the run diverged: resuming from
    last.pth would start from the collapse, so the stop message names best_model.pth."""
    out = str(tmp_path / "collapse")
    scores = iter([0.4, 0.1])

    def fake_validate(run, loader):
        if run.progress.epoch >= 1:  # epoch 3: diverge for good
            raise trainer.TrainingDiverged("the model's predictions became NaN or inf (val)")
        return {**FLAT, "iou": next(scores)}

    monkeypatch.setattr(trainer, "validate_epoch", fake_validate)
    rc = train_ultimate.main(run_args(root, out, "--epochs", "3", "--stage1-epochs", "1", "--limit-batches", "1"))
    err = capsys.readouterr().err
    assert rc == 2 and "last.pth keeps epoch 2, best_model.pth keeps epoch 1" in err
    assert "resume from best_model.pth" in err and "Traceback" not in err


@pytest.mark.e2e
def test_too_many_rollbacks_stop_with_the_last_good_checkpoint(root, tmp_path, monkeypatch, capsys):
    out = str(tmp_path / "hopeless")
    plant(monkeypatch, set(range(9, 10_000)), lambda loss: loss * float("nan"))  # from epoch 2 on
    rc = train_ultimate.main(["train", "--dataset-path", root, "--checkpoint-dir", out, *FLAGS,
                              "--epochs", "3", "--stage1-epochs", "1", "--max-rollbacks", "2"])
    err = capsys.readouterr().err
    assert rc == 2 and "after 2 rollback(s)" in err and "last.pth keeps epoch 1" in err
    assert "Traceback" not in err
    assert ckpt.load(os.path.join(out, "last.pth"))["epoch"] == 0


@pytest.mark.e2e
def test_flat_metric_restarts_the_schedule_by_the_rule(root, tmp_path, monkeypatch, caplog):
    out = str(tmp_path / "plateau")
    monkeypatch.setattr(trainer, "validate_epoch", lambda run, loader: dict(FLAT))
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


PLATEAU = ["--stage1-epochs", "1", "--epochs", "6", "--limit-batches", "3", "--stage2-lr", "4e-4",
           "--plateau-patience", "2", "--plateau-min-delta", "100", "--plateau-max-restarts", "1"]


@pytest.fixture(scope="module")
def plateau_straight(root, tmp_path_factory):
    """min-delta 100: no epoch counts as a gain, so the breaker restarts from the best weights after
    epoch 3 (stage-2 epochs 2 and 3 without one)."""
    out = str(tmp_path_factory.mktemp("plateau_straight"))
    assert train_ultimate.main(run_args(root, out, *PLATEAU)) == 0
    assert [r["events"] for r in rows(out)] == ["", "", "", "restart", "", ""]
    return out


@pytest.mark.e2e
@pytest.mark.parametrize("split_after", [3, 4])
def test_a_stop_at_the_restart_boundary_resumes_the_restart(root, plateau_straight, tmp_path, split_after):
    """A run stopped right after the restart's epoch (or one later) and resumed equals the straight
    run: last.pth holds the restart, not the state before it."""
    straight, split = plateau_straight, str(tmp_path / "split")
    assert train_ultimate.main(run_args(root, split, *PLATEAU, "--run-epochs", str(split_after))) == 0
    assert ckpt.load(os.path.join(split, "last.pth"))["restart_at"] == 3
    assert train_ultimate.main(run_args(root, split, *PLATEAU, "--resume-from", os.path.join(split, "last.pth"))) == 0
    assert_same_run(straight, split)


@pytest.mark.e2e
def test_plateau_patience_counts_stage2_epochs_only(root, tmp_path, monkeypatch):
    """3 flat stage-1 epochs do not count: with patience 2 the restart comes after stage-2 epochs 4
    and 5, at epoch 6."""
    out = str(tmp_path / "patience")
    monkeypatch.setattr(trainer, "validate_epoch", lambda run, loader: dict(FLAT))
    assert train_ultimate.main(run_args(root, out, "--stage1-epochs", "3", "--epochs", "7", "--limit-batches", "1",
                                        "--plateau-patience", "2", "--plateau-max-restarts", "1")) == 0
    assert [r["events"] for r in rows(out)] == ["", "", "", "", "", "restart", ""]


@pytest.mark.e2e
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


def test_a_checkpoint_from_before_the_rename_keeps_its_backoff():
    """The rollbacks' LR factor was saved as guards.lr_scale before it was named backoff."""
    from training.progress import RunState

    state = RunState(model=None, optimizer=None, scaler=None, ema=None, config={}, monitor="iou")
    state.load_progress({"epoch": 3, "global_step": 12, "best": {"metric": "iou", "value": 0.4, "epoch": 2},
                         "guards": {"lr_scale": 0.49, "rollbacks": 2}, "rng": None})
    assert state.progress.backoff == 0.49 and state.progress.rollbacks == 2
