"""Data-parallel training under torchrun on the CPU (gloo, 2 processes) against one process."""
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from pilot.configure import build_config
from pilot.engine import Run

from conftest import Killed, tiny_raw

pytestmark = pytest.mark.slow  # every test starts torchrun's processes

ROOT = Path(__file__).resolve().parents[1]
TORCHRUN = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2"]


def write_config(folder, **overrides):
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / "config.json"
    path.write_text(json.dumps(tiny_raw(folder, **overrides)))
    return path


def run(command):
    done = subprocess.run(command, capture_output=True, text=True, cwd=ROOT, env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert done.returncode == 0, done.stderr[-3000:]
    return done


def test_one_epoch_of_two_ranks_equals_one_process_on_the_same_global_batches(tmp_path):
    """finetune trains every backbone weight and the head: 10 images in batches of 4 (the last, of 2, splits
    1 + 1), so each step's averaged gradient must be the whole batch's for the weights to agree."""
    config = write_config(tmp_path, model_name="finetune", init_epoch=1, init_milestones=[], milestones=[],
                          batch_size=4, synthetic_per_class=3, init_lr=0.1)
    worker = str(ROOT / "tests" / "_ddp_fit.py")
    run([sys.executable, worker, str(config), str(tmp_path / "one.pt")])
    run(TORCHRUN + [worker, str(config), str(tmp_path / "two.pt")])
    one, two = torch.load(tmp_path / "one.pt"), torch.load(tmp_path / "two.pt")
    assert one.keys() == two.keys()
    for name in one:
        torch.testing.assert_close(two[name], one[name], rtol=1e-4, atol=1e-5, msg=name)


def test_a_torchrun_run_matches_one_process_and_only_rank_0_writes(tmp_path):
    common = dict(model_name="linear_probe", tuned_epoch=2, batch_size=8, max_tasks=3)
    single, double = write_config(tmp_path / "one", **common), write_config(tmp_path / "two", **common)
    run([sys.executable, "main.py", "--config", str(single), "--quiet"])
    run(TORCHRUN + ["main.py", "--config", str(double), "--quiet"])
    (one,), (two,) = [list((tmp_path / d / "logs").rglob("results.json")) for d in ("one", "two")]
    first, second = json.loads(one.read_text()), json.loads(two.read_text())
    assert second["status"] == "complete" and second["completed_tasks"] == 3
    assert "world size 2" in (two.parent / "run.log").read_text()
    for ours, theirs in zip(second["accuracy_curve"], first["accuracy_curve"]):
        assert abs(ours - theirs) <= 1.0, (second["accuracy_curve"], first["accuracy_curve"])
    log = (two.parent / "run.log").read_text().splitlines()
    assert sum("task 3/3" in line for line in log) == 1  # one writer: no line twice
    assert len(list((two.parent / "tensorboard").iterdir())) == 1


def test_torchrun_resumes_a_run_killed_in_one_process(tmp_path):
    common = dict(model_name="linear_probe", tuned_epoch=2, batch_size=8, max_tasks=3)
    single, killed = write_config(tmp_path / "one", **common), write_config(tmp_path / "killed", **common)
    run([sys.executable, "main.py", "--config", str(single), "--quiet"])
    interrupted = Run(build_config(json.loads(killed.read_text())))
    fit = interrupted.learner.fit
    interrupted.learner.fit = lambda task: (_ for _ in ()).throw(Killed()) if task.index == 2 else fit(task)
    with pytest.raises(Killed):
        interrupted.execute()
    run(TORCHRUN + ["main.py", "--config", str(killed), "--quiet", "--resume"])
    (one,), (resumed,) = [list((tmp_path / d / "logs").rglob("results.json")) for d in ("one", "killed")]
    first, second = json.loads(one.read_text()), json.loads(resumed.read_text())
    assert second["status"] == "complete" and second["accuracy_curve"][:2] == first["accuracy_curve"][:2]
    assert abs(second["accuracy_curve"][2] - first["accuracy_curve"][2]) <= 1.0
    assert "resuming after task 2" in (resumed.parent / "run.log").read_text()

