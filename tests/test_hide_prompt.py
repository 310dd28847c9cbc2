"""HiDe-Prompt: task inference from frozen features, task prompts with momentum, the contrastive regulariser,
a frozen backbone, resume (tiny random ViT)."""
import math

import pytest
import torch

from pilot.configure import build_config
from pilot.engine import Run
from pilot.errors import PilotError
from pilot.modules.task_prompts import TaskPrompts, prototype_contrast

from conftest import killed_then_resumed, run_recording_each_task, tiny_raw


def hide_config(tmp_path, **overrides):
    settings = {"model_name": "hide_prompt", "tuned_epoch": 1, "tii_epochs": 1, "crct_epochs": 1, "batch_size": 8,
                "milestones": [], "max_tasks": 2, "train_per_class": 3, "test_per_class": 2, "n_centroids": 2,
                "e_prompt_layer_idx": [0], **overrides}
    return build_config(tiny_raw(tmp_path, **settings))


@pytest.fixture(scope="module")
def trained_run(tmp_path_factory):
    """Two tasks (classes 0-3, then 4-5), with the backbone's weights before training and the result."""
    run = Run(hide_config(tmp_path_factory.mktemp("hide_prompt")))
    before, _, result = run_recording_each_task(run)
    return run, before, result


def test_task_inference_picks_the_task_of_a_hand_set_feature(trained_run):
    run, _, _ = trained_run
    learner = run.learner
    mlp, head = learner.net["task_identity"]
    dim = head.weight.shape[1]
    with torch.no_grad():
        mlp.layers[-1].weight.zero_()
        mlp.layers[-1].bias.zero_()  # the MLP adds 0: LayerNorm(x), whose largest entry stays x's
        head.weight.copy_(torch.eye(head.weight.shape[0], dim))
        head.bias.zero_()
    learner.num_seen = 6  # tasks: classes 0-3 -> 0, 4-5 -> 1
    features = torch.zeros(3, dim)
    features[0, 5] = 4.0  # class 5: task 1
    features[1, 2] = 4.0  # class 2: task 0
    features[2, 8], features[2, 4] = 9.0, 4.0  # class 8 is not seen yet: the best seen class, 4, gives task 1
    assert learner.infer_tasks(features).tolist() == [1, 0, 1]
    # the inferred task's prompt is the one the image is tested with
    images = torch.randn(3, 3, 32, 32)
    with torch.no_grad():
        expected = learner.net["head"](learner.prompted_features(images, learner.net["prompts"].prompts[[1, 0, 1]]))
        torch.testing.assert_close(learner.eval_logits(images, features), expected)


def test_the_contrastive_regulariser_equals_the_formula_written_out():
    prototypes = torch.tensor([[1.0, 0.0]])
    features = torch.tensor([[0.5, 1.0], [-1.0, 2.0]])
    rows = [[1.0, 0.0], [0.5, 1.0], [-1.0, 2.0]]
    loss = 0.0
    for i, row in enumerate(rows):  # row i's similarities / 0.8, classified as row i
        logits = [sum(a * b for a, b in zip(row, other)) / 0.8 for other in rows]
        loss -= logits[i] - math.log(sum(math.exp(v) for v in logits))
    torch.testing.assert_close(prototype_contrast(features, prototypes, 0.8), torch.tensor(loss / 3))


def test_the_learner_adds_reg_times_the_contrast_with_the_old_class_means(trained_run):
    run, _, _ = trained_run
    learner, task = run.learner, run.stream.tasks[1]
    means = learner.prompted_statistics.means[learner.prompted_statistics.owners < 4]  # task 1's, as task 2 trains
    learner.prompted_statistics.means = means
    images = torch.randn(4, 3, 32, 32)
    with torch.no_grad():
        _, extra = learner.train_outputs(images, torch.tensor([4, 5, 4, 5]), task)
        prompt = learner.net["prompts"].with_momentum(1, 0.01)
        features = learner.prompted_features(images, prompt.expand(4, *prompt.shape))
    torch.testing.assert_close(extra, 0.1 * prototype_contrast(features, means, 0.8))


def test_a_task_prompt_starts_from_the_previous_and_settles_with_momentum():
    prompts = TaskPrompts(num_tasks=3, length=1, embed_dim=2, num_layers=1)
    with torch.no_grad():
        prompts.prompts[0] = 1.0
        prompts.prompts[1] = 3.0
    prompts.start_from_previous(2)
    assert torch.equal(prompts.prompts[2], prompts.prompts[1])
    prompts.settle(2, 0.01)  # 0.99 * 3 + 0.01 * mean(1, 3)
    torch.testing.assert_close(prompts.prompts[2], torch.full((1, 2, 1, 2), 0.99 * 3 + 0.01 * 2))


def test_backbone_stays_bit_identical_and_task_identification_is_reported(trained_run):
    run, before, result = trained_run
    after = run.ctx.backbone.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before), "frozen ViT weights changed"
    assert len(result["accuracy_curve"]) == 2
    assert 0 <= run.learner.evaluation_report()["task_identification_accuracy"] <= 100


def test_resume_matches_an_uninterrupted_run(trained_run, tmp_path):
    _, _, uninterrupted = trained_run
    resumed = killed_then_resumed(hide_config(tmp_path), kill_before_task=1)
    assert resumed["counts"] == uninterrupted["counts"]
    assert resumed["accuracy_curve"] == uninterrupted["accuracy_curve"]


def test_an_unknown_statistics_storage_is_refused(tmp_path):
    with pytest.raises(PilotError, match="ca_storage_efficient_method must be one of"):
        hide_config(tmp_path, ca_storage_efficient_method="kmeans")
