"""The checkpoint folder is sacred (docs/checkpoints.md): each case through the command line, checking
the exit status, the one-line message, no traceback, and that earlier files are byte-identical or
moved aside as promised."""

import errno
import os

import pytest

import train_ultimate
from tests.helpers import cli as cli_process, digest
from core import checkpoint as ckpt
from training.folder import FolderLock

pytestmark = pytest.mark.e2e  # every test runs train, nearly all in a process of its own
TINY = ["--backbone", "edgenext_xx_small", "--no-pretrained", "--img-size", "64", "--stage1-epochs", "1",
        "--limit-batches", "2", "--num-workers", "0", "--no-progress", "--num-experts", "2", "--batch-size", "4",
        "--no-curves"]


def cli(*args):
    proc = cli_process(*args)
    return proc.returncode, proc.stdout + proc.stderr


def one_error_line(text):
    errors = [line for line in text.splitlines() if line.startswith("error: ")]
    assert len(errors) == 1 and "Traceback" not in text, text
    return errors[0]


@pytest.fixture(scope="module")
def root(demo):
    return demo(n_train=12, n_test=2, size=64, seed=4)


@pytest.fixture(scope="module")
def finished(root, tmp_path_factory):
    out = str(tmp_path_factory.mktemp("finished") / "run")
    rc, text = cli("train", "--dataset-path", root, "--checkpoint-dir", out, *TINY, "--epochs", "2")
    assert rc == 0, text
    return out


def test_1_a_fresh_run_never_replaces_a_trained_one(root, finished, tmp_path):
    before = digest(finished)
    rc, text = cli("train", "--dataset-path", root, "--checkpoint-dir", finished, *TINY, "--epochs", "1")
    line = one_error_line(text)
    assert rc == 2 and "already holds a run" in line and f"--resume-from {finished}/last.pth" in line
    assert "--overwrite" in line
    assert digest(finished) == before
    # a failed start (a dataset path typo) while resuming touches nothing either, config.json included
    rc, text = cli("train", "--dataset-path", root + "-typo", "--checkpoint-dir", finished, *TINY, "--epochs", "3",
                   "--resume-from", os.path.join(finished, "last.pth"))
    assert rc == 2 and root + "-typo" in one_error_line(text)
    assert digest(finished) == before
    # --overwrite moves the old files aside, whole
    copy = str(tmp_path / "copy")
    import shutil
    shutil.copytree(finished, copy)
    rc, text = cli("train", "--dataset-path", root, "--checkpoint-dir", copy, *TINY, "--epochs", "1", "--overwrite")
    assert rc == 0, text
    aside = [d for d in os.listdir(copy) if d.startswith("previous-")]
    assert len(aside) == 1 and "moved to" in text
    moved = digest(os.path.join(copy, aside[0]))
    assert moved == {k: v for k, v in before.items()}
    assert ckpt.load(os.path.join(copy, "best_model.pth"))["epoch"] == 0


def test_2_two_runs_never_share_a_folder(root, tmp_path):
    folder = str(tmp_path / "busy")
    os.makedirs(folder)
    with FolderLock(folder):  # another run holds it
        rc, text = cli("train", "--dataset-path", root, "--checkpoint-dir", folder, *TINY, "--epochs", "1")
    line = one_error_line(text)
    assert rc == 2 and "in use by another run" in line and f"pid {os.getpid()}" in line
    assert not os.path.exists(os.path.join(folder, "config.json"))


def test_3_keep_last_deletes_only_the_copies_this_run_wrote(root, tmp_path):
    folder = tmp_path / "periodic"
    folder.mkdir()
    (folder / "epoch_0000_pretrained_backup.pth").write_bytes(b"the user's own file")
    (folder / "epoch_final_good.pth").write_bytes(b"another one")
    before = digest(str(folder))
    rc, text = cli("train", "--dataset-path", root, "--checkpoint-dir", str(folder), *TINY, "--epochs", "3",
                   "--save-every", "1", "--keep-last", "1")
    assert rc == 0, text
    after = digest(str(folder))
    assert {k: after[k] for k in before} == before
    assert sorted(f for f in os.listdir(folder) if f.startswith("epoch_")) == [
        "epoch_0000_pretrained_backup.pth", "epoch_0003.pth", "epoch_final_good.pth"]


def test_4_a_diverged_model_is_never_saved(root, finished, tmp_path):
    # without a validation split, from the first epoch: nothing is written, and the message says so
    # (the divergence guard, off here, would first roll back and retry with lower LRs)
    out = str(tmp_path / "diverged")
    rc, text = cli("train", "--dataset-path", root, "--checkpoint-dir", out, *TINY, "--epochs", "2",
                   "--lr", "1e6", "--min-lr", "0", "--scheduler", "none", "--val-split", "0", "--limit-batches", "1",
                   "--no-divergence-guard")
    line = one_error_line(text)
    assert rc == 2 and "NaN or inf" in line and "no checkpoint was written" in line
    assert not [f for f in os.listdir(out) if f.endswith(".pth")]
    # diverging after a good epoch keeps that epoch's files byte for byte and names them
    import shutil
    good = str(tmp_path / "good")
    shutil.copytree(finished, good)
    before = digest(good)
    rc, text = cli("train", "--dataset-path", root, "--checkpoint-dir", good, *TINY, "--epochs", "4", "--lr", "1e6",
                   "--min-lr", "0", "--scheduler", "none", "--resume-from", os.path.join(good, "last.pth"))
    line = one_error_line(text)
    assert rc == 2 and "rollback(s)" in line  # the guard tried first
    assert "last.pth keeps epoch 2" in line and "best_model.pth keeps epoch" in line
    after = digest(good)
    for name in ("best_model.pth", "last.pth"):
        assert after[name] == before[name]


@pytest.mark.parametrize("lr", ["1e5", "30"])
def test_probe_4_a_finite_blow_up_is_never_saved_as_best_nor_advised(root, finished, tmp_path, lr):
    """The probe's commands: --lr 1e5 ended epoch 1 with a finite loss of 1.4e10 that was saved as
    best and last, and advised to resume from; --lr 30 never even rolled back. A user's own file in
    the folder stays as it was."""
    out = tmp_path / "blowup"
    out.mkdir()
    (out / "notes.txt").write_text("mine\n")
    before = digest(str(out))
    rc, text = cli("train", "--dataset-path", root, "--checkpoint-dir", str(out), *TINY, "--epochs", "3",
                   "--lr", lr, "--scheduler", "none", "--limit-batches", "3", "--batch-size", "2")
    line = one_error_line(text)
    assert rc == 2 and "rollback(s)" in line and "--lr" in line and "no checkpoint was written" in line
    assert "resume from" not in line
    assert not [f for f in os.listdir(out) if f.endswith(".pth")]
    after = digest(str(out))
    assert {k: after.get(k) for k in before} == before


def test_4_without_validation_the_log_names_the_training_loss(root, tmp_path):
    out = str(tmp_path / "noval")
    rc, text = cli("train", "--dataset-path", root, "--checkpoint-dir", out, *TINY, "--epochs", "2", "--val-split", "0")
    assert rc == 0, text
    assert "Done. Best train loss" in text and "Best iou -" not in text


def test_7_nan_first_seen_in_validation_is_caught_like_a_training_nan(root, tmp_path):
    args = ["train", "--dataset-path", root, *TINY, "--epochs", "2", "--lr", "1e5", "--scheduler", "none",
            "--limit-batches", "1"]
    # without the guard: the run stops with one line, nothing diverged saved
    rc, text = cli(*args, "--checkpoint-dir", str(tmp_path / "off"), "--no-divergence-guard")
    line = one_error_line(text)
    assert rc == 2 and "predictions became NaN or inf (val)" in line and "pred must be probabilities" not in text
    # with it: a rollback, as for a NaN in training, then the run goes on (--spike-factor 1e9: no
    # blow-up check, which would roll back on the finite 1e10 losses first)
    rc, text = cli(*args, "--checkpoint-dir", str(tmp_path / "on"), "--spike-factor", "1e9")
    assert "Traceback" not in text and "pred must be probabilities" not in text
    assert "predictions became NaN or inf (val): rolled back" in text
    assert rc == 0 or (rc == 2 and "rollback(s)" in one_error_line(text))


def test_8_disk_full_keeps_the_last_good_file(root, tmp_path, monkeypatch, capsys):
    out = str(tmp_path / "full")
    base = ["train", "--dataset-path", root, "--checkpoint-dir", out, *TINY]
    assert train_ultimate.main([*base, "--epochs", "1"]) == 0
    before = digest(out)
    capsys.readouterr()

    def no_space(state, f):
        f.write(b"partial")
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    monkeypatch.setattr(ckpt, "_write", no_space)
    rc = train_ultimate.main([*base, "--epochs", "2", "--resume-from", os.path.join(out, "last.pth")])
    captured = capsys.readouterr()
    line = one_error_line(captured.err)
    assert rc == 2 and f"no space left in {out}" in line and "the previous last.pth is kept" in line
    after = digest(out)
    assert after["last.pth"] == before["last.pth"] and after["best_model.pth"] == before["best_model.pth"]
    assert not [f for f in os.listdir(out) if f.startswith(".tmp-")]


# ---- issue #20: a probe of bad and odd input -----------------------------------------------------

def test_probe_11_overwrite_moves_nothing_when_the_start_fails(root, finished, tmp_path):
    """--overwrite used to move the old run into previous-<time>/ before a bad --dataset-path failed."""
    import shutil
    folder = str(tmp_path / "run")
    shutil.copytree(finished, folder)
    before = digest(folder)
    rc, text = cli("train", "--dataset-path", root + "-typo", "--checkpoint-dir", folder, *TINY, "--epochs", "1",
                   "--overwrite")
    assert rc == 2 and "--dataset-path" in one_error_line(text) and root + "-typo" in one_error_line(text)
    assert digest(folder) == before and not [d for d in os.listdir(folder) if d.startswith("previous-")]


def test_probe_12_overwrite_with_a_resume_from_the_same_folder_is_refused(finished, root, tmp_path):
    """It used to move last.pth aside and then report 'checkpoint not found: DIR/last.pth'."""
    import shutil
    folder = str(tmp_path / "run")
    shutil.copytree(finished, folder)
    before = digest(folder)
    last = os.path.join(folder, "last.pth")
    rc, text = cli("train", "--dataset-path", root, "--checkpoint-dir", folder, *TINY, "--epochs", "3",
                   "--overwrite", "--resume-from", last)
    line = one_error_line(text)
    assert rc == 2 and line.startswith(f"error: --overwrite with --resume-from {last} in the same --checkpoint-dir")
    assert "leave out --overwrite" in line
    assert digest(folder) == before


@pytest.fixture(scope="module")
def periodic_with_a_users_file(root, tmp_path_factory):
    """3 epochs, --save-every 1 --keep-last 1, into a folder that holds the user's own epoch_0001.pth."""
    folder = tmp_path_factory.mktemp("periodic_users") / "ck"
    folder.mkdir()
    (folder / "epoch_0001.pth").write_text("mine\n")
    before = digest(str(folder))
    rc, text = cli("train", "--dataset-path", root, "--checkpoint-dir", str(folder), *TINY, "--epochs", "3",
                   "--save-every", "1", "--keep-last", "1")
    return str(folder), before, rc, text


def test_probe_1_a_periodic_copy_never_replaces_a_file_the_run_did_not_write(periodic_with_a_users_file):
    """The user's epoch_0001.pth used to be overwritten by the run's copy, then pruned, without a word."""
    folder, before, rc, text = periodic_with_a_users_file
    assert rc == 0 and "Traceback" not in text, text
    warnings = [line for line in text.splitlines() if line.startswith("Warning:")]
    assert warnings == [f"Warning: {folder}/epoch_0001.pth was not written by this run: it is kept, and this "
                        "periodic copy is epoch_0001-1.pth"]
    after = digest(folder)
    assert {k: after.get(k) for k in before} == before
    assert sorted(f for f in os.listdir(folder) if f.startswith("epoch_")) == ["epoch_0001.pth", "epoch_0003.pth"]


def test_probe_2_a_resume_into_another_folder_prunes_none_of_its_files(root, periodic_with_a_users_file, tmp_path):
    """The periodic copies listed in A/last.pth (epoch_0002.pth) used to be pruned in B: the user's files."""
    a_folder = periodic_with_a_users_file[0]
    b_folder = tmp_path / "B"
    b_folder.mkdir()
    listed = ckpt.load(os.path.join(a_folder, "last.pth"))["periodic_copies"]
    assert listed == ["epoch_0003.pth"]  # last.pth lists its own epoch's copy
    for name in listed:
        (b_folder / name).write_text("mine\n")
    before_a, before_b = digest(a_folder), digest(str(b_folder))
    rc, text = cli("train", "--dataset-path", root, "--checkpoint-dir", str(b_folder), *TINY, "--epochs", "4",
                   "--save-every", "1", "--keep-last", "1", "--resume-from", os.path.join(a_folder, "last.pth"))
    assert rc == 0 and "Traceback" not in text, text
    notes = [line for line in text.splitlines() if line.startswith("--keep-last:")]
    assert len(notes) == 1 and os.path.realpath(a_folder) in notes[0] and "left alone" in notes[0]
    after = digest(str(b_folder))
    assert {k: after.get(k) for k in before_b} == before_b and "epoch_0004.pth" in after
    assert digest(a_folder) == before_a


def test_a_resume_in_the_same_folder_prunes_the_copies_written_before_the_stop(root, tmp_path):
    """last.pth lists the copy of its own epoch: resumed, --keep-last 1 prunes it in turn (one copy
    per resume used to stay for good)."""
    out = str(tmp_path / "pieces")
    args = ["train", "--dataset-path", root, "--checkpoint-dir", out, *TINY, "--epochs", "3", "--save-every", "1",
            "--keep-last", "1"]
    assert train_ultimate.main([*args, "--run-epochs", "2"]) == 0
    assert ckpt.load(os.path.join(out, "last.pth"))["periodic_copies"] == ["epoch_0002.pth"]
    assert train_ultimate.main([*args, "--resume-from", os.path.join(out, "last.pth")]) == 0
    assert sorted(f for f in os.listdir(out) if f.startswith("epoch_")) == ["epoch_0003.pth"]
