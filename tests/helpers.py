"""Plain helpers and constants the test modules share (the fixtures are in ``conftest.py``).

A test module imports from here, never from another test module: each file can then be run, moved or
deleted alone.
"""

from __future__ import annotations

import csv
import hashlib
import os
import shlex
import subprocess
import sys
import time

import cv2
import torch

from core import checkpoint as ckpt

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def rows(folder) -> list:
    """The rows of ``folder``/metrics.csv, as strings (as train wrote them)."""
    with open(os.path.join(folder, "metrics.csv")) as f:
        return list(csv.DictReader(f))


def assert_same_run(a, b) -> None:
    """Two checkpoint folders hold the same run: weights and EMA to 1e-5, update count, metrics.csv."""
    la, lb = ckpt.load(os.path.join(a, "last.pth")), ckpt.load(os.path.join(b, "last.pth"))
    for key in la["model"]:
        torch.testing.assert_close(la["model"][key], lb["model"][key], rtol=0, atol=1e-5, msg=key)
    for key in la["ema"]["module"]:
        torch.testing.assert_close(la["ema"]["module"][key], lb["ema"]["module"][key], rtol=0, atol=1e-5)
    assert la["global_step"] == lb["global_step"]
    assert rows(a) == rows(b)  # every LR, loss term and metric, as written


def digest(folder) -> dict:
    """{relative path: sha256} of every file under ``folder``, the lock file aside."""
    out = {}
    for base, _, files in os.walk(folder):
        for name in files:
            if name != ".cod-run.lock":
                path = os.path.join(base, name)
                with open(path, "rb") as f:
                    out[os.path.relpath(path, folder)] = hashlib.sha256(f.read()).hexdigest()
    return out


def cli(*args, prelude=None, timeout=300) -> subprocess.CompletedProcess:
    """``python train_ultimate.py ARGS`` in a subprocess (DataLoader workers, the console as users see
    it), or the CLI after a few lines of Python (``prelude``, which must import sys and train_ultimate)."""
    cmd = [sys.executable, "-c", prelude + "\nsys.exit(train_ultimate.main(sys.argv[1:]))"] if prelude else \
        [sys.executable, "train_ultimate.py"]
    return subprocess.run([*cmd, *args], cwd=REPO, capture_output=True, text=True, timeout=timeout)


# ---- a run in its own process, stopped by a signal inside a known step -------------------------

# Wraps the trainer's optimizer step: with SIGNAL_MARKER set, after the first update it drops the
# marker file and sleeps, so the test's signal lands inside that step.
SIGNAL_DRIVER = """
import os, sys, time
sys.path.insert(0, {repo!r})
from training import loop
import train_ultimate

real_step, marker, updates = loop.optimizer_step, os.environ.get("SIGNAL_MARKER"), [0]

def step(*args, **kwargs):
    real_step(*args, **kwargs)
    updates[0] += 1
    if marker and updates[0] == 1:
        open(marker, "w").close()
        time.sleep(float(os.environ.get("SIGNAL_SLEEP", "4")))  # the test signals the group now

loop.optimizer_step = step
if __name__ == "__main__":  # each metric worker imports this file too, as __mp_main__
    sys.exit(train_ultimate.main(sys.argv[1:]))
"""


def finish(proc, timeout=240):
    out, err = proc.communicate(timeout=timeout)
    return proc.returncode, out + err


def wait_for(path, proc, timeout=120):
    t0 = time.time()
    while not os.path.exists(path):
        assert proc.poll() is None, finish(proc)[1]
        assert time.time() - t0 < timeout, "the run never reached its first optimizer update"
        time.sleep(0.05)


# ---- commands as users type them ---------------------------------------------------------------

def parse_commands(text):
    """Shell commands in ``text`` as argv lists: comments and blank lines skipped, ``\\`` lines joined."""
    commands, current = [], ""
    for raw in text.splitlines():
        line = raw.strip()
        if not line or line.startswith("#"):
            continue
        current += " " + line.rstrip("\\").strip()
        if not line.endswith("\\"):
            commands.append(shlex.split(current))
            current = ""
    return commands


def make_cod10k(root, demo):
    """A COD10K-v3 folder (CAM and NonCAM names) built from generated images."""
    names = sorted(os.listdir(os.path.join(demo, "TrainDataset", "Imgs")))
    for split, subset in (("Train", names[:12]), ("Test", names[12:16])):
        os.makedirs(os.path.join(root, split, "Image"))
        os.makedirs(os.path.join(root, split, "GT_Object"))
        for i, name in enumerate(subset):
            stem = os.path.splitext(name)[0]
            kind = "NonCAM" if i == 0 else "CAM"
            new = f"COD10K-{kind}-1-Aquatic-1-Fish-{split}{i}"
            img = cv2.imread(os.path.join(demo, "TrainDataset", "Imgs", name))
            gt = cv2.imread(os.path.join(demo, "TrainDataset", "GT", stem + ".png"), cv2.IMREAD_GRAYSCALE)
            cv2.imwrite(os.path.join(root, split, "Image", new + ".jpg"), img)
            cv2.imwrite(os.path.join(root, split, "GT_Object", new + ".png"), gt)
    return root
