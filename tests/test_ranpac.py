"""RanPAC on the shared loop (tiny random ViT, synthetic images; DeiT-Tiny when the assets exist)."""
from operator import attrgetter

import pytest
import torch

from pilot.configure import build_config
from pilot.engine import Run, run_experiment
from pilot.errors import PilotError
from pilot.learners import ranpac
from pilot.modules.ridge import select_lambda

from conftest import assert_resume_matches_uninterrupted, real_raw, requires_assets, tiny_raw


def ranpac_config(tmp_path, **overrides):
    return build_config(tiny_raw(tmp_path, **{"model_name": "ranpac", "M": 256, "tuned_epoch": 1,
                                              "batch_size": 8, **overrides}))


@torch.no_grad()
def encode(encoder, run, split):
    encoder.eval()
    return torch.cat([encoder(images) for images, _, _ in run.ctx.eval_loader(split)])


@pytest.fixture(scope="module", params=[0, 1], ids=["frozen", "adapted"])
def finished_run(request, tmp_path_factory):
    """A run through all 4 tasks, without and with first-task adaptation (1 epoch)."""
    # M below the 80 training images keeps G well conditioned, so float32 features compare tightly.
    run = Run(ranpac_config(tmp_path_factory.mktemp("run"), tuned_epoch=request.param, M=32))
    return run, run.execute()


def test_classifier_is_the_ridge_solution_over_all_tasks_seen(finished_run):
    run, _ = finished_run
    learner = run.learner

    def projected(split):
        return torch.relu(encode(learner.encoder, run, split) @ learner.projection.weight).double()

    train = [task.train for task in run.stream.tasks]
    h = torch.cat([projected(split) for split in train])
    labels = torch.cat([torch.as_tensor(split.labels) for split in train])
    targets = torch.nn.functional.one_hot(labels, run.stream.num_classes).double()
    lam = learner.lambdas[-1]
    readout = torch.linalg.solve(h.T @ h + lam * torch.eye(h.shape[1], dtype=torch.float64), h.T @ targets)
    for task in run.stream.tasks:
        expected = projected(task.test) @ readout
        torch.testing.assert_close(learner.predict(task.test).double(), expected, rtol=1e-4, atol=1e-4)


def test_end_to_end(finished_run):
    _, result = finished_run
    assert result["status"] == "complete" and len(result["accuracy_curve"]) == 4
    assert result["last_accuracy"] > 50  # 10 classes: chance is 10%


def test_each_image_is_encoded_once(finished_run):
    run, result = finished_run
    images = sum(len(task.train) + len(task.test) for task in run.stream.tasks)
    # Adapted: only the adapted store encodes (the frozen one is never asked); else only the frozen one.
    assert result["timings"]["encoded_images"] == images
    assert run.ctx.features.encoded_images == (0 if run.learner.has_adaptation else images)


def test_lambda_is_selected_on_the_current_tasks_split(tmp_path, monkeypatch):
    calls = []

    def recording_select_lambda(h_fit, y_fit, h_val, y_val):
        calls.append((h_fit, y_fit, h_val, y_val, select_lambda(h_fit, y_fit, h_val, y_val)))
        return calls[-1][-1]

    monkeypatch.setattr(ranpac, "select_lambda", recording_select_lambda)
    run = Run(ranpac_config(tmp_path, tuned_epoch=0))
    run.execute()
    learner = run.learner
    assert [call[-1] for call in calls] == learner.lambdas and len(calls) == len(run.stream.tasks)
    for task, (h_fit, y_fit, h_val, y_val, _) in zip(run.stream.tasks, calls):
        assert (len(h_fit), len(h_val)) == (int(0.8 * len(task.train)), len(task.train) - int(0.8 * len(task.train)))
        assert set(torch.cat([y_fit, y_val]).tolist()) == set(task.classes)
        # the split is a shuffle of this task's projected features, not of the accumulated ones
        task_features = learner.project(learner.adapted_features(task.train))
        torch.testing.assert_close(torch.cat([h_fit, h_val]).sum(0), task_features.sum(0))
    torch.testing.assert_close(learner.readout, learner.ridge.solve(learner.lambdas[-1]))


def test_adapts_on_the_first_task_only_and_keeps_the_vit_frozen(tmp_path):
    run = Run(ranpac_config(tmp_path))
    learner, tasks = run.learner, run.stream.tasks
    vit_before = {k: v.clone() for k, v in run.ctx.backbone.state_dict().items()}
    learner.fit(tasks[0])
    adapted = {k: v.clone() for k, v in learner.net["adaptation"].state_dict().items()}
    assert any(v.abs().sum() > 0 for k, v in adapted.items() if ".up." in k), "adapters did not train"
    assert list(learner.net) == ["adaptation"], "the temporary head must not outlive the first task"
    learner.fit(tasks[1])
    assert all(torch.equal(v, learner.net["adaptation"].state_dict()[k]) for k, v in adapted.items())
    assert all(torch.equal(v, run.ctx.backbone.state_dict()[k]) for k, v in vit_before.items())
    assert not any(p.requires_grad for p in run.ctx.backbone.parameters())
    assert not any(p.requires_grad for p in learner.net.parameters())


@pytest.mark.parametrize("overrides, classifier_name", [({"use_RP": False}, "prototypes.prototypes"),
                                                            ({"M": 0}, "readout")])
def test_official_variants_without_projection(tmp_path, overrides, classifier_name):
    """use_RP false: cosine prototypes of the adapted features; M 0: ridge on the features themselves."""
    run = Run(ranpac_config(tmp_path, **overrides))
    assert run.execute()["status"] == "complete"
    classifier = attrgetter(classifier_name)(run.learner)
    assert run.ctx.backbone.feature_dim in classifier.shape and run.stream.num_classes in classifier.shape


def test_negative_projection_width_is_refused(tmp_path):
    with pytest.raises(PilotError, match="M \\(random projection width\\)"):
        ranpac_config(tmp_path, M=-1)


def test_resume_after_a_kill_matches_an_uninterrupted_run(tmp_path):
    assert_resume_matches_uninterrupted(lambda folder: ranpac_config(tmp_path / folder))


@pytest.mark.slow
@requires_assets
def test_on_real_weights_and_data(tmp_path):
    config = build_config(real_raw(
        tmp_path, model_name="ranpac", train_per_class=2, test_per_class=2, max_tasks=2,
        tuned_epoch=1, M=2000))
    (result,) = run_experiment(config)
    assert result["timings"]["encoded_images"] == 20 * (2 + 2)
    # 10-way and 20-way chance are 10% and 5%
    assert result["accuracy_curve"][0] > 35 and result["accuracy_curve"][1] > 30
