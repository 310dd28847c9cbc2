"""Experiment trackers beside TensorBoard, each optional and off by default: MLflow (``"mlflow": true``,
a local ``<log_dir>/mlruns`` store unless ``mlflow_tracking_uri`` names another) and Weights & Biases
(``"wandb": true``, project ``wandb_project``; ``WANDB_MODE=offline`` works without an account). Each
logs the run's config once and the same per-task scalars as TensorBoard, at step = classes seen; a
resumed run continues its tracker run.
"""
from __future__ import annotations

import hashlib
import os
import time
from pathlib import Path
from typing import Any

from pilot.errors import PilotError
from pilot.outputs import TensorBoardScalars, finite_scalars

RUN_DIR_TAG = "pilot.run_dir"


def _require(module: str, install: str):
    try:
        return __import__(module)
    except ImportError:
        raise PilotError(f"\"{module}\": true needs the {module} package: pip install {install}, "
                         f"or set \"{module}\": false.") from None


class MLflowTracker:
    """One MLflow run per pilot run (found again by its run directory when resuming)."""

    def __init__(self, run_dir: Path, config: dict[str, Any], uri: str):
        _require("mlflow", "mlflow-skinny")
        from mlflow.entities import Param
        from mlflow.tracking import MlflowClient

        if "://" not in uri:  # a local folder: MLflow's file store, which it now asks to opt into
            os.environ.setdefault("MLFLOW_ALLOW_FILE_STORE", "true")
            uri = Path(uri).resolve().as_uri()
        self.client = MlflowClient(uri)
        name = f"pilot-{config['dataset']}"
        experiment = self.client.get_experiment_by_name(name)
        experiment_id = experiment.experiment_id if experiment else self.client.create_experiment(name)
        found = self.client.search_runs([experiment_id], f"tags.`{RUN_DIR_TAG}` = '{run_dir.resolve()}'")
        if found:
            self.run_id = found[0].info.run_id
        else:
            self.run_id = self.client.create_run(experiment_id, run_name=run_dir.name,
                                                 tags={RUN_DIR_TAG: str(run_dir.resolve())}).info.run_id
            self.client.log_batch(self.run_id, params=[Param(k, str(v)[:6000]) for k, v in sorted(config.items())])

    def add(self, step: int, values: dict[str, float]) -> None:
        from mlflow.entities import Metric

        now = int(time.time() * 1000)
        self.client.log_batch(self.run_id, metrics=[Metric(k, v, now, step) for k, v in finite_scalars(values).items()])

    def close(self, complete: bool) -> None:
        self.client.set_terminated(self.run_id, "FINISHED" if complete else "KILLED")


class WandbTracker:
    """A W&B run whose id derives from the run directory, so a resumed run continues it."""

    def __init__(self, run_dir: Path, config: dict[str, Any], project: str):
        wandb = _require("wandb", "wandb")
        run_id = hashlib.sha256(str(run_dir.resolve()).encode()).hexdigest()[:16]
        self.run = wandb.init(project=project, name=run_dir.name, id=run_id, dir=str(run_dir), config=config,
                              resume="allow", reinit="create_new")

    def add(self, step: int, values: dict[str, float]) -> None:
        self.run.log(finite_scalars(values), step=step)

    def close(self, complete: bool) -> None:
        self.run.finish(exit_code=0 if complete else 1)


class Trackers:
    """TensorBoard, plus the trackers the experiment turns on; ``add`` reaches all of them (none when not
    ``enabled``: torchrun's other ranks)."""

    def __init__(self, run_dir: Path, experiment, config: dict[str, Any], enabled: bool = True):
        self.tensorboard = TensorBoardScalars(run_dir) if enabled else None
        self.others = []
        if not enabled:
            return
        if experiment.mlflow:
            uri = experiment.mlflow_tracking_uri or str(Path(experiment.log_dir) / "mlruns")
            self.others.append(MLflowTracker(run_dir, config, uri))
        if experiment.wandb:
            self.others.append(WandbTracker(run_dir, config, experiment.wandb_project))

    def add(self, step: int, values: dict[str, float]) -> None:
        if self.tensorboard is not None:
            self.tensorboard.add(step, values)
        for tracker in self.others:
            tracker.add(step, values)

    def close(self, complete: bool) -> None:
        if self.tensorboard is not None:
            self.tensorboard.close()
        for tracker in self.others:
            tracker.close(complete)
