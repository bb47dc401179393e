"""bench/train_step.py runs on CPU with small settings and prints one JSON object (no time is asserted)."""

import importlib.util
import json
import math
import os
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SMALL = ["--device", "cpu", "--backbone", "edgenext_xx_small", "--img-size", "64", "--batch-size", "2",
         "--repeats", "3", "--warmup", "1", "--threads", "1", "--json"]


def load_bench(name: str):
    """bench/<name>.py as a module, without putting bench/ on sys.path: there bench/data.py would hide
    the data package from every later import, DDP and worker processes included."""
    spec = importlib.util.spec_from_file_location(f"bench_{name}", os.path.join(ROOT, "bench", f"{name}.py"))
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up there
    spec.loader.exec_module(module)
    return module


ROWS = ["full stage 2", "MoE off", "stage 1", "bare backbone"]


def run_bench(*extra):
    proc = subprocess.run([sys.executable, os.path.join(ROOT, "bench", "train_step.py"), *SMALL, *extra],
                          capture_output=True, text=True, timeout=300, cwd=ROOT)
    assert proc.returncode == 0, proc.stderr[-2000:]
    return json.loads(proc.stdout)  # the whole of stdout is one JSON object


@pytest.mark.e2e
def test_train_step_bench_json_on_cpu():
    out = run_bench("--num-experts", "4", "--moe-top-k", "2", "--deep-supervision")
    assert [r["name"] for r in out["rows"]] == ROWS
    s = out["settings"]
    assert (s["backbone"], s["img_size"], s["batch_size"], s["num_experts"], s["moe_top_k"]) == \
        ("edgenext_xx_small", 64, 2, 4, 2)
    assert s["deep_supervision"] is True and s["precision"] == "fp32" and s["peak_tflops"] is None
    rows = {r["name"]: r for r in out["rows"]}
    for r in out["rows"]:
        assert r["ms_min"] <= r["ms_per_step"] <= r["ms_max"] and r["img_per_s"] > 0
        assert r["peak_mem_mb"] is None and r["peak_flops_fraction"] is None  # CPU: n/a
        assert r["train_gflops_per_img"] > 0
    assert math.isclose(out["ratio"], rows["full stage 2"]["ratio_to_bare"]) and out["breakdown"] is None
    assert rows["bare backbone"]["ratio_to_bare"] == 1.0
    # stage 1 trains the decoder and heads only; the bare backbone has no decoder
    assert rows["stage 1"]["trainable_params"] < rows["full stage 2"]["trainable_params"]
    assert rows["bare backbone"]["trainable_params"] < rows["full stage 2"]["trainable_params"]


@pytest.mark.e2e
def test_train_step_bench_switches_run():
    out = run_bench("--num-experts", "3", "--moe-top-k", "1", "--grad-checkpointing", "--channels-last",
                    "--precision", "bf16", "--optimizer", "foreach", "--repeats", "1", "--breakdown", "--dense-row")
    assert out["settings"]["grad_checkpointing"] and out["settings"]["channels_last"]
    assert [r["name"] for r in out["rows"]] == ROWS[:3] + ["full stage 2, dense MoE"] + ROWS[3:]
    assert len(out["breakdown"]) == 7 and all(v > 0 for v in out["breakdown"].values())
    assert all(math.isfinite(r["ms_per_step"]) for r in out["rows"])


def test_breakdown_step_updates_the_model_as_the_plain_step(monkeypatch):
    """The part-by-part step (--breakdown) cuts the graph at the features and the outputs; the
    parameters after one step must match those after the plain step."""
    import contextlib

    import torch

    train_step = load_bench("train_step")

    args = train_step.parse_args(["--device", "cpu", "--backbone", "edgenext_xx_small", "--img-size", "64",
                                  "--batch-size", "3", "--num-experts", "4", "--deep-supervision"])
    monkeypatch.setattr(train_step, "forward_gflops", lambda *a, **k: 1.0)  # not needed here
    a, b = train_step.build_variants(args, torch.device("cpu"))[0], \
        train_step.build_variants(args, torch.device("cpu"))[0]
    x, mask = torch.randn(3, 3, 64, 64), (torch.rand(3, 1, 64, 64) > 0.5).float()
    train_step.make_step(a, x, mask, contextlib.nullcontext, None, 1.0)()
    parts = train_step.breakdown(b, x, mask, contextlib.nullcontext, None, 1.0, lambda: None, 1)
    assert list(parts) == list(train_step.PHASES)
    for (name, p), q in zip(a.module.named_parameters(), b.module.parameters()):
        assert torch.allclose(p, q, atol=1e-6), name


def test_ablate_verdict_uses_the_seed_spread():
    ablate = load_bench("ablate")

    def run(config, seed, dice, mae=0.1):
        metrics = {m: 0.5 for m in ablate.METRICS}
        metrics.update(dice=dice, mae=mae)
        return {"config": config, "seed": seed, "train_s": 10.0, "results": {"Kvasir-val": metrics}}

    summary = ablate.summarise([run("defaults", 1, 0.60), run("defaults", 2, 0.62),
                                run("dice-2", 1, 0.66), run("dice-2", 2, 0.65),
                                run("moe-off", 1, 0.58), run("moe-off", 2, 0.63),
                                run("ds-on", 1, 0.50), run("ds-on", 2, 0.54),
                                run("ema-on", 1, 0.70)])
    assert math.isclose(summary["defaults"]["dice"][0], 0.61) and math.isclose(summary["defaults"]["dice"][1], 0.02)
    base = summary["defaults"]
    assert ablate.verdict(summary["dice-2"], base) == "gain"  # +0.045 > spread 0.02
    assert ablate.verdict(summary["moe-off"], base) == "no measured effect"  # its own spread 0.05
    assert ablate.verdict(summary["ds-on"], base) == "loss"
    assert ablate.verdict(summary["ema-on"], base) == "one seed: no verdict"
    args = ablate.parse_args(["--data", "demo"])
    assert "--use-ema" in ablate.evaluate_command(args, "ema-on", "r")
    assert "--use-ema" not in ablate.evaluate_command(args, "defaults", "r")
    text = ablate.table(summary)
    assert "| dice-2 | 1,2 |" in text and "+0.045" in text and "(base)" in text


@pytest.mark.e2e
def test_ablate_runs_a_tiny_grid_and_resumes(tmp_path):
    out = tmp_path / "study"
    cmd = [sys.executable, os.path.join(ROOT, "bench", "ablate.py"), "--data", "demo", "--out", str(out),
           "--configs", "defaults,moe-off", "--seeds", "1", "--img-size", "64", "--epochs", "3",
           "--num-workers", "0", "--extra", "--limit-batches 1 --no-curves", "--no-compare", "--json"]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=300, cwd=ROOT)
    assert proc.returncode == 0, proc.stderr[-2000:]
    summary = json.loads(proc.stdout)["summary"]
    assert set(summary) == {"defaults", "moe-off"} and summary["moe-off"]["seeds"] == [1]
    result = json.loads((out / "moe-off" / "seed1" / "result.json").read_text())
    assert "--num-experts" in result["train_command"] and result["best_epoch"] >= 1
    assert 0.0 <= summary["defaults"]["dice"][0] <= 1.0 and (out / "table.md").exists()
    # a second call finds the results and trains nothing
    before = (out / "defaults" / "seed1" / "best_model.pth").stat().st_mtime
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=120, cwd=ROOT)
    assert proc.returncode == 0 and json.loads(proc.stdout)["summary"] == summary
    assert (out / "defaults" / "seed1" / "best_model.pth").stat().st_mtime == before

@pytest.mark.e2e
def test_evaluate_bench_json_on_cpu():
    """bench/evaluate.py: one row per data set and --metric-workers value (no time is asserted)."""
    proc = subprocess.run([sys.executable, os.path.join(ROOT, "bench", "evaluate.py"), "--device", "cpu",
                           "--backbone", "edgenext_xx_small", "--img-size", "64", "--generated", "4", "--limit", "4",
                           "--metric-workers", "0", "2", "--num-workers", "0", "--batch-size", "3", "--json"],
                          capture_output=True, text=True, timeout=300, cwd=ROOT)
    assert proc.returncode == 0, proc.stderr[-2000:]
    out = json.loads(proc.stdout)  # the whole of stdout is one JSON object
    sets = ["Kvasir-val", "generated 4"] if os.path.isdir(os.path.join(ROOT, "..", "shared", "data", "kvasir_seg")) \
        else ["generated 4"]
    assert [(r["metric_workers"], r["dataset"]) for r in out["rows"]] == [(w, s) for w in (0, 2) for s in sets]
    for r in out["rows"]:
        assert r["images"] == 4 and 0 < r["epoch_fraction"] < 1
        assert all(r[f"{k}_img_per_s"] > 0 and r[f"{k}_s"] > 0 and r[f"{k}_main_cpu_ms_per_img"] >= 0
                   for k in ("validate", "evaluate", "scoring"))
    s = out["settings"]
    assert (s["backbone"], s["img_size"], s["metric_workers"], s["train_img_per_s"]) == \
        ("edgenext_xx_small", 64, [0, 2], 112.5)
