"""Command-line flags of ``evaluate`` and ``predict``, and the one place their Namespace becomes options.

    p = sub.add_parser("evaluate"); add_evaluate_arguments(p)   ... run_evaluate(args) -> 0
    p = sub.add_parser("predict");  add_predict_arguments(p)    ... run_predict(args) -> 0

Bad input raises ``errors.UserError`` (the caller prints it as one line).
"""

from __future__ import annotations

import argparse
import dataclasses

from evaluation.evaluate import MODEL_FIELDS, TTA_MODES, EvalOptions, InferenceOptions, evaluate_checkpoint
from evaluation.predict import PredictOptions, predict_images
from core.runtime import AMP_MODES


def _add_inference_arguments(p: argparse.ArgumentParser) -> None:
    """Flags both commands share: the checkpoint, how to run it, and the model overrides."""
    d = InferenceOptions(checkpoint="")
    g = p.add_argument_group("model")
    g.add_argument("--checkpoint", required=True,
                   help="best_model.pth / last.pth of a run, or a bare state_dict (then pass --backbone ...)")
    g.add_argument("--use-ema", action=argparse.BooleanOptionalAction, default=d.use_ema,
                   help="use the EMA weights stored in the checkpoint (runs trained with --ema; "
                        "their validation and test_metrics.json used them)")
    g.add_argument("--tta", choices=TTA_MODES, default=d.tta,
                   help="flip: average the probabilities of the image and of its mirror image")
    g.add_argument("--img-size", type=int, default=None, help="square input size (default: the run's)")
    g.add_argument("--backbone", default=None, help="default: the checkpoint's; required for a bare state_dict")
    g.add_argument("--num-experts", type=int, default=None, help="default: the checkpoint's")
    g.add_argument("--moe-top-k", type=int, default=None, help="default: the checkpoint's")
    g.add_argument("--decoder-channels", type=int, default=None, help="default: the checkpoint's")
    g.add_argument("--deep-supervision", action=argparse.BooleanOptionalAction, default=None,
                   help="default: the checkpoint's (only adds or drops unused side heads)")

    g = p.add_argument_group("run")
    g.add_argument("--batch-size", type=int, default=d.batch_size, help="images per forward pass")
    g.add_argument("--num-workers", type=int, default=d.num_workers, help="DataLoader workers (0 = main process)")
    g.add_argument("--device", default=d.device, help="auto (cuda if present, else cpu), cpu, cuda, cuda:N")
    g.add_argument("--amp", choices=AMP_MODES, default=None,
                   help="mixed precision on CUDA (default: off, fp32, so reported metrics do not depend "
                        "on the GPU); always fp32 on CPU")
    g.add_argument("--no-progress", dest="progress", action="store_false", help="hide the progress bar")


def add_evaluate_arguments(p: argparse.ArgumentParser) -> None:
    _add_inference_arguments(p)
    g = p.add_argument_group("evaluate")
    g.add_argument("--dataset-path", required=True,
                   help="dataset root: every test set in it is scored (COD10K-v3 Test/ -> 'COD10K', "
                        "SINet TestDataset/<name>/ -> <name>, or 'demo'); a Train folder is not needed")
    g.add_argument("--out-dir", default=None,
                   help="where eval_results.csv and eval_results.json go (default: the checkpoint's folder)")
    g.add_argument("--limit", type=int, default=None, help="score only the first N images of each test set")
    g.add_argument("--include-noncam", action=argparse.BooleanOptionalAction, default=False,
                   help="COD10K-v3 layout: also score the NonCAM test images (empty masks); "
                        "by default only the CAM ones")
    g.add_argument("--metric-workers", type=int, default=None,
                   help="processes that score the images (the metrics at each mask's resolution) while the "
                        "model runs; 0 = in the main process (default: --num-workers, at most CPUs - 1)")


def add_predict_arguments(p: argparse.ArgumentParser) -> None:
    _add_inference_arguments(p)
    g = p.add_argument_group("predict")
    g.add_argument("--input", required=True,
                   help="an image, or a folder of images (jpg/jpeg/png/bmp/tif/tiff, not recursive)")
    g.add_argument("--output", required=True, help="folder for <stem>.png, one per input image")
    g.add_argument("--threshold", type=float, default=None,
                   help="write binary 0/255 masks (probability > T) instead of 0-255 probabilities")
    g.add_argument("--zip", default=None, help="also pack the PNGs into this zip file (flat)")
    g.add_argument("--overlay", action=argparse.BooleanOptionalAction, default=False,
                   help="also write <output>/overlay/<stem>_overlay.jpg (the image tinted red by the mask)")
    g.add_argument("--overwrite", action=argparse.BooleanOptionalAction, default=False,
                   help="replace masks, overlays and --zip that already exist (by default an existing file "
                        "is refused; an --input image never is an output)")


def options_from_args(cls, args: argparse.Namespace):
    """The one place a Namespace becomes ``cls`` (an ``InferenceOptions`` dataclass)."""
    names = {f.name for f in dataclasses.fields(cls)} - {"overrides"}
    values = vars(args)
    opts = cls(**{k: v for k, v in values.items() if k in names},
               overrides={k: values.get(k) for k in MODEL_FIELDS})
    opts.validate()
    return opts


def run_evaluate(args: argparse.Namespace) -> int:
    evaluate_checkpoint(options_from_args(EvalOptions, args))
    return 0


def run_predict(args: argparse.Namespace) -> int:
    predict_images(options_from_args(PredictOptions, args))
    return 0
