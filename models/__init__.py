"""EdgeNeXt encoder -> top-down mixture-of-experts decoder -> heads (see docs/model.md)."""

from .cod_model import CODModel, Heads, build_model
from .decoder import Decoder
from .encoder import Encoder

__all__ = ["build_model", "CODModel", "Encoder", "Decoder", "Heads"]
