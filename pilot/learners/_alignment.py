"""Classifier alignment, as SLCA and MOS do it: after a task, re-train the classifier on features drawn
from the stored class Gaussians, so old and new classes meet in one balanced loss without old data."""
from __future__ import annotations

from collections.abc import Callable
from itertools import islice
from typing import Optional

import torch

from pilot.learners._gradient import fit_on_features
from pilot.modules.gaussians import ClassGaussians


def fit_on_gaussian_samples(logits: Callable[[torch.Tensor], torch.Tensor], optimizer: torch.optim.Optimizer,
                            gaussians: ClassGaussians, generator: torch.Generator, device: torch.device, *,
                            epochs: int, samples: int, batches: Optional[int] = None,
                            mean_scales: Optional[torch.Tensor] = None, schedule_epochs: Optional[int] = None,
                            where: str = "classifier alignment") -> None:
    """Classifier alignment: cross-entropy training of ``logits`` (the classifier) for ``epochs``, the learning
    rate annealed by a cosine over them (over ``schedule_epochs`` where given: torch's cosine then rises again, as
    TUNA's T_max of 5 for 30 epochs does). Each epoch draws ``samples`` features from every Gaussian (its mean
    times ``mean_scales``, default 1; noise and shuffle from ``generator``) and trains on them in batches of
    ``samples``: all of them (SLCA), or the first ``batches`` (MOS: one per seen class, whatever the Gaussians
    per class).

    The switches are where SLCA's and MOS's official codes differ; the caller's optimiser and ``logits`` hold
    the rest (which parameters, rates, logit normalisation).
    """
    scheduler = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=schedule_epochs or epochs)
    cholesky_factors = gaussians.cholesky_factors(device)
    scales = torch.ones(gaussians.num_classes) if mean_scales is None else mean_scales

    def epoch_batches():
        features, labels = gaussians.sample(cholesky_factors, samples, scales, generator)
        return islice(zip(features.split(samples), labels.to(device).split(samples)), batches)

    fit_on_features(logits, optimizer, epochs, epoch_batches, scheduler, where)
