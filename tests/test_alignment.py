"""Classifier alignment: the routine SLCA and MOS share trains as each learner's own loop did."""
import pytest
import torch
from torch import nn

from pilot.learners._alignment import fit_on_gaussian_samples
from pilot.learners._gradient import fit_on_features
from pilot.modules.gaussians import ClassGaussians

SAMPLES = 8


def gaussians(centroids: int) -> ClassGaussians:
    """3 classes of 12 features in 6 dimensions: one Gaussian per class, or ``centroids`` per class (MOS)."""
    generator = torch.Generator().manual_seed(0)
    features, labels = torch.randn(36, 6, generator=generator), torch.arange(3).repeat_interleave(12)
    stored = ClassGaussians(6, diagonal=centroids > 1)
    if centroids > 1:
        stored.add_centroids(features, labels, range(3), centroids, torch.Generator().manual_seed(1))
    else:
        stored.add_classes(features, labels, range(3))
    return stored


def learners_loop(head, stored, scales, batches):
    """SLCA's and MOS's own alignment before it was shared (their batches(), written out)."""
    optimizer = torch.optim.SGD(head.parameters(), lr=0.1, momentum=0.9)
    scheduler = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=3)
    factors, generator = stored.cholesky_factors(torch.device("cpu")), torch.Generator().manual_seed(2)

    def epoch():
        features, labels = stored.sample(factors, SAMPLES, scales, generator)
        pairs = zip(features.split(SAMPLES), labels.split(SAMPLES))
        return pairs if batches is None else (pair for _, pair in zip(range(batches), pairs))

    fit_on_features(head, optimizer, 3, epoch, scheduler)


@pytest.mark.parametrize("centroids, shrink, batches", [(1, True, None), (2, False, 3)])  # SLCA's, MOS's switches
def test_alignment_reproduces_the_learners_own_loops(centroids, shrink, batches):
    stored = gaussians(centroids)
    assert stored.num_classes == 3 if centroids == 1 else stored.num_classes > batches  # MOS: some batches unused
    scales = torch.linspace(0.9, 1.0, stored.num_classes) if shrink else torch.ones(stored.num_classes)
    torch.manual_seed(0)
    expected = nn.Linear(6, 3)
    head = nn.Linear(6, 3)
    head.load_state_dict(expected.state_dict())
    initial = head.weight.detach().clone()
    learners_loop(expected, stored, scales, batches)
    optimizer = torch.optim.SGD(head.parameters(), lr=0.1, momentum=0.9)
    fit_on_gaussian_samples(head, optimizer, stored, torch.Generator().manual_seed(2), torch.device("cpu"), epochs=3,
                            samples=SAMPLES, batches=batches, mean_scales=scales if shrink else None)
    assert torch.equal(head.weight, expected.weight) and torch.equal(head.bias, expected.bias)
    assert not torch.equal(head.weight, initial)
