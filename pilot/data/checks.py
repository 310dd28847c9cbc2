"""Checks of a task stream's data, run when it is built, before a run writes anything.

A class without training images has no prototype (a NaN that takes every argmax); one without test
images is never scored; an undecodable file stops a run halfway. Each is found here and reported
as a ``PilotError`` naming the class or file and the fix.
"""
from __future__ import annotations

from collections.abc import Sequence

import numpy as np
from PIL import Image

from pilot.data.datasets import DECODE_ERRORS, UnreadableImage
from pilot.errors import PilotError

LISTED = 5  # files or classes named in one message


def check_classes(labels: np.ndarray, num_classes: int, class_names: Sequence[str], part: str) -> None:
    """Every class ``0..num_classes-1`` (stream labels; ``class_names`` in that order) has an image in ``part``."""
    counts = np.bincount(labels, minlength=num_classes)[:num_classes]
    empty = [f"'{class_names[label]}'" for label in np.flatnonzero(counts == 0)]
    if empty:
        raise PilotError(
            f"{_listed(empty, 'class', 'classes')} {'has' if len(empty) == 1 else 'have'} no {part} images after "
            f"{part}_per_class. "
            f"Every class needs at least one training and one test image: add images to "
            f"{'its' if len(empty) == 1 else 'their'} {part} folder, or remove the class from both train/ and test/."
        )


def check_train_counts(stream, minimum: int, learner: str) -> None:
    """Each class of ``stream`` (a ``TaskStream``) has ``minimum`` training images in every task that trains
    it: a learner that estimates a covariance per class gets NaN (or a crash) from one image."""
    if minimum <= 1:
        return
    folders = stream.dataset.class_folders or stream.dataset.class_names  # the names a user finds on disk
    names = [folders[c] for c in stream.order[: stream.num_classes]]
    short: dict[int, int] = {}  # label -> its fewest training images in a task
    for task in stream.tasks:
        counts = np.bincount(task.train.labels, minlength=stream.num_classes)
        for label in task.classes:
            if counts[label] < minimum:
                short[label] = min(int(counts[label]), short.get(label, minimum))
    if short:
        listed = [f"'{names[label]}' ({count} image{'' if count == 1 else 's'})"
                  for label, count in sorted(short.items())]
        raise PilotError(
            f"{_listed(listed, 'class', 'classes')} {'has' if len(short) == 1 else 'have'} fewer than {minimum} "
            f"training images, and {learner} estimates each class's covariance from them: add images to "
            f"{'its' if len(short) == 1 else 'their'} train folder, raise train_per_class, or remove the class from "
            f"both train/ and test/."
        )


def check_files(paths: Sequence[str]) -> None:
    """Each image file's header identifies an image (cheap: no pixels are decoded here; a file that
    fails later, in a loader, raises the same ``UnreadableImage``)."""
    bad = []
    for path in paths:
        try:
            with Image.open(path):
                pass
        except DECODE_ERRORS as err:
            bad.append(f"'{path}' ({type(err).__name__}: {err})")
    if bad:
        raise UnreadableImage(f"{_listed(bad, 'image file', 'image files')} cannot be read. Replace or delete "
                              f"{'it' if len(bad) == 1 else 'them'}, then run again.")


def _listed(items: list[str], one: str, many: str) -> str:
    if len(items) == 1:
        return f"{one.capitalize()} {items[0]}"
    more = f" and {len(items) - LISTED} more" if len(items) > LISTED else ""
    return f"{len(items)} {many} ({', '.join(items[:LISTED])}{more})"
