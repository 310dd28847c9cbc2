"""Datasets: CIFAR-100 from the official pickle layout, PILOT's image folders, synthetic images.

Each loader returns a :class:`SourceDataset`: train and test :class:`ImageSet` with labels in the
dataset's own class indices (the task stream reorders classes afterwards).
"""
from __future__ import annotations

import contextlib
import io
import pickle
import tarfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Optional, Union

import numpy as np
from PIL import Image

from pilot.data.manifest import Manifest, file_manifest, memory_manifest
from pilot.data.names import apply_class_names, folder_class_name, readable_name, same_form
from pilot.digests import files_sha256
from pilot.errors import PilotError

IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".bmp", ".gif", ".webp", ".tif", ".tiff", ".ppm")


# What PIL raises for a file it cannot open or decode.
DECODE_ERRORS = (OSError, SyntaxError, ValueError, Image.DecompressionBombError)


class UnreadableImage(PilotError):
    """An image file that cannot be opened or decoded."""


@dataclass
class ImageSet:
    """Images (uint8 HxWx3 array or file paths) with integer labels, in dataset order."""

    images: Union[np.ndarray, list[str]]
    labels: np.ndarray
    # Domain datasets: each image's domain, an index into ``SourceDataset.domain_names`` (None elsewhere).
    domains: Optional[np.ndarray] = None

    def __len__(self) -> int:
        return len(self.labels)

    def load(self, index: int) -> Image.Image:
        item = self.images[index]
        if not isinstance(item, str):
            return Image.fromarray(item)
        try:
            with Image.open(item) as image:
                return image.convert("RGB")
        except DECODE_ERRORS as err:
            raise UnreadableImage(f"Image file '{item}' cannot be decoded ({type(err).__name__}: {err}). Replace or "
                                  f"delete it, then continue with --resume.") from None

    @property
    def paths(self) -> list[str]:
        """The image files (none for images held in memory)."""
        return self.images if isinstance(self.images, list) else []


@dataclass
class SourceDataset:
    name: str
    train: ImageSet
    test: ImageSet
    # Readable names (for people and CLIP prompts), in the dataset's class order.
    class_names: list[str]
    # What the images are (pilot.data.manifest): keys the feature cache, checked on resume.
    manifest: Manifest
    # False for native low-resolution sets (cifar100) fed to a model at their own size.
    resize_to_model: bool = True
    # Domain datasets: the domains' names (each image's ``ImageSet.domains`` indexes them); empty elsewhere.
    domain_names: list[str] = field(default_factory=list)
    # Folder datasets: each class's folder name, which identifies it on disk; empty elsewhere.
    class_folders: list[str] = field(default_factory=list)

    @property
    def num_classes(self) -> int:
        return len(self.class_names)

    @property
    def fingerprint(self) -> str:
        """Identifies every image of the dataset: changes whenever one does."""
        return self.manifest.digest


# ---------------------------------------------------------------------------------- CIFAR-100

CIFAR_HELP = (
    "Put the official CIFAR-100 python release there: the folder 'cifar-100-python' (with train, "
    "test, meta) or the archive 'cifar-100-python.tar.gz' from https://www.cs.toronto.edu/~kriz/"
    "cifar.html, or set data_path (or PILOT_DATA_DIR) to the folder or archive."
)
DOWNLOAD_HINT = " Or set \"download\": true on a machine with internet."


def _cifar_candidates(root: Path) -> list[Path]:
    return [root, root / "cifar-100-python", root / "cifar-100-python.tar.gz"]


def _find_cifar(root: Path) -> Path | None:
    for candidate in _cifar_candidates(root):
        if candidate.is_dir() and (candidate / "train").is_file():
            return candidate
        if candidate.is_file() and candidate.name.endswith((".tar.gz", ".tgz")):
            return candidate
    return None


def _download_cifar(root: Path) -> None:
    """torchvision's download into ``root``; where it fails, the folders it made for it go (they stay empty)."""
    from torchvision.datasets import CIFAR100

    made = [folder for folder in (root, *root.parents) if not folder.exists()]
    try:
        CIFAR100(str(root), train=True, download=True)
    except Exception as err:  # network errors come in many types
        for folder in made:  # innermost first
            with contextlib.suppress(OSError):
                folder.rmdir()
        raise PilotError(
            f"CIFAR-100 was not found under '{root}' and downloading it failed ({type(err).__name__}: "
            f"{err}). {CIFAR_HELP}"
        ) from None


class ForbiddenGlobal(pickle.UnpicklingError):
    """A pickle that names a global no CIFAR-100 file holds: code, which loading it would run."""


class _ArraysOnly(pickle.Unpickler):
    """CIFAR's pickles hold dicts, lists, strings and NumPy arrays: refuse any other global, so a
    tampered file cannot run code."""

    ALLOWED = {("numpy", "ndarray"), ("numpy", "dtype"), ("_codecs", "encode"),
               *((f"numpy{core}.multiarray", "_reconstruct") for core in (".core", "._core")),
               *((f"numpy{core}.numeric", "_frombuffer") for core in (".core", "._core"))}

    def find_class(self, module: str, name: str):
        if (module, name) not in self.ALLOWED:
            raise ForbiddenGlobal(f"{module}.{name}")
        return super().find_class(module, name)


def _unpickle(read: Callable[[str], bytes], member: str, origin: Path) -> dict:
    where = f"'{origin / member}'" if origin.is_dir() else f"'{member}' in '{origin}'"
    try:
        return _ArraysOnly(io.BytesIO(read(member)), encoding="latin1").load()
    except (KeyError, FileNotFoundError):
        raise PilotError(f"'{origin}' has no '{member}' file: it is not the CIFAR-100 python release. {CIFAR_HELP}") from None
    except ForbiddenGlobal as err:
        raise PilotError(
            f"{where} refers to {err}, which CIFAR-100 files never do: pilot refuses to load code from a data "
            f"file, so it was not loaded. The file was tampered with or is not CIFAR-100: delete it and download "
            f"CIFAR-100 again. {CIFAR_HELP}"
        ) from None
    except Exception as err:
        raise PilotError(
            f"Could not read {where} ({type(err).__name__}: {err}): the file is corrupt or truncated. Delete it "
            f"and download CIFAR-100 again. {CIFAR_HELP}"
        ) from None


def _cifar_reader(location: Path) -> Callable[[str], bytes]:
    if location.is_dir():
        return lambda member: (location / member).read_bytes()
    try:
        archive = tarfile.open(location, "r:gz")
        members = {Path(m.name).name: m for m in archive.getmembers() if m.isfile()}
    except (tarfile.TarError, OSError, EOFError) as err:
        raise PilotError(f"'{location}' is not a readable .tar.gz ({err}): delete it and download CIFAR-100 again. {CIFAR_HELP}") from None
    return lambda member: archive.extractfile(members[member]).read()


def _cifar_split(batch: dict, origin: Path, member: str) -> ImageSet:
    try:
        data = np.asarray(batch["data"], dtype=np.uint8).reshape(-1, 3, 32, 32).transpose(0, 2, 3, 1)
        labels = np.asarray(batch["fine_labels"], dtype=np.int64)
    except (KeyError, ValueError) as err:
        raise PilotError(f"'{member}' in '{origin}' does not hold CIFAR-100 images and fine labels ({err}). {CIFAR_HELP}") from None
    return ImageSet(np.ascontiguousarray(data), labels)


def load_cifar100(data_path: str, download: bool, name: str) -> SourceDataset:
    root = Path(data_path).expanduser()
    location = _find_cifar(root)
    if location is None and download:
        _download_cifar(root)
        location = _find_cifar(root)
    if location is None:
        looked = ", ".join(f"'{c}'" for c in _cifar_candidates(root))
        raise PilotError(f"CIFAR-100 not found: looked at {looked}. {CIFAR_HELP}{DOWNLOAD_HINT}")
    read = _cifar_reader(location)
    meta = _unpickle(read, "meta", location)
    train = _cifar_split(_unpickle(read, "train", location), location, "train")
    test = _cifar_split(_unpickle(read, "test", location), location, "test")
    files = [location / member for member in ("train", "test", "meta")] if location.is_dir() else [location]
    manifest = memory_manifest(str(location.resolve()), files_sha256(files)[:24], meta["fine_label_names"], [],
                               {"train": train, "test": test})
    return SourceDataset(
        name=name, train=train, test=test, class_names=[readable_name(n) for n in meta["fine_label_names"]],
        manifest=manifest, resize_to_model=(name != "cifar100"),
    )


# ------------------------------------------------------------------------------ image folders

# PILOT's folder names under data_path: <data_path>/<folder>/{train,test}/<class>/<image>.
FOLDER_DATASETS = {
    "imagenetr": "imagenet-r",
    "imageneta": "imagenet-a",
    "cub": "cub",
    "objectnet": "objectnet",
    "omnibenchmark": "omnibenchmark",
    "vtab": "vtab",
    "folder": "",  # generic: data_path itself holds train/ and test/
}


def _scan_folder(split_dir: Path, class_folders: list[str]) -> ImageSet:
    paths, labels = [], []
    for label, folder in enumerate(class_folders):
        class_dir = split_dir / folder
        files = sorted(p for p in class_dir.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES) if class_dir.is_dir() else []
        paths += [str(p) for p in files]
        labels += [label] * len(files)
    return ImageSet(paths, np.asarray(labels, dtype=np.int64))


def load_folder(data_path: str, name: str, parts: tuple[str, ...] = ("train", "test")) -> SourceDataset:
    """``parts``: the splits that must be there; without "train", classes are named by test/ alone."""
    root = Path(data_path).expanduser() / FOLDER_DATASETS[name]
    dirs = {part: root / part for part in ("train", "test")}
    if not all(dirs[part].is_dir() for part in parts):
        raise PilotError(
            f"Dataset '{name}' not found: expected the folders {' and '.join(repr(str(dirs[p])) for p in parts)}, "
            f"each with one sub-folder of images per class (PILOT's layout). Download the dataset (see the "
            f"table in docs/datasets.md) and set data_path to the folder that holds "
            f"'{FOLDER_DATASETS[name] or ' and '.join(f'{p}/' for p in parts)}'."
        )
    # sorted as NFC: a copy from macOS (NFD) keeps the class order
    present = {part: sorted((p.name for p in dirs[part].iterdir() if p.is_dir()), key=same_form)
               if dirs[part].is_dir() else [] for part in ("train", "test")}
    folders = present["train" if "train" in parts else "test"]
    if not folders:
        raise PilotError(f"'{dirs[parts[0]]}' has no class sub-folders: expected <class>/<image> inside it.")
    if set(parts) == {"train", "test"}:
        for part, other in (("test", "train"), ("train", "test")):
            extra = sorted(set(present[part]) - set(present[other]))
            if extra:
                raise PilotError(f"'{dirs[part]}' has class folders that '{dirs[other]}' lacks: "
                                 f"{', '.join(map(repr, extra))}. train/ and test/ must hold the same classes: add "
                                 f"the missing folders, or remove these.")
    train, test = (_scan_folder(dirs[part], folders) for part in ("train", "test"))
    return SourceDataset(name=name, train=train, test=test, class_names=[folder_class_name(f) for f in folders],
                         class_folders=folders, manifest=file_manifest(root, folders, [], {"train": train, "test": test}))


# -------------------------------------------------------------------------------- synthetic

def make_synthetic(num_classes: int, per_class: int, size: int, seed: int = 0) -> SourceDataset:
    """Learnable random images: each class is a fixed colour pattern plus per-image noise."""
    rng = np.random.RandomState(seed)
    patterns = rng.uniform(0, 255, size=(num_classes, 4, 4, 3))

    def split(count: int) -> ImageSet:
        base = np.repeat(np.repeat(patterns, size // 4, axis=1), size // 4, axis=2)
        images = base[:, None] + rng.normal(0, 40, size=(num_classes, count, size, size, 3))
        labels = np.repeat(np.arange(num_classes), count)
        return ImageSet(np.clip(images, 0, 255).astype(np.uint8).reshape(-1, size, size, 3), labels)

    train, test = split(per_class), split(max(per_class // 2, 1))
    class_names = [f"class_{i}" for i in range(num_classes)]
    parameters = f"synthetic:{num_classes}:{per_class}:{size}:{seed}"  # they define every image
    return SourceDataset(
        name="synthetic", train=train, test=test, class_names=class_names,
        manifest=memory_manifest("synthetic", parameters, class_names, [], {"train": train, "test": test}),
    )


# Loaded by pilot.data.domains: every domain's images in one dataset, ImageSet.domains set.
DOMAIN_DATASETS = ("domain_folder", "domainnet", "synthetic_domains")
DATASETS = ("cifar100", "cifar224", "synthetic", *FOLDER_DATASETS, *DOMAIN_DATASETS)


def load_dataset(experiment, parts: tuple[str, ...] = ("train", "test")) -> SourceDataset:
    """The dataset named by ``experiment.dataset`` (an :class:`ExperimentConfig`), its classes named by
    ``experiment.class_names`` where given; an image folder needs only the ``parts`` named (CIFAR's files
    always hold both)."""
    return apply_class_names(_load(experiment, parts), experiment.class_names)


def _load(experiment, parts: tuple[str, ...]) -> SourceDataset:
    name = experiment.dataset
    if name in ("cifar100", "cifar224"):
        return load_cifar100(experiment.data_path, experiment.download, name)
    if name in FOLDER_DATASETS:
        return load_folder(experiment.data_path, name, parts)
    if name == "synthetic":
        return make_synthetic(experiment.synthetic_classes, experiment.synthetic_per_class,
                              experiment.synthetic_image_size)
    if name in DOMAIN_DATASETS:
        from pilot.data.domains import load_domain_dataset  # domains imports this module

        return load_domain_dataset(experiment, parts)
    raise PilotError(f"Unknown dataset '{name}'. Known datasets: {', '.join(DATASETS)}.")
