"""Pre-trained image encoders: any timm model by name, or an open_clip image tower.

``backbone_type`` is a timm model name (``deit_tiny_patch16_224``, ``vit_base_patch16_224.augreg_in21k``),
one of PILOT's names (mapped below), or ``open_clip:<model>[:<pretrained tag>]``
(``open_clip:ViT-B-16:openai``). Weights come from the hub (``pretrained: true``), from a local file
(``pretrained_path``), or are random (``pretrained: false``, for tests).
"""
from __future__ import annotations

import difflib
import hashlib
from pathlib import Path
from typing import Optional

import torch
from torch import nn

from pilot.data.transforms import DataConfig
from pilot.errors import PilotError

OPEN_CLIP_PREFIX = "open_clip:"

# PILOT's backbone names -> the timm weights they loaded (timm 0.6's default tags). Method
# suffixes (_l2p, _adapter, ...) only selected PILOT's copied model files; the learner does that here.
PILOT_BACKBONES = {
    "pretrained_vit_b16_224": "vit_base_patch16_224.augreg_in21k_ft_in1k",
    "vit_base_patch16_224": "vit_base_patch16_224.augreg_in21k_ft_in1k",
    "pretrained_vit_b16_224_in21k": "vit_base_patch16_224.augreg_in21k",
    "vit_base_patch16_224_in21k": "vit_base_patch16_224.augreg_in21k",
}
PILOT_METHOD_SUFFIXES = ("_l2p", "_dualprompt", "_coda_prompt", "_adapter", "_ssf", "_vpt", "_lae", "_ease", "_mos")

WEIGHTS_HELP = (
    "Without internet, download the weights elsewhere and set \"pretrained_path\" to the local file "
    "(timm: .safetensors or .pth; open_clip: its checkpoint), or set \"pretrained\": false for random weights."
)


def resolve_backbone_name(name: str) -> str:
    """Map PILOT's backbone names to timm names; other names pass through."""
    for suffix in PILOT_METHOD_SUFFIXES:
        if name.endswith(suffix):
            name = name[: -len(suffix)]
    return PILOT_BACKBONES.get(name, name)


def file_sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


class Backbone(nn.Module):
    """An image encoder returning one feature vector per image, with its input config.

    ``model`` is the underlying network (timm's ``VisionTransformer`` for ViTs), which prompt and
    adapter modules attach to. ``identity`` names architecture and weights for feature caching.
    """

    def __init__(self, model: nn.Module, data_config: DataConfig, feature_dim: int, identity: str):
        super().__init__()
        self.model = model
        self.data_config = data_config
        self.feature_dim = feature_dim
        self.identity = identity

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.model(images)


WEIGHT_SUFFIXES = (".safetensors", ".pth", ".pt", ".bin")


def local_weights(backbone_type: str, pretrained_path: Optional[str], weights_dir: Optional[str]) -> Optional[Path]:
    """``pretrained_path`` if given (it must exist), else a file named after the model in ``weights_dir``."""
    if pretrained_path is not None:
        path = Path(pretrained_path).expanduser()
        if not path.is_file():
            raise PilotError(f"Weights file '{path}' (pretrained_path) does not exist. Point pretrained_path at the downloaded weights file.")
        return path
    if not weights_dir:
        return None
    name = backbone_type.removeprefix(OPEN_CLIP_PREFIX).replace(":", "_").replace("/", "_")
    stems = {name, name.split(".")[0]}  # with and without timm's weights tag
    candidates = [Path(weights_dir).expanduser() / f"{stem}{suffix}" for stem in sorted(stems) for suffix in WEIGHT_SUFFIXES]
    return next((c for c in candidates if c.is_file()), None)


def _weights_identity(pretrained: bool, path: Optional[Path], seed: int) -> str:
    if path is not None:
        return f"file-sha256:{file_sha256(path)}"
    return "hub" if pretrained else f"random-seed{seed}"


def _timm_backbone(name: str, pretrained: bool, path: Optional[Path], seed: int, **model_args) -> Backbone:
    import timm

    if not timm.is_model(name):
        close = difflib.get_close_matches(name, timm.list_models(), n=3, cutoff=0.6)
        hint = f" Closest timm names: {', '.join(close)}." if close else ""
        raise PilotError(
            f"Unknown backbone '{name}': not a timm model name.{hint} Use a name from "
            f"timm.list_models(), or 'open_clip:<model>:<tag>' for an open_clip image encoder."
        )
    kwargs = dict(num_classes=0, **model_args)
    if path is not None:  # the local file joins the user's overlay (input size, crop, mean/std), not replaces it
        kwargs["pretrained_cfg_overlay"] = {**model_args.get("pretrained_cfg_overlay", {}), "file": str(path)}
    try:
        model = timm.create_model(name, pretrained=pretrained or path is not None, **kwargs)
    except Exception as err:  # hub and file errors come in many types
        source = f"the file '{path}'" if path else "the model hub"
        raise PilotError(f"Could not load weights for '{name}' from {source} ({type(err).__name__}: {err}). {WEIGHTS_HELP}") from None
    cfg = model.pretrained_cfg
    # The built model's input size wins over the weights' (a test model built with img_size=32).
    img_size = getattr(getattr(model, "patch_embed", None), "img_size", None)
    data_config = DataConfig(
        size=img_size[-1] if img_size else cfg["input_size"][-1], mean=tuple(cfg["mean"]), std=tuple(cfg["std"]),
        interpolation=cfg.get("interpolation", "bicubic"), crop_pct=cfg.get("crop_pct", 0.875),
    )
    identity = f"timm:{name}:{cfg.get('tag') or ''}:{_weights_identity(pretrained, path, seed)}"
    return Backbone(model, data_config, model.num_features, identity)


def _open_clip_backbone(spec: str, pretrained: bool, path: Optional[Path], seed: int) -> Backbone:
    import open_clip

    model_name, _, tag = spec.partition(":")
    if model_name not in open_clip.list_models():
        close = difflib.get_close_matches(model_name, open_clip.list_models(), n=3, cutoff=0.5)
        hint = f" Closest open_clip models: {', '.join(close)}." if close else ""
        raise PilotError(f"Unknown open_clip model '{model_name}'.{hint} See open_clip.list_models().")
    if pretrained and path is None and not tag:
        tags = open_clip.list_pretrained_tags_by_model(model_name)
        raise PilotError(f"'{OPEN_CLIP_PREFIX}{model_name}' needs a pretrained tag, e.g. '{OPEN_CLIP_PREFIX}{model_name}:{tags[0] if tags else 'openai'}' (tags: {', '.join(tags)}).")
    weights = str(path) if path is not None else (tag if pretrained else None)
    try:
        model = open_clip.create_model(model_name, pretrained=weights, require_pretrained=weights is not None)
    except Exception as err:
        raise PilotError(f"Could not load open_clip weights '{weights}' for '{model_name}' ({type(err).__name__}: {err}). {WEIGHTS_HELP}") from None
    visual = model.visual
    cfg = open_clip.get_model_preprocess_cfg(model)
    size = cfg["size"][-1] if isinstance(cfg["size"], (tuple, list)) else cfg["size"]
    data_config = DataConfig(size=size, mean=tuple(cfg["mean"]), std=tuple(cfg["std"]),
                             interpolation=cfg.get("interpolation", "bicubic"), crop_pct=1.0)
    identity = f"open_clip:{model_name}:{tag}:{_weights_identity(pretrained, path, seed)}"
    return Backbone(visual, data_config, visual.output_dim, identity)


def create_backbone(backbone_type: str, pretrained: bool = True, pretrained_path: Optional[str] = None,
                    weights_dir: Optional[str] = None, seed: int = 0, **model_args) -> Backbone:
    """Build a backbone (see the module docstring); bad names and missing weights raise PilotError.

    Weights: ``pretrained_path``, else ``<weights_dir>/<model name>.<suffix>`` if present, else the
    hub. ``model_args`` go to ``timm.create_model`` (e.g. ``img_size`` for small test models).
    """
    if backbone_type.startswith(OPEN_CLIP_PREFIX):
        path = local_weights(backbone_type, pretrained_path, weights_dir if pretrained else None)
        return _open_clip_backbone(backbone_type[len(OPEN_CLIP_PREFIX):], pretrained, path, seed)
    name = resolve_backbone_name(backbone_type)
    path = local_weights(name, pretrained_path, weights_dir if pretrained else None)
    return _timm_backbone(name, pretrained, path, seed, **model_args)
