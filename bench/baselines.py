"""Scores of trivial predictors on a dataset's validation split and test sets: the floor a trained
model must clear.

    python bench/baselines.py --dataset-path demo [--val-split 0.1] [--seed 42]

Prints IoU, Dice, S-measure and MAE of an all-background and an all-foreground prediction, on the
same seeded validation split `train` uses and on every test set, each image at its mask's resolution.
"""

import argparse
import os
import sys

import numpy as np

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

import data as cod_data  # noqa: E402
from evaluation import SegMetrics, format_table  # noqa: E402


def score(samples, value: float) -> dict:
    metrics = SegMetrics()
    for s in samples:
        gt = cod_data.load_mask(s.mask)
        metrics.step(np.full(gt.shape, value, np.float32), gt)
    return metrics.results()


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--dataset-path", default="demo")
    p.add_argument("--val-split", type=float, default=0.1)
    p.add_argument("--seed", type=int, default=42)
    a = p.parse_args()
    index = cod_data.find_dataset(a.dataset_path, seed=a.seed)
    _, val = cod_data.split_train_val(index.train, a.val_split, a.seed)
    sets = {"val": val, **index.tests}
    for name, value in (("all-background (0)", 0.0), ("all-foreground (1)", 1.0)):
        print(f"{name}:")
        print(format_table({k: score(v, value) for k, v in sets.items() if v},
                           columns=("iou", "dice", "sm", "mae")))


if __name__ == "__main__":
    main()
