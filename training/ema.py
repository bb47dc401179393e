"""Exponential moving average of model weights, updated after every optimizer step."""

from __future__ import annotations

import copy

import torch


class ModelEma:
    """A frozen copy of the model whose float tensors track ``decay * ema + (1 - decay) * model``.

    The effective decay ramps up as ``min(decay, (1 + n) / (10 + n))`` over the first updates, so an
    early EMA is not dominated by the random initialisation. Buffers that are not floating point
    (e.g. BatchNorm's ``num_batches_tracked``) are copied.
    """

    def __init__(self, model: torch.nn.Module, decay: float):
        self.decay = decay
        self.updates = 0
        self.module = copy.deepcopy(model).eval()
        for p in self.module.parameters():
            p.requires_grad_(False)

    @torch.no_grad()
    def update(self, model: torch.nn.Module) -> None:
        self.updates += 1
        d = min(self.decay, (1 + self.updates) / (10 + self.updates))
        src = model.state_dict()
        for name, ema_t in self.module.state_dict().items():
            t = src[name].detach()
            if ema_t.dtype.is_floating_point:
                ema_t.mul_(d).add_(t.to(ema_t.dtype), alpha=1.0 - d)
            else:
                ema_t.copy_(t)

    def state_dict(self) -> dict:
        return {"module": self.module.state_dict(), "updates": self.updates, "decay": self.decay}

    def load_state_dict(self, state: dict) -> None:
        self.module.load_state_dict(state["module"])
        self.updates = int(state["updates"])
