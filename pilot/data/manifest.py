"""A dataset's manifest: what its images are, known from a stat of each file, never from reading it.

Per part (train, test), each image's group (its domain and class), a hash of its file name and a hash
of that name with the file's size and modification time: its entry. DomainNet's 600k images are not
stat-ed: their entries hash the file names the split lists give. Images held in memory (CIFAR,
synthetic) have entries of their content hash. The feature cache keeps each image's features under its entry (a
changed file is encoded again, the rest stay usable); a checkpoint keeps the manifest, so that
``--resume`` refuses data that changed under the tasks it learnt, naming the change.
"""
from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Iterable
from dataclasses import dataclass
from functools import cached_property
from pathlib import Path
from typing import Any

import numpy as np


def hash64(texts: Iterable[str]) -> np.ndarray:
    """A 64-bit hash of each text, the same in every process (unlike ``hash``)."""
    digests = b"".join(hashlib.blake2b(text.encode(), digest_size=8).digest() for text in texts)
    return np.frombuffer(digests, dtype=np.uint64).copy()


@dataclass(frozen=True)
class PartEntries:
    """One part's images, in the order of its ``ImageSet``."""

    group: np.ndarray  # int64: domain * number of classes + class
    name: np.ndarray  # uint64: hash of the file name in its class folder
    entry: np.ndarray  # uint64: hash of name, size and modification time (or of the content)


@dataclass
class Manifest:
    origin: str  # where the images are: a resolved folder or archive ("synthetic" for generated ones)
    classes: list[str]  # class folders (or names), in the dataset's class order
    domains: list[str]  # domain names; empty for a dataset without domains
    parts: dict[str, PartEntries]
    content: str = ""  # images held in memory: their content hash

    @cached_property
    def digest(self) -> str:
        """Identifies the images of every part: changes whenever any file, class or domain does."""
        digest = hashlib.sha256(json.dumps([self.classes, self.domains, self.content]).encode())
        for part in sorted(self.parts):
            digest.update(part.encode())
            for values in (self.parts[part].group, self.parts[part].name, self.parts[part].entry):
                digest.update(values.tobytes())
        return digest.hexdigest()[:24]

    def row_ids(self, part: str) -> np.ndarray:
        """Each image's identity in a feature cache: its entry, and the part, domain and class folder it is in."""
        entries = self.parts[part]
        places = hash64(f"{part}/{domain}/{folder}" for domain in self.domains or [""] for folder in self.classes)
        return entries.entry ^ places[entries.group]

    @property
    def num_groups(self) -> int:
        return len(self.classes) * max(len(self.domains), 1)

    def label(self, group: int, part: str) -> str:
        """A group as a message names it: "'cat' (train)", "'cat' (train, domain 'sketch')"."""
        domain, label = divmod(int(group), len(self.classes))
        return f"'{self.classes[label]}' ({part}{f', domain {self.domains[domain]!r}' if self.domains else ''})"

    def state(self) -> dict[str, Any]:
        return {"origin": self.origin, "classes": self.classes, "domains": self.domains, "content": self.content,
                "parts": {part: dict(vars(entries)) for part, entries in self.parts.items()}}

    @classmethod
    def from_state(cls, state: dict[str, Any]) -> "Manifest":
        return cls(state["origin"], list(state["classes"]), list(state["domains"]),
                   {part: PartEntries(**entries) for part, entries in state["parts"].items()}, state["content"])


def _groups(images, num_classes: int) -> np.ndarray:
    domains = np.zeros(len(images), dtype=np.int64) if images.domains is None else images.domains
    return (domains * num_classes + images.labels).astype(np.int64)


def _stat_entry(path: str, name: str) -> str:
    try:
        stat = os.stat(path)
    except OSError:  # e.g. a broken link: pilot.data.checks names it
        return f"{name}\0unreadable"
    return f"{name}\0{stat.st_size}\0{stat.st_mtime_ns}"


def file_manifest(origin: Path, classes: list[str], domains: list[str], sets: dict, stat: bool = True) -> Manifest:
    """The manifest of image files (``sets``: part -> ImageSet); without ``stat``, entries hash the names alone."""
    parts = {}
    for part, images in sets.items():
        names = [os.path.basename(path) for path in images.paths]
        hashed = hash64(names)
        entries = hash64(_stat_entry(path, name) for path, name in zip(images.paths, names)) if stat else hashed
        parts[part] = PartEntries(_groups(images, len(classes)), hashed, entries)
    return Manifest(str(origin.resolve()), list(classes), list(domains), parts)


def memory_manifest(origin: str, content: str, classes: list[str], domains: list[str], sets: dict) -> Manifest:
    """The manifest of images held in memory, whose ``content`` (a hash, or the parameters that generate them)
    stands for every image."""
    parts = {}
    for part, images in sets.items():
        names = hash64(f"{part}:{index}" for index in range(len(images)))
        parts[part] = PartEntries(_groups(images, len(classes)), names, names ^ hash64([content])[0])
    return Manifest(origin, list(classes), list(domains), parts, content)


# ------------------------------------------------------------------------------ what changed

def _split_by(owner: np.ndarray, values: np.ndarray, count: int) -> list[np.ndarray]:
    """``values`` of each owner 0..count-1, in their order."""
    order = np.argsort(owner, kind="stable")
    return np.split(values[order], np.searchsorted(owner[order], np.arange(1, count)))


def _content_digests(manifest: Manifest, of_domains: bool) -> dict[str, str]:
    """Per class (or domain), a hash of its images' entries, which do not hold its name: a renamed folder keeps it."""
    names, num_classes = (manifest.domains if of_domains else manifest.classes), len(manifest.classes)
    digests = [hashlib.sha256() for _ in names]
    for entries in manifest.parts.values():
        owner = entries.group // num_classes if of_domains else entries.group % num_classes
        for digest, values in zip(digests, _split_by(owner, entries.entry, len(names))):
            digest.update(np.sort(values).tobytes())
    return {name: digest.hexdigest() for name, digest in zip(names, digests)}


def _renamed(kind: str, saved: Manifest, current: Manifest) -> list[str]:
    """Classes (``kind`` "class") or domains added, removed or renamed (a new name holding the same images)."""
    of_domains = kind == "domain"
    if (saved.domains if of_domains else saved.classes) == (current.domains if of_domains else current.classes):
        return []
    before, now = (_content_digests(m, of_domains) for m in (saved, current))
    gone, new = [n for n in before if n not in now], [n for n in now if n not in before]
    changes = []
    for name in gone:
        match = next((n for n in new if now[n] == before[name]), None)
        if match is None:
            changes.append(f"{kind} '{name}' was removed")
        else:
            changes.append(f"{kind} '{name}' was renamed '{match}'")
            new.remove(match)
    changes += [f"{kind} '{name}' was added" for name in new]
    return changes or [f"the {kind} order changed: {list(before)} then, {list(now)} now"]


def _plural(count: int) -> str:
    return f"{count} file{'s' if count != 1 else ''}"


def _group_changes(where: str, old_names, old_entries, names, entries) -> list[str]:
    """Files added to, removed from or changed in one group (``where``), or its files reordered."""
    _, old_at, at = np.intersect1d(old_names, names, return_indices=True)
    counts = {"added to": np.setdiff1d(names, old_names).size, "removed from": np.setdiff1d(old_names, names).size,
              "changed in": int((old_entries[old_at] != entries[at]).sum())}
    changes = [f"{_plural(count)} {how} {where}" for how, count in counts.items() if count]
    if not changes and not np.array_equal(old_names, names):
        changes.append(f"the files of {where} were reordered")
    return changes


def _groups_of(manifest: Manifest, part: str) -> list[tuple[np.ndarray, np.ndarray]]:
    """Each group's (names, entries) in ``part``."""
    entries, size = manifest.parts[part], manifest.num_groups
    return list(zip(_split_by(entries.group, entries.name, size), _split_by(entries.group, entries.entry, size)))


def _moved(saved: Manifest, current: Manifest, learnt: np.ndarray) -> list[str]:
    """Changes of groups not learnt that move the learnt training images' positions."""
    old, new = saved.parts["train"].group, current.parts["train"].group
    if np.array_equal(np.flatnonzero(np.isin(old, learnt)), np.flatnonzero(np.isin(new, learnt))):
        return []
    counts = [np.bincount(groups, minlength=current.num_groups) for groups in (old, new)]
    moving = np.flatnonzero(counts[0] != counts[1])
    before, now = _groups_of(saved, "train"), _groups_of(current, "train")
    return [f"{change}, a class not learnt yet: it moves the learnt training images, which the rehearsal memory "
            f"keeps by position" for group in moving
            for change in _group_changes(current.label(group, "train"), *before[group], *now[group])]


def changes(saved: Manifest, current: Manifest, learnt_rows: dict[str, np.ndarray], positions: bool) -> list[str]:
    """What differs from ``saved`` in ``current`` where a checkpoint depends on it: the classes and domains,
    the groups of the learnt images (``learnt_rows``: per part, their positions in ``current``) and, with
    ``positions``, where the learnt training images are."""
    if saved.content != current.content:
        return [f"the images of '{current.origin}' changed (content hash {saved.content} then, {current.content} now)"]
    renamed = _renamed("class", saved, current) + _renamed("domain", saved, current)
    if renamed:
        return renamed
    learnt = {part: np.unique(current.parts[part].group[rows]) for part, rows in learnt_rows.items()}
    found = []
    for part, groups in learnt.items():
        before, now = _groups_of(saved, part), _groups_of(current, part)
        found += [change for group in groups
                  for change in _group_changes(current.label(group, part), *before[group], *now[group])]
    return _moved(saved, current, learnt["train"]) if positions and not found else found
