"""Thin ``nn.Module`` wrappers of ``losses.functional`` for use on their own (logits, mask) -> 0-dim."""

from __future__ import annotations

import torch
from torch import nn

from . import functional as LF


class WeightedBCE(nn.Module):
    """BCE with the boundary weight map (``boundary=False``: plain mean BCE)."""

    def __init__(self, boundary: bool = True, label_smoothing: float = 0.0):
        super().__init__()
        self.boundary = boundary
        self.label_smoothing = label_smoothing

    def forward(self, logits: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        logits = LF.resize_logits(logits.float(), mask.shape[-2:])
        weight = LF.boundary_weight(mask) if self.boundary else None
        return LF.weighted_bce(logits, LF.smooth_targets(mask, self.label_smoothing), weight)


class WeightedIoU(nn.Module):
    """Soft IoU loss with the boundary weight map (``boundary=False``: unweighted)."""

    def __init__(self, boundary: bool = True):
        super().__init__()
        self.boundary = boundary

    def forward(self, logits: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        logits = LF.resize_logits(logits.float(), mask.shape[-2:])
        return LF.weighted_iou(logits, mask, LF.boundary_weight(mask) if self.boundary else None)


class StructureLoss(nn.Module):
    """F3Net/SINet structure loss: weighted BCE + weighted IoU (with the BCE weighting working)."""

    def forward(self, logits: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        terms = LF.segmentation_terms(logits, mask)
        return terms["bce"] + terms["iou"]


class DiceLoss(nn.Module):
    def __init__(self, smooth: float = 1.0):
        super().__init__()
        self.smooth = smooth

    def forward(self, logits: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        return LF.dice_loss(LF.resize_logits(logits.float(), mask.shape[-2:]), mask, self.smooth)
