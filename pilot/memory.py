"""Rehearsal memory: the exemplars a learner replays, kept as indices into the training source.

Matches LAMDA-PILOT's ``models/base.py`` (commit 5240714), which learners call after each task as
``build_rehearsal_memory(data_manager, self.samples_per_class)``:

- Budget: ``samples_per_class`` is ``memory_per_class`` with ``fixed_memory``, else
  ``memory_size // self._total_classes``; it is called after ``incremental_train`` has set
  ``_total_classes = _known_classes + task size``, so it divides by the classes seen *including*
  this task's (``num_seen`` here), not by the known (old) ones.
- Order: ``if self._fixed_memory: _construct_exemplar_unified(...)`` (old classes keep every
  exemplar, new classes are herded), ``else: _reduce_exemplar(...); _construct_exemplar(...)``
  (old classes first cut down, then new classes herded).
- Reduce: ``dd = dummy_data[mask][:m]`` for each old class: the first m of its stored exemplars, in
  the order they were stored (herding order, so the best m survive).
- Herding: see :func:`herding`.

PILOT also computes NME class means inside these functions; here the learner does that from
:meth:`RehearsalMemory.split`. ``memory_selection: "random"`` is this toolkit's addition (PILOT
herds only).
"""
from __future__ import annotations

from collections.abc import Sequence
from typing import Callable, Optional

import numpy as np
import torch

from pilot.data.datasets import ImageSet
from pilot.data.stream import Split
from pilot.errors import PilotError

SELECTIONS = ("herding", "random")
EPSILON = 1e-8  # models/base.py: vectors / (np.linalg.norm(vectors.T, axis=0) + EPSILON)

Features = Callable[[Split], torch.Tensor]


def _config_error(message: str) -> PilotError:
    return PilotError(f"{message} Fix it in the JSON config or with --set.")


def check_memory_config(memory_size: int, memory_per_class: int, fixed_memory: bool, selection: str,
                        num_classes_total: int = 0, task_sizes: Optional[Sequence[int]] = None) -> None:
    """``PilotError`` for memory keys that contradict each other, or a budget too small for the stream.

    ``task_sizes`` (the stream's classes per task) names the task where the budget runs out;
    ``num_classes_total`` defaults to their sum (0 and no sizes: the stream is not checked).
    """
    for key, value in (("memory_size", memory_size), ("memory_per_class", memory_per_class)):
        if value < 0:
            raise _config_error(f"{key} is {value}; it must be 0 or more (0 = no exemplars).")
    if selection not in SELECTIONS:
        raise _config_error(f"memory_selection is '{selection}'; use 'herding' (iCaRL's, as in PILOT) or 'random'.")
    if fixed_memory and memory_per_class == 0 and memory_size > 0:
        raise _config_error(
            f"fixed_memory is true, so each class keeps memory_per_class exemplars, but memory_per_class is 0 "
            f"(memory_size {memory_size} would be ignored and no exemplar kept). Set memory_per_class above 0, or "
            f"fixed_memory false to share memory_size among the classes seen.")
    if not fixed_memory and memory_per_class > 0 and memory_size == 0:
        raise _config_error(
            f"fixed_memory is false, so the classes seen share memory_size, but memory_size is 0 "
            f"(memory_per_class {memory_per_class} would be ignored and no exemplar kept). Set memory_size above 0, "
            f"or fixed_memory true to keep memory_per_class exemplars of each class.")
    total = num_classes_total or sum(task_sizes or [])
    if not fixed_memory and 0 < memory_size < total:
        raise _config_error(
            f"memory_size {memory_size}, shared by the classes seen, gives zero exemplars per class "
            f"{_when_short(memory_size, total, task_sizes)}. Set memory_size to at least {total} (the stream's "
            f"classes), or fixed_memory true with memory_per_class above 0.")


def _when_short(memory_size: int, total: int, task_sizes: Optional[Sequence[int]]) -> str:
    """When the classes seen first outnumber ``memory_size``."""
    if not task_sizes:
        return f"once {total} classes are seen ({memory_size} // {total} = 0)"
    seen = np.cumsum(task_sizes)
    task = int(np.argmax(seen > memory_size))
    return f"after task {task + 1}, when {seen[task]} classes are seen ({memory_size} // {seen[task]} = 0)"


def normalise(vectors: torch.Tensor) -> torch.Tensor:
    """PILOT's L2 normalisation (norm + EPSILON), in float64 so that near-ties resolve the same everywhere."""
    vectors = vectors.detach().to("cpu", torch.float64)
    return vectors / (vectors.norm(dim=1, keepdim=True) + EPSILON)


def herding(vectors: torch.Tensor, m: int) -> list[int]:
    """Positions of the rows iCaRL's herding picks from normalised ``vectors``, in picking order.

    ``models/base.py _construct_exemplar``: ``class_mean = np.mean(vectors, axis=0)`` (not
    re-normalised); for k = 1..m, ``S = sum(exemplar_vectors)``, ``mu_p = (vectors + S) / k``,
    ``i = argmin(sqrt(sum((class_mean - mu_p) ** 2, axis=1)))``, then row i is deleted from the
    candidates. Masking a picked row with +inf leaves the others in order, so argmin's first-minimum
    rule breaks ties as ``np.delete`` + argmin do. PILOT fails when m exceeds the class's images;
    here every image is then taken.
    """
    class_mean = vectors.mean(0)
    picked_sum = torch.zeros_like(class_mean)
    taken = torch.zeros(len(vectors), dtype=torch.bool)
    order = []
    for k in range(1, min(m, len(vectors)) + 1):
        distance = ((class_mean - (vectors + picked_sum) / k) ** 2).sum(1).sqrt()
        distance[taken] = torch.inf
        i = int(distance.argmin())
        order.append(i)
        taken[i] = True
        picked_sum += vectors[i]
    return order


class RehearsalMemory:
    """Exemplars of the classes seen: per class, indices into the training ``ImageSet``, best first.

    Domain streams (a class arriving again in a later task): a class already in memory keeps its
    exemplars (cut to the budget without ``fixed_memory``); only classes new to the memory are selected.
    """

    def __init__(self, memory_size: int = 0, memory_per_class: int = 0, fixed_memory: bool = False,
                 selection: str = "herding"):
        check_memory_config(memory_size, memory_per_class, fixed_memory, selection)
        self.memory_size, self.memory_per_class = memory_size, memory_per_class
        self.fixed_memory, self.selection = fixed_memory, selection
        self.source: Optional[ImageSet] = None
        self.budget = 0  # per-class budget of the last update
        self._exemplars: dict[int, list[int]] = {}  # class label -> source indices, selection order

    @classmethod
    def from_config(cls, config, task_sizes: Sequence[int]) -> "RehearsalMemory":
        """From an ExperimentConfig's memory keys, checked against the stream's classes per task."""
        check_memory_config(config.memory_size, config.memory_per_class, config.fixed_memory,
                            config.memory_selection, task_sizes=task_sizes)
        return cls(config.memory_size, config.memory_per_class, config.fixed_memory, config.memory_selection)

    @property
    def enabled(self) -> bool:
        return self.memory_size > 0 or self.memory_per_class > 0

    def per_class(self, num_seen: int) -> int:
        """``models/base.py samples_per_class``, with ``num_seen`` = classes seen after this task."""
        return self.memory_per_class if self.fixed_memory else self.memory_size // num_seen

    def update(self, split: Split, classes: Sequence[int], features: Optional[Features], num_seen: int,
               generator: Optional[torch.Generator] = None) -> None:
        """After a task: cut old classes to the budget (unless fixed_memory), then select the new ones.

        ``split`` is the task's training split, ``classes`` its labels; ``features`` gives the current
        model's eval-transform features of a split (herding only); ``generator`` drives random selection.
        """
        if not self.enabled:
            return
        if self.source is not None and self._exemplars and split.source is not self.source:
            raise ValueError("RehearsalMemory.update: the split's source is not the memory's training source")
        self.source = split.source
        self.budget = self.per_class(num_seen)
        if not self.fixed_memory:
            self._exemplars = {c: kept[: self.budget] for c, kept in self._exemplars.items()}
        new = [int(c) for c in classes if int(c) not in self._exemplars]
        candidates = {c: np.flatnonzero(split.labels == c) for c in new}
        for c, positions in self._select(split, candidates, features, generator).items():
            self._exemplars[c] = split.indices[positions].tolist()

    def _select(self, split: Split, candidates: dict[int, np.ndarray], features: Optional[Features],
                generator: Optional[torch.Generator]) -> dict[int, np.ndarray]:
        """Chosen positions into ``split`` for each class, in selection order."""
        if self.selection == "random":
            return {c: p[torch.randperm(len(p), generator=generator)[: self.budget].numpy()]
                    for c, p in candidates.items()}
        if not candidates:
            return {}
        if features is None:
            raise ValueError("RehearsalMemory.update: herding needs the features callable")
        every = np.concatenate(list(candidates.values()))
        vectors = features(Split(split.part, split.source, split.indices[every], split.labels[every]))
        if vectors.shape[0] != len(every):
            raise ValueError(f"features returned {vectors.shape[0]} rows for {len(every)} images")
        vectors = normalise(vectors)
        chosen, start = {}, 0
        for c, positions in candidates.items():
            rows = vectors[start: start + len(positions)]
            chosen[c] = positions[herding(rows, self.budget)]
            start += len(positions)
        return chosen

    def __len__(self) -> int:
        return sum(len(kept) for kept in self._exemplars.values())

    def _flat(self) -> tuple[np.ndarray, np.ndarray]:
        """Indices and labels, classes ascending (PILOT's memory order), each class in selection order."""
        classes = sorted(self._exemplars)
        indices = [i for c in classes for i in self._exemplars[c]]
        labels = [c for c in classes for _ in self._exemplars[c]]
        return np.asarray(indices, dtype=np.int64), np.asarray(labels, dtype=np.int64)

    def split(self) -> Split:
        """The exemplars as one training split (train transform and loader as for a task's images)."""
        if self.source is None:
            raise ValueError("RehearsalMemory.split: no training source yet (update or load_state_dict first)")
        indices, labels = self._flat()
        return Split("train", self.source, indices, labels)

    def counts(self) -> dict[int, int]:
        return {c: len(self._exemplars[c]) for c in sorted(self._exemplars)}

    def summary(self) -> dict[str, int]:
        """For results.json: the per-class budget of the last update, exemplars held, classes held."""
        return {"per_class": self.budget, "total": len(self), "classes": len(self._exemplars)}

    def state_dict(self) -> dict:
        indices, labels = self._flat()
        return {"budget": self.budget, "indices": torch.from_numpy(indices), "labels": torch.from_numpy(labels)}

    def load_state_dict(self, state: dict, source: ImageSet) -> None:
        """Restore the exemplars of ``state_dict``; ``source`` is the training ImageSet they index."""
        self.source, self.budget = source, int(state["budget"])
        self._exemplars = {}
        for index, label in zip(state["indices"].tolist(), state["labels"].tolist()):
            self._exemplars.setdefault(label, []).append(index)
