#!/usr/bin/env python
"""Camouflaged object detection: train an EdgeNeXt + mixture-of-experts model in two stages.

    python train_ultimate.py train --dataset-path demo --backbone edgenext_xx_small --no-pretrained
    python train_ultimate.py schedule --steps-per-epoch 100 --scheduler cosine --warmup-epochs 3
    python train_ultimate.py lr-find --dataset-path demo --backbone edgenext_xx_small --no-pretrained
    python train_ultimate.py compare checkpoints/run_a checkpoints/run_b --metric iou
    python train_ultimate.py <command> --help

This file checks that the dependencies import (``deps.py``), parses the command line into a ``Config``
and hands it over; a ``UserError`` becomes one ``error: ...`` line and exit status 2.
"""

from __future__ import annotations

import argparse
import logging
import os
import re
import sys

from deps import check_dependencies
from core.errors import UserError
from training.control import RunInterrupted

# A value that starts with '-' and a digit is a (negative) value, not a flag: argparse's own pattern
# takes '-0.001' but not '-1e-3' or a duration such as '-1h', which then got "expected one argument"
# instead of the flag's own check. No flag of this tool starts with '-' and a digit.
NEGATIVE_VALUE = re.compile(r"^-\.?\d")


def build_parser() -> argparse.ArgumentParser:
    from training.config import MONITOR_CHOICES
    from training.flags import add_train_arguments

    parser = argparse.ArgumentParser(
        prog="train_ultimate.py",
        description="Two-stage camouflaged object detection training (EdgeNeXt + mixture of experts).")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    p = sub.add_parser("train", help="train a model (stage 1 frozen backbone, stage 2 unfrozen)")
    add_train_arguments(p)

    p = sub.add_parser("schedule", help="print (and plot) the LR plan that train would follow")
    add_train_arguments(p)
    g = p.add_argument_group("preview")
    g.add_argument("--steps-per-epoch", type=int, default=None,
                   help="optimizer steps per epoch for every stage, instead of counting --dataset-path")
    g.add_argument("--out", default=None, help="write step,epoch,stage,lr for every optimizer step (CSV)")
    g.add_argument("--plot", default=None, help="draw the curve to a PNG (needs matplotlib)")

    p = sub.add_parser("lr-find", help="LR range test: sweep the LR up over a few hundred updates, "
                       "plot the loss, suggest an LR (writes only lr_find.csv/.png)")
    add_train_arguments(p)
    g = p.add_argument_group("lr-find")
    g.add_argument("--stage", type=int, choices=(1, 2), default=2,
                   help="1: backbone frozen (an LR for --lr); 2: backbone unfrozen (for --stage2-lr)")
    g.add_argument("--lr-find-steps", type=int, default=200, help="optimizer updates of the sweep")
    g.add_argument("--lr-find-start", type=float, default=1e-7, help="head LR of the first update")
    g.add_argument("--lr-find-end", type=float, default=1.0, help="head LR of the last update")

    p = sub.add_parser("compare", help="table and overlaid validation curves of several runs")
    p.add_argument("run_dirs", nargs="+", metavar="RUN_DIR", help="checkpoint folders holding metrics.csv")
    p.add_argument("--out", default="compare.png", help="the plot (default: compare.png here)")
    p.add_argument("--metric", choices=MONITOR_CHOICES, default="iou",
                   help="validation metric for best/last and the first panel")

    from evaluation.cli import add_evaluate_arguments, add_predict_arguments

    p = sub.add_parser("evaluate", help="score a checkpoint on every test set of a dataset")
    add_evaluate_arguments(p)
    p = sub.add_parser("predict", help="write probability or binary masks for images")
    add_predict_arguments(p)
    for p in (parser, *sub.choices.values()):
        p._negative_number_matcher = NEGATIVE_VALUE  # argparse's attribute (Python 3.8-3.13)
    return parser


def main(argv=None) -> int:
    logging.basicConfig(level=logging.INFO, format="%(message)s", stream=sys.stdout)
    argv = sys.argv[1:] if argv is None else list(argv)
    try:
        check_dependencies()  # before the parser, whose subcommands import torch, timm and pysodmetrics
        args = build_parser().parse_args(argv)
        if args.command == "train":
            from training.flags import config_from_args
            from training.trainer import fit

            fit(config_from_args(args), argv=argv)
        elif args.command == "schedule":
            from training.flags import config_from_args
            from tools.schedule import preview_schedule

            preview_schedule(config_from_args(args), args.steps_per_epoch, args.out, args.plot)
        elif args.command == "lr-find":
            from training.flags import config_from_args
            from tools.lr_find import LRFindOptions, lr_find

            lr_find(config_from_args(args), LRFindOptions(args.stage, args.lr_find_steps, args.lr_find_start,
                                                          args.lr_find_end))
        elif args.command == "compare":
            from tools.compare import compare_runs

            compare_runs(args.run_dirs, args.out, args.metric)
        elif args.command == "evaluate":
            from evaluation.cli import run_evaluate

            return run_evaluate(args)
        elif args.command == "predict":
            from evaluation.cli import run_predict

            return run_predict(args)
        return 0
    except UserError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except RunInterrupted as e:
        if os.environ.get("RANK", "0") == "0":  # under torchrun every process stops: one says so
            print(f"interrupted: {e}", file=sys.stderr)
        return e.exit_code
    except KeyboardInterrupt:
        hint = ": last.pth holds the last completed epoch" if argv[:1] == ["train"] else ""
        print(f"interrupted{hint}", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
