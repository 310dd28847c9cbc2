"""What L2P, DualPrompt and CODA-Prompt share: a frozen timm ViT with prompts attached, a query
from the same frozen ViT without prompts, and a linear head over all classes of the stream; and
what L2P and DualPrompt share: prompts chosen from a pool, per image or by PILOT's batch-wise vote."""
from __future__ import annotations

import warnings
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, Optional

import numpy as np
import torch
from torch import nn

from pilot.data.stream import Split, Task
from pilot.errors import PilotError
from pilot.learners._gradient import GradientLearner, TrainConfig
from pilot.modules.heads import linear_head
from pilot.modules.prompting import PoolSelection, PromptedViT, PromptPool


def check_blocks(vit: nn.Module, key: str, blocks: Sequence[int]) -> None:
    """Config check: every block index named by ``key`` exists in ``vit``."""
    depth = len(vit.blocks)
    if any(not 0 <= b < depth for b in blocks):
        raise PilotError(f"{key} {list(blocks)} names blocks outside the backbone's 0..{depth - 1}.")


class PromptLearner(GradientLearner):
    """Subclasses add their prompt modules to ``self.net`` and define ``prompted_outputs``."""
    scenarios = ("class", "domain", "task")

    # The head starts as timm's ViT head ("trunc_normal"), as in the official L2P and DualPrompt code and
    # PILOT; CODA-Prompt's keeps PyTorch's Linear init ("torch").
    head_init = "trunc_normal"

    def __init__(self, config, ctx):
        super().__init__(config, ctx)
        self.vit = self.require_vit()
        self.prompts = PromptedViT(self.vit)
        self.vit.requires_grad_(False)  # one copy of the weights, frozen: it also computes the query
        self.net["head"] = linear_head(ctx.backbone.feature_dim, ctx.protocol.num_classes, self.head_init)

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


@dataclass
class PoolPromptConfig(TrainConfig):
    # PILOT's and the official batch-wise selection: every test (and, for L2P, training) image of a
    # batch uses the prompts chosen most often in that batch. Off: each image picks its own, so
    # predictions do not depend on the batch. On, evaluation follows PILOT: all seen classes' test
    # images, class-sorted, in batches of batch_size.
    batchwise_prompt: bool = False


def class_sorted(splits: list[Split]) -> tuple[Split, np.ndarray]:
    """The splits' images as one split sorted by label, dataset order within a class (PILOT's test set),
    and each image's position in it, taken in the splits' concatenated order."""
    indices = np.concatenate([split.indices for split in splits])
    labels = np.concatenate([split.labels for split in splits])
    order = np.argsort(labels, kind="stable")
    position = np.empty_like(order)
    position[order] = np.arange(len(order))
    return Split(splits[0].part, splits[0].source, indices[order], labels[order]), position


class PoolPromptLearner(PromptLearner):
    """L2P and DualPrompt: ``select`` picks pool entries; evaluation records each test image's choice
    for ``choice_report`` (what the method reports of its prompt selection, in both modes)."""

    def __init__(self, config: PoolPromptConfig, ctx):
        super().__init__(config, ctx)
        self._choices: list[torch.Tensor] = []  # per evaluation batch, in order
        self._report: dict[str, Any] = {}

    @classmethod
    def validate_config(cls, config: PoolPromptConfig) -> None:
        super().validate_config(config)
        if config.batchwise_prompt:
            warnings.warn(f"batchwise_prompt: true ({cls.name}): each test batch votes on its prompts, so accuracy "
                          f"depends on the test batches (PILOT's: class-sorted, batch_size {config.batch_size}); "
                          f"results.json records batch_dependent_evaluation: true.", stacklevel=3)

    @property
    def batch_dependent_evaluation(self) -> bool:
        return self.config.batchwise_prompt

    @property
    def test_batch_size(self) -> Optional[int]:
        return self.config.batch_size if self.config.batchwise_prompt else None

    def select(self, pool: PromptPool, query: torch.Tensor, task: Optional[Task],
               force_index: Optional[torch.Tensor] = None) -> PoolSelection:
        selection = pool.select(query, force_index=force_index, batchwise=self.config.batchwise_prompt)
        if task is None:
            self._choices.append(selection.indices.cpu())
        return selection

    def predict_tasks(self, splits: list[Split]) -> list[torch.Tensor]:
        self._choices = []
        if self.config.batchwise_prompt:
            union, position = class_sorted(splits)
            logits, choices = self.predict(union)[position], torch.cat(self._choices)[position]
            logits = list(logits.split([len(split) for split in splits]))
        else:
            logits = [self.predict(split) for split in splits]
            choices = torch.cat(self._choices)
        # the splits are the seen tasks' test images, in task order: each image's own task (its domain's, in a domain stream)
        tasks = torch.repeat_interleave(torch.arange(len(splits)), torch.tensor([len(split) for split in splits]))
        self._report = self.choice_report(choices, tasks)
        return logits

    def evaluation_report(self) -> dict[str, Any]:
        return self._report

    def choice_report(self, choices: torch.Tensor, tasks: torch.Tensor) -> dict[str, Any]:
        """From each test image's chosen entries [N, top_k] and its own task's index."""
        raise NotImplementedError
