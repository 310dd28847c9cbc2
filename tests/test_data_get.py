"""`pilot data get / verify / list`, offline: for every dataset a tiny archive with the original's layout (built
here) goes through `get --from`, `verify` and a SimpleCIL run; bad archives give one error and leave no folder;
the download path runs against a local HTTP server, resuming a partial file by Range."""
from __future__ import annotations

import dataclasses
import io
import json
import pickle
import tarfile
import threading
import zipfile
import zlib
from functools import partial
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from conftest import clean_error, tiny_raw
from pilot.cli import main
from pilot.configure import build_config
from pilot.data import catalog, fetch
from pilot.data.prepared import read_manifest, split_digest
from pilot.digests import sha256_of
from pilot.engine import run_experiment
from pilot.errors import PilotError


def png(seed: int) -> bytes:
    pixels = np.random.RandomState(seed).randint(0, 256, size=(8, 8, 3), dtype=np.uint8)
    buffer = io.BytesIO()
    Image.fromarray(pixels).save(buffer, format="PNG")
    return buffer.getvalue()


def write_tar(path: Path, members: dict[str, bytes]) -> Path:
    with tarfile.open(path, "w:gz" if path.name.endswith(("gz", "tgz")) else "w") as archive:
        for name, data in sorted(members.items()):
            info = tarfile.TarInfo(name)
            info.size, info.mtime = len(data), 0  # the same bytes on every machine
            archive.addfile(info, io.BytesIO(data))
    return path


def write_zip(path: Path, members: dict[str, bytes]) -> Path:
    with zipfile.ZipFile(path, "w") as archive:
        for name, data in sorted(members.items()):
            archive.writestr(zipfile.ZipInfo(name, (2000, 1, 1, 0, 0, 0)), data)
    return path


def images(prefix: str, classes: list[str], per_class: int, suffix: str = ".jpg") -> dict[str, bytes]:
    return {f"{prefix}{c}/{c}_{i:03d}{suffix}": png(zlib.crc32(f"{c}/{i}".encode())) for c in classes for i in range(per_class)}


WNIDS = ["n01443537", "n01484850", "n01494475"]


def cifar_members() -> dict[str, bytes]:
    rng = np.random.RandomState(0)
    members = {}
    for part, count in (("train", 4), ("test", 2)):
        labels = np.repeat(np.arange(3), count).tolist()
        data = rng.randint(0, 256, size=(len(labels), 3072), dtype=np.uint8)
        members[f"cifar-100-python/{part}"] = pickle.dumps({"data": data, "fine_labels": labels, "filenames": [],
                                                             "batch_label": part})
    members["cifar-100-python/meta"] = pickle.dumps({"fine_label_names": ["apple", "bear", "cup"]})
    return members


def cub_members() -> dict[str, bytes]:
    members = images("CUB_200_2011/images/", ["001.Black_footed_Albatross", "002.Laysan_Albatross",
                                              "003.Sooty_Albatross"], 4)
    names = sorted(m[len("CUB_200_2011/images/"):] for m in members)
    members["CUB_200_2011/images.txt"] = "".join(f"{i + 1} {n}\n" for i, n in enumerate(names)).encode()
    members["CUB_200_2011/train_test_split.txt"] = "".join(f"{i + 1} {int(i % 4 < 3)}\n" for i in range(len(names))).encode()
    members["CUB_200_2011/classes.txt"] = b"1 001.Black_footed_Albatross\n"
    return members


def pilot_members(top: str) -> dict[str, bytes]:
    classes = ["alarm_clock", "banana", "candle"]
    return {**images(f"{top}train/", classes, 3), **images(f"{top}test/", classes, 1)}


DOMAINS = catalog.DOMAINNET_DOMAINS


def domainnet_files(folder: Path) -> None:
    for d, domain in enumerate(DOMAINS):
        members = images(f"{domain}/", ["aircraft_carrier", "airplane"], 3)
        write_zip(folder / f"{domain}.zip", members)
        names = sorted(members)
        labels = {"aircraft_carrier": 0, "airplane": 1}
        for part, keep in (("train", (0, 1)), ("test", (2,))):
            lines = [f"{n} {labels[n.split('/')[1]]}\n" for n in names if int(n[-7:-4]) in keep]
            (folder / f"{domain}_{part}.txt").write_text("".join(lines))


# dataset -> (archive file name, how to make it); DomainNet is a folder of 18 files.
ARCHIVES = {
    "cifar100": ("cifar-100-python.tar.gz", lambda p: write_tar(p, cifar_members())),
    "imagenetr": ("imagenet-r.tar", lambda p: write_tar(p, images("imagenet-r/", WNIDS, 5))),
    "imageneta": ("imagenet-a.tar", lambda p: write_tar(p, {**images("imagenet-a/", WNIDS, 4),
                                                            "imagenet-a/README.txt": b"ImageNet-A\n"})),
    "cub": ("CUB_200_2011.tgz", lambda p: write_tar(p, cub_members())),
    "objectnet": ("objectnet.zip", lambda p: write_zip(p, pilot_members("objectnet/"))),
    "omnibenchmark": ("omnibenchmark.zip", lambda p: write_zip(p, pilot_members("omnibenchmark/"))),
    "vtab": ("vtab.zip", lambda p: write_zip(p, pilot_members("vtab-cil/vtab/"))),
    "core50": ("core50_128x128.zip", lambda p: write_zip(p, {
        f"core50_128x128/{s}/{m}": data for s in ("s1", "s2") for m, data in images("", ["o1", "o2"], 4, ".png").items()})),
    "officehome": ("OfficeHomeDataset_10072016.zip", lambda p: write_zip(p, {
        **images("OfficeHomeDataset_10072016/Art/", ["Alarm_Clock", "Bike"], 4),
        **images("OfficeHomeDataset_10072016/Real World/", ["Alarm_Clock", "Bike"], 4),
        "OfficeHomeDataset_10072016/ImageInfo.csv": b"x\n"})),
}
# How a run reads each prepared dataset (data_path relative to --root).
RUNS = {"cifar100": ("cifar224", "", {}), "domainnet": ("domainnet", "", {"scenario": "domain"}),
        "core50": ("domain_folder", "core50", {"scenario": "domain"}),
        "officehome": ("domain_folder", "officehome", {"scenario": "domain"})}


def pinned_to(name: str, files: dict[str, Path]) -> catalog.DatasetEntry:
    """The catalog entry with the test archives' hashes pinned in place of the real ones."""
    dataset = catalog.CATALOG[name]
    archives = tuple(dataclasses.replace(a, sha256=sha256_of(files[a.file]), size=files[a.file].stat().st_size)
                     if a.sha256 else a for a in dataset.archives)
    return dataclasses.replace(dataset, archives=archives)


@pytest.fixture(scope="module")
def sources(tmp_path_factory) -> dict[str, Path]:
    folder = tmp_path_factory.mktemp("archives")
    made = {name: make(folder / file) for name, (file, make) in ARCHIVES.items()}
    (folder / "domainnet").mkdir()
    domainnet_files(folder / "domainnet")
    return {**made, "domainnet": folder / "domainnet"}


@pytest.fixture(scope="module", autouse=True)
def test_pins(sources):
    """Pinned datasets carry the test archives' hashes (the real ones could never match a test archive)."""
    with pytest.MonkeyPatch.context() as patch:
        for name, path in sources.items():
            files = {p.name: p for p in path.iterdir()} if path.is_dir() else {catalog.CATALOG[name].archives[0].file: path}
            patch.setitem(catalog.CATALOG, name, pinned_to(name, files))
        yield


def quiet(_: str) -> None:
    pass


@pytest.mark.parametrize("name", list(catalog.CATALOG))
def test_every_dataset_gets_verifies_and_runs(name, sources, tmp_path):
    root = tmp_path / "data"
    target = fetch.get(name, str(root), str(sources[name]), report=quiet)
    assert target == root / catalog.CATALOG[name].folder
    assert [p.name for p in root.iterdir() if p.name.startswith(".pilot-building")] == []
    manifest = fetch.verify(name, str(root), report=quiet)
    assert manifest["sources"][0]["pinned"] == bool(catalog.CATALOG[name].archives[0].sha256)
    dataset, sub, extra = RUNS.get(name, (name, "", {}))
    raw = tiny_raw(tmp_path, dataset=dataset, data_path=str(root / sub), init_cls=2, increment=1, max_tasks=1,
                   **extra)
    (result,) = run_experiment(build_config(raw))
    assert result["status"] == "complete" and result["dataset_manifest"] == manifest["digest"]


def test_the_rule_split_is_the_same_on_every_machine(sources, tmp_path):
    """The file lists of the 80/20 rule are pinned: a change of rule, order or seed changes this hash."""
    fetch.get("imagenetr", str(tmp_path), str(sources["imagenetr"]), report=quiet)
    manifest = read_manifest(tmp_path / "imagenet-r")
    train = sorted(p for p in manifest["files"] if p.startswith("train/"))
    assert len(train) == 12 and len(manifest["files"]) == 15  # round(0.8 * 5) = 4 of each class's 5
    assert manifest["split_digest"] == split_digest(list(manifest["files"]))
    assert sorted(p for p in manifest["files"] if p.startswith("test/")) == [
        "test/n01443537/n01443537_000.jpg", "test/n01484850/n01484850_003.jpg", "test/n01494475/n01494475_004.jpg"]
    assert manifest["split_digest"] == "2f0f034892a97512a8a58a00641119255f0b6b02cf45fca325f6743cec49d3cd"


def test_the_rule_is_the_documented_permutation():
    """sha256('1993/n01443537')'s first 4 bytes seed RandomState; its permutation of 5 is [1 3 4 2 0]: the first
    round(0.8 * 5) = 4 positions go to train, position 0 (n01443537_000) to test."""
    import hashlib
    seed = int.from_bytes(hashlib.sha256(b"1993/n01443537").digest()[:4], "big")
    assert np.random.RandomState(seed).permutation(5).tolist() == [1, 3, 4, 2, 0]
    names = [f"n01443537_{i:03d}.jpg" for i in range(5)]
    assert fetch.rule_split("n01443537", names[::-1]) == (names[1:], names[:1])  # the input order does not matter
    assert [fetch.rule_train_count(n) for n in (2, 3, 5, 10, 11)] == [1, 2, 4, 8, 9]


@clean_error
def test_a_corrupted_archive_is_refused_and_leaves_nothing(sources, tmp_path):
    bad = tmp_path / "imagenet-r.tar"
    data = bytearray(sources["imagenetr"].read_bytes())
    data[len(data) // 2] ^= 0xFF
    bad.write_bytes(bytes(data))
    with pytest.raises(PilotError, match="published sha256 is .* corrupt, truncated or another version"):
        fetch.get("imagenetr", str(tmp_path / "data"), str(bad), report=quiet)
    assert not (tmp_path / "data").exists()


@clean_error
def test_a_truncated_archive_is_refused_and_leaves_nothing(sources, tmp_path):
    pinned = tmp_path / "pinned" / "imagenet-r.tar"
    pinned.parent.mkdir()
    pinned.write_bytes(sources["imagenetr"].read_bytes()[:1000])
    with pytest.raises(PilotError, match="has 1,000 bytes, but imagenet-r.tar has .* truncated"):
        fetch.get("imagenetr", str(tmp_path / "data"), str(pinned), report=quiet)
    cut = tmp_path / "core50_128x128.zip"  # no published hash: the archive itself must say it is cut short
    cut.write_bytes(sources["core50"].read_bytes()[:-200])
    with pytest.raises(PilotError, match="cannot be extracted .* corrupt or truncated"):
        fetch.get("core50", str(tmp_path / "data"), str(cut), report=quiet)
    assert sorted(p.name for p in (tmp_path / "data").iterdir()) == []


@clean_error
def test_an_extra_or_missing_file_is_refused_and_leaves_nothing(tmp_path):
    extra = cub_members()
    extra["CUB_200_2011/images/001.Black_footed_Albatross/stray.jpg"] = png(9)
    with pytest.MonkeyPatch.context() as patch:  # an unpinned copy: the lists inside must catch it
        patch.setitem(catalog.CATALOG, "cub", dataclasses.replace(catalog.CATALOG["cub"], archives=(
            catalog.Archive("CUB_200_2011.tgz"),)))
        with pytest.raises(PilotError, match="1 image.* that images.txt does not list .*stray.jpg"):
            fetch.get("cub", str(tmp_path / "data"), str(write_tar(tmp_path / "CUB_200_2011.tgz", extra)), report=quiet)
        missing = cub_members()
        del missing["CUB_200_2011/images/003.Sooty_Albatross/003.Sooty_Albatross_001.jpg"]
        with pytest.raises(PilotError, match="003.Sooty_Albatross_001.jpg, listed in images.txt, is missing"):
            fetch.get("cub", str(tmp_path / "data"), str(write_tar(tmp_path / "CUB_200_2011.tgz", missing)), report=quiet)
    assert not (tmp_path / "data" / "cub").exists()
    assert [p for p in (tmp_path / "data").iterdir() if p.name.startswith(".pilot-building")] == []


def test_pilot_archive_keeps_its_split_and_is_another_manifest(sources, tmp_path):
    pilot_zip = write_zip(tmp_path / "imagenet-r.zip", {
        **images("imagenet-r/train/", WNIDS, 3), **images("imagenet-r/test/", WNIDS, 1)})
    with pytest.raises(PilotError, match="--pilot-archive needs --from"):
        fetch.get("imagenetr", str(tmp_path / "a"), pilot_archive=True, report=quiet)
    fetch.get("imagenetr", str(tmp_path / "a"), str(pilot_zip), pilot_archive=True, report=quiet)
    fetch.get("imagenetr", str(tmp_path / "b"), str(sources["imagenetr"]), report=quiet)
    ours, theirs = (read_manifest(tmp_path / side / "imagenet-r") for side in ("b", "a"))
    assert theirs["split"]["rule"].startswith("PILOT's archive") and not theirs["sources"][0]["pinned"]
    assert sorted(theirs["files"]) == sorted(f"{part}/{name}" for part, count in (("train", 3), ("test", 1))
                                             for name in images("", WNIDS, count))
    assert ours["digest"] != theirs["digest"]
    with pytest.raises(PilotError, match="PILOT distributes no archive of domainnet"):
        fetch.get("domainnet", str(tmp_path / "c"), str(pilot_zip), pilot_archive=True, report=quiet)


@clean_error
def test_a_wrong_from_path_says_what_it_needs(sources, tmp_path):
    with pytest.raises(PilotError, match="--from '.*nowhere.tar' does not exist: pass the downloaded archive"):
        fetch.get("imagenetr", str(tmp_path / "data"), str(tmp_path / "nowhere.tar"), report=quiet)
    with pytest.raises(PilotError, match="is one file, but domainnet comes in 18 files"):
        fetch.get("domainnet", str(tmp_path / "data"), str(sources["imagenetr"]), report=quiet)
    with pytest.raises(PilotError, match="--root '.*imagenet-r.tar' is a file"):
        fetch.get("imagenetr", str(sources["imagenetr"]), str(sources["imagenetr"]), report=quiet)
    assert not (tmp_path / "data").exists()


def test_an_archive_without_published_hash_is_trusted_on_first_use(sources, tmp_path):
    root = tmp_path / "data"
    fetch.get("core50", str(root), str(sources["core50"]), report=quiet)
    trusted = json.loads((root / fetch.TRUSTED).read_text())
    assert trusted == {"core50/core50_128x128.zip": sha256_of(sources["core50"])}
    assert read_manifest(root / "core50")["sources"][0]["checksum_source"].startswith("trusted on first use")
    other = write_zip(tmp_path / "core50_128x128.zip", {
        f"core50_128x128/s1/{m}": d for m, d in images("", ["o1", "o2"], 5, ".png").items()})
    (root / "core50").rename(tmp_path / "old")
    with pytest.raises(PilotError, match="but the core50_128x128.zip first prepared here had .* another file"):
        fetch.get("core50", str(root), str(other), report=quiet)
    assert not (root / "core50").exists()


def test_verify_names_missing_changed_and_extra_files(sources, tmp_path):
    fetch.get("objectnet", str(tmp_path), str(sources["objectnet"]), report=quiet)
    folder = tmp_path / "objectnet"
    (folder / "train/banana/banana_000.jpg").unlink()
    (folder / "test/candle/candle_000.jpg").write_bytes(png(99))
    (folder / "train/banana/new.jpg").write_bytes(png(98))
    with pytest.raises(PilotError) as err:
        fetch.verify("objectnet", str(tmp_path), report=quiet)
    assert ("1 missing ('train/banana/banana_000.jpg'); 1 changed ('test/candle/candle_000.jpg'); "
            "1 extra ('train/banana/new.jpg')") in str(err.value)


def test_the_cli_lists_gets_and_verifies(sources, tmp_path, capsys):
    root = str(tmp_path)
    assert main(["data", "get", "vtab", "--root", root, "--from", str(sources["vtab"])]) == 0
    assert main(["data", "verify", "vtab", "--root", root]) == 0
    assert main(["data", "list", "--root", root]) == 0
    out = capsys.readouterr().out
    assert "vtab: VTAB" in out and "here:    prepared, 12 files as listed" in out and "here:    absent" in out
    assert main(["data", "get", "vtab", "--root", root, "--from", str(sources["vtab"])]) == 2
    assert "already exists" in capsys.readouterr().err


class RangeServer(BaseHTTPRequestHandler):
    """Serves one file, honouring 'Range: bytes=N-'; with ``cut`` set, the first response stops short."""

    def __init__(self, payload: bytes, state: dict, *args, **kwargs):
        self.payload, self.state = payload, state
        super().__init__(*args, **kwargs)

    def do_GET(self):
        start = int(self.headers["Range"].split("=")[1].rstrip("-")) if self.headers.get("Range") else 0
        self.state["ranges"].append(start)
        self.send_response(206 if start else 200)
        self.send_header("Content-Length", str(len(self.payload) - start))
        self.end_headers()
        body = self.payload[start:]
        if self.state.pop("cut", False):
            body = body[: len(body) // 2]
            self.close_connection = True
        self.wfile.write(body)

    def log_message(self, *args):
        pass


def test_the_download_resumes_a_partial_file(sources, tmp_path):
    payload = sources["imagenetr"].read_bytes()
    state = {"ranges": [], "cut": True}
    server = ThreadingHTTPServer(("127.0.0.1", 0), partial(RangeServer, payload, state))
    threading.Thread(target=server.serve_forever, daemon=True).start()
    url = f"http://127.0.0.1:{server.server_address[1]}/imagenet-r.tar"
    try:
        with pytest.MonkeyPatch.context() as patch:
            dataset = catalog.CATALOG["imagenetr"]
            patch.setitem(catalog.CATALOG, "imagenetr", dataclasses.replace(
                dataset, archives=(dataclasses.replace(dataset.archives[0], url=url),)))
            with pytest.raises(PilotError, match=r"stopped after .* of .* bytes.*run the same command again to resume"):
                fetch.get("imagenetr", str(tmp_path), report=quiet)
            part = tmp_path / fetch.DOWNLOADS / "imagenet-r.tar.part"
            assert 0 < part.stat().st_size < len(payload) and not (tmp_path / "imagenet-r").exists()
            fetch.get("imagenetr", str(tmp_path), report=quiet)
    finally:
        server.shutdown()
    assert state["ranges"] == [0, len(payload) // 2]
    assert (tmp_path / fetch.DOWNLOADS / "imagenet-r.tar").read_bytes() == payload
    fetch.verify("imagenetr", str(tmp_path), report=quiet)
