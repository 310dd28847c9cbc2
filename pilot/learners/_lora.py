"""The kit for LoRA learners (InfLoRA, SD-LoRA): LoRA pairs on the frozen ViT's attention (``net["lora"]``,
``pilot.modules.lora``) and one linear head per task (``net["heads"]``), every head's logits concatenated."""
from __future__ import annotations

from typing import Optional

import torch

from pilot.data.stream import Task
from pilot.learners._gradient import GradientLearner
from pilot.modules.heads import classify


class LoRALearner(GradientLearner):
    def logits(self, images: torch.Tensor) -> torch.Tensor:
        return classify(self.net["heads"], self.ctx.backbone(images))

    def train_outputs(self, images: torch.Tensor, labels: torch.Tensor, task: Task):
        logits = self.logits(images)
        return logits, torch.zeros((), device=logits.device)

    def eval_logits(self, images: torch.Tensor, queries: Optional[torch.Tensor]) -> torch.Tensor:
        return self.logits(images)
