"""``evaluate`` and ``predict`` on a checkpoint trained here (CPU, edgenext_xx_small, 64 px, one batch).

The commands are driven through parsers built with ``add_*_arguments``, as ``train_ultimate.py``
builds them; their numbers are checked against the model and ``SegMetrics`` run by hand.
"""

import argparse
import csv
import json
import logging
import os
import shutil
import zipfile
from types import SimpleNamespace

import cv2
import numpy as np
import pytest
import torch

import train_ultimate
from data import find_dataset, load_image, load_mask
from core.errors import UserError
from evaluation import METRIC_KEYS, SegMetrics
from evaluation.cli import add_evaluate_arguments, add_predict_arguments, run_evaluate, run_predict
from evaluation.evaluate import predict_probs
from models import build_model
from core import checkpoint as ckpt

# The numbers here are checked against an fp32 CPU path done by hand, so the commands run on the CPU
# too (fp32 by construction); tests/test_cuda.py covers the CUDA paths with their own tolerances.
FAST = ["--num-workers", "0", "--no-progress", "--device", "cpu"]
MEAN = np.array([0.485, 0.456, 0.406], np.float32)
STD = np.array([0.229, 0.224, 0.225], np.float32)


@pytest.fixture(scope="module")
def run(demo, tmp_path_factory):
    root = demo(n_train=8, n_test=4, size=64, seed=0)
    ck = tmp_path_factory.mktemp("evalpred") / "ck"
    assert train_ultimate.main([
        "train", "--dataset-path", root, "--checkpoint-dir", str(ck), "--backbone", "edgenext_xx_small",
        "--no-pretrained", "--img-size", "64", "--epochs", "1", "--stage1-epochs", "1", "--limit-batches", "1",
        "--num-workers", "0", "--no-progress", "--ema", "--device", "cpu", "--no-curves"]) == 0
    test_dir = os.path.join(root, "TestDataset", "demo")
    images = sorted(os.path.join(test_dir, "Imgs", f) for f in os.listdir(os.path.join(test_dir, "Imgs")))
    masks = [os.path.join(test_dir, "GT", os.path.splitext(os.path.basename(p))[0] + ".png") for p in images]
    return SimpleNamespace(root=root, dir=ck, ckpt=str(ck / "best_model.pth"), images=images, masks=masks)


def evaluate(*argv):
    p = argparse.ArgumentParser()
    add_evaluate_arguments(p)
    return run_evaluate(p.parse_args([*argv, *FAST]))


def predict(*argv):
    p = argparse.ArgumentParser()
    add_predict_arguments(p)
    return run_predict(p.parse_args([*argv, *FAST]))


def read_json(folder):
    with open(os.path.join(folder, "eval_results.json")) as f:
        return json.load(f)


def hand_model(path, weights="model"):
    obj = ckpt.load(path)
    cfg = obj["config"]
    model = build_model(backbone=cfg["backbone"], num_experts=cfg["num_experts"], moe_top_k=cfg["moe_top_k"],
                        deep_supervision=cfg["deep_supervision"], decoder_channels=cfg["decoder_channels"],
                        pretrained=False)
    model.load_state_dict(obj["ema"]["module"] if weights == "ema" else obj["model"])
    return model.eval()


@torch.no_grad()
def hand_prob(model, image_path, size, tta=False):
    """Probability map at the model size: bilinear resize, ImageNet normalisation, sigmoid."""
    img = cv2.resize(load_image(image_path), (size, size), interpolation=cv2.INTER_LINEAR)
    x = torch.from_numpy(((img.astype(np.float32) / 255.0 - MEAN) / STD).transpose(2, 0, 1).copy())[None]
    prob = torch.sigmoid(model(x)["main"])[0, 0]
    if tta:
        prob = (prob + torch.sigmoid(model(x.flip(-1))["main"])[0, 0].flip(-1)) / 2
    return prob.numpy()


def hand_metrics(run, size, weights="model", tta=False):
    model = hand_model(run.ckpt, weights)
    metrics = SegMetrics(threshold=0.5)
    for image, mask in zip(run.images, run.masks):
        metrics.step(hand_prob(model, image, size, tta), load_mask(mask))  # resized to the GT by SegMetrics
    return metrics.results()


def assert_close(got: dict, want: dict, tol=2e-5):
    # evaluate runs images in batches, the hand path one by one: CPU kernels differ by ~1e-7 between
    # the two, which can flip one pixel's round(prob * 255) and move a metric by ~1e-6 on 64 px masks.
    # Scoring at the model's 96 px instead of the GT's 64 px moved them by 1.6e-4 (mE) to 7e-3 (wFm).
    for k in METRIC_KEYS:
        assert got[k] == pytest.approx(want[k], abs=tol), k


# ---- evaluate ---------------------------------------------------------------------------------

@pytest.mark.e2e
def test_evaluate_equals_segmetrics_by_hand_at_gt_resolution(run, tmp_path, caplog):
    caplog.set_level(logging.INFO)
    # --img-size 96: the model sees 96 px, its predictions are resized to the 64 px masks
    assert evaluate("--checkpoint", run.ckpt, "--dataset-path", run.root, "--img-size", "96",
                    "--batch-size", "3", "--out-dir", str(tmp_path)) == 0
    report = read_json(tmp_path)
    assert report["weights"] == "model" and report["epoch"] == 1 and report["tta"] == "none"
    assert report["img_size"] == 96 and report["images"] == {"demo": 4}
    assert report["checkpoint"] == os.path.abspath(run.ckpt)
    assert list(report["results"]) == ["demo"]
    assert_close(report["results"]["demo"], hand_metrics(run, 96))
    with open(tmp_path / "eval_results.csv") as f:
        rows = list(csv.DictReader(f))
    assert [r["dataset"] for r in rows] == ["demo"] and rows[0]["images"] == "4"
    assert float(rows[0]["iou"]) == pytest.approx(report["results"]["demo"]["iou"], abs=1e-6)
    table = next(r.getMessage() for r in caplog.records if "Dataset" in r.getMessage())
    header, row = table.splitlines()[-2:]
    assert header.split() == ["Dataset", "Sm", "Fwb", "mE", "MAE", "IoU", "Dice"]
    assert row.split()[0] == "demo" and float(row.split()[1]) == pytest.approx(report["results"]["demo"]["sm"],
                                                                              abs=5e-4)


@pytest.mark.e2e
def test_evaluate_use_ema_reproduces_the_runs_test_metrics(run, tmp_path):
    assert evaluate("--checkpoint", run.ckpt, "--dataset-path", run.root, "--use-ema",
                    "--out-dir", str(tmp_path)) == 0
    report = read_json(tmp_path)
    assert report["weights"] == "ema"
    with open(run.dir / "test_metrics.json") as f:
        trained = json.load(f)["results"]["demo"]  # the trainer scores best_model.pth's EMA weights
    assert_close(report["results"]["demo"], trained)


@pytest.mark.e2e
def test_evaluate_flip_tta_averages_the_mirrored_prediction(run, tmp_path):
    assert evaluate("--checkpoint", run.ckpt, "--dataset-path", run.root, "--tta", "flip",
                    "--out-dir", str(tmp_path)) == 0
    report = read_json(tmp_path)
    assert report["tta"] == "flip" and report["images"] == {"demo": 4}
    assert_close(report["results"]["demo"], hand_metrics(run, 64, tta=True))


def test_predict_probs_flip_shape_and_value():
    torch.manual_seed(0)
    model = build_model(backbone="edgenext_xx_small", num_experts=3, pretrained=False).eval()
    x = torch.randn(2, 3, 64, 64)
    plain, flip = predict_probs(model, x), predict_probs(model, x, tta="flip")
    assert plain.shape == flip.shape == (2, 1, 64, 64)
    with torch.no_grad():
        mirrored = torch.sigmoid(model(x.flip(-1))["main"]).flip(-1)
    torch.testing.assert_close(flip, (plain + mirrored) / 2)


@pytest.mark.e2e
def test_evaluate_root_with_test_sets_only_and_limit(run, tmp_path):
    root = tmp_path / "only_test"
    shutil.copytree(os.path.join(run.root, "TestDataset"), root / "TestDataset")
    with pytest.raises(UserError, match="no dataset found"):
        find_dataset(str(root))  # training still needs a train folder
    index = find_dataset(str(root), require_train=False)
    assert index.train == [] and list(index.tests) == ["demo"] and len(index.tests["demo"]) == 4
    assert evaluate("--checkpoint", run.ckpt, "--dataset-path", str(root), "--limit", "2",
                    "--out-dir", str(tmp_path)) == 0
    report = read_json(tmp_path)
    assert report["images"] == {"demo": 2} and report["limit"] == 2


@pytest.mark.e2e
def test_find_dataset_cod10k_test_folder_only(run, tmp_path):
    root = tmp_path / "COD10K-v3"
    for sub in ("Image", "GT_Object"):
        (root / "Test" / sub).mkdir(parents=True)
    for i, (image, mask) in enumerate(zip(run.images[:3], run.masks[:3])):
        name = f"COD10K-{'NonCAM' if i == 0 else 'CAM'}-1-Aquatic-1-Fish-{i}"
        shutil.copy(image, root / "Test" / "Image" / f"{name}.jpg")
        shutil.copy(mask, root / "Test" / "GT_Object" / f"{name}.png")
    with pytest.raises(UserError):
        find_dataset(str(tmp_path))
    index = find_dataset(str(tmp_path), require_train=False)  # the folder that holds COD10K-v3/
    assert index.layout == "cod10k" and index.train == [] and len(index.tests["COD10K"]) == 2
    assert len(find_dataset(str(root), require_train=False, include_noncam=True).tests["COD10K"]) == 3


@pytest.mark.e2e
def test_evaluate_errors_name_the_file(run, tmp_path):
    missing = str(tmp_path / "nope.pth")
    with pytest.raises(UserError, match="nope.pth"):
        evaluate("--checkpoint", missing, "--dataset-path", run.root)
    with pytest.raises(UserError, match="nope.pth"):
        predict("--checkpoint", missing, "--input", run.images[0], "--output", str(tmp_path / "o"))
    (tmp_path / "train_only" / "TrainDataset").mkdir(parents=True)
    shutil.copytree(os.path.join(run.root, "TrainDataset", "Imgs"), tmp_path / "train_only" / "TrainDataset" / "Imgs")
    shutil.copytree(os.path.join(run.root, "TrainDataset", "GT"), tmp_path / "train_only" / "TrainDataset" / "GT")
    with pytest.raises(UserError, match="no test set"):
        evaluate("--checkpoint", run.ckpt, "--dataset-path", str(tmp_path / "train_only"))


@pytest.mark.e2e
def test_bare_state_dict_needs_backbone(run, tmp_path, caplog):
    bare = tmp_path / "bare.pth"
    torch.save(ckpt.load(run.ckpt)["model"], bare)
    with pytest.raises(UserError, match="--backbone"):
        evaluate("--checkpoint", str(bare), "--dataset-path", run.root)
    caplog.set_level(logging.INFO)
    assert evaluate("--checkpoint", str(bare), "--dataset-path", run.root, "--backbone", "edgenext_xx_small",
                    "--img-size", "64", "--use-ema") == 0
    assert any(r.levelno == logging.WARNING and "no EMA" in r.getMessage() for r in caplog.records)
    report = read_json(tmp_path)  # default --out-dir: the checkpoint's folder
    assert report["weights"] == "model" and report["epoch"] is None
    assert_close(report["results"]["demo"], hand_metrics(run, 64))


# ---- predict ----------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def inputs(run, tmp_path_factory):
    """Odd sizes, a grey and an RGBA image, plus files predict must skip."""
    folder = tmp_path_factory.mktemp("inputs")
    src = load_image(run.images[0])
    rgb = cv2.resize(src, (70, 50))
    cv2.imwrite(str(folder / "a.jpg"), cv2.cvtColor(rgb, cv2.COLOR_RGB2BGR))
    cv2.imwrite(str(folder / "b.png"), cv2.cvtColor(cv2.resize(src, (33, 81)), cv2.COLOR_RGB2GRAY))
    rgba = cv2.cvtColor(cv2.resize(src, (45, 40)), cv2.COLOR_RGB2BGRA)
    rgba[..., 3] = 128
    cv2.imwrite(str(folder / "c.png"), rgba)
    (folder / "notes.txt").write_text("not an image")
    cv2.imwrite(str(folder / ".hidden.png"), rgb)
    return SimpleNamespace(folder=str(folder), sizes={"a": (50, 70), "b": (81, 33), "c": (40, 45)})


def read_png(path):
    return cv2.imread(str(path), cv2.IMREAD_UNCHANGED)


@pytest.mark.e2e
def test_predict_writes_probability_pngs_at_original_size_overlays_and_zip(run, inputs, tmp_path):
    out, archive = tmp_path / "out", tmp_path / "masks.zip"
    assert predict("--checkpoint", run.ckpt, "--input", inputs.folder, "--output", str(out), "--overlay",
                   "--zip", str(archive), "--batch-size", "2") == 0
    names = {f"{stem}.png" for stem in inputs.sizes}
    assert {f for f in os.listdir(out) if f.endswith(".png")} == names
    model = hand_model(run.ckpt)
    for stem, (h, w) in inputs.sizes.items():
        png = read_png(out / f"{stem}.png")
        assert png.dtype == np.uint8 and png.shape == (h, w)
        prob = cv2.resize(hand_prob(model, os.path.join(inputs.folder, [f for f in os.listdir(inputs.folder)
                                                                          if f.startswith(stem + ".")][0]), 64),
                          (w, h), interpolation=cv2.INTER_LINEAR)
        assert np.abs(png.astype(int) - np.rint(prob * 255)).max() <= 1
        ov = cv2.imread(str(out / "overlay" / f"{stem}_overlay.jpg"))
        assert ov is not None and ov.shape == (h, w, 3)
    with zipfile.ZipFile(archive) as z:
        assert sorted(z.namelist()) == sorted(names)


@pytest.mark.e2e
def test_predict_threshold_gives_binary_masks(run, inputs, tmp_path):
    assert predict("--checkpoint", run.ckpt, "--input", inputs.folder, "--output", str(tmp_path / "p")) == 0
    assert predict("--checkpoint", run.ckpt, "--input", inputs.folder, "--output", str(tmp_path / "b"),
                   "--threshold", "0.5", "--tta", "flip") == 0
    for stem, size in inputs.sizes.items():
        binary = read_png(tmp_path / "b" / f"{stem}.png")
        assert binary.shape == size and set(np.unique(binary)) <= {0, 255}
    assert predict("--checkpoint", run.ckpt, "--input", inputs.folder, "--output", str(tmp_path / "b2"),
                   "--threshold", "0.5") == 0
    for stem in inputs.sizes:  # same decision as the probability PNG, away from the threshold
        prob, binary = read_png(tmp_path / "p" / f"{stem}.png"), read_png(tmp_path / "b2" / f"{stem}.png")
        clear = np.abs(prob.astype(int) * 2 - 255) > 2
        assert np.array_equal((prob >= 128)[clear], (binary == 255)[clear])


@pytest.mark.e2e
def test_predicted_pngs_score_as_evaluate_does(run, tmp_path):
    out = tmp_path / "pred"
    imgs = os.path.dirname(run.images[0])
    assert predict("--checkpoint", run.ckpt, "--input", imgs, "--output", str(out), "--img-size", "96") == 0
    assert evaluate("--checkpoint", run.ckpt, "--dataset-path", run.root, "--img-size", "96",
                    "--out-dir", str(tmp_path)) == 0
    metrics = SegMetrics(threshold=0.5)
    for image, mask in zip(run.images, run.masks):
        stem = os.path.splitext(os.path.basename(image))[0]
        metrics.step(read_png(out / f"{stem}.png"), load_mask(mask))
    assert_close(metrics.results(), read_json(tmp_path)["results"]["demo"])


@pytest.mark.e2e
def test_predict_single_file_and_input_errors(run, inputs, tmp_path):
    assert predict("--checkpoint", run.ckpt, "--input", os.path.join(inputs.folder, "b.png"),
                   "--output", str(tmp_path / "one")) == 0
    assert os.listdir(tmp_path / "one") == ["b.png"]
    assert read_png(tmp_path / "one" / "b.png").shape == inputs.sizes["b"]

    empty = tmp_path / "empty"
    empty.mkdir()
    (empty / "readme.txt").write_text("x")
    with pytest.raises(UserError, match="no images"):
        predict("--checkpoint", run.ckpt, "--input", str(empty), "--output", str(tmp_path / "o"))

    bad = tmp_path / "bad"
    bad.mkdir()
    (bad / "broken.jpg").write_bytes(b"not a jpeg")
    p = argparse.ArgumentParser()
    add_predict_arguments(p)
    with pytest.raises(UserError, match="broken.jpg") as e:  # raised from a DataLoader worker: still one line
        run_predict(p.parse_args(["--checkpoint", run.ckpt, "--input", str(bad), "--output", str(tmp_path / "o"),
                                  "--num-workers", "1", "--no-progress"]))
    assert "\n" not in str(e.value)

    with pytest.raises(UserError, match="mix with the images"):
        predict("--checkpoint", run.ckpt, "--input", inputs.folder, "--output", inputs.folder)
    with pytest.raises(UserError, match="--threshold"):
        predict("--checkpoint", run.ckpt, "--input", inputs.folder, "--output", str(tmp_path / "o"),
                "--threshold", "1.5")
