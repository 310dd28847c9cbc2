"""The class-incremental task stream: class order, task splits, per-class subsets."""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from pilot.data.checks import check_classes, check_files
from pilot.data.datasets import ImageSet, SourceDataset
from pilot.errors import PilotError


def class_order(num_classes: int, shuffle: bool, seed: int) -> list[int]:
    """PILOT's order: ``np.random.seed(seed); np.random.permutation(n)`` (legacy generator)."""
    if not shuffle:
        return list(range(num_classes))
    return np.random.RandomState(seed).permutation(num_classes).tolist()


def task_sizes(num_classes: int, init_cls: int, increment: int) -> list[int]:
    """``init_cls`` classes, then ``increment`` per task; a last, smaller task takes the rest."""
    if init_cls > num_classes:
        raise PilotError(
            f"init_cls is {init_cls} but the dataset has only {num_classes} classes. "
            f"Set init_cls to at most {num_classes}."
        )
    sizes = [init_cls]
    while sum(sizes) + increment < num_classes:
        sizes.append(increment)
    if num_classes > sum(sizes):
        sizes.append(num_classes - sum(sizes))
    return sizes


def first_per_class(labels: np.ndarray, limit: int) -> np.ndarray:
    """Indices of the first ``limit`` items of each class, in dataset order (0 = all)."""
    if limit <= 0:
        return np.arange(len(labels))
    keep = np.zeros(len(labels), dtype=bool)
    for label in np.unique(labels):
        keep[np.flatnonzero(labels == label)[:limit]] = True
    return np.flatnonzero(keep)


@dataclass(frozen=True)
class Split:
    """A view of a source's images: positions into ``source`` and labels in stream order.

    ``part`` ('train' or 'test') and ``indices`` identify each image for feature caching.
    """

    part: str
    source: ImageSet
    indices: np.ndarray
    labels: np.ndarray

    def __len__(self) -> int:
        return len(self.indices)


@dataclass(frozen=True)
class Task:
    index: int
    classes: range  # the new classes' labels (stream order)
    train: Split
    test: Split  # test images of this task's classes only

    @property
    def num_seen(self) -> int:
        """Classes seen once this task is learnt."""
        return self.classes.stop

    @property
    def num_old(self) -> int:
        return self.classes.start


class TaskStream:
    """Tasks of a source dataset in PILOT's class order, with optional per-class subsets.

    ``checked`` names the parts whose data is checked (``pilot.data.checks``): every class of the
    stream has an image there, and each image file opens.
    """

    def __init__(self, dataset: SourceDataset, init_cls: int, increment: int, shuffle: bool,
                 seed: int, train_per_class: int = 0, test_per_class: int = 0, max_tasks: int = 0,
                 checked: tuple[str, ...] = ("train", "test")):
        self.dataset = dataset
        self.order = class_order(dataset.num_classes, shuffle, seed)
        self.sizes = task_sizes(dataset.num_classes, init_cls, increment)
        # Tasks of the full protocol, also when max_tasks stops early (methods size per-task slices by it).
        self.planned_tasks = len(self.sizes)
        if max_tasks:
            self.sizes = self.sizes[:max_tasks]
        # relabel[original class] = position in the order
        self.relabel = np.argsort(np.asarray(self.order))
        self._train = self._subset("train", dataset.train, train_per_class)
        self._test = self._subset("test", dataset.test, test_per_class)
        for split in (self._train, self._test):
            if split.part in checked:
                check_classes(split.labels, self.num_classes, [dataset.class_names[c] for c in self.order], split.part)
                used = split.indices[split.labels < self.num_classes]
                check_files([split.source.paths[i] for i in used] if split.source.paths else [])
        bounds = np.cumsum([0] + self.sizes)
        self.tasks = [
            Task(t, range(int(lo), int(hi)), self._select(self._train, lo, hi), self._select(self._test, lo, hi))
            for t, (lo, hi) in enumerate(zip(bounds[:-1], bounds[1:]))
        ]

    def __len__(self) -> int:
        return len(self.tasks)

    @property
    def num_classes(self) -> int:
        return sum(self.sizes)

    def _subset(self, part: str, images: ImageSet, limit: int) -> Split:
        indices = first_per_class(images.labels, limit)
        return Split(part, images, indices, self.relabel[images.labels[indices]])

    @staticmethod
    def _select(split: Split, low: int, high: int) -> Split:
        mask = (split.labels >= low) & (split.labels < high)
        return Split(split.part, split.source, split.indices[mask], split.labels[mask])
