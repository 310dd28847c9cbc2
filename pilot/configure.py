"""From a JSON file (or dict) and ``--set`` overrides to a validated ``RunConfig``: the one place
that looks the learner up in the registry, so ``pilot.config`` stays free of learners."""
from __future__ import annotations

from pathlib import Path
from typing import Any, Optional

from pilot.config import ExperimentConfig, RunConfig, assemble_config, load_raw, parse_overrides
from pilot.errors import PilotError
from pilot.learners import learner_class, learner_names


def build_config(raw: dict[str, Any], overrides: Optional[dict[str, Any]] = None) -> RunConfig:
    """Validate a flat PILOT-style dict; ``overrides`` (from ``--set``) replace its values."""
    overrides = overrides or {}
    model_name = {**raw, **overrides}.get("model_name", ExperimentConfig.model_name)
    if not isinstance(model_name, str):
        raise PilotError(f"Config key 'model_name' must be a string naming a learner; known: {', '.join(learner_names())}.")
    return assemble_config(learner_class(model_name), raw, overrides)


def load_config(path: str | Path, overrides: list[str] = (), fixed: Optional[dict[str, Any]] = None) -> RunConfig:
    """The config file with the ``--set`` texts ``overrides``; ``fixed`` (set by the command itself, e.g.
    ``--quiet``) wins over both."""
    return build_config(load_raw(path), {**parse_overrides(overrides), **(fixed or {})})
