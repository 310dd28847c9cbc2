"""Domain-incremental datasets: the same classes seen in several domains (styles, sources, shifts).

Each loader returns one :class:`SourceDataset` whose train and test sets hold every domain's images,
domain by domain, with ``ImageSet.domains`` naming each image's domain (an index into
``domain_names``); labels are class indices shared by all domains. Layouts are checked here, while
loading, so a class missing from a domain is reported before a run writes anything.
"""
from __future__ import annotations

import os
from collections.abc import Callable
from pathlib import Path

import numpy as np

from pilot.data.datasets import IMAGE_SUFFIXES, ImageSet, SourceDataset
from pilot.data.manifest import file_manifest, memory_manifest
from pilot.data.names import folder_class_name, same_form
from pilot.errors import PilotError

PARTS = ("train", "test")
DOMAINNET_FOLDER = "domainnet"


def load_domain_dataset(experiment, parts: tuple[str, ...] = PARTS) -> SourceDataset:
    """The domain dataset named by ``experiment.dataset``; only the ``parts`` named must be there."""
    name = experiment.dataset
    if name == "domain_folder":
        return load_domain_folder(experiment.data_path, parts)
    if name == "domainnet":
        return load_domainnet(experiment.data_path, parts)
    if name == "synthetic_domains":
        return make_synthetic_domains(experiment.synthetic_classes, experiment.synthetic_per_class,
                                      experiment.synthetic_image_size, experiment.synthetic_domains)
    raise ValueError(f"'{name}' is not a domain dataset")


# ------------------------------------------------------------------------------- shared checks

def _check_every_class(counts: dict[tuple[str, str], np.ndarray], class_folders: list[str],
                       parts: tuple[str, ...], where: Callable[[str, str], str]) -> None:
    """Every (domain, part) in ``counts`` (its images per class) holds every class; ``where(domain,
    part)`` says where that part's images were looked for."""
    for (domain, part), per_class in counts.items():
        for label in np.flatnonzero(per_class == 0):
            class_folder = class_folders[label]
            holders = [key for key, other in counts.items() if other[label] > 0]
            # The same domain's other part first: the likeliest slip is a class left out of its test/.
            holders.sort(key=lambda key: key[0] != domain)
            found = (f"but domain '{holders[0][0]}' has {holders[0][1]} images of it" if holders
                     else "nor has any other domain")
            raise PilotError(
                f"Domain '{domain}' has no {part} images of class '{class_folder}' (looked in {where(domain, part)}), "
                f"{found}. Every domain must hold every class in {' and '.join(parts)}: add images of "
                f"'{class_folder}' there, or remove the class from every domain.")


def _image_set(per_domain: list[tuple[list[str], list[int]]]) -> ImageSet:
    """One set of the domains' (paths, labels), concatenated domain by domain."""
    paths = [path for domain_paths, _ in per_domain for path in domain_paths]
    labels = np.asarray([label for _, domain_labels in per_domain for label in domain_labels], dtype=np.int64)
    domains = np.repeat(np.arange(len(per_domain)), [len(domain_labels) for _, domain_labels in per_domain])
    return ImageSet(paths, labels, domains.astype(np.int64))


# ------------------------------------------------------------------------ domain_folder layout

def _subfolders(folder: Path) -> list[str]:
    return sorted((p.name for p in folder.iterdir() if p.is_dir() and not p.name.startswith(".")), key=same_form)


def _image_files(folder: Path) -> list[str]:
    if not folder.is_dir():
        return []
    return sorted(str(p) for p in folder.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES)


def _labelled(files_per_class: list[list[str]]) -> tuple[list[str], list[int]]:
    """One domain's (paths, labels) from its image files per class."""
    return ([path for files in files_per_class for path in files],
            [label for label, files in enumerate(files_per_class) for _ in files])


def _domain_folders(root: Path, parts: tuple[str, ...]) -> list[str]:
    layout = f"<domain>/{'/ and <domain>/'.join(parts)}/ with one sub-folder of images per class"
    domains = _subfolders(root) if root.is_dir() else []
    if not domains:
        raise PilotError(f"Dataset 'domain_folder' not found: expected '{root}' to hold one folder per domain, "
                         f"each with {layout}. Set data_path to the folder that holds the domain folders.")
    for domain in domains:
        for part in parts:
            if not (root / domain / part).is_dir():
                raise PilotError(f"Domain folder '{root / domain}' has no '{part}' folder: every sub-folder of "
                                 f"'{root}' is a domain and needs {layout}. Add '{part}/' to it, or move the folder "
                                 f"out of data_path.")
    return domains


def load_domain_folder(data_path: str, parts: tuple[str, ...] = PARTS) -> SourceDataset:
    """``<data_path>/<domain>/{train,test}/<class>/<image>``: domains and classes in sorted folder order.
    The ``parts`` named must be there and are checked; another part is read when present, unchecked."""
    root = Path(data_path).expanduser()
    domains = _domain_folders(root, parts)
    class_folders = sorted({name for domain in domains for part in parts for name in _subfolders(root / domain / part)},
                           key=same_form)
    if not class_folders:
        raise PilotError(f"The domain folders under '{root}' have no class sub-folders: expected "
                         f"<domain>/{parts[0]}/<class>/<image>.")
    files = {(domain, part): [_image_files(root / domain / part / folder) for folder in class_folders]
             for domain in domains for part in PARTS}
    counts = {(domain, part): np.array([len(f) for f in files[domain, part]]) for domain in domains for part in parts}
    _check_every_class(counts, class_folders, parts, lambda domain, part: f"'{root / domain / part}'")
    sets = {part: _image_set([_labelled(files[domain, part]) for domain in domains]) for part in PARTS}
    return SourceDataset(
        name="domain_folder", train=sets["train"], test=sets["test"],
        class_names=[folder_class_name(folder) for folder in class_folders], class_folders=class_folders,
        domain_names=domains, manifest=file_manifest(root, class_folders, domains, sets),
    )


# ----------------------------------------------------------------------------- DomainNet layout

DOMAINNET_HELP = (
    "DomainNet's layout: the domain folders (clipart/, painting/, ...) next to their split lists "
    "'<domain>_train.txt' and '<domain>_test.txt' (http://ai.bu.edu/M3SDA/)."
)


def _split_lists(root: Path, part: str) -> set[str]:
    """The domains with a split list of ``part`` in ``root``."""
    suffix = f"_{part}.txt"
    return {p.name[: -len(suffix)] for p in root.glob(f"*{suffix}") if p.is_file()} if root.is_dir() else set()


def _domainnet_root(data_path: str) -> Path:
    base = Path(data_path).expanduser()
    candidates = (base / DOMAINNET_FOLDER, base)
    for root in candidates:
        if any(_split_lists(root, part) for part in PARTS):
            return root
    raise PilotError(f"DomainNet not found: no split list ('<domain>_train.txt', '<domain>_test.txt') in "
                     f"{' or '.join(repr(str(c)) for c in candidates)}. Expected {DOMAINNET_HELP} Set data_path to the "
                     f"folder that holds 'domainnet/' or the split lists.")


def _domainnet_domains(root: Path, parts: tuple[str, ...]) -> list[str]:
    """Domains with a split list of a needed part; each must have the lists of every needed part."""
    lists = {part: _split_lists(root, part) for part in PARTS}
    domains = sorted(set().union(*(lists[part] for part in parts)))
    for domain in domains:
        for part in parts:
            if domain not in lists[part]:
                present = " and ".join(f"'{domain}_{other}.txt'" for other in parts if domain in lists[other])
                raise PilotError(f"DomainNet domain '{domain}' has no split list '{root / f'{domain}_{part}.txt'}' "
                                 f"(it has {present}). Add the missing list from DomainNet's download page, or "
                                 f"remove {present} to leave the domain out.")
    return domains


def _parse_line(line: str, domain: str) -> tuple[str, str, int] | None:
    """``(path, class folder, label)`` of a split-list line; None if it is not '<domain>/<class>/<file> <label>'."""
    fields = line.rsplit(maxsplit=1)
    if len(fields) != 2 or not fields[1].isdigit():
        return None
    path_parts = fields[0].split("/")
    if len(path_parts) != 3 or path_parts[0] != domain or not all(path_parts):
        return None
    return fields[0], path_parts[1], int(fields[1])


class _ClassFolders:
    """Each label's class folder, as the split lists name it: one folder per label, in every list."""

    def __init__(self):
        self.seen: dict[int, tuple[str, str]] = {}  # label -> (folder, the line that first named it)

    def add(self, label: int, folder: str, where: str) -> None:
        known, first = self.seen.setdefault(label, (folder, where))
        if known != folder:
            raise PilotError(f"Label {label} names two class folders: '{known}' ({first}) and '{folder}' ({where}). "
                             f"A label must be the same class folder in every split list: fix the label on one of "
                             f"these lines.")

    def ordered(self, root: Path) -> list[str]:
        """The class folders by label, checked: labels 0..K-1 without gaps, each its own folder."""
        if not self.seen:
            raise PilotError(f"The split lists in '{root}' hold no lines: expected one "
                             f"'<domain>/<class folder>/<file> <label>' per image. {DOMAINNET_HELP}")
        missing = sorted(set(range(max(self.seen) + 1)) - set(self.seen))
        if missing:
            raise PilotError(f"No split-list line has label {missing[0]}, though labels run to {max(self.seen)}: "
                             f"labels must number the classes 0, 1, 2, ... without gaps. Fix the lists' labels.")
        first_label: dict[str, int] = {}
        for label in range(len(self.seen)):
            folder, where = self.seen[label]
            other = first_label.setdefault(folder, label)
            if other != label:
                raise PilotError(f"Class folder '{folder}' has two labels, {other} ({self.seen[other][1]}) and "
                                 f"{label} ({where}). Each class folder must have one label: fix the label on one "
                                 f"of these lines.")
        return list(first_label)


def _read_split_list(list_file: Path, domain: str, root: str, classes: _ClassFolders) -> tuple[list[str], list[int]]:
    """The image paths (under ``root``; not stat-ed: DomainNet has 600k) and labels of one split list."""
    paths, labels = [], []
    with open(list_file, encoding="utf-8") as lines:
        for number, line in enumerate(lines, 1):
            if not line.strip():
                continue
            parsed = _parse_line(line, domain)
            if parsed is None:
                raise PilotError(f"Line {number} of '{list_file}' does not parse: {line.strip()!r}. Each line must "
                                 f"read '<domain>/<class folder>/<file> <label>' with domain '{domain}' and a "
                                 f"whole-number label, e.g. '{domain}/aircraft_carrier/{domain}_001_000001.jpg 0'. "
                                 f"Fix or delete the line.")
            path, folder, label = parsed
            classes.add(label, folder, f"line {number} of '{list_file.name}'")
            paths.append(os.path.join(root, path))
            labels.append(label)
    return paths, labels


def load_domainnet(data_path: str, parts: tuple[str, ...] = PARTS) -> SourceDataset:
    """DomainNet from its split lists under ``<data_path>/domainnet`` (or ``data_path``): domains
    sorted, labels as listed, class names from the class folders. Only the ``parts`` named are read;
    another part's set is empty."""
    root = _domainnet_root(data_path)
    domains = _domainnet_domains(root, parts)
    classes = _ClassFolders()
    read = {(domain, part): _read_split_list(root / f"{domain}_{part}.txt", domain, str(root), classes)
            for part in parts for domain in domains}
    class_folders = classes.ordered(root)
    counts = {key: np.bincount(np.asarray(labels, dtype=np.int64), minlength=len(class_folders))
              for key, (_, labels) in read.items()}
    _check_every_class(counts, class_folders, parts, lambda domain, part: f"'{root / f'{domain}_{part}.txt'}'")
    sets = {part: _image_set([read.get((domain, part), ([], [])) for domain in domains]) for part in PARTS}
    return SourceDataset(
        name="domainnet", train=sets["train"], test=sets["test"],
        class_names=[folder_class_name(folder) for folder in class_folders], class_folders=class_folders,
        domain_names=domains,
        # The split lists' lines define the images: their 600k files are not stat-ed.
        manifest=file_manifest(root, class_folders, domains, sets, stat=False),
    )


# -------------------------------------------------------------------------------- synthetic

def _domain_shift(rng: np.random.RandomState, size: int):
    """One domain's shift of an image batch (..., size, size, 3): permuted, maybe inverted colour
    channels (a bijection: classes stay separable) plus fixed stripes of a random angle and period."""
    channels, invert = rng.permutation(3), rng.rand() < 0.5
    angle, period = rng.uniform(0, np.pi), rng.uniform(3, 8)
    rows, cols = np.mgrid[:size, :size]
    stripes = 40 * np.sin(2 * np.pi * (cols * np.cos(angle) + rows * np.sin(angle)) / period)[..., None]

    def shift(images: np.ndarray) -> np.ndarray:
        coloured = images[..., channels]
        return (255 - coloured if invert else coloured) + stripes

    return shift


def make_synthetic_domains(num_classes: int, per_class: int, size: int, num_domains: int, seed: int = 0) -> SourceDataset:
    """Learnable random domains: each class a fixed colour pattern (as in ``make_synthetic``), each
    domain its own colour transform and texture, plus per-image noise; train and test per domain."""
    rng = np.random.RandomState(seed)
    patterns = rng.uniform(0, 255, size=(num_classes, 4, 4, 3))
    cells = np.arange(size) * 4 // size  # each pixel's cell of the 4x4 pattern, for any size
    base = patterns[:, cells][:, :, cells]
    shifts = [_domain_shift(rng, size) for _ in range(num_domains)]

    def split(count: int) -> ImageSet:
        images = [shift(base)[:, None] + rng.normal(0, 40, size=(num_classes, count, size, size, 3)) for shift in shifts]
        pixels = np.clip(np.stack(images), 0, 255).astype(np.uint8).reshape(-1, size, size, 3)
        labels = np.tile(np.repeat(np.arange(num_classes, dtype=np.int64), count), num_domains)
        return ImageSet(pixels, labels, np.repeat(np.arange(num_domains, dtype=np.int64), num_classes * count))

    train, test = split(per_class), split(max(per_class // 2, 1))
    class_names, domain_names = [f"class_{i}" for i in range(num_classes)], [f"domain_{d}" for d in range(num_domains)]
    parameters = f"synthetic_domains:{num_classes}:{per_class}:{size}:{num_domains}:{seed}"  # they define every image
    return SourceDataset(
        name="synthetic_domains", train=train, test=test, class_names=class_names, domain_names=domain_names,
        manifest=memory_manifest("synthetic", parameters, class_names, domain_names, {"train": train, "test": test}),
    )
