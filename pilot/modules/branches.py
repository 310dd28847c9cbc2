"""A growing set of feature branches, one per task, and the heads over them: the network of DER and MEMO as
LAMDA-PILOT builds it (``utils/inc_net.py``: ``DERNet``, ``AdaptiveNet``).

Each task adds a branch started as a copy of the newest one (PILOT loads ``backbones[-2]``'s state into the new
one); the features of all branches, oldest first, are concatenated. The head over them is rebuilt each task one
branch wider and one task taller, the old head copied into its corner (``update_fc``); an auxiliary head on the
newest branch's features tells the task's new classes apart from one class standing for every old one.
"""
from __future__ import annotations

import copy
from typing import Optional

import torch
import torch.nn.functional as F
from torch import nn

from pilot.modules.heads import linear_head


class Branches(nn.Module):
    """Feature extractors added one per task, each ``feature_dim`` wide; ``forward`` concatenates their features."""

    def __init__(self, feature_dim: int) -> None:
        super().__init__()
        self.feature_dim = feature_dim
        self.members = nn.ModuleList()

    def __len__(self) -> int:
        return len(self.members)

    @property
    def out_dim(self) -> int:
        return self.feature_dim * len(self.members)

    def add(self, first: nn.Module) -> None:
        """A new branch, trainable: ``first`` when there is none yet, else a copy of the newest."""
        self.members.append((first if not len(self.members) else copy.deepcopy(self.members[-1])).requires_grad_(True))

    def grow_to(self, count: int, first: nn.Module) -> None:
        """Add branches up to ``count`` (before loading a checkpoint of that many)."""
        while len(self.members) < count:
            self.add(first)

    def set_old_trainable(self, trainable: bool) -> None:
        """Freeze (or unfreeze) every branch but the newest."""
        for member in self.members[:-1]:
            member.requires_grad_(trainable)

    def newest(self, features: torch.Tensor) -> torch.Tensor:
        """The newest branch's columns of concatenated ``features``."""
        return features[:, -self.feature_dim:]

    def forward(self, inputs: torch.Tensor) -> torch.Tensor:
        return torch.cat([member(inputs) for member in self.members], dim=1)


def train_if_trainable(module: nn.Module, training: bool) -> None:
    """Training mode for a module that trains, eval mode for a frozen one (PILOT's ``train()`` puts the frozen
    branches in eval mode: their dropout and drop-path, where a backbone has any, stay off)."""
    module.train(training and any(p.requires_grad for p in module.parameters()))


def widened_head(head: Optional[nn.Linear], in_features: int, out_features: int) -> nn.Linear:
    """PILOT's ``update_fc``: a new head over ``in_features`` (all branches) for ``out_features`` classes, drawn as
    its ``SimpleLinear`` (Kaiming uniform, zero bias), with ``head`` copied into the old classes' rows and the old
    branches' columns; the old classes' weights on the new branch and the new classes' rows stay as drawn."""
    wider = linear_head(in_features, out_features, init="kaiming")
    if head is not None:
        with torch.no_grad():
            wider.weight[: head.out_features, : head.in_features] = head.weight
            wider.bias[: head.out_features] = head.bias
    return wider


def auxiliary_targets(labels: torch.Tensor, num_old: int) -> torch.Tensor:
    """The auxiliary head's classes: 0 for every old class, 1.. for the task's new classes in order."""
    return (labels - num_old + 1).clamp(min=0)


def auxiliary_loss(aux_logits: torch.Tensor, labels: torch.Tensor, num_old: int) -> torch.Tensor:
    """Cross-entropy of the auxiliary head (new classes + one "old" class) on ``auxiliary_targets``."""
    return F.cross_entropy(aux_logits, auxiliary_targets(labels, num_old))
