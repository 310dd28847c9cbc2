"""The one task-stream loop shared by every learner: fit task by task, evaluate, record, checkpoint;
resume from the last checkpoint. ``run_experiment`` is the one way runs start (``pilot``, ``main.py``,
``pilot sweep``, ``pilot select --run``): it checks every seed's run directory, then runs each seed.

A run is assembled by ``pilot.assembly``, keeps its state in ``pilot.checkpoints`` and its record in
``pilot.results``. It holds its directory's lock while it reads or writes there, the checkpoint
included. A run that fails leaves results.json with ``"status": "failed"`` (the error, and the
metrics of the tasks it completed) and its last checkpoint intact, so that ``--resume`` continues
after the fix.
"""
from __future__ import annotations

import contextlib
import json
import os
import shutil
import time
import warnings
from pathlib import Path
from typing import Any, Callable, Optional

import torch

from pilot.assembly import assemble
from pilot.checkpoints import CHECKPOINT, LEGACY_CHECKPOINT, RESUME_FREE_KEYS, CheckpointStore, StatePart, Stateful
# Re-exported: tests and tools import these from the engine.
from pilot.checkpoints import CHECKPOINT_KIND, read_checkpoint, restore_rng_state, rng_state  # noqa: F401
from pilot.config import ExperimentConfig, RunConfig, backbone_path_part
from pilot.data import TaskStream
from pilot.distributed import is_main, launched, rank_and_size
from pilot.errors import PilotError
from pilot.learners._base import Learner, require_finite
from pilot.metrics import AccuracyMatrix, Evaluation
from pilot.outputs import close_log, open_log, remove_temporaries, require_folder
from pilot.results import ResultsWriter, failure, is_complete
from pilot.runlock import run_lock
from pilot.tracking import Trackers

# What a run writes in its directory: --restart removes these before the run starts again.
# The step summary's metrics sent to TensorBoard and the trackers.
STEP_SCALARS = ("accuracy", "average_incremental_accuracy", "old_accuracy", "new_accuracy", "forgetting",
                "backward_transfer", "class_il_accuracy", "task_il_accuracy")
RUN_OUTPUTS = (CHECKPOINT, LEGACY_CHECKPOINT, "results.json", "metrics.csv", "run.log", "evaluation.json", "tensorboard")
# A full-size run on the CPU says what it will cost where one pass over its images takes longer than this.
SLOW_PASS_SECONDS = 600.0
P1_SUBSET = "--set train_per_class=50 --set test_per_class=10 --set max_tasks=3"
EXPS = Path(__file__).resolve().parents[1] / "exps"


def run_directory(experiment: ExperimentConfig, seed: int) -> Path:
    """PILOT's layout: <log_dir>/<model>/<dataset>/<B>/<increment>/<prefix>_<seed>_<backbone>; a domain stream
    (whose tasks are domains, not class counts) in <log_dir>/<model>/<dataset>/domain/<prefix>_<seed>_<backbone>."""
    base = 0 if experiment.init_cls == experiment.increment else experiment.init_cls
    backbone = backbone_path_part(experiment.backbone_type)
    prefix = experiment.prefix.strip()
    name = f"{prefix}_{seed}_{backbone}" if prefix else f"{seed}_{backbone}"
    protocol = ("domain",) if experiment.scenario == "domain" else (str(base), str(experiment.increment))
    return Path(experiment.log_dir, experiment.model_name, experiment.dataset, *protocol, name)


def check_run_directory(run_dir: Path, config: RunConfig, resume: bool, restart: bool = False) -> None:
    """Refuse to overwrite an unfinished run unless resuming or restarting, and any run of another ``config``
    (one seed's) unless restarting; resuming nothing starts afresh. The checkpoint is read, and compared with
    the config, once the run holds the lock."""
    if restart:
        return
    checkpoint, complete = CheckpointStore(run_dir), is_complete(run_dir)
    if not complete:
        checkpoint.refuse_legacy()
    if not (resume and checkpoint.exists()):
        _refuse_other_config(run_dir, config)
    if checkpoint.exists() and not complete and not resume:
        raise PilotError(
            f"'{run_dir}' holds the checkpoint of an unfinished run. Continue it with --resume, start it over "
            f"with --restart, or set another \"prefix\"."
        )
    if resume and not checkpoint.exists():
        warnings.warn(f"--resume: no checkpoint in '{run_dir}', starting that run from the first task.", stacklevel=2)


def _refuse_other_config(run_dir: Path, config: RunConfig) -> None:
    """The directory's name leaves most keys out: a run recorded there with other values (but for those
    that change nothing computed) is another computation, which this one must not overwrite."""
    recorded = _recorded_config(run_dir)
    if recorded is None:
        return
    current = json.loads(json.dumps(config.to_flat_dict()))  # as results.json holds it: lists, not tuples
    changed = sorted(k for k in (set(current) | set(recorded)) - RESUME_FREE_KEYS if current.get(k) != recorded.get(k))
    if changed:
        details = "; ".join(f"{k}: recorded {recorded.get(k)!r}, now {current.get(k)!r}" for k in changed)
        raise PilotError(f"'{run_dir}' holds a run of another config ({details}), which this run would overwrite. "
                         f"Discard it with --restart, or set another \"prefix\".")


def _recorded_config(run_dir: Path) -> dict[str, Any] | None:
    """The config in the directory's results.json; None where there is none to read."""
    try:
        config = json.loads((run_dir / "results.json").read_text(encoding="utf-8"))["config"]
    except (OSError, ValueError, KeyError, TypeError):
        return None
    return config if isinstance(config, dict) else None


def evaluate_seen_tasks(learner: Learner, stream: TaskStream, step: int, part: str = "test") -> Evaluation:
    """Class- and task-incremental counts of the test predictions on each task learnt by ``step``, from one
    pass: the learner may read those tasks' test images, and no other. ``part`` "val": their validation
    images (carved out of their training images) instead."""
    evaluation = Evaluation()
    seen = stream.tasks[: step + 1]
    num_seen = stream.tasks[step].num_seen
    splits = [getattr(task, part) for task in seen]
    if part == "test":
        learner.ctx.open_evaluation(seen)
    else:
        learner.ctx.access.allow(f"while validated after task {step + 1}", splits)
    for task, split, logits in zip(seen, splits, learner.predict_tasks(splits)):
        if logits.shape != (len(split), num_seen):
            raise RuntimeError(f"{type(learner).__name__}.predict returned logits of shape "
                               f"{tuple(logits.shape)}, expected ({len(split)}, {num_seen})")
        require_finite(logits, f"{part} logits", f"{learner.name}: evaluation after task {step + 1}")
        evaluation.add_task(logits.cpu(), torch.as_tensor(split.labels), task.classes)
    return evaluation


class SizeCheck:
    """A full-size run (every training image) on the CPU, timed by its first batches: where one pass over its
    images would take longer than SLOW_PASS_SECONDS, one log line says how long and how to run the P1 subset."""

    FIRST_BATCHES = 3

    def __init__(self, stream: TaskStream, model_name: str, log):
        self.images = sum(len(task.train) + len(task.test) for task in stream.tasks)
        self.model_name, self.log = model_name, log
        self.done = False

    def __call__(self, batches: int, images: int, seconds: float) -> None:
        if self.done or batches < self.FIRST_BATCHES:
            return
        self.done = True
        per_image = seconds / images
        estimate = per_image * self.images
        if estimate < SLOW_PASS_SECONDS:
            return
        p1 = EXPS / f"{self.model_name}_p1.json"
        config = f"--config exps/{p1.name}, or " if p1.is_file() else ""
        took = f"{estimate / 3600:.1f} h" if estimate >= 3600 else f"{estimate / 60:.0f} min"
        self.log.warning(f"full size on the CPU: the first batches took {per_image:.2f}s per image, so one pass over "
                         f"this run's {self.images:,} images takes about {took}, and every training epoch passes over "
                         f"its training images again. A run in minutes, the P1 subset: {config}{P1_SUBSET}")


class Run:
    """One seed's run: everything is built and checked before anything is read or written in its directory."""

    def __init__(self, config: RunConfig, resume: bool = False, restart: bool = False,
                 on_task_end: Optional[Callable[[Path, dict[str, Any]], None]] = None):
        self.config = config
        self.on_task_end = on_task_end  # called with the run directory and the record after each task
        self.assembly = built = assemble(config)
        self.seed, self.device = built.seed, built.device
        self.dataset, self.stream, self.ctx, self.learner = built.dataset, built.stream, built.ctx, built.learner
        self.run_dir = run_directory(config.experiment, self.seed)
        self.resume, self.restart = resume, restart
        self.checkpoints = CheckpointStore(self.run_dir)
        self.writer = ResultsWriter(self.run_dir, built)
        if self.stream.tasks[0].val is not None:  # val_fraction or val_per_class: accuracy on validation images too
            self.writer.validation = AccuracyMatrix()
        self.matrix = AccuracyMatrix()  # class-incremental (domain-incremental in a domain stream)
        self.task_matrix = AccuracyMatrix()  # task-incremental: each image's logits within its own task's classes
        self.rows: list[dict] = []
        self.results: dict[str, Any] | None = None  # the record last written
        self.start_task = self.current_task = 0

    def state_parts(self) -> dict[str, Stateful]:
        """What the checkpoint keeps: the assembly's parts, and what the run measured so far."""
        return {**self.assembly.state_parts(),
                "metrics": StatePart(lambda: self.matrix.to_dict(),
                                     lambda counts: setattr(self, "matrix", AccuracyMatrix(**counts))),
                "task_metrics": StatePart(lambda: self.task_matrix.to_dict(),
                                          lambda counts: setattr(self, "task_matrix", AccuracyMatrix(**counts))),
                "rows": StatePart(lambda: self.rows, self._restore_rows),
                **({"val_metrics": StatePart(lambda: self.writer.validation.to_dict(), self._restore_validation)}
                   if self.writer.validation is not None else {})}

    def _restore_validation(self, counts: dict) -> None:
        self.writer.validation = AccuracyMatrix(**counts)

    def _restore_rows(self, rows: list[dict]) -> None:
        """Rows are the tasks in order, numbered from 1 (an earlier version's checkpoint numbered them from 0)."""
        self.rows = [{**row, "task": number} for number, row in enumerate(rows, start=1)]

    # --- the loop ------------------------------------------------------------------------------

    def execute(self) -> dict[str, Any]:
        main = is_main()  # under torchrun, rank 0 alone writes
        with run_lock(self.run_dir) if main else contextlib.nullcontext():
            if main:
                self._clear_directory()
            self.start_task = self._resume()
            log = self.ctx.log = open_log(self.run_dir, str(self.run_dir), to_file=main)
            if self.device.type == "cpu" and self.config.experiment.train_per_class == 0:
                self.ctx.batch_watcher = SizeCheck(self.stream, self.config.experiment.model_name, log)
            scalars = Trackers(self.run_dir, self.config.experiment, self.config.to_flat_dict(), enabled=main)
            complete = False
            try:
                self._log_start(log)
                for task in self.stream.tasks[self.start_task:]:
                    self.current_task = task.index
                    self._step(task, log, scalars)
                # a resumed run that had completed every task ran none: its record is written once now
                results = self.results or self.writer.write_progress(self.matrix, self.task_matrix, self.rows)
                complete = True
                return results
            except BaseException as err:
                self._record_failure(err, log)
                raise
            finally:
                self.ctx.access.open()
                scalars.close(complete)
                close_log(log)

    def _resume(self) -> int:
        """With ``resume``, the tasks the checkpoint completed, restored into this run (read under the lock)."""
        if not (self.resume and not self.restart and self.checkpoints.exists()):
            return 0
        state = self.checkpoints.read_for_resume(self.config, self.stream)
        return self.checkpoints.restore(state, self.state_parts(), self.config.experiment.model_name, len(self.stream))

    def _clear_directory(self) -> None:
        """Temporary files of a killed writer go; with ``restart``, so do the previous run's outputs."""
        remove_temporaries(self.run_dir)
        if not self.restart:
            return
        for name in RUN_OUTPUTS:
            path = self.run_dir / name
            if path.is_dir():
                shutil.rmtree(path)
            else:
                path.unlink(missing_ok=True)

    def _log_start(self, log) -> None:
        if self.start_task:
            log.info(f"resuming after task {self.start_task} of {len(self.stream)}")
        log.info(f"run {self.run_dir}: {self.config.experiment.model_name} on {self.dataset.name}, "
                 f"{len(self.stream)} tasks {self.stream.sizes}, seed {self.seed}, device {self.device}"
                 + (f", world size {rank_and_size()[1]} (torchrun)" if launched() else ""))

    def _record_failure(self, err: BaseException, log) -> None:
        """results.json says the run failed (or was interrupted), why, and what it completed; the
        checkpoint of the last completed task stays as it is, for --resume."""
        status, error = failure(err, self.current_task)
        log.error(f"run {status} in task {self.current_task + 1}: {type(err).__name__}: {err}")
        self.writer.write_failure(status, error, self.matrix, self.task_matrix, self.rows)

    def _step(self, task, log, scalars) -> None:
        """Fit ``task`` (and fill the memory), evaluate every task seen, then checkpoint and write the record,
        once each."""
        started = time.perf_counter()
        self.ctx.open_fit(task, () if self.learner.continual else self.stream.tasks[: task.index])
        self.learner.fit(task)
        self._update_memory(task)
        trained = time.perf_counter()
        if self.writer.validation is not None:  # before the test pass, whose evaluation report is the one kept
            validated = evaluate_seen_tasks(self.learner, self.stream, task.index, "val")
            self.writer.validation.add_step(validated.correct, validated.total)
            log.info(f"task {task.index + 1} validation accuracy {self.writer.validation.accuracy(task.index):.2f}")
        evaluation = evaluate_seen_tasks(self.learner, self.stream, task.index)
        evaluated = time.perf_counter()
        self.matrix.add_step(evaluation.correct, evaluation.total)
        self.task_matrix.add_step(evaluation.task_correct, evaluation.total)
        report = self.learner.evaluation_report()
        row = {**self._row(task, evaluation, trained - started, evaluated - trained), **report}
        self.rows.append(row)
        self._log_task(task, row, report, log)
        scalars.add(task.num_seen, {f"accuracy/{k}": v for k, v in row.items() if k in STEP_SCALARS})
        if is_main():
            self.checkpoints.save(self.config, self.dataset, task.index + 1, self.state_parts())
        self.results = self.writer.write_progress(self.matrix, self.task_matrix, self.rows)
        if self.on_task_end is not None and is_main():  # rank 0 alone writes the record it is given
            self.on_task_end(self.run_dir, self.results)

    def _update_memory(self, task) -> None:
        """After the task is learnt, PILOT's ``build_rehearsal_memory``: exemplars herded on the learner's features."""
        memory = self.ctx.memory
        if memory is not None:
            memory.update(task.train, task.new_classes, self.learner.memory_features, task.num_seen, self.ctx.generator)
            self.learner.memory_updated(task)

    def _row(self, task, evaluation: Evaluation, train_seconds: float, eval_seconds: float) -> dict[str, Any]:
        """The task's line of metrics.csv and results.json: the scenario's accuracy (task-incremental in a "task"
        stream) and its summary, both views' accuracy where classes arrive, timings, the memory."""
        scenario = self.stream.scenario
        headline = self.task_matrix if scenario == "task" else self.matrix
        row = {"task": task.index + 1, "classes_seen": task.num_seen, **({"domain": task.domain} if task.domain else {}),
               **headline.step_summary(task.index)}
        if scenario != "domain":
            row["class_il_accuracy"] = self.matrix.accuracy(task.index)
            row["task_il_accuracy"] = self.task_matrix.accuracy(task.index)
        row.update(train_seconds=train_seconds, eval_seconds=eval_seconds,
                   per_class_accuracy=evaluation.per_class_accuracy(self.stream.class_names))
        if self.ctx.memory is not None:
            row["memory"] = self.ctx.memory.summary()
        return row

    def _log_task(self, task, row: dict, report: dict, log) -> None:
        old = "-" if task.index == 0 else f"{row['old_accuracy']:.2f}"
        what = f"domain {task.domain}" if task.domain else f"classes {task.num_seen}"
        task_il = f", task-IL {row['task_il_accuracy']:.2f}" if "task_il_accuracy" in row else ""
        log.info(f"task {task.index + 1}/{len(self.stream)} {what}: accuracy {row['accuracy']:.2f} "
                 f"(old {old}, new {row['new_accuracy']:.2f}){task_il}, "
                 f"average {row['average_incremental_accuracy']:.2f}, "
                 f"train {row['train_seconds']:.1f}s eval {row['eval_seconds']:.1f}s")
        if "memory" in row:
            log.info(f"task {task.index + 1} memory: {row['memory']['total']} exemplars, {row['memory']['per_class']} "
                     f"per class")
        for name, value in report.items():
            log.info(f"task {task.index + 1} {name.replace('_', ' ')}: {value}")


# The longest file or folder name, in bytes, that common file systems (ext4, APFS, NTFS) allow.
NAME_MAX = 255


def check_writable(run_dir: Path) -> None:
    """Refuse, before any work, a run directory that cannot be made or written; nothing is created here,
    so a run refused later for its data leaves no folder behind."""
    for part in run_dir.parts:
        if len(os.fsencode(part)) > NAME_MAX:
            raise PilotError(f"Cannot make the run directory '{run_dir}': its part '{part[:40]}...' is "
                             f"{len(os.fsencode(part))} bytes long, more than the {NAME_MAX} a file system allows "
                             f"in one name. Shorten \"prefix\" (or log_dir).")
    require_folder(run_dir, "log_dir")


def run_experiment(config: RunConfig, resume: bool = False, restart: bool = False,
                   on_task_end: Optional[Callable[[Path, dict[str, Any]], None]] = None) -> list[dict[str, Any]]:
    """Start ``config``'s runs, one per seed, each in its own directory: every directory is checked
    before any run starts; ``restart`` discards what earlier runs left there; ``on_task_end`` sees each
    task's record as it is written."""
    if resume and restart:
        raise PilotError("--resume continues a run and --restart discards it: choose one.")
    for seed in config.experiment.seed:
        run_dir = run_directory(config.experiment, seed)
        check_writable(run_dir)
        check_run_directory(run_dir, config.for_seed(seed), resume, restart)
    results = []
    for seed in config.experiment.seed:
        run = Run(config.for_seed(seed), resume=resume, restart=restart, on_task_end=on_task_end)
        results.append({"run_dir": str(run.run_dir), **run.execute()})
    return results


def summary_line(result: dict[str, Any]) -> str:
    curve = ", ".join(f"{a:.2f}" for a in result["accuracy_curve"])
    return (f"{result['run_dir']}: average incremental accuracy {result['average_incremental_accuracy']:.2f}, "
            f"last {result['last_accuracy']:.2f}, forgetting {result['forgetting']:.2f}; curve [{curve}]")
