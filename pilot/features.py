"""Features of a frozen backbone, computed at most once per image per run.

A frozen backbone maps a fixed (eval-transformed) image to a fixed vector, so the store keeps one
row per image of each part (train/test) of the source dataset and encodes only the rows it has
not seen. With ``cache_dir`` the rows also persist across runs, keyed by backbone, weights,
transform and dataset. The cache is safe with many concurrent runs (a sweep's): files are replaced
atomically, so no reader sees a torn file, and a run encodes under a lock on the file after merging
what others wrote, so each image is encoded once in all.
"""
from __future__ import annotations

import contextlib
import hashlib
import warnings
from pathlib import Path
from typing import Callable, Optional

import torch

try:
    import fcntl
except ImportError:  # not on Windows: atomic replacement still keeps every file whole
    fcntl = None

from pilot.data.stream import Split
from pilot.distributed import any_rank, is_main, rank_and_size
from pilot.outputs import remove_temporaries
from pilot.statefile import UnreadableState, load_state, save_state

CACHE_KIND = "pilot-features/1"


class FeatureStore:
    """``encode(split)`` gives the features of a split's images in split order; ``key`` names the
    encoder, its weights, the transform and the dataset (the disk cache's key)."""

    def __init__(self, encode: Callable[[Split], torch.Tensor], key: str, cache_dir: Optional[str] = None,
                 check: Callable[[Split], None] = lambda split: None):
        self.encode = encode
        self.check = check  # raises where the reader may not see the split (pilot.context.DataAccess)
        self.key = key
        self.cache_dir = Path(cache_dir) if cache_dir else None
        self._rows: dict[str, torch.Tensor] = {}
        self._known: dict[str, torch.Tensor] = {}
        self._rejected: dict[Path, tuple[int, int]] = {}  # cache files reported unusable (mtime, size): read once
        self.encoded_images = 0  # images passed through the encoder by this store

    def __call__(self, split: Split) -> torch.Tensor:
        """Features ([len(split), D], float32, CPU) of the split's images, in split order."""
        self.check(split)
        if split.part not in self._rows:
            self._merge_saved(split)
        missing = any_rank(self._missing(split))  # torchrun: encoding is collective, every rank encodes what any lacks
        solo = rank_and_size()[1] == 1
        if missing.any():
            with self._locked(split.part) if solo else contextlib.nullcontext():
                if solo:
                    self._merge_saved(split)  # another run may have encoded them meanwhile
                    missing = self._missing(split)
                if missing.any():
                    self._encode_missing(split, missing)
        return self._rows[split.part][split.indices]

    def _missing(self, split: Split) -> torch.Tensor:
        known = self._known.get(split.part)
        return torch.ones(len(split), dtype=torch.bool) if known is None else ~known[split.indices]

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
        return self.cache_dir / f"features-{digest}.safetensors"

    @contextlib.contextmanager
    def _locked(self, part: str):
        """An exclusive lock on the part's cache file while encoding (none without a cache or fcntl)."""
        path = self._cache_file(part)
        if path is None or fcntl is None:
            yield
            return
        path.parent.mkdir(parents=True, exist_ok=True)
        with open(path.with_suffix(".lock"), "a") as lock:
            fcntl.flock(lock, fcntl.LOCK_EX)
            remove_temporaries(path.parent, path.name)  # a killed writer's: only the lock holder writes the file
            try:
                yield
            finally:
                fcntl.flock(lock, fcntl.LOCK_UN)

    def _merge_saved(self, split: Split) -> None:
        """Add the rows the cache file knows and this store does not; a file that cannot be used is
        reported and left to be replaced by the rows this run encodes."""
        saved = self._read_cache(split)
        if saved is None:
            return
        if split.part not in self._rows:
            self._rows[split.part], self._known[split.part] = saved["rows"], saved["known"]
            return
        new = saved["known"] & ~self._known[split.part]
        self._rows[split.part][new] = saved["rows"][new]
        self._known[split.part] |= new

    def _read_cache(self, split: Split) -> Optional[dict]:
        path = self._cache_file(split.part)
        if path is None or not path.is_file():
            return None
        stat = path.stat()
        if self._rejected.get(path) == (stat.st_mtime_ns, stat.st_size):
            return None
        try:
            saved = load_state(path, CACHE_KIND)
        except UnreadableState as err:
            self._rejected[path] = (stat.st_mtime_ns, stat.st_size)
            warnings.warn(f"feature cache: {err} Its features are computed again and the file replaced.", stacklevel=2)
            return None
        rows, known = (saved.get("rows"), saved.get("known")) if isinstance(saved, dict) else (None, None)
        if (not isinstance(rows, torch.Tensor) or not isinstance(known, torch.Tensor) or saved.get("key") != self.key
                or rows.shape[0] != len(split.source) or known.shape != (len(split.source),) or known.dtype != torch.bool):
            self._rejected[path] = (stat.st_mtime_ns, stat.st_size)
            warnings.warn(f"feature cache: '{path}' does not hold this run's features of the {split.part} images "
                          f"(another encoder, dataset or size). They are computed again and the file replaced.",
                          stacklevel=2)
            return None
        return saved

    def _save_part(self, part: str) -> None:
        path = self._cache_file(part)
        if path is not None and is_main():
            path.parent.mkdir(parents=True, exist_ok=True)
            save_state(path, {"key": self.key, "rows": self._rows[part], "known": self._known[part]}, CACHE_KIND)


class ConcatenatedFeatures:
    """Several stores' features of the same images, each row L2-normalised per store, side by side: the
    features of a set of backbones (each keeps its own cache, so each image is encoded once per backbone)."""

    def __init__(self, stores: list[FeatureStore]):
        self.stores = stores

    def __call__(self, split: Split) -> torch.Tensor:
        return torch.cat([torch.nn.functional.normalize(store(split), dim=1) for store in self.stores], dim=1)
