"""``pilot data get``: the original archives (downloaded, resumed where a download stopped, or taken from
``--from``), checked against their pinned sha256 (or trusted on first use), extracted and split into the
folder a config reads, with its manifest (pilot.data.prepared).

Everything is built in a staging folder beside the target and renamed into place at the end: a failure at
any step leaves no dataset folder, only the staging folder's removal.
"""
from __future__ import annotations

import hashlib
import http.client
import json
import os
import shutil
import tarfile
import zipfile
from collections.abc import Callable
from pathlib import Path
from typing import Any, Optional
from urllib.error import HTTPError, URLError
from urllib.request import Request, urlopen

import numpy as np
from tqdm import tqdm

from pilot.data.catalog import SPLIT_SEED, TRAIN_FRACTION, Archive, DatasetEntry, entry
from pilot.data.datasets import IMAGE_SUFFIXES
from pilot.data.prepared import file_list, hash_files, make_manifest, write_manifest
from pilot.digests import sha256_of
from pilot.errors import PilotError

DOWNLOADS = ".downloads"
TRUSTED = ".pilot-archives.json"  # archives without a published hash: the sha256 first seen, per dataset
CHUNK = 1 << 20


def default_root() -> str:
    """Where datasets go: as a config's data_path defaults (PILOT_DATA_DIR, else ./data)."""
    return os.environ.get("PILOT_DATA_DIR", "./data")


# ------------------------------------------------------------------------------------------- archives

def download(archive: Archive, folder: Path, report: Callable[[str], None]) -> Path:
    """``archive`` downloaded into ``folder``; a ``.part`` file left by a stopped download is resumed (HTTP Range)."""
    final = folder / archive.file
    if final.is_file():
        report(f"{archive.file}: already downloaded in '{folder}'")
        return final
    part = final.with_name(final.name + ".part")
    have = part.stat().st_size if part.is_file() else 0
    headers = {"Range": f"bytes={have}-"} if have else {}
    try:
        response = urlopen(Request(archive.url, headers=headers), timeout=60)
    except HTTPError as err:
        raise PilotError(f"Downloading '{archive.url}' failed: HTTP {err.code} {err.reason}. Fetch the file on a "
                         f"machine that can, then pass it with --from.") from None
    except (URLError, OSError) as err:
        raise PilotError(f"Cannot download '{archive.url}' ({getattr(err, 'reason', err)}): no internet here? Fetch "
                         f"the file on a machine that has it, then pass it with --from FILE_OR_DIR.") from None
    folder.mkdir(parents=True, exist_ok=True)
    with response:
        resumed = bool(have) and response.status == 206
        have = have if resumed else 0
        length = response.headers.get("Content-Length")
        total = have + int(length) if length is not None else 0
        report(f"{archive.file}: {'resuming at ' + format(have, ',') + ' bytes' if resumed else 'downloading'} "
               f"from {archive.url}")
        with open(part, "ab" if resumed else "wb") as out, tqdm(total=total or None, initial=have, unit="B",
                                                                 unit_scale=True, desc=archive.file, disable=None) as bar:
            try:
                for block in iter(lambda: response.read(CHUNK), b""):
                    out.write(block)
                    bar.update(len(block))
            except (OSError, http.client.HTTPException) as err:
                raise PilotError(_stopped(archive, part, total, f" ({type(err).__name__})")) from None
    if total and part.stat().st_size != total:
        raise PilotError(_stopped(archive, part, total, ""))
    os.replace(part, final)
    return final


def _stopped(archive: Archive, part: Path, total: int, why: str) -> str:
    return (f"The download of '{archive.url}' stopped after {part.stat().st_size:,} of {total:,} bytes{why}. The part "
            f"is kept in '{part}': run the same command again to resume it.")


def locate(dataset: DatasetEntry, archives: tuple[Archive, ...], source: Optional[str], root: Path,
           report: Callable[[str], None]) -> dict[str, Path]:
    """Each archive's file: from ``source`` (the archive itself, or a folder holding them), else downloaded."""
    if source is None:
        missing = [a for a in archives if not a.url]
        if missing:
            raise PilotError(f"{dataset.name} cannot be downloaded by pilot: {dataset.no_download}. Then run "
                             f"'pilot data get {dataset.name} --from <the downloaded file>'.")
        return {a.file: download(a, root / DOWNLOADS, report) for a in archives}
    path = Path(source).expanduser()
    names = ", ".join(repr(a.file) for a in archives)
    if path.is_dir():
        found = {a.file: path / a.file for a in archives}
        absent = [name for name, file in found.items() if not file.is_file()]
        if absent and len(archives) == 1:
            candidates = sorted(p for p in path.iterdir() if p.is_file() and p.suffix in (".zip", ".tar", ".tgz", ".gz"))
            if len(candidates) == 1:  # a folder holding one archive, under another name
                return {archives[0].file: candidates[0]}
        if absent:
            raise PilotError(f"--from '{path}' lacks {', '.join(map(repr, absent))}: {dataset.name} needs {names} "
                             f"there. Put them in that folder, or pass the archive file itself.")
        return found
    if path.is_file():
        if len(archives) != 1:
            raise PilotError(f"--from '{path}' is one file, but {dataset.name} comes in {len(archives)} files "
                             f"({names}): pass the folder that holds them all.")
        return {archives[0].file: path}
    raise PilotError(f"--from '{path}' does not exist: pass the downloaded archive of {dataset.name} ({names}) or "
                     f"the folder that holds it.")


def _read_trusted(root: Path) -> dict[str, str]:
    try:
        return json.loads((root / TRUSTED).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return {}


def check_archives(dataset: DatasetEntry, archives: tuple[Archive, ...], files: dict[str, Path], root: Path,
                   report: Callable[[str], None]) -> list[dict[str, Any]]:
    """Each archive's sha256 against its pinned value, or against the one first trusted here; the records of
    the sources for the manifest."""
    trusted = _read_trusted(root)
    sources = []
    for archive in archives:
        path = files[archive.file]
        size = path.stat().st_size
        if archive.size and size != archive.size:
            raise PilotError(f"'{path}' has {size:,} bytes, but {archive.file} has {archive.size:,} (published by "
                             f"{archive.checksum_source}): it is truncated or another file. Delete it and get it again.")
        report(f"{archive.file}: sha256 of {size:,} bytes")
        digest = sha256_of(path)
        if archive.sha256 and digest != archive.sha256:
            raise PilotError(f"'{path}' has sha256 {digest}, but {archive.file}'s published sha256 is {archive.sha256} "
                             f"({archive.checksum_source}): the file is corrupt, truncated or another version. Delete "
                             f"it and get it again.")
        known = trusted.get(f"{dataset.name}/{archive.file}")
        if not archive.sha256 and known and known != digest:
            raise PilotError(f"'{path}' has sha256 {digest}, but the {archive.file} first prepared here had {known} "
                             f"(recorded in '{root / TRUSTED}'; no hash is published for it): this is another file. "
                             f"Use the first one, or delete its line in {TRUSTED} to trust this one.")
        if not archive.sha256:
            report(f"{archive.file}: no published sha256; " + ("matches the one first trusted here" if known else
                   f"trusting it on first use ({digest}): kept in the manifest and in {TRUSTED}"))
        sources.append({"file": archive.file, "sha256": digest, "size": size, "pinned": bool(archive.sha256),
                        "checksum_source": archive.checksum_source or "trusted on first use: no published hash"})
    return sources


def _record_trusted(root: Path, dataset: DatasetEntry, sources: list[dict[str, Any]]) -> None:
    trusted = _read_trusted(root)
    trusted.update({f"{dataset.name}/{s['file']}": s["sha256"] for s in sources if not s["pinned"]})
    (root / TRUSTED).write_text(json.dumps(trusted, indent=1, sort_keys=True) + "\n", encoding="utf-8")


def extract(path: Path, into: Path) -> None:
    """A .tar(.gz) or .zip, refusing members that would land outside ``into``."""
    into.mkdir(parents=True, exist_ok=True)
    try:
        if path.suffix == ".zip" or zipfile.is_zipfile(path):
            with zipfile.ZipFile(path) as archive:
                for member in archive.namelist():
                    target = (into / member).resolve()
                    if not target.is_relative_to(into.resolve()):
                        raise PilotError(f"'{path}' holds '{member}', which would land outside the dataset folder: "
                                         f"refused. Get the archive from its source again.")
                archive.extractall(into)
        else:
            with tarfile.open(path, "r:*") as archive:
                archive.extractall(into, filter="data")
    except (tarfile.TarError, zipfile.BadZipFile, EOFError, OSError, RuntimeError) as err:
        first_line = str(err).splitlines()[0] if str(err) else ""
        raise PilotError(f"'{path}' cannot be extracted ({type(err).__name__}: {first_line}): it is corrupt or truncated. "
                         f"Delete it and get it again.") from None


# ------------------------------------------------------------------------------------- split rules

def rule_train_count(count: int) -> int:
    """Train images of a class of ``count`` under the 80/20 rule: at least one on each side."""
    return min(max(int(np.floor(TRAIN_FRACTION * count + 0.5)), 1), count - 1)


def rule_split(key: str, names: list[str]) -> tuple[list[str], list[str]]:
    """``names`` (a class's files) split by the documented rule: sorted, shuffled by RandomState(s) with s the
    first 4 bytes of sha256('<SPLIT_SEED>/<key>'), the first round(0.8 n) to train."""
    if len(names) < 2:
        raise PilotError(f"Class '{key}' has {len(names)} image{'s' if len(names) != 1 else ''}: the 80/20 split needs "
                         f"at least 2 (one train, one test). The archive is incomplete: get it again.")
    seed = int.from_bytes(hashlib.sha256(f"{SPLIT_SEED}/{key}".encode()).digest()[:4], "big")
    ordered = sorted(names)
    shuffled = [ordered[i] for i in np.random.RandomState(seed).permutation(len(ordered))]
    cut = rule_train_count(len(ordered))
    return sorted(shuffled[:cut]), sorted(shuffled[cut:])


RULE_SPLIT = {"rule": "80/20 per class", "seed": SPLIT_SEED, "train_fraction": TRAIN_FRACTION,
              "order": "file names sorted, shuffled by numpy RandomState(first 4 bytes of sha256('<seed>/<class>'))"}


def _images(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.iterdir() if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES)


def _subdirs(folder: Path) -> list[Path]:
    return sorted(p for p in folder.iterdir() if p.is_dir() and not p.name.startswith((".", "__MACOSX")))


def _single_top(work: Path, what: str, archive: str) -> Path:
    """The one folder an archive extracts to (``imagenet-r/``, ``CUB_200_2011/``)."""
    tops = _subdirs(work)
    if len(tops) != 1:
        raise PilotError(f"{archive} should extract to one folder ({what}), but holds "
                         f"{', '.join(repr(t.name) for t in tops) or 'none'}: it is not the original archive.")
    return tops[0]


def _move(source: Path, target: Path) -> None:
    target.parent.mkdir(parents=True, exist_ok=True)
    os.replace(source, target)


def _split_classes(classes_root: Path, out: Path, key_prefix: str = "") -> None:
    """Each class folder under ``classes_root`` split by the rule into ``out/{train,test}/<class>/``."""
    classes = _subdirs(classes_root)
    if not classes:
        raise PilotError(f"'{classes_root.name}' in the archive has no class folders: it is not the original archive.")
    for folder in classes:
        train, test = rule_split(f"{key_prefix}{folder.name}", _images(folder))
        for part, names in (("train", train), ("test", test)):
            for name in names:
                _move(folder / name, out / part / folder.name / name)


# ----------------------------------------------------------------------------------------- builders
# Each builds ``out`` (the dataset folder) from the extracted archives in ``work``; returns the split record.

def build_cifar(dataset, files, work: Path, out: Path) -> dict:
    extract(files["cifar-100-python.tar.gz"], work)
    top = _single_top(work, "cifar-100-python/", "cifar-100-python.tar.gz")
    for member in ("train", "test", "meta"):
        if not (top / member).is_file():
            raise PilotError(f"cifar-100-python.tar.gz has no '{top.name}/{member}': it is not the CIFAR-100 python "
                             f"release.")
        _move(top / member, out / member)
    return {"rule": "official train/test files of the release"}


def build_rule_split(dataset, files, work: Path, out: Path) -> dict:
    (archive,) = files
    extract(files[archive], work)
    _split_classes(_single_top(work, f"{dataset.folder}/", archive), out)
    return RULE_SPLIT


def build_cub(dataset, files, work: Path, out: Path) -> dict:
    extract(files["CUB_200_2011.tgz"], work)
    top = work / "CUB_200_2011"
    lists = {name: top / name for name in ("images.txt", "train_test_split.txt")}
    for name, path in lists.items():
        if not path.is_file():
            raise PilotError(f"CUB_200_2011.tgz has no 'CUB_200_2011/{name}': it is not the CUB-200-2011 release.")
    paths = dict(line.split() for line in lists["images.txt"].read_text().splitlines() if line.strip())
    is_train = dict(line.split() for line in lists["train_test_split.txt"].read_text().splitlines() if line.strip())
    images = top / "images"
    listed = set(paths.values())
    unlisted = sorted(set(f"{c.name}/{n}" for c in _subdirs(images) for n in _images(c)) - listed) if images.is_dir() else []
    if unlisted:
        raise PilotError(f"CUB_200_2011/images holds {len(unlisted)} image(s) that images.txt does not list (first: "
                         f"'{unlisted[0]}'): the archive is not the original. Get it again.")
    for image_id, relative in paths.items():
        if image_id not in is_train:
            raise PilotError(f"train_test_split.txt has no line for image {image_id} ('{relative}'): the archive is "
                             f"not the original. Get it again.")
        if not (images / relative).is_file():
            raise PilotError(f"CUB_200_2011/images/{relative}, listed in images.txt, is missing: the archive is "
                             f"incomplete. Get it again.")
        _move(images / relative, out / ("train" if is_train[image_id] == "1" else "test") / relative)
    return {"rule": "official train_test_split.txt of the release"}


def _find_split_root(work: Path, depth: int = 3) -> Optional[Path]:
    """The folder of an extracted PILOT archive that holds train/ and test/ (at most ``depth`` levels down)."""
    level = [work]
    for _ in range(depth + 1):
        for folder in level:
            if (folder / "train").is_dir() and (folder / "test").is_dir():
                return folder
        level = [sub for folder in level for sub in _subdirs(folder)]
    return None


def build_pilot_split(dataset, files, work: Path, out: Path) -> dict:
    (archive,) = files
    extract(files[archive], work)
    found = _find_split_root(work)
    if found is None:
        raise PilotError(f"'{files[archive]}' holds no folder with train/ and test/ inside: it is not PILOT's "
                         f"archive of {dataset.name} ({dataset.pilot_archive or dataset.no_download}).")
    for part in ("train", "test"):
        _move(found / part, out / part)
    return {"rule": "PILOT's archive as distributed: its train/ and test/ folders unchanged"}


def build_domainnet(dataset, files, work: Path, out: Path) -> dict:
    for domain in dataset.domains:
        extract(files[f"{domain}.zip"], work)
        if not (work / domain).is_dir():
            raise PilotError(f"{domain}.zip holds no '{domain}/' folder: it is not DomainNet's {domain} archive.")
        _move(work / domain, out / domain)
        for part in ("train", "test"):
            shutil.copyfile(files[f"{domain}_{part}.txt"], out / f"{domain}_{part}.txt")
    for lists in sorted(out.glob("*.txt")):
        for number, line in enumerate(lists.read_text(encoding="utf-8").splitlines(), 1):
            relative = line.rsplit(maxsplit=1)[0] if line.strip() else ""
            if relative and not (out / relative).is_file():
                raise PilotError(f"'{relative}' (line {number} of {lists.name}) is not in its domain's zip: the "
                                 f"archive is incomplete or another version. Get it again.")
    return {"rule": "official <domain>_train.txt / <domain>_test.txt lists of the release"}


def build_core50(dataset, files, work: Path, out: Path) -> dict:
    extract(files["core50_128x128.zip"], work)
    top = _single_top(work, "core50_128x128/", "core50_128x128.zip")
    sessions = [s for s in _subdirs(top) if s.name.startswith("s") and s.name[1:].isdigit()]
    if not sessions:
        raise PilotError("core50_128x128.zip holds no session folders (s1 ... s11): it is not CORe50's archive.")
    for session in sessions:
        _split_classes(session, out / session.name, key_prefix=f"{session.name}/")
    return {**RULE_SPLIT, "rule": "80/20 per session (domain) and object", "domains": "sessions s1 ... s11"}


def build_officehome(dataset, files, work: Path, out: Path) -> dict:
    extract(files["OfficeHomeDataset_10072016.zip"], work)
    top = _single_top(work, "OfficeHomeDataset_10072016/", "OfficeHomeDataset_10072016.zip")
    for domain in _subdirs(top):
        _split_classes(domain, out / domain.name, key_prefix=f"{domain.name}/")
    return {**RULE_SPLIT, "rule": "80/20 per domain and class"}


BUILDERS = {"cifar": build_cifar, "rule_split": build_rule_split, "cub": build_cub, "pilot_split": build_pilot_split,
            "domainnet": build_domainnet, "core50": build_core50, "officehome": build_officehome}


def check_loads(dataset: DatasetEntry, staging: Path) -> None:
    """The built folder reads with pilot's own loader (before it is renamed into place)."""
    from pilot.data.datasets import load_cifar100, load_folder
    from pilot.data.domains import load_domain_folder, load_domainnet

    folder = staging / dataset.folder
    if dataset.layout == "cifar":
        load_cifar100(str(staging), False, "cifar224")
    elif dataset.layout == "domainnet":
        load_domainnet(str(folder))
    elif dataset.layout in ("core50", "officehome"):
        load_domain_folder(str(folder))
    else:
        load_folder(str(staging), dataset.name)


# ---------------------------------------------------------------------------------------------- get

def get(name: str, root: str, source: Optional[str] = None, pilot_archive: bool = False,
        report: Callable[[str], None] = print) -> Path:
    """Prepare dataset ``name`` under ``root``: its folder and manifest, or an error and no folder."""
    dataset = entry(name)
    root_path = Path(root).expanduser()
    target = root_path / dataset.folder
    if root_path.exists() and not root_path.is_dir():
        raise PilotError(f"--root '{root}' is a file: pass the folder that holds (or will hold) the datasets.")
    if target.exists():
        raise PilotError(f"'{target}' already exists. Check it with 'pilot data verify {name} --root {root}', or "
                         f"delete it to get {name} again.")
    if pilot_archive and not dataset.pilot_archive and dataset.layout != "pilot_split":
        raise PilotError(f"--pilot-archive: PILOT distributes no archive of {name}; get it without --pilot-archive.")
    archives, layout = dataset.archives, dataset.layout
    if pilot_archive and dataset.layout != "pilot_split":
        if source is None:
            raise PilotError(f"--pilot-archive needs --from: PILOT's archives are on Google Drive / OneDrive, which "
                             f"serve them through a web page. Download it in a browser ({dataset.pilot_archive}).")
        archives, layout = (Archive(f"{dataset.folder}-pilot.zip"),), "pilot_split"
    files = locate(dataset, archives, source, root_path, report)
    sources = check_archives(dataset, archives, files, root_path, report)
    root_path.mkdir(parents=True, exist_ok=True)
    staging = root_path / f".pilot-building-{dataset.folder}-{os.getpid()}"
    shutil.rmtree(staging, ignore_errors=True)
    try:
        report(f"{name}: extracting and splitting")
        split = BUILDERS[layout](dataset, files, staging / "extracted", staging / dataset.folder)
        shutil.rmtree(staging / "extracted")
        check_loads(dataset, staging)
        out = staging / dataset.folder
        paths = file_list(out)
        with tqdm(total=len(paths), desc=f"{name}: hashing files", unit="file", disable=None) as bar:
            hashes = hash_files(out, paths, bar.update)
        manifest = make_manifest(name, split, sources, hashes)
        write_manifest(out, manifest)
        os.replace(out, target)
    except OSError as err:  # a full disk, a folder not writable: nothing is left half-built
        raise PilotError(f"Preparing {name} in '{root_path}' failed ({type(err).__name__}: {err}); nothing was kept. "
                         f"Free space or fix the folder's permissions, then run the command again.") from None
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    _record_trusted(root_path, dataset, sources)
    report(f"{name}: {len(paths):,} files in '{target}', manifest {manifest['digest'][:16]} "
           f"(split {manifest['split_digest'][:16]}). Config: {dataset.use.replace('ROOT', str(root_path))}")
    return target


# ------------------------------------------------------------------------------------- verify, list

def verify(name: str, root: str, report: Callable[[str], None] = print) -> dict[str, Any]:
    """Re-hash dataset ``name`` under ``root`` against its manifest; an error naming any file missing, changed
    or extra."""
    from pilot.data.prepared import differences, read_manifest

    dataset = entry(name)
    folder = Path(root).expanduser() / dataset.folder
    if not folder.is_dir():
        raise PilotError(f"{name} is not prepared under '{root}' (no '{folder}'). Prepare it with "
                         f"'pilot data get {name} --root {root}'.")
    manifest = read_manifest(folder)
    with tqdm(total=len(manifest["files"]), desc=f"{name}: hashing files", unit="file", disable=None) as bar:
        found = differences(folder, manifest, bar.update)
    if found:
        raise PilotError(f"'{folder}' differs from its manifest: {'; '.join(found)}. Restore those files, or delete "
                         f"the folder and get {name} again.")
    report(f"{name}: {len(manifest['files']):,} files as in the manifest {manifest['digest'][:16]} ('{folder}')")
    return manifest


def status(name: str, root: str) -> str:
    """Whether ``name`` is prepared under ``root``: by the manifest and the file names (verify re-hashes)."""
    from pilot.data.prepared import MANIFEST, read_manifest

    folder = Path(root).expanduser() / entry(name).folder
    if not folder.is_dir():
        return "absent"
    if not (folder / MANIFEST).is_file():
        return "present, no manifest (not from pilot data get)"
    try:
        manifest = read_manifest(folder)
    except PilotError:
        return "manifest damaged: get again"
    present, recorded = set(file_list(folder)), set(manifest["files"])
    if present != recorded:
        return f"files differ ({len(recorded - present)} missing, {len(present - recorded)} extra): verify"
    return f"prepared, {len(recorded):,} files as listed ({manifest['digest'][:12]}; verify re-hashes)"


def listing(root: str) -> str:
    """``pilot data list``: every dataset, its source, size, classes, split, licence and state here."""
    from pilot.data.catalog import CATALOG

    lines = []
    for dataset in CATALOG.values():
        first = dataset.archives[0]
        pinned = all(a.sha256 for a in dataset.archives)
        source = first.url or dataset.no_download
        lines += [f"{dataset.name}: {dataset.title} ({dataset.classes} classes; {dataset.size})",
                  f"  source:  {source}" + (f" (+{len(dataset.archives) - 1} more files)" if len(dataset.archives) > 1 else ""),
                  f"  sha256:  {'pinned (' + first.checksum_source + ')' if pinned else 'none published: trusted on first use'}",
                  f"  split:   {dataset.split}",
                  f"  licence: {dataset.licence}",
                  f"  config:  {dataset.use.replace('ROOT', root)}",
                  f"  here:    {status(dataset.name, root)}", ""]
    return "\n".join(lines)
