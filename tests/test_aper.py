"""APER with adapters on the shared loop (tiny random ViT, synthetic images; DeiT-Tiny when the assets exist)."""
import pytest
import torch

from pilot.configure import build_config
from pilot.engine import Run, run_experiment
from pilot.modules.heads import cosine_logits

from conftest import killed_then_resumed, real_raw, requires_assets, tiny_raw


def aper_config(tmp_path, **overrides):
    return build_config(tiny_raw(tmp_path, **{"model_name": "aper_adapter", "tuned_epoch": 1, "batch_size": 8,
                                              **overrides}))


@pytest.fixture(scope="module")
def finished_run(tmp_path_factory):
    """A run through all 4 tasks with first-task adaptation (1 epoch)."""
    run = Run(aper_config(tmp_path_factory.mktemp("run")))
    return run, run.execute()


@torch.no_grad()
def encode(encoder, run, split):
    encoder.eval()
    return torch.cat([encoder(images) for images, _, _ in run.ctx.eval_loader(split)])


def test_prototypes_are_class_means_of_pretrained_and_adapted_features(finished_run, tmp_path):
    run, _ = finished_run
    learner = run.learner
    # The pretrained branch is the stock ViT: the features SimpleCIL sees with the same weights.
    stock = Run(build_config(tiny_raw(tmp_path)))

    def combined(split):
        return torch.cat([encode(stock.ctx.backbone, stock, split), encode(learner.encoder, run, split)], dim=1)

    train = [task.train for task in run.stream.tasks]
    features = torch.cat([combined(split) for split in train])
    labels = torch.cat([torch.as_tensor(split.labels) for split in train])
    means = torch.stack([features[labels == c].mean(0) for c in range(run.stream.num_classes)])
    torch.testing.assert_close(learner.classifier.prototypes, means, rtol=1e-4, atol=1e-5)
    for task in run.stream.tasks:
        torch.testing.assert_close(learner.predict(task.test), cosine_logits(combined(task.test), means),
                                   rtol=1e-4, atol=1e-5)
    adapted_part = learner.classifier.prototypes[:, run.ctx.backbone.feature_dim:]
    assert not torch.allclose(adapted_part, means[:, :run.ctx.backbone.feature_dim]), "adapters had no effect"


def test_end_to_end_adapts_once_and_keeps_the_vit_frozen(finished_run):
    run, result = finished_run
    assert result["status"] == "complete" and len(result["accuracy_curve"]) == 4
    assert result["last_accuracy"] > 50  # 10 classes: chance is 10%
    assert list(run.learner.net) == ["adaptation"]
    assert not any(p.requires_grad for p in run.ctx.backbone.parameters())
    assert not any(p.requires_grad for p in run.learner.net.parameters())


def test_each_image_is_encoded_once_per_branch(finished_run):
    run, result = finished_run
    images = sum(len(task.train) + len(task.test) for task in run.stream.tasks)
    assert run.ctx.features.encoded_images == images
    assert result["timings"]["encoded_images"] == 2 * images


def test_without_adaptation_one_store_serves_both_branches(tmp_path):
    run = Run(aper_config(tmp_path, tuned_epoch=0))
    result = run.execute()
    assert result["timings"]["encoded_images"] == sum(len(t.train) + len(t.test) for t in run.stream.tasks)


def test_resume_after_a_kill_matches_an_uninterrupted_run(finished_run, tmp_path):
    _, uninterrupted = finished_run
    config = aper_config(tmp_path)
    resumed = killed_then_resumed(config)
    assert resumed["counts"] == uninterrupted["counts"]
    assert resumed["accuracy_curve"] == uninterrupted["accuracy_curve"]


@pytest.mark.slow
@requires_assets
def test_on_real_weights_and_data(tmp_path):
    config = build_config(real_raw(
        tmp_path, model_name="aper_adapter", train_per_class=2, test_per_class=2, max_tasks=2, tuned_epoch=1))
    (result,) = run_experiment(config)
    assert result["timings"]["encoded_images"] == 2 * 20 * (2 + 2)
    # 10-way and 20-way chance are 10% and 5%
    assert result["accuracy_curve"][0] > 35 and result["accuracy_curve"][1] > 30


APER_VARIANTS = {
    "ssf": {"model_name": "aper_ssf"},
    "vpt_deep": {"model_name": "aper_vpt", "vpt_type": "deep"},
    "vpt_shallow": {"model_name": "aper_vpt", "vpt_type": "shallow", "prompt_token_num": 2},
    "finetune": {"model_name": "aper_finetune", "batch_size": 8},
}


@pytest.mark.parametrize("variant", list(APER_VARIANTS))
def test_aper_variants_train_only_their_own_parameters(tmp_path, variant):
    run = Run(aper_config(tmp_path, **APER_VARIANTS[variant]))
    learner = run.learner
    vit_before = {k: v.clone() for k, v in run.ctx.backbone.state_dict().items()}
    own_before = {k: v.clone() for k, v in learner.net["adaptation"].state_dict().items()}
    learner.fit(run.stream.tasks[0])
    assert all(torch.equal(v, run.ctx.backbone.state_dict()[k]) for k, v in vit_before.items()), \
        "the pretrained ViT must stay as loaded"
    own_after = learner.net["adaptation"].state_dict()
    moved = [k for k, v in own_before.items() if not torch.equal(v, own_after[k])]
    if variant == "finetune":  # the adapted branch is a whole trained copy of the ViT
        assert set(own_after) == set(vit_before) and len(moved) == len(own_after)
    else:  # only the adaptation's own tensors exist in it, and they trained
        assert not set(own_after) & set(vit_before) and moved
    assert list(learner.net) == ["adaptation"] and not any(p.requires_grad for p in learner.net.parameters())
    # the pretrained branch is the stock ViT, the adapted branch differs from it
    split = run.stream.tasks[0].test
    assert not torch.allclose(learner.adapted_features(split), run.ctx.features(split))


@pytest.mark.slow
@pytest.mark.parametrize("variant", ["ssf", "vpt_deep", "finetune"])
def test_aper_variants_resume_after_a_kill(tmp_path, variant):
    from conftest import assert_resume_matches_uninterrupted

    uninterrupted, _ = assert_resume_matches_uninterrupted(
        lambda folder: aper_config(tmp_path / folder, **APER_VARIANTS[variant]))
    assert uninterrupted["last_accuracy"] > 50  # 10 classes: chance is 10%
