"""iCaRL as PILOT's models/icarl.py: the distillation loss, the loss of a later task's step, the frozen old
network, the NME classifier, kill-and-resume (PILOT's exps/icarl.json: tests/test_config.py)."""
from __future__ import annotations

import copy
import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from pilot.configure import build_config
from pilot.engine import Run, run_directory
from pilot.errors import PilotError
from pilot.evaluation import evaluate_run
from pilot.modules.distillation import kd_loss

from conftest import assert_resume_matches_uninterrupted, tiny_raw

ICARL = {"model_name": "icarl", "init_epoch": 1, "epochs": 1, "batch_size": 8, "memory_size": 20,
         "init_milestones": [], "milestones": [], "T": 2.0}


def test_kd_loss_is_pilots_formula_on_hand_set_logits():
    student = torch.tensor([[1.0, 3.0, -1.0], [0.0, 0.0, 2.0]])
    teacher = torch.tensor([[2.0, 0.0, 0.0], [4.0, 0.0, 0.0]])
    T = 2.0
    expected = 0.0
    for s, t in zip(student.tolist(), teacher.tolist()):
        p = [math.exp(v / T) for v in t]  # softmax(teacher / T)
        p = [v / sum(p) for v in p]
        log_z = math.log(sum(math.exp(v / T) for v in s))
        expected -= sum(pc * (sc / T - log_z) for pc, sc in zip(p, s))  # sum over classes of p * log_softmax
    expected /= 2  # divided by the batch size, no T ** 2
    assert kd_loss(student, teacher, T).item() == pytest.approx(expected, rel=1e-6)
    # by hand: row 1 gives 1.40766, row 2 1.44494 (p = softmax([1, 0, 0]) and softmax([2, 0, 0])); their mean
    assert expected == pytest.approx(1.4262718, rel=1e-6)
    with pytest.raises(ValueError, match="same shape"):
        kd_loss(student, teacher[:, :2], T)


@pytest.fixture(scope="module")
def two_tasks(tmp_path_factory):
    """A 2-task NME run (4 then 2 classes), recording every step of task 2: the loss the learner took, the
    same loss computed independently from a copy of the network taken before the task, and the old network."""
    tmp_path = tmp_path_factory.mktemp("icarl")
    raw = tiny_raw(tmp_path, **ICARL, max_tasks=2, classifier="nme")
    run = Run(build_config(raw))
    learner = run.learner
    record = {"steps": [], "old_nets": [], "after_task": []}
    begin_task, train_step, end_task = learner.begin_task, learner.train_step, learner.end_task

    def begin(task):
        record["before"] = copy.deepcopy(learner.net)  # the network as task 1 left it
        begin_task(task)

    def step(images, labels, task, optimizer, parameters, clip_grad):
        if task.index == 1:
            backbone, heads = learner.net["backbone"], learner.net["heads"]
            new = torch.cat([heads[0](backbone(images)), heads[1](backbone(images))], dim=1)  # 6 classes seen
            before = record["before"].eval()
            with torch.no_grad():
                old = before["heads"][0](before["backbone"](images))  # 4 old classes
            soft = F.softmax(old / 2.0, dim=1)
            distillation = -(soft * F.log_softmax(new[:, :4] / 2.0, dim=1)).sum(dim=1).mean()
            expected = F.cross_entropy(new, labels) + distillation
            taken = train_step(images, labels, task, optimizer, parameters, clip_grad)
            record["steps"].append((taken, expected.item(), bool(torch.allclose(new[:, :4], old))))
            record["old_nets"].append((learner.old_net, {id(p) for p in parameters}))
            return taken
        return train_step(images, labels, task, optimizer, parameters, clip_grad)

    def end(task):
        end_task(task)
        record["after_task"].append(learner.old_net)

    learner.begin_task, learner.train_step, learner.end_task = begin, step, end
    results = run.execute()
    return run, raw, results, record


def test_later_task_loss_is_cross_entropy_over_seen_classes_plus_kd_from_the_network_before_the_task(two_tasks):
    _, _, _, record = two_tasks
    steps = record["steps"]
    assert len(steps) >= 3  # 16 images of the new classes + 20 exemplars, batch 8
    for taken, expected, _ in steps:
        assert taken == pytest.approx(expected, rel=1e-5)
    assert steps[0][2] and not steps[-1][2]  # the new network leaves the old one: the distillation term is not trivial


def test_old_network_is_frozen_and_untouched_by_training(two_tasks):
    _, _, _, record = two_tasks
    before = record["before"].state_dict()
    for old_net, trained in record["old_nets"]:
        assert not old_net.training and all(not p.requires_grad and p.grad is None for p in old_net.parameters())
        assert not trained & {id(p) for p in old_net.parameters()}  # none of its parameters is optimised
        for name, value in old_net.state_dict().items():
            assert torch.equal(value, before[name]), name
    assert record["after_task"] == [None, None]  # only training keeps it


def test_nme_predicts_the_nearest_normalised_exemplar_mean(two_tasks):
    run, _, results, _ = two_tasks
    ctx, learner = run.ctx, run.learner
    assert [m["total"] for m in results["memory"]] == [20, 18]  # PILOT's budget: 20 // 4, then 20 // 6 per class
    exemplars = ctx.memory.split()
    learner.set_train_mode(False)
    feats = ctx.encode(ctx.backbone, exemplars).double().numpy()
    feats = feats / (np.linalg.norm(feats, axis=1, keepdims=True) + 1e-8)
    means = np.stack([feats[exemplars.labels == c].mean(0) for c in range(6)])
    means = means / np.linalg.norm(means, axis=1, keepdims=True)
    for task in run.stream.tasks:
        test = ctx.encode(ctx.backbone, task.test).double().numpy()
        test = test / (np.linalg.norm(test, axis=1, keepdims=True) + 1e-8)
        distances = ((test[:, None, :] - means[None, :, :]) ** 2).sum(-1)
        logits = learner.predict(task.test)
        np.testing.assert_allclose(logits.numpy(), -distances, atol=1e-9)
        assert np.array_equal(logits.argmax(1).numpy(), distances.argmin(1))
    assert all("cnn_accuracy" in row for row in results["per_task"])  # the head's accuracy, beside NME's


def test_evaluate_restores_the_class_means(two_tasks):
    _, raw, results, _ = two_tasks
    config = build_config(raw)
    evaluation = evaluate_run(run_directory(config.experiment, config.experiment.seed[0]))
    assert evaluation["accuracy"] == results["last_accuracy"]


def test_kill_and_resume_equals_an_uninterrupted_run(tmp_path):
    full, resumed = assert_resume_matches_uninterrupted(
        lambda folder: build_config(tiny_raw(tmp_path / folder, **ICARL, max_tasks=3)))
    assert resumed["memory"] == full["memory"]
    assert [row["nme_accuracy"] for row in resumed["per_task"]] == [row["nme_accuracy"] for row in full["per_task"]]


@pytest.mark.parametrize("keys, message", [({"classifier": "ncm"}, "classifier must be one of cnn, nme"),
                                           ({"T": 0}, "T .* must be above 0")])
def test_bad_icarl_keys_are_clear_errors(tmp_path, keys, message):
    with pytest.raises(PilotError, match=message):
        build_config(tiny_raw(tmp_path, **{**ICARL, **keys}))
