"""Classifier heads shared by learners: a cosine head, per-task linear heads, class-mean prototypes."""
from __future__ import annotations

import math
from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import nn


def cosine_logits(features: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
    """cos(feature, row) for every pair: [N, D] x [C, D] -> [N, C]."""
    return F.normalize(features, dim=1) @ F.normalize(weights, dim=1).T


class CosineHead(nn.Module):
    """``sigma * cos(features, w_c)`` with a learnable ``sigma`` (PILOT's ``CosineLinear`` and init)."""

    def __init__(self, in_dim: int, num_classes: int) -> None:
        super().__init__()
        bound = 1 / math.sqrt(in_dim)
        self.weight = nn.Parameter(torch.empty(num_classes, in_dim).uniform_(-bound, bound))
        self.sigma = nn.Parameter(torch.ones(1))

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        return self.sigma * cosine_logits(features, self.weight)


class PrototypeClassifier:
    """Class-mean prototypes of features, cosine logits (SimpleCIL; APER; RanPAC without projection).

    Classes are added task by task, in label order; the prototypes are the whole state.
    """

    def __init__(self, feature_dim: int) -> None:
        self.prototypes = torch.zeros(0, feature_dim)

    def add_classes(self, features: torch.Tensor, labels: torch.Tensor, classes: range) -> None:
        means = torch.stack([features[labels == c].mean(0) for c in classes])
        self.prototypes = torch.cat([self.prototypes, means])

    def __call__(self, features: torch.Tensor) -> torch.Tensor:
        return cosine_logits(features, self.prototypes)

    def state_dict(self) -> dict[str, torch.Tensor]:
        return {"prototypes": self.prototypes}

    def load_state_dict(self, state: dict[str, torch.Tensor]) -> None:
        self.prototypes = state["prototypes"]


def task_heads(feature_dim: int, task_sizes: Sequence[int]) -> nn.ModuleList:
    """One linear head per task, initialised as SLCA's SimpleContinualLinear (truncated normal std 0.02, zero bias)."""
    heads = nn.ModuleList(nn.Linear(feature_dim, size) for size in task_sizes)
    for head in heads:
        nn.init.trunc_normal_(head.weight, std=0.02)
        nn.init.zeros_(head.bias)
    return heads


def classify(heads: nn.ModuleList, features: torch.Tensor) -> torch.Tensor:
    """Logits over the classes of ``heads``' tasks, in class order."""
    return torch.cat([head(features) for head in heads], dim=1)


def normalise_logits(logits: torch.Tensor, task_classes: Sequence[range], temperature: float) -> torch.Tensor:
    """SLCA's logit normalisation: logits / (mean over tasks of each task's logit L2 norm) / temperature."""
    norms = torch.stack([logits[:, classes.start:classes.stop].norm(dim=1) + 1e-7 for classes in task_classes], dim=1)
    return logits / norms.mean(dim=1, keepdim=True) / temperature
