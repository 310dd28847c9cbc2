"""SimpleCIL (Zhou et al., 2023): class-mean prototypes of frozen features, cosine classifier."""
from __future__ import annotations

import torch

from pilot.data.stream import Split, Task
from pilot.learners import register_learner
from pilot.learners._base import Learner
from pilot.modules.heads import PrototypeClassifier


@register_learner("simplecil")
class SimpleCIL(Learner):
    scenarios = ("class", "domain", "task")

    def __init__(self, config, ctx):
        super().__init__(config, ctx)
        self.classifier = PrototypeClassifier(ctx.backbone.feature_dim)

    @classmethod
    def frozen_features(cls, config) -> bool:
        return True

    def fit(self, task: Task) -> None:
        self.classifier.add_classes(self.ctx.features(task.train), torch.as_tensor(task.train.labels), task.classes)

    def predict(self, split: Split) -> torch.Tensor:
        return self.classifier(self.ctx.features(split))

    def state_dict(self):
        return self.classifier.state_dict()

    def load_state_dict(self, state):
        self.classifier.load_state_dict(state)
