"""RAPF: the parameter fusion and the hard pairs against the formulas on hand-set tensors, the learner's wiring
(frozen CLIP, fusion after each task but the first), bad settings, and resume, on a tiny random CLIP."""
from __future__ import annotations

import json
import math

import pytest
import torch

import pilot.learners.rapf as rapf
from conftest import clean_error, killed_then_resumed
from pilot.assembly import assemble
from pilot.configure import build_config
from pilot.engine import run_experiment
from pilot.errors import PilotError
from pilot.learners.rapf import fuse_adapter, hard_pairs, hinge_loss, pseudo_classes
from test_clip import TINY_CLIP, clip_raw


@pytest.fixture(scope="module")
def clip_model(tmp_path_factory) -> str:
    path = tmp_path_factory.mktemp("clip") / "pilot-tiny-text-clip.json"
    path.write_text(json.dumps(TINY_CLIP))
    return str(path)


def rapf_raw(tmp_path, model, **overrides) -> dict:
    return clip_raw(tmp_path, model, **{"model_name": "rapf", "templates": ["a good photo of a {}."], "tuned_epoch": 2,
                                        "batch_size": 8, "milestones": [1], "max_tasks": 3, **overrides})


def test_fusion_of_a_diagonal_old_weight_by_hand():
    """W_old = diag(3, 2): U = I, S Vᵀ = W_old, P = W_new; |P − SVᵀ| = [[2, 0], [1, 2]], max 2; + 0.25, clipped."""
    old, new = torch.tensor([[3.0, 0.0], [0.0, 2.0]]), torch.tensor([[5.0, 0.0], [1.0, 4.0]])
    mask = torch.tensor([[1.0, 0.25], [0.75, 1.0]])  # min([[1, 0], [0.5, 1]] + 0.25, 1)
    expected = mask * new + (1 - mask) * old  # U = I: [[5, 0], [0.75, 4]]
    torch.testing.assert_close(expected, torch.tensor([[5.0, 0.0], [0.75, 4.0]]))
    torch.testing.assert_close(fuse_adapter(old, new, 0.25), expected)


def test_fusion_in_the_old_weights_singular_basis_by_hand():
    """W_old = U diag(s) Vᵀ with a hand-set rotation U and reflection V: the formula with those factors."""
    angle = 0.3
    u = torch.tensor([[math.cos(angle), -math.sin(angle)], [math.sin(angle), math.cos(angle)]], dtype=torch.float64)
    vh = torch.tensor([[0.0, 1.0], [1.0, 0.0]], dtype=torch.float64)
    kept = torch.diag(torch.tensor([3.0, 0.5], dtype=torch.float64)) @ vh
    old, new = u @ kept, torch.tensor([[1.0, -2.0], [0.5, 2.5]], dtype=torch.float64)
    projected = u.T @ new
    distance = (projected - kept).abs()
    mask = torch.clamp(distance / distance.max() + 0.6, max=1.0)
    expected = u @ (mask * projected + (1 - mask) * kept)
    torch.testing.assert_close(fuse_adapter(old, new, 0.6), expected)
    torch.testing.assert_close(fuse_adapter(old, new, 1.0), new)  # mix_bias 1: the new weight alone


def test_hard_pairs_of_hand_set_text_features():
    """Old classes at 0° and 90°; new ones at 20° (0.35 from class 0), 60° (0.52 from class 1) and 180°."""
    degrees = torch.tensor([0.0, 90.0, 20.0, 60.0, 180.0]) * math.pi / 180
    text = torch.stack([degrees.cos(), degrees.sin()], dim=1)
    assert hard_pairs(text, 2, 0.55).tolist() == [[0, 2], [1, 3]]
    assert hard_pairs(text, 2, 0.5).tolist() == [[0, 2]]
    assert hard_pairs(text, 2, 2.1).tolist() == [[0, 2], [0, 3], [0, 4], [1, 2], [1, 3], [1, 4]]


def test_hinge_by_hand():
    features = torch.tensor([[2.0, 0.0], [0.0, 3.0]])  # normalised: (1, 0), (0, 1)
    own, near = torch.tensor([[0.6, 0.8], [0.0, 1.0]]), torch.tensor([[1.0, 0.0], [0.6, 0.8]])
    expected = (max(0.0, 0.1 - 0.6 + 1.0) + max(0.0, 0.1 - 1.0 + 0.8)) / 2
    torch.testing.assert_close(hinge_loss(features, own, near), torch.tensor(expected))


def test_pseudo_classes_visit_the_old_classes_in_turn():
    order = torch.tensor([3, 1, 0, 2, 4])
    assert [pseudo_classes(order, batch, 2).tolist() for batch in range(4)] == [[3, 1], [0, 2], [4, 3], [1, 0]]


def test_frozen_clip_and_fusion_after_each_later_task(tmp_path, clip_model, monkeypatch):
    fusions = []
    fuse = rapf.fuse_adapter
    monkeypatch.setattr(rapf, "fuse_adapter", lambda old, new, bias: fusions.append((old.clone(), new.clone(), bias))
                        or fuse(old, new, bias))
    run = assemble(build_config(rapf_raw(tmp_path, clip_model, threshold=2.1, shrinkage=True, max_tasks=2)))
    clip = run.backbone.text.model
    before = {name: value.clone() for name, value in clip.state_dict().items()}
    adapters = []
    for task in run.stream.tasks:
        run.ctx.open_fit(task)
        run.learner.fit(task)
        adapters.append(run.learner.adapter.weight.detach().clone())
    for name, value in clip.state_dict().items():
        assert torch.equal(value, before[name]), name
    assert len(fusions) == 1  # after the second task only
    old, new, bias = fusions[0]
    assert bias == 0.6 and torch.equal(old, adapters[0]) and not torch.equal(new, old)
    torch.testing.assert_close(adapters[1], fuse(old, new, bias))
    assert run.learner.gaussians.num_classes == 6


@clean_error
@pytest.mark.parametrize("overrides, message", [
    ({"beta": 0.05}, r"beta must be at least 0\.1"),
    ({"mix_bias": 1.5}, r"mix_bias must be in \[0, 1\]"),
    ({"pseudo_classes_per_batch": 0}, r"pseudo_classes_per_batch must be at least 1"),
])
def test_bad_settings_are_refused_before_anything_is_written(tmp_path, clip_model, overrides, message):
    with pytest.raises(PilotError, match=message):
        run_experiment(build_config(rapf_raw(tmp_path, clip_model, **overrides)))
    assert not (tmp_path / "logs").exists()


def test_resume_equals_an_uninterrupted_run(tmp_path, clip_model):
    """Killed after the first task; the second draws pseudo-features, has every pair hard (threshold 2.1: the
    hinge) and ends with the fusion."""
    (uninterrupted,) = run_experiment(build_config(rapf_raw(tmp_path / "full", clip_model, threshold=2.1, max_tasks=2)))
    resumed = killed_then_resumed(build_config(rapf_raw(tmp_path / "killed", clip_model, threshold=2.1, max_tasks=2)), 1)
    assert resumed["counts"] == uninterrupted["counts"]
    assert resumed["accuracy_curve"] == uninterrupted["accuracy_curve"]
