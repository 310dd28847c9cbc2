"""DER, dynamically expandable representation (Yan et al., CVPR 2021), as LAMDA-PILOT's ``models/der.py`` (its ViT
version, ``DERNet``): each task adds a copy of the backbone as it was after the previous task; the earlier copies
are frozen (no gradient, eval mode), and one linear head over all copies' features, side by side, is trained with
the newest copy on the task's images and the rehearsal memory's exemplars, every seen class in the cross-entropy.
From the second task an auxiliary head on the newest copy's features (the task's classes plus one class for all
old ones) adds its cross-entropy. After each task the memory is herded on the concatenated features.

As PILOT: the whole head trains, the old classes' rows included (PILOT freezes only the old backbones); no weight
alignment of the head (PILOT's call to ``weight_align`` is commented out); DER's masking and pruning are absent
(PILOT: "not implemented by the source repo"). Departure: PILOT also prints the nearest-mean-of-exemplars (NME)
accuracy beside the head's; pilot reports the head's ("CNN"), PILOT's first. PILOT's ``T`` key is not read by its
DER and is accepted as a no-op.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Optional

import torch
from torch import nn

from pilot.data.stream import Split, Task
from pilot.learners import register_learner
from pilot.learners._gradient import GradientLearner, TrainConfig
from pilot.learners.finetune import Finetune, FinetuneConfig
from pilot.learners.replay import Replay
from pilot.modules.branches import Branches, auxiliary_loss, train_if_trainable, widened_head
from pilot.modules.heads import linear, linear_head


@dataclass
class DerConfig(FinetuneConfig):
    """PILOT's exps/der.json: finetune's SGD keys with DER's values (10 epochs per task, batch 32)."""

    init_epoch: int = 10
    epochs: int = 10
    milestones: list[int] = field(default_factory=lambda: [80, 120, 150])  # past 10 epochs: a constant rate
    batch_size: int = 32


@register_learner("der")
class Der(GradientLearner):
    config_class = DerConfig
    scenarios = Replay.scenarios
    domain_refusal = Replay.domain_refusal
    uses_memory = True
    mask_old_classes = False  # exemplars of old classes train their logits too

    def __init__(self, config: DerConfig, ctx):
        super().__init__(config, ctx)
        self.net["branches"] = Branches(ctx.backbone.feature_dim)
        self.net["head"] = linear(0, 0)  # widened by each task
        self.aux_head: Optional[nn.Linear] = None  # while a later task trains

    @classmethod
    def settings(cls, config: DerConfig, first_task: bool) -> TrainConfig:
        return Finetune.settings(config, first_task)

    @classmethod
    def validate_config(cls, config: DerConfig) -> None:
        cls.validate_settings(config)

    # --- what differs from MEMO --------------------------------------------------------------

    def first_branch(self) -> nn.Module:
        """The first task's branch: the pre-trained backbone itself."""
        return self.ctx.backbone

    def features(self, images: torch.Tensor) -> torch.Tensor:
        """Every branch's features, oldest first (PILOT's ``extract_vector``)."""
        return self.net["branches"](images)

    def aux_weight(self) -> float:
        """The auxiliary loss's weight: PILOT's DER adds it as it is."""
        return 1.0

    def set_old_trainable(self, task: Task) -> None:
        """PILOT's ``incremental_train``: every earlier backbone's parameters stop requiring gradients."""
        self.net["branches"].set_old_trainable(False)

    # --- the shared network ----------------------------------------------------------------

    def begin_task(self, task: Task) -> None:
        """PILOT's ``update_fc``: a new branch, the head one branch wider and one task taller, a new auxiliary head."""
        branches = self.net["branches"]
        branches.add(self.first_branch())
        self.set_old_trainable(task)
        self.net["head"] = widened_head(self.net["head"], branches.out_dim, task.num_seen).to(self.ctx.device)
        self.aux_head = (linear_head(branches.feature_dim, task.num_seen - task.num_old + 1, init="kaiming")
                         .to(self.ctx.device) if task.num_old else None)  # only later tasks' loss uses it

    def end_task(self, task: Task) -> None:
        self.aux_head = None  # the next task draws its own

    def trainable(self) -> list[nn.Parameter]:
        aux = list(self.aux_head.parameters()) if self.aux_head is not None else []
        return list(self.net.parameters()) + aux

    def set_train_mode(self, training: bool) -> None:
        for branch in self.net["branches"].members:
            train_if_trainable(branch, training)

    def train_outputs(self, images: torch.Tensor, labels: torch.Tensor, task: Task):
        features = self.features(images)
        logits = self.net["head"](features)
        if self.aux_head is None:
            return logits, 0.0
        aux_logits = self.aux_head(self.net["branches"].newest(features))
        return logits, self.aux_weight() * auxiliary_loss(aux_logits.float(), labels, task.num_old)

    def eval_logits(self, images: torch.Tensor, queries: Optional[torch.Tensor]) -> torch.Tensor:
        return self.net["head"](self.features(images))

    def memory_features(self, split: Split) -> torch.Tensor:
        """PILOT herds on ``extract_vector``: all branches' features, in eval mode, test transform."""
        self.set_train_mode(False)
        return self.ctx.encode(self.features, split)

    def state_dict(self):
        return {**super().state_dict(), "branches": len(self.net["branches"])}

    def load_state_dict(self, state):
        self.net["branches"].grow_to(state["branches"], self.first_branch())
        out_features, in_features = state["net"]["head.weight"].shape
        self.net["head"] = linear(in_features, out_features).to(self.ctx.device)
        super().load_state_dict(state)
