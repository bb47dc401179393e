"""One scorer for validation, the test split after training, and ``evaluate``.

    scorer = Scorer(threshold=0.5)
    scorer.add(probs, mask_paths)   # B x 1 x S x S probabilities; each mask read at its own size
    scorer.results(rt)              # METRIC_KEYS over every image, all processes' images merged

Under DDP every process scores its own shard of the images; ``results`` gathers the per-image values
of all of them, so each image counts exactly once, as in one process.
"""

from __future__ import annotations

from typing import Optional, Sequence

import torch

import data as cod_data
from evaluation.metrics import DEFAULT_THRESHOLD, SegMetrics


class Scorer:
    def __init__(self, threshold: float = DEFAULT_THRESHOLD):
        self.threshold = float(threshold)
        self.metrics = SegMetrics(threshold=self.threshold)

    def __len__(self) -> int:
        return len(self.metrics)

    def add(self, probs, mask_paths: Sequence[str]) -> None:
        """Score probability maps (a B x 1 x S x S tensor, or S x S maps) against the masks on disk."""
        if torch.is_tensor(probs):
            probs = probs.detach().float().cpu()
        for prob, path in zip(probs, mask_paths):
            self.metrics.step(prob, cod_data.load_mask(path))

    def results(self, rt=None) -> Optional[dict]:
        """The metrics of every image scored here and, with a distributed ``rt``, by every process.
        None when no image was scored anywhere."""
        metrics = self.metrics
        if rt is not None and rt.world_size > 1:
            metrics = SegMetrics(threshold=self.threshold)
            for state in rt.gather(self.metrics.state()):
                metrics.extend(state)
        return metrics.results() if len(metrics) else None
