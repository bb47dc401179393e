"""EdgeNeXt encoder -> top-down mixture-of-experts decoder -> heads (see docs/model.md)."""

from .cod_model import CODModel, Heads, build_model
from .decoder import Decoder
from .encoder import Encoder
from .spec import DEFAULT_IMG_SIZE, ModelSpec, check_img_size

__all__ = ["build_model", "CODModel", "Encoder", "Decoder", "Heads", "ModelSpec", "DEFAULT_IMG_SIZE",
           "check_img_size"]
