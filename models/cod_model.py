"""The COD model: Encoder (a timm backbone, EdgeNeXt by default) -> Decoder (top-down + experts) -> Heads.

The model returns outputs only; every loss lives in ``losses/``.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


from .decoder import Decoder
from .encoder import Encoder
from .spec import ModelSpec

NUM_SIDE_HEADS = 3


class Heads(nn.Module):
    """Dropout2d, then a 1x1 conv to one logit channel: main on the finest decoder level, and with
    deep supervision one side head on each of the next three (strides 8, 16, 32)."""

    def __init__(self, channels: int, deep_supervision: bool = False, dropout: float = 0.0):
        super().__init__()
        self.dropout = nn.Dropout2d(dropout) if dropout > 0 else nn.Identity()
        self.main = nn.Conv2d(channels, 1, 1)
        self.side = nn.ModuleList(nn.Conv2d(channels, 1, 1) for _ in range(NUM_SIDE_HEADS)
                                  ) if deep_supervision else nn.ModuleList()

    def forward(self, feats: list[torch.Tensor]) -> tuple[torch.Tensor, list[torch.Tensor]]:
        main = self.main(self.dropout(feats[0]))
        aux = [head(self.dropout(f)) for head, f in zip(self.side, feats[1:])]
        return main, aux


def _is_norm(m: nn.Module) -> bool:
    """Any norm layer: torch's, timm's (LayerNorm2d, BatchNormAct2d, FrozenBatchNorm2d, ...), and
    anything else that keeps running statistics."""
    return isinstance(m, (nn.modules.batchnorm._NormBase, nn.GroupNorm, nn.LayerNorm)) \
        or "norm" in type(m).__name__.lower() or hasattr(m, "running_mean")


class CODModel(nn.Module):
    # Weights that may be absent from (or extra in) a checkpoint this model resumes from: turning
    # --deep-supervision on or off between runs adds or drops only the side heads.
    optional_state_prefixes = ("heads.side.",)

    def __init__(self, encoder: Encoder, decoder: Decoder, heads: Heads):
        super().__init__()
        self.encoder = encoder
        self.decoder = decoder
        self.heads = heads
        self.num_backbone_stages: int = len(encoder.stage_modules)
        self.backbone_level: int = self.num_backbone_stages + 1  # everything trainable

    def forward(self, x: torch.Tensor) -> dict:
        return self.forward_head(self.encoder(x), x.shape[-2:])

    def forward_head(self, feats: list[torch.Tensor], size) -> dict:
        """Decoder and heads on the encoder's features; the main logits are upsampled to ``size``."""
        dec, moe_aux, usage = self.decoder(feats)
        main, aux = self.heads(dec)
        main = F.interpolate(main, size=tuple(size), mode="bilinear", align_corners=False)
        return {"main": main, "aux": aux, "moe_aux": moe_aux, "expert_usage": usage.detach()}

    def set_grad_checkpointing(self, enable: bool = True) -> None:
        """timm's activation checkpointing in the backbone (recompute each stage in backward)."""
        self.encoder.model.set_grad_checkpointing(enable)

    # -- freezing ------------------------------------------------------------------------------

    def _backbone_parts(self) -> list[tuple[nn.Module, bool]]:
        """(module, trainable at the current level) for the stem and each stage."""
        n, level = self.num_backbone_stages, self.backbone_level
        parts = [(m, level > n) for m in self.encoder.stem_modules]
        parts += [(m, j >= n - level) for j, m in enumerate(self.encoder.stage_modules)]
        return parts

    def set_backbone_trainable(self, level: int) -> None:
        """0: backbone frozen; k: the k deepest stages train; num_backbone_stages+1 or more: all, stem
        included. Frozen parts get requires_grad=False and their norm layers stay in eval mode (frozen
        running statistics), also after a later ``train()``. Decoder and heads always train."""
        self.backbone_level = max(0, int(level))
        for module, trainable in self._backbone_parts():
            for p in module.parameters():
                p.requires_grad_(trainable)
        self.train(self.training)

    def train(self, mode: bool = True):
        super().train(mode)
        for module, trainable in self._backbone_parts():
            if not trainable:
                for m in module.modules():
                    if _is_norm(m):
                        m.eval()
        return self

    # -- optimisation --------------------------------------------------------------------------

    def param_groups(self, weight_decay: float, backbone_lr_mult: float) -> list[dict]:
        """Every parameter, frozen or not, exactly once. No weight decay on norm parameters, biases,
        1-d parameters (LayerScale gammas among them) and EdgeNeXt's per-head attention temperature."""
        norm_params = {id(p) for m in self.modules() if _is_norm(m) for p in m.parameters(recurse=False)}
        groups = {name: [] for name in ("backbone", "backbone_no_wd", "decoder", "decoder_no_wd")}
        for name, p in self.named_parameters():
            part = "backbone" if name.startswith("encoder.") else "decoder"
            no_wd = p.ndim <= 1 or name.endswith((".bias", ".temperature")) or id(p) in norm_params
            groups[part + ("_no_wd" if no_wd else "")].append(p)
        out = []
        for name, params in groups.items():
            if params:
                out.append({"params": params, "name": name,
                            "weight_decay": 0.0 if name.endswith("_no_wd") else weight_decay,
                            "lr_scale": backbone_lr_mult if name.startswith("backbone") else 1.0})
        return out

    def param_counts(self) -> dict[str, int]:
        """Parameter counts; 'experts' (expert convs, routers excluded) is part of 'decoder'."""
        def count(module):
            return sum(p.numel() for p in module.parameters())

        experts = sum(count(b.experts) for b in self.decoder.blocks if hasattr(b, "experts"))
        return {"backbone": count(self.encoder), "decoder": count(self.decoder), "experts": experts,
                "heads": count(self.heads), "total": count(self)}


def build_model(backbone: str = "edgenext_base", num_experts: int = 4, moe_top_k: int = 2,
                deep_supervision: bool = False, pretrained: bool = True, pretrained_path: str | None = None,
                drop_path: float = 0.0, dropout: float = 0.0, decoder_channels: int = 64,
                img_size: int | None = None) -> CODModel:
    """``img_size`` is the training/inference input size; only backbones built for one input size
    (Swin) use it, and they are checked at it."""
    ModelSpec(backbone, num_experts, moe_top_k, deep_supervision, decoder_channels, drop_path, dropout).validate()
    encoder = Encoder(backbone, pretrained=pretrained, pretrained_path=pretrained_path, drop_path=drop_path,
                      img_size=img_size)
    decoder = Decoder(encoder.channels, decoder_channels, num_experts, moe_top_k)
    heads = Heads(decoder_channels, deep_supervision, dropout)
    return CODModel(encoder, decoder, heads)
