"""Loss functions on logits and binary masks (B x 1 x H x W). Each returns a 0-dim mean over the batch.

The boundary-aware "structure loss" of F3Net/SINet is ``weighted_bce + weighted_iou`` with the
weight map ``1 + 5 * |avg_pool(mask, 31, stride 1, pad 15) - mask|``: pixels near the object
boundary count up to 6 times more. (The public implementations pass ``reduce='none'`` to
``binary_cross_entropy_with_logits``; PyTorch reads that as the legacy flag, averages first, and
the weight map does nothing for their BCE. Here the BCE is per pixel, then weighted.)

All computations are in float32, also under autocast.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


def boundary_weight(mask: torch.Tensor, kernel: int = 31, strength: float = 5.0) -> torch.Tensor:
    """``1 + strength * |local mean - mask|`` (zero padding counted in the mean, as in F3Net).

    The k x k box mean is separable: a k x 1 pass, then a 1 x k pass, gives the same map (to float
    rounding) in 2k instead of k^2 operations a pixel; on the CPU the 31 x 31 pool was the largest
    cost of the step outside the backbone (docs/performance.md)."""
    pad = kernel // 2
    local = F.avg_pool2d(mask, (kernel, 1), stride=1, padding=(pad, 0))
    local = F.avg_pool2d(local, (1, kernel), stride=1, padding=(0, pad))
    return 1.0 + strength * (local - mask).abs()


def weighted_bce(logits: torch.Tensor, target: torch.Tensor, weight: torch.Tensor | None = None) -> torch.Tensor:
    """Per-pixel BCE, weighted mean per sample, then mean over the batch. ``target`` may be soft."""
    bce = F.binary_cross_entropy_with_logits(logits, target, reduction="none")
    if weight is None:
        return bce.mean()
    return ((bce * weight).sum(dim=(2, 3)) / weight.sum(dim=(2, 3))).mean()


def weighted_iou(logits: torch.Tensor, mask: torch.Tensor, weight: torch.Tensor | None = None,
                 smooth: float = 1.0) -> torch.Tensor:
    """``1 - (inter + s) / (union + s)`` on sigmoid probabilities, per sample, then mean."""
    prob = torch.sigmoid(logits)
    w = torch.ones_like(mask) if weight is None else weight
    inter = (prob * mask * w).sum(dim=(2, 3))
    union = ((prob + mask) * w).sum(dim=(2, 3)) - inter
    return (1.0 - (inter + smooth) / (union + smooth)).mean()


def dice_loss(logits: torch.Tensor, mask: torch.Tensor, smooth: float = 1.0) -> torch.Tensor:
    """``1 - (2 * inter + s) / (sum p + sum t + s)`` on sigmoid probabilities, per sample, then mean."""
    prob = torch.sigmoid(logits)
    inter = (prob * mask).sum(dim=(2, 3))
    total = prob.sum(dim=(2, 3)) + mask.sum(dim=(2, 3))
    return (1.0 - (2.0 * inter + smooth) / (total + smooth)).mean()


def smooth_targets(mask: torch.Tensor, label_smoothing: float) -> torch.Tensor:
    """``t * (1 - ls) + 0.5 * ls``: 0 -> ls/2, 1 -> 1 - ls/2."""
    return mask if label_smoothing <= 0 else mask * (1.0 - label_smoothing) + 0.5 * label_smoothing


def resize_logits(logits: torch.Tensor, size) -> torch.Tensor:
    """Bilinear resize of logits to ``size`` (no-op when it already matches)."""
    if tuple(logits.shape[-2:]) == tuple(size):
        return logits
    return F.interpolate(logits, size=tuple(size), mode="bilinear", align_corners=False)


def segmentation_terms(logits: torch.Tensor, mask: torch.Tensor, label_smoothing: float = 0.0,
                       weight: torch.Tensor | None = None) -> dict[str, torch.Tensor]:
    """Unweighted {'bce', 'iou', 'dice'} of one prediction; logits are resized to the mask first.

    The boundary weight map (computed from ``mask`` unless given) weights BCE and IoU; label
    smoothing changes only the BCE targets.
    """
    logits = resize_logits(logits.float(), mask.shape[-2:])
    if weight is None:
        weight = boundary_weight(mask)
    return {"bce": weighted_bce(logits, smooth_targets(mask, label_smoothing), weight),
            "iou": weighted_iou(logits, mask, weight),
            "dice": dice_loss(logits, mask)}
