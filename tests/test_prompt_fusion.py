"""PromptFusion on a tiny random CLIP and ViT: the logit mix and the weighted loss by hand, resume, bad inputs,
and (slow, with the shared assets) DeiT-Tiny as the Booster."""
from __future__ import annotations

import json

import pytest
import torch

from conftest import ASSETS, TINY_VIT, clean_error, killed_then_resumed, real_raw, tiny_raw
from pilot.configure import build_config
from pilot.engine import run_experiment
from pilot.errors import PilotError
from pilot.learners.prompt_fusion import fuse_logits, weighted_nll
from test_clip import TINY_CLIP


@pytest.fixture(scope="module")
def clip_model(tmp_path_factory) -> str:
    path = tmp_path_factory.mktemp("clip") / "pilot-tiny-pf-clip.json"
    path.write_text(json.dumps(TINY_CLIP))
    return str(path)


def pf_raw(tmp_path, model, **overrides) -> dict:
    return tiny_raw(tmp_path, **{
        "model_name": "prompt_fusion", "backbone_type": [f"open_clip:{model}", "vit_tiny_patch16_224"],
        "backbone_args": TINY_VIT, "init_cls": 2, "increment": 2, "synthetic_per_class": 4, "memory_size": 20,
        "batch_size": 8, "tuned_epoch": 1, "M": 2, "vpt_prompt_length": 2, "clip_image_prompt_length": 2, **overrides})


def test_the_mix_is_lambda_vit_plus_one_minus_lambda_clip_by_hand():
    clip_logits = torch.tensor([[1.0, -2.0, 0.5]])
    vit_logits = torch.tensor([[3.0, 0.0, -1.0]])
    parameter = torch.tensor([0.3])
    lam = 1 / (1 + torch.exp(torch.tensor(-0.3)))
    torch.testing.assert_close(fuse_logits(clip_logits, vit_logits, parameter), lam * vit_logits + (1 - lam) * clip_logits)
    assert torch.isclose(lam, torch.tensor(0.574442516811659), atol=1e-7)


def test_the_loss_weights_each_log_probability_by_hand():
    logits, labels = torch.tensor([[1.0, 2.0, 0.0], [0.0, -1.0, 1.0]]), torch.tensor([1, 2])
    weight = torch.tensor([[0.5, 2.0, 1.0], [1.0, 1.0, 3.0]])
    log_p = logits - logits.exp().sum(1, keepdim=True).log()
    hand = -(log_p[0, 1] * 2.0 + log_p[1, 2] * 3.0) / 2
    torch.testing.assert_close(weighted_nll(logits, labels, weight), hand)
    torch.testing.assert_close(weighted_nll(logits, labels, None), -(log_p[0, 1] + log_p[1, 2]) / 2)


def test_resume_matches_an_uninterrupted_run(tmp_path, clip_model):
    """Killed after the first task: the second adds contexts and β, weights its loss and replays exemplars."""
    (uninterrupted,) = run_experiment(build_config(pf_raw(tmp_path / "full", clip_model, max_tasks=2)))
    resumed = killed_then_resumed(build_config(pf_raw(tmp_path / "killed", clip_model, max_tasks=2)), 1)
    assert resumed["counts"] == uninterrupted["counts"]
    assert resumed["accuracy_curve"] == uninterrupted["accuracy_curve"]
    assert uninterrupted["completed_tasks"] == 2 and uninterrupted["memory"][-1]["total"] == 16  # every image of the 4 classes (20 // 4 > 4)


@clean_error
@pytest.mark.parametrize("overrides, message", [
    ({"backbone_type": "vit_tiny_patch16_224"}, r"prompt_fusion runs on 2 backbones: set backbone_type to a list of "
                                                r"an open_clip CLIP \(the Stabilizer\), then a timm ViT"),
    ({"init_cls": 4}, r"every task must bring as many classes .* got task sizes \[4, 2, 2, 2\]"),
])
def test_bad_inputs_are_refused_before_anything_is_written(tmp_path, clip_model, overrides, message):
    with pytest.raises(PilotError, match=message):
        run_experiment(build_config(pf_raw(tmp_path, clip_model, **overrides)))
    assert not (tmp_path / "logs").exists()


@pytest.mark.slow
@pytest.mark.skipif(not (ASSETS / "deit_tiny_patch16_224.safetensors").exists(),
                    reason="the shared assets (DeiT-Tiny, CIFAR-100) are absent")
def test_deit_tiny_boosts_a_tiny_random_clip_on_cifar(tmp_path, tmp_path_factory):
    path = tmp_path_factory.mktemp("clip224") / "pilot-tiny-pf-clip224.json"
    path.write_text(json.dumps({**TINY_CLIP, "vision_cfg": {**TINY_CLIP["vision_cfg"], "image_size": 224, "patch_size": 32}}))
    raw = real_raw(tmp_path, model_name="prompt_fusion", backbone_type=[f"random:open_clip:{path}", "deit_tiny_patch16_224"],
                   init_cls=5, increment=5, max_tasks=2, train_per_class=1, test_per_class=1, memory_size=10,
                   batch_size=4, tuned_epoch=1, M=2, vpt_prompt_length=2, clip_image_prompt_length=2)
    (results,) = run_experiment(build_config(raw))
    assert results["completed_tasks"] == 2 and results["memory"][-1]["total"] == 10 and [b["type"] for b in results["backbones"]][1] == "deit_tiny_patch16_224"


def test_contexts_equal_to_the_placeholders_give_clips_own_text_features(clip_model):
    """With each context vector set to the "X" token's embedding, the prompt is the tokenised text itself: the
    Stabilizer's text features must equal CLIP's encode_text of "X X X X <name>."."""
    import open_clip

    from pilot.learners.prompt_fusion import Stabilizer

    open_clip.add_model_config(clip_model)
    torch.manual_seed(0)
    clip = open_clip.create_model("pilot-tiny-pf-clip").eval()
    tokenizer = open_clip.get_tokenizer("pilot-tiny-pf-clip")
    stabilizer = Stabilizer(clip, tokenizer, image_prompt_length=2, context_length=2)
    stabilizer.add_task(["apple", "sea_lion"])
    x_embedding = clip.token_embedding(tokenizer(["X"]))[0, 1]
    with torch.no_grad():
        stabilizer.contexts[0].copy_(x_embedding.expand(2, 2, -1))
        expected = clip.encode_text(tokenizer(["X X X X apple.", "X X X X sea lion."]))
        torch.testing.assert_close(stabilizer.text_features(), expected)
