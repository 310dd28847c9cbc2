"""A run from parts: the learner registry imports only the learner a config names; every run starts
through ``run_experiment`` (its run directory checked first); results.json is written once per task;
the checkpoint is read only under the run's lock."""
import json
import re
import signal
import subprocess
import sys
import warnings
from pathlib import Path

import pytest

import pilot.learners
from pilot import checkpoints, results
from pilot.cli import main
from pilot.configure import build_config
from pilot.engine import LEGACY_CHECKPOINT, Run, run_directory, run_experiment
from pilot.errors import PilotError
from pilot.learners import learner_class, learner_names
from pilot.runlock import RunLocked
from pilot.sweep import execute, expand

from conftest import Killed, die_at_task, tiny_raw

REPO = Path(__file__).resolve().parents[1]


# --- the learner registry -------------------------------------------------------------------------------


@pytest.fixture
def broken_learner(tmp_path, monkeypatch):
    """A learner file ``broken.py`` on the package's path that raises when imported."""
    folder = tmp_path / "more_learners"
    folder.mkdir()
    path = folder / "broken.py"
    path.write_text('"""A learner file with a bug."""\n\nraise RuntimeError("this learner file is broken")\n')
    monkeypatch.setattr(pilot.learners, "__path__", [*pilot.learners.__path__, str(folder)])
    return path


def test_a_config_imports_only_the_learner_file_it_names():
    code = ("import sys\nfrom pilot.configure import build_config\n"
            "build_config({'model_name': 'simplecil', 'dataset': 'synthetic'})\n"
            "print(sorted(m for m in sys.modules if m.startswith('pilot.learners.') and '._' not in m))")
    found = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=REPO, check=True)
    assert found.stdout.strip() == "['pilot.learners.simplecil']"


def test_a_broken_learner_file_breaks_only_the_configs_that_use_it(tmp_path, broken_learner, capsys):
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        (result,) = run_experiment(build_config(tiny_raw(tmp_path, max_tasks=1)))
    assert result["status"] == "complete"
    assert not [w for w in caught if "broken.py" in str(w.message)]  # the broken file was never imported

    with pytest.raises(PilotError) as refused:
        build_config(tiny_raw(tmp_path, model_name="broken"))
    message = str(refused.value)
    assert f"'{broken_learner}' cannot be imported: RuntimeError: this learner file is broken" in message
    assert f"(at {broken_learner}:3)" in message
    path = tmp_path / "config.json"
    path.write_text(json.dumps(tiny_raw(tmp_path, model_name="broken")))
    assert main(["--config", str(path)]) == 2
    assert "this learner file is broken" in capsys.readouterr().err


def test_listing_learners_skips_a_broken_file_with_a_warning_naming_it(broken_learner):
    with pytest.warns(UserWarning, match=re.escape(f"'{broken_learner}' cannot be imported: RuntimeError")):
        names = learner_names()
    assert {"simplecil", "l2p", "aper_vpt"} <= set(names) and "broken" not in names
    with pytest.warns(UserWarning, match="broken.py"), pytest.raises(PilotError, match="Known learners: .*simplecil"):
        learner_class("simplecill")


# --- one start path -----------------------------------------------------------------------------------------


def test_a_sweeps_runs_go_through_the_run_directory_check(tmp_path):
    path = tmp_path / "config.json"
    path.write_text(json.dumps(tiny_raw(tmp_path, max_tasks=1)))
    sweep = expand([path], {}, {})
    (run,) = sweep.runs
    run.run_dir.mkdir(parents=True)
    (run.run_dir / LEGACY_CHECKPOINT).write_bytes(b"a pickle of pilot 0.1")
    (record,) = execute(sweep, use_ray=False, report=lambda line: None).values()
    assert record["status"] == "failed" and "earlier pilot version" in record["error"]
    assert not (run.run_dir / "results.json").exists()


# --- the record and the checkpoint ----------------------------------------------------------------------------


def test_results_are_written_once_per_task(tmp_path, monkeypatch):
    writes = []
    for name in ("write_json", "write_csv"):
        write = getattr(results, name)
        monkeypatch.setattr(results, name, lambda path, data, write=write: (writes.append(path.name), write(path, data)))
    config = build_config(tiny_raw(tmp_path))  # 4 tasks
    run_experiment(config)
    assert writes.count("results.json") == writes.count("metrics.csv") == 4

    writes.clear()
    with monkeypatch.context() as patch:
        patch.setattr(Run, "_step", die_at_task(2))
        with pytest.raises(Killed):
            run_experiment(build_config(tiny_raw(tmp_path, prefix="killed")))
    assert writes.count("results.json") == 2 + 1  # tasks 1 and 2, then the record of the kill
    writes.clear()
    run_experiment(build_config(tiny_raw(tmp_path, prefix="killed")), resume=True)
    assert writes.count("results.json") == writes.count("metrics.csv") == 2


def test_the_checkpoint_is_read_only_once_the_lock_is_held(tmp_path, monkeypatch):
    raw = tiny_raw(tmp_path, max_tasks=2)
    with monkeypatch.context() as patch:
        patch.setattr(Run, "_step", die_at_task(1))
        with pytest.raises(Killed):
            run_experiment(build_config(raw))
    run_dir = run_directory(build_config(raw).experiment, 1)
    reads = []
    load_state = checkpoints.load_state
    monkeypatch.setattr(checkpoints, "load_state", lambda *args: (reads.append(args), load_state(*args))[1])
    holder = subprocess.Popen([sys.executable, "-c", (
        "import time\nfrom pilot.runlock import run_lock\n"
        f"with run_lock({str(run_dir)!r}):\n    print('held', flush=True)\n    time.sleep(120)\n")],
        stdout=subprocess.PIPE, text=True, cwd=REPO)
    try:
        assert holder.stdout.readline().strip() == "held"
        with pytest.raises(RunLocked, match=f"is in use by pid {holder.pid}"):
            run_experiment(build_config(raw), resume=True)
        assert reads == []
    finally:
        holder.send_signal(signal.SIGKILL)
        holder.wait()
    with pytest.warns(UserWarning, match="no longer running"):
        (result,) = run_experiment(build_config(raw), resume=True)
    assert result["status"] == "complete" and len(reads) == 1
