"""MEMO as PILOT's models/memo.py with backbone/vit_memo.py (AdaptiveNet): generic blocks shared by every task and
frozen after the first, a specialised last block per task, the auxiliary loss weighted by alpha_aux, the
train_base / train_adaptive switches, kill-and-resume."""
from __future__ import annotations

import copy
import json
import warnings
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from pilot.configure import build_config, load_config
from pilot.engine import Run, run_experiment
from pilot.errors import PilotError

from conftest import killed_then_resumed, real_raw, requires_assets, tiny_raw

MEMO = {"model_name": "memo", "init_epoch": 1, "epochs": 1, "batch_size": 8, "memory_size": 12,
        "init_milestones": [], "milestones": [], "synthetic_per_class": 4, "alpha_aux": 0.5}
EXPS = Path(__file__).resolve().parents[1] / "exps"


@pytest.fixture(scope="module")
def three_tasks(tmp_path_factory):
    """A 3-task run (4, 2, 2 classes) of the tiny 2-block ViT (block 1 generic, block 2 specialised), recording the
    network before and after each task and every step of task 2 (its loss taken and recomputed)."""
    tmp_path = tmp_path_factory.mktemp("memo")
    raw = tiny_raw(tmp_path / "full", **MEMO, max_tasks=3)
    run = Run(build_config(raw))
    learner = run.learner
    record = {"begun": [], "steps": [], "ended": []}
    begin_task, train_step, end_task = learner.begin_task, learner.train_step, learner.end_task

    def begin(task):
        begin_task(task)
        record["begun"].append(copy.deepcopy(learner.net))

    def step(images, labels, task, optimizer, parameters, clip_grad):
        if task.index == 1:
            generic, members, head = learner.net["generic"], learner.net["branches"].members, learner.net["head"]
            tokens = generic(images)
            features = torch.cat([m.fc_norm(m.norm(m.block(tokens))[:, 0]) for m in members], dim=1)  # class token
            old = torch.where(labels >= 4, labels - 3, torch.zeros_like(labels))
            expected = (F.cross_entropy(head(features), labels)
                        + 0.5 * F.cross_entropy(learner.aux_head(features[:, 192:]), old))
            record["steps"].append((train_step(images, labels, task, optimizer, parameters, clip_grad), expected.item()))
            record["modes"] = (generic.training, members[0].training, members[1].training)
            return record["steps"][-1][0]
        return train_step(images, labels, task, optimizer, parameters, clip_grad)

    def end(task):
        end_task(task)
        record["ended"].append(copy.deepcopy(learner.net))

    record["initial"] = copy.deepcopy(run.ctx.backbone.model)  # before the split
    learner.begin_task, learner.train_step, learner.end_task = begin, step, end
    return run, raw, run.execute(), record


def same(a: torch.nn.Module, b: torch.nn.Module) -> bool:
    return all(torch.equal(x, y) for x, y in zip(a.state_dict().values(), b.state_dict().values()))


def test_the_vit_splits_into_shared_generic_blocks_and_a_specialised_last_block_per_task(three_tasks):
    _, _, _, record = three_tasks
    initial, net = record["initial"], record["ended"][2]
    assert len(net["generic"].vit.blocks) == 1 and len(net["branches"].members) == 3
    first = record["begun"][0]["branches"].members[0]
    # PILOT's last_block is freshly built (PyTorch's init: drawn biases), not the ViT's last block (timm: zero biases)
    assert torch.equal(initial.blocks[-1].attn.qkv.bias, torch.zeros(3 * 192))
    assert not torch.equal(first.block.attn.qkv.bias, torch.zeros(3 * 192))
    assert same(first.norm, initial.norm)  # the final norm is the backbone's
    assert same(record["begun"][1]["branches"].members[1], record["ended"][0]["branches"].members[0])  # copied


def test_generic_blocks_train_with_the_first_task_then_freeze(three_tasks):
    _, _, _, record = three_tasks
    generic = [net["generic"] for net in record["ended"]]
    assert not same(record["begun"][0]["generic"], generic[0])  # trained with the first task
    assert same(generic[0], generic[1]) and same(generic[1], generic[2])  # bit-identical after it
    assert not any(p.requires_grad for p in generic[2].parameters())


def test_old_specialised_blocks_freeze_and_the_new_one_trains(three_tasks):
    _, _, _, record = three_tasks
    before, after = record["begun"][1]["branches"].members, record["ended"][1]["branches"].members
    assert same(before[0], after[0]) and not any(p.requires_grad for p in after[0].parameters())
    assert not same(before[1], after[1]) and all(p.requires_grad for p in after[1].parameters())
    assert record["modes"] == (False, False, True)  # PILOT's set_network: frozen parts in eval mode


def test_later_task_loss_adds_alpha_aux_times_the_auxiliary_loss(three_tasks):
    steps = three_tasks[3]["steps"]
    assert len(steps) >= 2
    for taken, expected in steps:
        assert taken == pytest.approx(expected, rel=1e-5)


def test_kill_and_resume_equals_an_uninterrupted_run(three_tasks):
    _, raw, full, _ = three_tasks
    resumed = killed_then_resumed(build_config({**raw, "log_dir": str(Path(raw["log_dir"]).parent.parent / "killed")}))
    assert resumed["counts"] == full["counts"] and resumed["accuracy_curve"] == full["accuracy_curve"]
    assert resumed["memory"] == full["memory"]


@pytest.mark.parametrize("train_base, train_adaptive", [(True, False), (False, True)])
def test_train_base_and_train_adaptive_keep_those_blocks_training(tmp_path, train_base, train_adaptive):
    run = Run(build_config(tiny_raw(tmp_path, **MEMO, train_base=train_base, train_adaptive=train_adaptive)))
    learner = run.learner
    for task in run.stream.tasks[:3]:
        learner.begin_task(task)
    generic, members = learner.net["generic"], learner.net["branches"].members
    assert all(p.requires_grad is train_base for p in generic.parameters())
    assert all(p.requires_grad is train_adaptive for m in members[:2] for p in m.parameters())
    assert all(p.requires_grad for p in members[2].parameters())
    learner.set_train_mode(True)
    assert (generic.training, members[0].training, members[2].training) == (train_base, train_adaptive, True)


@pytest.mark.parametrize("keys, message", [
    ({"scenario": "domain", "dataset": "synthetic_domains"}, "memo does not support scenario \"domain\": its memory"),
    ({"scheduler": "constant"}, "scheduler must be one of steplr, cosine for memo"),
    ({"scheduler": "cosine"}, "set t_max to 1"),
    ({"alpha_aux": -1}, "alpha_aux .* must be 0 or more"),
    ({"skip": True}, "set skip to false"),
    ({"train_base": "yes"}, "train_base"),
    ({"backbone_args": {"img_size": 32, "patch_size": 8, "depth": 1}}, "at least 2 blocks"),
])
def test_bad_memo_keys_are_clear_errors(tmp_path, keys, message):
    with pytest.raises(PilotError, match=message):
        Run(build_config(tiny_raw(tmp_path, **{**MEMO, **keys})))


def test_pilots_memo_json_loads_unchanged():
    raw = json.loads((EXPS / "memo.json").read_text())
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        config = load_config(EXPS / "memo.json")
    messages = [str(w.message) for w in caught]
    assert any("Ignoring PILOT config keys" in m and ": debug." in m for m in messages), messages
    assert all(m.startswith("Ignoring PILOT config keys") or "does not decay" in m for m in messages), messages
    assert all(getattr(config.learner, key) == value for key, value in raw.items() if hasattr(config.learner, key))


@requires_assets
@pytest.mark.slow
def test_memo_on_real_weights_and_data(tmp_path):
    """Real weights and images through training, herding and prediction (tiny: P1 measures accuracy)."""
    config = build_config(real_raw(tmp_path, model_name="memo", init_cls=5, increment=5, train_per_class=2,
                                   test_per_class=2, max_tasks=2, init_epoch=1, epochs=1, batch_size=10,
                                   init_milestones=[], milestones=[], memory_size=10))
    (result,) = run_experiment(config)
    assert result["status"] == "complete" and len(result["accuracy_curve"]) == 2
    assert [m["total"] for m in result["memory"]] == [10, 10]
