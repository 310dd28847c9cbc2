"""State files that loading cannot turn into code: tensors in safetensors, everything else as JSON.

A state (a learner's ``state_dict``, RNG states, metrics, a feature cache entry) is a tree of dicts,
lists, tuples, strings, numbers, ``None``, tensors and NumPy arrays. ``save_state`` writes its
tensors (arrays too) as safetensors and the rest of the tree as JSON in the safetensors header, one
file written atomically; ``load_state`` rebuilds the same tree. No pickle is involved, so a crafted
file can at worst fail to load. Floats survive exactly (JSON keeps ``repr``), NaN and infinities too.

A sha256 digest of the kind, the JSON tree and every tensor (name, dtype, shape, bytes) goes in the header
too, and loading checks it: a bit flipped on disk or a value edited by hand is refused, not used.
"""
from __future__ import annotations

import hashlib
import json
import math
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save as safetensors_bytes

from pilot.errors import PilotError
from pilot.outputs import atomic_write_bytes

MARK = "$"  # keys of the JSON tree that stand for a value JSON cannot hold; user keys with it go as item lists


class UnreadableState(PilotError):
    """A state file that is missing, truncated, damaged, foreign, or of another kind or version."""


def save_state(path: Path, state: Any, kind: str) -> None:
    """Write ``state`` to ``path`` atomically; ``kind`` (e.g. "pilot-checkpoint/2") is checked on load."""
    tensors: dict[str, torch.Tensor] = {}
    tree = json.dumps(_encode(state, tensors, set()), allow_nan=False)
    metadata = {"kind": kind, "tree": tree, "digest": _digest(kind, tree, tensors)}
    atomic_write_bytes(path, safetensors_bytes(tensors, metadata=metadata))


def load_state(path: Path, kind: str) -> Any:
    """The state saved by ``save_state`` with this ``kind``; ``UnreadableState`` naming the file otherwise."""
    path = Path(path)
    try:
        with safe_open(str(path), framework="pt") as file:
            metadata = file.metadata() or {}
            found = metadata.get("kind")
            if found != kind:
                what = f"a pilot file of kind '{found}'" if found else "not a pilot state file"
                raise UnreadableState(f"'{path}' is {what}, expected '{kind}'.")
            tensors = {name: file.get_tensor(name) for name in file.keys()}
        _verify(path, metadata, tensors)
        return _decode(json.loads(metadata["tree"]), tensors)
    except (SafetensorError, OSError, ValueError, KeyError, TypeError) as err:
        raise UnreadableState(f"'{path}' cannot be read ({type(err).__name__}: {err}): it is truncated, "
                              f"damaged or not a pilot state file.") from None


def _digest(kind: str, tree: str, tensors: dict[str, torch.Tensor]) -> str:
    """sha256 of everything the file holds; the layout, hashed first, fixes where each tensor's bytes end."""
    names = sorted(tensors)
    layout = [kind, tree, [[name, str(tensors[name].dtype), list(tensors[name].shape)] for name in names]]
    digest = hashlib.sha256(json.dumps(layout).encode())
    for name in names:
        digest.update(tensors[name].contiguous().reshape(-1).view(torch.uint8).numpy())
    return "sha256:" + digest.hexdigest()


def _verify(path: Path, metadata: dict[str, str], tensors: dict[str, torch.Tensor]) -> None:
    if "digest" not in metadata:
        raise UnreadableState(f"'{path}' has no digest of its contents: an earlier pilot version wrote it.")
    if metadata["digest"] != _digest(metadata["kind"], metadata["tree"], tensors):
        raise UnreadableState(f"'{path}' was damaged or edited after pilot wrote it: its contents no longer match "
                              f"the digest written with them.")


def _encode(value: Any, tensors: dict[str, torch.Tensor], storages: set) -> Any:
    if isinstance(value, torch.Tensor):
        return {MARK + "tensor": _store(value, tensors, storages)}
    if isinstance(value, np.ndarray):
        raw = torch.from_numpy(np.ascontiguousarray(value).view(np.uint8).reshape(-1).copy())
        return {MARK + "ndarray": _store(raw, tensors, storages), "dtype": value.dtype.str, "shape": list(value.shape)}
    if isinstance(value, np.generic):
        return _encode(value.item(), tensors, storages)
    if isinstance(value, float) and not math.isfinite(value):
        return {MARK + "float": repr(value)}
    if value is None or isinstance(value, (bool, int, float, str)):
        return value
    if isinstance(value, tuple):
        return {MARK + "tuple": [_encode(v, tensors, storages) for v in value]}
    if isinstance(value, list):
        return [_encode(v, tensors, storages) for v in value]
    if isinstance(value, dict):
        if all(isinstance(k, str) and not k.startswith(MARK) for k in value):
            return {k: _encode(v, tensors, storages) for k, v in value.items()}
        return {MARK + "items": [[_encode(k, tensors, storages), _encode(v, tensors, storages)]
                                 for k, v in value.items()]}
    raise TypeError(f"a state file holds tensors, arrays, numbers, strings, lists, tuples and dicts, not "
                    f"{type(value).__name__}: convert it in the state_dict that returns it")


def _store(tensor: torch.Tensor, tensors: dict[str, torch.Tensor], storages: set) -> str:
    """Safetensors refuses tensors that share memory (views, tied weights): such a tensor is copied."""
    tensor = tensor.detach().cpu()
    storage = tensor.untyped_storage().data_ptr()
    if storage in storages or not tensor.is_contiguous():
        tensor = tensor.clone(memory_format=torch.contiguous_format)
    storages.add(tensor.untyped_storage().data_ptr())
    name = str(len(tensors))
    tensors[name] = tensor
    return name


def _decode(tree: Any, tensors: dict[str, torch.Tensor]) -> Any:
    if isinstance(tree, list):
        return [_decode(v, tensors) for v in tree]
    if not isinstance(tree, dict):
        return tree
    if MARK + "tensor" in tree:
        return tensors[tree[MARK + "tensor"]]
    if MARK + "ndarray" in tree:
        raw = tensors[tree[MARK + "ndarray"]].numpy()
        return raw.view(np.dtype(tree["dtype"])).reshape(tree["shape"]).copy()
    if MARK + "float" in tree:
        return float(tree[MARK + "float"])
    if MARK + "tuple" in tree:
        return tuple(_decode(v, tensors) for v in tree[MARK + "tuple"])
    if MARK + "items" in tree:
        return {_hashable(_decode(k, tensors)): _decode(v, tensors) for k, v in tree[MARK + "items"]}
    return {k: _decode(v, tensors) for k, v in tree.items()}


def _hashable(key: Any) -> Any:
    return tuple(_hashable(k) for k in key) if isinstance(key, (list, tuple)) else key
