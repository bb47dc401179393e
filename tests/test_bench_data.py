"""bench/data.py runs on CPU with small settings and prints one JSON object (no time is asserted)."""

import json
import os
import subprocess
import sys

import pytest

pytestmark = pytest.mark.e2e  # bench/data.py in a fresh interpreter

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_data_bench_json_on_cpu(demo):
    proc = subprocess.run([sys.executable, os.path.join(ROOT, "bench", "data.py"), "--dataset-path",
                           demo(n_train=6, n_test=1, size=64, seed=0),
                           "--generated", "4", "--img-size", "64", "--batch-size", "4", "--batches", "2",
                           "--workers", "0", "1", "--json"],
                          capture_output=True, text=True, timeout=300, cwd=ROOT)
    assert proc.returncode == 0, proc.stderr[-2000:]
    out = json.loads(proc.stdout)  # the whole of stdout is one JSON object
    assert [(d["name"], d["images"]) for d in out["datasets"]] == [("demo", 6), ("generated 1024x768", 4)]
    assert out["datasets"][1]["source_size"] == [768, 1024]
    assert all(d["cache_build"]["seconds"] > 0 and d["cache_build"]["mib"] > 0 for d in out["datasets"])
    assert [(r["dataset"], r["cache"], r["workers"]) for r in out["rows"]] == [
        (name, cache, workers) for name in ("demo", "generated 1024x768") for cache in (False, True)
        for workers in (0, 1)]
    for r in out["rows"]:
        assert r["img_per_s"] > 0 and r["images_timed"] == 8 and r["bottleneck"] in ("loader", "model")
        assert r["cpu_ms_per_img"] > 0
    s = out["settings"]
    assert (s["img_size"], s["batch_size"], s["batches"], s["model_img_per_s"], s["aug"]) == (64, 4, 2, 112.5,
                                                                                               "moderate")


def test_data_bench_help():
    proc = subprocess.run([sys.executable, os.path.join(ROOT, "bench", "data.py"), "--help"],
                          capture_output=True, text=True, timeout=120, cwd=ROOT)
    assert proc.returncode == 0 and "--model-img-per-s" in proc.stdout and "T4" in proc.stdout
