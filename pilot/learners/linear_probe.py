"""A linear probe on frozen features: the smallest learner that trains (used in tests).

Each task trains the new classes' rows of a linear head on that task's features, with the logits
of earlier classes masked out (as prompt methods do); there is no replay, so it forgets.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from pilot.config import LearnerConfig
from pilot.data.stream import Split, Task
from pilot.errors import PilotError
from pilot.learners import register_learner
from pilot.learners._base import Learner
from pilot.learners._gradient import fit_on_features
from pilot.modules.heads import linear_head


@dataclass
class LinearProbeConfig(LearnerConfig):
    tuned_epoch: int = 10
    init_lr: float = 0.001875
    batch_size: int = 16


@register_learner("linear_probe")
class LinearProbe(Learner):
    config_class = LinearProbeConfig

    def __init__(self, config: LinearProbeConfig, ctx):
        super().__init__(config, ctx)
        self.weight = torch.zeros(0, ctx.backbone.feature_dim)
        self.bias = torch.zeros(0)

    @classmethod
    def validate_config(cls, config: LinearProbeConfig) -> None:
        if config.tuned_epoch < 1 or config.batch_size < 1 or config.init_lr <= 0:
            raise PilotError("linear_probe needs tuned_epoch >= 1, batch_size >= 1 and init_lr > 0.")

    @classmethod
    def frozen_features(cls, config) -> bool:
        return True

    def fit(self, task: Task) -> None:
        features = self.ctx.features(task.train)
        labels = torch.as_tensor(task.train.labels) - task.num_old
        head = linear_head(features.shape[1], len(task.classes), "torch")
        optimizer = torch.optim.Adam(head.parameters(), lr=self.config.init_lr)

        def batches():
            order = torch.randperm(len(labels), generator=self.ctx.generator)
            return ((features[batch], labels[batch]) for batch in order.split(self.config.batch_size))

        fit_on_features(head, optimizer, self.config.tuned_epoch, batches, where=f"{self.name}: task {task.index + 1}")
        self.weight = torch.cat([self.weight, head.weight.detach()])
        self.bias = torch.cat([self.bias, head.bias.detach()])

    def predict(self, split: Split) -> torch.Tensor:
        return self.ctx.features(split) @ self.weight.T + self.bias

    def state_dict(self):
        return {"weight": self.weight, "bias": self.bias}

    def load_state_dict(self, state):
        self.weight, self.bias = state["weight"], state["bias"]
