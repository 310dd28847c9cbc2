"""DeiT-Tiny and CIFAR-100 from ../shared/assets: the path a user's downloads take."""
import pytest
import timm
import torch

from pilot.engine import Run, run_experiment

from conftest import DEIT_WEIGHTS, real_raw, requires_assets

pytestmark = [requires_assets, pytest.mark.slow]


@pytest.fixture
def real_config(tmp_path):
    from pilot.configure import build_config

    return build_config(real_raw(
        tmp_path, train_per_class=3, test_per_class=3, max_tasks=2,
    ))


def test_simplecil_on_real_weights_and_data(real_config):
    (result,) = run_experiment(real_config)
    assert result["class_order"][:3] == [68, 56, 78]
    assert result["timings"]["encoded_images"] == 20 * (3 + 3)
    # 10-way and 20-way chance are 10% and 5%; real DeiT-Tiny features do far better.
    assert result["accuracy_curve"][0] > 60 and result["accuracy_curve"][1] > 50


def test_backbone_matches_timm_loading_the_file(real_config):
    run = Run(real_config)
    reference = timm.create_model("deit_tiny_patch16_224", pretrained=True, num_classes=0,
                                  pretrained_cfg_overlay=dict(file=str(DEIT_WEIGHTS))).eval()
    images = torch.randn(2, 3, 224, 224)
    with torch.no_grad():
        torch.testing.assert_close(run.ctx.backbone.eval()(images), reference(images))
    assert run.ctx.backbone.data_config.mean == (0.485, 0.456, 0.406)


NEW_LEARNERS = {
    "ease": {"init_epochs": 1}, "mos": {"tuned_epoch": 1, "crct_epochs": 2}, "fecam": {"tuned_epoch": 1},
    "aper_ssf": {"tuned_epoch": 1}, "aper_vpt": {"tuned_epoch": 1}, "aper_finetune": {"tuned_epoch": 1},
    "finetune": {"init_epoch": 1, "epochs": 1}, "joint": {"init_epoch": 1, "epochs": 1},
}


@pytest.mark.parametrize("learner, settings", NEW_LEARNERS.items(), ids=list(NEW_LEARNERS))
def test_new_learners_on_real_weights_and_data(tmp_path, learner, settings):
    """Real weights and images through each method's training, statistics and prediction (P1 measures accuracy)."""
    from pilot.configure import build_config

    config = build_config(real_raw(tmp_path, model_name=learner, train_per_class=3, test_per_class=2, max_tasks=2,
                                   batch_size=6, **settings))
    (result,) = run_experiment(config)
    assert result["status"] == "complete" and len(result["accuracy_curve"]) == 2
    assert result["continual"] is (learner != "joint")
    if learner not in ("finetune", "joint"):  # 5 SGD steps at lr 1e-3 leave PILOT's fresh head near chance
        # 10-way and 20-way chance are 10% and 5%
        assert result["accuracy_curve"][0] > 30 and result["accuracy_curve"][1] > 25
