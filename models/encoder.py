"""The backbone: a timm EdgeNeXt with ``features_only=True``, and how its weights get there.

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
import logging
import os
import socket
import threading
from urllib.parse import urlparse

import timm
import torch
from torch import nn

from errors import UserError

log = logging.getLogger(__name__)

# keys of a classification checkpoint that a features_only backbone has no use for
_HEAD_PREFIXES = ("head.", "fc.", "classifier.", "norm.", "head_")
_WRAPPER_KEYS = ("state_dict", "model", "model_ema", "module")
_STRIP_PREFIXES = ("module.", "model.")


def check_backbone_name(backbone: str) -> None:
    """Only EdgeNeXt variants known to timm (optionally with a pretrained tag, ``name.tag``)."""
    known = timm.list_models("edgenext*")
    base, _, tag = backbone.partition(".")
    if base not in known:
        raise UserError(f"--backbone {backbone!r} is not supported: use one of {', '.join(known)}")
    if tag and backbone not in timm.list_models("edgenext*", pretrained=True):
        tags = ", ".join(timm.list_models(base, pretrained=True)) or "none"
        raise UserError(f"--backbone {backbone!r}: unknown pretrained tag; timm has {tags}")


class Encoder(nn.Module):
    """timm EdgeNeXt returning its four feature maps (strides 4, 8, 16, 32), shallow to deep."""

    def __init__(self, backbone: str = "edgenext_base", pretrained: bool = True,
                 pretrained_path: str | None = None, drop_path: float = 0.0):
        super().__init__()
        check_backbone_name(backbone)
        self.backbone = backbone
        kwargs = dict(features_only=True, drop_path_rate=drop_path)
        if pretrained_path:
            self.model = timm.create_model(backbone, pretrained=False, **kwargs)
            load_weights_file(self.model, pretrained_path, backbone)
        elif pretrained:
            self.model = _create_pretrained(backbone, kwargs)
        else:
            self.model = timm.create_model(backbone, pretrained=False, **kwargs)
        info = self.model.feature_info
        self.channels: list[int] = list(info.channels())
        self.reductions: list[int] = list(info.reduction())
        self.stem_modules, self.stage_modules = self._split_stages()

    def _split_stages(self) -> tuple[list[nn.Module], list[nn.Module]]:
        """The stem (everything before the first feature stage) and one module per stage.

        FeatureListNet flattens ``stages.0`` into a child named ``stages_0``; feature_info says which
        children emit features. Anything between two feature children is attached to the later one.
        """
        outs = {name.replace(".", "_") for name in self.model.feature_info.module_name()}
        stem, stages, pending = [], [], []
        for name, child in self.model.named_children():
            pending.append(child)
            if name in outs:
                if not stages and len(pending) > 1:
                    stem.extend(pending[:-1])
                    pending = pending[-1:]
                stages.append(pending[0] if len(pending) == 1 else nn.ModuleList(pending))
                pending = []
        return stem, stages

    def forward(self, x: torch.Tensor) -> list[torch.Tensor]:
        return self.model(x)


# ---------------------------------------------------------------------------------------------
# pretrained weights
# ---------------------------------------------------------------------------------------------

def _create_pretrained(backbone: str, kwargs: dict) -> nn.Module:
    cached = cached_hub_file(backbone)
    if cached is not None:
        log.info("Pretrained weights for %s from the local Hugging Face cache (%s)", backbone, cached)
        model = timm.create_model(backbone, pretrained=False, **kwargs)
        load_weights_file(model, cached, backbone)
        return model
    no_net = (f"pretrained weights for {backbone} cannot be downloaded (no network?): use "
              "--pretrained-path FILE (a .pth/.safetensors from timm) or --no-pretrained")
    if hub_offline() or not hub_reachable():
        raise UserError(no_net)
    try:
        with _quiet_hub():
            return timm.create_model(backbone, pretrained=True, **kwargs)
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
