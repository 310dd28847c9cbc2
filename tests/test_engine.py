"""The shared loop end to end on a tiny random ViT and synthetic images."""
import json
import sys

import pytest
import torch

from pilot import engine
from pilot.cli import main
from pilot.data import TaskStream, load_dataset
from pilot.engine import Run, run_experiment
from pilot.statefile import load_state

from conftest import Killed, die_at_task, killed_then_resumed, tiny_raw


def only_result(config, resume=False):
    (result,) = run_experiment(config, resume=resume)
    return result


def test_end_to_end_outputs(tiny_config):
    result = only_result(tiny_config())
    run_dir = engine.run_directory(tiny_config().experiment, 1)
    assert result["status"] == "complete" and result["completed_tasks"] == 4
    saved = json.loads((run_dir / "results.json").read_text())
    assert saved["accuracy_curve"] == pytest.approx(result["accuracy_curve"])
    assert saved["class_order"] == TaskStream(load_dataset(tiny_config().experiment), 4, 2, True, 1).order
    assert len(saved["accuracy_matrix"]) == 4 and saved["accuracy_matrix"][0][1] is None
    assert {"torch", "timm", "pilot"} <= set(saved["versions"])
    assert saved["cpu_threads"] == torch.get_num_threads()
    assert (run_dir / "metrics.csv").read_text().count("\n") == 5
    assert (run_dir / "run.log").is_file() and any((run_dir / "tensorboard").iterdir())
    assert not list(run_dir.glob(".*.tmp")), "temporary files left behind"


def test_tasks_are_numbered_from_1_in_every_output(tiny_config, capsys):
    config = tiny_config()
    resumed = killed_then_resumed(config)
    run_dir = engine.run_directory(config.experiment, 1)
    rows = (run_dir / "metrics.csv").read_text().splitlines()
    assert rows[0].startswith("task,") and [row.split(",")[0] for row in rows[1:]] == ["1", "2", "3", "4"]
    saved = json.loads((run_dir / "results.json").read_text())
    assert saved["format"] == "pilot-results/2" and [row["task"] for row in saved["per_task"]] == [1, 2, 3, 4]
    assert [row["task"] for row in resumed["per_task"]] == [1, 2, 3, 4]
    assert "task 4/4 classes 10" in capsys.readouterr().err
    run = Run(config)
    run._restore_rows([{"task": 0, "accuracy": 90.0}, {"task": 1, "accuracy": 80.0}])  # an earlier version's rows
    assert run.rows == [{"task": 1, "accuracy": 90.0}, {"task": 2, "accuracy": 80.0}]


def test_phases_log_whole_lines_and_a_full_size_cpu_run_estimates_its_time(tiny_config, capsys, monkeypatch):
    """Progress bars are for a terminal: run.log and redirected output get one line per finished phase (no
    carriage return), and a full-size run on the CPU one line with its time and the way to the P1 subset."""
    monkeypatch.setattr(engine, "SLOW_PASS_SECONDS", 0.0)  # this tiny run's pass counts as long
    config = tiny_config(model_name="finetune", init_epoch=1, epochs=1, init_milestones=[], milestones=[], batch_size=4,
                         eval_batch_size=4, max_tasks=2, progress=True)
    only_result(config)
    log = (engine.run_directory(config.experiment, 1) / "run.log").read_text()
    err = capsys.readouterr().err
    for text in (log, err):
        assert "\r" not in text and "it/s" not in text
        assert sum("full size on the CPU" in line for line in text.splitlines()) == 1
        assert "--config exps/finetune_p1.json, or --set train_per_class=50" in text
    assert "task 1 epoch 1/1: 32 images in 8 batches" in log and "mean loss" in log


def test_each_image_is_encoded_once(tiny_config):
    config = tiny_config(train_per_class=3, test_per_class=2)
    result = only_result(config)
    # 10 classes x (3 train + 2 test), although test images of early tasks are evaluated 4 times
    assert result["timings"]["encoded_images"] == 10 * (3 + 2)


def test_same_seed_gives_identical_metrics(tmp_path):
    from pilot.configure import build_config

    a = only_result(build_config(tiny_raw(tmp_path / "a", model_name="linear_probe", tuned_epoch=3)))
    b = only_result(build_config(tiny_raw(tmp_path / "b", model_name="linear_probe", tuned_epoch=3)))
    assert a["counts"] == b["counts"] and a["accuracy_curve"] == b["accuracy_curve"]


def test_resume_after_a_kill_matches_an_uninterrupted_run(tmp_path, monkeypatch):
    from pilot.configure import build_config

    raw = dict(model_name="linear_probe", tuned_epoch=3)
    uninterrupted = only_result(build_config(tiny_raw(tmp_path / "full", **raw)))

    config = build_config(tiny_raw(tmp_path / "killed", **raw))
    with monkeypatch.context() as patch:
        patch.setattr(Run, "_step", die_at_task(2))
        with pytest.raises(Killed):
            run_experiment(config)
    run_dir = engine.run_directory(config.experiment, 1)
    record = json.loads((run_dir / "results.json").read_text())
    assert record["status"] == "interrupted" and record["completed_tasks"] == 2 and record["error"]["task"] == 3
    assert load_state(run_dir / engine.CHECKPOINT, engine.CHECKPOINT_KIND)["completed_tasks"] == 2

    with pytest.raises(engine.PilotError, match="unfinished run. Continue it with --resume"):
        run_experiment(config)
    resumed = only_result(config, resume=True)
    assert resumed["counts"] == uninterrupted["counts"]
    assert resumed["accuracy_curve"] == uninterrupted["accuracy_curve"]


def test_resume_with_a_different_config_is_refused(tmp_path, monkeypatch):
    from pilot.configure import build_config

    with monkeypatch.context() as patch:
        patch.setattr(Run, "_step", die_at_task(1))
        with pytest.raises(Killed):
            run_experiment(build_config(tiny_raw(tmp_path, model_name="linear_probe", tuned_epoch=2)))
    changed = build_config(tiny_raw(tmp_path, model_name="linear_probe", tuned_epoch=5))
    with pytest.raises(engine.PilotError, match=r"config differs from the checkpoint's \(tuned_epoch: checkpoint 2, now 5\)"):
        run_experiment(changed, resume=True)


def test_multiple_seeds_get_their_own_directories(tiny_config):
    results = run_experiment(tiny_config(seed=[1, 2], max_tasks=2))
    assert [r["seed"] for r in results] == [1, 2]
    assert results[0]["run_dir"] != results[1]["run_dir"]
    assert results[0]["class_order"] != results[1]["class_order"]


@pytest.mark.parametrize("overrides, message", [
    ({"init_clss": 4}, "Did you mean 'init_cls'?"),
    ({"increment": "2"}, "'increment' must be int"),
    ({"init_cls": 11}, "init_cls is 11 but the dataset has only 10 classes"),
    ({"increment": 0}, "increment must be at least 1"),
    ({"dataset": "cifar224", "data_path": "/nonexistent", "download": False}, "CIFAR-100 not found"),
    ({"backbone_type": "vit_tiny_patch16_2244"}, "Unknown backbone"),
    ({"model_name": "l2pp"}, "Unknown learner"),
])
def test_bad_input_gives_one_clear_error_and_writes_nothing(tmp_path, capsys, overrides, message):
    path = tmp_path / "config.json"
    path.write_text(json.dumps(tiny_raw(tmp_path, **overrides)))
    assert main(["--config", str(path)]) == 2
    err = capsys.readouterr().err
    assert err.startswith("pilot: error: ") and message in err and "Traceback" not in err
    assert not (tmp_path / "logs").exists()


def test_weights_missing_offline_via_cli(tmp_path, capsys, monkeypatch):
    import huggingface_hub.constants

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(tmp_path / "hub-cache"))
    path = tmp_path / "config.json"
    path.write_text(json.dumps(tiny_raw(tmp_path, pretrained=True, weights_dir=str(tmp_path))))
    assert main(["--config", str(path)]) == 2
    err = capsys.readouterr().err
    assert "Could not load weights" in err and "pretrained_path" in err
    assert f"'{tmp_path / 'vit_tiny_patch16_224.safetensors'}'" in err and "PILOT_WEIGHTS_DIR" in err
    assert not (tmp_path / "logs").exists()


def test_cli_runs_and_resumes_a_finished_run(tmp_path, capsys):
    path = tmp_path / "config.json"
    path.write_text(json.dumps(tiny_raw(tmp_path, max_tasks=2)))
    assert main(["--config", str(path), "--set", "prefix=cli"]) == 0
    assert "average incremental accuracy" in capsys.readouterr().out
    assert main(["--config", str(path), "--set", "prefix=cli", "--resume"]) == 0


def test_on_disk_feature_cache_is_reused(tiny_config, tmp_path):
    first = only_result(tiny_config(feature_cache_dir=str(tmp_path / "cache"), prefix="a"))
    second = only_result(tiny_config(feature_cache_dir=str(tmp_path / "cache"), prefix="b"))
    assert first["timings"]["encoded_images"] > 0 and second["timings"]["encoded_images"] == 0
    assert first["counts"] == second["counts"]
    # another transform (here: another backbone input size) is another cache entry
    other = only_result(tiny_config(feature_cache_dir=str(tmp_path / "cache"), prefix="c",
                                    backbone_args={"img_size": 16, "patch_size": 8, "depth": 2}))
    assert other["timings"]["encoded_images"] == first["timings"]["encoded_images"]


def test_a_learner_defined_outside_the_package_plugs_in(tiny_config):
    from dataclasses import dataclass

    from pilot.config import LearnerConfig
    from pilot.learners import register_learner
    from pilot.learners._base import Learner

    @dataclass
    class CountingConfig(LearnerConfig):
        bias_towards_first: float = 0.0

    @register_learner("first_class_guess")
    class FirstClassGuess(Learner):
        """Predicts class 0 always: 100% on class 0's images, 0% elsewhere."""

        config_class = CountingConfig

        def fit(self, task):
            self.num_seen = task.num_seen

        def predict(self, split):
            logits = torch.zeros(len(split), self.num_seen)
            logits[:, 0] = 1 + self.config.bias_towards_first
            return logits

        def state_dict(self):
            return {"num_seen": self.num_seen}

    result = only_result(tiny_config(model_name="first_class_guess", bias_towards_first=1))
    per_class_test = 4  # synthetic: per_class // 2 test images per class
    assert result["counts"]["correct"][0] == [per_class_test, 0, 0, 0][:1]
    assert result["last_accuracy"] == pytest.approx(100 / 10)


def test_help_and_console_script(capsys):
    from importlib.metadata import entry_points

    with pytest.raises(SystemExit) as done:
        main(["--help"])
    assert done.value.code == 0
    out = capsys.readouterr().out
    assert "--resume" in out and "--set KEY=VALUE" in out and "exps/quickstart.json" in out
    scripts = {e.name: e.value for e in entry_points(group="console_scripts")}
    assert scripts.get("pilot") == "pilot.cli:main"


def test_help_lists_every_subcommand_with_its_purpose(capsys):
    from pilot.cli import COMMANDS, SUBCOMMANDS

    with pytest.raises(SystemExit):
        main(["--help"])
    out = capsys.readouterr().out
    usage = out[: out.index("\n\n")]
    assert set(COMMANDS) == set(SUBCOMMANDS)
    for name, purpose in COMMANDS.items():
        assert name in usage and f"  {name} " in out and purpose in out


def test_corrupt_dataset_via_cli_writes_nothing(tmp_path, capsys):
    folder = tmp_path / "data" / "cifar-100-python"
    folder.mkdir(parents=True)
    for member in ("train", "test", "meta"):
        (folder / member).write_bytes(b"\x80\x04 truncated")
    path = tmp_path / "config.json"
    path.write_text(json.dumps(tiny_raw(tmp_path, dataset="cifar224", data_path=str(tmp_path / "data"), download=False)))
    assert main(["--config", str(path)]) == 2
    err = capsys.readouterr().err
    assert "corrupt or truncated" in err and "Traceback" not in err
    assert not (tmp_path / "logs").exists()


def test_progress_bars_are_widgets_in_a_notebook_text_on_a_terminal_and_none_when_redirected(monkeypatch):
    import types

    import tqdm
    import tqdm.notebook

    from pilot.outputs import progress_bar

    monkeypatch.setattr(sys.stderr, "isatty", lambda: False, raising=False)
    assert progress_bar() == (tqdm.tqdm, False)  # redirected: run.log gets each phase's line instead
    monkeypatch.setattr(sys.stderr, "isatty", lambda: True, raising=False)
    assert progress_bar() == (tqdm.tqdm, True)
    kernel = type("ZMQInteractiveShell", (), {})()
    monkeypatch.setitem(sys.modules, "IPython", types.SimpleNamespace(get_ipython=lambda: kernel))
    monkeypatch.setattr("importlib.util.find_spec", lambda name: object() if name == "ipywidgets" else None)
    assert progress_bar() == (tqdm.notebook.tqdm, True)
