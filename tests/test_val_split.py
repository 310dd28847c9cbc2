"""The validation split (val_fraction, val_per_class), selecting settings by it (`pilot summarize --select val`),
and summarize's refusal to average runs that read different prepared data."""
from __future__ import annotations

import numpy as np
import pytest

from pilot.configure import build_config
from pilot.data.datasets import make_synthetic
from pilot.data.domains import make_synthetic_domains
from pilot.data.stream import TaskStream, carve_validation
from pilot.engine import run_experiment
from pilot.errors import PilotError
from pilot.summary import markdown, select_by_validation, summarize
from conftest import clean_error, killed_then_resumed, tiny_raw


def test_carving_takes_a_seeded_permutation_of_each_class():
    labels = np.array([0, 0, 0, 0, 1, 1, 1, 1, 1, 1, 2, 2])
    held = carve_validation(labels, np.zeros(12), fraction=0.25, per_class=0, seed=7)
    rng = np.random.RandomState(7)  # one generator, classes in label order
    expected = np.zeros(12, dtype=bool)
    for members, count in ((np.arange(0, 4), 1), (np.arange(4, 10), 2), (np.arange(10, 12), 1)):
        expected[members[rng.permutation(len(members))[:count]]] = True  # round(0.25 n), at least 1, never all
    assert held.tolist() == expected.tolist()
    assert carve_validation(labels, np.zeros(12), 0.0, 3, seed=7).sum() == 3 + 3 + 1  # 3 per class, never all
    assert not np.array_equal(held, carve_validation(labels, np.zeros(12), 0.25, 0, seed=8))


def test_each_task_keeps_its_validation_images_apart_from_its_training_images():
    data = make_synthetic(num_classes=6, per_class=8, size=8)
    plain = TaskStream(data, 2, 2, True, 3)
    carved = TaskStream(data, 2, 2, True, 3, val_fraction=0.25)
    assert all(task.val is None for task in plain.tasks)
    for before, task in zip(plain.tasks, carved.tasks):
        assert np.intersect1d(task.train.indices, task.val.indices).size == 0
        assert sorted(np.concatenate([task.train.indices, task.val.indices])) == sorted(before.train.indices)
        assert np.bincount(task.val.labels).tolist()[task.classes.start:] == [2, 2]  # round(0.25 * 8) per class
        assert np.array_equal(task.test.indices, before.test.indices)
    again = TaskStream(data, 2, 2, True, 3, val_fraction=0.25)
    assert all(np.array_equal(a.val.indices, b.val.indices) for a, b in zip(carved.tasks, again.tasks))


def test_a_domain_stream_carves_per_domain_and_class():
    data = make_synthetic_domains(num_classes=3, per_class=4, size=8, num_domains=2)
    stream = TaskStream(data, 3, 3, True, 0, scenario="domain", val_per_class=1)
    for task in stream.tasks:
        domains = data.train.domains[task.val.indices]
        assert len(set(domains)) == 1 and sorted(task.val.labels) == [0, 1, 2]


@clean_error
@pytest.mark.parametrize("values", [{"val_fraction": 1.0}, {"val_per_class": -1},
                                    {"val_fraction": 0.1, "val_per_class": 2}])
def test_bad_validation_settings_are_one_clear_error(tmp_path, values):
    with pytest.raises(PilotError, match="val_fraction must be in \\[0, 1\\) and val_per_class at least 0"):
        build_config(tiny_raw(tmp_path, **values))


def test_a_run_records_validation_and_test_accuracy_and_resumes_them(tmp_path):
    def config(folder):
        return build_config(tiny_raw(tmp_path / folder, synthetic_classes=4, init_cls=2, val_per_class=2))

    (result,) = run_experiment(config("full"))
    validation = result["validation"]
    assert len(validation["accuracy_curve"]) == 2 == len(result["accuracy_curve"])
    assert validation["counts"]["total"][0][0] == 2 * 2  # two held-out images of each class of task 1
    assert result["dataset_manifest"] is None  # synthetic data: nothing prepared by `pilot data get`
    resumed = killed_then_resumed(config("killed"), kill_before_task=1)
    assert resumed["validation"]["counts"] == validation["counts"] and resumed["counts"] == result["counts"]


def record(setting: str, seed: int, test: float, val: float | None, manifest: str | None = None) -> dict:
    results = {"status": "complete", "seed": seed, "config": {
        "model_name": "simplecil", "dataset": "imagenetr", "init_cls": 20, "increment": 20,
        "backbone_type": "vit", "prefix": setting}, "average_incremental_accuracy": test, "last_accuracy": test,
        "forgetting": 0.0, "dataset_manifest": manifest}
    if val is not None:
        results["validation"] = {"average_incremental_accuracy": val}
    return results


def test_select_val_keeps_the_setting_of_the_best_validation_accuracy_not_test():
    runs = [record("lr0.1", 1, test=80, val=60), record("lr0.1", 2, test=82, val=62),
            record("lr0.01", 1, test=70, val=75), record("lr0.01", 2, test=72, val=77)]
    rows = summarize(runs)
    assert "val Ā" in markdown(rows)
    (chosen,) = select_by_validation(rows)
    assert chosen["setting"] == "lr0.01" and chosen["average_incremental_accuracy"] == (71.0, 1.0)
    with pytest.raises(PilotError, match="--select val needs validation accuracy.*val_fraction"):
        select_by_validation(summarize([record("a", 1, 80, None)]))
    assert "val Ā" not in markdown(summarize([record("a", 1, 80, None)]))  # today's table, unchanged


def test_runs_on_different_prepared_data_are_not_averaged():
    same = [record("", 1, 80, None, "a" * 64), record("", 2, 82, None, "a" * 64), record("", 3, 81, None)]
    assert summarize(same)[0]["seeds"] == [1, 2, 3]
    with pytest.raises(PilotError, match=f"read different data: manifest {'a' * 16} \\(seeds 1\\); manifest "
                                         f"{'b' * 16} \\(seeds 2\\).*not comparable"):
        summarize([record("", 1, 80, None, "a" * 64), record("", 2, 82, None, "b" * 64)])
