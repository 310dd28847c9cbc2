"""The one task-stream loop shared by every learner: build, fit task by task, evaluate, record,
checkpoint; resume from the last checkpoint.

A run holds its directory's lock while it writes there. A run that fails leaves results.json with
``"status": "failed"`` (the error, and the metrics of the tasks it completed) and its last checkpoint
intact, so that ``--resume`` continues after the fix. Checkpoints are state files
(``pilot.statefile``): loading one runs no code.
"""
from __future__ import annotations

import contextlib
import json
import platform
import random
import resource
import shutil
import time
import traceback
import warnings
from pathlib import Path
from typing import Any

import numpy as np
import torch

from pilot import __version__
from pilot.backbones import BackboneSet, create_backbone
from pilot.config import ExperimentConfig, RunConfig, backbone_label
from pilot.context import Protocol, RunContext
from pilot.data import SourceDataset, TaskStream, load_dataset
from pilot.data.transforms import Preprocessing
from pilot.distributed import initialise, is_main, launched, local_device, rank_and_size
from pilot.errors import PilotError
from pilot.learners import learner_class
from pilot.learners._base import require_finite
from pilot.metrics import AccuracyMatrix
from pilot.outputs import close_log, open_log, remove_temporaries, write_csv, write_json
from pilot.runlock import run_lock
from pilot.statefile import UnreadableState, load_state, save_state
from pilot.tracking import Trackers

CHECKPOINT = "checkpoint.safetensors"
CHECKPOINT_KIND = "pilot-checkpoint/2"
# Checkpoints of pilot 0.1: pickles, which this version never loads (unpickling can run code).
LEGACY_CHECKPOINT = "checkpoint.pt"
# What a run writes in its directory: --restart removes these before the run starts again.
RUN_OUTPUTS = (CHECKPOINT, LEGACY_CHECKPOINT, "results.json", "metrics.csv", "run.log", "evaluation.json", "tensorboard")

# Keys that change how a run is shown or stored, not what it computes: resume may differ in them.
RESUME_FREE_KEYS = frozenset({"progress", "log_dir", "feature_cache_dir", "num_workers", "download", "data_path",
                              "weights_dir", "pretrained_path", "mlflow", "mlflow_tracking_uri",
                              "wandb", "wandb_project"})


def resolve_device(requested: list[str]) -> torch.device:
    """PILOT writes GPU ids ("0"); "cpu" or "-1" mean the CPU. No CUDA: fall back with a warning."""
    name = str(requested[0]) if requested else "cpu"
    if name in ("cpu", "-1"):
        return torch.device("cpu")
    if name.isdigit():
        name = f"cuda:{name}"
    if name.startswith("cuda") and not torch.cuda.is_available():
        warnings.warn(f"device '{requested[0]}' asks for CUDA, which is not available: running on the CPU.", stacklevel=2)
        return torch.device("cpu")
    try:
        return torch.device(name)
    except RuntimeError:
        raise PilotError(f"Unknown device '{requested[0]}': use \"cpu\", a GPU id like \"0\", or \"cuda:0\".") from None


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def rng_state(generator: torch.Generator) -> dict[str, Any]:
    return {"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state(),
            "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else [],
            "generator": generator.get_state()}


def restore_rng_state(state: dict[str, Any], generator: torch.Generator) -> None:
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])
    if state["cuda"] and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])
    generator.set_state(state["generator"])


def run_directory(experiment: ExperimentConfig, seed: int) -> Path:
    """PILOT's layout: <log_dir>/<model>/<dataset>/<B>/<increment>/<prefix>_<seed>_<backbone>."""
    base = 0 if experiment.init_cls == experiment.increment else experiment.init_cls
    backbone = backbone_label(experiment.backbone_type).replace("/", "-").replace(":", "-")
    prefix = experiment.prefix.strip()
    name = f"{prefix}_{seed}_{backbone}" if prefix else f"{seed}_{backbone}"
    return Path(experiment.log_dir) / experiment.model_name / experiment.dataset / str(base) / str(experiment.increment) / name


def check_run_directory(run_dir: Path, resume: bool, restart: bool = False) -> None:
    """Refuse to overwrite an unfinished run unless resuming or restarting; resuming nothing starts afresh."""
    if restart:
        return
    if (run_dir / LEGACY_CHECKPOINT).is_file() and not (run_dir / CHECKPOINT).is_file() and not is_complete(run_dir):
        raise PilotError(
            f"'{run_dir / LEGACY_CHECKPOINT}' is the checkpoint of an earlier pilot version, a pickle, which this "
            f"version never loads (unpickling a file can run code). Start the run over with --restart, or finish "
            f"it with the pilot version that wrote it."
        )
    unfinished = (run_dir / CHECKPOINT).is_file() and not is_complete(run_dir)
    if unfinished and not resume:
        raise PilotError(
            f"'{run_dir}' holds the checkpoint of an unfinished run. Continue it with --resume, start it over "
            f"with --restart, or set another \"prefix\"."
        )
    if resume and not (run_dir / CHECKPOINT).is_file():
        warnings.warn(f"--resume: no checkpoint in '{run_dir}', starting that run from the first task.", stacklevel=2)


def is_complete(run_dir: Path) -> bool:
    try:
        return json.loads((run_dir / "results.json").read_text())["status"] == "complete"
    except (OSError, ValueError, KeyError):
        return False


def config_for_resume(config: RunConfig) -> dict[str, Any]:
    return {k: v for k, v in config.to_flat_dict().items() if k not in RESUME_FREE_KEYS}


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


def read_checkpoint(path: Path) -> dict[str, Any]:
    """A run's checkpoint state; a clear error, with the choice to start over, where it cannot be read."""
    try:
        return load_state(path, CHECKPOINT_KIND)
    except UnreadableState as err:
        raise PilotError(f"Cannot use the checkpoint: {err} Start this run over with --restart (which discards "
                         f"its checkpoint and results), or put back an intact copy of the file.") from None


def make_context(exp: ExperimentConfig, backbone, dataset: SourceDataset, stream: TaskStream, device: torch.device,
                 generator: torch.Generator) -> RunContext:
    """What the learner of ``exp`` gets: the backbone on ``device``, with the preprocessing its config asks for."""
    learner_cls = learner_class(exp.model_name)
    preprocessing = Preprocessing(exp.preprocess, backbone.data_config, dataset.resize_to_model, learner_cls.pilot_variant,
                                  learner_cls.official_variant, exp.model_name, exp.dataset)
    return RunContext(exp, backbone.to(device), dataset, Protocol.of(stream), device, generator, preprocessing)


class Run:
    """One seed's run: everything is built and checked before anything is written.

    ``parts`` are the dataset's parts to load and check (``pilot evaluate`` needs only "test").
    """

    def __init__(self, config: RunConfig, resume: bool = False, restart: bool = False,
                 parts: tuple[str, ...] = ("train", "test")):
        self.config = config
        exp = config.experiment
        self.seed = exp.seed[0]
        seed_everything(self.seed)
        self.device = local_device(resolve_device(exp.device))
        initialise(self.device)  # under torchrun: join the process group (gloo on CPUs, NCCL on GPUs)
        self.dataset = load_dataset(exp, parts)
        self.stream = TaskStream(self.dataset, exp.init_cls, exp.increment, exp.shuffle, self.seed,
                                 exp.train_per_class, exp.test_per_class, exp.max_tasks, checked=parts)
        backbone = create_backbone(exp.backbone_type, exp.pretrained, exp.pretrained_path, exp.weights_dir,
                                   self.seed, **exp.backbone_args)
        self.generator = torch.Generator().manual_seed(self.seed)
        self.ctx = make_context(exp, backbone, self.dataset, self.stream, self.device, self.generator)
        self.learner = learner_class(exp.model_name)(config.learner, self.ctx)
        self.backbone_specs = exp.backbone_type if isinstance(exp.backbone_type, list) else [exp.backbone_type]
        self.backbone_members = list(backbone.members) if isinstance(backbone, BackboneSet) else [backbone]
        self.run_dir = run_directory(exp, self.seed)
        self.checkpoint_path = self.run_dir / CHECKPOINT
        self.restart = restart
        self.matrix = AccuracyMatrix()
        self.rows: list[dict] = []
        self.current_task = 0
        self.start_task = self._resume() if resume and not restart and self.checkpoint_path.is_file() else 0

    # --- checkpoints -----------------------------------------------------------------------------

    def _resume(self) -> int:
        state = read_checkpoint(self.checkpoint_path)
        current = config_for_resume(self.config)
        saved = state["config"]
        changed = sorted(k for k in set(current) | set(saved) if current.get(k) != saved.get(k))
        if changed:
            details = "; ".join(f"{k}: checkpoint {saved.get(k)!r}, now {current.get(k)!r}" for k in changed)
            raise PilotError(
                f"Cannot resume '{self.run_dir}': the config differs from the checkpoint's ({details}). "
                f"Resume with the same config, or start the run over with --restart."
            )
        return self.restore(state)

    def restore(self, state: dict[str, Any]) -> int:
        """Learner, RNG and metrics as the checkpoint ``state`` holds them; returns the tasks it completed."""
        try:
            self.learner.load_state_dict(state["learner"])
            restore_rng_state(state["rng"], self.generator)
            self.matrix = AccuracyMatrix(**state["metrics"])
            self.rows = state["rows"]
            return state["completed_tasks"]
        except (KeyError, TypeError, ValueError, RuntimeError) as err:
            raise PilotError(f"'{self.checkpoint_path}' does not fit this run's {self.config.experiment.model_name} "
                             f"({type(err).__name__}: {err}): it was written by another pilot version or edited. "
                             f"Start the run over with --restart.") from None

    def _save_checkpoint(self, completed_tasks: int) -> None:
        save_state(self.checkpoint_path, {
            "config": config_for_resume(self.config), "run_config": self.config.to_flat_dict(),
            "class_names": self.dataset.class_names, "completed_tasks": completed_tasks,
            "learner": self.learner.state_dict(), "rng": rng_state(self.generator),
            "metrics": self.matrix.to_dict(), "rows": self.rows}, CHECKPOINT_KIND)

    # --- the loop ------------------------------------------------------------------------------

    def execute(self) -> dict[str, Any]:
        writer = is_main()  # under torchrun, rank 0 alone writes
        with run_lock(self.run_dir) if writer else contextlib.nullcontext():
            if writer:
                self._clear_directory()
            log = self.ctx.log = open_log(self.run_dir, str(self.run_dir), to_file=writer)
            scalars = Trackers(self.run_dir, self.config.experiment, self.config.to_flat_dict(), enabled=writer)
            complete = False
            try:
                if self.start_task:
                    log.info(f"resuming after task {self.start_task} of {len(self.stream)}")
                log.info(f"run {self.run_dir}: {self.config.experiment.model_name} on {self.dataset.name}, "
                         f"{len(self.stream)} tasks {self.stream.sizes}, seed {self.seed}, device {self.device}"
                         + (f", world size {rank_and_size()[1]} (torchrun)" if launched() else ""))
                for task in self.stream.tasks[self.start_task:]:
                    self.current_task = task.index
                    self._step(task, log, scalars)
                results = self._write_results("complete")
                complete = True
                return results
            except BaseException as err:
                self._record_failure(err, log)
                raise
            finally:
                scalars.close(complete)
                close_log(log)

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

    def _record_failure(self, err: BaseException, log) -> None:
        """results.json says the run failed (or was interrupted), why, and what it completed; the
        checkpoint of the last completed task stays as it is, for --resume."""
        status = "failed" if isinstance(err, Exception) else "interrupted"
        error = {"type": type(err).__name__, "message": str(err), "task": self.current_task + 1,
                 "user_fault": isinstance(err, PilotError)}
        if status == "failed" and not error["user_fault"]:
            error["traceback"] = traceback.format_exc()
        log.error(f"run {status} in task {self.current_task + 1}: {type(err).__name__}: {err}")
        if is_main():
            with contextlib.suppress(PilotError):  # the disk may be what failed: the previous record stays
                self._write_results(status, error)

    def _step(self, task, log, scalars) -> None:
        started = time.perf_counter()
        self.learner.fit(task)
        trained = time.perf_counter()
        correct, total = self.evaluate(task.index)
        evaluated = time.perf_counter()
        self.matrix.add_step(correct, total)
        summary = self.matrix.step_summary(task.index)
        report = self.learner.evaluation_report()
        row = {"task": task.index, "classes_seen": task.num_seen, **summary,
               "train_seconds": trained - started, "eval_seconds": evaluated - trained, **report}
        self.rows.append(row)
        old = "-" if task.index == 0 else f"{summary['old_accuracy']:.2f}"
        log.info(f"task {task.index + 1}/{len(self.stream)} classes {task.num_seen}: accuracy {summary['accuracy']:.2f} "
                 f"(old {old}, new {summary['new_accuracy']:.2f}), "
                 f"average {summary['average_incremental_accuracy']:.2f}, "
                 f"train {row['train_seconds']:.1f}s eval {row['eval_seconds']:.1f}s")
        for name, value in report.items():
            log.info(f"task {task.index + 1} {name.replace('_', ' ')}: {value}")
        scalars.add(task.num_seen, {f"accuracy/{k}": v for k, v in summary.items()})
        if is_main():
            self._save_checkpoint(task.index + 1)
        self._write_results("complete" if task.index + 1 == len(self.stream) else "running")

    def evaluate(self, step: int) -> tuple[list[int], list[int]]:
        """Correct and total test predictions on each task learnt by ``step``."""
        correct, total = [], []
        seen = self.stream.tasks[: step + 1]
        num_seen = self.stream.tasks[step].num_seen
        for task, logits in zip(seen, self.learner.predict_tasks([task.test for task in seen])):
            if logits.shape != (len(task.test), num_seen):
                raise RuntimeError(f"{type(self.learner).__name__}.predict returned logits of shape "
                                   f"{tuple(logits.shape)}, expected ({len(task.test)}, {num_seen})")
            require_finite(logits, "test logits", f"{self.learner.name}: evaluation after task {step + 1}")
            labels = torch.as_tensor(task.test.labels)
            correct.append(int((logits.argmax(1).cpu() == labels).sum()))
            total.append(len(labels))
        return correct, total

    def _write_results(self, status: str, error: dict[str, Any] | None = None) -> dict[str, Any]:
        m = self.matrix
        done = m.num_steps > 0
        results = {
            "status": status,
            **({"error": error} if error else {}),
            "config": self.config.to_flat_dict(),
            "ignored_keys": self.config.ignored_keys,
            "batch_dependent_evaluation": self.learner.batch_dependent_evaluation,
            "continual": self.learner.continual,
            "seed": self.seed,
            "versions": versions(),
            "device": str(self.device),
            "backbones": [{"type": spec, "identity": member.identity, "feature_dim": member.feature_dim}
                          for spec, member in zip(self.backbone_specs, self.backbone_members)],
            "class_order": self.stream.order,
            "task_sizes": self.stream.sizes,
            "completed_tasks": m.num_steps,
            "accuracy_curve": m.curve(),
            "average_incremental_accuracy": m.average_incremental() if done else None,
            "last_accuracy": m.last() if done else None,
            "forgetting": m.forgetting() if done else None,
            "backward_transfer": m.backward_transfer() if done else None,
            "task_forgetting": m.task_forgetting() if done else [],
            "accuracy_matrix": m.matrix().tolist(),
            "counts": m.to_dict(),
            "per_task": self.rows,
            "timings": {"train_seconds": sum(r["train_seconds"] for r in self.rows),
                        "eval_seconds": sum(r["eval_seconds"] for r in self.rows),
                        "encoded_images": self.ctx.encoded_images},
            "peak_memory": peak_memory_mb(self.device),
        }
        if is_main():
            write_json(self.run_dir / "results.json", results)
            write_csv(self.run_dir / "metrics.csv", self.rows)
        return results


def run_experiment(config: RunConfig, resume: bool = False, restart: bool = False) -> list[dict[str, Any]]:
    """One run per seed in ``config.experiment.seed``, each in its own directory; ``restart`` discards
    what earlier runs left there."""
    if resume and restart:
        raise PilotError("--resume continues a run and --restart discards it: choose one.")
    for seed in config.experiment.seed:
        check_run_directory(run_directory(config.experiment, seed), resume, restart)
    results = []
    for seed in config.experiment.seed:
        run = Run(config.for_seed(seed), resume=resume, restart=restart)
        results.append({"run_dir": str(run.run_dir), **run.execute()})
    return results


def summary_line(result: dict[str, Any]) -> str:
    curve = ", ".join(f"{a:.2f}" for a in result["accuracy_curve"])
    return (f"{result['run_dir']}: average incremental accuracy {result['average_incremental_accuracy']:.2f}, "
            f"last {result['last_accuracy']:.2f}, forgetting {result['forgetting']:.2f}; curve [{curve}]")

