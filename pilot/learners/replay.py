"""Replay, the rehearsal baseline (PyCIL's ``models/replay.py``): fine-tuning, as ``finetune``, on each task's
images together with the rehearsal memory's exemplars, every seen class in the loss. After each task the
memory is rebuilt as PILOT's ``build_rehearsal_memory`` does, herding on the fine-tuned network's features.
Settings: finetune's keys and the memory keys (``memory_size`` or ``memory_per_class`` with ``fixed_memory``).
"""
from __future__ import annotations

import torch

from pilot.data.stream import Split
from pilot.learners import register_learner
from pilot.learners.finetune import Finetune


@register_learner("replay")
class Replay(Finetune):
    scenarios = ("class", "task")
    domain_refusal = "its memory keeps each class's exemplars from the domain that brought the class"
    uses_memory = True
    mask_old_classes = False  # exemplars of old classes train their logits too

    def memory_features(self, split: Split) -> torch.Tensor:
        self.set_train_mode(False)
        return self.ctx.encode(self.ctx.backbone, split)
