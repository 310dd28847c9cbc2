"""Features of a frozen backbone, computed at most once per image per run.

A frozen backbone maps a fixed (eval-transformed) image to a fixed vector, so the store keeps one
row per image of each part (train/test) of the source dataset and encodes only the rows it has
not seen. With ``cache_dir`` the rows also persist across runs, keyed by backbone, weights,
transform and dataset.
"""
from __future__ import annotations

import hashlib
from pathlib import Path
from typing import Callable, Optional

import torch

from pilot.data.stream import Split
from pilot.outputs import atomic_torch_save


class FeatureStore:
    """``encode(split)`` gives the features of a split's images in split order; ``key`` names the
    encoder, its weights, the transform and the dataset (the disk cache's key)."""

    def __init__(self, encode: Callable[[Split], torch.Tensor], key: str, cache_dir: Optional[str] = None):
        self.encode = encode
        self.key = key
        self.cache_dir = Path(cache_dir) if cache_dir else None
        self._rows: dict[str, torch.Tensor] = {}
        self._known: dict[str, torch.Tensor] = {}
        self.encoded_images = 0  # images passed through the encoder by this store

    def __call__(self, split: Split) -> torch.Tensor:
        """Features ([len(split), D], float32, CPU) of the split's images, in split order."""
        self._load_part(split)
        known = self._known.get(split.part)
        missing = torch.ones(len(split), dtype=torch.bool) if known is None else ~known[split.indices]
        if missing.any():
            self._encode_missing(split, missing)
        return self._rows[split.part][split.indices]

    def _encode_missing(self, split: Split, missing: torch.Tensor) -> None:
        keep = missing.numpy()
        todo = Split(split.part, split.source, split.indices[keep], split.labels[keep])
        features = self.encode(todo)
        if split.part not in self._rows:
            self._rows[split.part] = torch.zeros(len(split.source), features.shape[1])
            self._known[split.part] = torch.zeros(len(split.source), dtype=torch.bool)
        self._rows[split.part][todo.indices] = features
        self._known[split.part][todo.indices] = True
        self.encoded_images += len(todo)
        self._save_part(split.part)

    def _cache_file(self, part: str) -> Optional[Path]:
        if self.cache_dir is None:
            return None
        digest = hashlib.sha256(f"{self.key}|{part}".encode()).hexdigest()[:24]
        return self.cache_dir / f"features-{digest}.pt"

    def _load_part(self, split: Split) -> None:
        path = self._cache_file(split.part)
        if split.part in self._rows or path is None or not path.is_file():
            return
        saved = torch.load(path, map_location="cpu")
        if saved.get("key") == self.key and saved["rows"].shape[0] == len(split.source):
            self._rows[split.part], self._known[split.part] = saved["rows"], saved["known"]

    def _save_part(self, part: str) -> None:
        path = self._cache_file(part)
        if path is not None:
            path.parent.mkdir(parents=True, exist_ok=True)
            atomic_torch_save({"key": self.key, "rows": self._rows[part], "known": self._known[part]}, path)
