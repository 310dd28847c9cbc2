"""DER as PILOT's models/der.py (DERNet): a branch per task copied from the previous, old branches frozen as PILOT
freezes them, the widened head, the auxiliary loss, herding on the concatenated features, kill-and-resume."""
from __future__ import annotations

import copy
import json
import warnings
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from pilot.configure import build_config, load_config
from pilot.engine import Run, run_experiment
from pilot.errors import PilotError
from pilot.modules.branches import auxiliary_targets, widened_head

from conftest import killed_then_resumed, real_raw, requires_assets, tiny_raw

DER = {"model_name": "der", "init_epoch": 1, "epochs": 1, "batch_size": 8, "memory_size": 12,
       "init_milestones": [], "milestones": [], "synthetic_per_class": 4}
EXPS = Path(__file__).resolve().parents[1] / "exps"


def test_auxiliary_targets_put_every_old_class_in_class_0():
    labels = torch.tensor([0, 3, 4, 5, 2, 4])
    assert auxiliary_targets(labels, num_old=4).tolist() == [0, 0, 1, 2, 0, 1]


def test_widened_head_copies_the_old_head_into_its_corner():
    old = nn.Linear(2, 3)
    with torch.no_grad():
        old.weight.copy_(torch.arange(6.0).view(3, 2))
        old.bias.copy_(torch.tensor([1.0, 2.0, 3.0]))
    wide = widened_head(old, 4, 5)
    assert torch.equal(wide.weight[:3, :2], old.weight) and torch.equal(wide.bias[:3], old.bias)
    assert torch.equal(wide.bias[3:], torch.zeros(2))  # SimpleLinear: zero bias, Kaiming-uniform weights
    bound = (3 / 4) ** 0.5  # kaiming_uniform_(nonlinearity="linear"): sqrt(3 / fan_in)
    assert wide.weight[:, 2:].abs().max() <= bound and wide.weight[3:].abs().max() <= bound
    assert not torch.equal(wide.weight[:3, 2:], torch.zeros(3, 2))  # old classes get drawn weights on the new branch


@pytest.fixture(scope="module")
def three_tasks(tmp_path_factory):
    """A 3-task run (4, 2, 2 classes), recording the network before each later task, every step's loss (taken and
    recomputed from PILOT's formula), and the state of the old branch while task 2 trains."""
    tmp_path = tmp_path_factory.mktemp("der")
    raw = tiny_raw(tmp_path / "full", **DER, max_tasks=3)
    run = Run(build_config(raw))
    learner = run.learner
    record = {"begun": [], "steps": [], "ended": []}
    begin_task, train_step, end_task = learner.begin_task, learner.train_step, learner.end_task

    def begin(task):
        record["before"] = copy.deepcopy(learner.net)  # as the previous task left it
        begin_task(task)
        record["begun"].append(copy.deepcopy(learner.net))

    def step(images, labels, task, optimizer, parameters, clip_grad):
        if task.index == 1:
            branches, head, aux = learner.net["branches"].members, learner.net["head"], learner.aux_head
            features = torch.cat([branches[0](images), branches[1](images)], dim=1)
            old = torch.where(labels >= 4, labels - 3, torch.zeros_like(labels))  # 4 old classes -> aux class 0
            expected = F.cross_entropy(head(features), labels) + F.cross_entropy(aux(features[:, -192:]), old)
            record["steps"].append((train_step(images, labels, task, optimizer, parameters, clip_grad), expected.item()))
            record["modes"] = (branches[0].training, branches[1].training,
                               {id(p) for p in branches[0].parameters()} & {id(p) for p in parameters})
            return record["steps"][-1][0]
        return train_step(images, labels, task, optimizer, parameters, clip_grad)

    def end(task):
        end_task(task)
        record["ended"].append(copy.deepcopy(learner.net))

    learner.begin_task, learner.train_step, learner.end_task = begin, step, end
    return run, raw, run.execute(), record


def test_a_task_adds_a_branch_copied_from_the_previous_and_widens_the_head(three_tasks):
    _, _, _, record = three_tasks
    after_first, begun_second = record["ended"][0], record["begun"][1]
    members = begun_second["branches"].members
    assert len(members) == 2 and len(record["begun"][2]["branches"].members) == 3
    for name, value in members[0].state_dict().items():
        assert torch.equal(members[1].state_dict()[name], value), name  # the new branch starts as the old one
    old_head, head = after_first["head"], begun_second["head"]
    assert head.weight.shape == (6, 2 * 192)
    assert torch.equal(head.weight[:4, :192], old_head.weight) and torch.equal(head.bias[:4], old_head.bias)


def test_old_branches_freeze_as_pilot_freezes_them(three_tasks):
    """PILOT sets requires_grad False on every earlier backbone and puts them in eval mode each epoch; the new
    branch and the whole head (old classes' rows included) train."""
    _, _, _, record = three_tasks
    before, after = record["begun"][1], record["ended"][1]
    old_before, old_after = before["branches"].members[0], after["branches"].members[0]
    assert all(not p.requires_grad for p in old_after.parameters())
    for name, value in old_before.state_dict().items():
        assert torch.equal(old_after.state_dict()[name], value), name  # bit-identical after a task of training
    old_training, new_training, optimised_old = record["modes"]
    assert not old_training and new_training and not optimised_old
    new_before, new_after = before["branches"].members[1], after["branches"].members[1]
    assert all(p.requires_grad for p in new_after.parameters())
    assert any(not torch.equal(a, b) for a, b in zip(new_before.parameters(), new_after.parameters()))
    assert not torch.equal(before["head"].weight[:4], after["head"].weight[:4])  # PILOT trains the old rows too
    third = record["ended"][2]["branches"].members
    assert not any(p.requires_grad for member in third[:2] for p in member.parameters())


def test_later_task_loss_is_cross_entropy_over_seen_classes_plus_the_auxiliary_loss(three_tasks):
    steps = three_tasks[3]["steps"]
    assert len(steps) >= 2  # 8 images of the new classes + 12 exemplars, batch 8
    for taken, expected in steps:
        assert taken == pytest.approx(expected, rel=1e-5)


def test_memory_is_herded_on_the_concatenated_features(three_tasks):
    run, _, results, _ = three_tasks
    learner = run.learner
    assert [m["total"] for m in results["memory"]] == [12, 12, 8]  # 12 // 4, 12 // 6, 12 // 8 per class
    exemplars = run.ctx.memory.split()
    assert learner.memory_features(exemplars).shape == (len(exemplars), 3 * 192)


def test_kill_and_resume_equals_an_uninterrupted_run(three_tasks):
    _, raw, full, _ = three_tasks
    resumed = killed_then_resumed(build_config({**raw, "log_dir": str(Path(raw["log_dir"]).parent.parent / "killed")}))
    assert resumed["counts"] == full["counts"] and resumed["accuracy_curve"] == full["accuracy_curve"]
    assert resumed["memory"] == full["memory"]


@pytest.mark.parametrize("keys, message", [
    ({"scenario": "domain", "dataset": "synthetic_domains"}, "der does not support scenario \"domain\": its memory"),
    ({"batch_size": 0}, "batch_size >= 1"),
    ({"epochs": -1}, "tuned_epoch must be >= 0"),
    ({"lrate_decay": "fast"}, "lrate_decay"),
    ({"alpha_aux": 1.0}, "Unknown config key 'alpha_aux' for learner 'der'"),
])
def test_bad_der_keys_are_clear_errors(tmp_path, keys, message):
    with pytest.raises(PilotError, match=message):
        build_config(tiny_raw(tmp_path, **{**DER, **keys}))


def test_pilots_der_json_loads_unchanged():
    raw = json.loads((EXPS / "der.json").read_text())
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        config = load_config(EXPS / "der.json")
    messages = [str(w.message) for w in caught]
    assert any("Ignoring PILOT config keys" in m and ": T." in m for m in messages), messages
    assert all(m.startswith("Ignoring PILOT config keys") or "does not decay" in m for m in messages), messages
    assert all(getattr(config.learner, key) == value for key, value in raw.items() if hasattr(config.learner, key))


@requires_assets
@pytest.mark.slow
def test_der_on_real_weights_and_data(tmp_path):
    """Real weights and images through training, herding and prediction (tiny: P1 measures accuracy)."""
    config = build_config(real_raw(tmp_path, model_name="der", init_cls=5, increment=5, train_per_class=2,
                                   test_per_class=2, max_tasks=2, init_epoch=1, epochs=1, batch_size=10,
                                   init_milestones=[], milestones=[], memory_size=10))
    (result,) = run_experiment(config)
    assert result["status"] == "complete" and len(result["accuracy_curve"]) == 2
    assert [m["total"] for m in result["memory"]] == [10, 10]
