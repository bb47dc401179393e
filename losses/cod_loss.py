"""The combiner: main prediction + deep supervision + MoE balance -> (total, named terms)."""

from __future__ import annotations

import math

import torch
from torch import nn

from core.errors import UserError

from . import functional as LF

TERMS = ("bce", "iou", "dice", "ds", "moe_aux")


class CODLoss(nn.Module):
    """``total = bce + iou + dice + ds + moe_aux``, each term already multiplied by its weight:

    - bce, iou, dice: of ``outputs['main']`` (boundary-weighted BCE and IoU, Dice), times
      ``bce_weight``, ``iou_weight``, ``dice_weight``;
    - ds: ``sum_i ds_weights[i] * (bce_weight*bce_i + iou_weight*iou_i + dice_weight*dice_i)`` over
      ``outputs['aux']`` (each upsampled bilinearly to the mask), 0 without aux outputs;
    - moe_aux: ``moe_aux_weight * outputs['moe_aux']``, 0 when absent.

    The returned terms are detached 0-dim tensors under these five names, always all present, and
    they add up to the total.
    """

    def __init__(self, bce_weight: float = 1.0, iou_weight: float = 1.0, dice_weight: float = 1.0,
                 moe_aux_weight: float = 0.01, ds_weights=(0.5, 0.3, 0.2), label_smoothing: float = 0.0):
        super().__init__()
        self.bce_weight = float(bce_weight)
        self.iou_weight = float(iou_weight)
        self.dice_weight = float(dice_weight)
        self.moe_aux_weight = float(moe_aux_weight)
        self.ds_weights = tuple(float(w) for w in ds_weights)
        self.label_smoothing = float(label_smoothing)

    def _combo(self, terms: dict[str, torch.Tensor]) -> torch.Tensor:
        return self.bce_weight * terms["bce"] + self.iou_weight * terms["iou"] + self.dice_weight * terms["dice"]

    def forward(self, outputs: dict, mask: torch.Tensor) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        mask = mask.float()
        if mask.ndim == 3:
            mask = mask.unsqueeze(1)
        weight = LF.boundary_weight(mask)
        main = LF.segmentation_terms(outputs["main"], mask, self.label_smoothing, weight)
        zero = main["bce"].new_zeros(())
        terms = {"bce": self.bce_weight * main["bce"], "iou": self.iou_weight * main["iou"],
                 "dice": self.dice_weight * main["dice"]}
        aux = outputs.get("aux") or []
        if aux and len(aux) != len(self.ds_weights):
            raise UserError(f"--ds-weights has {len(self.ds_weights)} values but the model gives {len(aux)} "
                            f"deep-supervision outputs: pass {len(aux)} values")
        ds = zero
        for w, logits in zip(self.ds_weights, aux):
            ds = ds + w * self._combo(LF.segmentation_terms(logits, mask, self.label_smoothing, weight))
        terms["ds"] = ds
        moe = outputs.get("moe_aux")
        terms["moe_aux"] = self.moe_aux_weight * moe.float() if moe is not None else zero
        total = terms["bce"] + terms["iou"] + terms["dice"] + terms["ds"] + terms["moe_aux"]
        return total, {k: v.detach() for k, v in terms.items()}


def build_loss(bce_weight: float = 1.0, iou_weight: float = 1.0, dice_weight: float = 1.0,
               moe_aux_weight: float = 0.01, ds_weights=(0.5, 0.3, 0.2), label_smoothing: float = 0.0) -> CODLoss:
    for flag, value in (("--bce-weight", bce_weight), ("--iou-weight", iou_weight),
                        ("--dice-weight", dice_weight), ("--moe-aux-weight", moe_aux_weight),
                        *(("--ds-weights", w) for w in ds_weights)):
        if not (math.isfinite(value) and value >= 0):
            raise UserError(f"{flag} {value}: loss weights must be finite and >= 0")
    if not 0.0 <= label_smoothing < 1.0:
        raise UserError(f"--label-smoothing {label_smoothing}: must be in [0, 1), e.g. 0.1")
    return CODLoss(bce_weight, iou_weight, dice_weight, moe_aux_weight, ds_weights, label_smoothing)
