"""``evaluate``: score a checkpoint on every test set of a dataset, and what ``predict`` shares with it.

    model, cfg = load_for_inference("best_model.pth", use_ema=True, device=torch.device("cpu"))
    results = evaluate_checkpoint(EvalOptions(checkpoint="best_model.pth", dataset_path="ROOT"))

Each test image is resized to the model's square size (bilinear) and normalised exactly as in
training, the model's probabilities (optionally averaged with those of the mirrored image, ``tta``
'flip') are scored by ``Scorer`` against the mask at its *own* resolution, as
validation does (``evaluation.scorer.Scorer``, the same code), in ``metric_workers`` processes
beside the model (``evaluation.pool``; 0: in this process). One table, ``eval_results.csv`` and
``eval_results.json`` come out.
"""

from __future__ import annotations

import csv
import logging
import os
from contextlib import nullcontext
from dataclasses import asdict, dataclass, field
from typing import Optional, Sequence

import torch
from torch.utils.data import Dataset
from tqdm.auto import tqdm

import data as cod_data
from core import checkpoint as ckpt
from core.errors import UserError
from core.io import atomic_write, write_json
from core.runtime import AMP_MODES, Runtime
from data.transforms import normalize, resize_pair
from evaluation.metrics import DEFAULT_THRESHOLD, METRIC_KEYS, format_table
from evaluation.pool import MetricPool, default_metric_workers
from evaluation.scorer import Scorer
from models import DEFAULT_IMG_SIZE, ModelSpec, build_model, check_img_size

log = logging.getLogger(__name__)

TTA_MODES = ("none", "flip")
# Config fields that decide the network's shape, and --img-size: what a bare state_dict lacks.
MODEL_FIELDS = ("backbone", "num_experts", "moe_top_k", "decoder_channels", "deep_supervision", "img_size")


@dataclass
class InferenceOptions:
    """What both commands need to load a model and run it. ``overrides`` maps ``MODEL_FIELDS`` names
    to values given on the command line (None = take the checkpoint's)."""
    checkpoint: str
    use_ema: bool = False
    tta: str = "none"
    batch_size: int = 8
    num_workers: int = 2
    device: str = "auto"
    amp: Optional[str] = None
    progress: bool = True
    overrides: dict = field(default_factory=dict)

    def validate(self) -> None:
        if not os.path.isfile(self.checkpoint):
            raise UserError(f"--checkpoint {self.checkpoint}: no such file; pass the best_model.pth or "
                            "last.pth of a run (or a saved state_dict)")
        if self.tta not in TTA_MODES:
            raise UserError(f"--tta {self.tta!r}: choose one of {', '.join(TTA_MODES)}")
        if self.batch_size < 1:
            raise UserError(f"--batch-size must be >= 1 (got {self.batch_size})")
        if self.num_workers < 0:
            raise UserError(f"--num-workers must be >= 0 (got {self.num_workers})")
        if self.amp is not None and self.amp not in AMP_MODES:
            raise UserError(f"--amp {self.amp!r}: choose one of {', '.join(AMP_MODES)}")
        if self.overrides.get("img_size") is not None:
            check_img_size(self.overrides["img_size"])


@dataclass
class EvalOptions(InferenceOptions):
    dataset_path: str = "demo"
    out_dir: Optional[str] = None      # default: the checkpoint's folder
    limit: Optional[int] = None        # first N images of each test set
    include_noncam: bool = False       # COD10K: also score the NonCAM test images (empty masks)
    metric_workers: Optional[int] = None  # scoring processes; None: --num-workers (at most the CPUs - 1)

    def validate(self) -> None:
        super().validate()
        if self.limit is not None and self.limit < 1:
            raise UserError(f"--limit must be >= 1 (got {self.limit})")
        if self.metric_workers is not None and self.metric_workers < 0:
            raise UserError(f"--metric-workers must be >= 0, 0 scores in the main process "
                            f"(got {self.metric_workers})")


# ---------------------------------------------------------------------------------------------
# loading and running a model
# ---------------------------------------------------------------------------------------------

def load_for_inference(checkpoint_path: str, use_ema: bool, device, overrides: Optional[dict] = None):
    """Build the model a checkpoint was trained as and load its weights, in eval mode on ``device``.

    A full checkpoint carries its ``config``; a bare state_dict (or ``{'state_dict': ...}``) needs at
    least ``overrides['backbone']``; whatever neither gives takes train's default.
    ``overrides`` values that are not None replace the checkpoint's. ``use_ema`` loads
    ``obj['ema']['module']`` when the file has it (a warning and the normal weights when not).

    Returns ``(model, cfg)``: ``cfg`` is the checkpoint's config dict with the overrides applied, plus
    ``weights`` ('ema' or 'model') and ``epoch`` (1-based epoch the weights come from, None if unknown).
    """
    overrides = {k: v for k, v in (overrides or {}).items() if v is not None}
    obj = ckpt.load(checkpoint_path)
    saved = obj.get("config") if isinstance(obj.get("config"), dict) else None
    cfg = {**asdict(ModelSpec()), "img_size": DEFAULT_IMG_SIZE, "threshold": DEFAULT_THRESHOLD,
           "seed": cod_data.DEFAULT_SEED}
    if saved is None:
        if "backbone" not in overrides:
            raise UserError(f"{checkpoint_path} holds bare weights without a config: pass --backbone "
                            "(and --num-experts, --moe-top-k, --decoder-channels, --img-size if the run "
                            "did not use the defaults)")
        taken = {k: cfg[k] for k in MODEL_FIELDS if k not in overrides}
        log.info("%s has no config: model flags from the command line, defaults for the rest (%s)",
                 checkpoint_path, ", ".join(f"{k}={v}" for k, v in taken.items()))
    else:
        cfg.update(saved)
        changed = {k: (cfg.get(k), v) for k, v in overrides.items() if cfg.get(k) != v}
        if changed:
            log.info("Overriding the checkpoint's config: %s",
                     ", ".join(f"{k} {old} -> {new}" for k, (old, new) in changed.items()))
    cfg.update(overrides)

    model = build_model(backbone=cfg["backbone"], num_experts=cfg["num_experts"], moe_top_k=cfg["moe_top_k"],
                        deep_supervision=cfg["deep_supervision"], pretrained=False,
                        decoder_channels=cfg["decoder_channels"], img_size=cfg["img_size"])
    ema = obj.get("ema")
    has_ema = isinstance(ema, dict) and isinstance(ema.get("module"), dict)
    if use_ema and not has_ema:
        log.warning("--use-ema: %s holds no EMA weights (trained without --ema?); using the model weights",
                    checkpoint_path)
    if has_ema and not use_ema:
        log.info("%s also holds EMA weights, which the run validated and picked its best with: add "
                 "--use-ema to score those", checkpoint_path)
    cfg["weights"] = "ema" if use_ema and has_ema else "model"
    state = ema["module"] if cfg["weights"] == "ema" else ckpt.model_state_of(obj)
    ckpt.load_model_weights(model, state, checkpoint_path)
    epoch = obj.get("epoch") if saved is not None else None
    cfg["epoch"] = int(epoch) + 1 if isinstance(epoch, int) else None
    log.info("Model: %s (%s weights%s) | %s, %d experts (top-%d), %d px", checkpoint_path, cfg["weights"],
             f", epoch {cfg['epoch']}" if cfg["epoch"] is not None else "", cfg["backbone"], cfg["num_experts"],
             cfg["moe_top_k"], cfg["img_size"])
    return model.to(device).eval(), cfg


def load_model(opts: InferenceOptions):
    """``(model, cfg, device, dtype)`` for ``opts``: the model on its device, and the autocast dtype
    (None = fp32). Reported metrics are computed in fp32 unless ``--amp`` asks otherwise: bf16 moves
    them by up to 6e-4 (S-measure, H100), more than the differences people compare runs by."""
    rt = Runtime(opts.device, opts.amp or "off")  # the device and precision rules train uses
    model, cfg = load_for_inference(opts.checkpoint, opts.use_ema, rt.device, opts.overrides)
    return model, cfg, rt.device, rt.dtype


@torch.no_grad()
def predict_probs(model, images: torch.Tensor, tta: str = "none", dtype=None) -> torch.Tensor:
    """B x 1 x S x S float32 foreground probabilities of a normalised batch. ``tta='flip'`` averages
    them with the probabilities of the horizontally mirrored batch, mirrored back."""
    autocast = torch.autocast(images.device.type, dtype=dtype) if dtype is not None else nullcontext()
    with autocast:
        probs = torch.sigmoid(model(images)["main"].float())
        if tta == "flip":
            probs = (probs + torch.sigmoid(model(images.flip(-1))["main"].float()).flip(-1)) / 2
    return probs


class ImageSet(Dataset):
    """Images prepared as ``SegDataset`` prepares them for validation (``load_image``, bilinear resize to
    ``img_size``, ImageNet normalisation), without masks. An unreadable file comes back as its one-line
    ``error`` (raised by ``build_loader``'s iterator), not as a DataLoader worker traceback."""

    def __init__(self, paths: Sequence[str], img_size: int):
        self.paths = list(paths)
        self.img_size = int(img_size)

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, i: int) -> dict:
        try:
            image = cod_data.load_image(self.paths[i])
        except UserError as e:
            s = self.img_size
            return {"image": torch.zeros(3, s, s), "index": i, "error": str(e), "orig_size": torch.zeros(2).long()}
        h, w = image.shape[:2]
        image, _ = resize_pair(image, None, self.img_size)
        return {"image": torch.from_numpy(normalize(image)), "index": i, "error": "",
                "orig_size": torch.tensor([h, w], dtype=torch.int64)}


def iterate_probs(model, paths: Sequence[str], opts: InferenceOptions, img_size: int, device, dtype, desc: str):
    """Yield ``(index, probability map S x S float32 numpy, (H, W) of the original image)`` per path,
    in order, batch by batch."""
    workers = cod_data.usable_workers(opts.num_workers)
    loader = cod_data.build_loader(ImageSet(paths, img_size), batch_size=opts.batch_size, shuffle=False,
                                   num_workers=workers, seed=0)
    with tqdm(total=len(paths), desc=desc, leave=False, disable=not opts.progress, dynamic_ncols=True,
              mininterval=1.0) as bar:
        for batch in loader:  # an unreadable image: build_loader raises its error as a UserError
            probs = predict_probs(model, batch["image"].to(device, non_blocking=True), opts.tta, dtype)
            sizes = batch["orig_size"].tolist()
            for i, prob, size in zip(batch["index"].tolist(), probs[:, 0].cpu().numpy(), sizes):
                yield i, prob, tuple(size)
            bar.update(len(probs))


# ---------------------------------------------------------------------------------------------
# evaluate
# ---------------------------------------------------------------------------------------------

def evaluate_samples(model, samples: Sequence[cod_data.Sample], opts: InferenceOptions, cfg: dict, device, dtype,
                     desc: str = "eval", pool: Optional[MetricPool] = None) -> dict:
    """``METRIC_KEYS`` of one test set, each image scored at its mask's own resolution, by ``pool``'s
    workers (None: in this process)."""
    scorer = pool.scorer(cfg["threshold"]) if pool is not None else Scorer(threshold=cfg["threshold"])
    for i, prob, _ in iterate_probs(model, [s.image for s in samples], opts, cfg["img_size"], device, dtype, desc):
        scorer.add([prob], [samples[i].mask])
    return scorer.results()


def evaluate_checkpoint(opts: EvalOptions) -> dict:
    """Score ``opts.checkpoint`` on every test set under ``opts.dataset_path``; print the table and write
    ``eval_results.csv`` / ``eval_results.json`` into ``opts.out_dir``. Returns what the JSON holds."""
    opts.validate()
    model, cfg, device, dtype = load_model(opts)
    # 'demo' data is generated from the seed: the run's seed gives the test images the run was scored on
    index = cod_data.find_dataset(opts.dataset_path, include_noncam=opts.include_noncam,
                                  seed=cfg["seed"], require_train=False)
    if not index.tests:
        raise UserError(f"no test set under {opts.dataset_path}: expected Test/{{Image,GT_Object}} (COD10K-v3) "
                        "or TestDataset/<name>/{Imgs,GT} (SINet layout)")
    log.info("Evaluate: %s | TTA %s | device %s | AMP %s | threshold %g%s", index.root, opts.tta, device,
             dtype or "off (fp32)", cfg["threshold"],
             f" | first {opts.limit} images of each test set (--limit)" if opts.limit else "")

    results, counts = {}, {}
    workers = default_metric_workers(opts.num_workers) if opts.metric_workers is None else opts.metric_workers
    with MetricPool(workers) as pool:  # started by the first test set, ended here
        for name, samples in index.tests.items():
            samples = samples[:opts.limit] if opts.limit else samples
            results[name] = evaluate_samples(model, samples, opts, cfg, device, dtype, f"test {name}", pool)
            counts[name] = len(samples)
    log.info("%s (%s weights%s, TTA %s):\n%s", opts.checkpoint, cfg["weights"],
             f", epoch {cfg['epoch']}" if cfg["epoch"] is not None else "", opts.tta, format_table(results))

    out_dir = opts.out_dir or os.path.dirname(os.path.abspath(opts.checkpoint))
    report = {
        "checkpoint": os.path.abspath(opts.checkpoint),
        "epoch": cfg["epoch"],
        "weights": cfg["weights"],
        "tta": opts.tta,
        "img_size": cfg["img_size"],
        "threshold": cfg["threshold"],
        "limit": opts.limit,
        "include_noncam": opts.include_noncam,
        "dataset_path": index.root,
        "images": counts,
        "results": results,
    }
    write_results(report, out_dir)
    return report


def write_results(report: dict, out_dir: str) -> None:
    try:
        os.makedirs(out_dir, exist_ok=True)
        write_json(os.path.join(out_dir, "eval_results.json"), report)
        with atomic_write(os.path.join(out_dir, "eval_results.csv"), "w") as f:
            w = csv.writer(f)
            w.writerow(["dataset", "images", *METRIC_KEYS])
            for name, row in report["results"].items():
                w.writerow([name, report["images"][name], *(f"{row[k]:.6f}" for k in METRIC_KEYS)])
    except OSError as e:
        raise UserError(f"cannot write the results to {out_dir}: {e.strerror or e}; "
                        "pass a writable --out-dir") from None
    log.info("Wrote %s and eval_results.csv", os.path.join(out_dir, "eval_results.json"))

