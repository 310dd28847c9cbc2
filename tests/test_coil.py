"""Coil as PILOT's models/coil.py: the prospective transport (new rows from the old ones, γ), the loss of each
epoch of a later task against the formulas written out, kill-and-resume, bad keys."""
from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F

from pilot.configure import build_config
from pilot.engine import Run, run_experiment
from pilot.errors import PilotError
from pilot.modules.transport import sinkhorn

from conftest import killed_then_resumed, real_raw, requires_assets, tiny_raw

COIL = {"model_name": "coil", "epochs": 2, "milestones": [], "batch_size": 16, "memory_size": 8,
        "synthetic_per_class": 4, "reg_term": 0.5, "max_tasks": 2}


def kd(student, teacher, T=2.0):
    return -(F.softmax(teacher / T, 1) * F.log_softmax(student / T, 1)).sum(1).mean()


def cosine(features, rows):
    return F.normalize(features, dim=1) @ F.normalize(rows, dim=1).T


@pytest.fixture(scope="module")
def two_tasks(tmp_path_factory):
    """A 2-task run (4 then 2 classes), 2 epochs each: the second task's rows at its start, and per step the loss
    taken beside the loss written out from the network before the step."""
    run = Run(build_config(tiny_raw(tmp_path_factory.mktemp("coil"), **COIL)))
    learner = run.learner
    record = {"steps": []}
    begin_task, train_step = learner.begin_task, learner.train_step

    def begin(task):
        record["head_before"] = learner.net["head"].weight.detach().clone()
        begin_task(task)
        record["head_after"] = learner.net["head"].weight.detach().clone()

    def step(images, labels, task, optimizer, parameters, clip_grad):
        if task.index == 0:
            return train_step(images, labels, task, optimizer, parameters, clip_grad)
        before = copy.deepcopy(learner.net).eval()
        old_rows = learner.old_rows_by_transport
        taken = train_step(images, labels, task, optimizer, parameters, clip_grad)
        if learner.epoch > 0 and learner.step == 1:  # the step recomputed the retrospective rows
            old_rows = learner.old_rows_by_transport
        with torch.no_grad():
            features = before["backbone"](images)
            logits = before["head"].sigma * cosine(features, before["head"].weight[:6])
            teacher = learner.old_net
            old = teacher["head"].sigma * cosine(teacher["backbone"](images), teacher["head"].weight[:4])
            loss = 4 / 6 * kd(logits[:, :4], old) + 2 / 6 * F.cross_entropy(logits, labels)
            if learner.epoch == 0:
                loss += 1e-3 * kd(logits[:, 4:], cosine(features, learner.new_rows_by_transport))
            else:
                loss += 0.5 * (learner.epoch / 2) ** 2 * kd(cosine(features, old_rows), old)
        record["steps"].append((learner.epoch, taken, loss.item()))
        return taken

    learner.begin_task, learner.train_step = begin, step
    results = run.execute()
    return run, record, results


def test_new_rows_start_as_the_old_rows_transported_and_rescaled(two_tasks):
    run, record, _ = two_tasks
    learner = run.learner
    before, after = record["head_before"], record["head_after"]
    assert torch.equal(before[4:], torch.zeros_like(before[4:]))  # untrained rows are zero until their task
    assert torch.equal(after[:4], before[:4])
    torch.testing.assert_close(after[4:6], learner.new_rows_by_transport)
    # γ gives the new rows the old rows' mean norm
    torch.testing.assert_close(after[4:6].norm(dim=1).mean(), before[:4].norm(dim=1).mean())


def test_transport_old_to_new_on_hand_set_means(two_tasks):
    run, _, _ = two_tasks
    learner, task = run.learner, run.stream.tasks[1]
    dim = learner.ctx.backbone.feature_dim
    means = torch.zeros(6, dim, dtype=torch.float64)
    means[:4, :4] = torch.eye(4)
    means[4, 0] = means[5, 1] = 1.0  # new class 4 sits on old class 0, class 5 on old class 1
    learner.normalised_class_means = lambda task: means
    rows = torch.randn(4, dim)
    with torch.no_grad():
        learner.net["head"].weight[:4] = rows
    learner.transport_old_to_new(task)
    cost = torch.cdist(means[:4], means[4:], p=3.0)
    plan = sinkhorn(torch.full((4,), 0.25), torch.full((2,), 0.25), cost, 0.464)
    carried = 4 * plan.T.float() @ F.normalize(rows, dim=1)
    gamma = rows.norm(dim=1).mean() / carried.norm(dim=1).mean()
    torch.testing.assert_close(learner.net["head"].weight[4:6].detach(), carried * gamma)
    assert plan[0, 0] > plan[2, 0] and plan[1, 1] > plan[3, 1]  # each new class takes most from its own old class
    torch.testing.assert_close(learner.calibration, gamma)
    # and back: the old rows as the new rows carried from the new classes (cost + 1e-8), times 4 and γ
    learner.transport_new_to_old(task)
    back = sinkhorn(torch.full((2,), 0.25), torch.full((4,), 0.25), torch.cdist(means[4:], means[:4], p=3.0) + 1e-8, 0.464)
    expected = 4 * back.T.float() @ F.normalize(learner.net["head"].weight[4:6].detach(), dim=1) * gamma
    torch.testing.assert_close(learner.old_rows_by_transport, expected)
    del learner.normalised_class_means


def test_later_task_loss_is_pilots_in_each_epoch(two_tasks):
    _, record, _ = two_tasks
    epochs = {epoch for epoch, _, _ in record["steps"]}
    assert epochs == {0, 1}
    for _, taken, expected in record["steps"]:
        assert taken == pytest.approx(expected, rel=1e-4)


def test_kill_and_resume_equals_an_uninterrupted_run(two_tasks, tmp_path):
    _, _, full = two_tasks
    resumed = killed_then_resumed(build_config(tiny_raw(tmp_path, **COIL)), kill_before_task=1)
    assert resumed["counts"] == full["counts"] and resumed["accuracy_curve"] == full["accuracy_curve"]
    assert resumed["memory"] == full["memory"]
    assert [row["nme_accuracy"] for row in resumed["per_task"]] == [row["nme_accuracy"] for row in full["per_task"]]


@pytest.mark.parametrize("keys, message", [({"sinkhorn": 0}, "sinkhorn .* must be above 0"),
                                           ({"norm_term": 0.5}, "norm_term .* must be at least 1"),
                                           ({"classifier": "ncm"}, "classifier must be one of cnn, nme"),
                                           ({"scenario": "domain", "dataset": "synthetic_domains"},
                                            "coil does not support scenario \"domain\"")])
def test_bad_coil_keys_are_clear_errors(tmp_path, keys, message):
    with pytest.raises(PilotError, match=message):
        build_config(tiny_raw(tmp_path, **{**COIL, **keys}))


@requires_assets
@pytest.mark.slow
def test_coil_on_real_weights_and_data(tmp_path):
    """DeiT-Tiny and CIFAR-100 from the shared assets through the method's every phase (P1 measures accuracy)."""
    config = build_config(real_raw(tmp_path, model_name="coil", train_per_class=2, test_per_class=1, max_tasks=2,
                                   batch_size=10, epochs=1, memory_size=20))
    (result,) = run_experiment(config)
    assert result["status"] == "complete" and len(result["accuracy_curve"]) == 2
