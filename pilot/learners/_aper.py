"""APER (Zhou et al., IJCV 2024; "ADAM"): adapt the ViT on the first task, then classify every task
with cosine class-mean prototypes of the pretrained and the adapted features concatenated
(PILOT's ``MultiBranchCosineIncrementalNet``: pretrained branch first). The family's members differ
only in what adapts (``FirstTaskAdaptationLearner.adapt``): adapters, SSF, VPT prompts, or the whole ViT.
"""
from __future__ import annotations

import torch

from pilot.data.stream import Split, Task
from pilot.learners._first_task_adaptation import FirstTaskAdaptationLearner
from pilot.modules.heads import PrototypeClassifier


class APERLearner(FirstTaskAdaptationLearner):
    scenarios = ("class", "domain", "task")

    def __init__(self, config, ctx):
        super().__init__(config, ctx)
        self.classifier = PrototypeClassifier(2 * ctx.backbone.feature_dim)

    def combined_features(self, split: Split) -> torch.Tensor:
        return torch.cat([self.ctx.features(split), self.adapted_features(split)], dim=1)

    def update_classifier(self, task: Task) -> None:
        labels = torch.as_tensor(task.train.labels)
        self.classifier.add_classes(self.combined_features(task.train), labels, task.classes)

    def predict(self, split: Split) -> torch.Tensor:
        return self.classifier(self.combined_features(split))

    def state_dict(self):
        return {**super().state_dict(), "classifier": self.classifier.state_dict()}

    def load_state_dict(self, state):
        super().load_state_dict(state)
        self.classifier.load_state_dict(state["classifier"])
