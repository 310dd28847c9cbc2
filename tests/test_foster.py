"""FOSTER as PILOT's models/foster.py: the class-balanced weights and both stages' losses against their formulas,
the frozen old branch, compression leaving one network (the teacher freed, one backbone in the checkpoint),
kill-and-resume, bad keys, the refused domain stream, and a real-asset smoke run (PILOT's exps/foster.json:
tests/test_config.py)."""
from __future__ import annotations

import gc
import math
import weakref

import pytest
import torch
import torch.nn.functional as F

from pilot.checkpoints import CheckpointStore
from pilot.configure import build_config
from pilot.engine import Run, run_directory, run_experiment
from pilot.errors import PilotError
from pilot.learners.foster import balanced_kd_loss, class_balanced_weights, weight_align

from conftest import killed_then_resumed, real_raw, requires_assets, tiny_raw

FOSTER = {"model_name": "foster", "init_epochs": 1, "boosting_epochs": 1, "compression_epochs": 1, "batch_size": 8,
          "memory_per_class": 3, "fixed_memory": True}
SMALL = {**FOSTER, "train_per_class": 4}  # half the synthetic set's 8 training images per class


def test_class_balanced_weights_are_the_effective_number_formula():
    # (1 - b) / (1 - b ** n) for n = 2, 2, 50 at b = 0.96: 0.04 / 0.0784, 0.04 / 0.0784, 0.04 / 0.870114
    raw = [0.04 / (1 - 0.96 ** 2)] * 2 + [0.04 / (1 - 0.96 ** 50)]
    expected = [w / sum(raw) * 3 for w in raw]
    weights = class_balanced_weights([2, 2, 50], 0.96)
    assert weights.tolist() == pytest.approx(expected, rel=1e-6)
    assert weights.tolist() == pytest.approx([1.4353, 1.4353, 0.1293], abs=1e-4)  # by hand: few exemplars weigh more
    assert class_balanced_weights([5, 500], 0.0).tolist() == [1.0, 1.0]  # beta 0: no balancing


def test_balanced_kd_loss_is_pilots_bkd_on_hand_set_logits():
    student = torch.tensor([[1.0, 3.0, -1.0], [0.0, 0.0, 2.0]])
    teacher = torch.tensor([[2.0, 0.0, 0.0], [4.0, 0.0, 0.0]])
    weights = torch.tensor([0.5, 1.0, 1.5])
    T = 2.0
    expected = 0.0
    for s, t in zip(student.tolist(), teacher.tolist()):
        p = [math.exp(v / T) * w for v, w in zip(t, weights.tolist())]  # softmax(teacher / T) * weights ...
        p = [v / sum(p) for v in p]  # ... renormalised
        log_z = math.log(sum(math.exp(v / T) for v in s))
        expected -= sum(pc * (sc / T - log_z) for pc, sc in zip(p, s))
    expected /= 2
    assert balanced_kd_loss(student, teacher, weights, T).item() == pytest.approx(expected, rel=1e-6)
    plain = -(F.softmax(teacher / T, 1) * F.log_softmax(student / T, 1)).sum() / 2
    assert balanced_kd_loss(student, teacher, torch.ones(3), T).item() == pytest.approx(plain.item(), rel=1e-6)


def test_weight_align_scales_the_new_rows_to_the_old_rows_mean_norm():
    head = torch.nn.Linear(2, 3)
    head.weight.data = torch.tensor([[3.0, 4.0], [0.0, 1.0], [0.0, 2.0]])  # old norms 5 and 1; new norm 2
    head.bias.data = torch.tensor([1.0, 1.0, 1.0])
    weight_align(head, num_old=2, value=1.0)
    assert head.weight.data[2].tolist() == pytest.approx([0.0, 3.0])  # gamma = mean(5, 1) / 2 = 1.5
    assert head.weight.data[:2].tolist() == [[3.0, 4.0], [0.0, 1.0]] and head.bias.data.tolist() == [1.0] * 3
    weight_align(head, num_old=2, value=2.0)  # gamma = 3 / 3 * 2 ** (2 / 1)
    assert head.weight.data[2].tolist() == pytest.approx([0.0, 12.0])


@pytest.fixture(scope="module")
def three_tasks(tmp_path_factory):
    """A 3-task run (4, 2, 2 classes) recording, at task 2's steps, the loss the learner took beside the same loss
    computed independently from the stage's networks, the old branch and head, and a weak reference to task
    2's teacher."""
    tmp_path = tmp_path_factory.mktemp("foster")
    raw = tiny_raw(tmp_path, **SMALL, max_tasks=3)
    run = Run(build_config(raw))
    learner = run.learner
    record = {"boosting": [], "compression": [], "old": []}
    train_step, fit = learner.train_step, learner.fit

    def step(images, labels, task, optimizer, parameters, clip_grad):
        if task.index != 1:
            return train_step(images, labels, task, optimizer, parameters, clip_grad)
        teacher, trained = learner.teacher, {id(p) for p in parameters}
        weights = class_balanced_weights(
            [3] * 4 + [int((task.train.labels == c).sum()) for c in (4, 5)],
            0.96 if learner.stage == "boosting" else 0.97)
        with torch.no_grad():
            old, new = teacher["old"](images), teacher["new"](images)
            logits = teacher["fc"](torch.cat([old, new], 1))
            if learner.stage == "boosting":
                expected = (F.cross_entropy(logits / weights, labels) + F.cross_entropy(teacher["fe_fc"](new), labels)
                            + kd_formula(logits[:, :4], teacher["old_fc"](old), 2.0))
            else:
                student = learner.student["fc"](learner.student["backbone"](images))
                target = F.softmax(logits / 2.0, 1) * weights
                expected = -(target / target.sum(1, keepdim=True) * F.log_softmax(student / 2.0, 1)).sum(1).mean()
        record["old"].append(({k: v.clone() for k, v in teacher["old"].state_dict().items()},
                              teacher["old"].training, any(p.requires_grad for p in teacher["old"].parameters()),
                              bool(trained & {id(p) for p in teacher["old"].parameters()})))
        taken = train_step(images, labels, task, optimizer, parameters, clip_grad)
        record[learner.stage].append((taken, expected.item()))
        return taken

    def fit_and_watch(task):
        fit(task)
        if task.index == 1:
            record["teacher"] = weakref.ref(learner.teacher)
        if task.index == 2:
            gc.collect()
            record["teacher_alive_after_task_3"] = record["teacher"]() is not None

    learner.train_step, learner.fit = step, fit_and_watch
    results = run.execute()
    return run, raw, results, record


def kd_formula(logits, teacher_logits, T):
    return -(F.softmax(teacher_logits / T, 1) * F.log_softmax(logits / T, 1)).sum(1).mean()


def test_boosting_loss_is_balanced_cross_entropy_plus_new_branch_cross_entropy_plus_kd(three_tasks):
    steps = three_tasks[3]["boosting"]
    assert len(steps) >= 3  # 8 images of the new classes + 12 exemplars, batch 8
    for taken, expected in steps:
        assert taken == pytest.approx(expected, rel=1e-5)


def test_compression_loss_is_balanced_distillation_from_the_teacher(three_tasks):
    steps = three_tasks[3]["compression"]
    assert len(steps) >= 3
    for taken, expected in steps:
        assert taken == pytest.approx(expected, rel=1e-5)


def test_old_branch_is_frozen_in_eval_mode_and_untouched(three_tasks):
    olds = three_tasks[3]["old"]
    first = olds[0][0]
    for state, training, requires_grad, optimised in olds:
        assert not training and not requires_grad and not optimised
        assert all(torch.equal(value, first[name]) for name, value in state.items())


def test_compression_leaves_one_network_and_the_checkpoint_holds_it(three_tasks):
    run, raw, results, record = three_tasks
    learner = run.learner
    assert not record["teacher_alive_after_task_3"]  # task 2's teacher is freed when task 3 starts
    assert learner.student is None and learner.net["backbone"] is not learner.teacher["old"]
    backbone_keys = set(run.ctx.backbone.state_dict())
    config = build_config(raw)
    state = CheckpointStore(run_directory(config.experiment, config.experiment.seed[0])).read()
    saved = state["learner"]["net"]
    assert set(saved) == {f"backbone.{k}" for k in backbone_keys} | {"fc.weight", "fc.bias"}  # one backbone
    assert tuple(saved["fc.weight"].shape) == (8, run.ctx.backbone.feature_dim)
    # PILOT's curve is the teacher's; the student's accuracy is reported beside it once a student exists
    assert "student_accuracy" not in results["per_task"][0]
    assert all(0 <= row["student_accuracy"] <= 100 for row in results["per_task"][1:])


def test_evaluating_the_student_frees_the_teacher_and_az_keeps_new_rows_off_old_features(tmp_path):
    config = build_config(tiny_raw(tmp_path, **SMALL, max_tasks=2, evaluate="student", oofc="az"))
    run = Run(config)
    learner, boosted = run.learner, []
    compressed_network = learner.compressed_network

    def watch(teacher, num_seen):  # the teacher as boosting left it
        boosted.append(teacher["fc"].weight.detach().clone())
        return compressed_network(teacher, num_seen)

    learner.compressed_network = watch
    results = run.execute()
    assert learner.teacher is None and learner.net["backbone"] is run.ctx.backbone
    assert "student_accuracy" not in results["per_task"][1]
    (weight,) = boosted
    dim = run.ctx.backbone.feature_dim
    assert not weight[4:, :dim].any() and weight[4:, dim:].any()  # new classes: zero over the old branch only


def test_kill_and_resume_equals_an_uninterrupted_run(three_tasks, tmp_path):
    """The module's run is the uninterrupted one (its recording hooks change nothing it computes)."""
    full = three_tasks[2]
    resumed = killed_then_resumed(build_config(tiny_raw(tmp_path, **SMALL, max_tasks=3)))
    assert resumed["counts"] == full["counts"] and resumed["accuracy_curve"] == full["accuracy_curve"]
    assert resumed["memory"] == full["memory"]
    assert [row.get("student_accuracy") for row in resumed["per_task"]] == \
        [row.get("student_accuracy") for row in full["per_task"]]


@pytest.mark.parametrize("keys, message", [
    ({"oofc": "zero"}, "oofc must be 'ft'"), ({"beta1": 1.0}, r"beta1 .* must be in \[0, 1\)"),
    ({"evaluate": "both"}, "evaluate must be 'teacher'"), ({"T": 0}, "T .* must be above 0"),
    ({"boosting_epochs": -1}, "tuned_epoch must be >= 0"), ({"lr": 0}, "init_lr > 0"),
    ({"fixed_memory": True, "memory_per_class": 0, "memory_size": 0}, "memory_size and memory_per_class are 0"),
])
def test_bad_foster_keys_are_clear_errors(tmp_path, keys, message):
    with pytest.raises(PilotError, match=message):
        Run(build_config(tiny_raw(tmp_path, **{**FOSTER, **keys})))


def test_domain_streams_are_refused(tmp_path):
    with pytest.raises(PilotError, match=r"foster does not support scenario \"domain\": its memory keeps"):
        build_config(tiny_raw(tmp_path, **FOSTER, scenario="domain"))


@requires_assets
@pytest.mark.slow
def test_foster_on_real_weights_and_data(tmp_path):
    """Real weights and images through both stages (2 + 2 classes, 2 images each: P1 measures accuracy)."""
    config = build_config(real_raw(tmp_path, **{**FOSTER, "batch_size": 4, "memory_per_class": 1}, init_cls=2,
                                   increment=2, train_per_class=2, test_per_class=2, max_tasks=2))
    (result,) = run_experiment(config)
    assert result["status"] == "complete" and len(result["accuracy_curve"]) == 2
    assert 0 <= result["per_task"][1]["student_accuracy"] <= 100
