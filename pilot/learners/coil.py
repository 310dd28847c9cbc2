"""Coil, co-transport for class-incremental learning (Zhou et al., ACM MM 2021), as LAMDA-PILOT's
``models/coil.py`` (its ViT version of the official PyCIL code): the whole ViT and a cosine head (one learnable
scale) trained on each task's images and the rehearsal memory's exemplars, every seen class in the loss, with
transport between old and new classes in both directions.

- Prospective: before a task, a Sinkhorn plan (``sinkhorn``, cost the ``norm_term``-Minkowski distance of
  L2-normalised class means) moves the old classes' normalised rows onto the new classes, rescaled to the old
  rows' mean norm (γ); that initialises the new rows, and in the first epoch the new logits distil from it
  (weight 0.001).
- Retrospective: from the second epoch, every 30 steps, the plan from the new classes to the old ones carries
  the new rows back onto the old classes (times γ), and the old network's answers distil into those
  transported rows (weight ``reg_term · (epoch / epochs)²``).
- From the second task the loss is ``λ · KD(old classes) + (1 − λ) · CE``, λ = old / seen classes, KD PILOT's
  at temperature ``T``.

Class means: the network's L2-normalised features (test transform) of the exemplars for old classes and of the
task's images for new ones. NME is reported beside the head, as PILOT prints it.
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
from pilot.learners._gradient import TrainConfig
from pilot.learners.icarl import CLASSIFIERS, Icarl, exemplar_means, nme_logits
from pilot.modules.distillation import kd_loss
from pilot.modules.heads import CosineHead, cosine_logits
from pilot.modules.transport import class_mean_cost, sinkhorn, transport_rows

PROSPECTIVE_WEIGHT = 1e-3  # PILOT's weight of the first epoch's distillation from the transported new rows
RETROSPECTIVE_EVERY = 30  # steps between two plans from the new classes to the old ones (PILOT's i % 30)
WEIGHT_DECAY = 5e-4  # fixed in PILOT's coil.py, not a key


@dataclass
class CoilConfig(LearnerConfig):
    """PILOT's exps/coil.json: SGD (momentum 0.9) with step decay, the same for every task."""

    epochs: int = 10
    lrate: float = 1e-3
    milestones: list[int] = field(default_factory=lambda: [80, 120])  # past 10 epochs: a constant rate, as PILOT
    lrate_decay: float = 0.1
    batch_size: int = 64
    T: float = 2.0
    sinkhorn: float = 0.464  # Sinkhorn's entropic regularisation
    norm_term: float = 3.0  # the Minkowski p of the cost between class means
    reg_term: float = 1e-3  # weight of the retrospective distillation (times (epoch / epochs)²)
    # PILOT reads it as the rows' scale, but replaces it with the measured γ before any use (solving_ot runs
    # before the first transport back): no effect there, none here.
    calibration_term: float = 1.5
    # The run's accuracy: the head's ("cnn", PILOT's first) or the nearest mean of exemplars ("nme").
    classifier: str = "cnn"


@register_learner("coil")
class Coil(Icarl):
    config_class = CoilConfig

    def __init__(self, config: CoilConfig, ctx):
        super().__init__(config, ctx)
        del self.net["heads"]
        head = CosineHead(ctx.backbone.feature_dim, ctx.protocol.num_classes)
        with torch.no_grad():
            head.weight[ctx.protocol.task_sizes[0]:] = 0  # set by the prospective transport when their task starts
        self.net["head"] = head.to(ctx.device)
        self.new_rows_by_transport = torch.zeros(0)  # the task's new rows as the old ones transported (prospective)
        self.old_rows_by_transport = torch.zeros(0)  # the old rows as the new ones transported (retrospective)
        self.calibration = torch.ones(())  # γ: the old rows' mean norm over the transported rows'
        self.epoch = self.step = 0

    @classmethod
    def settings(cls, config: CoilConfig, first_task: bool) -> TrainConfig:
        return TrainConfig(tuned_epoch=config.epochs, init_lr=config.lrate, batch_size=config.batch_size,
                           optimizer="sgd", scheduler="steplr", weight_decay=WEIGHT_DECAY,
                           milestones=config.milestones, lr_decay=config.lrate_decay)

    @classmethod
    def validate_config(cls, config: CoilConfig) -> None:
        cls.validate_settings(config)
        if config.classifier not in CLASSIFIERS:
            raise PilotError(f"classifier must be one of {', '.join(CLASSIFIERS)} (the head's logits, or the nearest "
                             f"mean of exemplars), got '{config.classifier}'.")
        if config.T <= 0 or config.sinkhorn <= 0:
            raise PilotError(f"T (the distillation temperature) and sinkhorn (Sinkhorn's regularisation) must be above "
                             f"0, got {config.T} and {config.sinkhorn}.")
        if config.norm_term < 1 or config.reg_term < 0:
            raise PilotError(f"norm_term (the cost's Minkowski p) must be at least 1 and reg_term 0 or more, got "
                             f"{config.norm_term} and {config.reg_term}.")

    # --- the network -------------------------------------------------------------------------

    @staticmethod
    def head_logits(net: nn.ModuleDict, features: torch.Tensor, num_classes: int) -> torch.Tensor:
        head = net["head"]
        return head.sigma * cosine_logits(features, head.weight[:num_classes])

    def trainable(self) -> list[nn.Parameter]:
        return list(self.net["backbone"].parameters()) + list(self.net["head"].parameters())

    def old_logits(self, images: torch.Tensor, num_old: int) -> torch.Tensor:
        with torch.no_grad():
            return self.head_logits(self.old_net, self.old_net["backbone"](images), num_old)

    def eval_logits(self, images: torch.Tensor, queries) -> torch.Tensor:
        return self.head_logits(self.net, self.net["backbone"](images), self.num_seen)

    def both_logits(self, split: Split) -> dict[str, torch.Tensor]:
        self.set_train_mode(False)
        features = self.ctx.encode(self.net["backbone"], split)
        with torch.no_grad(), self.ctx.autocast():
            cnn = self.head_logits(self.net, features.to(self.ctx.device), self.num_seen).float().cpu()
        return {"cnn": cnn, "nme": nme_logits(features, self.class_means)}

    # --- transport -----------------------------------------------------------------------------

    def normalised_class_means(self, task: Task) -> torch.Tensor:
        """``[seen classes, D]``: the current network's class means, old classes' from the exemplars, new ones' from
        the task's images (PILOT's ``_extract_class_means_with_memory``)."""
        training = self.net["backbone"].training
        self.set_train_mode(False)
        split = self.training_split(task)
        means = exemplar_means(self.ctx.encode(self.net["backbone"], split), torch.from_numpy(split.labels),
                               task.num_seen)
        self.set_train_mode(training)
        return means

    @torch.no_grad()
    def transport_old_to_new(self, task: Task) -> None:
        """PILOT's ``solving_ot``: the new classes' rows as the old ones' normalised rows carried by the plan
        (masses 1/old on both sides), times the old class count and γ = mean old row norm / mean carried norm."""
        old, seen = task.num_old, task.num_seen
        means = self.normalised_class_means(task)
        cost = class_mean_cost(means[:old], means[old:seen], p=self.config.norm_term)
        plan = sinkhorn(torch.full((old,), 1.0 / old), torch.full((seen - old,), 1.0 / old), cost, self.config.sinkhorn)
        weight = self.net["head"].weight
        carried = transport_rows(plan, F.normalize(weight[:old], dim=1).cpu()).float().to(weight.device) * old
        self.calibration = weight[:old].norm(dim=1).mean() / carried.norm(dim=1).mean()
        self.new_rows_by_transport = carried * self.calibration
        weight[old:seen] = self.new_rows_by_transport

    @torch.no_grad()
    def transport_new_to_old(self, task: Task) -> None:
        """PILOT's ``solving_ot_to_old``: the old classes' rows as the new ones' normalised rows carried by the plan
        from the new classes (masses 1/old) to the old ones, cost plus 1e-8, times the old class count and γ."""
        old, seen = task.num_old, task.num_seen
        means = self.normalised_class_means(task)
        cost = class_mean_cost(means[old:seen], means[:old], p=self.config.norm_term) + 1e-8
        plan = sinkhorn(torch.full((seen - old,), 1.0 / old), torch.full((old,), 1.0 / old), cost, self.config.sinkhorn)
        weight = self.net["head"].weight
        carried = transport_rows(plan, F.normalize(weight[old:seen], dim=1).cpu()).float().to(weight.device)
        self.old_rows_by_transport = carried * old * self.calibration

    # --- training ------------------------------------------------------------------------------

    def begin_task(self, task: Task) -> None:
        super().begin_task(task)  # the frozen copy of the network before the task
        if task.num_old:
            self.transport_old_to_new(task)

    def begin_epoch(self, task: Task, epoch: int) -> None:
        self.epoch, self.step = epoch, 0

    def train_outputs(self, images: torch.Tensor, labels: torch.Tensor, task: Task):
        features = self.net["backbone"](images)
        logits = self.head_logits(self.net, features, task.num_seen)
        if self.old_net is None:
            return logits, 0.0
        old, T = task.num_old, self.config.T
        old_logits = self.old_logits(images, old)
        share = old / task.num_seen  # PILOT's lamda
        extra = share * kd_loss(logits[:, :old].float(), old_logits.float(), T)
        if self.epoch == 0:  # the new logits distil from the transported rows (gradient on both sides, as PILOT)
            prospective = cosine_logits(features, self.new_rows_by_transport)
            extra = extra + PROSPECTIVE_WEIGHT * kd_loss(logits[:, old:].float(), prospective.float(), T)
        else:
            if self.step % RETROSPECTIVE_EVERY == 0:
                self.transport_new_to_old(task)
            retrospective = cosine_logits(features, self.old_rows_by_transport)
            weight = self.config.reg_term * (self.epoch / self.task_settings(task).tuned_epoch) ** 2
            extra = extra + weight * kd_loss(retrospective.float(), old_logits.float(), T)
        self.step += 1
        return logits, extra

    def training_loss(self, logits: torch.Tensor, labels: torch.Tensor, task: Task) -> torch.Tensor:
        """``(1 − λ) · CE`` over every seen class (λ = old / seen classes; the KD term is ``train_outputs``')."""
        return (1 - task.num_old / task.num_seen) * F.cross_entropy(logits, labels)
