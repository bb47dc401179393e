"""Bad input through the command line: one `error: ...` line naming the file or flag, exit status 2,
no traceback, nothing trained or written for nothing. One test per item of the bad-input issue."""

from __future__ import annotations

import os
import shutil

import cv2
import numpy as np
import pytest
import torch

import train_ultimate
from tests.helpers import cli, digest

TINY = ["--backbone", "edgenext_xx_small", "--no-pretrained", "--img-size", "64", "--epochs", "2",
        "--stage1-epochs", "1", "--limit-batches", "2", "--num-workers", "0", "--no-progress", "--no-curves"]
SCHEDULE = ["schedule", "--steps-per-epoch", "10", "--epochs", "4", "--stage1-epochs", "1"]


@pytest.fixture(scope="module")
def demo_root(demo):
    return demo(n_train=12, n_test=4, size=64, seed=5)


@pytest.fixture(scope="module")
def broken_root(demo_root, tmp_path_factory):
    """The demo data with a corrupt training image, a training image without mask and a corrupt test mask."""
    root = str(tmp_path_factory.mktemp("broken") / "data")
    shutil.copytree(demo_root, root)
    train, test = os.path.join(root, "TrainDataset"), os.path.join(root, "TestDataset", "demo")
    bad = {"image": os.path.join(train, "Imgs", "train-0002.jpg"),
           "unpaired": os.path.join(train, "Imgs", "train-0005.jpg"),
           "test mask": os.path.join(test, "GT", "test-0001.png")}
    for key in ("image", "test mask"):
        with open(bad[key], "wb") as f:
            f.write(b"\xff\xd8 these bytes are no image")
    os.remove(os.path.join(train, "GT", "train-0005.png"))
    return root, bad


def one_error(capsys, argv) -> str:
    """Run the CLI in this process; it must exit 2 with exactly one `error:` line and no traceback."""
    rc = train_ultimate.main(argv)
    out, err = capsys.readouterr()
    assert rc == 2, (rc, out, err)
    assert "Traceback" not in out + err
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), err
    return lines[0]


# ---- item 6: inputs that used to run and do nothing useful --------------------------------------

@pytest.mark.e2e
@pytest.mark.parametrize("kind", ["jpeg", "png16"])
def test_5_zero_one_masks_in_any_container_are_not_empty(demo_root, tmp_path, kind, caplog):
    """0/1 masks saved as JPEG or as 16-bit PNG used to read as all background (IoU 0, no warning)."""
    import logging

    root = tmp_path / "01masks"
    shutil.copytree(demo_root, root)
    for folder, _, files in os.walk(root):
        for name in files:
            if os.path.basename(folder) != "GT":
                continue
            path = os.path.join(folder, name)
            mask = (cv2.imread(path, cv2.IMREAD_GRAYSCALE) > 127).astype(np.uint8)
            os.remove(path)
            stem = os.path.splitext(path)[0]
            if kind == "jpeg":
                cv2.imwrite(stem + ".jpg", mask, [cv2.IMWRITE_JPEG_QUALITY, 95])
            else:
                cv2.imwrite(stem + ".png", mask.astype(np.uint16))
    out = tmp_path / "run"
    with caplog.at_level(logging.INFO):
        assert train_ultimate.main(["train", "--dataset-path", str(root), "--checkpoint-dir", str(out),
                                    *TINY, "--val-split", "0.3"]) == 0
    messages = [r.getMessage() for r in caplog.records]
    assert not any("are they 0/1 masks?" in m for m in messages)  # what an all-empty reading prints
    assert any(m.startswith("train: checked 12 samples") and "0 bad, 0 of 12 good masks empty" in m
               for m in messages), messages


def test_6_skip_stage1_without_stage2_zero_time_limit_and_predict_into_its_input(demo_root, tmp_path, capsys):
    out = tmp_path / "run"
    line = one_error(capsys, ["train", "--dataset-path", demo_root, "--checkpoint-dir", str(out), *TINY,
                              "--stage1-epochs", "2", "--skip-stage1"])
    assert "--skip-stage1" in line and "--stage1-epochs 2" in line and "--epochs 2" in line
    for limit in ("0s", "0h0m"):
        line = one_error(capsys, ["train", "--dataset-path", demo_root, "--checkpoint-dir", str(out), *TINY,
                                  "--time-limit", limit])
        assert f"--time-limit '{limit}'" in line and "no time" in line
    assert not out.exists()  # rejected before anything was written

    images = os.path.join(demo_root, "TestDataset", "demo", "Imgs")
    before = sorted(os.listdir(images))
    (tmp_path / "ckpt.pth").write_bytes(b"never read: the options are checked first")
    for output in (images, os.path.join(images, "masks"), images + os.sep):
        line = one_error(capsys, ["predict", "--checkpoint", str(tmp_path / "ckpt.pth"), "--input", images,
                                  "--output", output])
        assert f"--output {output}" in line and images in line and "--input" in line
    one_file = os.path.join(images, before[0])
    line = one_error(capsys, ["predict", "--checkpoint", str(tmp_path / "ckpt.pth"), "--input", one_file,
                              "--output", images])
    assert "the folder of the --input images" in line
    assert sorted(os.listdir(images)) == before


# ---- item 9: paths of the wrong kind ------------------------------------------------------------

def test_9_checkpoint_dir_dataset_path_and_schedule_outputs_of_the_wrong_kind(demo_root, tmp_path, capsys,
                                                                            monkeypatch):
    a_file = tmp_path / "notes.txt"
    a_file.write_text("keep me")
    for ckdir, parent in ((a_file, a_file), (a_file / "run", a_file)):
        line = one_error(capsys, ["train", "--dataset-path", demo_root, "--checkpoint-dir", str(ckdir), *TINY])
        assert line.startswith(f"error: --checkpoint-dir {ckdir}: {parent} is a file")
    assert a_file.read_text() == "keep me"

    locked = tmp_path / "locked"  # as root, os.access says yes to everything: make it say no here
    locked.mkdir()
    real_access = os.access
    monkeypatch.setattr(os, "access", lambda p, mode: os.fspath(p) != str(locked) and real_access(p, mode))
    for ckdir in (locked, locked / "new" / "run"):
        line = one_error(capsys, ["train", "--dataset-path", demo_root, "--checkpoint-dir", str(ckdir), *TINY])
        assert line == f"error: --checkpoint-dir {ckdir}: {locked} is not writable; pass a folder you can write to"
    monkeypatch.undo()
    assert os.listdir(locked) == []

    line = one_error(capsys, ["schedule", "--dataset-path", str(a_file), *TINY])
    assert f"--dataset-path {a_file} is a file" in line and "TrainDataset/" in line

    folder = tmp_path / "plots"
    folder.mkdir()
    for flag, example in (("--out", "lr.csv"), ("--plot", "lr.png")):
        line = one_error(capsys, [*SCHEDULE, flag, str(folder)])
        assert line == f"error: {flag} {folder} is a folder: name the file to write, e.g. {folder / example}"
    assert os.listdir(folder) == [] and not (tmp_path / "plots.png").exists()


# ---- item 10: an unreadable image read by a DataLoader worker -----------------------------------

@pytest.mark.e2e
def test_10_unreadable_image_in_a_dataloader_worker_is_one_line(broken_root, tmp_path):
    root, bad = broken_root
    # the start-up scan (item 12) would find the file first: take it away to reach the workers
    proc = cli("train", "--dataset-path", root, "--checkpoint-dir", str(tmp_path / "run"), *TINY,
               "--num-workers", "2", "--val-split", "0", "--limit-batches", "3",  # all 12 images
               prelude="import sys, train_ultimate, training.build\n"
                       "training.build.check_files = lambda cfg, index: None")
    assert proc.returncode == 2, proc.stderr
    assert "Traceback" not in proc.stdout + proc.stderr
    assert proc.stderr.strip().splitlines() == [
        f"error: cannot decode image {bad['image']}: not a readable image file; re-export it as PNG or JPEG "
        "or remove it"]


# ---- item 11: a --resume-from file that is not a whole checkpoint -------------------------------

def test_11_resume_from_a_text_file_an_empty_or_a_truncated_checkpoint(demo_root, tmp_path, capsys):
    text, empty, cut = tmp_path / "notes.pth", tmp_path / "empty.pth", tmp_path / "cut.pth"
    text.write_text("hello, not a checkpoint\n")
    empty.write_bytes(b"")
    torch.save({"model": {"w": torch.randn(64, 64)}, "epoch": 3}, str(tmp_path / "whole.pth"))
    whole = (tmp_path / "whole.pth").read_bytes()
    cut.write_bytes(whole[: len(whole) // 2])
    expected = {text: "is not a checkpoint (not a file torch.save wrote)",
                empty: "is empty (0 bytes), probably an interrupted copy",
                cut: f"is truncated ({len(whole) // 2} bytes), probably an interrupted copy"}
    for path, words in expected.items():
        line = one_error(capsys, [*SCHEDULE, "--resume-from", str(path)])
        assert line.startswith(f"error: {path} {words}")
    line = one_error(capsys, ["train", "--dataset-path", demo_root, "--checkpoint-dir", str(tmp_path / "run"),
                              *TINY, "--resume-from", str(text)])
    assert line.startswith(f"error: {text} is not a checkpoint")


# ---- item 12: every file is read before the first step ------------------------------------------

@pytest.fixture(scope="module")
def skipped_run(broken_root, tmp_path_factory):
    """Train on the broken data with the default --skip-bad-files, in a subprocess (workers, console)."""
    root, bad = broken_root
    out = tmp_path_factory.mktemp("skipped") / "run"
    proc = cli("train", "--dataset-path", root, "--checkpoint-dir", str(out), *TINY, "--num-workers", "2")
    return proc, out, bad


@pytest.mark.e2e
def test_12_bad_files_are_found_before_training_and_skipped_or_refused(broken_root, skipped_run, tmp_path, capsys,
                                                                     caplog):
    root, bad = broken_root
    out = tmp_path / "refused"
    line = one_error(capsys, ["train", "--dataset-path", root, "--checkpoint-dir", str(out), *TINY,
                              "--num-workers", "2", "--no-skip-bad-files"])
    assert line.startswith(f"error: 3 bad file(s) in {root} (train 2, test set demo 1): cannot decode image "
                           f"{bad['image']}")
    assert f"others: {bad['unpaired']}, {bad['test mask']}" in line and "--no-skip-bad-files" in line
    assert not (out / "last.pth").exists()  # stopped before the first step

    proc, run, _ = skipped_run
    assert proc.returncode == 0, proc.stderr
    assert "Traceback" not in proc.stdout + proc.stderr
    skips = [s for s in proc.stdout.splitlines() if s.startswith("Skipping a bad file")]
    assert len(skips) == 3 and all(path in s for path, s in zip(bad.values(), skips))
    assert proc.stdout.index("Skipping") < proc.stdout.index("Epoch 1/2")
    assert "| train 9 | val 1 " in proc.stdout and "test sets: demo (3)" in proc.stdout
    assert (run / "test_metrics.json").is_file()  # the test split is scored without its bad mask

    empty = tmp_path / "empty"  # masks of 0/100: under half of 255 everywhere, so all background
    shutil.copytree(root, empty)
    shutil.copy(bad["image"].replace("0002", "0003"), os.path.join(empty, "TrainDataset", "Imgs", "train-0002.jpg"))
    for folder, _, files in os.walk(empty):
        for name in files:
            if folder.endswith("GT"):
                cv2.imwrite(os.path.join(folder, name), np.full((64, 64), 100, np.uint8))
    caplog.set_level("INFO")
    assert train_ultimate.main(["schedule", "--dataset-path", str(empty), *TINY]) == 0
    warnings = [r.getMessage() for r in caplog.records if "are they 0/1 masks?" in r.getMessage()]
    assert len(warnings) == 2 and warnings[0].startswith("Warning: 11 of 11 masks of train are empty")


# ---- item 13: messages that mislead -------------------------------------------------------------

@pytest.mark.e2e
def test_13_onecycle_floor_warmup_help_and_train_log(skipped_run, capsys):
    line = one_error(capsys, [*SCHEDULE, "--scheduler", "onecycle", "--min-lr", "1e-5", "--lr", "2.5e-4"])
    assert line == ("error: --scheduler onecycle starts at --lr / --onecycle-div-factor = 0.00025 / 25 = 1e-05 "
                    "and must end below that, at --min-lr (1e-05): use --min-lr 1e-06 or "
                    "--onecycle-div-factor 12.5")
    for fix in (["--min-lr", "1e-06"], ["--min-lr", "1e-5", "--onecycle-div-factor", "12.5"]):
        assert train_ultimate.main([*SCHEDULE, "--scheduler", "onecycle", "--lr", "2.5e-4", *fix]) == 0

    with pytest.raises(SystemExit):
        train_ultimate.main(["train", "--help"])
    train_help = " ".join(capsys.readouterr().out.split())
    assert "--warmup-epochs WARMUP_EPOCHS linear warm-up from --min-lr at the start of stage 2 (after a resume " \
           "that restarts the schedule inside stage 2: at the resume epoch)" in train_help

    proc, run, _ = skipped_run
    log = (run / "train.log").read_text()
    console = proc.stdout.splitlines()
    # lines of data/discovery.py and data/scan.py (their own loggers) and of the trainer, once each
    for start in ("sinet dataset at", "train: checked 12 samples", "Skipping a bad file", "Data: sinet layout",
                  "Epoch 2/2"):
        assert start in log, start
        matching = [s for s in console if s.startswith(start)]
        assert len(matching) == (3 if start == "Skipping a bad file" else 1), (start, matching)


# ---- issue #20: a probe of bad and odd input -----------------------------------------------------

def test_probe_14_negative_values_in_scientific_notation_and_durations_reach_the_checks(capsys):
    """`--lr -1e-3` and `--time-limit -1h` got argparse's "expected one argument" (its negative-number
    pattern takes `-0.001` only), not the flag's own message."""
    for flag, value, words in (("--lr", "-1e-3", "--lr must be > 0 (got -0.001)"),
                               ("--lr", "-0.001", "--lr must be > 0 (got -0.001)"),
                               ("--time-limit", "-1h", "--time-limit '-1h' leaves no time to train"),
                               ("--time-limit", "-1h30m", "--time-limit '-1h30m' leaves no time to train")):
        assert words in one_error(capsys, [*SCHEDULE, flag, value])


@pytest.fixture
def compared_runs(tmp_path):
    """A folder with a metrics.csv as train writes it, and one whose metrics.csv is something else."""
    run, other = tmp_path / "A", tmp_path / "d"
    run.mkdir()
    other.mkdir()
    (run / "metrics.csv").write_text("epoch,stage,val_iou\n1,1,0.3\n2,2,0.4\n")
    (other / "metrics.csv").write_text("garbage,,\n1,2\n")
    return run, other


def test_probe_7_compare_a_metrics_csv_the_tool_did_not_write(compared_runs, tmp_path, capsys):
    """It used to end in KeyError: 'epoch'."""
    run, other = compared_runs
    (run / "config.json").write_text("{not json")  # nor a config.json that is not JSON
    before = digest(tmp_path)
    line = one_error(capsys, ["compare", str(other), str(run), "--out", str(tmp_path / "c.png")])
    assert line == (f"error: compare: {other / 'metrics.csv'} is not a metrics.csv that train wrote (no "
                    "whole-number 'epoch' column): pass the --checkpoint-dir of a train run")
    line = one_error(capsys, ["compare", str(run), "--out", str(tmp_path / "c.png")])
    assert line.startswith(f"error: compare: cannot read {run / 'config.json'} (")
    assert digest(tmp_path) == before


def test_probe_8_compare_out_is_a_folder_or_a_file_of_a_run(compared_runs, tmp_path, capsys):
    """A folder used to end in IsADirectoryError (schedule had the check, compare did not); a run's
    own file was replaced by the plot."""
    run, _ = compared_runs
    folder = tmp_path / "plots"
    folder.mkdir()
    before = digest(tmp_path)
    line = one_error(capsys, ["compare", str(run), "--out", str(folder)])
    assert line == f"error: --out {folder} is a folder: name the file to write, e.g. {folder / 'compare.png'}"
    line = one_error(capsys, ["compare", str(run), "--out", str(run / "metrics.csv")])
    assert line.startswith(f"error: --out {run / 'metrics.csv'} is a file of one of the runs compared")
    assert digest(tmp_path) == before and os.listdir(folder) == []


def test_probe_3_predict_never_writes_over_an_input_image_nor_an_existing_file(demo_root, tmp_path, capsys):
    """`--zip imgs/p0.png` with `--input imgs/` used to exit 0 with the image replaced by the zip."""
    images = tmp_path / "imgs"
    shutil.copytree(os.path.join(demo_root, "TestDataset", "demo", "Imgs"), images)
    first = images / sorted(os.listdir(images))[0]
    out = tmp_path / "masks"
    out.mkdir()
    mine = out / (first.stem + ".png")
    mine.write_bytes(b"the user's own file")
    (tmp_path / "ckpt.pth").write_bytes(b"never read: the outputs are checked first")
    before = digest(tmp_path)
    predict = ["predict", "--checkpoint", str(tmp_path / "ckpt.pth"), "--input", str(images), "--no-progress"]
    for extra in ([], ["--overwrite"]):  # an input image is never an output
        line = one_error(capsys, [*predict, "--output", str(tmp_path / "new"), "--zip", str(first), *extra])
        assert line == f"error: --zip {first} is one of the --input images: it would be replaced; choose another --zip"
    line = one_error(capsys, [*predict, "--output", str(tmp_path / "new"), "--zip", str(tmp_path / "new")])
    assert line.startswith(f"error: --zip {tmp_path / 'new'} is the --output folder")
    line = one_error(capsys, [*predict, "--output", str(tmp_path / "new"), "--zip", str(out)])
    assert line == f"error: --zip {out} is a folder: name the file to write, e.g. {out / 'masks.zip'}"
    line = one_error(capsys, [*predict, "--output", str(out)])
    assert line == f"error: --output: {mine} already exists: add --overwrite to replace, or choose another --output"
    assert digest(tmp_path) == before and not (tmp_path / "new").exists()


def test_probe_5_a_float_image_with_an_infinite_pixel_is_a_bad_file(demo_root, tmp_path, capsys, caplog):
    """A float32 TIFF in [0, 1] with one +inf pixel used to read as black, without a word."""
    root = tmp_path / "data"
    shutil.copytree(demo_root, root)
    jpg = root / "TrainDataset" / "Imgs" / "train-0003.jpg"
    image = cv2.imread(str(jpg)).astype(np.float32) / 255.0
    image[5, 7, 1] = np.inf
    tif = jpg.with_suffix(".tif")
    cv2.imwrite(str(tif), image)
    jpg.unlink()
    before = digest(root)
    words = f"image {tif} has 1 pixel(s) that are NaN or infinite; re-export it without them or remove it"
    caplog.set_level("INFO")
    assert train_ultimate.main(["schedule", "--dataset-path", str(root), *TINY]) == 0
    out, err = capsys.readouterr()
    assert "Traceback" not in out + err
    assert [r.getMessage() for r in caplog.records if "Skipping" in r.getMessage()] == [
        f"Skipping a bad file (--skip-bad-files): {words}"]
    line = one_error(capsys, ["schedule", "--dataset-path", str(root), *TINY, "--no-skip-bad-files"])
    assert line.startswith(f"error: 1 bad file(s) in {root} (train 1): {words}")
    assert digest(root) == before


@pytest.mark.e2e
def test_probe_13_moe_top_k_above_the_experts_is_capped_and_says_so(demo_root, tmp_path, capsys, caplog):
    """`--moe-top-k 9` with 4 experts used 4 but logged "top-9" and stored 9 in config.json."""
    import json

    out = tmp_path / "run"
    caplog.set_level("INFO")
    assert train_ultimate.main(["train", "--dataset-path", demo_root, "--checkpoint-dir", str(out), *TINY,
                                "--epochs", "1", "--limit-batches", "1", "--num-experts", "4",
                                "--moe-top-k", "9"]) == 0
    captured = capsys.readouterr()
    assert "Traceback" not in captured.out + captured.err
    messages = [r.getMessage() for r in caplog.records]
    assert [m for m in messages if "--moe-top-k" in m] == [
        "Note: --moe-top-k 9 is more than --num-experts 4: each sample uses all 4 experts (top-4)"]
    assert any(m.startswith("Model: edgenext_xx_small, 4 experts (top-4)") for m in messages)
    assert json.loads((out / "config.json").read_text())["moe_top_k"] == 4
