"""Human-readable class names: what a folder's name says, for people and for CLIP's text tower."""
from __future__ import annotations

import dataclasses
import json
import re
import unicodedata
from functools import lru_cache
from importlib import resources
from pathlib import Path
from typing import TYPE_CHECKING, Any, Union

from pilot.errors import PilotError

if TYPE_CHECKING:
    from pilot.data.datasets import SourceDataset

# ImageNet-style folders (ImageNet-R, ImageNet-A) are named by WordNet id.
WORDNET_ID = re.compile(r"n\d{8}")
# The 1000 ImageNet-1k synsets' English names: each synset's first WordNet lemma (from timm's
# imagenet_synset_to_lemma.txt), "crane bird"/"construction crane"/"tank suit" where two shared one.
IMAGENET_NAMES_FILE = "imagenet_class_names.json"


def same_form(name: str) -> str:
    """``name`` in Unicode NFC: a folder copied from macOS spells "é" as "e" + an accent (NFD), which
    must still name the same class."""
    return unicodedata.normalize("NFC", name)


def readable_name(name: str) -> str:
    """A class identifier as words: underscores become spaces ("aquarium_fish" -> "aquarium fish")."""
    return name.replace("_", " ")


@lru_cache(maxsize=1)
def imagenet_names() -> dict[str, str]:
    """WordNet id -> English name for the ImageNet-1k synsets, from the table shipped in the package."""
    return json.loads(resources.files(__package__).joinpath(IMAGENET_NAMES_FILE).read_text(encoding="utf-8"))


def folder_class_name(folder: str) -> str:
    """A class folder's name as words: a WordNet id's English name (an unknown id stays as it is),
    otherwise the folder name with underscores as spaces."""
    if WORDNET_ID.fullmatch(folder):
        return imagenet_names().get(folder, folder)
    return readable_name(same_form(folder))


# ------------------------------------------------------------------------ the class_names key

HOW_TO_FIX = ("Set class_names to a list of one non-empty, distinct name per class in the dataset's own class "
              "order (before the stream's shuffle), or to a JSON file holding that list; or leave it empty.")


def apply_class_names(dataset: SourceDataset, class_names: Union[list[str], str]) -> SourceDataset:
    """``dataset`` named by the config's ``class_names`` (a list, or the path of a JSON file holding
    one) in place of its own names; ``dataset`` itself when the key is empty."""
    if not class_names:
        return dataset
    if isinstance(class_names, str):
        names, source = _read_names_file(Path(class_names).expanduser()), f"class_names file '{class_names}'"
    else:
        names, source = class_names, "class_names"
    _check_names(names, dataset, source)
    return dataclasses.replace(dataset, class_names=[same_form(name) for name in names])


def _read_names_file(path: Path) -> Any:
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise PilotError(f"class_names file '{path}' not found. {HOW_TO_FIX}") from None
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as err:
        raise PilotError(f"class_names file '{path}' cannot be read as JSON ({err}). {HOW_TO_FIX}") from None


def _check_names(names: Any, dataset: SourceDataset, source: str) -> None:
    if not isinstance(names, list):
        raise PilotError(f"{source} holds a {type(names).__name__}, not a list of names. {HOW_TO_FIX}")
    for index, name in enumerate(names):
        if not isinstance(name, str) or not name.strip():
            raise PilotError(f"{source}: entry {index} is {name!r}, not a non-empty string. {HOW_TO_FIX}")
    if len(names) != dataset.num_classes:
        raise PilotError(f"{source} lists {len(names)} names but {dataset.name} has {dataset.num_classes} classes. "
                         f"{HOW_TO_FIX}")
    first = {}
    for index, name in enumerate(map(same_form, names)):
        if name in first:
            raise PilotError(f"{source} names '{name}' twice (entries {first[name]} and {index}): each class needs "
                             f"its own name. {HOW_TO_FIX}")
        first[name] = index
