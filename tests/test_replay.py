"""The rehearsal memory in runs: replay's exemplars per task, the training split with the memory appended,
kill-and-resume, and the memory keys' errors before anything is written."""
from __future__ import annotations

import json

import numpy as np
import pytest

from pilot.configure import build_config
from pilot.engine import Run, run_experiment
from pilot.errors import PilotError

from conftest import assert_resume_matches_uninterrupted, tiny_raw

REPLAY = {"model_name": "replay", "init_epoch": 1, "epochs": 1, "batch_size": 8, "memory_size": 20,
          "init_milestones": [], "milestones": []}


def test_replay_trains_on_the_task_and_the_memory_and_records_the_budget(tmp_path):
    run = Run(build_config(tiny_raw(tmp_path, **REPLAY)))
    seen_splits = []
    training_split = run.learner.training_split
    run.learner.training_split = lambda task: seen_splits.append(training_split(task)) or seen_splits[-1]
    results = run.execute()
    sizes = np.cumsum(run.stream.sizes)  # 4, 6, 8, 10 classes seen: 20 // seen exemplars each
    assert [m["per_class"] for m in results["memory"]] == [20 // n for n in sizes] == [5, 3, 2, 2]
    assert [m["total"] for m in results["memory"]] == [20, 18, 16, 20]
    memory_before = [0] + [m["total"] for m in results["memory"][:-1]]
    for task, split, exemplars in zip(run.stream.tasks, seen_splits, memory_before):
        assert len(split) == len(task.train) + exemplars  # PILOT's appended data: the task's images, then the memory's
        assert np.array_equal(split.indices[: len(task.train)], task.train.indices)
        assert set(split.labels[len(task.train):]) == set(range(task.num_old))
    assert results["per_task"][-1]["memory"] == results["memory"][-1]


def test_replay_memory_survives_kill_and_resume(tmp_path):
    full, resumed = assert_resume_matches_uninterrupted(lambda folder: build_config(tiny_raw(tmp_path / folder, **REPLAY)))
    assert resumed["memory"] == full["memory"]


def test_fixed_memory_keeps_memory_per_class_of_every_class(tmp_path):
    results = Run(build_config(tiny_raw(tmp_path, **{**REPLAY, "memory_size": 0, "memory_per_class": 3,
                                                      "fixed_memory": True}))).execute()
    assert [m["total"] for m in results["memory"]] == [12, 18, 24, 30]


@pytest.mark.parametrize("keys, message", [
    ({"memory_size": 5}, r"memory_size 5, shared by the classes seen, gives zero exemplars per class after task 2, when "
                         r"6 classes are seen"),
    ({"memory_size": 0, "memory_per_class": 4}, r"fixed_memory is false, so the classes seen share memory_size, but "
                                                r"memory_size is 0"),
    ({"memory_size": 100, "fixed_memory": True}, r"fixed_memory is true, so each class keeps memory_per_class exemplars"),
    ({"memory_size": 0}, r"replay replays exemplars, but memory_size and memory_per_class are 0"),
    ({"memory_selection": "kmeans"}, r"memory_selection is 'kmeans'"),
])
def test_bad_memory_keys_are_clear_errors_before_anything_is_written(tmp_path, keys, message):
    with pytest.raises(PilotError, match=message):
        run_experiment(build_config(tiny_raw(tmp_path, **{**REPLAY, **keys})))
    assert not (tmp_path / "logs").exists()


def test_random_selection_is_recorded_and_resumable(tmp_path):
    full, resumed = assert_resume_matches_uninterrupted(
        lambda folder: build_config(tiny_raw(tmp_path / folder, **REPLAY, memory_selection="random")))
    state = json.loads(next((tmp_path / "full" / "logs").rglob("results.json")).read_text())
    assert state["config"]["memory_selection"] == "random" and full["memory"] == resumed["memory"]


def test_replay_loss_is_cross_entropy_over_every_seen_class_as_pycils_replay(tmp_path):
    """PyCIL's replay: loss = F.cross_entropy(logits, targets) on the task's and the memory's images, old
    classes' logits included (finetune masks them to the current task's)."""
    import torch
    import torch.nn.functional as F

    replay = Run(build_config(tiny_raw(tmp_path / "r", **REPLAY)))
    finetune = Run(build_config(tiny_raw(tmp_path / "f", **{**REPLAY, "model_name": "finetune", "memory_size": 0})))
    task = replay.stream.tasks[1]  # classes 4, 5 after 0..3
    logits, labels = torch.randn(6, 6, generator=torch.Generator().manual_seed(0)), torch.tensor([0, 1, 4, 5, 2, 4])
    torch.testing.assert_close(replay.learner.training_loss(logits, labels, task), F.cross_entropy(logits, labels))
    masked = logits.clone()
    masked[:, :4] = -float("inf")
    current = labels >= 4  # the masked loss is defined on the task's own labels
    torch.testing.assert_close(finetune.learner.training_loss(logits[current], labels[current], task),
                               F.cross_entropy(masked[current], labels[current]))
