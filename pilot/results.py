"""A run's record: results.json (status, config, metrics, per-task rows, timings) and metrics.csv,
written once per completed task, and once more where the run fails, saying why. Under torchrun only
rank 0 writes; every rank gets the same record back.
"""
from __future__ import annotations

import contextlib
import json
import platform
import resource
import traceback
from pathlib import Path
from typing import Any, Optional

import numpy as np
import torch

from pilot import __version__
from pilot.assembly import Assembly
from pilot.data.prepared import recorded_digest
from pilot.distributed import is_main
from pilot.errors import PilotError
from pilot.metrics import AccuracyMatrix
from pilot.outputs import write_csv, write_json

# The record's layout. 2: tasks numbered from 1 in "per_task" and metrics.csv, as on the console; a record
# without "format" is layout 1, whose rows numbered them from 0 (the same keys otherwise).
RESULTS_FORMAT = "pilot-results/2"


def is_complete(run_dir: Path) -> bool:
    try:
        return json.loads((run_dir / "results.json").read_text())["status"] == "complete"
    except (OSError, ValueError, KeyError):
        return False


def versions() -> dict[str, str]:
    found = {"pilot": __version__, "python": platform.python_version(), "torch": torch.__version__,
             "numpy": np.__version__}
    for module in ("timm", "open_clip", "torchvision"):
        with contextlib.suppress(ImportError):
            found[module] = __import__(module).__version__
    return found


def peak_memory_mb(device: torch.device) -> dict[str, float]:
    peak = {"host_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}
    if device.type == "cuda":
        peak["cuda_allocated_mb"] = torch.cuda.max_memory_allocated(device) / 2**20
    return peak


def failure(err: BaseException, task: int) -> tuple[str, dict[str, Any]]:
    """The status of a run that ``err`` stopped in (0-based) ``task``, and its error record; a bug's
    record keeps the traceback, a user's fault (PilotError) does not need it."""
    status = "failed" if isinstance(err, Exception) else "interrupted"
    error = {"type": type(err).__name__, "message": str(err), "task": task + 1, "user_fault": isinstance(err, PilotError)}
    if status == "failed" and not error["user_fault"]:
        error["traceback"] = traceback.format_exc()
    return status, error


class ResultsWriter:
    """Writes the record of the assembled ``run`` in ``run_dir``: the run's facts, and the metrics and
    rows each write is given."""

    def __init__(self, run_dir: Path, run: Assembly):
        self.run_dir = run_dir
        self.run = run
        # Accuracy on the validation images (val_fraction, val_per_class), where the stream carves them.
        self.validation: Optional[AccuracyMatrix] = None

    def write_progress(self, matrix: AccuracyMatrix, task_matrix: AccuracyMatrix, rows: list[dict]) -> dict[str, Any]:
        """The record after the tasks ``matrix`` holds: "complete" once they are the whole stream."""
        status = "complete" if matrix.num_steps == len(self.run.stream) else "running"
        return self.write(status, matrix, task_matrix, rows)

    def write_failure(self, status: str, error: dict[str, Any], matrix: AccuracyMatrix, task_matrix: AccuracyMatrix,
                      rows: list[dict]) -> None:
        """Why the run stopped (``failure``'s status and error), and what it completed; a failed write keeps
        the previous record (the disk may be what failed)."""
        with contextlib.suppress(PilotError):
            self.write(status, matrix, task_matrix, rows, error)

    def write(self, status: str, matrix: AccuracyMatrix, task_matrix: AccuracyMatrix, rows: list[dict],
              error: Optional[dict[str, Any]] = None) -> dict[str, Any]:
        results = self.record(status, matrix, task_matrix, rows, error)
        if is_main():
            write_json(self.run_dir / "results.json", results)
            write_csv(self.run_dir / "metrics.csv", rows)
        return results

    def record(self, status: str, matrix: AccuracyMatrix, task_matrix: AccuracyMatrix, rows: list[dict],
               error: Optional[dict[str, Any]] = None) -> dict[str, Any]:
        """The scenario's metrics at the top level (task-incremental in a "task" stream); where classes arrive,
        both views in full under "class_il" and "task_il"."""
        run = self.run
        stream = run.stream
        views = {} if stream.scenario == "domain" else {"class_il": metrics(matrix), "task_il": metrics(task_matrix)}
        return {
            "format": RESULTS_FORMAT,
            "status": status,
            **({"error": error} if error else {}),
            "config": run.config.to_flat_dict(),
            "ignored_keys": run.config.ignored_keys,
            "batch_dependent_evaluation": run.learner.batch_dependent_evaluation,
            "continual": run.learner.continual,
            "seed": run.seed,
            "versions": versions(),
            "device": str(run.device),
            # Results are bit-exact for a given thread count only: another count sums floats in another order.
            "cpu_threads": torch.get_num_threads(),
            # The manifest digest of data prepared by `pilot data get` (None otherwise): summarize compares it.
            "dataset_manifest": recorded_digest(run.config.experiment),
            "backbones": run.backbone_facts(),
            "scenario": stream.scenario,
            "class_order": stream.order,
            "class_names": stream.class_names,
            **({"templates": run.ctx.templates} if run.learner.needs_text else {}),
            **({"domain_order": stream.domain_order} if stream.scenario == "domain" else {}),
            "task_sizes": stream.sizes,
            "completed_tasks": matrix.num_steps,
            **metrics(task_matrix if stream.scenario == "task" else matrix),
            **views,
            **({"validation": metrics(self.validation)} if self.validation is not None else {}),
            "per_class_accuracy": rows[-1]["per_class_accuracy"] if rows else {},
            **({"memory": [row["memory"] for row in rows]} if run.ctx.memory is not None else {}),
            "per_task": rows,
            "timings": {"train_seconds": sum(r["train_seconds"] for r in rows),
                        "eval_seconds": sum(r["eval_seconds"] for r in rows),
                        "encoded_images": run.ctx.encoded_images},
            "peak_memory": peak_memory_mb(run.device),
        }


def metrics(matrix: AccuracyMatrix) -> dict[str, Any]:
    """The curve, Ā, last accuracy, forgetting, BWT and the accuracy matrix of ``matrix``'s counts."""
    done = matrix.num_steps > 0
    return {
        "accuracy_curve": matrix.curve(),
        "average_incremental_accuracy": matrix.average_incremental() if done else None,
        "last_accuracy": matrix.last() if done else None,
        "forgetting": matrix.forgetting() if done else None,
        "backward_transfer": matrix.backward_transfer() if done else None,
        "task_forgetting": matrix.task_forgetting() if done else [],
        "accuracy_matrix": matrix.matrix().tolist(),
        "counts": matrix.to_dict(),
    }
