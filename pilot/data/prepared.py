"""A prepared dataset's manifest, ``pilot-manifest.json`` in its folder: every file with its sha256, the split
rule that made train/ and test/, and the archives it came from (their sha256, and whether that value was
pinned in the package or trusted on first use).

Its ``digest`` (a hash of all that, not of when or where it was made) identifies the data: a run records it in
results.json, and ``pilot summarize`` refuses to average runs of different digests. ``split_digest`` hashes
the file list alone: two machines that build the same split from the same archive get the same value.
(``pilot.data.manifest`` is another thing: the loader's stat-based record that keys the feature cache.)
"""
from __future__ import annotations

import functools
import hashlib
import json
import os
from pathlib import Path
from typing import Any, Optional

from pilot.digests import sha256_of
from pilot.errors import PilotError

MANIFEST = "pilot-manifest.json"
FORMAT = "pilot-dataset/1"
# Names listed by verify, at most, per kind of difference.
SHOWN = 5


def file_list(folder: Path) -> list[str]:
    """Every file under ``folder`` but the manifest, as POSIX paths relative to it, sorted."""
    found = []
    for directory, _, files in os.walk(folder):
        for name in files:
            relative = Path(directory, name).relative_to(folder).as_posix()
            if relative != MANIFEST:
                found.append(relative)
    return sorted(found)


def hash_files(folder: Path, paths: list[str], progress=None) -> dict[str, str]:
    hashes = {}
    for path in paths:
        hashes[path] = sha256_of(folder / path)
        if progress is not None:
            progress(1)
    return hashes


def _canonical(value: Any) -> bytes:
    return json.dumps(value, sort_keys=True, separators=(",", ":")).encode()


def split_digest(paths: list[str]) -> str:
    """The hash of a file list: the same split gives the same value on every machine."""
    return hashlib.sha256("\n".join(sorted(paths)).encode()).hexdigest()


def content_digest(manifest: dict[str, Any]) -> str:
    """What identifies the data: dataset, split rule, source archives and every file's hash."""
    keyed = {key: manifest[key] for key in ("format", "dataset", "split", "sources", "files")}
    return hashlib.sha256(_canonical(keyed)).hexdigest()


def make_manifest(dataset: str, split: dict[str, Any], sources: list[dict[str, Any]], files: dict[str, str]) -> dict:
    manifest = {"format": FORMAT, "dataset": dataset, "split": split, "sources": sources, "files": files}
    return {**manifest, "split_digest": split_digest(list(files)), "digest": content_digest(manifest)}


def write_manifest(folder: Path, manifest: dict[str, Any]) -> None:
    (folder / MANIFEST).write_text(json.dumps(manifest, indent=1, sort_keys=True) + "\n", encoding="utf-8")


def read_manifest(folder: Path) -> dict[str, Any]:
    path = folder / MANIFEST
    try:
        manifest = json.loads(path.read_text(encoding="utf-8"))
        files = manifest["files"]
        if manifest.get("format") != FORMAT or not isinstance(files, dict):
            raise ValueError(f"format {manifest.get('format')!r}, expected {FORMAT!r}")
    except FileNotFoundError:
        raise PilotError(f"'{folder}' has no {MANIFEST}: it was not prepared by 'pilot data get' (or the manifest "
                         f"was deleted). Prepare it with 'pilot data get'.") from None
    except (OSError, ValueError, KeyError, TypeError, AttributeError) as err:
        raise PilotError(f"'{path}' cannot be read as a dataset manifest ({type(err).__name__}: {err}). Delete the "
                         f"folder and prepare it again with 'pilot data get'.") from None
    if content_digest(manifest) != manifest.get("digest"):
        raise PilotError(f"'{path}' was edited: its digest does not match its contents. Delete the folder and "
                         f"prepare it again with 'pilot data get'.")
    return manifest


def _listed(kind: str, names: list[str]) -> str:
    more = f" and {len(names) - SHOWN} more" if len(names) > SHOWN else ""
    return f"{len(names)} {kind} ({', '.join(repr(n) for n in names[:SHOWN])}{more})"


def differences(folder: Path, manifest: dict[str, Any], progress=None) -> list[str]:
    """Files missing, changed or extra in ``folder`` against its manifest (re-hashes every file)."""
    recorded: dict[str, str] = manifest["files"]
    present = file_list(folder)
    missing = sorted(set(recorded) - set(present))
    extra = sorted(set(present) - set(recorded))
    hashes = hash_files(folder, [p for p in present if p in recorded], progress)
    changed = sorted(p for p, digest in hashes.items() if digest != recorded[p])
    return [_listed(kind, names) for kind, names in (("missing", missing), ("changed", changed), ("extra", extra))
            if names]


@functools.lru_cache(maxsize=64)
def _cached_digest(path: str, size: int, mtime_ns: int) -> Optional[str]:
    try:
        return json.loads(Path(path).read_text(encoding="utf-8")).get("digest")
    except (OSError, ValueError, AttributeError):
        return None


def manifest_digest(folder: Path) -> Optional[str]:
    """The digest of the manifest in ``folder``; None where there is none (data not prepared by pilot)."""
    path = folder / MANIFEST
    try:
        stat = path.stat()
    except OSError:
        return None
    return _cached_digest(str(path.resolve()), stat.st_size, stat.st_mtime_ns)


def dataset_folder(dataset: str, data_path: str) -> Optional[Path]:
    """Where a config's ``dataset`` at ``data_path`` would hold its manifest (as the loaders find their data)."""
    from pilot.data.datasets import FOLDER_DATASETS

    base = Path(data_path).expanduser()
    if dataset in ("cifar100", "cifar224"):
        return next((c for c in (base, base / "cifar-100-python") if (c / MANIFEST).is_file()), None)
    if dataset in FOLDER_DATASETS:
        return base / FOLDER_DATASETS[dataset]
    if dataset == "domainnet":
        return next((c for c in (base / "domainnet", base) if (c / MANIFEST).is_file()), None)
    if dataset == "domain_folder":
        return base
    return None  # generated data


def recorded_digest(experiment) -> Optional[str]:
    """The manifest digest of the data a run of ``experiment`` (an ExperimentConfig) reads; None where the data
    was not prepared by ``pilot data get``."""
    folder = dataset_folder(experiment.dataset, experiment.data_path)
    return None if folder is None else manifest_digest(folder)
