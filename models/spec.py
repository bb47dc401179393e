"""The model's shape flags, their defaults and their rules, written once.

``train`` (``training.config.Config``), ``evaluate``/``predict`` (their overrides) and ``build_model``
all check a flag here, so a value is accepted or refused with the same words everywhere.
"""

from __future__ import annotations

from dataclasses import dataclass

from core.errors import UserError

DEFAULT_IMG_SIZE = 384
MIN_IMG_SIZE = 32  # the deepest feature map the decoder uses is at stride 32


@dataclass(frozen=True)
class ModelSpec:
    backbone: str = "edgenext_base"
    num_experts: int = 4
    moe_top_k: int = 2
    deep_supervision: bool = False
    decoder_channels: int = 64
    drop_path: float = 0.0
    dropout: float = 0.0

    def validate(self) -> "ModelSpec":
        check(self.num_experts >= 1,
              f"--num-experts must be >= 1, 1 = no mixture of experts (got {self.num_experts})")
        check(self.moe_top_k >= 1, f"--moe-top-k must be >= 1, it is capped at --num-experts (got {self.moe_top_k})")
        check(self.decoder_channels >= 1, f"--decoder-channels must be >= 1, e.g. 64 (got {self.decoder_channels})")
        check(0.0 <= self.drop_path < 1.0, f"--drop-path must be in [0, 1), e.g. 0.1 (got {self.drop_path})")
        check(0.0 <= self.dropout < 1.0, f"--dropout must be in [0, 1), e.g. 0.1 (got {self.dropout})")
        return self


def check_img_size(size: int) -> None:
    check(size >= MIN_IMG_SIZE, f"--img-size must be >= {MIN_IMG_SIZE} (got {size})")


def check(cond: bool, message: str) -> None:
    if not cond:
        raise UserError(message)
