"""What L2P, DualPrompt and CODA-Prompt share: a frozen timm ViT with prompts attached, a query
from the same frozen ViT without prompts, and a linear head over all classes of the stream."""
from __future__ import annotations

from collections.abc import Sequence
from typing import Optional

import torch
from torch import nn

from pilot.data.stream import Split, Task
from pilot.errors import PilotError
from pilot.learners._gradient import GradientLearner
from pilot.modules.prompting import PromptedViT


def check_blocks(vit: nn.Module, key: str, blocks: Sequence[int]) -> None:
    """Config check: every block index named by ``key`` exists in ``vit``."""
    depth = len(vit.blocks)
    if any(not 0 <= b < depth for b in blocks):
        raise PilotError(f"{key} {list(blocks)} names blocks outside the backbone's 0..{depth - 1}.")


class PromptLearner(GradientLearner):
    """Subclasses add their prompt modules to ``self.net`` and define ``prompted_outputs``."""

    def __init__(self, config, ctx):
        super().__init__(config, ctx)
        self.vit = self.require_vit()
        self.prompts = PromptedViT(self.vit)
        self.vit.requires_grad_(False)  # one copy of the weights, frozen: it also computes the query
        self.net["head"] = nn.Linear(ctx.backbone.feature_dim, ctx.protocol.num_classes)

    def attach(self) -> None:
        """Move the method's modules next to the backbone once they are all in ``self.net``."""
        self.net.to(self.ctx.device)

    def trainable(self) -> list[nn.Parameter]:
        return list(self.net.parameters())

    @torch.no_grad()
    def query(self, images: torch.Tensor) -> torch.Tensor:
        """[CLS] feature of the frozen, un-prompted ViT (pre-logits), as the official code uses."""
        return self.ctx.backbone(images)

    def eval_queries(self, split: Split) -> torch.Tensor:
        """Test queries are frozen features of fixed images: computed once per run, then reused."""
        return self.ctx.features(split)

    def train_outputs(self, images: torch.Tensor, labels: torch.Tensor, task: Task):
        return self.prompted_outputs(images, self.query(images), task)

    def eval_logits(self, images: torch.Tensor, queries: Optional[torch.Tensor]) -> torch.Tensor:
        return self.prompted_outputs(images, queries, None)[0]

    def prompted_outputs(self, images: torch.Tensor, query: torch.Tensor, task: Optional[Task]):
        """(logits over all classes, extra loss); ``task`` is the task being trained, None at test time."""
        raise NotImplementedError

    def cls_logits(self, features: torch.Tensor) -> torch.Tensor:
        """Head on the [CLS] output after the final norm (DualPrompt, CODA-Prompt)."""
        return self.net["head"](self.vit.forward_head(features, pre_logits=True))
