"""One process per run directory: a lock file that names its holder (host, PID, since when).

The lock is an exclusive ``flock`` on ``<run dir>/.pilot.lock``, which the kernel drops when its
process dies, however it dies: a lock file that nobody holds is what a killed run left behind, and
the next run takes it over (with a warning naming the dead holder). The file's text says who holds
a live lock, so the refusal can say which process to wait for. Where ``fcntl`` is missing (Windows),
a lock whose holder ran on this host under a PID that no longer runs is taken over instead.

A run that a sweep started on a Ray worker records the sweep's driver as its owner: a worker whose
driver was killed stops itself (``pilot.sweep``), and the re-run of the sweep waits for it
(``wait_for_orphan``) instead of failing that run as locked.
"""
from __future__ import annotations

import contextlib
import contextvars
import json
import os
import socket
import time
import warnings
from collections.abc import Iterator
from pathlib import Path
from typing import Optional

try:
    import fcntl
except ImportError:
    fcntl = None

from pilot.errors import PilotError

LOCK_NAME = ".pilot.lock"
_OWNER: contextvars.ContextVar[Optional[dict]] = contextvars.ContextVar("pilot_run_owner", default=None)


class RunLocked(PilotError):
    """Another live process holds the run directory."""


@contextlib.contextmanager
def run_lock(run_dir: Path) -> Iterator[None]:
    """Hold ``run_dir`` (created if missing) for the block; ``RunLocked`` if another process holds it."""
    path = Path(run_dir) / LOCK_NAME
    path.parent.mkdir(parents=True, exist_ok=True)
    fd = _acquire(path)
    try:
        yield
    finally:
        _release(path, fd)


@contextlib.contextmanager
def owned_by(owner: dict) -> Iterator[None]:
    """Locks taken in the block name ``owner`` (``{"host", "pid"}`` of a sweep's driver) as their owner."""
    token = _OWNER.set(owner)
    try:
        yield
    finally:
        _OWNER.reset(token)


def wait_for_orphan(run_dir: Path, timeout: float = 120.0) -> None:
    """Wait until a run left by a killed sweep (its owner dead on this host) lets go of ``run_dir``.
    Such a run is stopping itself; a live owner, or a lock without one, is not waited for."""
    path = Path(run_dir) / LOCK_NAME
    holder = _holder(path)
    owner = (holder or {}).get("owner")
    if fcntl is None or not isinstance(owner, dict) or alive_here(owner):
        return
    deadline = time.monotonic() + timeout
    while _is_held(path):
        if time.monotonic() > deadline:
            raise RunLocked(f"'{path.parent}' is still held by {_describe(holder)}, a run left by a sweep that was "
                            f"killed (its driver, pid {owner.get('pid')}, is gone): stop that process "
                            f"(kill {holder.get('pid')}) and re-run the sweep.")
        time.sleep(0.05)


def _is_held(path: Path) -> bool:
    try:
        fd = os.open(path, os.O_RDONLY)
    except FileNotFoundError:
        return False
    try:
        fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
        return False
    except BlockingIOError:
        return True
    finally:
        os.close(fd)  # closing drops a shared lock taken just to look


def _release(path: Path, fd: int) -> None:
    """Remove the lock file while still holding it (so no one locks a file about to vanish), then let go.
    Never raises: it runs while the block's own error (e.g. a folder made read-only) is on its way out.
    A file that cannot be removed is emptied where it can be, so the next run takes it over silently."""
    try:
        path.unlink(missing_ok=True)
    except OSError:
        with contextlib.suppress(OSError):
            os.ftruncate(fd, 0)
    with contextlib.suppress(OSError):
        os.close(fd)


def _acquire(path: Path) -> int:
    while True:
        fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            _lock_or_refuse(fd, path)
        except BaseException:
            os.close(fd)
            raise
        with contextlib.suppress(FileNotFoundError):
            if os.stat(path).st_ino == os.fstat(fd).st_ino:
                break
        os.close(fd)  # its holder removed the file between our open and lock: lock the new one
    previous = _holder(path)
    if previous:
        warnings.warn(f"'{path.parent}' was locked by {_describe(previous)}, which is no longer running (killed?); "
                      f"this process takes the run over.", stacklevel=4)
    os.ftruncate(fd, 0)
    os.write(fd, json.dumps(_me()).encode())
    os.fsync(fd)
    return fd


def _lock_or_refuse(fd: int, path: Path) -> None:
    holder = _holder(path)
    if fcntl is not None:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            return
        except BlockingIOError:
            pass
    elif not holder or not alive_here(holder):
        return
    raise RunLocked(f"'{path.parent}' is in use by {_describe(holder) if holder else 'another process'}. Two "
                    f"processes would overwrite each other's checkpoints and results: wait for it to finish or stop "
                    f"it, or give this run another \"prefix\" or log_dir.")


def _me() -> dict:
    me = {"host": socket.gethostname(), "pid": os.getpid(), "since": time.strftime("%Y-%m-%d %H:%M:%S")}
    return {**me, "owner": _OWNER.get()} if _OWNER.get() else me


def _holder(path: Path) -> Optional[dict]:
    try:
        holder = json.loads(path.read_text() or "null")
    except (OSError, ValueError):
        return None
    return holder if isinstance(holder, dict) else None


def _describe(holder: dict) -> str:
    return f"pid {holder.get('pid')} on host {holder.get('host')} (since {holder.get('since')})"


def alive_here(holder: dict) -> bool:
    """Whether a process (``{"host", "pid"}``) may still run: on another host we cannot tell, so it may."""
    if holder.get("host") != socket.gethostname():
        return True
    try:
        os.kill(int(holder.get("pid")), 0)  # signal 0 only asks whether the process exists
    except ProcessLookupError:
        return False
    except (PermissionError, TypeError, ValueError):  # another user's process, or no PID recorded: assume alive
        pass
    return True
