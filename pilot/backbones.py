"""Pre-trained image encoders: any timm model by name, or an open_clip image tower.

``backbone_type`` is a timm model name (``deit_tiny_patch16_224``, ``vit_base_patch16_224.augreg_in21k``),
one of PILOT's names (mapped below), or ``open_clip:<model>[:<pretrained tag>]``
(``open_clip:ViT-B-16:openai``). Weights come from the hub (``pretrained: true``), from a local file
(``pretrained_path``), or are random (``pretrained: false``, for tests). Two affixes make variants:
``random:<name>`` is that architecture randomly initialised (the baseline a pre-trained model must
beat), and ``<name>@<k>`` keeps its first k transformer blocks (the features of an intermediate block,
through the model's final norm and pooling). A list of backbones is a :class:`BackboneSet`.

A local weights file must fit the backbone exactly, after timm's or open_clip's own conversion of it
(position embeddings resized to ``img_size``, foreign formats mapped): only the classifier head, or an
open_clip model's text side, may be missing or extra, as features do not depend on them.
"""
from __future__ import annotations

import contextlib
import difflib
import functools
import json
import os
import socket
import urllib.parse
import urllib.request
from pathlib import Path
from typing import Optional
from unittest import mock

import torch
from torch import nn

from pilot.clip import TextTower
from pilot.data.transforms import DataConfig
from pilot.digests import files_sha256
from pilot.errors import PilotError

OPEN_CLIP_PREFIX = "open_clip:"
RANDOM_PREFIX = "random:"
BLOCKS_MARK = "@"

# PILOT's backbone names -> the timm weights they loaded (timm 0.6's default tags). Method
# suffixes (_l2p, _adapter, ...) only selected PILOT's copied model files; the learner does that here.
PILOT_BACKBONES = {
    "pretrained_vit_b16_224": "vit_base_patch16_224.augreg_in21k_ft_in1k",
    "vit_base_patch16_224": "vit_base_patch16_224.augreg_in21k_ft_in1k",
    "pretrained_vit_b16_224_in21k": "vit_base_patch16_224.augreg_in21k",
    "vit_base_patch16_224_in21k": "vit_base_patch16_224.augreg_in21k",
}
PILOT_METHOD_SUFFIXES = ("_l2p", "_dualprompt", "_coda_prompt", "_adapter", "_ssf", "_vpt", "_lae", "_ease", "_mos", "_memo",
                         "_tuna")

WEIGHTS_HELP = (
    "Without internet, download the weights elsewhere and set \"pretrained_path\" to the local file "
    "(timm: .safetensors or .pth; open_clip: its checkpoint), or set \"pretrained\": false for random weights."
)
WEIGHTS_DIR_ENV = "PILOT_WEIGHTS_DIR"
# One connection attempt tells whether the hub is reachable; huggingface_hub itself retries for about a minute.
HUB_PROBE_SECONDS = 5.0


def resolve_backbone_name(name: str) -> str:
    """Map PILOT's backbone names to timm names; other names pass through."""
    for suffix in PILOT_METHOD_SUFFIXES:
        if name.endswith(suffix):
            name = name[: -len(suffix)]
    return PILOT_BACKBONES.get(name, name)


class Backbone(nn.Module):
    """An image encoder returning one feature vector per image, with its input config.

    ``model`` is the underlying network (timm's ``VisionTransformer`` for ViTs), which prompt and
    adapter modules attach to. ``identity`` names all that its features depend on (see :func:`_identity`):
    the feature cache's key, and what results.json records.
    """

    def __init__(self, model: nn.Module, data_config: DataConfig, feature_dim: int, identity: str,
                 text: Optional[TextTower] = None, text_missing: str = "it is a timm model"):
        super().__init__()
        self.model = model
        self.data_config = data_config
        self.feature_dim = feature_dim
        self.identity = identity
        # An open_clip model's text side (tokenizer, text tower, logit_scale); None, and why, where there is none.
        self.text = text
        self.text_missing = "" if text is not None else text_missing

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
    candidates = [Path(weights_dir).expanduser() / f"{stem}{suffix}" for stem in sorted(_weights_stems(backbone_type))
                  for suffix in WEIGHT_SUFFIXES]
    return next((c for c in candidates if c.is_file()), None)


def _weights_stems(backbone_type: str) -> list[str]:
    """The file names (without suffix) a model's weights may have in weights_dir: the full name first, then
    the name without timm's weights tag."""
    name = backbone_type.removeprefix(OPEN_CLIP_PREFIX).replace(":", "_").replace("/", "_")
    return list(dict.fromkeys([name, name.split(".")[0]]))


def _hub_out_of_reach() -> bool:
    """HF_HUB_OFFLINE is set, or one connection to the hub (or the proxy to it) fails."""
    import huggingface_hub.constants as hub

    if hub.HF_HUB_OFFLINE or os.environ.get("HF_HUB_OFFLINE", "").upper() in ("1", "ON", "YES", "TRUE"):
        return True
    url = urllib.parse.urlsplit(hub.ENDPOINT)
    proxy = urllib.request.getproxies().get(url.scheme)
    if proxy and not urllib.request.proxy_bypass(url.hostname or ""):
        url = urllib.parse.urlsplit(proxy if "://" in proxy else f"http://{proxy}")
    try:
        socket.create_connection((url.hostname, url.port or (443 if url.scheme == "https" else 80)),
                                 timeout=HUB_PROBE_SECONDS).close()
    except (OSError, ValueError):
        return True
    return False


@contextlib.contextmanager
def _hub_downloads(needed: bool):
    """Inside, a hub out of reach is offline for huggingface_hub: weights come from its cache or fail at once,
    instead of after its retries. Yields whether the hub is out of reach."""
    import huggingface_hub.constants as hub

    out_of_reach = needed and _hub_out_of_reach()
    with mock.patch.object(hub, "HF_HUB_OFFLINE", True) if out_of_reach else contextlib.nullcontext():
        yield out_of_reach


def hub_failure(subject: str, backbone_type: str, weights_dir: Optional[str], out_of_reach: bool, err: Exception) -> str:
    """Why the hub gave no ``subject`` ("weights for 'name'"), the local file looked for instead, and the ways out."""
    why = ("the model hub cannot be reached (HF_HUB_OFFLINE is set, or one connection attempt failed) and its cache "
           "does not hold them" if out_of_reach else f"the model hub failed ({type(err).__name__}: {err})")
    stems = _weights_stems(backbone_type)
    if weights_dir:
        others = "nor the same name with .pth, .pt or .bin" + (f", nor '{stems[1]}.*' without the weights tag"
                                                               if len(stems) > 1 else "")
        local = (f"no local file '{Path(weights_dir).expanduser() / stems[0]}.safetensors' ({others}) in weights_dir "
                 f"(default ${WEIGHTS_DIR_ENV}, else ./weights)")
    else:
        local = f"no weights_dir to look in (set it, or ${WEIGHTS_DIR_ENV}, to a folder)"
    return (f"Could not load {subject}: {why}, and there is {local}. Put the weights file there or point "
            f"{WEIGHTS_DIR_ENV} at its folder, set \"pretrained_path\" to the file, or set \"pretrained\": false "
            f"for random weights.")


def _identity(architecture: str, model_args: dict, pretrained: bool, path: Optional[Path], seed: int, tag: str) -> str:
    """Architecture, its backbone_args (canonical JSON) and weights: the file's content, the hub tag, or the
    seed of a random init (``create_backbone`` appends ``@k``). Strict loading makes the file all of the weights."""
    args = json.dumps(model_args, sort_keys=True, separators=(",", ":"))
    if path is not None:
        weights = f"file-sha256:{files_sha256([path])}"
    else:
        weights = f"hub:{tag}" if pretrained else f"random-seed{seed}"
    return f"{architecture}:{args}:{weights}"


def _check_fit(path: Path, name: str, module: nn.Module, state_dict: dict, prefix: str, *_) -> None:
    """A load_state_dict pre-hook: the tensors under ``prefix`` must be ``module``'s, shape for shape."""
    expected = {prefix + key: tuple(value.shape) for key, value in module.state_dict().items()}
    given = {key: tuple(value.shape) for key, value in state_dict.items() if key.startswith(prefix)}
    misshaped = [f"{key} (file {given[key]}, model {expected[key]})"
                 for key in sorted(expected.keys() & given.keys()) if given[key] != expected[key]]
    problems = [_listing("backbone tensor(s) missing from the file", sorted(expected.keys() - given.keys())),
                _listing("tensor(s) in the file that the backbone lacks", sorted(given.keys() - expected.keys())),
                _listing("tensor(s) of another shape", misshaped)]
    if any(problems):
        raise PilotError(f"Weights file '{path}' does not fit backbone '{name}': {'; '.join(filter(None, problems))}. "
                         f"The file is for another architecture (or incomplete): set backbone_type (and "
                         f"backbone_args) to the model it was saved from, or give the file of '{name}'.")


def _listing(what: str, items: list[str], shown: int = 5) -> str:
    """'3 <what>: a, b, c', the first few of many; empty for none."""
    more = f" and {len(items) - shown} more" if len(items) > shown else ""
    return f"{len(items)} {what}: {', '.join(items[:shown])}{more}" if items else ""


@contextlib.contextmanager
def _strictly_into(module: nn.Module, path: Path, name: str):
    """Inside, loading a state dict into ``module`` (or a model containing it) checks it with :func:`_check_fit`."""
    handle = module.register_load_state_dict_pre_hook(functools.partial(_check_fit, path, name))
    try:
        yield
    finally:
        handle.remove()


def _strict_timm_file(path: Path, name: str):
    """timm loads a file leniently whenever the head is replaced (``num_classes=0``): check what it finally
    loads, after its model's checkpoint filter, input-conv adaptation and head removal."""
    from timm.models import _builder

    load_pretrained = _builder.load_pretrained

    def checked(model, *args, **kwargs):
        with _strictly_into(model, path, name):
            load_pretrained(model, *args, **kwargs)

    return mock.patch.object(_builder, "load_pretrained", checked)


def _timm_model(name: str, pretrained: bool, path: Optional[Path], weights_dir: Optional[str] = None,
                **kwargs) -> nn.Module:
    import timm

    if not timm.is_model(name):
        close = difflib.get_close_matches(name, timm.list_models(), n=3, cutoff=0.6)
        hint = f" Closest timm names: {', '.join(close)}." if close else ""
        raise PilotError(
            f"Unknown backbone '{name}': not a timm model name.{hint} Use a name from "
            f"timm.list_models(), or 'open_clip:<model>:<tag>' for an open_clip image encoder."
        )
    if path is not None:  # the local file joins the user's overlay (input size, crop, mean/std), not replaces it
        kwargs["pretrained_cfg_overlay"] = {**kwargs.get("pretrained_cfg_overlay", {}), "file": str(path)}
    with _hub_downloads(pretrained and path is None) as out_of_reach:
        try:
            with _strict_timm_file(path, name) if path is not None else contextlib.nullcontext():
                return timm.create_model(name, pretrained=pretrained or path is not None, **kwargs)
        except PilotError:
            raise
        except Exception as err:  # hub, file and model-argument errors come in many types
            if path is not None:
                raise PilotError(f"Could not load weights for '{name}' from the file '{path}' ({type(err).__name__}: "
                                 f"{err}). {WEIGHTS_HELP}") from None
            if pretrained:
                raise PilotError(hub_failure(f"weights for '{name}'", name, weights_dir, out_of_reach, err)) from None
            raise PilotError(f"Could not build '{name}' ({type(err).__name__}: {err}): check backbone_args.") from None


def _timm_backbone(name: str, pretrained: bool, path: Optional[Path], seed: int, weights_dir: Optional[str],
                   **model_args) -> Backbone:
    model = _timm_model(name, pretrained, path, weights_dir, num_classes=0, **model_args)
    cfg = model.pretrained_cfg
    # The built model's input size wins over the weights' (a test model built with img_size=32).
    img_size = getattr(getattr(model, "patch_embed", None), "img_size", None)
    data_config = DataConfig(
        size=img_size[-1] if img_size else cfg["input_size"][-1], mean=tuple(cfg["mean"]), std=tuple(cfg["std"]),
        interpolation=cfg.get("interpolation", "bicubic"), crop_pct=cfg.get("crop_pct", 0.875),
    )
    identity = _identity(f"timm:{name}", model_args, pretrained, path, seed, cfg.get("tag") or "")
    return Backbone(model, data_config, model.num_features, identity)


def _open_clip_name(model_name: str) -> tuple[str, dict]:
    """An open_clip model name, or the path of a model config JSON file (open_clip's format: embed_dim,
    vision_cfg, text_cfg), registered under its file name's stem; with the config that names the architecture."""
    import open_clip

    if not model_name.endswith(".json"):
        return model_name, {}
    path = Path(model_name).expanduser()
    try:
        config = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as err:
        raise PilotError(f"open_clip model config '{path}' cannot be read as JSON ({err}): give an open_clip model "
                         f"name (open_clip.list_models()) or a JSON file with embed_dim, vision_cfg and text_cfg.") from None
    if not isinstance(config, dict) or not {"embed_dim", "vision_cfg", "text_cfg"} <= config.keys():
        raise PilotError(f"open_clip model config '{path}' needs the keys embed_dim, vision_cfg and text_cfg "
                         f"(open_clip's model config format).")
    open_clip.add_model_config(path)
    return path.stem, config


def _open_clip_backbone(spec: str, pretrained: bool, path: Optional[Path], seed: int,
                        weights_dir: Optional[str]) -> Backbone:
    import open_clip

    model_name, _, tag = spec.partition(":")
    model_name, architecture = _open_clip_name(model_name)
    if model_name not in open_clip.list_models():
        close = difflib.get_close_matches(model_name, open_clip.list_models(), n=3, cutoff=0.5)
        hint = f" Closest open_clip models: {', '.join(close)}." if close else ""
        raise PilotError(f"Unknown open_clip model '{model_name}'.{hint} See open_clip.list_models().")
    tags = open_clip.list_pretrained_tags_by_model(model_name)
    if pretrained and path is None and not tag:
        raise PilotError(f"'{OPEN_CLIP_PREFIX}{model_name}' needs a pretrained tag, e.g. '{OPEN_CLIP_PREFIX}{model_name}:{tags[0] if tags else 'openai'}' (tags: {', '.join(tags)}).")
    if pretrained and path is None and tag not in tags:
        raise PilotError(f"open_clip has no pretrained tag '{tag}' for '{model_name}' (tags: {', '.join(tags) or 'none'}).")
    hub = tag if pretrained and path is None else None
    text_missing = ""
    with _hub_downloads(hub is not None) as out_of_reach:
        try:
            model = open_clip.create_model(model_name, pretrained=hub, require_pretrained=hub is not None)
            if path is not None:  # only the image tower need fit: its features ignore the text side
                with _strictly_into(model.visual, path, OPEN_CLIP_PREFIX + spec):
                    loaded = open_clip.load_checkpoint(model, str(path), strict=False)
                absent = [key for key in loaded.missing_keys if not key.startswith("visual.")]
                if absent:
                    text_missing = _listing(f"text-side tensor(s) missing from the weights file '{path}'", absent)
        except PilotError:
            raise
        except Exception as err:
            if hub is not None:
                raise PilotError(hub_failure(f"open_clip weights '{tag}' for '{model_name}'", OPEN_CLIP_PREFIX + spec,
                                             weights_dir, out_of_reach, err)) from None
            if path is None:
                raise
            raise PilotError(f"Could not load open_clip weights '{path}' for '{model_name}' "
                             f"({type(err).__name__}: {err}). {WEIGHTS_HELP}") from None
    visual = model.visual
    cfg = open_clip.get_model_preprocess_cfg(model)
    size = cfg["size"][-1] if isinstance(cfg["size"], (tuple, list)) else cfg["size"]
    data_config = DataConfig(size=size, mean=tuple(cfg["mean"]), std=tuple(cfg["std"]),
                             interpolation=cfg.get("interpolation", "bicubic"), crop_pct=1.0)
    # backbone_args do not reach open_clip, so they are no part of its identity; a config file's content is
    identity = _identity(f"open_clip:{model_name}", architecture, pretrained, path, seed, tag)
    text = None
    if not text_missing:
        vocab_size = open_clip.get_model_config(model_name)["text_cfg"].get("vocab_size", 49408)
        text = TextTower(model, open_clip.get_tokenizer(model_name), vocab_size)
    return Backbone(visual, data_config, visual.output_dim, identity, text, text_missing)


class BackboneSet(nn.Module):
    """Several backbones for the frozen-feature learners: each keeps its own weights, preprocessing
    and feature cache; the run's features are theirs, each L2-normalised, side by side."""

    def __init__(self, members: list[Backbone]):
        super().__init__()
        self.members = nn.ModuleList(members)
        self.data_config = members[0].data_config
        self.feature_dim = sum(member.feature_dim for member in members)
        self.identity = " + ".join(member.identity for member in members)

    @property
    def model(self) -> nn.Module:
        """No single network that prompts or adapters could attach to: the set itself."""
        return self


@contextlib.contextmanager
def _seeded(seed: int):
    """Torch's global generator seeded with ``seed`` inside the block, and as it was after it."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        yield


def parse_backbone(spec: str) -> tuple[str, bool, int]:
    """``random:<name>@<k>`` -> (name, randomly initialised, blocks kept; 0 = all)."""
    random_init = spec.startswith(RANDOM_PREFIX)
    name = spec.removeprefix(RANDOM_PREFIX)
    blocks = 0
    if BLOCKS_MARK in name:
        name, _, count = name.rpartition(BLOCKS_MARK)
        if not count.isdigit() or int(count) < 1:
            raise PilotError(f"Backbone '{spec}': after '{BLOCKS_MARK}' give how many blocks to keep, e.g. '{name}@6'.")
        blocks = int(count)
    return name, random_init, blocks


def keep_blocks(model: nn.Module, blocks: int, spec: str) -> None:
    """Truncate a timm ViT (``blocks``) or an open_clip tower (``transformer.resblocks``) to its first blocks."""
    owner, attribute = (model, "blocks") if hasattr(model, "blocks") else (getattr(model, "transformer", None), "resblocks")
    stack = getattr(owner, attribute, None)
    if stack is None:
        raise PilotError(f"Backbone '{spec}': '{BLOCKS_MARK}<k>' needs a transformer with a stack of blocks "
                         f"(a timm ViT or an open_clip ViT tower), which {type(model).__name__} is not.")
    if blocks > len(stack):
        raise PilotError(f"Backbone '{spec}' keeps {blocks} blocks, but the model has {len(stack)}.")
    setattr(owner, attribute, stack[:blocks])


def source_classifier(backbone_type: str, pretrained: bool = True, weights_dir: Optional[str] = None, seed: int = 0,
                      **model_args) -> Optional[nn.Module]:
    """The classifier head that a timm backbone's weights were trained with (its source task, for LEEP);
    None for an open_clip tower, which has none. Built as a separate model, so the backbone's own
    random draws stay those of its identity."""
    name, random_init, _ = parse_backbone(backbone_type)
    if name.startswith(OPEN_CLIP_PREFIX):
        return None
    name = resolve_backbone_name(name)
    pretrained = pretrained and not random_init
    with contextlib.nullcontext() if pretrained else _seeded(seed):
        model = _timm_model(name, pretrained, local_weights(name, None, weights_dir if pretrained else None),
                            weights_dir, **model_args)
    head = model.get_classifier()
    return head.eval() if isinstance(head, nn.Linear) else None


def create_backbone(backbone_type: str | list[str], pretrained: bool = True, pretrained_path: Optional[str] = None,
                    weights_dir: Optional[str] = None, seed: int = 0, **model_args) -> Backbone | BackboneSet:
    """Build a backbone (see the module docstring); bad names and missing weights raise PilotError.

    Weights: ``pretrained_path``, else ``<weights_dir>/<model name>.<suffix>`` if present, else the
    hub. ``model_args`` go to ``timm.create_model`` (e.g. ``img_size`` for small test models). A list
    builds a :class:`BackboneSet` (``pretrained_path`` then names no single file and must be unset).
    """
    if isinstance(backbone_type, list):
        if pretrained_path is not None:
            raise PilotError("pretrained_path names one weights file, but backbone_type lists several backbones: put "
                             "each one's weights in weights_dir as <model name>.safetensors instead.")
        return BackboneSet([create_backbone(spec, pretrained, None, weights_dir, seed, **model_args)
                            for spec in backbone_type])
    name, random_init, blocks = parse_backbone(backbone_type)
    pretrained = pretrained and not random_init
    # Random weights are drawn from ``seed`` alone, so that they are what their identity says (also in a set).
    with contextlib.nullcontext() if pretrained else _seeded(seed):
        if name.startswith(OPEN_CLIP_PREFIX):
            path = local_weights(name, pretrained_path, weights_dir if pretrained else None)
            backbone = _open_clip_backbone(name[len(OPEN_CLIP_PREFIX):], pretrained, path, seed, weights_dir)
        else:
            name = resolve_backbone_name(name)
            path = local_weights(name, pretrained_path, weights_dir if pretrained else None)
            backbone = _timm_backbone(name, pretrained, path, seed, weights_dir, **model_args)
    if blocks:
        keep_blocks(backbone.model, blocks, backbone_type)
        backbone.identity += f"{BLOCKS_MARK}{blocks}"
    return backbone
