"""CLIP's text side: prompt templates, the text tower of an open_clip backbone, text features of class
names (each template filled with each name, encoded once per backbone and cached like image features), and
the zero-shot classifier built from them.

Zero-shot weights follow PROOF's code (``models/zs_clip.py``, ``models/proof.py _eval_cnn``) and CLIP's
prompt ensembling: per class, each template's text feature is L2-normalised, the class's features are
averaged over the templates, and the mean is normalised again. Logits are
``logit_scale · norm(image) · weightsᵀ`` (``logit_scale`` = exp of the model's learnt log-scale).
"""
from __future__ import annotations

import hashlib
import json
import math
import warnings
from collections.abc import Iterable, Iterator, Sequence
from functools import lru_cache
from importlib import resources
from pathlib import Path
from typing import Optional, Union

import torch
from torch import nn
from torch.nn import functional as F

from pilot.errors import PilotError
from pilot.statefile import UnreadableState, load_state, save_state

# PROOF's template sets (zhoudw-zdw/PROOF@0bb2052, utils/templates.json), shipped as data: dataset -> templates.
TEMPLATES_PACKAGE = "pilot.data.templates"
TEMPLATES_FILE = "proof.json"
# pilot's dataset names that PROOF's file knows by another name (cifar100 is CIFAR-100 at 32 px, cifar224 at 224 px;
# ImageNet-A's classes are ImageNet classes, whose set PROOF has).
PROOF_DATASET_NAMES = {"cifar100": "cifar224", "imageneta": "imagenet"}
# A dataset that PROOF's file has no set for: its CIFAR set's first template, CLIP's plain prompt.
PLAIN_TEMPLATES = ("a photo of a {}.",)
TEMPLATES_HELP = ("Set templates to a list of prompt strings, each with one '{}' where the class name goes (e.g. "
                  "[\"a photo of a {}.\"]), or to a JSON file holding such a list; or leave it empty for the "
                  "dataset's default set (PROOF's).")
TEXT_CACHE_KIND = "pilot-text-features/1"


@lru_cache(maxsize=1)
def proof_templates() -> dict[str, list[str]]:
    """PROOF's template sets by PROOF's dataset name."""
    table = json.loads(resources.files(TEMPLATES_PACKAGE).joinpath(TEMPLATES_FILE).read_text(encoding="utf-8"))
    return {name: templates for name, templates in table.items() if not name.startswith("_")}


def default_templates(dataset: str) -> list[str]:
    """The template set PROOF's code uses for ``dataset`` (18 for CIFAR-100, 7 for ImageNet-R, 1 for CUB, ...)."""
    return list(proof_templates().get(PROOF_DATASET_NAMES.get(dataset, dataset), PLAIN_TEMPLATES))


def resolve_templates(templates: Union[str, list[str]], dataset: str) -> list[str]:
    """The config's ``templates``: a list, a JSON file holding one, or empty for the dataset's default; checked."""
    if not templates:
        return default_templates(dataset)
    source = "templates"
    if isinstance(templates, str):
        source = f"templates file '{templates}'"
        try:
            templates = json.loads(Path(templates).expanduser().read_text(encoding="utf-8"))
        except FileNotFoundError:
            raise PilotError(f"{source} not found. {TEMPLATES_HELP}") from None
        except (OSError, UnicodeDecodeError, json.JSONDecodeError) as err:
            raise PilotError(f"{source} cannot be read as JSON ({err}). {TEMPLATES_HELP}") from None
    check_templates(templates, source)
    return list(templates)


def check_templates(templates, source: str = "templates") -> None:
    if not isinstance(templates, list) or not templates:
        raise PilotError(f"{source} holds {templates!r}, not a non-empty list of templates. {TEMPLATES_HELP}")
    for index, template in enumerate(templates):
        if not isinstance(template, str) or template.count("{}") != 1:
            raise PilotError(f"{source}: entry {index} is {template!r}, which needs exactly one '{{}}' where the "
                             f"class name goes. {TEMPLATES_HELP}")
        try:
            template.format("name")
        except (IndexError, KeyError, ValueError):
            raise PilotError(f"{source}: entry {index} is {template!r}, whose other braces are not literal text; "
                             f"write them doubled ('{{{{', '}}}}'). {TEMPLATES_HELP}") from None


def is_open_clip(backbone_type: Union[str, list[str]]) -> bool:
    """Whether the config's backbone is one open_clip model (affixes ``random:`` and ``@k`` allowed)."""
    return isinstance(backbone_type, str) and backbone_type.removeprefix("random:").startswith("open_clip:")


def check_text_backbone(learner: str, backbone_type: Union[str, list[str]]) -> None:
    """A learner that reads class names through CLIP's text tower needs one open_clip backbone."""
    if not is_open_clip(backbone_type):
        raise PilotError(f"{learner} classifies through CLIP's text tower, but backbone_type {backbone_type!r} is not "
                         f"an open_clip model (a timm model has no text tower): set backbone_type to "
                         f"'open_clip:<model>:<tag>', e.g. 'open_clip:ViT-B-16:openai'.")


class TextTower:
    """An open_clip model's text side: its tokenizer, ``encode_text`` and ``logit_scale`` (the image tower is
    the backbone's). Deliberately not an ``nn.Module`` of the backbone, so the image path (what learners train,
    checkpoint and move) stays the image tower alone; it moves to the device it encodes on."""

    def __init__(self, model: nn.Module, tokenizer, vocab_size: int):
        self.model = model
        self.tokenizer = tokenizer
        self.vocab_size = vocab_size
        for name, child in model.named_children():  # the text side in eval mode for good
            if name != "visual":
                child.eval()

    def __deepcopy__(self, memo) -> "TextTower":
        """Shared, not copied, by a copy of the backbone (DER's per-task ViTs): the text side never trains there."""
        return self

    @property
    def logit_scale(self) -> torch.Tensor:
        """``exp`` of the model's learnt log-scale (a float tensor, detached)."""
        return self.model.logit_scale.detach().float().exp().cpu()

    @torch.no_grad()
    def encode(self, texts: Sequence[str], device: torch.device) -> torch.Tensor:
        """Un-normalised text features ``[len(texts), D]`` (float32, CPU)."""
        tokens = self.tokenizer(list(texts))
        if int(tokens.max()) >= self.vocab_size:
            raise PilotError(f"The text tower's vocabulary has {self.vocab_size} tokens, but its tokenizer gives ids "
                             f"up to {int(tokens.max())}: the model config's text_cfg vocab_size must cover its "
                             f"tokenizer's (49408 for CLIP's).")
        self.model.to(device)
        return self.model.encode_text(tokens.to(device)).float().cpu()


class TextFeatures:
    """Text features of prompts, each string encoded at most once per run (and, with ``cache_dir``, once per
    backbone across runs): ``key`` names the backbone (its identity: architecture and weights)."""

    def __init__(self, tower: TextTower, key: str, device: torch.device, cache_dir: Optional[str] = None):
        self.tower = tower
        self.key = f"{key}|text"
        self.device = device
        self.cache_dir = Path(cache_dir) if cache_dir else None
        self._rows: dict[str, torch.Tensor] = {}
        self.encoded_texts = 0  # strings passed through the text tower by this store
        self._merge_saved()

    def __call__(self, names: Sequence[str], templates: Sequence[str]) -> torch.Tensor:
        """``[len(names), len(templates), D]``: each template filled with each name, encoded (un-normalised)."""
        texts = [template.format(name) for name in names for template in templates]
        missing = list(dict.fromkeys(text for text in texts if text not in self._rows))
        if missing:
            self._merge_saved()
            missing = [text for text in missing if text not in self._rows]
        if missing:
            self._rows.update(zip(missing, self.tower.encode(missing, self.device)))
            self.encoded_texts += len(missing)
            self._save()
        rows = torch.stack([self._rows[text] for text in texts])
        return rows.view(len(names), len(templates), -1)

    def _cache_file(self) -> Optional[Path]:
        if self.cache_dir is None:
            return None
        return self.cache_dir / f"text-features-{hashlib.sha256(self.key.encode()).hexdigest()[:24]}.safetensors"

    def _merge_saved(self) -> None:
        path = self._cache_file()
        if path is None or not path.is_file():
            return
        try:
            saved = load_state(path, TEXT_CACHE_KIND)
        except UnreadableState as err:
            warnings.warn(f"text feature cache: {err} Its features are computed again and the file replaced.",
                          stacklevel=3)
            return
        if saved.get("key") == self.key and len(saved["texts"]) == len(saved["rows"]):
            for text, row in zip(saved["texts"], saved["rows"]):
                self._rows.setdefault(text, row)

    def _save(self) -> None:
        path = self._cache_file()
        if path is not None:
            path.parent.mkdir(parents=True, exist_ok=True)
            texts = sorted(self._rows)
            save_state(path, {"key": self.key, "texts": texts, "rows": torch.stack([self._rows[t] for t in texts])},
                       TEXT_CACHE_KIND)


def class_embeddings(rows: torch.Tensor) -> torch.Tensor:
    """``[C, T, D]`` text features -> ``[C, D]``: normalise each, average over templates, renormalise."""
    return F.normalize(F.normalize(rows, dim=-1).mean(dim=1), dim=-1)


def zero_shot_logits(image_features: torch.Tensor, weights: torch.Tensor, logit_scale: torch.Tensor) -> torch.Tensor:
    """``logit_scale · norm(image) · weightsᵀ`` (``weights`` from :func:`class_embeddings`)."""
    return logit_scale * F.normalize(image_features, dim=-1) @ weights.T


def require_text(ctx, learner: str) -> TextFeatures:
    """The run's text feature store, or a clear error where the backbone has no text tower to encode with."""
    if ctx.text_features is None:
        why = getattr(ctx.backbone, "text_missing", "") or "it is not one open_clip model"
        raise PilotError(f"{learner} classifies through CLIP's text tower, which the backbone lacks ({why}): use an "
                         f"open_clip backbone with its whole checkpoint (image and text towers), e.g. "
                         f"'open_clip:ViT-B-16:openai'.")
    return ctx.text_features


def seen_class_weights(ctx, store: TextFeatures, templates: Sequence[str]) -> torch.Tensor:
    """Zero-shot weights ``[seen classes, D]`` of the seen classes' names under ``templates``."""
    return class_embeddings(store(ctx.class_names, templates))


# Continual-CLIP's training loop, shared by the repositories built on it (ZSCL, MoE-Adapters): steps, not epochs.
def warmup_cosine_lr(base_lr: float, warmup: int, total: int, step: int) -> float:
    """``utils.cosine_lr``: ``lr·(step+1)/warmup`` during the warm-up, then ``lr·(1 + cos(π e/es))/2``."""
    if step < warmup:
        return base_lr * (step + 1) / warmup
    span = total - warmup
    return 0.5 * (1 + math.cos(math.pi * (step - warmup) / span)) * base_lr if span > 0 else base_lr


def endless(loader: Iterable) -> Iterator:
    """The loader's batches, pass after pass (each pass shuffled anew), as the code's ``iter`` on StopIteration."""
    while True:
        yield from loader
