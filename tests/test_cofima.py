"""CoFiMA: SLCA plus a Fisher-weighted merge with the previous task's model (tiny random ViT)."""
from unittest import mock

import pytest
import torch

from pilot.configure import build_config
from pilot.engine import Run
from pilot.errors import PilotError
from pilot.learners import _gradient

from conftest import assert_resume_matches_uninterrupted, clean_error, tiny_raw


def cofima_raw(tmp_path, **overrides) -> dict:
    raw = tiny_raw(tmp_path, model_name="cofima", epochs=1, milestones=[])
    raw.update(overrides)
    return raw


def parameters(module) -> dict:
    return {name: p.detach().clone() for name, p in module.named_parameters()}


@pytest.mark.parametrize("fisher_weighting", [True, False])
def test_merge_combines_previous_final_model_and_trained_model_by_their_fishers(tmp_path, fisher_weighting):
    # No alignment, so the aligned heads hold the merge's result.
    run = Run(build_config(cofima_raw(tmp_path, ca_epochs=0, fisher_weighting=fisher_weighting, new_head="trained")))
    learner = run.learner
    first, second = run.stream.tasks[:2]
    learner.fit(first)
    previous = parameters(learner.model(learner.net["aligned_heads"][:1]))
    previous_fisher = learner.previous_fisher
    recorded = {}
    estimate, merge = learner.fisher, learner.merge_with_previous

    def recording_fisher(task):
        recorded["fisher_of"] = parameters(learner.model(learner.net["heads"][:2]))
        return estimate(task)

    def recording_merge(fisher):
        recorded["trained"] = parameters(learner.model(learner.net["aligned_heads"][:2]))
        recorded["fisher"] = fisher
        merge(fisher)

    learner.fisher, learner.merge_with_previous = recording_fisher, recording_merge
    learner.fit(second)
    merged = parameters(learner.model(learner.net["aligned_heads"][:2]))
    trained = recorded["trained"]
    assert merged.keys() == trained.keys() and set(previous) == set(merged) - {"heads.1.weight", "heads.1.bias"}
    lam = 0.4
    for name, theta_a in previous.items():
        theta_b = trained[name]
        expected = (1 - lam) * theta_a + lam * theta_b
        if fisher_weighting:
            fisher_a, fisher_b = previous_fisher[name].clamp(max=1e-4), recorded["fisher"][name].clamp(max=1e-4)
            total = (1 - lam) * fisher_a + lam * fisher_b
            expected = torch.where(total > 0, ((1 - lam) * fisher_a * theta_a + lam * fisher_b * theta_b) / total,
                                   expected)
        torch.testing.assert_close(merged[name], expected, rtol=1e-5, atol=1e-7)
    for name in ("heads.1.weight", "heads.1.bias"):  # the new head is the trained one
        torch.testing.assert_close(merged[name], trained[name])
    assert not torch.equal(merged["backbone.model.blocks.0.attn.qkv.weight"],
                           trained["backbone.model.blocks.0.attn.qkv.weight"])
    # the trained heads stay unmerged: the next task trains from them (official fc.recall())
    assert torch.equal(learner.net["heads"][0].weight, trained["heads.0.weight"])
    if fisher_weighting:  # Fisher of the trained model, kept for the next merge
        assert all(torch.equal(recorded["fisher_of"][k], trained[k]) for k in trained)
        assert learner.previous_fisher is recorded["fisher"]
        assert any(f.max() >= 1e-4 for f in recorded["fisher"].values()), "the cap is never reached"


@pytest.mark.parametrize("old_head_fisher", ["true", "stale_gradient"])
def test_resume_after_a_kill_matches_an_uninterrupted_run(tmp_path, old_head_fisher):
    """With PILOT's stale-gradient Fisher the last head gradients travel in the checkpoint too."""
    uninterrupted, _ = assert_resume_matches_uninterrupted(
        lambda folder: build_config(cofima_raw(tmp_path / folder, old_head_fisher=old_head_fisher)))
    assert uninterrupted["status"] == "complete" and len(uninterrupted["accuracy_curve"]) == 4


@clean_error
def test_an_unknown_old_head_fisher_is_a_clear_error(tmp_path):
    with pytest.raises(PilotError, match="old_head_fisher must be one of true, stale_gradient, got 'stale'"):
        Run(build_config(cofima_raw(tmp_path, old_head_fisher="stale")))



def test_the_new_head_after_a_fisher_merge_is_its_capped_fisher_times_its_weights(tmp_path):
    """The official rule (F_theta1 in the official interpolate_weights): about zero; alignment relearns it."""
    run = Run(build_config(cofima_raw(tmp_path, ca_epochs=0)))
    learner = run.learner
    first, second = run.stream.tasks[:2]
    learner.fit(first)
    recorded, merge = {}, learner.merge_with_previous

    def recording_merge(fisher):
        recorded["trained"] = parameters(learner.net["aligned_heads"][1])
        recorded["fisher"] = fisher
        merge(fisher)

    learner.merge_with_previous = recording_merge
    learner.fit(second)
    for name in ("weight", "bias"):
        fisher = recorded["fisher"][f"heads.1.{name}"].clamp(max=1e-4)
        merged = getattr(learner.net["aligned_heads"][1], name)
        torch.testing.assert_close(merged, fisher * recorded["trained"][name])
        assert merged.abs().max() <= 1e-4 * recorded["trained"][name].abs().max()


# old_head_fisher "stale_gradient" (PILOT's, set by exps/reproduce/pilot/cofima.json): each old head's Fisher is
# the square of the last gradient it received, not its gradient on the task's data


@pytest.fixture
def one_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # 0.8 s; 17 s on two threads of a CPU busy with other runs
    yield
    torch.set_num_threads(threads)


def test_old_heads_fisher_is_the_square_of_their_last_gradient(tmp_path, one_thread):
    run = Run(build_config(tiny_raw(tmp_path, model_name="cofima", epochs=1, milestones=[], ca_epochs=1,
                                    train_per_class=4, test_per_class=1, max_tasks=3,
                                    old_head_fisher="stale_gradient")))
    learner = run.learner
    fishers, steps, descend = [], [], _gradient.descend
    estimate = learner.fisher
    learner.fisher = lambda task: fishers.append(estimate(task)) or fishers[-1]

    def recording_descend(optimizer, loss, *args, **kwargs):  # alignment's steps: the heads' gradients after each
        value = descend(optimizer, loss, *args, **kwargs)
        aligned = {f"heads.{t}.{kind}": getattr(head, kind).grad
                   for t, head in enumerate(learner.seen_heads(learner.net["aligned_heads"]))
                   for kind in ("weight", "bias")}
        if all(gradient is not None for gradient in aligned.values()):  # not a training step (those leave them None)
            steps.append({name: gradient.clone() for name, gradient in aligned.items()})
        return value

    first, second, third = run.stream.tasks[:3]
    learner.fit(first)  # no alignment: head 0 keeps the gradient of the last Fisher batch
    after_first = dict(learner.last_head_gradients)
    assert set(after_first) == {"heads.0.weight", "heads.0.bias"}
    with mock.patch.object(_gradient, "descend", recording_descend):
        learner.fit(second)
    for name, gradient in after_first.items():
        torch.testing.assert_close(fishers[1][name], gradient.pow(2), rtol=0, atol=0)
    last_alignment_step = steps[-1]
    assert set(last_alignment_step) == {f"heads.{t}.{k}" for t in (0, 1) for k in ("weight", "bias")}
    learner.fit(third)
    for name, gradient in last_alignment_step.items():
        torch.testing.assert_close(fishers[2][name], gradient.pow(2), rtol=0, atol=0)
        assert not torch.equal(gradient, after_first.get(name, torch.zeros(0)))
    # the new head's and the backbone's entries are true Fisher: not the squares of any stored gradient
    assert fishers[2]["heads.2.weight"].abs().max() > 0
    assert not torch.equal(fishers[2]["heads.2.weight"], last_alignment_step["heads.1.weight"].pow(2))
