"""MLflow and W&B trackers: off by default; when on, the config once and the per-task scalars."""

import pytest

from pilot.engine import Run, run_experiment

from conftest import Killed


def test_trackers_are_off_by_default(tiny_config, tmp_path):
    run_experiment(tiny_config(max_tasks=1))
    assert not (tmp_path / "logs" / "mlruns").exists() and not list(tmp_path.rglob("wandb"))


def test_mlflow_logs_the_config_and_each_tasks_scalars_to_a_local_store(tiny_config, tmp_path):
    pytest.importorskip("mlflow", reason="MLflow is optional: pip install mlflow-skinny")
    from mlflow.tracking import MlflowClient

    (result,) = run_experiment(tiny_config(mlflow=True))
    client = MlflowClient((tmp_path / "logs" / "mlruns").resolve().as_uri())
    (run,) = client.search_runs([client.get_experiment_by_name("pilot-synthetic").experiment_id])
    history = client.get_metric_history(run.info.run_id, "accuracy/accuracy")
    assert [(m.step, m.value) for m in history] == [(4, result["accuracy_curve"][0]), (6, result["accuracy_curve"][1]),
                                                    (8, result["accuracy_curve"][2]), (10, result["accuracy_curve"][3])]
    assert run.data.params["model_name"] == "simplecil" and run.info.status == "FINISHED"


def test_wandb_logs_offline_and_a_resumed_run_continues_its_run(tiny_config, tmp_path, monkeypatch):
    wandb = pytest.importorskip("wandb", reason="W&B is optional: pip install wandb")
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_SILENT", "true")
    logged, log = [], wandb.sdk.wandb_run.Run.log
    monkeypatch.setattr(wandb.sdk.wandb_run.Run, "log", lambda run, data, step=None, **k: logged.append(
        (run.id, step, data["accuracy/accuracy"])) or log(run, data, step=step, **k))
    config = tiny_config(wandb=True, max_tasks=3)
    run = Run(config)
    finish = run.learner.fit
    run.learner.fit = lambda task: (_ for _ in ()).throw(Killed()) if task.index == 2 else finish(task)
    with pytest.raises(Killed):
        run.execute()
    (result,) = run_experiment(config, resume=True)
    run_id = sorted(run.run_dir.glob("wandb/offline-run-*"))[0].name.rsplit("-", 1)[1]
    assert logged == [(run_id, 4, result["accuracy_curve"][0]), (run_id, 6, result["accuracy_curve"][1]),
                      (run_id, 8, result["accuracy_curve"][2])]  # the resumed run continues the same W&B run
