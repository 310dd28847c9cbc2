"""EASE (Zhou et al., CVPR 2024): Expandable Subspace Ensemble. Each task trains a new AdaptFormer
adapter (a subspace) on the frozen ViT with a temporary cosine head over its own classes; earlier
adapters stay frozen. Every class gets a prototype in every subspace: real class means where its
data met the adapter, and for old classes in newer subspaces prototypes synthesised from class
similarities in the old subspace (``SubspacePrototypes.complement``). Prediction reweights the
subspaces' cosines (``alpha``, ``beta``).

As the official code (sun-hailong/CVPR24-Ease, identical to PILOT's ``models/ease.py``): each
adapter is its own frozen forward pass, so each image is encoded once per subspace through a
feature store; ``later_epochs``/``later_lr`` apply only when the first task's size differs from
the others'.
"""
from __future__ import annotations

import time
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from pilot.config import LearnerConfig
from pilot.data.stream import Split, Task
from pilot.errors import PilotError
from pilot.features import FeatureStore
from pilot.learners import register_learner
from pilot.learners._first_task_adaptation import AdaptedEncoder, adapter_bank
from pilot.learners._gradient import GradientLearner, TrainConfig
from pilot.modules.adapters import freeze
from pilot.modules.heads import CosineHead, SubspacePrototypes


@dataclass
class EASEConfig(LearnerConfig):
    """PILOT's exps/ease.json (= the official ease_cifar.json)."""

    init_epochs: int = 20
    later_epochs: int = 20
    init_lr: float = 0.025
    later_lr: float = 0.025
    batch_size: int = 48
    weight_decay: float = 0.0005
    min_lr: float = 0.0
    optimizer: str = "sgd"
    scheduler: str = "cosine"
    ffn_num: int = 64  # adapter bottleneck
    alpha: float = 0.1  # weight of the other adapter subspaces' cosines (divided by their number)
    use_init_ptm: bool = False  # the pretrained features as one more subspace
    beta: float = 0.0  # weight of the pretrained subspace's cosine
    use_reweight: bool = True  # False: one cosine over all subspaces concatenated
    recalc_sim: bool = True  # recompute all complemented prototypes each task (official default)
    use_diagonal: bool = False  # ablation: prototypes in own subspace only, no complement
    # The official code's oracle and APER-simulation switches; pilot keeps neither (use aper_adapter).
    use_old_data: bool = False
    moni_adam: bool = False
    adapter_num: int = -1


@register_learner("ease")
class EASE(GradientLearner):
    config_class = EASEConfig
    mask_old_classes = True  # the temporary head covers the task's own classes (logits padded, see train_outputs)

    def __init__(self, config: EASEConfig, ctx):
        super().__init__(config, ctx)
        freeze(ctx.backbone)
        self.require_vit()
        self.net["adapters"] = adapter_bank(ctx, config.ffn_num)  # one per seen task, hooked on the shared ViT
        self.prototypes = SubspacePrototypes(ctx.backbone.feature_dim)

    @classmethod
    def settings(cls, config: EASEConfig, first_task: bool) -> TrainConfig:
        """``init_epochs``/``init_lr``, or their ``later_`` keys (0: the same as the first task's)."""
        return TrainConfig(tuned_epoch=config.init_epochs if first_task else (config.later_epochs or config.init_epochs),
                           init_lr=config.init_lr if first_task else (config.later_lr or config.init_lr),
                           batch_size=config.batch_size, weight_decay=config.weight_decay, min_lr=config.min_lr,
                           optimizer=config.optimizer, scheduler=config.scheduler)

    def uses_first_settings(self, task: Task) -> bool:
        """Official: the ``later_`` keys apply only when the first task's size differs from the others'."""
        sizes = self.ctx.protocol.task_sizes
        return task.index == 0 or sizes[0] == sizes[1]

    @classmethod
    def validate_config(cls, config: EASEConfig) -> None:
        cls.validate_settings(config)
        if config.use_old_data or config.moni_adam:
            raise PilotError("use_old_data (an oracle that keeps old data) and moni_adam (EASE simulating APER) are "
                             "not supported; set them false (for APER use model_name aper_adapter).")
        if config.ffn_num < 1 or config.alpha < 0 or config.beta < 0:
            raise PilotError("ffn_num must be >= 1, alpha and beta >= 0.")

    # --- subspaces ---------------------------------------------------------------------------

    @property
    def first(self) -> int:
        """Index of task 0's subspace: 1 when the pretrained features are subspace 0."""
        return int(self.config.use_init_ptm)

    @property
    def training_encoder(self) -> AdaptedEncoder:
        """The backbone with the newest adapter, the one the current task trains."""
        return AdaptedEncoder(self.ctx.backbone, self.net["adapters"][-1])

    def subspace_stores(self) -> list[FeatureStore]:
        return ([self.ctx.features] if self.config.use_init_ptm else []) + self.net["adapters"].stores

    def subspace_features(self, split: Split) -> torch.Tensor:
        """[images, subspaces, dim]: the pretrained features (if used), then each adapter's."""
        return torch.stack([store(split) for store in self.subspace_stores()], dim=1)

    # --- training: the task's adapter and a temporary cosine head ---------------------------

    def begin_task(self, task: Task) -> None:
        self.training_started = time.perf_counter()
        self.net["adapters"].add()
        self.net["head"] = CosineHead(self.ctx.backbone.feature_dim, len(task.classes)).to(self.ctx.device)

    def trainable(self) -> list[nn.Parameter]:
        return list(self.net["adapters"][-1].parameters()) + list(self.net["head"].parameters())

    def set_train_mode(self, training: bool) -> None:
        self.training_encoder.train(training)

    def train_outputs(self, images: torch.Tensor, labels: torch.Tensor, task: Task):
        logits = self.net["head"](self.training_encoder(images))
        return F.pad(logits, (task.classes.start, 0)), 0.0  # old classes' columns: masked by the template

    # --- after training: prototypes in every subspace -----------------------------------------

    def end_task(self, task: Task) -> None:
        self.ctx.log.info(f"task {task.index + 1} trained its adapter in {time.perf_counter() - self.training_started:.2f}s")
        del self.net["head"]
        self.net["adapters"].close()
        while self.prototypes.num_subspaces < len(self.subspace_stores()):
            self.prototypes.add_subspace()
        self.prototypes.add_classes(len(task.classes))
        labels = torch.as_tensor(task.train.labels)
        own = self.first + task.index
        for subspace, store in enumerate(self.subspace_stores()):
            if not self.config.use_diagonal or subspace in (0 if self.first else own, own):
                self.prototypes.set_means(subspace, store(task.train), labels, task.classes)
        if not self.config.use_diagonal:
            self.prototypes.complement(self.ctx.protocol.tasks_within(task.num_seen), self.first,
                                       self.config.recalc_sim)

    def predict(self, split: Split) -> torch.Tensor:
        features = self.subspace_features(split)
        if not self.config.use_reweight:
            return self.prototypes.plain_logits(features)
        return self.prototypes.logits(features, self.ctx.protocol.tasks_within(self.num_seen), self.first,
                                      self.config.alpha, self.config.beta)

    # --- checkpoint ------------------------------------------------------------------------------

    def state_dict(self):
        return {**super().state_dict(), "prototypes": self.prototypes.state_dict()}

    def load_state_dict(self, state):
        super().load_state_dict(state)
        self.prototypes.load_state_dict(state["prototypes"])
