#!/usr/bin/env python
"""Images per second of the training input pipeline, with and without --cache, for a few worker counts.

    python bench/data.py [--dataset-path ../shared/data/kvasir_seg] [--generated 64] [--workers 1 2 4]
        [--img-size 384] [--batch-size 16] [--batches 20] [--model-img-per-s 112.5] [--json]

The pipeline is the one ``training/build.py`` ``make_loader`` builds for training: ``SegDataset``
with train's default augmentation (``--aug moderate``) and ``build_loader``'s seeded DataLoader and
collate, reading the files or, with the cache, the arrays of ``data/cache.py`` (train's ``--cache``).
One difference: batches come from one pass of a sampler of ``(1 + --batches) x --batch-size``
shuffled indices (reshuffled passes over the data when it has fewer images), so the workers start
once, as in an epoch of a real dataset, and not once per pass over a small one.

Data: the training images of ``--dataset-path`` (default: ``../shared/data/kvasir_seg`` beside the
repository, when it exists; ``none`` leaves it out), and ``--generated N`` COD10K-sized samples
(1024x768 JPEG at quality 90, about 330 KB, with a PNG mask) written once to a temporary folder
(0 leaves them out). Each is timed without and with the cache, for every ``--workers`` count (as
given: train caps ``--num-workers`` at the CPU count, this bench does not). The cache is built in a
temporary folder before its rows, on ``max(--workers)`` threads up to the CPU count (as train builds
it on ``--num-workers``), and its build time is reported apart from the img/s.

Timing: the first batch (worker start-up included) is not timed; the next ``--batches`` are, and
img/s is their images over their wall time. CPU ms/img is the CPU time of the whole pass (this
process and its workers, warm-up included) per image: on a machine shared with other jobs it moves
less than img/s, and img/s cannot exceed about (free cores x 1000 / CPU ms/img). A row's bottleneck is "loader" when its img/s is under
twice ``--model-img-per-s`` (the rate the GPU would consume), else "model". With ``--json`` exactly
one JSON object is printed on stdout and nothing else.
"""

from __future__ import annotations

import argparse
import os
import platform
import resource
import shutil
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from bench.common import emit  # noqa: E402

import cv2  # noqa: E402
import numpy as np  # noqa: E402
import torch  # noqa: E402
from torch.utils.data import RandomSampler  # noqa: E402

import data as cod_data  # noqa: E402  (the repository's data/, not this file: ROOT comes first)
from data.cache import cache_bytes  # noqa: E402
from training.config import Config  # noqa: E402

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
KVASIR = os.path.join(ROOT, "..", "shared", "data", "kvasir_seg")
# An assumption, not a measurement: edgenext_base's stage-2 step rate on a T4-class GPU, taken as
# 1/4 of the 450 img/s target on an H100.
MODEL_IMG_PER_S = 112.5
COD10K_SIZE = (768, 1024)  # H, W of a typical COD10K image


def generate_cod10k_like(folder: str, n: int, seed: int = 0) -> list:
    """``n`` samples of COD10K's size in ``folder``: a smooth colour field with mid-frequency texture
    and pixel noise (JPEG quality 90, about 330 KB), and an elliptic object mask (PNG 0/255)."""
    rng = np.random.default_rng(seed)
    h, w = COD10K_SIZE
    os.makedirs(folder, exist_ok=True)
    samples = []
    for i in range(n):
        base = cv2.resize(rng.uniform(40, 215, (6, 8, 3)).astype(np.float32), (w, h), interpolation=cv2.INTER_CUBIC)
        mid = cv2.resize(rng.normal(0, 28, (h // 8, w // 8, 3)).astype(np.float32), (w, h),
                         interpolation=cv2.INTER_LINEAR)
        image = np.clip(base + mid + rng.normal(0, 12, (h, w, 3)), 0, 255).astype(np.uint8)
        mask = np.zeros((h, w), np.uint8)
        centre = (int(rng.uniform(0.3, 0.7) * w), int(rng.uniform(0.3, 0.7) * h))
        axes = (int(rng.uniform(0.1, 0.25) * w), int(rng.uniform(0.1, 0.25) * h))
        cv2.ellipse(mask, centre, axes, float(rng.uniform(0, 180)), 0, 360, 255, -1)
        stem = os.path.join(folder, f"gen-{i:04d}")
        assert cv2.imwrite(stem + ".jpg", image, [cv2.IMWRITE_JPEG_QUALITY, 90])
        assert cv2.imwrite(stem + ".png", mask)
        samples.append(cod_data.Sample(stem + ".jpg", stem + ".png", os.path.basename(stem)))
    return samples


def cpu_seconds() -> float:
    """CPU time of this process and of its children that have exited (DataLoader workers, once joined)."""
    me, children = resource.getrusage(resource.RUSAGE_SELF), resource.getrusage(resource.RUSAGE_CHILDREN)
    return me.ru_utime + me.ru_stime + children.ru_utime + children.ru_stime


def time_loader(dataset, args, workers: int) -> dict:
    """img/s over ``--batches`` batches after one warm-up batch, from one loader pass; and the CPU time
    per image of the whole pass (warm-up and worker start included), which other jobs disturb less."""
    count = (1 + args.batches) * args.batch_size
    sampler = RandomSampler(dataset, num_samples=count, generator=torch.Generator().manual_seed(args.seed))
    loader = cod_data.build_loader(dataset, batch_size=args.batch_size, shuffle=True, num_workers=workers,
                                   seed=args.seed, sampler=sampler)
    cpu = cpu_seconds()
    batches = iter(loader)
    first = len(next(batches)["image"])  # warm-up: the workers start and fill their queues
    start = time.perf_counter()
    images = sum(len(batch["image"]) for batch in batches)  # the last one stops and joins the workers
    seconds = time.perf_counter() - start
    cpu = cpu_seconds() - cpu
    return {"img_per_s": images / seconds, "images_timed": images, "seconds": seconds,
            "ms_per_batch": 1000 * seconds * args.batch_size / images,
            "cpu_ms_per_img": 1000 * cpu / (first + images)}


def bench_dataset(name: str, samples: list, args, cache_root: str) -> tuple[dict, list]:
    """Rows without and with the cache for every worker count, and the cache build."""
    aug = cod_data.aug_preset(Config().aug)
    rows = []
    threads = min(max(args.workers), os.cpu_count() or 1)
    start = time.perf_counter()
    cache = cod_data.build_cache(samples, args.img_size, cache_root, threads)
    build = {"seconds": time.perf_counter() - start, "threads": threads,
             "mib": cache_bytes(len(samples), args.img_size) / 2**20}
    for cached in (False, True):
        ds = cod_data.SegDataset(samples, args.img_size, train=True, aug=aug, cache=cache if cached else None)
        for workers in args.workers:
            row = {"dataset": name, "cache": cached, "workers": workers, **time_loader(ds, args, workers)}
            row["bottleneck"] = "loader" if row["img_per_s"] < 2 * args.model_img_per_s else "model"
            rows.append(row)
            print(f"{name} cache {'on' if cached else 'off'} workers {workers}: {row['img_per_s']:.1f} img/s",
                  file=sys.stderr)
    return build, rows


def source_size(samples: list) -> list:
    """Median [H, W] of the first 50 images."""
    sizes = [cod_data.load_image(s.image).shape[:2] for s in samples[:50]]
    return [int(np.median([s[0] for s in sizes])), int(np.median([s[1] for s in sizes]))]


def run(args) -> dict:
    work = tempfile.mkdtemp(prefix="bench-data-")
    try:
        sets = {}
        if args.dataset_path:
            index = cod_data.find_dataset(args.dataset_path, seed=args.seed)
            sets[os.path.basename(os.path.normpath(index.root))] = index.train
        if args.generated:
            sets[f"generated {COD10K_SIZE[1]}x{COD10K_SIZE[0]}"] = generate_cod10k_like(
                os.path.join(work, "generated"), args.generated, args.seed)
        datasets, rows = [], []
        for name, samples in sets.items():
            build, dataset_rows = bench_dataset(name, samples, args, os.path.join(work, "cache"))
            datasets.append({"name": name, "images": len(samples), "source_size": source_size(samples),
                             "cache_build": build})
            rows += dataset_rows
    finally:
        shutil.rmtree(work, ignore_errors=True)
    settings = {k: v for k, v in vars(args).items() if k != "json"}
    settings.update(aug=Config().aug, torch=torch.__version__, opencv=cv2.__version__,
                    cpu_count=os.cpu_count(), machine=platform.processor() or platform.machine(),
                    load_avg_end=os.getloadavg()[0])
    return {"datasets": datasets, "rows": rows, "settings": settings}


def print_table(result: dict) -> None:
    s = result["settings"]
    print(f"{s['img_size']} px | batch {s['batch_size']} | --aug {s['aug']} | {s['batches']} timed batches after "
          f"1 warm-up | {s['cpu_count']} CPUs ({s['machine']}) | load average at the end {s['load_avg_end']:.2f}")
    for d in result["datasets"]:
        b = d["cache_build"]
        threads = f"{b['threads']} thread{'s' if b['threads'] != 1 else ''}"
        print(f"- {d['name']}: {d['images']} images, median {d['source_size'][0]}x{d['source_size'][1]} px; "
              f"cache built in {b['seconds']:.1f} s on {threads}, {b['mib']:.1f} MiB")
    print(f"\n| dataset | cache | workers | img/s | ms/batch | CPU ms/img | bottleneck (model "
          f"{s['model_img_per_s']:g} img/s) |")
    print("| --- | --- | ---: | ---: | ---: | ---: | --- |")
    for r in result["rows"]:
        print(f"| {r['dataset']} | {'on' if r['cache'] else 'off'} | {r['workers']} | {r['img_per_s']:.1f} | "
              f"{r['ms_per_batch']:.0f} | {r['cpu_ms_per_img']:.1f} | {r['bottleneck']} |")


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--dataset-path", default=KVASIR if os.path.isdir(KVASIR) else None,
                   help="a dataset whose training images are timed (default: ../shared/data/kvasir_seg beside "
                        "the repository, when it exists); none = leave out")
    p.add_argument("--generated", type=int, default=64,
                   help="also time N generated 1024x768 JPEG + PNG samples (0 = leave out)")
    p.add_argument("--workers", type=int, nargs="+", default=[1, 2, 4], help="DataLoader workers, one row each")
    p.add_argument("--img-size", type=int, default=384)
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--batches", type=int, default=20, help="timed batches per row, after one warm-up batch")
    p.add_argument("--model-img-per-s", type=float, default=MODEL_IMG_PER_S,
                   help="the rate the model consumes images; the loader is the bottleneck under twice this. "
                        "Default 112.5: the assumed stage-2 step rate of edgenext_base on a T4-class GPU, 1/4 "
                        "of the 450 img/s H100 target (an assumption, not a measurement)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--json", action="store_true", help="print one JSON object on stdout, nothing else")
    args = p.parse_args(argv)
    if str(args.dataset_path).lower() in ("none", ""):
        args.dataset_path = None
    if args.batches < 1 or args.batch_size < 1 or args.generated < 0 or min(args.workers) < 0:
        p.error("--batches and --batch-size must be >= 1, --generated and --workers >= 0")
    if not args.dataset_path and not args.generated:
        p.error("nothing to time: give --dataset-path or --generated N")
    return args


def main(argv=None) -> None:
    emit(parse_args(argv), run, print_table)


if __name__ == "__main__":
    main()
