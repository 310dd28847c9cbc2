"""Fine-tuning, the lower bound (PILOT's ``models/finetune.py``): the whole backbone and a growing linear
head trained task by task on the new data alone, old classes' logits masked from the loss; nothing
protects what earlier tasks learnt. The first task has its own schedule (PILOT's ``init_`` keys).
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Optional

import torch
from torch import nn

from pilot.config import LearnerConfig
from pilot.data.stream import Task
from pilot.learners import register_learner
from pilot.learners._gradient import GradientLearner, TrainConfig
from pilot.modules.heads import classify, task_heads


@dataclass
class FinetuneConfig(LearnerConfig):
    """PILOT's exps/finetune.json: SGD (momentum 0.9) with step decay, first task and later tasks apart."""

    init_epoch: int = 20
    init_lr: float = 1e-3
    init_milestones: list[int] = field(default_factory=lambda: [60, 120, 170])  # past 20 epochs: a constant rate
    init_lr_decay: float = 0.1
    init_weight_decay: float = 5e-4
    epochs: int = 20
    lrate: float = 1e-3
    milestones: list[int] = field(default_factory=lambda: [40, 70])
    lrate_decay: float = 0.1
    batch_size: int = 128
    weight_decay: float = 2e-4


@register_learner("finetune")
class Finetune(GradientLearner):
    scenarios = ("class", "domain", "task")
    config_class = FinetuneConfig

    def __init__(self, config: FinetuneConfig, ctx):
        super().__init__(config, ctx)
        self.net["backbone"] = ctx.backbone.requires_grad_(True)  # fine-tuned, so checkpointed with the heads
        self.net["heads"] = task_heads(ctx.backbone.feature_dim, ctx.protocol.task_sizes, init="kaiming")
        self.net.to(ctx.device)

    @classmethod
    def settings(cls, config: FinetuneConfig, first_task: bool) -> TrainConfig:
        """The ``init_`` keys or the later tasks' ones."""
        return TrainConfig(tuned_epoch=config.init_epoch if first_task else config.epochs,
                           init_lr=config.init_lr if first_task else config.lrate,
                           batch_size=config.batch_size, optimizer="sgd", scheduler="steplr",
                           weight_decay=config.init_weight_decay if first_task else config.weight_decay,
                           milestones=config.init_milestones if first_task else config.milestones,
                           lr_decay=config.init_lr_decay if first_task else config.lrate_decay)

    @classmethod
    def validate_config(cls, config: FinetuneConfig) -> None:
        cls.validate_settings(config)

    def seen_heads(self) -> nn.ModuleList:
        return self.net["heads"][: len(self.ctx.protocol.tasks_within(self.num_seen))]

    def trainable(self) -> list[nn.Parameter]:
        return list(self.ctx.backbone.parameters()) + list(self.seen_heads().parameters())

    def set_train_mode(self, training: bool) -> None:
        self.ctx.backbone.train(training)

    def train_outputs(self, images: torch.Tensor, labels: torch.Tensor, task: Task):
        return classify(self.seen_heads(), self.ctx.backbone(images)), 0.0

    def eval_logits(self, images: torch.Tensor, queries: Optional[torch.Tensor]) -> torch.Tensor:
        return classify(self.seen_heads(), self.ctx.backbone(images))
