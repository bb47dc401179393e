"""The ablation study: which parts of the model and recipe help, measured on real data.

    python bench/ablate.py --data ../shared/data/kvasir_seg --out runs/ablate --seeds 1 2 --jobs 2
    python bench/ablate.py --out runs/ablate --table-only          # the table of what has finished
    python bench/ablate.py --list                                   # the grid, one line per config

Every config trains from scratch (``--no-pretrained``) with the same recipe (``RECIPE``: backbone,
size, epochs, batch, LR plan) and differs from ``defaults`` (the tool's own defaults for the model,
loss and augmentation) in one thing only. Each run is ``train`` into ``OUT/<config>/seed<k>/`` and
``evaluate`` of its ``best_model.pth`` on every test set of ``--data`` (Kvasir-val for Kvasir-SEG).
A run whose ``result.json`` exists is not run again, and one whose training finished
(``train_seconds.txt``) is only evaluated, so an interrupted study continues where it stopped.
Runs trained with ``--ema`` are evaluated with their EMA weights (``--use-ema``), the weights their
validation chose the best epoch with. The study ends with ``table.md`` / ``results.json`` (mean and
spread over seeds; a difference to ``defaults`` smaller than the larger of the two spreads is "no
measured effect") and ``compare`` over every run.

The two ``plateau-*`` configs use their own cheap recipe (``PLATEAU_RECIPE``, 128 px, 30 batches an
epoch, 14 epochs): a run that flattens out, trained with and without the plateau breaker.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
METRICS = ("sm", "wfm", "em_mean", "mae", "iou", "dice")
LOWER_IS_BETTER = {"mae"}
HEADS = {"sm": "Sm", "wfm": "wFm", "em_mean": "mE", "mae": "MAE", "iou": "IoU", "dice": "Dice"}

# The recipe every main-grid run shares: the documented Kvasir run of docs/evaluation.md.
RECIPE = ["--no-pretrained", "--batch-size", "8", "--stage1-epochs", "2", "--lr", "1e-3",
          "--scheduler", "cosine", "--warmup-epochs", "1", "--no-progress"]
PLATEAU_RECIPE = ["--no-pretrained", "--batch-size", "8", "--stage1-epochs", "2", "--lr", "1e-3",
                  "--scheduler", "cosine", "--warmup-epochs", "1", "--no-progress", "--limit-batches", "30"]
PLATEAU_BREAKER = ["--plateau-patience", "2", "--plateau-min-delta", "0.005", "--plateau-max-restarts", "2"]

# name -> (flags on top of the recipe, what the row tests). 'defaults' adds nothing.
CONFIGS = {
    "defaults": ([], "the tool's defaults: 4 experts top-2, no deep supervision, Dice weight 1, "
                     "--aug moderate, no EMA, drop-path 0"),
    "moe-off": (["--num-experts", "1"], "no mixture of experts (one decoder block per level)"),
    "moe-7": (["--num-experts", "7"], "7 experts, top-2"),
    "ds-on": (["--deep-supervision"], "deep supervision on"),
    "dice-0.5": (["--dice-weight", "0.5"], "Dice weight 0.5"),
    "dice-2": (["--dice-weight", "2"], "Dice weight 2"),
    "aug-none": (["--aug", "none"], "no augmentation"),
    "aug-light": (["--aug", "light"], "--aug light"),
    "aug-strong": (["--aug", "strong"], "--aug strong"),
    "ema-on": (["--ema"], "EMA of the weights (decay 0.999), validated and evaluated with it"),
    "drop-path-0.1": (["--drop-path", "0.1"], "backbone stochastic depth 0.1"),
    "cosine-restart": (["--scheduler", "cosine_restart"], "cosine with warm restarts, same epochs"),
    "plateau-off": ([], "plateau recipe (128 px, 30 batches/epoch, 14 epochs), no breaker"),
    "plateau-on": (PLATEAU_BREAKER, "plateau recipe with --plateau-patience 2 --plateau-min-delta 0.005"),
}
PLATEAU = ("plateau-off", "plateau-on")


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data", default=os.path.join(ROOT, "..", "shared", "data", "kvasir_seg"),
                   help="dataset root with a training set and test sets (default: ../shared/data/kvasir_seg)")
    p.add_argument("--out", default=os.path.join(ROOT, "runs", "ablate"), help="study folder")
    p.add_argument("--configs", default="all", help="comma-separated names (see --list), or 'all'")
    p.add_argument("--seeds", type=int, nargs="+", default=[1, 2])
    p.add_argument("--backbone", default="edgenext_xx_small")
    p.add_argument("--img-size", type=int, default=256)
    p.add_argument("--epochs", type=int, default=10)
    p.add_argument("--plateau-epochs", type=int, default=14)
    p.add_argument("--plateau-img-size", type=int, default=128)
    p.add_argument("--device", default="cpu")
    p.add_argument("--jobs", type=int, default=1, help="runs at once; each gets cpu_count/jobs threads")
    p.add_argument("--num-workers", type=int, default=1, help="DataLoader workers per run")
    p.add_argument("--extra", default="", help="flags added to every train command, e.g. '--limit-batches 2'")
    p.add_argument("--list", action="store_true", help="print the grid and exit")
    p.add_argument("--table-only", action="store_true", help="only write the table of finished runs")
    p.add_argument("--no-compare", action="store_true", help="skip the compare plot at the end")
    p.add_argument("--json", action="store_true", help="print the results as one JSON object")
    return p.parse_args(argv)


def selected(a) -> list[str]:
    if a.configs == "all":
        return list(CONFIGS)
    names = [n.strip() for n in a.configs.split(",") if n.strip()]
    unknown = [n for n in names if n not in CONFIGS]
    if unknown:
        sys.exit(f"error: unknown config {', '.join(unknown)}; --list shows the grid")
    return names


def train_command(a, name: str, seed: int, run_dir: str) -> list[str]:
    flags, _ = CONFIGS[name]
    if name in PLATEAU:
        recipe = PLATEAU_RECIPE + ["--img-size", str(a.plateau_img_size), "--epochs", str(a.plateau_epochs)]
    else:
        recipe = RECIPE + ["--img-size", str(a.img_size), "--epochs", str(a.epochs)]
    return [sys.executable, os.path.join(ROOT, "train_ultimate.py"), "train", "--dataset-path", a.data,
            "--backbone", a.backbone, *recipe, *flags, "--seed", str(seed), "--device", a.device,
            "--num-workers", str(a.num_workers), "--checkpoint-dir", run_dir, "--overwrite", *a.extra.split()]


def evaluate_command(a, name: str, run_dir: str) -> list[str]:
    """``evaluate`` of the run's best_model.pth; a run trained with --ema was validated (and its best
    epoch chosen) with the EMA weights, so those are scored."""
    ema = ["--use-ema"] if "--ema" in CONFIGS[name][0] else []
    return [sys.executable, os.path.join(ROOT, "train_ultimate.py"), "evaluate", "--checkpoint",
            os.path.join(run_dir, "best_model.pth"), "--dataset-path", a.data, "--device", a.device,
            "--num-workers", str(a.num_workers), "--no-progress", *ema]


def run_one(a, name: str, seed: int, threads: int) -> dict:
    run_dir = os.path.join(a.out, name, f"seed{seed}")
    result_path = os.path.join(run_dir, "result.json")
    if os.path.exists(result_path):
        with open(result_path) as f:
            return json.load(f)
    os.makedirs(run_dir, exist_ok=True)
    env = dict(os.environ, OMP_NUM_THREADS=str(threads), MKL_NUM_THREADS=str(threads))
    log = os.path.join(run_dir, "study.log")
    train = train_command(a, name, seed, run_dir)
    evaluate = evaluate_command(a, name, run_dir)
    times = {}
    trained = os.path.join(run_dir, "train_seconds.txt")  # written after a training that exited 0
    if os.path.exists(trained):
        with open(trained) as f:
            times["train"] = float(f.read())
    with open(log, "a") as f:
        for what, cmd in (("train", train), ("evaluate", evaluate)):
            if what in times:
                continue
            f.write("$ " + " ".join(cmd) + "\n")
            f.flush()
            t0 = time.time()
            rc = subprocess.run(cmd, stdout=f, stderr=subprocess.STDOUT, env=env, cwd=ROOT).returncode
            times[what] = time.time() - t0
            if rc != 0:
                print(f"{name} seed {seed}: {what} failed (exit {rc}); see {log}", file=sys.stderr)
                return {}
            if what == "train":
                with open(trained, "w") as t:
                    t.write(f"{times['train']:.1f}")
    with open(os.path.join(run_dir, "eval_results.json")) as f:
        report = json.load(f)
    result = {"config": name, "seed": seed, "flags": CONFIGS[name][0], "train_command": train,
              "train_s": round(times["train"], 1), "evaluate_s": round(times["evaluate"], 1),
              "threads": threads, "best_epoch": report["epoch"], "results": report["results"]}
    with open(result_path, "w") as f:
        json.dump(result, f, indent=2)
    print(f"{name} seed {seed}: Dice {first_set(result)['dice']:.4f} in {times['train']:.0f} s",
          file=sys.stderr, flush=True)
    return result


def first_set(result: dict) -> dict:
    return next(iter(result["results"].values()))


def summarise(results: list[dict]) -> dict:
    """config -> {metric: (mean, spread = max - min over seeds)}, plus seeds and mean train seconds."""
    by = {}
    for r in results:
        by.setdefault(r["config"], []).append(r)
    out = {}
    for name, rs in by.items():
        row = {"seeds": sorted(r["seed"] for r in rs),
               "train_s": statistics.mean(r["train_s"] for r in rs),
               "test_set": next(iter(rs[0]["results"]))}
        for m in METRICS:
            vals = [first_set(r)[m] for r in rs]
            row[m] = (statistics.mean(vals), max(vals) - min(vals))
        out[name] = row
    return out


def verdict(row: dict, base: dict, metric: str = "dice") -> str:
    """'gain' / 'loss' when the mean differs from the base's by more than the larger seed spread."""
    (m, s), (bm, bs) = row[metric], base[metric]
    if len(row["seeds"]) < 2 or len(base["seeds"]) < 2:
        return "one seed: no verdict"
    d = (bm - m) if metric in LOWER_IS_BETTER else (m - bm)
    if abs(d) <= max(s, bs):
        return "no measured effect"
    return "gain" if d > 0 else "loss"


def table(summary: dict) -> str:
    head = "| config | seeds | " + " | ".join(HEADS.get(m, m) for m in METRICS) + \
        " | Dice vs base | verdict (Dice) | train s |"
    lines = [head, "| --- | --- | " + " | ".join("---:" for _ in METRICS) + " | ---: | --- | ---: |"]
    for name in CONFIGS:
        if name not in summary:
            continue
        row = summary[name]
        base = summary.get("plateau-off" if name in PLATEAU else "defaults")
        cells = [f"{row[m][0]:.3f} ± {row[m][1] / 2:.3f}" for m in METRICS]
        delta = f"{row['dice'][0] - base['dice'][0]:+.3f}" if base and base is not row else ""
        v = verdict(row, base) if base and base is not row else "(base)"
        lines.append(f"| {name} | {','.join(map(str, row['seeds']))} | " + " | ".join(cells) +
                     f" | {delta} | {v} | {row['train_s']:.0f} |")
    return "\n".join(lines)


def finished(a) -> list[dict]:
    out = []
    for name in CONFIGS:
        d = os.path.join(a.out, name)
        for seed_dir in sorted(os.listdir(d)) if os.path.isdir(d) else []:
            p = os.path.join(d, seed_dir, "result.json")
            if os.path.exists(p):
                with open(p) as f:
                    out.append(json.load(f))
    return out


def main(argv=None) -> None:
    a = parse_args(argv)
    names = selected(a)
    if a.list:
        for n in CONFIGS:
            print(f"{n:15s} {' '.join(CONFIGS[n][0]) or '-':45s} {CONFIGS[n][1]}")
        return
    a.out = os.path.abspath(a.out)
    a.data = os.path.abspath(a.data) if a.data != "demo" else a.data
    if not a.table_only:
        threads = max(1, (os.cpu_count() or 1) // max(1, a.jobs))
        todo = [(n, s) for n in names for s in a.seeds]  # a config's seeds side by side
        with ThreadPoolExecutor(max(1, a.jobs)) as pool:
            list(pool.map(lambda ns: run_one(a, ns[0], ns[1], threads), todo))
    results = finished(a)
    summary = summarise(results)
    os.makedirs(a.out, exist_ok=True)
    text = table(summary)
    with open(os.path.join(a.out, "table.md"), "w") as f:
        f.write(text + "\n\nMean ± half the spread (max - min) over seeds; metrics on "
                + ", ".join(sorted({r["test_set"] for r in summary.values()})) + ".\n")
    with open(os.path.join(a.out, "results.json"), "w") as f:
        json.dump({"summary": summary, "runs": results}, f, indent=2)
    if not a.no_compare and results:
        dirs = [os.path.join(a.out, r["config"], f"seed{r['seed']}") for r in results]
        subprocess.run([sys.executable, os.path.join(ROOT, "train_ultimate.py"), "compare", *dirs,
                        "--out", os.path.join(a.out, "compare.png")], cwd=ROOT,
                       stdout=subprocess.DEVNULL if a.json else None)
    print(json.dumps({"summary": summary}) if a.json else text)


if __name__ == "__main__":
    main()
