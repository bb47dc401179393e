"""Per-image compute of a model at a given input size, counted once at start-up."""

from __future__ import annotations

import torch
from torch.utils.flop_counter import FlopCounterMode

_counted: dict = {}


@torch.no_grad()
def forward_gflops(model: torch.nn.Module, img_size: int, device="cpu") -> float:
    """GFLOPs of one forward pass on one ``img_size`` x ``img_size`` image, as torch's
    ``FlopCounterMode`` counts them (2 per multiply-add of convolutions and matrix products;
    element-wise ops are not counted). The model's train/eval mode is restored afterwards."""
    was_training = model.training
    model.eval()
    try:
        x = torch.zeros(1, 3, img_size, img_size, device=device)
        with FlopCounterMode(display=False) as counter:
            model(x)
        return counter.get_total_flops() / 1e9
    finally:
        model.train(was_training)


def forward_gflops_once(model: torch.nn.Module, img_size: int, spec: tuple, device="cpu") -> float:
    """``forward_gflops``, counted once per ``spec`` (the build arguments that decide the layers: backbone,
    experts, top-k, deep supervision, decoder channels) and size in this process: the count is
    deterministic and costs seconds, and a process (the tests) may build many equal models."""
    key = (spec, img_size, torch.device(device).type)
    if key not in _counted:
        _counted[key] = forward_gflops(model, img_size, device)
    return _counted[key]
