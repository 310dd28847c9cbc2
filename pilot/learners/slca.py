"""SLCA (Zhang et al., ICCV 2023): Slow Learner with Classifier Alignment.

Each task fine-tunes the whole backbone at ``bcb_lrscale`` (1/100) times the learning rate of the
task's own new linear head, with the logits of other tasks' classes masked. Then the features of
the task's classes (current backbone, test transform, training images) are summarised per class
by a Gaussian; earlier classes keep the statistics computed when they were learnt. From the second
task on, "classifier alignment" (CA) re-trains every seen head on 256 features per class sampled
from those Gaussians, with logit normalisation.

As in the official code (GengDavid/SLCA, and PILOT's models/slca.py), the aligned heads only
predict: the next task trains from the heads as they were before alignment (the official
``fc.backup()`` before CA, ``fc.recall()`` after evaluation), and each CA starts from those.
Defaults and key names: PILOT's exps/slca.json (``epochs``, ``lrate``, ``lrate_decay`` are the
template's ``tuned_epoch``, ``init_lr``, ``lr_decay``; either name works).
"""
from __future__ import annotations

import copy
from dataclasses import dataclass, field
from typing import Optional

import torch
from torch import nn

from pilot.data.stream import Split, Task
from pilot.errors import PilotError, config_values
from pilot.learners import register_learner
from pilot.learners._alignment import fit_on_gaussian_samples
from pilot.learners._gradient import GradientLearner, TrainConfig, make_optimizer, validate_train_config
from pilot.modules.gaussians import ClassGaussians
from pilot.modules.heads import classify, normalise_logits, task_heads

CA_SAMPLES_PER_CLASS = 256  # official num_sampled_pcls, also CA's batch size


@dataclass
class SLCAConfig(TrainConfig):
    """PILOT's exps/slca.json; SGD with momentum and step decay at the milestones, as SLCA's code."""

    tuned_epoch: int = 20
    init_lr: float = 0.01
    batch_size: int = 64
    weight_decay: float = 5e-4
    optimizer: str = "sgd"
    scheduler: str = "steplr"
    milestones: list[int] = field(default_factory=lambda: [18])
    lr_decay: float = 0.1
    # Backbone learning rate = init_lr * bcb_lrscale (PILOT's default when the key is absent); 0 freezes it.
    bcb_lrscale: float = 0.01
    ca_epochs: int = 3
    # Temperature of CA's logit normalisation; 0 trains CA on raw logits.
    ca_with_logit_norm: float = 0.1


@register_learner("slca")
class SLCA(GradientLearner):
    config_class = SLCAConfig
    min_train_per_class = 2  # each class's Gaussian (also CoFiMA's)
    official_variant = "slca"  # ColorJitter, bicubic crops, CIFAR-100 mean/std (also CoFiMA's)

    def __init__(self, config: SLCAConfig, ctx):
        super().__init__(config, ctx)
        dim = ctx.backbone.feature_dim
        self.net["backbone"] = ctx.backbone  # fine-tuned, so checkpointed with the heads
        self.net["heads"] = task_heads(dim, ctx.protocol.task_sizes)  # trained on images, task by task
        self.net["aligned_heads"] = copy.deepcopy(self.net["heads"])  # after CA; these predict
        self.net.to(ctx.device)
        ctx.backbone.requires_grad_(config.bcb_lrscale > 0)
        self.gaussians = ClassGaussians(dim)

    @classmethod
    def validate_config(cls, config: SLCAConfig) -> None:
        validate_train_config(config)
        if config.ca_epochs < 0 or config.bcb_lrscale < 0 or config.ca_with_logit_norm < 0:
            raise PilotError("ca_epochs, bcb_lrscale and ca_with_logit_norm must be >= 0 (0: no alignment / a frozen "
                             "backbone / no logit normalisation).")

    def seen_heads(self, heads: nn.ModuleList) -> nn.ModuleList:
        return heads[: len(self.ctx.protocol.tasks_within(self.num_seen))]

    # --- stage 1: slow backbone, fast new head ---------------------------------------------------

    def trainable(self) -> list[nn.Parameter]:
        new_head = self.seen_heads(self.net["heads"])[-1]
        return list(self.ctx.backbone.parameters()) + list(new_head.parameters())

    def param_groups(self, parameters: list[nn.Parameter]) -> list[dict]:
        """The backbone at ``init_lr * bcb_lrscale``, the head at ``init_lr`` (weight decay on both, as official)."""
        in_backbone = {id(p) for p in self.ctx.backbone.parameters()}
        slow = [p for p in parameters if id(p) in in_backbone]
        fast = [p for p in parameters if id(p) not in in_backbone]
        groups = [{"params": fast, "lr": self.config.init_lr}]
        if slow:
            groups.insert(0, {"params": slow, "lr": self.config.init_lr * self.config.bcb_lrscale})
        return groups

    def set_train_mode(self, training: bool) -> None:
        self.ctx.backbone.train(training)

    def train_outputs(self, images: torch.Tensor, labels: torch.Tensor, task: Task):
        logits = classify(self.seen_heads(self.net["heads"]), self.ctx.backbone(images))
        return logits, torch.zeros((), device=logits.device)

    def eval_logits(self, images: torch.Tensor, queries: Optional[torch.Tensor]) -> torch.Tensor:
        return classify(self.seen_heads(self.net["aligned_heads"]), self.ctx.backbone(images))

    # --- after training: statistics, then classifier alignment -----------------------------------

    def end_task(self, task: Task) -> None:
        self.start_alignment(task)
        self.add_class_statistics(task)
        if task.index > 0 and self.config.ca_epochs > 0:
            self.align_classifier()

    def start_alignment(self, task: Task) -> None:
        """The heads CA starts from (and that predict if there is no CA): the trained ones."""
        self.net["aligned_heads"].load_state_dict(self.net["heads"].state_dict())

    def encode(self, split: Split) -> tuple[torch.Tensor, torch.Tensor]:
        """Current-backbone features of ``split`` (test transform, eval mode) and their labels, on the CPU."""
        self.set_train_mode(False)
        return self.ctx.encode(self.ctx.backbone, split), torch.as_tensor(split.labels)

    def add_class_statistics(self, task: Task) -> None:
        """A Gaussian per new class from its training features; old classes keep theirs."""
        with config_values("train_per_class"):
            self.gaussians.add_classes(*self.encode(task.train), task.classes)

    def mean_scales(self) -> torch.Tensor:
        """Official CA shrinks the sampling mean of a class of task j, at task t, by 0.9 + 0.1 (j + 1) / (t + 1).

        The official code finds j as ``class // current task size``; this uses the class's actual task,
        which is the same when all tasks have the same size.
        """
        protocol = self.ctx.protocol
        tasks = protocol.task_of(torch.arange(self.num_seen)).double()
        return (0.9 + 0.1 * (tasks + 1) / len(protocol.tasks_within(self.num_seen))).float()

    def align_classifier(self) -> None:
        """Re-train all seen aligned heads on 256 features per class (shrunken means): the config's optimiser
        at ``init_lr``, cosine schedule over ``ca_epochs``, logits normalised if ``ca_with_logit_norm``."""
        config, seen_tasks = self.config, self.ctx.protocol.tasks_within(self.num_seen)
        heads = self.seen_heads(self.net["aligned_heads"])

        def logits(features: torch.Tensor) -> torch.Tensor:
            raw = classify(heads, features)
            if config.ca_with_logit_norm > 0:
                return normalise_logits(raw, seen_tasks, config.ca_with_logit_norm)
            return raw

        optimizer = make_optimizer(list(heads.parameters()), config)
        fit_on_gaussian_samples(logits, optimizer, self.gaussians, self.ctx.generator, self.ctx.device,
                                epochs=config.ca_epochs, samples=CA_SAMPLES_PER_CLASS, mean_scales=self.mean_scales(),
                                where=f"{self.task_tag}, classifier alignment")

    # --- checkpoint --------------------------------------------------------------------------------

    def state_dict(self):
        return {**super().state_dict(), "gaussians": self.gaussians.state_dict()}

    def load_state_dict(self, state):
        super().load_state_dict(state)
        self.gaussians.load_state_dict(state["gaussians"])
