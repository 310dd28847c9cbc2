"""DGR, gradient reweighting (He, CVPR 2024), as LAMDA-PILOT's ``models/dgr.py`` (its ViT version): iCaRL's
network, memory and distillation (the whole ViT and a growing linear head, trained on each task's images and
the memory's exemplars), with two changes to the training step.

- The loss. Cross-entropy on the logits plus the log of the training set's class prior (the task's images
  and the exemplars: the new classes' larger share is taken out of the logits), and from the second task
  ``lambda · (old classes / new classes) ·`` PILOT's distillation loss on the old classes' logits.
- The head's gradient. Per class row, the norms of the cross-entropy's gradient accumulate over the task's
  steps (``G``). Each row's cross-entropy gradient (weight and bias) is scaled by ``min G / G_c``, taken
  over the old classes and over the new classes apart, and then by ``min(1, mean G_new / mean G_old)`` for
  old rows and that ratio times ``exp(-gammar_r · old / seen)`` for new rows (both at most 1). Old rows
  add the distillation's own gradient, scaled so that its norm matches the scaled cross-entropy's
  (``ratio_kd``). The backbone takes the gradient of the loss as written. On the first task the rows are
  scaled by ``min G / G_c`` over all classes, and there is no distillation.

Settings: PILOT's SGD (momentum 0.9) with a cosine schedule over ``init_epoch`` / ``epochs``, the memory
keys, ``T``, ``lambda`` and ``gammar_r`` (PILOT's spelling). NME is reported beside the head, as iCaRL's.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Optional

import torch
import torch.nn.functional as F

from pilot.config import LearnerConfig
from pilot.data.stream import Task
from pilot.errors import PilotError
from pilot.learners import register_learner
from pilot.learners._gradient import TrainConfig
from pilot.learners.icarl import CLASSIFIERS, Icarl
from pilot.modules.distillation import kd_loss


@dataclass
class DgrConfig(LearnerConfig):
    """PILOT's exps/dgr.json: SGD with CosineAnnealingLR (no milestones), first task and later tasks apart."""

    init_epoch: int = 20
    init_lr: float = 1e-3
    init_weight_decay: float = 5e-4
    epochs: int = 20
    lrate: float = 1e-3
    batch_size: int = 128
    weight_decay: float = 5e-4
    T: float = 2.0
    # PILOT's "lambda" (a Python keyword; that name works in configs): weight of the distillation term.
    lambda_kd: float = 1.0
    # How much less the new classes' rows are scaled than the old ones': exp(-gammar_r * old / seen).
    gammar_r: float = 1.0
    # The run's accuracy: the head's ("cnn", PILOT's first) or the nearest mean of exemplars ("nme").
    classifier: str = "cnn"


def prior_adjusted_cross_entropy(logits: torch.Tensor, labels: torch.Tensor, counts: torch.Tensor) -> torch.Tensor:
    """PILOT's ``regularized_cn``: cross-entropy of ``logits + log(prior)``, the prior being each class's share
    of the training set's labels (``counts``)."""
    prior = (counts.double() / counts.sum()).float()
    return F.cross_entropy(logits + prior.log().to(logits.device), labels)


def row_scales(accumulated: torch.Tensor, num_old: int, gammar_r: float) -> torch.Tensor:
    """The per-row factors of the cross-entropy's gradient, from the rows' accumulated gradient norms ``G``.

    First task (``num_old`` 0): ``min G / G_c``. Later: ``min G_old / G_c`` on old rows times
    ``rs_old = min(1, mean G_new / mean G_old)``, ``min G_new / G_c`` on new rows times
    ``rs_new = min(1, mean G_new / mean G_old · exp(-gammar_r · old / seen))``."""
    if num_old == 0:
        return accumulated.min() / accumulated
    old, new = accumulated[:num_old], accumulated[num_old:]
    balance = float(new.mean() / old.mean())
    rs_old = min(1.0, balance)
    rs_new = min(1.0, balance * math.exp(-gammar_r * num_old / len(accumulated)))
    return torch.cat([old.min() / old * rs_old, new.min() / new * rs_new])


def stacked_gradients(loss: torch.Tensor, weights: list[torch.Tensor], biases: list[torch.Tensor]):
    """The gradient of ``loss`` with respect to the task heads' weights and biases, each stacked over the heads
    into one ``[classes, D]`` and one ``[classes]`` tensor (zero for a head the loss does not reach)."""
    gradients = torch.autograd.grad(loss, weights + biases, retain_graph=True, allow_unused=True)
    gradients = [torch.zeros_like(p) if g is None else g for g, p in zip(gradients, weights + biases)]
    return torch.cat(gradients[: len(weights)]), torch.cat(gradients[len(weights):])


@register_learner("dgr")
class Dgr(Icarl):
    config_class = DgrConfig

    def __init__(self, config: DgrConfig, ctx):
        super().__init__(config, ctx)
        self.accumulated = torch.zeros(0, dtype=torch.float64)  # the task's summed gradient norm per head row
        self.class_counts = torch.zeros(0)  # the training set's images per seen class
        self.pending: list[torch.Tensor] = []  # the head's reweighted gradient, set after the step's backward
        self.distillation: Optional[torch.Tensor] = None  # the step's distillation loss (from the second task)

    @classmethod
    def settings(cls, config: DgrConfig, first_task: bool) -> TrainConfig:
        """PILOT's ``_init_train`` / ``_update_representation`` optimiser: SGD, cosine to 0 over the epochs."""
        return TrainConfig(tuned_epoch=config.init_epoch if first_task else config.epochs,
                           init_lr=config.init_lr if first_task else config.lrate,
                           batch_size=config.batch_size, optimizer="sgd", scheduler="cosine_annealing",
                           weight_decay=config.init_weight_decay if first_task else config.weight_decay)

    @classmethod
    def validate_config(cls, config: DgrConfig) -> None:
        cls.validate_settings(config)
        if config.classifier not in CLASSIFIERS:
            raise PilotError(f"classifier must be one of {', '.join(CLASSIFIERS)} (the head's logits, or the nearest "
                             f"mean of exemplars), got '{config.classifier}'.")
        if config.T <= 0:
            raise PilotError(f"T (the distillation temperature) must be above 0, got {config.T}.")
        if config.lambda_kd < 0:
            raise PilotError(f"lambda (the weight of the distillation term) must be 0 or more, got {config.lambda_kd}.")

    def begin_task(self, task: Task) -> None:
        super().begin_task(task)
        self.accumulated = torch.zeros(task.num_seen, dtype=torch.float64)  # PILOT's gradall, per task
        labels = torch.from_numpy(self.training_split(task).labels)
        self.class_counts = torch.bincount(labels, minlength=task.num_seen)[: task.num_seen]

    def head_parameters(self) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
        heads = self.seen_heads()
        return [head.weight for head in heads], [head.bias for head in heads]

    def train_outputs(self, images: torch.Tensor, labels: torch.Tensor, task: Task):
        logits, _ = super(Icarl, self).train_outputs(images, labels, task)
        if self.old_net is None:
            self.distillation = None
            return logits, 0.0
        self.distillation = kd_loss(logits[:, : task.num_old].float(), self.old_logits(images, task.num_old).float(),
                                    self.config.T)
        weight = self.config.lambda_kd * task.num_old / (task.num_seen - task.num_old)
        return logits, weight * self.distillation

    def training_loss(self, logits: torch.Tensor, labels: torch.Tensor, task: Task) -> torch.Tensor:
        """The prior-adjusted cross-entropy; on the way, the head's reweighted gradient of this step."""
        classification = prior_adjusted_cross_entropy(logits, labels, self.class_counts)
        self.pending = self.reweighted_head_gradient(classification, task)
        return classification

    def reweighted_head_gradient(self, classification: torch.Tensor, task: Task) -> list[torch.Tensor]:
        """PILOT's per-row gradient of the head: ``scale_c · ∇CE_c`` (+ ``ratio_kd · ∇KD_c`` on old rows), for
        the weight and bias of each task head, in ``head_parameters`` order."""
        weights, biases = self.head_parameters()
        ce_weight, ce_bias = stacked_gradients(classification, weights, biases)
        norms = ce_weight.norm(dim=1).double().cpu()
        self.accumulated += norms
        scale = row_scales(self.accumulated, task.num_old, self.config.gammar_r)
        weight_grad = scale.to(ce_weight)[:, None] * ce_weight
        bias_grad = scale.to(ce_bias) * ce_bias
        if self.distillation is not None:
            old = task.num_old
            kd_weight, kd_bias = (g[:old] for g in stacked_gradients(self.distillation, weights, biases))
            ratio_kd = float((scale * norms).norm() / kd_weight.norm(dim=1).double().norm().cpu())
            weight_grad[:old] += ratio_kd * kd_weight
            bias_grad[:old] += ratio_kd * kd_bias
        sizes = [len(w) for w in weights]
        return list(weight_grad.split(sizes)) + list(bias_grad.split(sizes))

    def before_step(self, task: Task) -> None:
        """The head's gradient is PILOT's reweighted one; the backbone keeps the loss's."""
        weights, biases = self.head_parameters()
        for parameter, gradient in zip(weights + biases, self.pending):
            parameter.grad = gradient.detach().clone()
        self.pending = []

    def end_task(self, task: Task) -> None:
        super().end_task(task)
        self.distillation = None
