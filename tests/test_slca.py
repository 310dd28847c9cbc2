"""SLCA: slow backbone, per-class Gaussians, classifier alignment (tiny random ViT, synthetic images)."""
import pytest
import torch

from pilot.configure import build_config
from pilot.engine import CHECKPOINT, CHECKPOINT_KIND, Run, run_experiment
from pilot.errors import PilotError
from pilot.learners.slca import CA_SAMPLES_PER_CLASS
from pilot.modules.gaussians import COVARIANCE_RIDGE
from pilot.modules.heads import normalise_logits
from pilot.statefile import load_state

from conftest import assert_resume_matches_uninterrupted, real_raw, requires_assets, tiny_raw


def slca_config(tmp_path, **overrides):
    raw = tiny_raw(tmp_path, model_name="slca", epochs=1, milestones=[])
    raw.update(overrides)
    return build_config(raw)


def slca_run(tmp_path, **overrides) -> Run:
    return Run(slca_config(tmp_path, **overrides))


def first_task_changes(tmp_path, bcb_lrscale):
    """Parameter changes of a fit on task 0: its 32 images fit one batch of 64, so one SGD step."""
    run = slca_run(tmp_path, bcb_lrscale=bcb_lrscale)
    before = {k: v.clone() for k, v in run.learner.net.state_dict().items()}
    run.learner.fit(run.stream.tasks[0])
    return {k: v - before[k] for k, v in run.learner.net.state_dict().items()}


def test_backbone_learning_rate_is_the_head_rate_times_bcb_lrscale(tmp_path):
    # Same seed, same batch, same gradients: a first SGD step moves each parameter by lr * (grad + wd * p),
    # so only the learning rate of each group differs between the two runs.
    slow = first_task_changes(tmp_path / "slow", bcb_lrscale=0.01)
    fast = first_task_changes(tmp_path / "fast", bcb_lrscale=1.0)
    backbone = [k for k in slow if k.startswith("backbone.")]
    slow_step, fast_step = (torch.cat([changes[k].flatten() for k in backbone]) for changes in (slow, fast))
    assert slow_step.norm() > 0
    # Compared as whole vectors: single entries of a 1e-4-sized step are at float32 rounding level.
    assert slow_step.norm() / fast_step.norm() == pytest.approx(0.01, rel=1e-3)
    assert torch.cosine_similarity(slow_step, fast_step, dim=0) > 0.9999
    torch.testing.assert_close(slow["heads.0.weight"], fast["heads.0.weight"])
    assert not slow["heads.1.weight"].any(), "a later task's head trained"


def test_class_statistics_are_the_new_classes_feature_gaussians(tmp_path):
    run = slca_run(tmp_path)
    learner, first, second = run.learner, run.stream.tasks[0], run.stream.tasks[1]
    learner.fit(first)
    features, labels = learner.encode(first.train)
    assert learner.gaussians.means.shape == (4, 192) and learner.gaussians.covs.shape == (4, 192, 192)
    for label in first.classes:
        rows = features[labels == label].double()
        torch.testing.assert_close(learner.gaussians.means[label], rows.mean(0).float())
        expected = torch.cov(rows.T) + COVARIANCE_RIDGE * torch.eye(192, dtype=torch.float64)
        torch.testing.assert_close(learner.gaussians.covs[label], expected.float())
    old = learner.gaussians.means.clone(), learner.gaussians.covs.clone()
    learner.fit(second)  # the backbone moves, but old classes keep their statistics
    assert learner.gaussians.means.shape == (6, 192) and learner.gaussians.covs.shape == (6, 192, 192)
    assert torch.equal(learner.gaussians.means[:4], old[0]) and torch.equal(learner.gaussians.covs[:4], old[1])


def test_alignment_samples_from_the_stored_gaussians_with_the_official_mean_shrinkage(tmp_path):
    run = slca_run(tmp_path)
    learner = run.learner
    for task in run.stream.tasks[:2]:
        learner.fit(task)
    factors = torch.linalg.cholesky(learner.gaussians.covs.double()).float()

    def sample_features():
        return learner.gaussians.sample(factors, CA_SAMPLES_PER_CLASS, learner.mean_scales(), run.ctx.generator)

    run.ctx.generator.manual_seed(0)
    features, labels = sample_features()
    run.ctx.generator.manual_seed(0)
    assert torch.equal(sample_features()[0], features)
    assert features.shape == (6 * CA_SAMPLES_PER_CLASS, 192)
    assert torch.bincount(labels).tolist() == [CA_SAMPLES_PER_CLASS] * 6
    scales = torch.tensor([0.95] * 4 + [1.0] * 2)  # 0.9 + 0.1 (task + 1) / (tasks seen)
    torch.testing.assert_close(learner.mean_scales(), scales)
    for label in range(6):
        spread = learner.gaussians.covs[label].diagonal().sqrt()
        error = (features[labels == label].mean(0) - scales[label] * learner.gaussians.means[label]) / spread
        assert error.abs().max() < 5 / CA_SAMPLES_PER_CLASS ** 0.5  # within 5 standard errors


def test_alignment_changes_only_the_aligned_heads_and_is_deterministic(tmp_path):
    run = slca_run(tmp_path)
    learner = run.learner
    for task in run.stream.tasks[:2]:
        learner.fit(task)
    trained = [head.weight.detach().clone() for head in learner.net["heads"][:2]]
    aligned = [head.weight.detach().clone() for head in learner.net["aligned_heads"][:2]]
    assert all(not torch.equal(a, t) for a, t in zip(aligned, trained))
    learner.start_alignment(run.stream.tasks[1])
    run.ctx.generator.manual_seed(123)
    learner.align_classifier()
    again = learner.net["aligned_heads"][0].weight.detach().clone()
    learner.start_alignment(run.stream.tasks[1])
    run.ctx.generator.manual_seed(123)
    learner.align_classifier()
    assert torch.equal(learner.net["aligned_heads"][0].weight, again)
    assert not torch.equal(again, aligned[0])  # other samples, other heads
    assert all(torch.equal(h.weight, t) for h, t in zip(learner.net["heads"][:2], trained))


def test_logit_normalisation_matches_the_official_formula():
    logits = torch.tensor([[3.0, 4.0, 0.0, 1.0]])
    tasks = [range(0, 2), range(2, 4)]
    # per-task norms 5 and 1, their mean 3, temperature 0.1
    torch.testing.assert_close(normalise_logits(logits, tasks, 0.1), logits / 3 / 0.1, rtol=1e-6, atol=1e-6)


def test_end_to_end_checkpoint_holds_backbone_and_statistics(tmp_path):
    (result,) = run_experiment(slca_config(tmp_path))
    assert result["status"] == "complete" and len(result["accuracy_curve"]) == 4
    path = next((tmp_path / "logs").rglob(CHECKPOINT))
    checkpoint = load_state(path, CHECKPOINT_KIND)["learner"]
    assert any(key.startswith("backbone.model.blocks.") for key in checkpoint["net"])
    assert checkpoint["gaussians"]["covs"].shape == (10, 192, 192)


def test_resume_after_a_kill_matches_an_uninterrupted_run(tmp_path):
    assert_resume_matches_uninterrupted(lambda folder: slca_config(tmp_path / folder))


def test_late_milestones_warn_and_single_image_classes_are_clear_errors(tmp_path):
    with pytest.warns(UserWarning, match=r"milestones \[1\] are at or past the last epoch \(1 epochs\): the "
                                         r"learning rate does not decay there"):
        slca_config(tmp_path, milestones=[1])  # as PILOT runs it: MultiStepLR never reaches epoch 1
    with pytest.raises(PilotError, match=r"have fewer than 2 training images, and slca estimates each class's "
                                         r"covariance from them"):  # at load, before anything is written
        slca_run(tmp_path, train_per_class=1)


@pytest.mark.slow
@requires_assets
@pytest.mark.parametrize("learner", ["slca", "cofima"])
def test_real_deit_tiny_smoke(tmp_path, learner):
    """Real weights and images through training, statistics and alignment, and for CoFiMA the Fisher
    estimate and merge (P1 measures accuracy)."""
    config = build_config(real_raw(
        tmp_path, model_name=learner, train_per_class=3, test_per_class=2, max_tasks=2,
        epochs=2, milestones=[], batch_size=3,
    ))
    (result,) = run_experiment(config)
    # 10-way and 20-way chance are 10% and 5%. A head trained so (20 SGD steps, 30 images) on frozen
    # features reaches 35-55% over seeds; CA then fits all heads to the class Gaussians.
    assert result["accuracy_curve"][0] >= 25 and result["accuracy_curve"][1] >= 20
