"""FeCAM: Mahalanobis distances under shrunk, normalised class covariances (and the learner on the loop)."""
import numpy as np
import pytest
import torch

from pilot.configure import build_config
from pilot.engine import Run
from pilot.errors import PilotError
from pilot.modules.gaussians import MahalanobisClassifier, tukey

from conftest import assert_resume_matches_uninterrupted, tiny_raw


def numpy_fecam(train: np.ndarray, labels: np.ndarray, test: np.ndarray, gamma1: float, gamma2: float) -> np.ndarray:
    """The official ViT FeCAM (FeCAM_vit_cifar100.py) in NumPy: squared distances [test, classes]."""
    unit = lambda x: x / np.linalg.norm(x, axis=1, keepdims=True)  # noqa: E731
    train, test = unit(train), unit(test)
    distances = []
    for label in np.unique(labels):
        rows = train[labels == label]
        cov = np.cov(rows.T)
        off = cov - np.diag(np.diag(cov))
        cov = (cov + gamma1 * np.diag(cov).mean() * np.eye(len(cov))
               + gamma2 * off[off != 0].mean() * (np.ones_like(cov) - np.eye(len(cov))))
        sd = np.sqrt(np.diag(cov))
        precision = np.linalg.pinv(cov / np.outer(sd, sd))
        difference = test - rows.mean(0)
        distances.append(np.einsum("nd,de,ne->n", difference, precision, difference))
    return np.stack(distances, axis=1)


@pytest.fixture
def data():
    generator = torch.Generator().manual_seed(0)
    train = torch.randn(60, 8, generator=generator) + torch.arange(3).repeat_interleave(20)[:, None]
    labels = torch.arange(3).repeat_interleave(20)
    return train, labels, torch.randn(7, 8, generator=generator)


@pytest.mark.parametrize("gamma2", [0.0, 1.0])
def test_distance_equals_numpy_mahalanobis_with_the_same_shrinkage(data, gamma2):
    train, labels, test = data
    classifier = MahalanobisClassifier(8, gamma1=1.0, gamma2=gamma2)
    classifier.add_classes(train[:20], labels[:20], range(0, 1))  # classes arrive task by task
    classifier.add_classes(train[20:], labels[20:], range(1, 3))
    expected = numpy_fecam(train.double().numpy(), labels.numpy(), test.double().numpy(), 1.0, gamma2)
    np.testing.assert_allclose(-classifier(test).numpy(), expected, rtol=1e-4, atol=1e-4)


def test_pilot_covariance_is_corrcoef_of_the_ridged_raw_covariance(data):
    train, labels, test = data
    classifier = MahalanobisClassifier(8, pilot_covariance=True)
    classifier.add_classes(train, labels, range(3))
    unit = lambda x: x / np.linalg.norm(x, axis=-1, keepdims=True)  # noqa: E731
    raw = train.double().numpy()
    for label in range(3):
        rows = raw[labels.numpy() == label]
        precision = np.linalg.pinv(np.corrcoef(np.cov(rows.T) + 100 * np.eye(8)))
        difference = unit(test.double().numpy()) - unit(rows.mean(0))
        expected = np.einsum("nd,de,ne->n", difference, precision, difference)
        np.testing.assert_allclose(-classifier(test)[:, label].numpy(), expected, rtol=1e-3, atol=1e-4)


def test_tukey_transform_and_its_domain():
    features = torch.tensor([[0.25, 4.0], [1.0, 0.0]])
    torch.testing.assert_close(tukey(features, 0.5), torch.tensor([[0.5, 2.0], [1.0, 0.0]]))
    with pytest.raises(ValueError, match="non-negative"):
        tukey(-features, 0.5)
    classifier = MahalanobisClassifier(2, tukey_beta=0.5)
    classifier.add_classes(features.abs().repeat(3, 1) + torch.rand(6, 2), torch.tensor([0, 0, 0, 0, 0, 0]), range(1))
    assert torch.isfinite(classifier(features)).all()


def fecam_config(tmp_path, **overrides):
    return build_config(tiny_raw(tmp_path, **{"model_name": "fecam", "tuned_epoch": 1, "batch_size": 8, **overrides}))


def test_learner_classifies_adapted_features_by_distance(tmp_path):
    run = Run(fecam_config(tmp_path))
    result = run.execute()
    learner = run.learner
    assert result["last_accuracy"] > 50  # 10 classes: chance is 10%
    for task in run.stream.tasks:
        expected = learner.classifier(learner.adapted_features(task.test))
        torch.testing.assert_close(learner.predict(task.test), expected)
    assert learner.classifier.means.shape[0] == run.stream.num_classes


def test_tukey_on_signed_vit_features_is_a_config_error(tmp_path):
    with pytest.raises(PilotError, match="tukey"):
        Run(fecam_config(tmp_path, tukey=True, tuned_epoch=0)).execute()


def test_resume_after_a_kill_matches_an_uninterrupted_run(tmp_path):
    assert_resume_matches_uninterrupted(lambda folder: fecam_config(tmp_path / folder))
