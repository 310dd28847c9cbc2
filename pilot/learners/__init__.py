"""Learner registry. Every module in this package whose name does not start with ``_`` is a learner
file, named after its ``model_name``, and is imported on first use: a new learner is one file here
(a class decorated with ``@register_learner("name")``) plus a config in ``exps/``. Learners outside
the package register the same way once their module is imported.

The ``_``-prefixed modules are the kit learner files build on: ``_base`` (the interface),
``_gradient`` (the gradient-training template), ``_prompt`` (prompt learners), and
``_first_task_adaptation`` (adapt on the first task, then freeze)."""
from __future__ import annotations

import difflib
import importlib
import pkgutil

from pilot.errors import PilotError

_LEARNERS: dict[str, type] = {}
_discovered = False


def register_learner(name: str):
    """Class decorator: make a learner available under ``model_name = name``."""

    def register(cls: type) -> type:
        if name in _LEARNERS and _LEARNERS[name] is not cls:
            raise ValueError(f"two learners registered as '{name}': {_LEARNERS[name].__qualname__} and {cls.__qualname__}")
        cls.name = name
        _LEARNERS[name] = cls
        return cls

    return register


def _discover() -> None:
    global _discovered
    if not _discovered:
        for module in pkgutil.iter_modules(__path__):
            if not module.name.startswith("_"):
                importlib.import_module(f"{__name__}.{module.name}")
        _discovered = True


def learner_names() -> list[str]:
    _discover()
    return sorted(_LEARNERS)


def learner_class(name: str) -> type:
    _discover()
    if name not in _LEARNERS:
        close = difflib.get_close_matches(name, _LEARNERS, n=1, cutoff=0.5)
        hint = f" Did you mean '{close[0]}'?" if close else ""
        raise PilotError(f"Unknown learner (model_name) '{name}'.{hint} Known learners: {', '.join(learner_names())}.")
    return _LEARNERS[name]
