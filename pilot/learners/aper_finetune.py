"""APER with full fine-tuning (PILOT's ``models/aper_finetune.py``): a copy of the whole ViT is trained
on the first task and becomes the adapted branch; the pretrained ViT stays frozen beside it (two copies)."""
from __future__ import annotations

import copy
from dataclasses import dataclass

from torch import nn

from pilot.learners import register_learner
from pilot.learners._aper import APERLearner
from pilot.learners._first_task_adaptation import AdaptationConfig


@dataclass
class FinetuneAdaptationConfig(AdaptationConfig):
    """PILOT's exps/aper_finetune.json."""

    tuned_epoch: int = 6
    batch_size: int = 128
    weight_decay: float = 0.05


@register_learner("aper_finetune")
class APERFinetune(APERLearner):
    config_class = FinetuneAdaptationConfig

    def adapt(self) -> tuple[nn.Module, nn.Module]:
        tuned = copy.deepcopy(self.ctx.backbone).requires_grad_(True)
        return tuned, tuned
