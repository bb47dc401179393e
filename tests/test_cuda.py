"""The paths that only exist on a GPU: bf16 and fp16 (GradScaler) training, a mid-epoch resume on
CUDA, and checkpoints moving between CPU and CUDA. Each CUDA case is skipped without a GPU; the
device-generic ones also run on the CPU, so their logic is exercised everywhere.
"""

import json
import os
import signal

import pytest
import torch

import train_ultimate
from core import checkpoint as ckpt
from training import loop, trainer

pytestmark = pytest.mark.e2e

CUDA = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
DEVICES = ["cpu", pytest.param("cuda", marks=CUDA)]

# 3 batches, accumulation 2: 2 updates an epoch; the first update of epoch 2 is update 3
FLAGS = ["--backbone", "edgenext_xx_small", "--no-pretrained", "--img-size", "64", "--num-workers", "0",
         "--no-progress", "--num-experts", "3", "--batch-size", "4", "--accumulation-steps", "2",
         "--limit-batches", "3", "--epochs", "3", "--stage1-epochs", "1", "--scheduler", "cosine",
         "--lr", "1e-3", "--min-lr", "1e-5", "--ema", "--deep-supervision", "--seed", "4", "--no-curves"]


@pytest.fixture(scope="module")
def root(demo):
    return demo(n_train=16, n_test=2, size=64, seed=3)


def train(root, out, *extra):
    return train_ultimate.main(["train", "--dataset-path", root, "--checkpoint-dir", out, *FLAGS, *extra])


def sigterm_at_update(monkeypatch, n):
    real, calls = loop.optimizer_step, [0]

    def step(*args, **kwargs):
        real(*args, **kwargs)
        calls[0] += 1
        if calls[0] == n:
            os.kill(os.getpid(), signal.SIGTERM)

    monkeypatch.setattr(loop, "optimizer_step", step)


def capture_run(monkeypatch):
    """Record the Run that the first resumed epoch trains with."""
    real, seen = trainer.train_one_epoch, []

    def epoch(run, *args, **kwargs):
        seen.append(run)
        return real(run, *args, **kwargs)

    monkeypatch.setattr(trainer, "train_one_epoch", epoch)
    return seen


def assert_on(run, device: str):
    want = torch.device(device).type
    assert {p.device.type for p in run.net.parameters()} == {want}
    assert {p.device.type for p in run.state.ema.module.parameters()} == {want}
    for state in run.state.optimizer.state.values():
        for name, t in state.items():
            if torch.is_tensor(t) and name != "step":  # AdamW keeps its step count on the CPU
                assert t.device.type == want, name


def interrupted_checkpoint(root, out, monkeypatch, *extra):
    sigterm_at_update(monkeypatch, 3)
    assert train(root, out, *extra) == 128 + signal.SIGTERM
    monkeypatch.undo()
    saved = ckpt.load(os.path.join(out, "last.pth"))
    assert saved["partial"]["batches"] == 2 and saved["partial"]["usage"] is not None
    return os.path.join(out, "last.pth")


@pytest.mark.parametrize("device", DEVICES)
def test_mid_epoch_resume_restores_every_tensor_on_the_run_device(root, tmp_path, monkeypatch, device):
    last = interrupted_checkpoint(root, str(tmp_path / "a"), monkeypatch, "--device", device)
    seen = capture_run(monkeypatch)
    assert train(root, str(tmp_path / "a"), "--device", device, "--resume-from", last) == 0
    assert_on(seen[0], device)


@CUDA
@pytest.mark.parametrize("src,dst", [("cpu", "cuda"), ("cuda", "cpu")])
def test_a_mid_epoch_checkpoint_resumes_on_the_other_device(root, tmp_path, monkeypatch, src, dst):
    last = interrupted_checkpoint(root, str(tmp_path / "a"), monkeypatch, "--device", src)
    seen = capture_run(monkeypatch)
    assert train(root, str(tmp_path / "a"), "--device", dst, "--resume-from", last) == 0
    assert_on(seen[0], dst)
    assert ckpt.load(last)["epoch"] == 2


@CUDA
@pytest.mark.parametrize("amp", ["bf16", "fp16"])
def test_mixed_precision_trains_and_resumes_mid_epoch(root, tmp_path, monkeypatch, amp):
    out = str(tmp_path / amp)
    last = interrupted_checkpoint(root, out, monkeypatch, "--amp", amp)
    saved = ckpt.load(last)
    if amp == "fp16":  # GradScaler state travels with the checkpoint
        assert saved["scaler"] is not None and saved["scaler"]["scale"] > 0
    else:
        assert saved["scaler"] is None
    seen = capture_run(monkeypatch)
    assert train(root, out, "--amp", amp, "--resume-from", last) == 0
    run = seen[0]
    assert run.rt.dtype == {"bf16": torch.bfloat16, "fp16": torch.float16}[amp]
    assert (run.state.scaler is not None) == (amp == "fp16")
    assert_on(run, "cuda")
    final = ckpt.load(last)
    assert final["epoch"] == 2 and final["partial"] is None
    assert all(torch.isfinite(t).all() for t in final["model"].values() if t.is_floating_point())


@CUDA
def test_evaluate_on_cuda_matches_the_cpu_in_fp32(root, tmp_path):
    """evaluate defaults to fp32 on CUDA too. cuDNN may still use TF32 for convolutions, so the
    tolerance is looser than between two CPU paths; it has not been measured on a GPU yet."""
    out = str(tmp_path / "run")
    assert train(root, out, "--epochs", "1", "--stage1-epochs", "1") == 0
    reports = {}
    for device in ("cpu", "cuda"):
        folder = tmp_path / device
        assert train_ultimate.main(["evaluate", "--checkpoint", os.path.join(out, "best_model.pth"),
                                    "--dataset-path", root, "--device", device, "--num-workers", "0",
                                    "--no-progress", "--out-dir", str(folder)]) == 0
        with open(folder / "eval_results.json") as f:
            reports[device] = json.load(f)["results"]["demo"]
    for key, value in reports["cpu"].items():
        assert reports["cuda"][key] == pytest.approx(value, abs=2e-3), key
