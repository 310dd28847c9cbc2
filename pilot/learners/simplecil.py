"""SimpleCIL (Zhou et al., 2023): class-mean prototypes of frozen features, cosine classifier."""
from __future__ import annotations

import torch
import torch.nn.functional as F

from pilot.data.stream import Split, Task
from pilot.learners import register_learner
from pilot.learners.base import Learner


def class_means(features: torch.Tensor, labels: torch.Tensor, classes: range) -> torch.Tensor:
    return torch.stack([features[labels == c].mean(0) for c in classes])


def cosine_logits(features: torch.Tensor, prototypes: torch.Tensor) -> torch.Tensor:
    return F.normalize(features, dim=1) @ F.normalize(prototypes, dim=1).T


@register_learner("simplecil")
class SimpleCIL(Learner):
    def __init__(self, config, ctx):
        super().__init__(config, ctx)
        self.prototypes = torch.zeros(0, ctx.backbone.feature_dim)

    def fit(self, task: Task) -> None:
        features = self.ctx.features(task.train)
        labels = torch.as_tensor(task.train.labels)
        self.prototypes = torch.cat([self.prototypes, class_means(features, labels, task.classes)])

    def predict(self, split: Split) -> torch.Tensor:
        return cosine_logits(self.ctx.features(split), self.prototypes)

    def state_dict(self):
        return {"prototypes": self.prototypes}

    def load_state_dict(self, state):
        self.prototypes = state["prototypes"]
