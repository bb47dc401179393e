"""Validation/test metrics: PySODMetrics' COD measures plus IoU and Dice, per image at GT resolution."""

from evaluation.metrics import (
    HEADERS,
    HIGHER_IS_BETTER,
    METRIC_KEYS,
    SegMetrics,
    binary_iou_dice,
    format_table,
    resolve_monitor,
    to_mask,
    to_probability,
)

__all__ = [
    "HEADERS",
    "HIGHER_IS_BETTER",
    "METRIC_KEYS",
    "SegMetrics",
    "binary_iou_dice",
    "format_table",
    "resolve_monitor",
    "to_mask",
    "to_probability",
]
