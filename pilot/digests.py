"""Content hashes of files, each version of a file (its path, size and modification time) read once per
process: the runs, seeds and candidates of one process share weights files and dataset archives, which
can be large."""
from __future__ import annotations

import functools
import hashlib
from collections.abc import Sequence
from pathlib import Path


def sha256_of(path: Path) -> str:
    """The sha256 (hex) of the file's bytes: reads the whole file."""
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def files_sha256(paths: Sequence[Path]) -> str:
    """The sha256 of one file, or of several the sha256 of their digests in order; each version of a file
    is read once per process."""
    digests = [_version_sha256(str(path.resolve()), stat.st_size, stat.st_mtime_ns)
               for path, stat in ((Path(p), Path(p).stat()) for p in paths)]
    return digests[0] if len(digests) == 1 else hashlib.sha256("".join(digests).encode()).hexdigest()


@functools.lru_cache(maxsize=None)
def _version_sha256(path: str, size: int, mtime_ns: int) -> str:
    return sha256_of(Path(path))
