"""The kit for LoRA learners (InfLoRA, SD-LoRA): LoRA pairs on the frozen ViT's attention (``net["lora"]``,
``pilot.modules.lora``) and one linear head per task (``net["heads"]``), every head's logits concatenated."""
from __future__ import annotations

from typing import Optional

import torch

from pilot.data.stream import Task
from pilot.learners._gradient import GradientLearner
from pilot.modules.heads import classify, task_heads
from pilot.modules.lora import attach_lora


class LoRALearner(GradientLearner):
    """Subclasses name the qkv slices their pairs adapt (``lora_slices``) and their heads' init (``head_init``)."""

    lora_slices: tuple[str, ...] = ("q", "v")
    head_init: str = "torch"

    def __init__(self, config, ctx):
        super().__init__(config, ctx)
        self.vit = self.require_vit()
        self.vit.requires_grad_(False)
        self.net["lora"] = attach_lora(self.vit, self.lora_slices)
        self.net["heads"] = task_heads(ctx.backbone.feature_dim, ctx.protocol.task_sizes, self.head_init)
        self.net["heads"].requires_grad_(False)  # each trains in its own task only
        self.net.to(ctx.device)
        self.task_index = 0

    def logits(self, images: torch.Tensor) -> torch.Tensor:
        return classify(self.net["heads"], self.ctx.backbone(images))

    def train_outputs(self, images: torch.Tensor, labels: torch.Tensor, task: Task):
        logits = self.logits(images)
        return logits, torch.zeros((), device=logits.device)

    def eval_logits(self, images: torch.Tensor, queries: Optional[torch.Tensor]) -> torch.Tensor:
        return self.logits(images)
