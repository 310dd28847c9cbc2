"""FOSTER (Wang et al., ECCV 2022: feature boosting and compression) as LAMDA-PILOT's ``models/foster.py`` with
``utils/inc_net.py``'s FOSTERNet (its ViT version). The first task fine-tunes the ViT and a linear head; each
later task trains in two stages on the task's images and the memory's exemplars:

- Boosting: a new branch, a copy of the network's backbone, trains beside it (the old branch, frozen, in eval
  mode). A head over both branches' features (the old head's rows over the old features, the rest drawn afresh)
  learns by cross-entropy on its logits divided by class-balanced weights (``beta1``), plus the cross-entropy of
  a head on the new branch alone (PILOT's ``fe_fc``), plus ``lambda_okd`` x the distillation (temperature ``T``)
  of the old classes' logits from the frozen old head on the old branch. ``oofc`` "az" keeps the new classes'
  weights over the old features at zero; "ft" (PILOT's file) trains them.
- Compression: one network, the student (a copy of the old branch with a head whose old rows are the old
  head's), learns the boosted network, the teacher, by balanced distillation: the teacher's tempered softmax
  times the class weights (``beta2``), renormalised, as the target (PILOT's ``BKD``).

The student is the one network the next task starts from and the checkpoint holds. PILOT evaluates, and herds
the memory with, the teacher (``self._network`` until the next task starts), and logs the student's accuracy
apart ("darknet eval"); FOSTER's author names the student's the single-backbone result (ECCV22-FOSTER issue 6).
``evaluate`` chooses: "teacher" as PILOT, the student's accuracy reported beside it (``student_accuracy``), the
teacher kept until the next task starts; or "student", the teacher freed as soon as compression ends.

Departs from PILOT: a new class's weight counts its training images in the task. PILOT's ``samples_new_class``
returns 500 for ``dataset`` "cifar100" and otherwise ``data_manager.getlen``, which sums the positions of the
class's images (``np.sum(np.where(y == index))``) instead of counting them, so every new class weighs as one with
countless images; with CIFAR-100's 500 images per class both give the same weights (0.96 ** 500 < 1e-8).
"""
from __future__ import annotations

import copy
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, Optional

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from pilot.config import LearnerConfig
from pilot.data.stream import Split, Task
from pilot.errors import PilotError
from pilot.learners import register_learner
from pilot.learners._gradient import GradientLearner, TrainConfig, validate_train_config
from pilot.modules.distillation import kd_loss
from pilot.modules.heads import linear, linear_head

OOFC = ("ft", "az")  # PILOT's two treatments of the new classes' weights over the old features
EVALUATED = ("teacher", "student")
STAGES = ("init", "boosting", "compression")


@dataclass
class FosterConfig(LearnerConfig):
    """PILOT's exps/foster.json: SGD (momentum 0.9) with a cosine schedule in each of the three stages."""

    init_epochs: int = 20
    init_lr: float = 1e-3
    init_weight_decay: float = 5e-4
    boosting_epochs: int = 20
    compression_epochs: int = 20
    lr: float = 1e-3  # boosting's and compression's rate
    batch_size: int = 32
    weight_decay: float = 5e-4  # boosting's; compression has none, as in PILOT
    beta1: float = 0.96  # class-balanced weights of boosting's cross-entropy
    beta2: float = 0.97  # class-balanced weights of compression's distillation target
    oofc: str = "ft"  # "ft": new classes' weights over old features train; "az": they stay zero
    is_teacher_wa: bool = False  # weight-align the teacher's new rows after boosting
    is_student_wa: bool = False  # weight-align the student's new rows after compression
    lambda_okd: float = 1.0  # weight of boosting's distillation from the old head
    wa_value: float = 1.0  # weight alignment's factor: gamma * wa_value ** (old / new classes)
    T: float = 2.0
    # The network each task ends with, evaluated and herded on: "teacher" (PILOT's curve) or "student".
    evaluate: str = "teacher"


def class_balanced_weights(counts: Sequence[int], beta: float) -> torch.Tensor:
    """Per-class weights by the effective number of samples (Cui et al.), as PILOT's ``_train``:
    w_c = (1 - beta) / (1 - beta ** n_c), scaled so that they sum to the number of classes."""
    weights = (1.0 - beta) / (1.0 - np.power(beta, np.asarray(counts, dtype=np.float64)))
    return torch.tensor(weights / weights.sum() * len(counts), dtype=torch.float32)


def balanced_kd_loss(logits: torch.Tensor, teacher_logits: torch.Tensor, weights: torch.Tensor,
                     T: float) -> torch.Tensor:
    """PILOT's ``BKD``: softmax(teacher / T) times the class weights, each row renormalised, is the target of
    the student's log_softmax(logits / T); summed over classes, averaged over the batch (no T ** 2)."""
    target = F.softmax(teacher_logits / T, dim=1) * weights
    target = target / target.sum(1, keepdim=True)
    return -(target * F.log_softmax(logits / T, dim=1)).sum() / logits.shape[0]


def weight_align(head: nn.Linear, num_old: int, value: float) -> None:
    """FOSTERNet's ``weight_align``: scale the new classes' rows by mean old row norm / mean new row norm,
    times ``value ** (old classes / new classes)`` (the bias is left as it is)."""
    weight = head.weight.data
    num_new = weight.shape[0] - num_old
    gamma = weight[:num_old].norm(dim=1).mean() / weight[num_old:].norm(dim=1).mean() * value ** (num_old / num_new)
    weight[num_old:] *= gamma


def single_logits(network: nn.ModuleDict, images: torch.Tensor) -> torch.Tensor:
    return network["fc"](network["backbone"](images))


def boosted_features(teacher: nn.ModuleDict, images: torch.Tensor) -> torch.Tensor:
    """FOSTERNet's features: the old branch's, then the new branch's."""
    return torch.cat([teacher["old"](images), teacher["new"](images)], dim=1)


@register_learner("foster")
class Foster(GradientLearner):
    config_class = FosterConfig
    scenarios = ("class", "task")
    domain_refusal = "its memory keeps each class's exemplars from the domain that brought the class"
    uses_memory = True
    mask_old_classes = False

    def __init__(self, config: FosterConfig, ctx):
        super().__init__(config, ctx)
        # The single network: the first task's, then each compression's student.
        self.net["backbone"] = ctx.backbone.requires_grad_(True)
        self.net["fc"] = linear(ctx.backbone.feature_dim, 0)
        self.net.to(ctx.device)
        self.teacher: Optional[nn.ModuleDict] = None  # the boosted network (both branches), while it is needed
        self.student: Optional[nn.ModuleDict] = None  # while compression trains it
        self.stage = "init"
        self.num_old = 0
        self.weights = torch.ones(0)  # the current stage's class-balanced weights
        self.report: dict[str, Any] = {}

    @classmethod
    def validate_config(cls, config: FosterConfig) -> None:
        for stage in STAGES:
            validate_train_config(cls.stage_settings(config, stage), f"the {stage} stage")
        for key in ("beta1", "beta2"):
            if not 0 <= getattr(config, key) < 1:
                raise PilotError(f"{key} (the class-balancing factor) must be in [0, 1), got {getattr(config, key)}; "
                                 f"PILOT's foster.json uses beta1 0.96, beta2 0.97.")
        if config.oofc.lower() not in OOFC:
            raise PilotError(f"oofc must be 'ft' (new classes' weights over the old features train, PILOT's file) or "
                             f"'az' (they stay zero), got '{config.oofc}'.")
        if config.evaluate not in EVALUATED:
            raise PilotError(f"evaluate must be 'teacher' (the boosted network, PILOT's curve) or 'student' (the "
                             f"compressed single network), got '{config.evaluate}'.")
        if config.T <= 0 or config.wa_value <= 0:
            raise PilotError(f"T (the distillation temperature) and wa_value must be above 0, got T {config.T}, "
                             f"wa_value {config.wa_value}.")

    @staticmethod
    def stage_settings(config: FosterConfig, stage: str) -> TrainConfig:
        """PILOT's optimiser and schedule of a stage: SGD (momentum 0.9), cosine annealing over the stage's epochs."""
        first = stage == "init"
        return TrainConfig(
            tuned_epoch={"init": config.init_epochs, "boosting": config.boosting_epochs,
                         "compression": config.compression_epochs}[stage],
            init_lr=config.init_lr if first else config.lr, batch_size=config.batch_size, optimizer="sgd",
            scheduler="cosine",
            weight_decay={"init": config.init_weight_decay, "boosting": config.weight_decay, "compression": 0.0}[stage])

    # --- the two stages ----------------------------------------------------------------------

    def fit(self, task: Task) -> None:
        self.num_seen, self.num_old = task.num_seen, task.num_old
        self.keep_one_network()
        if task.num_old == 0:
            self.net["fc"] = linear_head(self.ctx.backbone.feature_dim, task.num_seen, "kaiming").to(self.ctx.device)
            self.train_stage(task, "init", list(self.net.parameters()))
            return
        teacher = self.boosted_network(task.num_seen)
        self.teacher = teacher
        self.weights = self.class_weights(task, self.config.beta1)
        if self.config.oofc.lower() == "az":
            teacher["fc"].weight.data[task.num_old:, : self.ctx.backbone.feature_dim] = 0.0
        self.train_stage(task, "boosting", [p for name in ("new", "fc", "fe_fc") for p in teacher[name].parameters()])
        if self.config.is_teacher_wa:
            weight_align(teacher["fc"], task.num_old, self.config.wa_value)
        self.student = self.compressed_network(teacher, task.num_seen)
        self.weights = self.class_weights(task, self.config.beta2)
        self.train_stage(task, "compression", list(self.student.parameters()))
        if self.config.is_student_wa:
            weight_align(self.student["fc"], task.num_old, self.config.wa_value)
        self.net, self.student = self.student, None
        if self.config.evaluate == "student":
            self.keep_one_network()

    def keep_one_network(self) -> None:
        """Free the teacher, and move the student's backbone into the run's (the teacher's old branch until now),
        so that one backbone is left."""
        self.teacher = None
        if self.net["backbone"] is not self.ctx.backbone:
            self.ctx.backbone.load_state_dict(self.net["backbone"].state_dict())
            self.net["backbone"] = self.ctx.backbone

    def train_stage(self, task: Task, stage: str, parameters: list[nn.Parameter]) -> None:
        self.stage = stage
        self.task_tag = f"{self.name}: task {task.index + 1} ({stage})"
        settings = self.stage_settings(self.config, stage)
        if settings.tuned_epoch:
            self.train_epochs(task, parameters, settings)

    def boosted_network(self, num_seen: int) -> nn.ModuleDict:
        """FOSTERNet's ``update_fc``: the old branch and head frozen, a new branch copied from the old one, a head
        over both branches (the old head's weights in its old rows and old columns) and one over the new branch."""
        dim = self.ctx.backbone.feature_dim
        old, old_fc = self.net["backbone"].requires_grad_(False), self.net["fc"].requires_grad_(False)
        fc = linear_head(2 * dim, num_seen, "kaiming")
        fc.weight.data[: old_fc.out_features, :dim] = old_fc.weight.data
        fc.bias.data[: old_fc.out_features] = old_fc.bias.data
        return nn.ModuleDict({"old": old, "new": copy.deepcopy(old).requires_grad_(True), "fc": fc,
                              "fe_fc": linear_head(dim, num_seen, "kaiming"), "old_fc": old_fc}).to(self.ctx.device)

    def compressed_network(self, teacher: nn.ModuleDict, num_seen: int) -> nn.ModuleDict:
        """PILOT's ``_snet``: the teacher's old branch copied, a head whose old rows are the old head's."""
        fc = linear_head(self.ctx.backbone.feature_dim, num_seen, "kaiming")
        fc.weight.data[: self.num_old] = teacher["old_fc"].weight.data
        fc.bias.data[: self.num_old] = teacher["old_fc"].bias.data
        return nn.ModuleDict({"backbone": copy.deepcopy(teacher["old"]).requires_grad_(True),
                              "fc": fc}).to(self.ctx.device)

    def class_weights(self, task: Task, beta: float) -> torch.Tensor:
        """Class-balanced weights of the classes seen: each old class by its exemplars in the memory (PILOT's
        ``samples_old_class``, the per-class budget), each new class by its training images."""
        held = self.ctx.memory.counts()
        new = np.bincount(task.train.labels, minlength=task.num_seen)[task.num_old:]
        counts = [held.get(c, 0) for c in range(task.num_old)] + new.tolist()
        empty = [c for c, n in enumerate(counts) if n == 0]
        if empty:
            raise PilotError(f"foster: task {task.index + 1}: class {empty[0]} has no training image or exemplar, so "
                             f"its class-balanced weight is undefined. Raise memory_per_class or memory_size.")
        return class_balanced_weights(counts, beta).to(self.ctx.device)

    # --- the template's hooks ------------------------------------------------------------------

    def train_outputs(self, images: torch.Tensor, labels: torch.Tensor, task: Task):
        config = self.config
        if self.stage == "compression":
            logits = single_logits(self.student, images)
            with torch.no_grad():
                teacher_logits = self.teacher["fc"](boosted_features(self.teacher, images))
            return logits, balanced_kd_loss(logits.float(), teacher_logits.float(), self.weights, config.T)
        if self.stage == "boosting":
            teacher = self.teacher
            with torch.no_grad():
                old_features = teacher["old"](images)
                old_logits = teacher["old_fc"](old_features)
            new_features = teacher["new"](images)
            logits = teacher["fc"](torch.cat([old_features, new_features], dim=1))
            fe_loss = F.cross_entropy(teacher["fe_fc"](new_features).float(), labels)
            distillation = kd_loss(logits[:, : task.num_old].float(), old_logits.float(), config.T)
            return logits, fe_loss + config.lambda_okd * distillation
        return single_logits(self.net, images), 0.0

    def training_loss(self, logits: torch.Tensor, labels: torch.Tensor, task: Task) -> torch.Tensor:
        if self.stage == "compression":
            return logits.new_zeros(())  # the student learns by distillation alone: train_outputs' term
        if self.stage == "boosting":
            return F.cross_entropy(logits / self.weights, labels)  # PILOT divides the logits by the weights
        return F.cross_entropy(logits, labels)

    def before_step(self, task: Task) -> None:
        if self.stage == "boosting" and self.config.oofc.lower() == "az":
            self.teacher["fc"].weight.grad[task.num_old:, : self.ctx.backbone.feature_dim] = 0.0

    def set_train_mode(self, training: bool) -> None:
        for network in (self.net, self.teacher, self.student):
            if network is not None:
                network.eval()
        if not training:
            return
        if self.stage == "init":
            self.net.train()
        elif self.stage == "boosting":
            self.teacher.train()
            self.teacher["old"].eval()
        else:
            self.student.train()

    # --- evaluation and the memory -----------------------------------------------------------

    def eval_logits(self, images: torch.Tensor, queries: Optional[torch.Tensor]) -> torch.Tensor:
        if self.teacher is not None:
            return self.teacher["fc"](boosted_features(self.teacher, images))
        return single_logits(self.net, images)

    def memory_features(self, split: Split) -> torch.Tensor:
        """PILOT herds on the features of the network it evaluates (the teacher's: both branches')."""
        self.set_train_mode(False)
        if self.teacher is not None:
            return self.ctx.encode(lambda images: boosted_features(self.teacher, images), split)
        return self.ctx.encode(self.net["backbone"], split)

    def predict_tasks(self, splits: list[Split]) -> list[torch.Tensor]:
        logits = [self.predict(split) for split in splits]
        self.report = {}
        if self.teacher is not None:  # PILOT's "darknet eval": the student's accuracy beside the teacher's
            hits = sum(int((self.ctx.encode(lambda images: single_logits(self.net, images), split).argmax(1)
                            == torch.from_numpy(split.labels)).sum()) for split in splits)
            self.report = {"student_accuracy": 100.0 * hits / sum(len(split) for split in splits)}
        return logits

    def evaluation_report(self) -> dict[str, Any]:
        return self.report

    def load_state_dict(self, state):
        self.net["fc"] = linear(self.ctx.backbone.feature_dim, state["num_seen"]).to(self.ctx.device)
        super().load_state_dict(state)
