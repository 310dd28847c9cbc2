"""DGR as PILOT's models/dgr.py: the prior-adjusted cross-entropy, the row scales, the head's reweighted gradient
on a real step against the formulas written out, the backbone's plain gradient, kill-and-resume, bad keys."""
from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from pilot.configure import build_config
from pilot.engine import Run, run_experiment
from pilot.errors import PilotError
from pilot.learners.dgr import prior_adjusted_cross_entropy, row_scales
from pilot.modules.heads import classify

from conftest import killed_then_resumed, real_raw, requires_assets, tiny_raw

DGR = {"model_name": "dgr", "init_epoch": 1, "epochs": 1, "batch_size": 12, "memory_size": 20, "lambda": 1.5,
       "gammar_r": 0.5, "T": 2.0, "synthetic_per_class": 6}


def test_prior_adjusted_cross_entropy_on_hand_set_logits():
    logits = torch.tensor([[2.0, 0.0, 1.0]])
    counts = torch.tensor([1, 3, 4])  # prior 1/8, 3/8, 4/8
    adjusted = [2.0 + math.log(1 / 8), math.log(3 / 8), 1.0 + math.log(4 / 8)]
    expected = -(adjusted[2] - math.log(sum(math.exp(v) for v in adjusted)))
    assert prior_adjusted_cross_entropy(logits, torch.tensor([2]), counts).item() == pytest.approx(expected, rel=1e-6)


def test_row_scales_on_hand_set_norms():
    first = row_scales(torch.tensor([2.0, 4.0, 8.0], dtype=torch.float64), 0, 1.0)
    assert first.tolist() == pytest.approx([1.0, 0.5, 0.25])
    # old rows G = 2, 4; new rows G = 1, 3: balance = mean new / mean old = 2 / 3
    scales = row_scales(torch.tensor([2.0, 4.0, 1.0, 3.0], dtype=torch.float64), 2, 0.5)
    rs_old, rs_new = 2 / 3, 2 / 3 * math.exp(-0.5 * 2 / 4)
    assert scales.tolist() == pytest.approx([rs_old, 0.5 * rs_old, rs_new, rs_new / 3])
    # new rows with larger gradients than old ones: both factors capped at 1
    assert row_scales(torch.tensor([1.0, 8.0, 9.0], dtype=torch.float64), 1, 0.0).tolist() == pytest.approx([1, 1, 8 / 9])


@pytest.fixture(scope="module")
def second_task_steps(tmp_path_factory):
    """Every step of a 2-task run (4 then 2 classes): the gradients the optimiser got, and those PILOT's formulas
    give, computed here from the step's images with the network before the step."""
    run = Run(build_config(tiny_raw(tmp_path_factory.mktemp("dgr"), **DGR, max_tasks=2)))
    learner = run.learner
    record = {"steps": [], "accumulated": {}}
    train_step, before_step = learner.train_step, learner.before_step

    def step(images, labels, task, optimizer, parameters, clip_grad):
        record["batch"] = (images, labels)
        return train_step(images, labels, task, optimizer, parameters, clip_grad)

    def reweigh(task):
        images, labels = record["batch"]
        heads, backbone = learner.seen_heads(), learner.net["backbone"]
        head_params = [h.weight for h in heads] + [h.bias for h in heads]
        logits = classify(heads, backbone(images))
        counts = torch.bincount(torch.from_numpy(learner.training_split(task).labels), minlength=task.num_seen)
        log_prior = torch.log((counts.double() / counts.sum()).float())
        ce = F.cross_entropy(logits + log_prior, labels)
        old, seen = task.num_old, task.num_seen
        ce_grads = torch.autograd.grad(ce, head_params, retain_graph=True)
        ce_w, ce_b = torch.cat(ce_grads[: len(heads)]), torch.cat(ce_grads[len(heads):])
        norms = ce_w.norm(dim=1).double()
        total = record["accumulated"].get(task.index, torch.zeros(seen, dtype=torch.float64)) + norms
        record["accumulated"][task.index] = total
        if old == 0:
            scale = total.min() / total
            expected_w, expected_b = scale.float()[:, None] * ce_w, scale.float() * ce_b
            backbone_loss = ce
        else:
            teacher = learner.old_net
            with torch.no_grad():
                old_logits = teacher["heads"][0](teacher["backbone"](images))
            kd = -(F.softmax(old_logits / 2.0, 1) * F.log_softmax(logits[:, :old] / 2.0, 1)).sum(1).mean()
            kd_grads = torch.autograd.grad(kd, head_params, retain_graph=True, allow_unused=True)
            kd_w = torch.cat([g if g is not None else torch.zeros_like(p) for g, p in zip(kd_grads[:len(heads)], head_params)])
            kd_b = torch.cat([g if g is not None else torch.zeros_like(p)
                              for g, p in zip(kd_grads[len(heads):], head_params[len(heads):])])
            balance = float(total[old:].mean() / total[:old].mean())
            scale = torch.cat([total[:old].min() / total[:old] * min(1.0, balance),
                               total[old:].min() / total[old:] * min(1.0, balance * math.exp(-0.5 * old / seen))])
            ratio_kd = float((scale * norms).norm() / kd_w[:old].norm(dim=1).double().norm())
            expected_w, expected_b = scale.float()[:, None] * ce_w, scale.float() * ce_b
            expected_w[:old] += ratio_kd * kd_w[:old]
            expected_b[:old] += ratio_kd * kd_b[:old]
            backbone_loss = ce + 1.5 * old / (seen - old) * kd
        block = backbone.model.blocks[0].mlp.fc1.weight
        expected_block = torch.autograd.grad(backbone_loss, block)[0]
        taken_block = block.grad.clone()
        before_step(task)
        taken_w = torch.cat([h.weight.grad for h in heads])
        taken_b = torch.cat([h.bias.grad for h in heads])
        record["steps"].append((task.index, expected_w, taken_w, expected_b, taken_b, expected_block, taken_block, ce_w))

    learner.train_step, learner.before_step = step, reweigh
    results = run.execute()
    return record["steps"], results


def test_head_gradient_is_pilots_reweighting_and_backbone_gradient_the_loss(second_task_steps):
    second_task_steps, _ = second_task_steps
    assert {step[0] for step in second_task_steps} == {0, 1} and len(second_task_steps) >= 4
    for _, expected_w, taken_w, expected_b, taken_b, expected_block, taken_block, _ in second_task_steps:
        torch.testing.assert_close(taken_w, expected_w, rtol=1e-4, atol=1e-7)
        torch.testing.assert_close(taken_b, expected_b, rtol=1e-4, atol=1e-7)
        torch.testing.assert_close(taken_block, expected_block, rtol=1e-4, atol=1e-7)
    # the reweighting is not the identity: the last step's head gradient is not the cross-entropy's
    taken_w, plain_w = second_task_steps[-1][2], second_task_steps[-1][7]
    assert not torch.allclose(taken_w, plain_w, rtol=1e-2)


def test_kill_and_resume_equals_an_uninterrupted_run(second_task_steps, tmp_path):
    """Killed before the second task and resumed: the run above, which went straight through (its records read
    the steps and change nothing)."""
    _, full = second_task_steps
    resumed = killed_then_resumed(build_config(tiny_raw(tmp_path, **DGR, max_tasks=2)), kill_before_task=1)
    assert resumed["counts"] == full["counts"] and resumed["accuracy_curve"] == full["accuracy_curve"]
    assert resumed["memory"] == full["memory"]
    assert [row["nme_accuracy"] for row in resumed["per_task"]] == [row["nme_accuracy"] for row in full["per_task"]]


def test_pilots_lambda_key_lands_on_lambda_kd(tmp_path):
    config = build_config(tiny_raw(tmp_path, **DGR))
    assert config.learner.lambda_kd == 1.5 and config.learner.gammar_r == 0.5


@pytest.mark.parametrize("keys, message", [({"lambda": -1}, "lambda .* must be 0 or more"),
                                           ({"T": 0}, "T .* must be above 0"),
                                           ({"classifier": "ncm"}, "classifier must be one of cnn, nme"),
                                           ({"scenario": "domain", "dataset": "synthetic_domains"},
                                            "dgr does not support scenario \"domain\"")])
def test_bad_dgr_keys_are_clear_errors(tmp_path, keys, message):
    with pytest.raises(PilotError, match=message):
        build_config(tiny_raw(tmp_path, **{**DGR, **keys}))


@requires_assets
@pytest.mark.slow
def test_dgr_on_real_weights_and_data(tmp_path):
    """DeiT-Tiny and CIFAR-100 from the shared assets through the method's every phase (P1 measures accuracy)."""
    config = build_config(real_raw(tmp_path, model_name="dgr", train_per_class=2, test_per_class=1, max_tasks=2,
                                   batch_size=10, init_epoch=1, epochs=1, memory_size=20))
    (result,) = run_experiment(config)
    assert result["status"] == "complete" and len(result["accuracy_curve"]) == 2
