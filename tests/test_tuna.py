"""TUNA: task adapters, EMR-merged universal adapter, lowest-entropy selection combined with the universal one."""
import pytest
import torch

from pilot.configure import build_config
from pilot.engine import Run
from pilot.errors import PilotError
from pilot.modules.merge import emr_merge

from conftest import killed_then_resumed, run_recording_each_task, tiny_raw


def tuna_config(tmp_path, **overrides):
    settings = {"tuned_epoch": 1, "batch_size": 8, "crct_epochs": 2, "max_tasks": 3, "train_per_class": 2,
                "test_per_class": 2, "use_orth": True, **overrides}
    return build_config(tiny_raw(tmp_path, model_name="tuna", **settings))


@pytest.fixture(scope="module")
def trained_run(tmp_path_factory):
    """A TUNA run through 3 tasks (orthogonality on), with the backbone before and the network after each task."""
    run = Run(tuna_config(tmp_path_factory.mktemp("tuna")))
    return (run, *run_recording_each_task(run))


def test_emr_merge_on_hand_set_vectors():
    vectors = [{"w": torch.tensor([1.0, -2.0, 0.5, 0.0])}, {"w": torch.tensor([-3.0, -1.0, 0.5, 0.0])},
               {"w": torch.tensor([1.0, 1.0, 3.0, 0.0])}]
    # sums -1, -2, 4, 0 elect signs -, -, +, - (a zero sum elects -); each entry keeps the largest agreeing magnitude
    unified, masks, rescalers = emr_merge(vectors)
    torch.testing.assert_close(unified["w"], torch.tensor([-3.0, -2.0, 3.0, 0.0]))
    assert [m["w"].tolist() for m in masks] == [[False, True, True, False], [True, True, True, False],
                                                [False, False, True, False]]
    # mean |v_t| over mean |unified * mask_t|: 0.875 / 1.25, 1.125 / 2, 1.25 / 0.75
    torch.testing.assert_close(rescalers, torch.tensor([0.7, 0.5625, 1.25 / 0.75]))


def merge_formula(weights):
    """The universal adapter written out: sign elected by the sum (zero: -1), then the largest magnitude among
    the adapters whose entry has that sign."""
    merged = {}
    for name in weights[0]:
        values = torch.stack([w[name] for w in weights])
        sign = torch.where(values.sum(0) > 0, 1.0, -1.0)
        merged[name] = sign * torch.clamp(values * sign, min=0).max(0).values
    return merged


def test_universal_adapter_equals_the_merge_of_the_task_adapters(trained_run, tmp_path):
    learner = trained_run[0].learner
    stored = [adapters.state_dict() for adapters in learner.net["adapters"]]
    assert len(stored) == 3 and not torch.equal(stored[0]["units.0.up.weight"], stored[2]["units.0.up.weight"])
    expected = merge_formula(stored)
    assert all(torch.equal(v, expected[k]) for k, v in learner.universal.state_dict().items())
    # on hand-set adapters of opposite signs, too
    fresh = Run(tuna_config(tmp_path)).learner
    generator = torch.Generator().manual_seed(0)
    for _ in range(3):
        with torch.no_grad():
            for parameter in fresh.net["current"].parameters():
                parameter.copy_(torch.randn(parameter.shape, generator=generator))
        fresh.net["adapters"].add(fresh.net["current"].state_dict())
        fresh.net["adapters"].close()
    fresh.merge_universal()
    expected = merge_formula([adapters.state_dict() for adapters in fresh.net["adapters"]])
    for name, value in fresh.universal.state_dict().items():
        torch.testing.assert_close(value, expected[name])
    fresh.config.universal_adapter = "last"  # the official test index: the last task's adapter
    fresh.merge_universal()
    assert fresh.universal_features is fresh.stores[-1]


def test_backbone_stays_bit_identical_and_each_task_keeps_the_carried_adapter(trained_run):
    run, before, after_task, _ = trained_run
    assert all(torch.equal(v, run.ctx.backbone.state_dict()[k]) for k, v in before.items())
    for task, state in enumerate(after_task):  # task k stores the adapter it trained; task k + 1 trains it on
        assert torch.equal(state[f"adapters.{task}.units.0.up.weight"], state["current.units.0.up.weight"])
    assert not torch.equal(after_task[1]["adapters.0.units.0.up.weight"], after_task[1]["current.units.0.up.weight"])


def softmax_entropy(logits):
    p = logits.softmax(0)
    return float(-(p * torch.log(p + 1e-10)).sum())


def test_lowest_entropy_adapter_is_combined_with_the_universal_one(tmp_path):
    run = Run(tuna_config(tmp_path))
    learner, split = run.learner, run.stream.tasks[1].test  # tasks of 4 and 2 classes
    dim = run.ctx.backbone.feature_dim
    with torch.no_grad():  # class c's row is the basis vector e_c: cos = feature_c / |feature|
        for head, rows in zip(learner.net["heads"], (range(0, 4), range(4, 6))):
            head.weight.copy_(torch.eye(dim)[list(rows)])
    basis = torch.eye(dim)
    # image 0: adapter 1 is sure of class 4, adapter 0 hesitates; image 1: the other way round
    task_features = [torch.stack([basis[0] + basis[1] + basis[4], 3 * basis[2] + 0.1 * basis[3]]),
                     torch.stack([5 * basis[4] + 0.05 * basis[0], basis[2] + basis[3] + basis[5]])]
    universal_features = torch.stack([basis[1] + 0.5 * basis[4], basis[2] + 0.5 * basis[0]])
    images = len(split)
    learner.net["adapters"].stores = [lambda s, f=f: f.repeat(images // 2, 1) for f in task_features]
    learner.num_seen, learner.universal_features = 4, None  # after the first task: its adapter's cosines alone
    first = task_features[0][:, :4] / task_features[0].norm(dim=1, keepdim=True)
    torch.testing.assert_close(learner.predict(split)[:2], first)
    learner.num_seen = 6
    learner.universal_features = lambda s: universal_features.repeat(images // 2, 1)
    logits = [[20 * f[i, :6] / f[i].norm() for f in task_features] for i in range(2)]
    assert softmax_entropy(logits[0][1]) < softmax_entropy(logits[0][0])
    assert softmax_entropy(logits[1][0]) < softmax_entropy(logits[1][1])
    chosen = [logits[0][1], logits[1][0]]
    expected = torch.stack([(20 * universal_features[i, :6] / universal_features[i].norm()).softmax(0)
                            + chosen[i].softmax(0) for i in range(2)])
    torch.testing.assert_close(learner.predict(split)[:2], expected)
    wrong = torch.stack([(20 * universal_features[i, :6] / universal_features[i].norm()).softmax(0)
                         + logits[i][i].softmax(0) for i in range(2)])  # the other adapter
    assert not torch.allclose(learner.predict(split)[:2], wrong)


def test_resume_after_a_kill_matches_an_uninterrupted_run(trained_run, tmp_path):
    uninterrupted = trained_run[3]
    resumed = killed_then_resumed(tuna_config(tmp_path))
    assert resumed["counts"] == uninterrupted["counts"]
    assert resumed["accuracy_curve"] == uninterrupted["accuracy_curve"]


def test_bad_setting_is_a_clear_error(tmp_path):
    with pytest.raises(PilotError, match=r"universal_adapter must be one of merged, last, got 'mean'"):
        Run(tuna_config(tmp_path, universal_adapter="mean"))
