"""``pilot evaluate <run dir>``: a run's last checkpoint, evaluated again on the test images of every
task it has learnt, optionally from another copy of the same classes (a corrupted or shifted test
set). Prints the accuracies and writes ``evaluation.json``; results.json is left as it is.

The checkpoint holds the run's whole config and its classes, so a run directory (or a copy of its
checkpoint) is enough: data, weights and device may be pointed elsewhere with ``--set``.
"""
from __future__ import annotations

import time
from pathlib import Path
from typing import Any, Optional

from pilot.assembly import assemble
from pilot.checkpoints import RESUME_FREE_KEYS, CheckpointStore
from pilot.configure import build_config
from pilot.data.names import same_form
from pilot.engine import evaluate_seen_tasks
from pilot.errors import PilotError
from pilot.metrics import AccuracyMatrix
from pilot.outputs import write_json
from pilot.results import versions

# What an evaluation may change: where things are, how they run, and which test images it scores.
EVALUATION_KEYS = RESUME_FREE_KEYS | {"dataset", "test_per_class", "eval_batch_size", "device"}


def evaluate_run(run_dir: str | Path, overrides: Optional[dict[str, Any]] = None,
                 output: Optional[str | Path] = None) -> dict[str, Any]:
    """Re-evaluate the run in ``run_dir`` (with ``overrides`` of EVALUATION_KEYS); writes ``output``
    (default ``<run dir>/evaluation.json``, named in the result) and returns what it wrote."""
    run_dir = Path(run_dir)
    overrides = overrides or {}
    fixed = sorted(set(overrides) - EVALUATION_KEYS)
    if fixed:
        raise PilotError(f"pilot evaluate cannot change {', '.join(fixed)}: they define what the run learnt. It can "
                         f"set {', '.join(sorted(EVALUATION_KEYS))}.")
    checkpoint = CheckpointStore(run_dir)
    state = _read(checkpoint)
    started = time.perf_counter()
    run = assemble(build_config(state["run_config"], {"progress": False, **overrides}), parts=("test",))
    _require_same_classes(state["class_names"], run.dataset.class_names, run.dataset.name)
    completed = checkpoint.restore(state, run.state_parts(), run.config.experiment.model_name, len(run.stream))
    scores = evaluate_seen_tasks(run.learner, run.stream, completed - 1)
    task_scenario = run.stream.scenario == "task"  # the run's headline accuracy is task-incremental
    correct, total = scores.task_correct if task_scenario else scores.correct, scores.total
    recorded = AccuracyMatrix(**state["task_metrics" if task_scenario else "metrics"])
    evaluation = {
        "run_dir": str(run_dir), "checkpoint": str(checkpoint.path), "completed_tasks": completed,
        "dataset": run.dataset.name, "data_path": run.config.experiment.data_path,
        "overrides": overrides, "scenario": run.stream.scenario, "accuracy": 100.0 * sum(correct) / sum(total),
        "task_accuracy": [100.0 * c / n for c, n in zip(correct, total)],
        **({} if run.stream.scenario == "domain" else {"task_il_accuracy": 100.0 * sum(scores.task_correct) / sum(total)}),
        "recorded_accuracy": recorded.accuracy(completed - 1),
        "per_class_accuracy": scores.per_class_accuracy(run.stream.class_names),
        "counts": {"correct": correct, "total": total}, "seconds": time.perf_counter() - started,
        "versions": versions(), "output": str(output or run_dir / "evaluation.json"),
    }
    write_json(Path(evaluation["output"]), evaluation)
    return evaluation


def _read(checkpoint: CheckpointStore) -> dict[str, Any]:
    if not checkpoint.exists():
        raise PilotError(f"'{checkpoint.path}' not found: give the directory of a run (where results.json is); a "
                         f"run writes its checkpoint after each task.")
    return checkpoint.read()


def _require_same_classes(trained: list[str], found: list[str], dataset: str) -> None:
    """Compared in NFC: a copy made on macOS names its folders in NFD, and a checkpoint may hold either."""
    trained, found = [same_form(name) for name in trained], [same_form(name) for name in found]
    if trained != found:
        missing = [name for name in trained if name not in found][:5]
        extra = [name for name in found if name not in trained][:5]
        raise PilotError(
            f"Dataset '{dataset}' does not hold the run's {len(trained)} classes in its order (it has {len(found)}; "
            f"missing e.g. {missing or 'none'}, not in the run e.g. {extra or 'none'}). Evaluate on a copy with the "
            f"same class folders."
        )


def report(evaluation: dict[str, Any]) -> str:
    lines = [f"{evaluation['run_dir']}: {evaluation['completed_tasks']} tasks, test images of '{evaluation['dataset']}'"
             f" at {evaluation['data_path']}"]
    for index, (accuracy, total) in enumerate(zip(evaluation["task_accuracy"], evaluation["counts"]["total"])):
        lines.append(f"  task {index + 1}: accuracy {accuracy:.2f} ({total} images)")
    lines.append(f"accuracy {evaluation['accuracy']:.2f} (the run recorded {evaluation['recorded_accuracy']:.2f}); "
                 f"wrote {evaluation['output']}")
    return "\n".join(lines)
