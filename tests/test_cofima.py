"""CoFiMA: SLCA plus a Fisher-weighted merge with the previous task's model (tiny random ViT)."""
import pytest
import torch

from pilot.config import build_config
from pilot.engine import Run, run_experiment

from conftest import killed_then_resumed, real_raw, requires_assets, tiny_raw


def cofima_raw(tmp_path, **overrides) -> dict:
    raw = tiny_raw(tmp_path, model_name="cofima", epochs=1, milestones=[])
    raw.update(overrides)
    return raw


def parameters(module) -> dict:
    return {name: p.detach().clone() for name, p in module.named_parameters()}


@pytest.mark.parametrize("fisher_weighting", [True, False])
def test_merge_combines_previous_final_model_and_trained_model_by_their_fishers(tmp_path, fisher_weighting):
    # No alignment, so the aligned heads hold the merge's result.
    learner = Run(build_config(cofima_raw(tmp_path, ca_epochs=0, fisher_weighting=fisher_weighting))).learner
    first, second = learner.ctx.stream.tasks[:2]
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


def test_resume_after_a_kill_matches_an_uninterrupted_run(tmp_path):
    uninterrupted = run_experiment(build_config(cofima_raw(tmp_path / "full")))[0]
    config = build_config(cofima_raw(tmp_path / "killed"))
    resumed = killed_then_resumed(config)
    assert uninterrupted["status"] == "complete" and len(uninterrupted["accuracy_curve"]) == 4
    assert resumed["counts"] == uninterrupted["counts"]
    assert resumed["accuracy_curve"] == uninterrupted["accuracy_curve"]


@requires_assets
def test_real_deit_tiny_smoke(tmp_path):
    """Real weights and images through training, Fisher, merge and alignment (P1 measures accuracy)."""
    config = build_config(real_raw(
        tmp_path, model_name="cofima", train_per_class=3, test_per_class=2, max_tasks=2,
        epochs=2, milestones=[], batch_size=3,
    ))
    (result,) = run_experiment(config)
    # 10-way and 20-way chance are 10% and 5%. A head trained so (20 SGD steps, 30 images) on frozen
    # features reaches 35-55% over seeds; CA then fits all heads to the class Gaussians.
    assert result["accuracy_curve"][0] >= 25 and result["accuracy_curve"][1] >= 20
