"""Typed run configuration, loaded from PILOT-style flat JSON.

A config file is one flat JSON object, as in LAMDA-PILOT's ``exps/*.json``. Its keys are split
between :class:`ExperimentConfig` (what every run has: data, stream, backbone, seeds, outputs) and
the learner's own dataclass (its hyperparameters, with the method's published defaults), chosen by
``model_name``. Unknown keys are errors naming the closest valid key; PILOT keys that mean nothing
here are accepted with a single warning.

This module knows no learner: ``pilot.configure`` looks the learner up and calls ``assemble_config``.
"""
from __future__ import annotations

import contextlib
import dataclasses
import difflib
import json
import os
import typing
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional, Union

from pilot.clip import check_text_backbone, resolve_templates
from pilot.data.stream import SCENARIOS
from pilot.errors import PilotError

# PILOT keys that have no meaning in this toolkit (multi-GPU device lists, model-file switches). Accepted so that PILOT configs load, with one warning.
IGNORED_PILOT_KEYS = frozenset({
    "get_original_backbone", "model_postfix",
    "freeze", "global_pool", "head_type", "drop", "drop_path", "use_simplecil", "vpt_type",
    "prompt_token_num", "tuned_epoch", "init_lr", "weight_decay", "min_lr", "optimizer",
    "scheduler", "reinit_optimizer", "batch_size", "down_sample_dim",
    # Prompt-model switches of PILOT's copied ViT files; pilot's learners fix these by method.
    "prompt_pool", "prompt_key", "use_prompt_mask", "embedding_key", "predefined_key", "use_g_prompt",
    "use_e_prompt", "use_prefix_tune_for_g_prompt", "use_prefix_tune_for_e_prompt", "same_key_value",
    "shared_prompt_key", "shared_prompt_pool",
    # L2P and DualPrompt honour it (off by default); other learners choose no prompts from a pool.
    "batchwise_prompt",
    # MOS's config lists the choices of ca_storage_efficient_method beside the key; pilot checks the value.
    "ca_storage_efficient_method_choices",
    # PILOT's der.json carries iCaRL's distillation temperature, which its DER does not read; memo.json's debug
    # switch is read nowhere in PILOT.
    "T", "debug",
})

# PILOT's learners name one setting differently (SLCA: epochs, lrate, lrate_decay): each alias is
# accepted for the learner field it names; results.json records the field's name.
# DGR's "lambda" is a Python keyword, so its field is lambda_kd.
PILOT_KEY_ALIASES = {"epochs": "tuned_epoch", "lrate": "init_lr", "lrate_decay": "lr_decay", "lambda": "lambda_kd"}


@dataclass
class ExperimentConfig:
    """Keys shared by every run. Names follow LAMDA-PILOT where the meaning is the same."""

    model_name: str = "simplecil"
    dataset: str = "cifar224"
    # "class": each task brings new classes; "domain": each task is a new domain of the same classes;
    # "task": class-incremental with the task known at test time (prediction among its classes).
    scenario: str = "class"
    # Domain streams: the domains' order by name; empty = every domain, shuffled by seed as PILOT shuffles classes.
    domain_order: list[str] = field(default_factory=list)
    # Human-readable class names in the dataset's class order: a list, or a JSON file holding one;
    # empty = the dataset's own (CIFAR's meta file, folder names, WordNet names).
    class_names: Union[str, list[str]] = ""
    # CLIP prompt templates, each with one "{}" for the class name: a list, or a JSON file holding one;
    # empty = the dataset's set in PROOF's code (18 for CIFAR-100, 7 for ImageNet-R, 1 for CUB; pilot/clip.py).
    templates: Union[str, list[str]] = ""
    prefix: str = ""
    shuffle: bool = True
    init_cls: int = 10
    increment: int = 10
    seed: list[int] = field(default_factory=lambda: [1993])
    # A list of backbones (frozen-feature learners): each one's features, L2-normalised, concatenated.
    backbone_type: Union[str, list[str]] = "vit_base_patch16_224.augreg_in21k_ft_in1k"
    # Extra timm.create_model arguments (e.g. a small img_size/depth for tests).
    backbone_args: dict = field(default_factory=dict)
    # Weights: true = the model's hub weights; false = random init (tests).
    pretrained: bool = True
    # A local weights file (timm: .safetensors/.pth/.bin; open_clip: its checkpoint). Offline use.
    pretrained_path: Optional[str] = None
    # Where datasets live; CIFAR may be the folder holding cifar-100-python[.tar.gz].
    data_path: str = field(default_factory=lambda: os.environ.get("PILOT_DATA_DIR", "./data"))
    # Local weights looked up before the hub: <weights_dir>/<model name>.safetensors (or .pth, .bin).
    weights_dir: str = field(default_factory=lambda: os.environ.get("PILOT_WEIGHTS_DIR", "./weights"))
    # Download missing data (CIFAR through torchvision) when online.
    download: bool = True
    # Training batch sizes belong to each learner's config (published defaults differ).
    eval_batch_size: int = 128
    num_workers: int = 0
    # "auto": CUDA where there is one, else the CPU; or "cpu", a GPU id as PILOT writes it ("0"), "cuda:0".
    device: list[str] = field(default_factory=lambda: ["auto"])
    # Quick runs: keep the first N train / M test images of each class (dataset order); 0 = all.
    train_per_class: int = 0
    test_per_class: int = 0
    # Stop after this many tasks; 0 = all.
    max_tasks: int = 0
    # Validation images carved per class out of each task's training images, by seed (for choosing settings
    # without test accuracy; results.json records both): a fraction, or a count per class. 0 = none (PILOT).
    val_fraction: float = 0.0
    val_per_class: int = 0
    # Synthetic dataset size (tests): classes, images per class, image side.
    synthetic_classes: int = 10
    synthetic_per_class: int = 8
    synthetic_image_size: int = 32
    # Domains of the synthetic domain dataset (dataset "synthetic_domains"): the same classes, shifted colours.
    synthetic_domains: int = 3
    # Rehearsal memory (PILOT's keys), for learners that replay exemplars: a total budget shared by every
    # class seen (memory_size), or memory_per_class each with fixed_memory; "herding" (iCaRL) or "random".
    memory_size: int = 0
    memory_per_class: int = 0
    fixed_memory: bool = False
    memory_selection: str = "herding"
    # Optional on-disk cache of frozen-backbone features; empty = in memory only.
    feature_cache_dir: str = ""
    log_dir: str = "logs"
    # Image transforms: "backbone" (its pretrained config: size, crop, mean/std) or "pilot"
    # (exactly LAMDA-PILOT's, inputs in [0, 1], to reproduce its numbers); see pilot.data.transforms.
    preprocess: str = "backbone"
    # bf16 autocast for training and inference on CUDA (ignored on the CPU, where it is slower).
    mixed_precision: bool = False
    progress: bool = True
    # Trackers beside TensorBoard (pilot.tracking), off by default: MLflow (a local store under
    # <log_dir>/mlruns unless a URI is given) and Weights & Biases.
    mlflow: bool = False
    mlflow_tracking_uri: str = ""
    wandb: bool = False
    wandb_project: str = "pilot"


def backbone_label(backbone_type: str | list[str]) -> str:
    """One name for a backbone or a set of them (``a+b``), for run directories and tables."""
    return "+".join(backbone_type) if isinstance(backbone_type, list) else backbone_type


def backbone_path_part(backbone_type: str | list[str]) -> str:
    """The backbone's label as part of a run directory's name: hub names' ``/`` and ``:`` become ``-``."""
    return backbone_label(backbone_type).replace("/", "-").replace(":", "-")


def _require_path_part(key: str, name: str) -> None:
    """``name`` becomes part of the run directory's path: it must not lead out of ``log_dir``."""
    bad = [shown for char, shown in (("/", "'/'"), ("\\", "'\\'"), ("\0", "NUL")) if char in name]
    if bad or name in (".", ".."):
        why = f"contains {' and '.join(bad)}" if bad else f"is '{name}'"
        raise PilotError(f"{key} {why} ({name!r}), but it names a folder of the run directory under log_dir: "
                         f"use a plain name, without path separators.")


@dataclass
class LearnerConfig:
    """Base of every learner's hyperparameter dataclass (one per learner, published defaults)."""


@dataclass
class RunConfig:
    experiment: ExperimentConfig
    learner: LearnerConfig
    ignored_keys: list[str] = field(default_factory=list)

    def to_flat_dict(self) -> dict[str, Any]:
        flat = dataclasses.asdict(self.experiment)
        flat.update(dataclasses.asdict(self.learner))
        return flat

    def for_seed(self, seed: int) -> "RunConfig":
        """The config of one seed's run (``seed`` stays a list, of that one seed)."""
        experiment = dataclasses.replace(self.experiment, seed=[seed])
        return RunConfig(experiment, self.learner, list(self.ignored_keys))


def field_types(cls: type) -> dict[str, Any]:
    hints = typing.get_type_hints(cls)
    return {f.name: hints[f.name] for f in dataclasses.fields(cls)}


def _type_name(tp: Any) -> str:
    return getattr(tp, "__name__", None) or str(tp).replace("typing.", "")


def coerce(key: str, value: Any, tp: Any) -> Any:
    """Check ``value`` against the annotation ``tp``; return it converted (int -> float only)."""
    origin = typing.get_origin(tp)
    args = typing.get_args(tp)
    if origin is typing.Union:  # Optional[X], or the first of several types that the value fits
        if value is None and type(None) in args:
            return None
        for option in (a for a in args if a is not type(None)):
            with contextlib.suppress(PilotError):
                return coerce(key, value, option)
        raise PilotError(f"Config key '{key}' must be {' or '.join(_type_name(a) for a in args)}, got "
                         f"{type(value).__name__} {value!r}. Fix its value in the JSON file or in --set {key}=...")
    if origin is list:
        if not isinstance(value, list):
            value = [value]  # PILOT writes "seed": 1993 as often as [1993]
        return [coerce(key, item, args[0]) for item in value]
    if tp is dict and isinstance(value, dict):
        return value
    if tp is float and isinstance(value, (int, float)) and not isinstance(value, bool):
        return float(value)
    if tp is str and isinstance(value, (int, float)) and key == "device":
        return str(value)
    if tp in (int, str, bool) and isinstance(value, tp) and not (tp is int and isinstance(value, bool)):
        return value
    raise PilotError(
        f"Config key '{key}' must be {_type_name(tp)}, got {type(value).__name__} {value!r}. "
        f"Fix its value in the JSON file or in --set {key}=..."
    )


def _build(cls: type, values: dict[str, Any]) -> Any:
    types = field_types(cls)
    return cls(**{k: coerce(k, v, types[k]) for k, v in values.items()})


def _validate_experiment(exp: ExperimentConfig) -> None:
    if exp.init_cls < 1:
        raise PilotError(f"init_cls must be at least 1 (got {exp.init_cls}): it is the number of classes in the first task.")
    if exp.increment < 1:
        raise PilotError(f"increment must be at least 1 (got {exp.increment}): it is the number of new classes per task after the first.")
    if not exp.seed:
        raise PilotError("seed must list at least one seed, e.g. \"seed\": [1993].")
    if isinstance(exp.backbone_type, list) and not exp.backbone_type:
        raise PilotError("backbone_type lists no backbone: give one name, or a list of several.")
    if exp.eval_batch_size < 1:
        raise PilotError(f"eval_batch_size must be at least 1 (got {exp.eval_batch_size}).")
    for key in ("train_per_class", "test_per_class", "max_tasks", "num_workers"):
        if getattr(exp, key) < 0:
            raise PilotError(f"{key} must be 0 (no limit) or positive (got {getattr(exp, key)}).")
    if not 0 <= exp.val_fraction < 1 or exp.val_per_class < 0 or (exp.val_fraction and exp.val_per_class):
        raise PilotError(f"val_fraction must be in [0, 1) and val_per_class at least 0, one of them set at most "
                         f"(got {exp.val_fraction} and {exp.val_per_class}): 0.1 keeps a tenth of each class's training "
                         f"images for validation.")
    for key in ("synthetic_classes", "synthetic_per_class", "synthetic_image_size", "synthetic_domains"):
        if getattr(exp, key) < 1:
            raise PilotError(f"{key} must be at least 1 (got {getattr(exp, key)}).")
    if exp.templates:
        resolve_templates(exp.templates, exp.dataset)
    for key, name in (("prefix", exp.prefix.strip()), ("dataset", exp.dataset), ("model_name", exp.model_name),
                      ("backbone_type", backbone_path_part(exp.backbone_type))):
        _require_path_part(key, name)


def _check_learner_fits(learner_cls: type, exp: ExperimentConfig) -> None:
    """The scenario is one the learner honours; memory keys for a learner that stores no exemplars are a warning."""
    name = learner_cls.name
    if exp.scenario not in SCENARIOS:
        raise PilotError(f"scenario must be one of {', '.join(SCENARIOS)}, got '{exp.scenario}'.")
    if exp.scenario not in learner_cls.scenarios:
        why = f": {learner_cls.domain_refusal}" if exp.scenario == "domain" else ""
        raise PilotError(f"{name} does not support scenario \"{exp.scenario}\"{why}. It supports "
                         f"{', '.join(learner_cls.scenarios)}; docs/learners.md lists each learner's scenarios.")
    if exp.domain_order and exp.scenario != "domain":
        raise PilotError(f"domain_order orders a domain stream, but scenario is \"{exp.scenario}\": set scenario to "
                         f"\"domain\" or remove domain_order.")
    if learner_cls.needs_text:
        check_text_backbone(name, exp.backbone_type)
    if not learner_cls.uses_memory and (exp.memory_size or exp.memory_per_class):
        warnings.warn(f"'{name}' is exemplar-free: it stores no exemplars, so memory_size ({exp.memory_size}) and "
                      f"memory_per_class ({exp.memory_per_class}) are ignored.", stacklevel=4)


def canonical_keys(values: dict[str, Any], fields: set[str], source: str) -> dict[str, Any]:
    """``values`` with PILOT's alternative names renamed to the learner's field names.

    Either name works; giving both with different values in one ``source`` is an error.
    """
    renamed = dict(values)
    for alias, name in PILOT_KEY_ALIASES.items():
        if alias not in renamed or name not in fields or alias in fields:  # a learner may use both names itself
            continue
        value = renamed.pop(alias)
        if name in renamed and renamed[name] != value:
            raise PilotError(f"{source} sets both '{alias}' ({value!r}) and '{name}' ({renamed[name]!r}), two names "
                             f"of one setting. Keep one of them.")
        renamed[name] = value
    return renamed


def assemble_config(learner_cls: type, raw: dict[str, Any], overrides: dict[str, Any]) -> RunConfig:
    """Validate the flat config file ``raw`` and the ``--set`` ``overrides`` (which win) for ``learner_cls``,
    and split them into experiment and learner configs."""
    model_name = learner_cls.name
    exp_keys = set(field_types(ExperimentConfig))
    learner_keys = set(field_types(learner_cls.config_class))
    values = {**canonical_keys(raw, learner_keys, "The config file"),
              **canonical_keys(overrides, learner_keys, "--set")}
    valid = exp_keys | learner_keys
    ignored, exp_values, learner_values = [], {}, {}
    for key, value in values.items():
        if key.startswith("_"):  # "_comment" and the like: notes for readers of the file
            continue
        if key in learner_keys:
            learner_values[key] = value
        elif key in exp_keys:
            exp_values[key] = value
        elif key in IGNORED_PILOT_KEYS:
            ignored.append(key)
        else:
            close = difflib.get_close_matches(key, sorted(valid), n=1, cutoff=0.6)
            hint = f" Did you mean '{close[0]}'?" if close else ""
            raise PilotError(
                f"Unknown config key '{key}' for learner '{model_name}'.{hint} "
                f"Valid keys: {', '.join(sorted(valid))}."
            )
    if ignored:
        warnings.warn(
            f"Ignoring PILOT config keys that have no meaning for '{model_name}' here: "
            f"{', '.join(sorted(ignored))}.", stacklevel=3,
        )
    experiment = _build(ExperimentConfig, exp_values)
    _validate_experiment(experiment)
    _check_learner_fits(learner_cls, experiment)
    learner = _build(learner_cls.config_class, learner_values)
    learner_cls.validate_config(learner)
    roles = learner_cls.backbone_roles  # a learner built on several backbones, one per role
    if roles and (not isinstance(experiment.backbone_type, list) or len(experiment.backbone_type) != len(roles)):
        raise PilotError(f"{model_name} runs on {len(roles)} backbones: set backbone_type to a list of "
                         f"{', then '.join(roles)}; got {experiment.backbone_type!r}.")
    if isinstance(experiment.backbone_type, list) and not roles and not learner_cls.frozen_features(learner):
        raise PilotError(f"backbone_type lists several backbones, whose features only a learner that keeps the "
                         f"backbone frozen can use (simplecil, linear_probe; ranpac, fecam and the aper family with "
                         f"tuned_epoch 0); '{model_name}' so configured adapts or trains the backbone. Give one "
                         f"backbone.")
    return RunConfig(experiment, learner, sorted(ignored))


def parse_override(text: str) -> tuple[str, Any]:
    """``key=value`` from ``--set``; the value is JSON when it parses as JSON, else a string."""
    if "=" not in text:
        raise PilotError(f"--set expects key=value, got '{text}'.")
    key, value = text.split("=", 1)
    try:
        return key.strip(), json.loads(value)
    except json.JSONDecodeError:
        return key.strip(), value


def parse_overrides(texts: list[str]) -> dict[str, Any]:
    """Every ``--set``; one key set twice to different values is an error, not "the last one wins"."""
    return _unique(map(parse_override, texts), "--set")


def _unique(pairs, source: str) -> dict[str, Any]:
    found: dict[str, Any] = {}
    for key, value in pairs:
        if key in found and found[key] != value:
            raise PilotError(f"{source} gives '{key}' twice, {found[key]!r} and {value!r}. Keep one of them.")
        found[key] = value
    return found


def load_raw(path: str | Path) -> dict[str, Any]:
    path = Path(path)
    if not path.is_file():
        raise PilotError(f"Config file '{path}' does not exist. Pass an existing JSON file, e.g. --config exps/simplecil.json.")
    try:
        text = path.read_text(encoding="utf-8-sig")  # a byte-order mark, as some editors write, is accepted
    except UnicodeDecodeError as err:
        byte = err.object[err.start:err.start + 1]
        raise PilotError(f"Config file '{path}' is not UTF-8 text (byte {err.start}: {byte!r}): a config must be a "
                         f"UTF-8 JSON file.") from None
    try:
        raw = json.loads(text, object_pairs_hook=lambda pairs: _unique(pairs, f"Config file '{path}'"))
    except json.JSONDecodeError as err:
        raise PilotError(f"Config file '{path}' is not valid JSON: {err}.") from None
    if not isinstance(raw, dict):
        raise PilotError(f"Config file '{path}' must hold one JSON object of key/value pairs.")
    return raw
