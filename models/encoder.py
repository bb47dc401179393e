"""The backbone: a timm model with ``features_only=True`` (EdgeNeXt by default), and how its
weights get there.

Weights come from one of three places, tried in this order:

1. ``pretrained_path``: a local ``.pth``/``.safetensors`` state dict (timm or original EdgeNeXt
   layout, optionally wrapped in ``{'state_dict': ...}`` or ``{'model': ...}``).
2. ``pretrained=True`` and the file is already in the local Hugging Face cache: loaded from there,
   with no network access at all.
3. ``pretrained=True`` otherwise: timm downloads it, but only after a quick (<= 2 s) check that the
   hub can be reached; offline (or ``HF_HUB_OFFLINE=1``) this raises a one-line ``UserError`` at
   once instead of letting huggingface_hub retry for most of a minute.
"""

from __future__ import annotations

import contextlib
import difflib
import logging
import os
import socket
import threading
from urllib.parse import urlparse

import timm
import torch
from torch import nn

from core.errors import UserError

log = logging.getLogger(__name__)

# keys of a classification checkpoint that a features_only backbone has no use for
_HEAD_PREFIXES = ("head.", "fc.", "classifier.", "norm.", "head_", "conv_head.", "bn2.")
_WRAPPER_KEYS = ("state_dict", "model", "model_ema", "module")
_STRIP_PREFIXES = ("module.", "model.")
DECODER_STRIDES = (4, 8, 16, 32)


def check_backbone_name(backbone: str) -> None:
    """A model timm knows (optionally with a pretrained tag, ``name.tag``); else one line with close
    matches."""
    base, _, tag = backbone.partition(".")
    if not timm.is_model(base):
        close = difflib.get_close_matches(base, timm.list_models(), n=5, cutoff=0.6)
        hint = f"close matches: {', '.join(close)}" if close else "timm.list_models() lists them"
        raise UserError(f"--backbone {backbone!r} is not a timm model; {hint}")
    if tag and backbone not in timm.list_models(base, pretrained=True):
        tags = ", ".join(timm.list_models(base, pretrained=True)) or "none"
        raise UserError(f"--backbone {backbone!r}: unknown pretrained tag; timm has {tags}")


def fixed_input_size(backbone: str) -> bool:
    """Whether the model is built for one input size (Swin, MaxViT: ``img_size`` at build time)."""
    cfg = timm.models.get_pretrained_cfg(backbone.partition(".")[0])
    return bool(getattr(cfg, "fixed_input_size", False))


def decoder_levels(backbone: str, reductions: list[int]) -> list[int]:
    """Indices of the feature maps the decoder uses: the last one at each of DECODER_STRIDES.

    ResNets, EfficientNets and MobileNets also emit a stride-2 map; it is left out."""
    last = {r: i for i, r in enumerate(reductions)}
    if any(s not in last for s in DECODER_STRIDES):
        raise UserError(f"--backbone {backbone}: its feature maps have strides "
                        f"{', '.join(map(str, reductions))}; the decoder needs 4, 8, 16 and 32 (a "
                        "hierarchical model such as resnet50, convnext_tiny or swin_tiny_patch4_window7_224)")
    return [last[s] for s in DECODER_STRIDES]


class Encoder(nn.Module):
    """A timm ``features_only`` backbone returning four NCHW feature maps (strides 4, 8, 16, 32),
    shallow to deep. ``img_size`` is passed to models built for one input size (Swin)."""

    def __init__(self, backbone: str = "edgenext_base", pretrained: bool = True,
                 pretrained_path: str | None = None, drop_path: float = 0.0, img_size: int | None = None):
        super().__init__()
        check_backbone_name(backbone)
        self.backbone = backbone
        kwargs = dict(features_only=True)
        if drop_path > 0:  # not every model takes drop_path_rate
            kwargs["drop_path_rate"] = drop_path
        fixed = fixed_input_size(backbone) and img_size is not None
        if fixed:
            kwargs["img_size"] = img_size
        if pretrained and not pretrained_path:
            self.model = _create_pretrained(backbone, kwargs)
        else:
            self.model = create_features_model(backbone, False, kwargs)
            if pretrained_path:
                load_weights_file(self.model, pretrained_path, backbone)
        info = self.model.feature_info
        self.levels: list[int] = decoder_levels(backbone, list(info.reduction()))
        self.channels: list[int] = [info.channels()[i] for i in self.levels]
        self.reductions: list[int] = [info.reduction()[i] for i in self.levels]
        self.nhwc: bool = getattr(getattr(self.model, "output_fmt", "NCHW"), "value", "NCHW") == "NHWC"
        self.stem_modules, self.stage_modules = self._split_stages()
        if fixed:
            self._check_input_size(img_size)

    def _split_stages(self) -> tuple[list[nn.Module], list[nn.Module]]:
        """The stem (everything that runs before the first level the decoder uses) and one part per
        level: the modules after the previous level's, up to and including its own.

        Parts follow the order modules are registered in, which is the order they run in. A level's
        module may be a direct child (FeatureListNet flattens ``stages.0`` into ``stages_0``) or
        nested (EfficientNet's ``blocks.1``): then its parents are split, and their own parameters
        (if any) go with what precedes them."""
        names = self.model.feature_info.module_name()
        ends = [self._module_path(names[i]) for i in self.levels]
        parts, pending = [], []

        def walk(module: nn.Module, prefix: str) -> None:
            own = list(module.parameters(recurse=False))
            if own:
                pending.append(nn.ParameterList(own))
            for name, child in module.named_children():
                path = prefix + name
                if path in ends:
                    parts.append(pending + [child])
                    pending.clear()
                elif any(e.startswith(path + ".") for e in ends):
                    walk(child, path + ".")
                else:
                    pending.append(child)

        walk(self.model, "")
        parts[-1].extend(pending)  # after the deepest level: nothing the decoder sees
        stem = parts[0][:-1]
        parts[0] = parts[0][-1:]
        return stem, [p[0] if len(p) == 1 else nn.ModuleList(p) for p in parts]

    def _module_path(self, name: str) -> str:
        """Where feature_info's module ``name`` is in ``self.model``: the same path, or its first two
        levels joined by FeatureListNet (``stages.0`` -> ``stages_0``), or under a wrapper's child."""
        flat = name.replace(".", "_", 1)
        for path in (name, flat, "model." + name, "body." + name):
            try:
                self.model.get_submodule(path)
                return path
            except AttributeError:
                continue
        raise UserError(f"--backbone {self.backbone}: cannot find its feature module {name!r} to split "
                        "the stem and stages for freezing")

    def _check_input_size(self, img_size: int) -> None:
        """One forward pass at ``img_size`` in eval mode: a size the model's windows cannot tile is one
        line now rather than a traceback at the first batch."""
        was_training = self.model.training
        self.model.eval()
        try:
            with torch.no_grad():
                self.model(torch.zeros(1, 3, img_size, img_size))
        except (AssertionError, RuntimeError, ValueError) as e:
            size = timm.models.get_pretrained_cfg(self.backbone.partition(".")[0]).input_size[-1]
            raise UserError(f"--backbone {self.backbone} cannot take --img-size {img_size} "
                            f"({type(e).__name__}: {_first_sentence(e)}); try {size}, its pretrained size"
                            ) from e
        finally:
            self.model.train(was_training)

    def forward(self, x: torch.Tensor) -> list[torch.Tensor]:
        feats = self.model(x)
        feats = [feats[i] for i in self.levels]
        return [f.permute(0, 3, 1, 2) for f in feats] if self.nhwc else feats


def create_features_model(backbone: str, pretrained: bool, kwargs: dict) -> nn.Module:
    """``timm.create_model``; a model timm cannot build with ``features_only=True`` (or with the
    flags given) is one line."""
    try:
        return timm.create_model(backbone, pretrained=pretrained, **kwargs)
    except (AssertionError, AttributeError, NotImplementedError, RuntimeError, TypeError) as e:
        raise UserError(f"--backbone {backbone} does not build as a features_only backbone "
                        f"({type(e).__name__}: {_first_sentence(e)}); pick a model with a feature "
                        "pyramid, e.g. resnet50, convnext_tiny, efficientnet_b3") from e


# ---------------------------------------------------------------------------------------------
# pretrained weights
# ---------------------------------------------------------------------------------------------

def _create_pretrained(backbone: str, kwargs: dict) -> nn.Module:
    cached = cached_hub_file(backbone)
    if cached is not None:
        log.info("Pretrained weights for %s from the local Hugging Face cache (%s)", backbone, cached)
        model = create_features_model(backbone, False, kwargs)
        load_weights_file(model, cached, backbone)
        return model
    no_net = (f"pretrained weights for {backbone} cannot be downloaded (no network?): use "
              "--pretrained-path FILE (a .pth/.safetensors from timm) or --no-pretrained")
    if hub_offline() or not hub_reachable():
        raise UserError(no_net)
    try:
        with _quiet_hub():
            return create_features_model(backbone, True, kwargs)
    except OSError as e:  # huggingface_hub's offline and HTTP errors are OSErrors
        raise UserError(f"{no_net} ({type(e).__name__})") from e


def hub_offline() -> bool:
    """``HF_HUB_OFFLINE`` as set now (huggingface_hub itself only reads it at import)."""
    value = os.environ.get("HF_HUB_OFFLINE", "")
    if value.strip().upper() in ("1", "ON", "YES", "TRUE"):
        return True
    try:
        from huggingface_hub import constants
        return bool(constants.HF_HUB_OFFLINE)
    except ImportError:
        return False


def cached_hub_file(backbone: str) -> str | None:
    """Path of the backbone's timm weights in the local Hugging Face cache, or None."""
    try:
        from huggingface_hub import try_to_load_from_cache
        cfg = timm.models.get_pretrained_cfg(backbone)
    except Exception:  # no huggingface_hub, or a name without a pretrained cfg
        return None
    hub_id = getattr(cfg, "hf_hub_id", None) if cfg is not None else None
    if not hub_id:
        return None
    repo, _, revision = hub_id.partition("@")
    names = [cfg.hf_hub_filename] if getattr(cfg, "hf_hub_filename", None) else []
    for name in names + ["model.safetensors", "pytorch_model.bin"]:
        path = try_to_load_from_cache(repo, name, revision=revision or None)
        if isinstance(path, str) and os.path.isfile(path):
            return path
    return None


def hub_reachable(timeout: float = 2.0) -> bool:
    """Whether a TCP connection to the hub (or the HTTPS proxy) opens within ``timeout`` seconds.

    Run in a daemon thread so that a hanging DNS lookup cannot block longer than ``timeout``.
    """
    proxy = os.environ.get("HTTPS_PROXY") or os.environ.get("https_proxy")
    try:
        from huggingface_hub import constants
        endpoint = constants.ENDPOINT
    except ImportError:
        endpoint = "https://huggingface.co"
    url = urlparse(proxy if proxy else os.environ.get("HF_ENDPOINT", endpoint))
    host = url.hostname or "huggingface.co"
    port = url.port or (80 if url.scheme == "http" else 443)
    ok = []

    def probe():
        try:
            socket.create_connection((host, port), timeout=timeout).close()
            ok.append(True)
        except OSError:
            pass

    t = threading.Thread(target=probe, daemon=True)
    t.start()
    t.join(timeout)
    return bool(ok)


@contextlib.contextmanager
def _quiet_hub():
    """Hide huggingface_hub's per-retry warnings; the failure becomes one UserError line."""
    logger = logging.getLogger("huggingface_hub")
    old = logger.level
    logger.setLevel(logging.ERROR)
    try:
        yield
    finally:
        logger.setLevel(old)


def read_state_dict(path: str) -> dict[str, torch.Tensor]:
    """A state dict from a ``.safetensors`` or torch file, unwrapped and with prefixes stripped."""
    if not os.path.isfile(path):
        raise UserError(f"--pretrained-path {path}: no such file (pass a timm .pth/.safetensors, "
                        "or --no-pretrained)")
    try:
        if path.endswith(".safetensors"):
            from safetensors.torch import load_file
            sd = load_file(path, device="cpu")
        else:
            sd = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:
        raise UserError(f"--pretrained-path {path}: cannot be read as a state dict "
                        f"({type(e).__name__}: {_first_sentence(e)})") from e
    while isinstance(sd, dict) and not _is_tensor_dict(sd):
        inner = next((sd[k] for k in _WRAPPER_KEYS if isinstance(sd.get(k), dict)), None)
        if inner is None:
            break
        sd = inner
    if not isinstance(sd, dict) or not _is_tensor_dict(sd):
        raise UserError(f"--pretrained-path {path}: holds no state dict of tensors (expected a timm "
                        ".pth/.safetensors, or a dict with a 'state_dict' or 'model' entry)")
    out = {}
    for k, v in sd.items():
        if not torch.is_tensor(v):
            continue
        stripped = True
        while stripped:
            stripped = False
            for p in _STRIP_PREFIXES:
                if k.startswith(p):
                    k, stripped = k[len(p):], True
        out[k] = v
    return out


def _first_sentence(e: Exception) -> str:
    text = str(e).strip().splitlines()[0] if str(e).strip() else "no message"
    return text.split(". ")[0][:160]


def _is_tensor_dict(d: dict) -> bool:
    return bool(d) and any(torch.is_tensor(v) for v in d.values())


def load_weights_file(model: nn.Module, path: str, backbone: str) -> None:
    """Load a timm (or original EdgeNeXt) classification checkpoint into a features_only model."""
    sd = read_state_dict(path)
    if "stem.0.weight" not in sd and any(k.startswith("downsample_layers.") for k in sd):
        from timm.models.edgenext import checkpoint_filter_fn  # original (FB-style) release layout
        sd = checkpoint_filter_fn(sd, timm.create_model(backbone.partition(".")[0], pretrained=False))
    children = {name for name, _ in model.named_children()}
    target = model.state_dict()
    mapped, ignored, unexpected, wrong_shape = {}, 0, [], []
    for k, v in sd.items():
        parts = k.split(".")
        joined = "_".join(parts[:2]) if len(parts) > 2 else None
        if joined in children:  # timm 'stages.0.x' -> FeatureListNet 'stages_0.x'
            k = ".".join([joined] + parts[2:])
        elif parts[0] not in children:
            if k.startswith(_HEAD_PREFIXES):
                ignored += 1
            else:
                unexpected.append(k)
            continue
        if k not in target:
            unexpected.append(k)
        elif target[k].shape != v.shape:
            wrong_shape.append(f"{k} {tuple(v.shape)} vs {tuple(target[k].shape)}")
        else:
            mapped[k] = v
    if wrong_shape or not mapped:
        why = (f"{len(wrong_shape)} tensors have the wrong shape (e.g. {wrong_shape[0]})" if wrong_shape
               else "no tensor matches the backbone")
        raise UserError(f"--pretrained-path {path}: {why}; is it a checkpoint of {backbone}?")
    missing = [k for k in target if k not in mapped]
    model.load_state_dict(mapped, strict=False)
    log.info("Loaded %s into %s: %d tensors, %d missing, %d unexpected, %d classifier-head keys ignored",
             path, backbone, len(mapped), len(missing), len(unexpected), ignored)
    if missing:
        log.info("  missing (kept at random init): %s", ", ".join(missing[:5]) + (" ..." if len(missing) > 5 else ""))
    if unexpected:
        log.info("  unexpected (ignored): %s", ", ".join(unexpected[:5]) + (" ..." if len(unexpected) > 5 else ""))
