"""Scenarios: task-incremental accuracy from the same logits, domain streams, prototypes over domains,
scenario checks at config time, and what a learner may read."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from pilot.data.domains import make_synthetic_domains
from pilot.data.stream import TaskStream
from pilot.errors import PilotError
from pilot.metrics import correct_predictions
from pilot.modules.heads import PrototypeClassifier

from conftest import tiny_raw
from pilot.configure import build_config


def test_task_il_accuracy_on_hand_made_logits():
    # Four images of task 2 (classes 2 and 3) after 4 classes were seen.
    logits = torch.tensor([[9.0, 0.0, 1.0, 2.0],   # class-IL picks 0 (wrong); within {2, 3}: 3 (right)
                           [0.0, 0.0, 5.0, 1.0],   # 2 both ways (right)
                           [0.0, 8.0, 3.0, 1.0],   # class-IL 1 (wrong); task-IL 2 (wrong: label 3)
                           [0.0, 0.0, 1.0, 4.0]])  # 3 both ways (right)
    labels = torch.tensor([3, 2, 3, 3])
    assert correct_predictions(logits, labels, range(2, 4)) == (2, 3)


def test_domain_stream_gives_one_domain_per_task_with_every_class():
    dataset = make_synthetic_domains(num_classes=3, per_class=4, size=8, num_domains=3, seed=0)
    stream = TaskStream(dataset, 10, 10, shuffle=False, seed=1, scenario="domain", domain_order=("domain_2", "domain_0"))
    assert [task.domain for task in stream.tasks] == ["domain_2", "domain_0"]
    assert stream.sizes == [3, 0] and stream.order == [0, 1, 2]
    for task, domain in zip(stream.tasks, (2, 0)):
        assert task.classes == range(3)
        assert (dataset.train.domains[task.train.indices] == domain).all()
        assert (dataset.test.domains[task.test.indices] == domain).all()
        assert sorted(np.unique(task.train.labels)) == [0, 1, 2] and len(task.train) == 12
    assert [(task.num_old, task.num_seen) for task in stream.tasks] == [(0, 3), (3, 3)]


def test_domain_stream_shuffles_domains_by_seed_and_stops_at_max_tasks():
    dataset = make_synthetic_domains(num_classes=2, per_class=2, size=8, num_domains=4)
    stream = TaskStream(dataset, 10, 10, shuffle=True, seed=1993, max_tasks=2, scenario="domain")
    order = np.random.RandomState(1993).permutation(4)[:2]
    assert stream.domain_order == [f"domain_{d}" for d in order] and stream.planned_tasks == 4


def test_domain_scenario_needs_a_domain_dataset():
    from pilot.data.datasets import make_synthetic
    with pytest.raises(PilotError, match=r"scenario \"domain\" needs a dataset of domains.*synthetic_domains"):
        TaskStream(make_synthetic(4, 2, 8), 2, 2, shuffle=False, seed=1, scenario="domain")


def test_prototypes_of_a_class_seen_again_are_the_mean_of_all_its_images():
    first = torch.tensor([[1.0, 0.0], [3.0, 0.0], [0.0, 2.0]])
    second = torch.tensor([[5.0, 0.0], [0.0, 4.0], [0.0, 6.0]])
    labels_first, labels_second = torch.tensor([0, 0, 1]), torch.tensor([0, 1, 1])
    classifier = PrototypeClassifier(2)
    classifier.add_classes(first, labels_first, range(2))
    classifier.add_classes(second, labels_second, range(2))
    expected = torch.tensor([[3.0, 0.0], [0.0, 4.0]])  # class 0: (1+3+5)/3; class 1: (2+4+6)/3
    torch.testing.assert_close(classifier.prototypes, expected)
    assert classifier.counts.tolist() == [3, 3]


def test_scenario_checks_at_config_time(tmp_path):
    with pytest.raises(PilotError, match=r"scenario must be one of class, domain, task, got 'domains'"):
        build_config(tiny_raw(tmp_path, scenario="domains"))
    with pytest.raises(PilotError, match=r"slca does not support scenario \"domain\": its classifier grows"):
        build_config(tiny_raw(tmp_path, model_name="slca", scenario="domain"))
    with pytest.raises(PilotError, match=r"domain_order orders a domain stream, but scenario is \"class\""):
        build_config(tiny_raw(tmp_path, domain_order=["a"]))


# ------------------------------------------------------------------------------ runs

import json  # noqa: E402

import torch.nn.functional as F  # noqa: E402

from pilot.engine import Run, run_experiment  # noqa: E402
from pilot.learners import register_learner  # noqa: E402
from pilot.learners.simplecil import SimpleCIL  # noqa: E402

from conftest import assert_resume_matches_uninterrupted  # noqa: E402

DOMAINS = {"dataset": "synthetic_domains", "scenario": "domain", "synthetic_classes": 3, "synthetic_per_class": 4,
           "synthetic_domains": 3, "shuffle": False}


def test_simplecil_domain_stream_matches_prototypes_computed_by_hand(tmp_path):
    run = Run(build_config(tiny_raw(tmp_path, **DOMAINS)))
    results = run.execute()
    assert results["scenario"] == "domain" and results["domain_order"] == ["domain_0", "domain_1", "domain_2"]
    assert "task_il" not in results and results["task_sizes"] == [3, 0, 0]
    features = run.ctx.features
    sums, counts, expected = torch.zeros(3, run.ctx.backbone.feature_dim), torch.zeros(3), []
    for step, task in enumerate(run.stream.tasks):
        labels = torch.as_tensor(task.train.labels)
        sums += torch.zeros_like(sums).index_add_(0, labels, features(task.train))
        counts += torch.bincount(labels, minlength=3)
        prototypes = F.normalize(sums / counts[:, None], dim=1)
        row = []
        for seen in run.stream.tasks[: step + 1]:
            predicted = (F.normalize(features(seen.test), dim=1) @ prototypes.T).argmax(1)
            row.append(int((predicted == torch.as_tensor(seen.test.labels)).sum()))
        expected.append(row)
    assert results["counts"]["correct"] == expected
    assert results["counts"]["total"] == [[6] * (t + 1) for t in range(3)]  # 3 classes x 2 test images per domain
    matrix = results["accuracy_matrix"]
    for t in range(3):
        assert matrix[t][: t + 1] == pytest.approx([100 * c / 6 for c in expected[t]])
        assert results["accuracy_curve"][t] == pytest.approx(100 * sum(expected[t]) / (6 * (t + 1)))
    assert [row["domain"] for row in results["per_task"]] == ["domain_0", "domain_1", "domain_2"]


def test_l2p_learns_a_domain_stream_with_one_head_over_every_class(tmp_path):
    results = Run(build_config(tiny_raw(tmp_path, model_name="l2p", tuned_epoch=1, batch_size=4, **DOMAINS))).execute()
    counts = results["counts"]
    assert [len(row) for row in counts["correct"]] == [1, 2, 3]
    for t, (correct, total) in enumerate(zip(counts["correct"], counts["total"])):
        assert results["accuracy_matrix"][t][: t + 1] == pytest.approx([100 * c / n for c, n in zip(correct, total)])
        assert results["accuracy_curve"][t] == pytest.approx(100 * sum(correct) / sum(total))
    assert set(results["per_class_accuracy"]) == {"class_0", "class_1", "class_2"}


def test_domain_run_resumes_as_if_uninterrupted(tmp_path):
    assert_resume_matches_uninterrupted(lambda folder: build_config(tiny_raw(tmp_path / folder, **DOMAINS)))


def test_class_stream_reports_task_il_beside_class_il(tmp_path):
    results = Run(build_config(tiny_raw(tmp_path))).execute()
    task_il, class_il = results["task_il"], results["class_il"]
    assert class_il["accuracy_curve"] == results["accuracy_curve"]
    for step, row in enumerate(task_il["counts"]["correct"]):  # task-IL never below class-IL, image for image
        assert all(t >= c for t, c in zip(row, class_il["counts"]["correct"][step]))
    assert task_il["accuracy_curve"][0] == pytest.approx(class_il["accuracy_curve"][0])  # one task: the same argmax
    header = (next((tmp_path / "logs").rglob("metrics.csv"))).read_text().splitlines()[0].split(",")
    assert "task_il_accuracy" in header and "class_il_accuracy" in header
    assert [r["task_il_accuracy"] for r in results["per_task"]] == pytest.approx(task_il["accuracy_curve"])
    assert results["class_names"] == [f"class_{c}" for c in results["class_order"]]


def test_task_scenario_reports_task_il_as_its_accuracy(tmp_path):
    # per-task heads trained apart: task-IL is easy for them, class-IL is not
    results = Run(build_config(tiny_raw(tmp_path, scenario="task", model_name="linear_probe", tuned_epoch=1))).execute()
    assert results["accuracy_curve"] == results["task_il"]["accuracy_curve"]
    assert results["class_il"]["accuracy_curve"] != results["accuracy_curve"]


@register_learner("test_class_only")
class ClassOnly(SimpleCIL):
    scenarios = ("class",)


def test_a_learner_that_cannot_honour_the_task_scenario_is_refused_before_anything_is_written(tmp_path):
    with pytest.raises(PilotError, match=r"test_class_only does not support scenario \"task\". It supports class"):
        run_experiment(build_config(tiny_raw(tmp_path, model_name="test_class_only", scenario="task")))
    assert not (tmp_path / "logs").exists()


@register_learner("test_peeks_at_old_tasks")
class PeeksAtOldTasks(SimpleCIL):
    """Keeps the first task's split and reads it again while fitting the second: what the context refuses."""

    def fit(self, task):
        if task.index == 0:
            self.first = task
        else:
            self.ctx.features(self.first.train)
        super().fit(task)


def test_a_learner_reaching_for_another_tasks_data_fails(tmp_path):
    with pytest.raises(PilotError, match=r"test_peeks_at_old_tasks read 32 train images that are not its to see while "
                                         r"fitting task 2"):
        run_experiment(build_config(tiny_raw(tmp_path, model_name="test_peeks_at_old_tasks")))
    results = json.loads(next((tmp_path / "logs").rglob("results.json")).read_text())
    assert results["status"] == "failed" and results["error"]["type"] == "OtherTasksData"


def test_a_learner_reading_test_images_while_it_fits_fails(tmp_path):
    run = Run(build_config(tiny_raw(tmp_path)))
    task = run.stream.tasks[0]
    run.ctx.open_fit(task)
    with pytest.raises(PilotError, match=r"read 16 test images that are not its to see while fitting task 1"):
        run.ctx.features(task.test)


def test_an_unknown_domain_in_domain_order_is_an_error_before_anything_is_written(tmp_path):
    with pytest.raises(PilotError, match=r"domain_order names 'photo', which is not a domain of this dataset. Known "
                                         r"domains: 'domain_0'"):
        run_experiment(build_config(tiny_raw(tmp_path, **DOMAINS, domain_order=["domain_1", "photo"])))
    assert not (tmp_path / "logs").exists()


FIVE_BLOCKS = {"img_size": 32, "patch_size": 8, "depth": 5}  # the prompt learners' prefix layers reach block 4
DOMAIN_LEARNERS = {
    "ranpac": {"M": 64, "tuned_epoch": 1, "batch_size": 8},
    "aper_adapter": {"tuned_epoch": 1, "batch_size": 8},
    "aper_ssf": {"tuned_epoch": 1, "batch_size": 8},
    "aper_vpt": {"tuned_epoch": 1, "batch_size": 8, "vpt_type": "deep"},
    "aper_finetune": {"tuned_epoch": 1, "batch_size": 8},
    "dualprompt": {"tuned_epoch": 1, "batch_size": 8, "backbone_args": FIVE_BLOCKS},
    "coda_prompt": {"tuned_epoch": 1, "batch_size": 8, "backbone_args": FIVE_BLOCKS},
    "finetune": {"init_epoch": 1, "epochs": 1, "batch_size": 8, "init_milestones": [], "milestones": []},
    "joint": {"init_epoch": 1, "epochs": 1, "batch_size": 8, "init_milestones": [], "milestones": []},
}


@pytest.mark.parametrize("learner", list(DOMAIN_LEARNERS))
def test_learners_that_support_domain_streams_run_one(tmp_path, learner):
    """Every learner docs/learners.md lists for domain streams runs one (SimpleCIL and L2P are checked above):
    logits over every class in every task, one row of the matrix per domain."""
    results = Run(build_config(tiny_raw(tmp_path, model_name=learner, **{**DOMAINS, **DOMAIN_LEARNERS[learner]}))).execute()
    assert results["status"] == "complete" and results["completed_tasks"] == 3
    assert results["counts"]["total"] == [[6] * (t + 1) for t in range(3)]
    assert 0 <= results["last_accuracy"] <= 100


@register_learner("test_reads_class_names")
class ReadsClassNames(SimpleCIL):
    def fit(self, task):
        self.names_seen = getattr(self, "names_seen", []) + [self.ctx.class_names]
        super().fit(task)


def test_the_context_names_the_classes_seen_and_none_to_come(tmp_path):
    run = Run(build_config(tiny_raw(tmp_path, model_name="test_reads_class_names",
                                    class_names=[f"animal {c}" for c in range(10)])))
    results = run.execute()
    order = results["class_order"]
    assert run.learner.names_seen == [[f"animal {c}" for c in order[:seen]] for seen in (4, 6, 8, 10)]
    assert results["class_names"] == [f"animal {c}" for c in order]
    assert set(results["per_class_accuracy"]) == {f"animal {c}" for c in range(10)}
