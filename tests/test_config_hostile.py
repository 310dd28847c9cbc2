"""Configs and run directories that would otherwise lose results, leave log_dir, or fail with a traceback."""
import json

import pytest

from pilot import engine
from pilot.cli import main
from pilot.config import load_raw
from pilot.configure import build_config, load_config
from pilot.engine import run_experiment
from pilot.errors import PilotError

from conftest import TINY_VIT, clean_error, tiny_raw


def write_config(tmp_path, text: str | bytes):
    path = tmp_path / "config.json"
    path.write_bytes(text if isinstance(text, bytes) else text.encode())
    return path


@clean_error
def test_a_run_of_another_config_is_not_overwritten(tmp_path):
    first = build_config(tiny_raw(tmp_path, max_tasks=1))
    run_dir = engine.run_directory(first.experiment, 1)
    run_experiment(first)
    run_experiment(build_config(tiny_raw(tmp_path, max_tasks=1, wandb_project="other")))  # changes nothing computed
    recorded = (run_dir / "results.json").read_text()

    deeper = build_config(tiny_raw(tmp_path, max_tasks=1, backbone_args={**TINY_VIT, "depth": 1}))
    assert engine.run_directory(deeper.experiment, 1) == run_dir
    with pytest.raises(PilotError, match=r"another config \(backbone_args: recorded .*'depth': 2.*now .*'depth': 1.*"
                                         r"--restart, or set another \"prefix\""):
        run_experiment(deeper)
    assert (run_dir / "results.json").read_text() == recorded
    (result,) = run_experiment(deeper, restart=True)
    assert result["config"]["backbone_args"]["depth"] == 1


@pytest.mark.parametrize("key, value, message", [
    ("prefix", "../../escape", "prefix contains '/'"),
    ("prefix", "..", "prefix is '..'"),
    ("prefix", "a\\b", "prefix contains '\\'"),
    ("prefix", "a\0b", "prefix contains NUL"),
    ("dataset", "..", "dataset is '..'"),
    ("backbone_type", "vit\\tiny", "backbone_type contains '\\'"),
])
@clean_error
def test_names_of_run_directory_parts_cannot_leave_log_dir(tmp_path, key, value, message):
    with pytest.raises(PilotError, match="names a folder of the run directory") as err:
        build_config(tiny_raw(tmp_path, **{key: value}))
    assert message in str(err.value)


@clean_error
def test_a_run_directory_name_too_long_is_refused_before_any_work(tmp_path):
    config = build_config(tiny_raw(tmp_path, prefix="p" * 300))
    with pytest.raises(PilotError, match=r"bytes long, more than the 255 .* Shorten \"prefix\""):
        run_experiment(config)
    assert not (tmp_path / "logs").exists()


@clean_error
def test_a_key_given_twice_in_the_file_is_refused(tmp_path):
    path = write_config(tmp_path, '{"init_cls": 2, "increment": 2, "init_cls": 4}')
    with pytest.raises(PilotError, match=r"config.json' gives 'init_cls' twice, 2 and 4"):
        load_raw(path)
    assert load_raw(write_config(tmp_path, '{"init_cls": 2, "init_cls": 2}')) == {"init_cls": 2}


@clean_error
def test_a_key_set_twice_to_different_values_is_refused(tmp_path, capsys):
    path = write_config(tmp_path, json.dumps(tiny_raw(tmp_path)))
    with pytest.raises(PilotError, match="--set gives 'init_cls' twice, 2 and 4"):
        load_config(path, ["init_cls=2", "init_cls=4"])
    assert load_config(path, ["init_cls=2", "init_cls=2"]).experiment.init_cls == 2
    assert main(["--config", str(path), "--set", "increment=2", "--set", "increment=3"]) == 2
    assert "--set gives 'increment' twice" in capsys.readouterr().err
    assert not (tmp_path / "logs").exists()


@pytest.mark.parametrize("content", ['{"prefix": "caf\xe9"}'.encode("latin-1"), bytes(range(256))],
                         ids=["latin-1", "binary"])
@clean_error
def test_a_config_that_is_not_utf8_is_refused_clearly(tmp_path, content):
    path = write_config(tmp_path, content)
    with pytest.raises(PilotError, match=rf"'{path}' is not UTF-8 text .*must be a UTF-8 JSON file"):
        load_raw(path)


@pytest.mark.parametrize("key", ["synthetic_classes", "synthetic_per_class", "synthetic_image_size",
                                 "synthetic_domains"])
@pytest.mark.parametrize("value", [0, -1])
@clean_error
def test_synthetic_sizes_must_be_positive(tmp_path, key, value):
    with pytest.raises(PilotError, match=rf"{key} must be at least 1 \(got {value}\)"):
        build_config(tiny_raw(tmp_path, **{key: value}))
