"""DUCT as PILOT's models/duct.py: the restart from pre-trained weights, the merge weight and the classifier
consolidation on hand-set tensors, the training phases' parameters and rates, the domain scenario (one block
of rows per domain, a class's best block), kill-and-resume, bad keys."""
from __future__ import annotations

import math

import pytest
import torch

from pilot.configure import build_config
from pilot.engine import Run, run_experiment
from pilot.errors import PilotError

from conftest import killed_then_resumed, real_raw, requires_assets, tiny_raw

DUCT = {"model_name": "duct", "epochs": 1, "epc_re": 1, "batch_size": 8, "synthetic_per_class": 4,
        "ot_reg": 1.0}  # a plan that does not underflow on the tiny ViT's features


@pytest.fixture(scope="module")
def two_tasks(tmp_path_factory):
    """A 2-task run (2 then 2 classes) recording, at the first step of each phase, the backbone and the optimiser."""
    run = Run(build_config(class_raw(tmp_path_factory.mktemp("duct"))))
    learner = run.learner
    record = []
    train_step = learner.train_step

    def step(images, labels, task, optimizer, parameters, clip_grad):
        if not record or record[-1][:2] != (task.index, learner.retraining):
            at_pretrained = all(torch.equal(value, learner.pretrained[name]) for name, value in learner.backbone_state().items())
            groups = [(len(group["params"]), group["lr"]) for group in optimizer.param_groups]
            record.append((task.index, learner.retraining, at_pretrained, groups))
        return train_step(images, labels, task, optimizer, parameters, clip_grad)

    learner.train_step = step
    return run, record, run.execute()


def class_raw(folder):
    return tiny_raw(folder, **DUCT, init_cls=2, increment=2, max_tasks=2)


def test_kill_and_resume_equals_an_uninterrupted_run(two_tasks, tmp_path):
    """Killed before the second task and resumed: the run above, which went straight through."""
    _, _, uninterrupted = two_tasks
    resumed = killed_then_resumed(build_config(class_raw(tmp_path)), kill_before_task=1)
    assert resumed["counts"] == uninterrupted["counts"]
    assert resumed["accuracy_curve"] == uninterrupted["accuracy_curve"]


def test_each_task_trains_from_pretrained_weights_then_the_head_alone(two_tasks):
    run, record, _ = two_tasks
    backbone_tensors = len(list(run.learner.net["backbone"].parameters()))
    # lrate 0.1 under ConstantLR's first epochs (x 1/3); the backbone at 0.1 x 0.01
    train = [(backbone_tensors, pytest.approx(0.1 * 0.01 / 3)), (2, pytest.approx(0.1 / 3))]
    assert record == [(0, False, True, train), (0, True, False, [(2, pytest.approx(0.1 / 3))]),
                      (1, False, True, train), (1, True, False, [(2, pytest.approx(0.1 / 3))])]


def test_merge_adds_the_task_vector_weighted_by_class_mean_similarity(two_tasks):
    run, _, _ = two_tasks
    learner = run.learner
    task = run.stream.tasks[1]
    merged_before = {name: value.clone() for name, value in learner.merged.items()}
    delta = {name: torch.full_like(value, 0.5) for name, value in learner.pretrained.items()}
    with torch.no_grad():
        for name, value in learner.backbone_state().items():
            value.copy_(learner.pretrained[name] + delta[name])
    learner.class_means[-1] = torch.tensor([[1.0, 0.0], [0.0, 1.0]])
    trained = torch.tensor([[1.0, 1.0], [0.0, 3.0]])  # cosines 1/sqrt(2) and 1 with the pre-trained means
    learner.class_feature_means = lambda split, classes, transform=None: trained
    learner.merge_backbone(task)
    weight = 0.25 * (1 / math.sqrt(2) + 1) / 2
    for name, value in learner.backbone_state().items():
        torch.testing.assert_close(learner.merged[name], merged_before[name] + 0.5 * weight)
        torch.testing.assert_close(value, learner.pretrained[name] + learner.merged[name])


def test_old_rows_take_a_quarter_of_the_transported_new_rows(two_tasks):
    run, _, _ = two_tasks
    learner = run.learner
    head = learner.net["head"]
    dim = head.weight.shape[1]
    old_rows, new_rows = torch.randn(2, dim), torch.randn(2, dim)
    with torch.no_grad():
        head.weight[:2], head.weight[2:4] = old_rows, new_rows
    # cost [[0, 1], [1, 0]] between the new and the old classes' means, reg 1: the plan is [[p, q], [q, p]]
    learner.class_means = [torch.tensor([[0.0, 0.0], [1.0, 0.0]]), torch.tensor([[0.0, 0.0], [1.0, 0.0]])]
    p = 1 / (2 + 2 / math.e)
    q = p / math.e
    learner.consolidate_classifier(run.stream.tasks[1])
    expected = 0.75 * old_rows + 0.25 * torch.stack([p * new_rows[0] + q * new_rows[1], q * new_rows[0] + p * new_rows[1]])
    torch.testing.assert_close(head.weight[:2].detach(), expected)
    torch.testing.assert_close(head.weight[2:4].detach(), new_rows)


def test_domain_stream_has_a_block_per_domain_and_a_class_scores_its_best_block(tmp_path):
    """Predictions are the maximum over the domains' blocks of the cosine head's logits."""
    run = Run(build_config(tiny_raw(tmp_path, **DUCT, scenario="domain", dataset="synthetic_domains",
                                    synthetic_domains=2, synthetic_classes=4)))
    results = run.execute()
    assert len(results["accuracy_curve"]) == 2
    learner, task = run.learner, run.stream.tasks[0]
    assert [(b.start, b.stop) for b in learner.blocks] == [(0, 4), (4, 8)]
    assert len(learner.class_means) == 2 and learner.class_means[0].shape == (4, learner.ctx.backbone.feature_dim)
    logits = learner.predict(task.test)
    learner.set_train_mode(False)
    with torch.no_grad():
        features = run.ctx.encode(learner.net["backbone"], task.test)
        head = learner.net["head"]
        every = head.sigma * torch.nn.functional.normalize(features, dim=1) @ torch.nn.functional.normalize(head.weight, dim=1).T
    torch.testing.assert_close(logits, every.view(len(features), 2, 4).amax(1), rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("keys, message", [({"ot_reg": 0}, "ot_reg .* must be above 0"),
                                           ({"head_merge_ratio": 1.5}, r"head_merge_ratio .* must lie in \[0, 1\]"),
                                           ({"epc_re": -1}, "epc_init and epc_re .* must be 0 or more"),
                                           ({"merge_scaler": 0.3}, "Unknown config key 'merge_scaler'.*merge_scalar")])
def test_bad_duct_keys_are_clear_errors(tmp_path, keys, message):
    with pytest.raises(PilotError, match=message):
        build_config(tiny_raw(tmp_path, **{**DUCT, **keys}))


@requires_assets
@pytest.mark.slow
def test_duct_on_real_weights_and_data(tmp_path):
    """DeiT-Tiny and CIFAR-100 from the shared assets through the method's every phase (P1 measures accuracy)."""
    config = build_config(real_raw(tmp_path, model_name="duct", train_per_class=2, test_per_class=1, max_tasks=2,
                                   batch_size=10, epochs=1, epc_re=1))
    (result,) = run_experiment(config)
    assert result["status"] == "complete" and len(result["accuracy_curve"]) == 2
