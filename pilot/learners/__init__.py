"""Learner registry. Every module in this package whose name does not start with ``_`` is a learner
file, named after its ``model_name``: a new learner is one file here (a class decorated with
``@register_learner("name")``) plus a config in ``exps/``. Learners outside the package register the
same way once their module is imported.

``learner_class(name)`` imports only the file named ``name``, so a learner file that fails to import
breaks only the configs that use it (with an error naming the file and its error). A name that no
file is named after (a second name a file registers) is looked for in every file, as listing does;
listing (``learner_names``) skips a broken file with a warning naming it.

The ``_``-prefixed modules are the kit learner files build on: ``_base`` (the interface),
``_gradient`` (the gradient-training template), ``_prompt`` (prompt learners), ``_lora`` (LoRA learners), and
``_first_task_adaptation`` (adapt on the first task, then freeze)."""
from __future__ import annotations

import difflib
import importlib
import pkgutil
import traceback
import warnings

from pilot.errors import PilotError

_LEARNERS: dict[str, type] = {}


def register_learner(name: str):
    """Class decorator: make a learner available under ``model_name = name``."""

    def register(cls: type) -> type:
        if name in _LEARNERS and _LEARNERS[name] is not cls:
            raise ValueError(f"two learners registered as '{name}': {_LEARNERS[name].__qualname__} and {cls.__qualname__}")
        cls.name = name
        _LEARNERS[name] = cls
        return cls

    return register


class BrokenLearnerFile(PilotError):
    """A learner file that raised while it was imported."""


def _learner_files() -> dict[str, pkgutil.ModuleInfo]:
    """The learner files on the package's path, by module name, found without importing any."""
    return {module.name: module for module in pkgutil.iter_modules(__path__) if not module.name.startswith("_")}


def _import(module: pkgutil.ModuleInfo) -> None:
    try:
        importlib.import_module(f"{__name__}.{module.name}")
    except Exception as err:
        raise BrokenLearnerFile(f"Learner file '{_file_of(module)}' cannot be imported: {type(err).__name__}: {err}"
                                f"{_where(err)}. Fix that file, or choose another model_name.") from err


def _file_of(module: pkgutil.ModuleInfo) -> str:
    spec = module.module_finder.find_spec(f"{__name__}.{module.name}")
    return spec.origin if spec and spec.origin else module.name


def _where(err: Exception) -> str:
    """Where the error was raised: the innermost frame outside the import machinery (none for a SyntaxError,
    whose message says where)."""
    machinery = (__file__, importlib.__file__)
    frames = [frame for frame in traceback.extract_tb(err.__traceback__)
              if not frame.filename.startswith("<") and frame.filename not in machinery]
    return f" (at {frames[-1].filename}:{frames[-1].lineno})" if frames else ""


def learner_names() -> list[str]:
    """Every registered learner, importing each learner file; a broken one is skipped with a warning."""
    for module in _learner_files().values():
        try:
            _import(module)
        except BrokenLearnerFile as err:
            warnings.warn(f"{err} Its learners are left out.", stacklevel=2)
    return sorted(_LEARNERS)


def learner_class(name: str) -> type:
    """The learner registered as ``name``, importing the file named after it (or, failing that, every file)."""
    named_file = None if name in _LEARNERS else _learner_files().get(name)
    if named_file:
        _import(named_file)
    if name not in _LEARNERS and name not in learner_names():
        close = difflib.get_close_matches(name, _LEARNERS, n=1, cutoff=0.5)
        hint = f" Did you mean '{close[0]}'?" if close else ""
        raise PilotError(f"Unknown learner (model_name) '{name}'.{hint} Known learners: {', '.join(sorted(_LEARNERS))}.")
    return _LEARNERS[name]
