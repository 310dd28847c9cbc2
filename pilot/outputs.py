"""Run outputs, each written atomically (a temporary file renamed into place), so a killed run
never leaves a truncated file: results.json, metrics.csv, TensorBoard scalars, a plain log; progress
bars on a terminal, and a log line per finished phase."""
from __future__ import annotations

import csv
import importlib.util
import io
import json
import logging
import math
import os
import sys
import tempfile
import time
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Any, Callable, Optional

from tqdm import tqdm

from pilot.errors import PilotError

CSV_COLUMNS = ["task", "classes_seen", "domain", "accuracy", "average_incremental_accuracy", "old_accuracy",
               "new_accuracy", "forgetting", "backward_transfer", "class_il_accuracy", "task_il_accuracy",
               "train_seconds", "eval_seconds"]
TEMP_SUFFIX = ".tmp"


class WriteFailed(PilotError):
    """A file could not be written (disk full, no permission); the previous version is untouched."""


def atomic_write_bytes(path: Path, data: bytes) -> None:
    """Write ``data`` to a temporary file beside ``path``, then rename it into place: readers (and a
    run killed meanwhile) see the old file or the new one, never part of one. A failed write keeps the
    old file and raises ``WriteFailed``."""
    path = Path(path)
    tmp = None
    try:
        fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=TEMP_SUFFIX)
        with os.fdopen(fd, "wb") as handle:
            handle.write(data)
            handle.flush()
            os.fsync(handle.fileno())
        os.chmod(tmp, 0o666 & ~current_umask())  # mkstemp makes 0600: give what open() would, as run.log gets
        os.replace(tmp, path)
    except OSError as err:
        raise WriteFailed(f"Could not write '{path}' ({os.strerror(err.errno) if err.errno else err}); its previous "
                          f"version is intact. Free disk space or fix the folder's permissions, then continue "
                          f"with --resume.") from None
    finally:
        if tmp is not None and os.path.exists(tmp):
            os.unlink(tmp)


def current_umask() -> int:
    """The process's umask (reading it means setting it: set it straight back)."""
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def require_folder(path: str | Path, key: str) -> None:
    """``path`` (the folder of config key ``key``, made when first written) is one, or can become one, and can
    be written: checked before any work, since a file in its place would fail only after the work whose
    results it should keep. Nothing is created here."""
    if not path:
        return
    existing = next(p for p in (Path(path), *Path(path).parents) if p.exists())
    if not existing.is_dir() or not os.access(existing, os.W_OK | os.X_OK):
        why = "cannot be written (permission denied)" if existing.is_dir() else "is a file, not a folder"
        raise PilotError(f"Cannot write to '{path}' ({key}): '{existing}' {why}. Set {key} to a folder you can "
                         f"write to (created if missing).")


def atomic_write_text(path: Path, text: str) -> None:
    atomic_write_bytes(path, text.encode())


def remove_temporaries(folder: Path, name: str = "") -> list[Path]:
    """Delete the temporary files that a killed writer left in ``folder`` (never read by anyone), of the
    file ``name`` only if given. Call it where no live writer can be writing one (under a lock)."""
    leftovers = sorted(Path(folder).glob(f".{name}.*{TEMP_SUFFIX}" if name else f".*{TEMP_SUFFIX}"))
    for leftover in leftovers:
        leftover.unlink(missing_ok=True)
    return leftovers


def _json_safe(value: Any) -> Any:
    """NaN is not JSON: write null instead."""
    if isinstance(value, float) and math.isnan(value):
        return None
    if isinstance(value, dict):
        return {k: _json_safe(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_json_safe(v) for v in value]
    return value


def write_json(path: Path, data: dict) -> None:
    atomic_write_text(path, json.dumps(_json_safe(data), indent=2) + "\n")


def write_csv(path: Path, rows: list[dict]) -> None:
    buffer = io.StringIO()
    writer = csv.DictWriter(buffer, fieldnames=CSV_COLUMNS, extrasaction="ignore")
    writer.writeheader()
    for row in rows:
        writer.writerow({k: ("" if isinstance(v, float) and math.isnan(v) else v) for k, v in row.items()})
    atomic_write_text(path, buffer.getvalue())


def open_log(run_dir: Path, name: str, to_file: bool = True) -> logging.Logger:
    """A logger writing to ``run_dir/run.log`` and the console, one per run directory (``to_file=False``:
    neither, for torchrun's other ranks). Errors go to the file alone: the exception reaches the caller,
    and the CLI prints it once."""
    logger = logging.getLogger(f"pilot.run.{name}")
    logger.setLevel(logging.INFO)
    logger.propagate = False
    for handler in list(logger.handlers):
        handler.close()
        logger.removeHandler(handler)
    formatter = logging.Formatter("%(asctime)s %(message)s", "%H:%M:%S")
    console = logging.StreamHandler()
    console.addFilter(lambda record: record.levelno < logging.ERROR)
    handlers = (logging.FileHandler(run_dir / "run.log"), console) if to_file else (logging.NullHandler(),)
    for handler in handlers:
        handler.setFormatter(formatter)
        logger.addHandler(handler)
    return logger


def close_log(logger: logging.Logger) -> None:
    for handler in list(logger.handlers):
        handler.close()
        logger.removeHandler(handler)


# Told each phase's batches so far (batches, images, seconds): what times a run (``pilot.engine.SizeCheck``).
BatchWatcher = Callable[[int, int, float], None]


def progress_bar() -> tuple[Callable[..., Any], bool]:
    """The bar to draw and whether to draw it: a widget in a Jupyter notebook (where ipywidgets is installed),
    text on a terminal, none where output is redirected (a log file gets the phase's line instead)."""
    shell = getattr(sys.modules.get("IPython"), "get_ipython", lambda: None)()
    if type(shell).__name__ == "ZMQInteractiveShell" and importlib.util.find_spec("ipywidgets") is not None:
        from tqdm.notebook import tqdm as notebook_bar

        return notebook_bar, True
    return tqdm, sys.stderr.isatty()


class Phase:
    """One phase of a run (an encoding pass, an epoch) over batches whose first item holds the images: a
    progress bar on a terminal and only there, then one line in the run's log when the phase ends, so
    run.log and redirected output get whole lines, never a bar's carriage-return fragments."""

    def __init__(self, batches: Iterable, desc: str, log: logging.Logger, show_bar: bool = True,
                 watcher: Optional[BatchWatcher] = None):
        bar, shown = progress_bar()
        self.bar = bar(batches, desc=desc, leave=False, disable=not (show_bar and shown))
        self.desc, self.log, self.watcher = desc, log, watcher
        self.values: dict[str, str] = {}

    def note(self, **values: str) -> None:
        """Values shown beside the bar; the last ones noted end the phase's log line (e.g. mean_loss)."""
        self.values = values
        self.bar.set_postfix(values, refresh=False)

    def __iter__(self) -> Iterator:
        started = time.perf_counter()
        batches = images = 0
        for batch in self.bar:
            yield batch
            batches, images = batches + 1, images + len(batch[0])
            if self.watcher is not None:
                self.watcher(batches, images, time.perf_counter() - started)
        noted = "".join(f", {name.replace('_', ' ')} {value}" for name, value in self.values.items())
        self.log.info(f"{self.desc}: {images} images in {batches} batch{'' if batches == 1 else 'es'}, "
                      f"{time.perf_counter() - started:.1f}s{noted}")


def finite_scalars(values: dict[str, Any]) -> dict[str, float]:
    """The numeric, non-NaN entries: what scalar trackers can log."""
    return {k: float(v) for k, v in values.items() if isinstance(v, (int, float)) and not math.isnan(v)}


class TensorBoardScalars:
    """Per-task scalars under ``run_dir/tensorboard``; optional if tensorboard is missing."""

    def __init__(self, run_dir: Path):
        try:
            from torch.utils.tensorboard import SummaryWriter
        except ImportError:
            self.writer = None
            return
        self.writer = SummaryWriter(str(run_dir / "tensorboard"))

    def add(self, step: int, values: dict[str, float]) -> None:
        if self.writer is None:
            return
        for name, value in finite_scalars(values).items():
            self.writer.add_scalar(name, value, step)
        self.writer.flush()

    def close(self) -> None:
        if self.writer is not None:
            self.writer.close()
