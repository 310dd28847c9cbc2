"""Features of a frozen backbone, computed at most once per image per run.

A frozen backbone maps a fixed (eval-transformed) image to a fixed vector, so the store keeps one
row per image of each part (train/test) of the source dataset and encodes only the rows it has
not seen. With ``cache_dir`` the rows also persist across runs, in one file per backbone, weights,
transform, dataset location and part, each row kept under its image's identity (``row_ids``, from
the dataset's manifest): a changed image file is encoded again, the others' rows stay usable. The
cache is safe with many concurrent runs (a sweep's): files are replaced atomically, so no reader
sees a torn file, and a run encodes under a lock on the file after merging what others wrote, so
each image is encoded once in all.
"""
from __future__ import annotations

import contextlib
import hashlib
import warnings
from pathlib import Path
from typing import Callable, Optional

import numpy as np
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
    encoder, its weights, the transform and where the dataset is (the disk cache's key); ``row_ids(part)``
    each image's identity in the part (``Manifest.row_ids``); ``width``, where known, the encoder's feature size."""

    def __init__(self, encode: Callable[[Split], torch.Tensor], key: str, row_ids: Callable[[str], np.ndarray],
                 cache_dir: Optional[str] = None, check: Callable[[Split], None] = lambda split: None,
                 width: Optional[int] = None):
        self.encode = encode
        self.check = check  # raises where the reader may not see the split (pilot.context.DataAccess)
        self.key = key
        self.row_ids = row_ids
        self.width = width
        self.cache_dir = Path(cache_dir) if cache_dir else None
        self._ids: dict[str, np.ndarray] = {}
        self._rows: dict[str, torch.Tensor] = {}
        self._known: dict[str, torch.Tensor] = {}
        self._rejected: dict[Path, tuple[int, int]] = {}  # cache files reported unusable (mtime, size): read once
        self.encoded_images = 0  # images passed through the encoder by this store

    def __call__(self, split: Split) -> torch.Tensor:
        """Features ([len(split), D], float32, CPU) of the split's images, in split order."""
        self.check(split)
        if split.part not in self._rows:
            self._merge_saved(split.part)
        missing = any_rank(self._missing(split))  # torchrun: encoding is collective, every rank encodes what any lacks
        solo = rank_and_size()[1] == 1
        if missing.any():
            with self._locked(split.part) if solo else contextlib.nullcontext():
                if solo:
                    self._merge_saved(split.part)  # another run may have encoded them meanwhile
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
        self.width = self.width or features.shape[1]  # checks the cache files read from now on
        rows, known = self._part(split.part, features.shape[1])
        rows[todo.indices] = features
        known[todo.indices] = True
        self.encoded_images += len(todo)
        self._save_part(split.part)

    def _part_ids(self, part: str) -> np.ndarray:
        if part not in self._ids:
            self._ids[part] = self.row_ids(part)
        return self._ids[part]

    def _part(self, part: str, width: int) -> tuple[torch.Tensor, torch.Tensor]:
        """The part's rows and which are known, made empty on first use."""
        if part not in self._rows:
            size = len(self._part_ids(part))
            self._rows[part], self._known[part] = torch.zeros(size, width), torch.zeros(size, dtype=torch.bool)
        return self._rows[part], self._known[part]

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

    def _merge_saved(self, part: str) -> None:
        """Add the rows the cache file knows, of images unchanged since, that this store does not; a file
        that cannot be used is reported and left to be replaced by the rows this run encodes."""
        saved = self._read_cache(part)
        if saved is None:
            return
        here, there = (torch.from_numpy(rows) for rows in same_images(self._part_ids(part), saved["ids"],
                                                                        saved["known"].numpy()))
        rows, known = self._part(part, saved["rows"].shape[1])
        new = ~known[here]
        rows[here[new]] = saved["rows"][there[new]]
        known[here[new]] = True

    def _read_cache(self, part: str) -> Optional[dict]:
        path = self._cache_file(part)
        if path is None or not path.is_file():
            return None
        stat = path.stat()
        if self._rejected.get(path) == (stat.st_mtime_ns, stat.st_size):
            return None
        try:
            saved = load_state(path, CACHE_KIND)
        except UnreadableState as err:
            return self._reject(path, stat, f"{err}")
        if not (_well_formed(saved) and saved.get("key") == f"{self.key}|{part}"):
            return self._reject(path, stat, f"'{path}' does not hold this run's features of the {part} images "
                                            f"(another encoder or dataset).")
        width = saved["rows"].shape[1]
        if self.width is not None and width != self.width:
            return self._reject(path, stat, f"'{path}' holds {part} features of width {width}, but the encoder "
                                            f"gives {self.width}.")
        return saved

    def _reject(self, path: Path, stat, reason: str) -> None:
        """Report an unusable cache file, once while it stays as it is."""
        self._rejected[path] = (stat.st_mtime_ns, stat.st_size)
        warnings.warn(f"feature cache: {reason} Its features are computed again and the file replaced.", stacklevel=3)

    def _save_part(self, part: str) -> None:
        path = self._cache_file(part)
        if path is not None and is_main():
            path.parent.mkdir(parents=True, exist_ok=True)
            save_state(path, {"key": f"{self.key}|{part}", "rows": self._rows[part], "known": self._known[part],
                              "ids": self._part_ids(part)}, CACHE_KIND)


def _well_formed(saved) -> bool:
    """A cache file's state: rows [N, D], which of them are known [N], and each row's image identity [N]."""
    if not isinstance(saved, dict):
        return False
    rows, known, ids = saved.get("rows"), saved.get("known"), saved.get("ids")
    return (isinstance(rows, torch.Tensor) and rows.dim() == 2 and isinstance(known, torch.Tensor)
            and known.dtype == torch.bool and isinstance(ids, np.ndarray) and ids.dtype == np.uint64
            and known.shape == ids.shape == rows.shape[:1])


def same_images(ids: np.ndarray, saved_ids: np.ndarray, saved_known: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Positions in ``ids`` and in the saved rows of the images both hold, where the saved row is known."""
    known = np.flatnonzero(saved_known)
    order = known[np.argsort(saved_ids[known], kind="stable")]
    if not len(order):
        return np.zeros(0, dtype=np.int64), np.zeros(0, dtype=np.int64)
    slots = np.minimum(np.searchsorted(saved_ids[order], ids), len(order) - 1)
    here = np.flatnonzero(saved_ids[order[slots]] == ids)
    return here, order[slots[here]]


class ConcatenatedFeatures:
    """Several stores' features of the same images, each row L2-normalised per store, side by side: the
    features of a set of backbones (each keeps its own cache, so each image is encoded once per backbone)."""

    def __init__(self, stores: list[FeatureStore]):
        self.stores = stores

    def __call__(self, split: Split) -> torch.Tensor:
        return torch.cat([torch.nn.functional.normalize(store(split), dim=1) for store in self.stores], dim=1)
