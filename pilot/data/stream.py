"""The task stream: class order, task splits, per-class subsets, for each scenario.

``class`` and ``task`` streams bring new classes with each task (the scenarios differ only at test
time); a ``domain`` stream brings one domain of a domain dataset per task, every task holding the
same classes."""
from __future__ import annotations

import warnings
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass, replace
from typing import Optional

import numpy as np

from pilot.data.checks import check_classes, check_files
from pilot.data.datasets import ImageSet, SourceDataset
from pilot.errors import PilotError

SCENARIOS = ("class", "domain", "task")


def class_order(num_classes: int, shuffle: bool, seed: int) -> list[int]:
    """PILOT's order: ``np.random.seed(seed); np.random.permutation(n)`` (legacy generator)."""
    if not shuffle:
        return list(range(num_classes))
    return np.random.RandomState(seed).permutation(num_classes).tolist()


def task_sizes(num_classes: int, init_cls: int, increment: int) -> list[int]:
    """``init_cls`` classes, then ``increment`` per task; a last, smaller task takes the rest (with a warning:
    a protocol's name, "B10 Inc40", does not say so)."""
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
    if len(sizes) > 1 and sizes[-1] < increment:
        warnings.warn(f"increment {increment} does not divide the {num_classes - init_cls} classes after init_cls "
                      f"{init_cls}: the tasks hold {', '.join(map(str, sizes))} classes, the last only {sizes[-1]}. "
                      f"Set increment to a divisor of {num_classes - init_cls} for tasks of equal size.", stacklevel=2)
    return sizes


def carve_validation(labels: np.ndarray, groups: np.ndarray, fraction: float, per_class: int, seed: int) -> np.ndarray:
    """A mask of the validation images among a training split's (``labels``, and ``groups``: each image's domain):
    per class (and domain), ``per_class`` images, or round(``fraction`` n), at least one and never all, drawn by a
    permutation of the class's images from ``RandomState(seed)`` (one generator, classes in label order) that
    draws nothing from the global generators."""
    rng = np.random.RandomState(seed)
    chosen = np.zeros(len(labels), dtype=bool)
    for group in np.unique(groups):
        for label in np.unique(labels[groups == group]):
            members = np.flatnonzero((labels == label) & (groups == group))
            count = per_class if per_class else int(np.floor(fraction * len(members) + 0.5))
            count = min(max(count, 1), len(members) - 1)
            chosen[members[rng.permutation(len(members))[:count]]] = True
    return chosen


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

    def where(self, keep: np.ndarray) -> "Split":
        """The images where the mask ``keep`` is true."""
        return Split(self.part, self.source, self.indices[keep], self.labels[keep])

    def joined(self, other: "Split") -> "Split":
        """This split's images, then ``other``'s (of the same source), as one split: PILOT's appended data."""
        return Split(self.part, self.source, np.concatenate([self.indices, other.indices]),
                     np.concatenate([self.labels, other.labels]))


@dataclass(frozen=True)
class Task:
    index: int
    classes: range  # the labels its images hold (stream order): its new classes, or every class in a domain stream
    train: Split
    test: Split  # its test images: of its classes, or of its domain
    new_classes: range  # the classes it introduces: ``classes``, or none after a domain stream's first task
    domain: str = ""  # a domain stream's domain
    # Its validation images, carved out of its training images (val_fraction, val_per_class); None when off.
    val: Optional[Split] = None

    @property
    def num_seen(self) -> int:
        """Classes seen once this task is learnt."""
        return self.new_classes.stop

    @property
    def num_old(self) -> int:
        """Classes known before this task."""
        return self.new_classes.start


def domain_sequence(domain_names: Sequence[str], domain_order: Sequence[str], shuffle: bool, seed: int) -> list[int]:
    """The domains' indices in the order they are learnt: ``domain_order`` (names, a subset allowed)
    when given, else every domain in PILOT's class shuffle (``RandomState(seed).permutation``)."""
    if not domain_order:
        return class_order(len(domain_names), shuffle, seed)
    known = ", ".join(f"'{name}'" for name in domain_names)
    for name in domain_order:
        if name not in domain_names:
            raise PilotError(f"domain_order names '{name}', which is not a domain of this dataset. "
                             f"Known domains: {known}. Fix the name in domain_order, or leave domain_order empty "
                             f"for every domain.")
    repeated = sorted(name for name, count in Counter(domain_order).items() if count > 1)
    if repeated:
        raise PilotError(f"domain_order names {', '.join(map(repr, repeated))} more than once: each domain is "
                         f"learnt once. Remove the repeats from domain_order.")
    return [list(domain_names).index(name) for name in domain_order]


class TaskStream:
    """Tasks of a source dataset in PILOT's class order (or, for ``scenario="domain"``, one domain per
    task in ``domain_order`` or shuffled by seed), with optional per-class subsets.

    ``checked`` names the parts whose data is checked (``pilot.data.checks``): every class of the
    stream has an image there, and each image file opens.
    """

    def __init__(self, dataset: SourceDataset, init_cls: int, increment: int, shuffle: bool,
                 seed: int, train_per_class: int = 0, test_per_class: int = 0, max_tasks: int = 0,
                 checked: tuple[str, ...] = ("train", "test"), scenario: str = "class",
                 domain_order: tuple[str, ...] = (), val_fraction: float = 0.0, val_per_class: int = 0):
        self.dataset = dataset
        self.scenario = scenario
        domains = self._domains(dataset, scenario, domain_order, shuffle, seed)
        # A domain stream keeps the dataset's class order: its labels mean the same in every task.
        self.order = class_order(dataset.num_classes, shuffle and not domains, seed)
        # Classes each task introduces: a domain stream's first task brings them all, later ones none.
        self.sizes = ([dataset.num_classes] + [0] * (len(domains) - 1) if domains
                      else task_sizes(dataset.num_classes, init_cls, increment))
        # Tasks of the full protocol, also when max_tasks stops early (methods size per-task slices by it).
        self.planned_tasks = len(self.sizes)
        if max_tasks:
            self.sizes = self.sizes[:max_tasks]
            domains = domains[:max_tasks]
        self.domains = domains
        self.domain_order = [dataset.domain_names[d] for d in domains]
        # relabel[original class] = position in the order
        self.relabel = np.argsort(np.asarray(self.order))
        self._train = self._subset("train", dataset.train, train_per_class)
        self._test = self._subset("test", dataset.test, test_per_class)
        for split in (self._train, self._test):
            if split.part in checked:
                self._check(split)
        self.tasks = self._domain_tasks(domains) if domains else self._class_tasks()
        if val_fraction or val_per_class:
            self.tasks = [self._with_validation(task, val_fraction, val_per_class, seed) for task in self.tasks]

    def __len__(self) -> int:
        return len(self.tasks)

    @property
    def num_classes(self) -> int:
        return sum(self.sizes)

    @property
    def class_names(self) -> list[str]:
        """The names of the stream's classes, in stream order."""
        return [self.dataset.class_names[c] for c in self.order[: self.num_classes]]

    @staticmethod
    def _domains(dataset: SourceDataset, scenario: str, domain_order, shuffle: bool, seed: int) -> list[int]:
        if scenario != "domain":
            return []
        if not dataset.domain_names:
            raise PilotError(f"scenario \"domain\" needs a dataset of domains, and '{dataset.name}' has none: use "
                             f"domainnet, domain_folder (<data_path>/<domain>/{{train,test}}/<class>/) or "
                             f"synthetic_domains, or set scenario to \"class\".")
        return domain_sequence(dataset.domain_names, list(domain_order), shuffle, seed)

    def _check(self, split: Split) -> None:
        used = split.labels < self.num_classes
        if self.domains:  # the stream's domains alone (max_tasks may stop before the last)
            used &= np.isin(split.source.domains[split.indices], self.domains)
        folders = self.dataset.class_folders or self.dataset.class_names  # the names a user finds on disk
        check_classes(split.labels[used], self.num_classes, [folders[c] for c in self.order[: self.num_classes]],
                      split.part)
        check_files([split.source.paths[i] for i in split.indices[used]] if split.source.paths else [])

    def _class_tasks(self) -> list[Task]:
        bounds = np.cumsum([0] + self.sizes)
        tasks = []
        for t, (low, high) in enumerate(zip(bounds[:-1], bounds[1:])):
            classes = range(int(low), int(high))
            tasks.append(Task(t, classes, *(split.where((split.labels >= low) & (split.labels < high))
                                            for split in (self._train, self._test)), new_classes=classes))
        return tasks

    def _domain_tasks(self, domains: list[int]) -> list[Task]:
        every = range(self.num_classes)
        return [Task(t, every, *(split.where(split.source.domains[split.indices] == domain)
                                 for split in (self._train, self._test)),
                     new_classes=every if t == 0 else range(len(every), len(every)),
                     domain=self.dataset.domain_names[domain])
                for t, domain in enumerate(domains)]

    @staticmethod
    def _with_validation(task: Task, fraction: float, per_class: int, seed: int) -> Task:
        """``task`` with validation images carved out of its training images (stream labels, per domain)."""
        train = task.train
        domains = train.source.domains[train.indices] if train.source.domains is not None else np.zeros(len(train))
        held = carve_validation(train.labels, domains, fraction, per_class, seed)
        return replace(task, train=train.where(~held), val=train.where(held))

    def _subset(self, part: str, images: ImageSet, limit: int) -> Split:
        indices = first_per_class(images.labels, limit) if images.domains is None else self._per_domain(images, limit)
        return Split(part, images, indices, self.relabel[images.labels[indices]])

    @staticmethod
    def _per_domain(images: ImageSet, limit: int) -> np.ndarray:
        """``first_per_class`` within each domain: a quick run keeps every domain."""
        if limit <= 0:
            return np.arange(len(images))
        kept = [np.flatnonzero(images.domains == d)[first_per_class(images.labels[images.domains == d], limit)]
                for d in np.unique(images.domains)]
        return np.sort(np.concatenate(kept))
