"""Structure loss (boundary-weighted BCE + IoU), Dice, deep supervision and MoE balance.

``build_loss(...)(outputs, mask) -> (total, {'bce', 'iou', 'dice', 'ds', 'moe_aux'})``; the named
terms are the weighted contributions and add up to the total.
"""

from .cod_loss import TERMS, CODLoss, build_loss
from .modules import DiceLoss, StructureLoss, WeightedBCE, WeightedIoU

__all__ = ["build_loss", "CODLoss", "TERMS", "WeightedBCE", "WeightedIoU", "StructureLoss", "DiceLoss"]
