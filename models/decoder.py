"""Top-down (FPN/UNet-like) decoder with a mixture-of-experts block at every level.

It only knows the encoder's channel list. At each level, deepest first:

    lateral 1x1 (C_i -> D) + upsampled coarser level -> 3x3 fuse -> MoE block (or plain block)

and it returns the per-level features (shallow to deep, D channels each), the balance loss and the
expert usage, both averaged over the levels.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from .experts import MoEBlock, PlainBlock, conv_norm_act


class Decoder(nn.Module):
    def __init__(self, encoder_channels: list[int], decoder_channels: int = 64, num_experts: int = 4,
                 top_k: int = 2):
        super().__init__()
        d = decoder_channels
        self.num_experts = num_experts
        self.lateral = nn.ModuleList(conv_norm_act(c, d, 1) for c in encoder_channels)
        self.fuse = nn.ModuleList(conv_norm_act(d, d, 3) for _ in encoder_channels)
        self.blocks = nn.ModuleList(MoEBlock(d, num_experts, top_k) if num_experts > 1 else PlainBlock(d)
                                    for _ in encoder_channels)

    @property
    def uses_experts(self) -> bool:
        return self.num_experts > 1

    def forward(self, feats: list[torch.Tensor]):
        outs: list[torch.Tensor] = [None] * len(feats)
        aux, usage = [], []
        x = None
        for i in reversed(range(len(feats))):
            y = self.lateral[i](feats[i])
            if x is not None:
                y = y + F.interpolate(x, size=y.shape[-2:], mode="bilinear", align_corners=False)
            y = self.fuse[i](y)
            if self.uses_experts:
                x, a, u = self.blocks[i](y)
                aux.append(a)
                usage.append(u)
            else:
                x = self.blocks[i](y)
            outs[i] = x
        if self.uses_experts:
            moe_aux = torch.stack(aux).mean()
            expert_usage = torch.stack(usage).mean(0)
        else:  # no router: nothing to balance; one expert (or none) gets all the mass
            moe_aux = feats[0].new_zeros((), dtype=torch.float32)
            expert_usage = feats[0].new_ones(self.num_experts, dtype=torch.float32)
        return outs, moe_aux, expert_usage
