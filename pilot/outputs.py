"""Run outputs, each written atomically (a temporary file renamed into place), so a killed run
never leaves a truncated file: results.json, metrics.csv, TensorBoard scalars, a plain log."""
from __future__ import annotations

import csv
import io
import json
import logging
import math
import os
import tempfile
from pathlib import Path
from typing import Any

import torch

CSV_COLUMNS = ["task", "classes_seen", "accuracy", "average_incremental_accuracy", "old_accuracy",
               "new_accuracy", "forgetting", "backward_transfer", "train_seconds", "eval_seconds"]


def _atomic_write(path: Path, write) -> None:
    path = Path(path)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as handle:
            write(handle)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def atomic_write_text(path: Path, text: str) -> None:
    _atomic_write(path, lambda handle: handle.write(text.encode()))


def atomic_torch_save(obj: Any, path: Path) -> None:
    _atomic_write(path, lambda handle: torch.save(obj, handle))


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
    neither, for torchrun's other ranks)."""
    logger = logging.getLogger(f"pilot.run.{name}")
    logger.setLevel(logging.INFO)
    logger.propagate = False
    for handler in list(logger.handlers):
        handler.close()
        logger.removeHandler(handler)
    formatter = logging.Formatter("%(asctime)s %(message)s", "%H:%M:%S")
    handlers = (logging.FileHandler(run_dir / "run.log"), logging.StreamHandler()) if to_file else (logging.NullHandler(),)
    for handler in handlers:
        handler.setFormatter(formatter)
        logger.addHandler(handler)
    return logger


def close_log(logger: logging.Logger) -> None:
    for handler in list(logger.handlers):
        handler.close()
        logger.removeHandler(handler)


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
