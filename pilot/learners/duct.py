"""DUCT, dual consolidation (Zhou et al., CVPR 2025), as LAMDA-PILOT's ``models/duct.py`` (its ViT version;
exemplar-free). Each task:

1. restarts the backbone from the pre-trained weights θ₀ and takes the pre-trained features' class means of
   the task's classes (test transform);
2. trains the backbone (rate ``lrate · bcb_lr_scale``) and a cosine head (``lrate``) on the task's images,
   cross-entropy over the task's own rows, SGD with torch's ``ConstantLR`` defaults as PILOT (a third of
   the rate for the first 5 epochs);
3. merges representations: ``merged += (θ − θ₀) · merge_scalar · s``, with ``s`` the mean cosine similarity
   between each class's pre-trained mean and its mean under the trained backbone (train transform, as
   PILOT's ``_cal_means_cur``), and loads ``θ₀ + merged``;
4. retrains the head on the merged backbone for ``epc_re`` epochs;
5. consolidates the classifier: for each earlier task, a Sinkhorn plan (``ot_reg``) between the task's and
   the earlier task's classes, cost the distance of their pre-trained class means, moves the task's rows
   onto the earlier classes: ``W_old ← (1 − head_merge_ratio) · W_old + head_merge_ratio · planᵀ W_new``.

PILOT's head is a cosine classifier with one learnable scale; rows of classes not yet trained start at zero
(``SimpleVitNet.update_fc``). Domain scenario (the paper's setting): each domain gets its own block of rows
over every class (PILOT's per-task rows, the task a domain), the plan matches a domain's classes to an
earlier domain's, and a class scores its best block.
"""
from __future__ import annotations

from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import nn

from pilot.config import LearnerConfig
from pilot.data.stream import Split, Task
from pilot.errors import PilotError
from pilot.learners import register_learner
from pilot.learners._gradient import GradientLearner, TrainConfig
from pilot.modules.heads import CosineHead, cosine_logits
from pilot.modules.transport import class_mean_cost, sinkhorn, transport_rows


@dataclass
class DuctConfig(LearnerConfig):
    """PILOT's exps/duct.json."""

    epochs: int = 10
    epc_init: int = 0  # the first task's epochs (PILOT's optional key); 0: ``epochs``
    lrate: float = 0.1  # the head's rate
    bcb_lr_scale: float = 0.01  # the backbone trains at lrate * bcb_lr_scale
    # PILOT passes lr_re as the retraining optimiser's default rate, but the head's parameter group carries its
    # own (lrate), which wins: the head retrains at lrate. Kept so; lr_re is read and has no effect, as there.
    lr_re: float = 1e-3
    epc_re: int = 5  # epochs of retraining the head on the merged backbone
    batch_size: int = 128
    weight_decay: float = 5e-4
    merge_scalar: float = 0.25  # the weight of each task vector in the merged backbone (times the similarity)
    head_merge_ratio: float = 0.25  # the share of the transported rows in an old task's consolidated rows
    ot_reg: float = 0.02  # Sinkhorn's entropic regularisation
    # PILOT's duct.json sets these, and its DUCT never reads them (its schedule is ConstantLR): no effect here either.
    milestones: list[int] = field(default_factory=lambda: [60, 100, 140])
    lrate_decay: float = 0.1


@register_learner("duct")
class Duct(GradientLearner):
    config_class = DuctConfig
    scenarios = ("class", "domain", "task")

    def __init__(self, config: DuctConfig, ctx):
        super().__init__(config, ctx)
        protocol = ctx.protocol
        self.domains = protocol.scenario == "domain"
        # Head rows of each task: its classes, or in a domain stream one block of every class per domain.
        classes = protocol.num_classes
        self.blocks = ([range(t * classes, (t + 1) * classes) for t in range(protocol.num_tasks)] if self.domains
                       else protocol.task_classes)
        head = CosineHead(ctx.backbone.feature_dim, self.blocks[-1].stop)
        with torch.no_grad():
            head.weight[self.blocks[0].stop:] = 0  # PILOT's update_fc: a later task's rows start at zero
        self.net["backbone"] = ctx.backbone.requires_grad_(True)
        self.net["head"] = head
        self.net.to(ctx.device)
        # θ₀: each task restarts from it; the backbone holds it now, in a new run and in a resumed one alike.
        self.pretrained = {name: value.detach().clone() for name, value in self.backbone_state().items()}
        self.merged = {name: torch.zeros_like(value) for name, value in self.pretrained.items()}
        self.class_means: list[torch.Tensor] = []  # each task's classes' pre-trained feature means
        self.retraining = False  # the head-only phase on the merged backbone

    @classmethod
    def settings(cls, config: DuctConfig, first_task: bool) -> TrainConfig:
        epochs = config.epc_init if first_task and config.epc_init else config.epochs
        return TrainConfig(tuned_epoch=epochs, init_lr=config.lrate, batch_size=config.batch_size, optimizer="sgd",
                           scheduler="torch_constant", weight_decay=config.weight_decay)

    @classmethod
    def retrain_settings(cls, config: DuctConfig) -> TrainConfig:
        return TrainConfig(tuned_epoch=config.epc_re, init_lr=config.lr_re, batch_size=config.batch_size,
                           optimizer="sgd", scheduler="torch_constant", weight_decay=config.weight_decay)

    @classmethod
    def validate_config(cls, config: DuctConfig) -> None:
        cls.validate_settings(config)
        if config.epc_init < 0 or config.epc_re < 0:
            raise PilotError(f"epc_init and epc_re (epochs of the first task, of retraining the head) must be 0 or "
                             f"more, got {config.epc_init} and {config.epc_re}.")
        if config.bcb_lr_scale < 0 or config.merge_scalar < 0:
            raise PilotError(f"bcb_lr_scale and merge_scalar must be 0 or more, got {config.bcb_lr_scale} and "
                             f"{config.merge_scalar}.")
        if not 0 <= config.head_merge_ratio <= 1:
            raise PilotError(f"head_merge_ratio (the transported rows' share of an old task's rows) must lie in "
                             f"[0, 1], got {config.head_merge_ratio}.")
        if config.ot_reg <= 0:
            raise PilotError(f"ot_reg (Sinkhorn's regularisation) must be above 0, got {config.ot_reg}.")

    def backbone_state(self) -> dict[str, torch.Tensor]:
        """The backbone's floating-point tensors (what a task vector holds), sharing their storage."""
        return {name: value for name, value in self.net["backbone"].state_dict().items()
                if torch.is_floating_point(value)}

    # --- training ----------------------------------------------------------------------------

    def trainable(self) -> list[nn.Parameter]:
        head = list(self.net["head"].parameters())
        return head if self.retraining else list(self.net["backbone"].parameters()) + head

    def param_groups(self, parameters: list[nn.Parameter]) -> list[dict]:
        """PILOT's groups: the head at ``lrate`` (also when retraining), the backbone at ``lrate · bcb_lr_scale``."""
        head = {"params": list(self.net["head"].parameters()), "lr": self.config.lrate}
        if self.retraining:
            return [head]
        backbone = {"params": list(self.net["backbone"].parameters()), "lr": self.config.lrate * self.config.bcb_lr_scale}
        return [backbone, head]

    def set_train_mode(self, training: bool) -> None:
        self.net["backbone"].train(training)

    def task_logits(self, features: torch.Tensor, rows: range) -> torch.Tensor:
        head = self.net["head"]
        return head.sigma * cosine_logits(features, head.weight[rows.start:rows.stop])

    def train_outputs(self, images: torch.Tensor, labels: torch.Tensor, task: Task):
        with torch.set_grad_enabled(not self.retraining):
            features = self.net["backbone"](images)
        return self.task_logits(features, self.blocks[task.index]), 0.0

    def training_loss(self, logits: torch.Tensor, labels: torch.Tensor, task: Task) -> torch.Tensor:
        """Cross-entropy over the task's own rows (PILOT: ``logits[:, known:]``, targets less ``known``)."""
        return F.cross_entropy(logits, labels - task.classes.start)

    def begin_task(self, task: Task) -> None:
        with torch.no_grad():
            for name, value in self.backbone_state().items():
                value.copy_(self.pretrained[name])
        self.class_means.append(self.class_feature_means(task.train, task.classes))

    def class_feature_means(self, split: Split, classes: range, transform=None) -> torch.Tensor:
        """``[classes, D]`` means of the backbone's features of ``split`` (eval transform unless given)."""
        self.set_train_mode(False)
        features = self.ctx.encode(self.net["backbone"], split, transform=transform)
        labels = torch.from_numpy(split.labels)
        return torch.stack([features[labels == c].mean(0) for c in classes])

    def end_task(self, task: Task) -> None:
        self.merge_backbone(task)
        settings = self.retrain_settings(self.config)
        if settings.tuned_epoch:
            self.retraining = True
            try:
                self.train_epochs(task, list(self.net["head"].parameters()), settings)
            finally:
                self.retraining = False
        self.consolidate_classifier(task)

    # --- the two consolidations ----------------------------------------------------------------

    @torch.no_grad()
    def merge_backbone(self, task: Task) -> None:
        """PILOT's ``_stage1_merge_backbone``: ``merged += (θ − θ₀) · merge_scalar · s``; the backbone ← θ₀ + merged."""
        trained = self.class_feature_means(task.train, task.classes, self.ctx.train_transform())
        similarity = float(F.cosine_similarity(self.class_means[-1], trained, dim=1).mean())
        for name, value in self.backbone_state().items():
            self.merged[name] += (value - self.pretrained[name]) * (self.config.merge_scalar * similarity)
            value.copy_(self.merged[name] + self.pretrained[name])
        self.ctx.log.info(f"{self.task_tag}: task vector merged with weight {self.config.merge_scalar} x "
                          f"similarity {similarity:.4f}")

    @torch.no_grad()
    def consolidate_classifier(self, task: Task) -> None:
        """PILOT's ``_stage2_transport_classifier``: each earlier task's rows take ``head_merge_ratio`` of the task's
        rows carried over by the Sinkhorn plan between the two tasks' classes (uniform masses)."""
        weight, ratio = self.net["head"].weight, self.config.head_merge_ratio
        current = self.blocks[task.index]
        for earlier in range(task.index):
            rows = self.blocks[earlier]
            cost = class_mean_cost(self.class_means[-1], self.class_means[earlier], p=2)
            plan = sinkhorn(torch.full((len(current),), 1.0 / len(current)), torch.full((len(rows),), 1.0 / len(rows)),
                            cost, self.config.ot_reg)
            carried = transport_rows(plan, weight[current.start:current.stop].cpu()).float().to(weight.device)
            weight[rows.start:rows.stop] = (1 - ratio) * weight[rows.start:rows.stop] + ratio * carried
            self.ctx.log.info(f"{self.task_tag}: task {earlier + 1}'s rows consolidated, plan mass {float(plan.sum()):.4f}, "
                              f"transport cost {float((plan * cost).sum()):.4f}")

    # --- evaluation ----------------------------------------------------------------------------

    def eval_logits(self, images: torch.Tensor, queries) -> torch.Tensor:
        features = self.net["backbone"](images)
        if not self.domains:
            return self.task_logits(features, range(self.num_seen))
        learnt = len(self.class_means)  # domains learnt: a class scores its best block among theirs
        logits = self.task_logits(features, range(self.blocks[learnt - 1].stop))
        return logits.view(len(features), learnt, -1).amax(dim=1)

    def state_dict(self):
        return {**super().state_dict(), "merged": self.merged, "class_means": self.class_means}

    def load_state_dict(self, state):
        super().load_state_dict(state)
        self.merged = {name: value.to(self.ctx.device) for name, value in state["merged"].items()}
        self.class_means = list(state["class_means"])
