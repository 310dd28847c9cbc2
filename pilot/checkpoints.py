"""A run's checkpoint: one state file (``pilot.statefile``, so loading it runs no code) holding the
run's config, its classes, its data's manifest, how many tasks it completed, and the state of each
named part (learner, RNG, metrics, rows, ...), each saved with ``state_dict`` and restored with
``load_state_dict``. Resuming refuses another config, and data changed under the tasks completed.

Read a run's checkpoint only while holding its directory's lock: another process may be writing it.
"""
from __future__ import annotations

import random
from pathlib import Path
from typing import Any, Callable, Protocol

import numpy as np
import torch

from pilot.config import RunConfig
from pilot.data import SourceDataset, TaskStream
from pilot.data.manifest import Manifest, changes
from pilot.errors import PilotError
from pilot.statefile import UnreadableState, load_state, save_state

CHECKPOINT = "checkpoint.safetensors"
CHECKPOINT_KIND = "pilot-checkpoint/3"  # 3: task-IL counts, rehearsal memory, prototype counts
# Checkpoints of pilot 0.1: pickles, which this version never loads (unpickling can run code).
LEGACY_CHECKPOINT = "checkpoint.pt"

# Keys that change how a run is shown or stored, not what it computes: resume may differ in them.
RESUME_FREE_KEYS = frozenset({"progress", "log_dir", "feature_cache_dir", "num_workers", "download", "data_path",
                              "weights_dir", "pretrained_path", "mlflow", "mlflow_tracking_uri",
                              "wandb", "wandb_project"})


class Stateful(Protocol):
    def state_dict(self) -> Any: ...

    def load_state_dict(self, state: Any) -> None: ...


class StatePart:
    """A value held elsewhere (e.g. a run's rows), saved and restored through two functions."""

    def __init__(self, get: Callable[[], Any], put: Callable[[Any], None]):
        self.state_dict, self.load_state_dict = get, put


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


class RandomState(StatePart):
    """The global RNGs and the run's generator: a resumed run draws what the uninterrupted one would."""

    def __init__(self, generator: torch.Generator):
        super().__init__(lambda: rng_state(generator), lambda state: restore_rng_state(state, generator))


def config_for_resume(config: RunConfig) -> dict[str, Any]:
    return {k: v for k, v in config.to_flat_dict().items() if k not in RESUME_FREE_KEYS}


def read_checkpoint(path: Path) -> dict[str, Any]:
    """A run's checkpoint state; a clear error, with the choice to start over, where it cannot be read."""
    try:
        return load_state(path, CHECKPOINT_KIND)
    except UnreadableState as err:
        raise PilotError(f"Cannot use the checkpoint: {err} Start this run over with --restart (which discards "
                         f"its checkpoint and results), or put back an intact copy of the file.") from None


class CheckpointStore:
    """The checkpoint of the run in ``run_dir``."""

    def __init__(self, run_dir: Path):
        self.run_dir = Path(run_dir)
        self.path = self.run_dir / CHECKPOINT

    def exists(self) -> bool:
        return self.path.is_file()

    def refuse_legacy(self) -> None:
        """A pickled checkpoint of pilot 0.1 with none of this version beside it: never loaded, so refused."""
        legacy = self.run_dir / LEGACY_CHECKPOINT
        if legacy.is_file() and not self.exists():
            raise PilotError(
                f"'{legacy}' is the checkpoint of an earlier pilot version, a pickle, which this version never "
                f"loads (unpickling a file can run code). Start the run over with --restart, or finish it with "
                f"the pilot version that wrote it."
            )

    def read(self) -> dict[str, Any]:
        """The checkpoint's state, if its measurements agree with one another."""
        state = read_checkpoint(self.path)
        problem = _inconsistency(state)
        if problem:
            raise PilotError(f"'{self.path}' was damaged or edited: {problem}. Start the run over with --restart, or "
                             f"put back an intact copy of the file.")
        return state

    def read_for_resume(self, config: RunConfig, stream: TaskStream) -> dict[str, Any]:
        """The checkpoint, if ``config`` is the one it was written with (but for RESUME_FREE_KEYS) and the
        data of the tasks it completed is as it was then (``stream``: the run's, on the data now)."""
        state = self.read()
        current, saved = config_for_resume(config), state["config"]
        changed = sorted(k for k in set(current) | set(saved) if current.get(k) != saved.get(k))
        if changed:
            details = "; ".join(f"{k}: checkpoint {saved.get(k)!r}, now {current.get(k)!r}" for k in changed)
            raise PilotError(
                f"Cannot resume '{self.run_dir}': the config differs from the checkpoint's ({details}). "
                f"Resume with the same config, or start the run over with --restart."
            )
        self._require_same_data(state, stream)
        return state

    def _require_same_data(self, state: dict[str, Any], stream: TaskStream) -> None:
        """Refuse data changed where the checkpoint depends on it: the classes, the images of its tasks."""
        try:
            saved = Manifest.from_state(state["data"])
        except (KeyError, TypeError, AttributeError):
            raise PilotError(f"Cannot resume '{self.run_dir}': its checkpoint does not record the data it learnt "
                             f"(an earlier pilot version wrote it), so a change cannot be ruled out. Start the run "
                             f"over with --restart.") from None
        completed = state.get("completed_tasks")  # checked once restored
        tasks = stream.tasks[:completed] if isinstance(completed, int) else []
        learnt = {part: np.concatenate([np.zeros(0, dtype=np.int64), *(getattr(task, part).indices for task in tasks)])
                  for part in ("train", "test")}
        # The rehearsal memory keeps its exemplars as positions in the training images.
        found = changes(saved, stream.dataset.manifest, learnt, positions="memory" in state)
        if found:
            raise PilotError(f"Cannot resume '{self.run_dir}': the data changed since its checkpoint after task "
                             f"{len(tasks)}: {'; '.join(found)}. Put the data back as it was, or start the run over "
                             f"on the data as it is now with --restart.")

    def save(self, config: RunConfig, dataset: SourceDataset, completed_tasks: int,
             parts: dict[str, Stateful]) -> None:
        header = {"config": config_for_resume(config), "run_config": config.to_flat_dict(),
                  "class_names": dataset.class_names, "data": dataset.manifest.state(),
                  "completed_tasks": completed_tasks}
        save_state(self.path, {**header, **{name: part.state_dict() for name, part in parts.items()}},
                   CHECKPOINT_KIND)

    def restore(self, state: dict[str, Any], parts: dict[str, Stateful], learner_name: str, num_tasks: int) -> int:
        """Load each part's state from ``state`` (read from this store) into a run of ``num_tasks`` tasks;
        returns the tasks it completed."""
        try:
            completed = self._completed_tasks(state, num_tasks)
            for name, part in parts.items():
                part.load_state_dict(state[name])
            return completed
        except (KeyError, TypeError, ValueError, RuntimeError) as err:
            raise PilotError(f"'{self.path}' does not fit this run's {learner_name} ({type(err).__name__}: {err}): "
                             f"it was written by another pilot version or edited. Start the run over with "
                             f"--restart.") from None

    def _completed_tasks(self, state: dict[str, Any], num_tasks: int) -> int:
        """The tasks the checkpoint completed (as many as its metrics, ``read`` checked), if this run has them."""
        completed = state["completed_tasks"]
        if not 0 < completed <= num_tasks:
            raise PilotError(f"'{self.path}' says it completed {completed} tasks, but this run has {num_tasks}: it "
                             f"was written for another run. Start the run over with --restart.")
        return completed


def _inconsistency(state: Any) -> str | None:
    """What in a checkpoint's measurements cannot be so, or None: the digest stops edits by hand, this stops
    values that a bug or a re-digested edit made impossible (counts that would give an accuracy of 125)."""
    if not isinstance(state, dict):
        return "it holds no run's state"
    completed, rows = state.get("completed_tasks"), state.get("rows")
    if not (_is_count(completed) and isinstance(rows, list)):
        return "it records no count of completed tasks and their rows"
    for name in ("metrics", "task_metrics"):
        problem = _matrix_inconsistency(state.get(name), completed)
        if problem:
            return f"its {name} {problem}"
    if len(rows) != completed:
        return f"it says it completed {completed} tasks but holds {len(rows)} rows of results"
    return None


def _matrix_inconsistency(counts: Any, completed: int) -> str | None:
    """Counts of an ``AccuracyMatrix``: step t has one (correct, total) per task 1..t+1, 0 <= correct <= total."""
    if not (isinstance(counts, dict) and all(isinstance(counts.get(k), list) for k in ("correct", "total"))):
        return "hold no correct and total counts"
    correct, total = counts["correct"], counts["total"]
    if not len(correct) == len(total) == completed:
        return f"hold {len(correct)} steps of correct and {len(total)} of total counts for {completed} completed tasks"
    for step, (hits, sizes) in enumerate(zip(correct, total), start=1):
        if not (isinstance(hits, list) and isinstance(sizes, list) and len(hits) == len(sizes) == step):
            return f"at step {step} do not hold one count per task learnt by then"
        for task, (hit, size) in enumerate(zip(hits, sizes), start=1):
            if not (_is_count(hit) and _is_count(size)):
                return f"at step {step}: task {task}'s counts {hit!r} of {size!r} are not whole numbers of images"
            if hit > size:
                return f"at step {step}: task {task}'s correct count {hit} exceeds its {size} test images"
    return None


def _is_count(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value >= 0
