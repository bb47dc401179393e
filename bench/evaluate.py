#!/usr/bin/env python
"""Images per second of validation and of ``evaluate``, scoring in 0, 1, 2, 4 metric worker processes.

    python bench/evaluate.py [--dataset-path ../shared/data/kvasir_seg] [--generated 32] [--limit N]
        [--backbone edgenext_small] [--img-size 384] [--batch-size 8] [--num-workers 2]
        [--metric-workers 0 1 2 4] [--device cuda] [--amp auto] [--train-img-per-s 112.5] [--json]

Per data set and ``--metric-workers`` value, three timings of one pass over the images:

    validate   ``training.loop.validate`` as training runs it: the validation loader at --img-size,
               forward under the training precision (--amp), the loss, and the metrics at each
               mask's own resolution (``SegMetrics``: PySODMetrics, IoU, Dice)
    evaluate   ``evaluation.evaluate.evaluate_samples`` as ``evaluate`` runs it: its loader, fp32
               inference, the metrics at each mask's own resolution
    scoring    the scorer alone (``MetricPool.scorer``) on fixed random probability maps at
               --img-size: the part the metric workers take off the main process

Each gives img/s (wall clock) and the main process's CPU time per image (``time.process_time``:
with workers, the scoring leaves it; the workers' own CPU time is not counted).

The model is ``build_model(--backbone, pretrained=False)`` with the default heads. The data sets:
the test sets under --dataset-path (Kvasir-SEG's ``TestDataset/Kvasir-val`` by default, when the
folder exists), and --generated images written once to a temp folder: COD10K-sized JPEG images with
PNG masks of the same size, between 1000x750 and 1024x768. Each measured pass comes after one
untimed pass with the same workers (started beforehand: started once per run in training), so it is
the steady state of an epoch's validation.

``epoch %`` estimates the share of a COD10K epoch spent in validation at the measured validation
rate: 3,000 training images with 10% held out (2,700 trained on, 300 validated) and an ASSUMED
training rate of --train-img-per-s (see its help). With ``--json`` exactly one JSON object is
printed on stdout and nothing else.
"""

from __future__ import annotations

import argparse
import os
import platform
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from bench.common import emit  # noqa: E402

import cv2  # noqa: E402
import numpy as np  # noqa: E402
import torch  # noqa: E402

import data as cod_data  # noqa: E402
from evaluation.evaluate import EvalOptions, evaluate_samples  # noqa: E402
from evaluation.pool import MetricPool  # noqa: E402
from losses import build_loss  # noqa: E402
from models import build_model  # noqa: E402
from training.config import Config  # noqa: E402
from training.loop import validate  # noqa: E402
from core.runtime import AMP_MODES, Runtime  # noqa: E402
from training.build import make_loader  # noqa: E402

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
KVASIR = os.path.join(ROOT, "..", "shared", "data", "kvasir_seg")
COD10K_TRAIN, HELD_OUT = 3000, 0.1
# ASSUMED, not measured: a stage-2 step rate of edgenext_base on a T4-class GPU, 1/4 of the 450 img/s
# targeted on an H100.
ASSUMED_TRAIN_IMG_PER_S = 112.5


def write_generated(folder: str, n: int, seed: int = 0) -> list:
    """``n`` COD10K-sized pairs (JPEG image, PNG 0/255 mask of the same size, between 1000x750 and
    1024x768): a blurred-noise texture and a blob of it, the mask roughly a tenth of the image."""
    rng = np.random.default_rng(seed)
    samples = []
    for i in range(n):
        w, h = int(rng.integers(1000, 1025)), int(rng.integers(750, 769))
        image = cv2.GaussianBlur(rng.integers(0, 256, (h, w, 3), dtype=np.uint8), (0, 0), 4)
        mask = np.zeros((h, w), np.uint8)
        cv2.ellipse(mask, (int(rng.integers(w // 4, 3 * w // 4)), int(rng.integers(h // 4, 3 * h // 4))),
                    (int(rng.integers(w // 10, w // 5)), int(rng.integers(h // 10, h // 5))),
                    float(rng.integers(0, 180)), 0, 360, 255, -1)
        name = f"gen{i:04d}"
        image_path, mask_path = os.path.join(folder, f"{name}.jpg"), os.path.join(folder, f"{name}.png")
        cv2.imwrite(image_path, image, [cv2.IMWRITE_JPEG_QUALITY, 90])
        cv2.imwrite(mask_path, mask)
        samples.append(cod_data.Sample(image_path, mask_path, name))
    return samples


def datasets(args, tmp: str) -> dict:
    """{name: samples}: each test set under --dataset-path, then the generated COD10K-sized set."""
    sets = {}
    if args.dataset_path:
        index = cod_data.find_dataset(args.dataset_path, require_train=False, seed=args.seed)
        sets.update(index.tests)
    if args.generated:
        sets[f"generated {args.generated}"] = write_generated(tmp, args.generated, args.seed)
    return {name: samples[:args.limit] if args.limit else samples for name, samples in sets.items()}


def timed(fn) -> tuple[float, float]:
    """Wall seconds and the main process's CPU seconds of ``fn()`` after one untimed call (CUDA
    synchronised before and after)."""
    sync = torch.cuda.synchronize if torch.cuda.is_available() else (lambda: None)
    fn()
    sync()
    t0, c0 = time.perf_counter(), time.process_time()
    fn()
    sync()
    return time.perf_counter() - t0, time.process_time() - c0


def measure(args, model, loss_fn, samples, pool: MetricPool, workers: int) -> dict:
    """img/s of validate, evaluate and the scorer alone over ``samples`` with ``pool``'s workers."""
    cfg = Config(dataset_path="bench", img_size=args.img_size, batch_size=args.batch_size,
                 num_workers=args.num_workers, metric_workers=workers, device=args.device, amp=args.amp,
                 progress=False, seed=args.seed)
    rt = Runtime(args.device, args.amp)
    loader = make_loader(cfg, rt, samples, args.batch_size, train=False)
    opts = EvalOptions(checkpoint="", batch_size=args.batch_size, num_workers=args.num_workers,
                       device=args.device, progress=False, metric_workers=workers)
    eval_cfg = {"img_size": args.img_size, "threshold": cfg.threshold}
    probs = torch.rand(len(samples), 1, args.img_size, args.img_size, generator=torch.Generator().manual_seed(0))
    masks = [s.mask for s in samples]

    def score():
        scorer = pool.scorer(cfg.threshold)
        for k in range(0, len(samples), args.batch_size):
            scorer.add(probs[k:k + args.batch_size], masks[k:k + args.batch_size])
        return scorer.results()

    seconds = {
        "validate": timed(lambda: validate(cfg, rt, model, loss_fn, loader, scorer=pool.scorer(cfg.threshold))),
        "evaluate": timed(lambda: evaluate_samples(model, samples, opts, eval_cfg, rt.device, None, "bench", pool)),
        "scoring": timed(score),
    }
    row = {"images": len(samples), "metric_workers": workers}
    for name, (wall, cpu) in seconds.items():
        row[f"{name}_s"] = wall
        row[f"{name}_img_per_s"] = len(samples) / wall
        row[f"{name}_main_cpu_ms_per_img"] = 1000 * cpu / len(samples)
    row["epoch_fraction"] = epoch_fraction(row["validate_img_per_s"], args.train_img_per_s)
    return row


def epoch_fraction(val_img_per_s: float, train_img_per_s: float) -> float:
    """Share of a COD10K epoch (2,700 trained, 300 validated) spent validating."""
    val = round(COD10K_TRAIN * HELD_OUT)
    train_s, val_s = (COD10K_TRAIN - val) / train_img_per_s, val / val_img_per_s
    return val_s / (train_s + val_s)


def run(args) -> dict:
    device = torch.device(args.device)
    torch.manual_seed(args.seed)
    model = build_model(backbone=args.backbone, pretrained=False, img_size=args.img_size).to(device).eval()
    loss_fn = build_loss()
    rows = []
    with tempfile.TemporaryDirectory(prefix="bench-evaluate-") as tmp:
        sets = datasets(args, tmp)
        if not sets:
            raise SystemExit("nothing to measure: no --dataset-path test set and --generated 0")
        for workers in args.metric_workers:
            with MetricPool(workers) as pool:
                pool.start()  # once per run in training: not part of any pass
                for name, samples in sets.items():
                    rows.append({"dataset": name, **measure(args, model, loss_fn, samples, pool, workers)})
    settings = {k: v for k, v in vars(args).items() if k != "json"}
    settings.update(torch=torch.__version__, cpus=os.cpu_count(), load_avg_end=os.getloadavg()[0],
                    device_name=torch.cuda.get_device_name(device) if device.type == "cuda" else
                    (platform.processor() or platform.machine()), threads=torch.get_num_threads(),
                    cod10k_train=COD10K_TRAIN, held_out=HELD_OUT)
    return {"rows": rows, "settings": settings}


def print_table(result: dict) -> None:
    s = result["settings"]
    print(f"{s['backbone']} | {s['img_size']} px | batch {s['batch_size']} | {s['num_workers']} loader workers | "
          f"{s['device']} ({s['device_name']}, {s['cpus']} CPUs, {s['threads']} threads) | amp {s['amp']} | "
          f"load average at the end {s['load_avg_end']:.2f}")
    print("| data | images | metric workers | validate img/s | evaluate img/s | scoring img/s | "
          "main-process CPU ms/img: validate, evaluate, scoring | epoch % |")
    print("| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: |")
    for r in result["rows"]:
        cpu = ", ".join(f"{r[f'{k}_main_cpu_ms_per_img']:.0f}" for k in ("validate", "evaluate", "scoring"))
        print(f"| {r['dataset']} | {r['images']} | {r['metric_workers']} | {r['validate_img_per_s']:.1f} | "
              f"{r['evaluate_img_per_s']:.1f} | {r['scoring_img_per_s']:.1f} | {cpu} | "
              f"{100 * r['epoch_fraction']:.1f} |")
    print(f"epoch %: validation's share of a COD10K epoch ({round(s['cod10k_train'] * (1 - s['held_out']))} "
          f"training images at an ASSUMED {s['train_img_per_s']:g} img/s, "
          f"{round(s['cod10k_train'] * s['held_out'])} validated at the row's validate img/s)")
    by_set = {}
    for r in result["rows"]:
        by_set.setdefault(r["dataset"], []).append(r)
    for name, rs in by_set.items():
        base = next((r for r in rs if r["metric_workers"] == 0), None)
        if base:
            print(f"{name}: validate speed-up over 0 workers: " + ", ".join(
                f"{r['metric_workers']} -> {r['validate_img_per_s'] / base['validate_img_per_s']:.2f}x"
                for r in rs if r is not base))


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--dataset-path", default=KVASIR if os.path.isdir(KVASIR) else None,
                   help="a dataset root whose test sets are measured (default: ../shared/data/kvasir_seg "
                        "when it exists, i.e. TestDataset/Kvasir-val); '' for none")
    p.add_argument("--generated", type=int, default=32,
                   help="COD10K-sized pairs to generate and measure (0 = none)")
    p.add_argument("--limit", type=int, default=None, help="the first N images of each data set")
    p.add_argument("--backbone", default="edgenext_small")
    p.add_argument("--img-size", type=int, default=384)
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--num-workers", type=int, default=2, help="DataLoader workers (0 = main process)")
    p.add_argument("--metric-workers", type=int, nargs="+", default=[0, 1, 2, 4],
                   help="the worker counts to measure (0 = scoring in the main process)")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--amp", choices=AMP_MODES, default="auto", help="validation's precision, as train's --amp "
                   "(evaluate is fp32, as evaluate's default)")
    p.add_argument("--train-img-per-s", type=float, default=ASSUMED_TRAIN_IMG_PER_S,
                   help="training rate for the epoch %% estimate. The default, 112.5, is an ASSUMED stage-2 step "
                        "rate of edgenext_base on a T4-class GPU: 1/4 of the 450 img/s H100 target. An "
                        "assumption, not a measurement")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--json", action="store_true", help="print one JSON object on stdout, nothing else")
    args = p.parse_args(argv)
    if args.generated < 0 or (args.limit is not None and args.limit < 1) or args.train_img_per_s <= 0:
        p.error("--generated must be >= 0, --limit >= 1 and --train-img-per-s > 0")
    if min(args.metric_workers) < 0:
        p.error("--metric-workers must be >= 0")
    return args


def main(argv=None) -> None:
    emit(parse_args(argv), run, print_table)


if __name__ == "__main__":
    main()
