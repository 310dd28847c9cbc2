"""Sweeps: seeds times a grid on a local Ray (2 CPUs), restartable, sharing frozen features; summaries."""
import json
import os
import signal
import subprocess
import sys
import time

import numpy as np
import pytest

from safetensors.torch import save_file

from pilot.backbones import create_backbone
from pilot.cli import main
from pilot.errors import PilotError
from pilot.runlock import RunLocked, run_lock, wait_for_orphan
from pilot.summary import load_runs, summarize
from pilot.sweep import execute, expand, parse_grid

from conftest import TINY_VIT, clean_error, correct_result, tiny_raw

ray = pytest.importorskip("ray", reason="Ray is an extra: pip install -e '.[ray]'")


@pytest.fixture(scope="module")
def local_ray():
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
    yield
    ray.shutdown()


def sweep_config(tmp_path, name="sweep", **overrides):
    tmp_path.mkdir(parents=True, exist_ok=True)
    path = tmp_path / f"{name}.json"
    raw = tiny_raw(tmp_path, **{"seed": [1, 2], "max_tasks": 2, "log_dir": str(tmp_path / "logs"), **overrides})
    path.write_text(json.dumps(raw))
    return path


def results_of(sweep):
    return {str(run.run_dir): json.loads((run.run_dir / "results.json").read_text()) for run in sweep.runs}


METRICS = ("accuracy_curve", "accuracy_matrix", "average_incremental_accuracy", "last_accuracy", "forgetting")


def test_grid_and_seeds_expand_to_distinct_run_directories(tmp_path):
    grid = parse_grid(["init_cls=4,6", "milestones=[1,2],[3]"])
    assert grid == {"init_cls": [4, 6], "milestones": [[1, 2], [3]]}
    sweep = expand([sweep_config(tmp_path)], {"init_cls": [4, 6]}, {"prefix": "p"})
    assert [(run.point["init_cls"], run.seed) for run in sweep.runs] == [(4, 1), (4, 2), (6, 1), (6, 2)]
    assert len({run.run_dir for run in sweep.runs}) == 4
    assert all(f"p-init_cls={run.point['init_cls']}_{run.seed}_" in run.run_dir.name for run in sweep.runs)
    with pytest.raises(PilotError, match="init_cls"):  # every run's config is checked before any starts
        expand([sweep_config(tmp_path)], {"init_cls": [4, -1]}, {})


def test_two_learners_two_seeds_run_two_at_a_time_and_summarize(tmp_path, local_ray):
    configs = [sweep_config(tmp_path, "simplecil"), sweep_config(tmp_path, "probe", model_name="linear_probe",
                                                                 tuned_epoch=3)]
    sweep = expand(configs, {}, {})
    records = execute(sweep, max_parallel=2, report=lambda line: None)
    assert [r["status"] for r in records.values()] == ["complete"] * 4
    intervals = sorted((r["started"], r["finished"]) for r in records.values())
    assert any(later[0] < earlier[1] for earlier, later in zip(intervals, intervals[1:])), intervals
    assert max(sum(s <= t < f for s, f in intervals) for t, _ in intervals) <= 2
    results = results_of(sweep)
    assert all(r["status"] == "complete" for r in results.values())
    rows = {row["learner"]: row for row in summarize(load_runs([str(sweep.directory)])[1])}
    for learner in ("simplecil", "linear_probe"):
        values = [r["average_incremental_accuracy"] for r in results.values() if r["config"]["model_name"] == learner]
        assert rows[learner]["average_incremental_accuracy"] == (np.mean(values), np.std(values))
        assert rows[learner]["seeds"] == [1, 2]
    lines = []
    execute(sweep, max_parallel=2, report=lines.append)  # again: nothing left to run
    assert lines == [f"sweep {sweep.directory.name}: 4 runs, 4 finished or failed before, 0 to run (0 resuming)"]
    assert results_of(sweep) == results


def test_a_frozen_feature_sweep_encodes_each_image_once(tmp_path, local_ray):
    weights = tmp_path / "vit_tiny_patch16_224.safetensors"  # pretrained: the same features for every seed
    save_file(create_backbone("vit_tiny_patch16_224", pretrained=False, **TINY_VIT).model.state_dict(), weights)
    every_class = {"max_tasks": 0, "pretrained_path": str(weights)}  # each seed's stream needs every image
    sweep = expand([sweep_config(tmp_path, seed=[1, 2, 3], **every_class)], {}, {})
    records = execute(sweep, max_parallel=2, report=lambda line: None)
    encoded = [r["encoded_images"] for r in records.values()]
    alone = expand([sweep_config(tmp_path / "alone", seed=[1], **every_class)], {},
                   {"feature_cache_dir": ""})
    (single,) = execute(alone, report=lambda line: None).values()
    assert sum(encoded) == single["encoded_images"] > 0, encoded  # three seeds, one encoding of each image
    assert [r["accuracy_curve"] for r in results_of(sweep).values()][0] == \
        json.loads((alone.runs[0].run_dir / "results.json").read_text())["accuracy_curve"]


def test_failed_runs_are_recorded_and_retried_only_when_asked(tmp_path, local_ray):
    sweep = expand([sweep_config(tmp_path, seed=[1])], {"backbone_type": ["vit_tiny_patch16_224", "no_such_vit"]}, {})
    records = execute(sweep, report=lambda line: None)
    failed = [r for r in records.values() if r["status"] == "failed"]
    assert len(failed) == 1 and "no_such_vit" in failed[0]["error"]
    lines = []
    execute(sweep, report=lines.append)
    assert "0 to run" in lines[0]
    lines = []
    execute(sweep, retry_failed=True, report=lines.append)
    assert "1 to run" in lines[0] and "FAILED" in lines[-1]


def test_without_ray_the_runs_go_one_by_one(tmp_path):
    sweep = expand([sweep_config(tmp_path)], {}, {})
    lines = []
    records = execute(sweep, use_ray=False, report=lines.append)
    assert [r["status"] for r in records.values()] == ["complete"] * 2
    intervals = sorted((r["started"], r["finished"]) for r in records.values())
    assert intervals[0][1] <= intervals[1][0]
    assert len([line for line in lines if line.startswith("[")]) == 2  # a progress line per finished run


@pytest.mark.slow
@correct_result
def test_a_killed_sweep_completes_on_rerun_as_if_uninterrupted(tmp_path):
    config = sweep_config(tmp_path, seed=[1, 2, 3], tuned_epoch=2, model_name="linear_probe")
    command = [sys.executable, "-m", "pilot.cli", "sweep", "--config", str(config), "--max-parallel", "1"]
    process = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True,
                               start_new_session=True, env={**os.environ, "PYTHONUNBUFFERED": "1"})
    sweep = expand([config], {}, {})
    for line in process.stdout:  # once the first run has finished,
        if line.startswith("[#"):
            break
    deadline = time.time() + 600
    while not any(run.state() == "unfinished" for run in sweep.runs):
        assert time.time() < deadline, "the sweep's second run never wrote a checkpoint"
        time.sleep(0.01)  # ... and the next has a checkpoint, kill -9 the whole sweep (driver and Ray)
    os.killpg(process.pid, signal.SIGKILL)
    process.wait()
    assert sum(run.state() == "complete" for run in sweep.runs) < 3
    assert main(["sweep", "--config", str(config)]) == 0
    resumed = results_of(sweep)
    uninterrupted = expand([sweep_config(tmp_path / "again", seed=[1, 2, 3], tuned_epoch=2,
                                         model_name="linear_probe")], {}, {})
    records = execute(uninterrupted, use_ray=False, report=lambda line: None)
    assert [record["status"] for record in records.values()] == ["complete"] * 3, records
    for ours, theirs in zip(resumed.values(), results_of(uninterrupted).values()):
        assert {k: ours[k] for k in METRICS} == {k: theirs[k] for k in METRICS}


def _python(code, **kwargs):
    """A Python process running ``code`` that prints a line once it holds what it was asked to hold."""
    return subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, text=True, **kwargs)


def _dead_pid():
    process = subprocess.Popen([sys.executable, "-c", "pass"])
    process.wait()  # reaped: no process has this PID any more
    return process.pid


HOLD = """
import socket, sys, time
from pilot.runlock import owned_by, run_lock
from pilot.sweep import dies_with
driver = {{"host": socket.gethostname(), "pid": {driver}}}
with owned_by(driver), {watch}run_lock({run_dir!r}):
    print("locked", flush=True)
    time.sleep({seconds})
"""


@correct_result
def test_a_run_on_a_worker_dies_with_its_driver_and_lets_go_of_its_lock(tmp_path):
    driver = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(600)"])
    worker = _python(HOLD.format(driver=driver.pid, watch="dies_with(driver), ", run_dir=str(tmp_path), seconds=600))
    assert worker.stdout.readline() == "locked\n"
    with pytest.raises(RunLocked):  # held while its driver lives
        with run_lock(tmp_path):
            pass
    driver.kill()
    driver.wait()
    assert worker.wait(timeout=60) == -signal.SIGKILL  # gone without waiting out its 600 s
    with pytest.warns(UserWarning, match="no longer running"), run_lock(tmp_path):  # and its lock with it
        pass


@correct_result
def test_a_rerun_waits_for_a_killed_sweeps_run_to_let_go(tmp_path):
    orphan = _python(HOLD.format(driver=_dead_pid(), watch="", run_dir=str(tmp_path), seconds=2))
    assert orphan.stdout.readline() == "locked\n"
    with pytest.raises(RunLocked):
        with run_lock(tmp_path):
            pass
    wait_for_orphan(tmp_path)  # returns once the orphan has let go, however long it takes to
    with run_lock(tmp_path):
        pass
    assert orphan.wait(timeout=60) == 0


@clean_error
def test_a_live_sweeps_run_is_not_waited_for_and_a_stuck_orphan_is_named(tmp_path):
    live = _python(HOLD.format(driver="__import__('os').getpid()", watch="", run_dir=str(tmp_path / "live"),
                               seconds=600))
    stuck = _python(HOLD.format(driver=_dead_pid(), watch="", run_dir=str(tmp_path / "stuck"), seconds=600))
    try:
        assert live.stdout.readline() == stuck.stdout.readline() == "locked\n"
        wait_for_orphan(tmp_path / "live")  # its driver runs: a real conflict, for run_lock to refuse
        with pytest.raises(RunLocked, match="in use by"):
            with run_lock(tmp_path / "live"):
                pass
        with pytest.raises(RunLocked, match=f"killed .*kill {stuck.pid}"):
            wait_for_orphan(tmp_path / "stuck", timeout=0.5)
    finally:
        live.kill()
        stuck.kill()
        live.wait()
        stuck.wait()
