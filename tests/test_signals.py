"""Signals sent to the whole process group, as ``timeout``, Ctrl-C, ``docker stop`` and a notebook's
stop send them: DataLoader workers included. The run must save ``last.pth``, exit 128+signal with no
traceback, and resume to exactly the run it would have been.

Each run is its own process, started in its own session (so ``os.killpg`` reaches its workers and
nothing else). A small driver wraps the trainer's optimizer step: after the first update it drops a
marker file and sleeps, so the test's signal lands inside a known step.
"""

import os
import signal
import subprocess
import sys
import time

import pytest
import torch

import data
import train_ultimate
from tests.helpers import REPO, assert_same_run, finish, rows, wait_for
from core import checkpoint as ckpt

# 3 batches of 4 with accumulation 2: updates after batches 2 and 3 of each epoch; 2 workers
FLAGS = ["--backbone", "edgenext_xx_small", "--no-pretrained", "--img-size", "64", "--num-workers", "2",
         "--no-progress", "--num-experts", "3", "--batch-size", "4", "--accumulation-steps", "2",
         "--limit-batches", "3", "--epochs", "2", "--stage1-epochs", "1", "--scheduler", "cosine",
         "--lr", "1e-3", "--min-lr", "1e-5", "--ema", "--dropout", "0.1", "--seed", "3", "--no-curves"]


@pytest.fixture(scope="module")
def setup(tmp_path_factory, demo, signal_driver):
    """(a folder for the runs, the demo data, the driver script: tests/helpers.py SIGNAL_DRIVER)"""
    return tmp_path_factory.mktemp("signals"), demo(n_train=16, n_test=6, size=64, seed=1), signal_driver


def start(setup, out, *extra, marker=None):
    base, root, driver = setup
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    env.pop("SIGNAL_MARKER", None)
    if marker:
        env["SIGNAL_MARKER"] = marker
    args = [sys.executable, driver, "train", "--dataset-path", root, "--checkpoint-dir", out, *FLAGS, *extra]
    return subprocess.Popen(args, cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True, start_new_session=True)


@pytest.fixture(scope="module")
def straight(setup):
    out = str(setup[0] / "straight")
    rc, text = finish(start(setup, out))
    assert rc == 0, text
    return out


@pytest.mark.e2e
@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT], ids=["SIGTERM", "SIGINT"])
def test_signal_to_the_process_group_saves_and_resumes_exactly(setup, straight, sig):
    out = str(setup[0] / f"killed_{sig.name}")
    marker = str(setup[0] / f"marker_{sig.name}")
    proc = start(setup, out, marker=marker)
    wait_for(marker, proc)
    os.killpg(proc.pid, sig)  # the main process and both DataLoader workers
    rc, text = finish(proc)
    assert rc == 128 + sig, text
    assert "Traceback" not in text and "killed by signal" not in text, text
    assert f"{sig.name} received" in text and "--resume-from" in text
    saved = ckpt.load(os.path.join(out, "last.pth"))
    assert saved["epoch"] == -1 and saved["partial"] == {**saved["partial"], "epoch": 0, "batches": 2}

    rc, text = finish(start(setup, out, "--resume-from", os.path.join(out, "last.pth")))
    assert rc == 0, text
    assert_same_run(straight, out)


@pytest.mark.e2e
def test_a_second_ctrl_c_stops_at_once(setup):
    out = str(setup[0] / "twice")
    marker = str(setup[0] / "marker_twice")
    proc = start(setup, out, marker=marker)
    wait_for(marker, proc)
    os.killpg(proc.pid, signal.SIGINT)
    time.sleep(0.5)
    os.killpg(proc.pid, signal.SIGINT)  # still inside the same step: no save this time
    rc, text = finish(proc)
    assert rc == 130, text
    assert "Traceback" not in text, text
    assert "interrupted" in text
    assert not os.path.exists(os.path.join(out, "last.pth"))  # nothing completed, nothing half-written
    assert not [f for f in os.listdir(out) if f.startswith(".tmp-")]


# ---- a signal while validation or the test-set scoring runs (in-process, no workers) ----------

# 8 training images (2 batches, one update an epoch), 8 validation images and 6 test images in
# batches of 4: validation reads masks 1-8 in epoch 1 and 9-16 in epoch 2, the test scoring 17-22
IN_PROCESS = [*FLAGS, "--num-workers", "0", "--metric-workers", "0", "--val-split", "0.5"]


def signal_on_mask_read(monkeypatch, nth, sig=signal.SIGTERM):
    real, reads = data.load_mask, [0]

    def load_mask(path):
        reads[0] += 1
        if reads[0] == nth:
            os.kill(os.getpid(), sig)
        return real(path)

    monkeypatch.setattr(data, "load_mask", load_mask)


def train(setup, out, *extra):
    return train_ultimate.main(["train", "--dataset-path", setup[1], "--checkpoint-dir", out, *IN_PROCESS,
                                *extra])


@pytest.mark.e2e
def test_a_signal_during_validation_saves_the_trained_epoch_and_resumes_exactly(setup, monkeypatch, capsys):
    straight = str(setup[0] / "val_straight")
    assert train(setup, straight) == 0
    out = str(setup[0] / "val_killed")
    signal_on_mask_read(monkeypatch, 10)  # the first validation batch of epoch 2
    assert train(setup, out) == 128 + signal.SIGTERM
    assert "before its validation" in capsys.readouterr().err
    saved = ckpt.load(os.path.join(out, "last.pth"))
    assert saved["epoch"] == 0 and saved["partial"]["epoch"] == 1 and saved["partial"]["batches"] == 2
    assert [r["epoch"] for r in rows(out)] == ["1"]
    monkeypatch.undo()
    assert train(setup, out, "--resume-from", os.path.join(out, "last.pth")) == 0
    a, b = ckpt.load(os.path.join(straight, "last.pth")), ckpt.load(os.path.join(out, "last.pth"))
    for key in a["model"]:
        torch.testing.assert_close(a["model"][key], b["model"][key], rtol=0, atol=1e-5, msg=key)
    assert rows(straight) == rows(out)


@pytest.mark.e2e
def test_a_signal_during_test_scoring_keeps_the_trained_model(setup, monkeypatch, capsys):
    out = str(setup[0] / "test_killed")
    signal_on_mask_read(monkeypatch, 18)  # the first test batch
    assert train(setup, out) == 128 + signal.SIGTERM
    err = capsys.readouterr().err
    assert "while scoring the test split" in err and "evaluate --checkpoint" in err and "--use-ema" in err
    assert os.path.isfile(os.path.join(out, "best_model.pth"))
    assert not os.path.exists(os.path.join(out, "test_metrics.json"))
    assert [r["epoch"] for r in rows(out)] == ["1", "2"]


CRASH_IN_LOOP = """
import sys
sys.path.insert(0, {repo!r})
import torch
from torch.utils.data import TensorDataset
from data import build_loader

loader = build_loader(TensorDataset(torch.arange(64.0)), batch_size=2, shuffle=True, num_workers=2, seed=0)
batches = iter(loader)  # alive until the interpreter exits (a global, a notebook, a traceback)
next(batches)
raise RuntimeError("a bug inside the training loop")
"""


@pytest.mark.e2e
def test_a_crash_with_live_workers_exits_instead_of_hanging(tmp_path):
    """Workers ignore SIGTERM; an exception while they are alive must still end the process."""
    script = tmp_path / "crash.py"
    script.write_text(CRASH_IN_LOOP.format(repo=REPO))
    proc = subprocess.run([sys.executable, str(script)], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 1 and "a bug inside the training loop" in proc.stderr
    assert "killed by signal" not in proc.stderr
