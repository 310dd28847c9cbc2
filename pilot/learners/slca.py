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
Defaults and key names: PILOT's exps/slca.json.
"""
from __future__ import annotations

import copy
from dataclasses import dataclass, field
from typing import Optional

import torch
import torch.nn.functional as F
from torch import nn

from pilot.config import LearnerConfig
from pilot.data.stream import Split, Task
from pilot.errors import PilotError
from pilot.learners import register_learner
from pilot.training import GradientLearner, make_optimizer

CA_SAMPLES_PER_CLASS = 256  # official num_sampled_pcls, also CA's batch size
COVARIANCE_RIDGE = 1e-4  # added to each class covariance (official), keeps it positive definite


@dataclass
class SLCAConfig(LearnerConfig):
    """PILOT's SLCA keys. The training template reads them under its own names (below)."""

    batch_size: int = 64
    epochs: int = 20
    lrate: float = 0.01
    weight_decay: float = 5e-4
    milestones: list[int] = field(default_factory=lambda: [18])
    lrate_decay: float = 0.1
    # Backbone learning rate = lrate * bcb_lrscale (PILOT's default when the key is absent); 0 freezes it.
    bcb_lrscale: float = 0.01
    ca_epochs: int = 3
    # Temperature of CA's logit normalisation; 0 trains CA on raw logits.
    ca_with_logit_norm: float = 0.1

    # Fixed by SLCA's code, not keys: SGD with momentum, step decay at the milestones, no clipping.
    optimizer = "sgd"
    scheduler = "steplr"
    momentum = 0.9
    clip_grad = 0.0

    @property
    def tuned_epoch(self) -> int:
        return self.epochs

    @property
    def init_lr(self) -> float:
        return self.lrate

    @property
    def lr_decay(self) -> float:
        return self.lrate_decay


def task_heads(feature_dim: int, task_sizes: list[int]) -> nn.ModuleList:
    """One linear head per task, initialised as SLCA's SimpleContinualLinear (truncated normal std 0.02, zero bias)."""
    heads = nn.ModuleList(nn.Linear(feature_dim, size) for size in task_sizes)
    for head in heads:
        nn.init.trunc_normal_(head.weight, std=0.02)
        nn.init.zeros_(head.bias)
    return heads


def classify(heads: nn.ModuleList, features: torch.Tensor) -> torch.Tensor:
    """Logits over the classes of ``heads``' tasks, in class order."""
    return torch.cat([head(features) for head in heads], dim=1)


def normalise_logits(logits: torch.Tensor, tasks: list[Task], temperature: float) -> torch.Tensor:
    """SLCA's CA logit normalisation: logits / (mean over tasks of each task's logit L2 norm) / temperature."""
    norms = torch.stack([logits[:, t.classes.start:t.classes.stop].norm(dim=1) + 1e-7 for t in tasks], dim=1)
    return logits / norms.mean(dim=1, keepdim=True) / temperature


@register_learner("slca")
class SLCA(GradientLearner):
    config_class = SLCAConfig

    def __init__(self, config: SLCAConfig, ctx):
        super().__init__(config, ctx)
        dim = ctx.backbone.feature_dim
        self.net["backbone"] = ctx.backbone  # fine-tuned, so checkpointed with the heads
        self.net["heads"] = task_heads(dim, ctx.stream.sizes)  # trained on images, task by task
        self.net["aligned_heads"] = copy.deepcopy(self.net["heads"])  # after CA; these predict
        self.net.to(ctx.device)
        ctx.backbone.requires_grad_(config.bcb_lrscale > 0)
        self.class_means = torch.zeros(0, dim)
        self.class_covs = torch.zeros(0, dim, dim)

    @classmethod
    def validate_config(cls, config: SLCAConfig) -> None:
        if config.epochs < 0 or config.ca_epochs < 0 or config.batch_size < 1 or config.lrate <= 0:
            raise PilotError("epochs and ca_epochs must be >= 0, batch_size >= 1 and lrate > 0.")
        if config.bcb_lrscale < 0 or config.ca_with_logit_norm < 0:
            raise PilotError("bcb_lrscale and ca_with_logit_norm must be >= 0 (0 freezes the backbone / turns "
                             "logit normalisation off).")
        late = [m for m in config.milestones if m >= config.epochs]
        if late:
            raise PilotError(f"milestones {late} are at or past the last epoch ({config.epochs} epochs): they "
                             f"would never apply. Use milestones below epochs.")

    # --- the tasks and heads seen so far -------------------------------------------------------

    @property
    def seen_tasks(self) -> list[Task]:
        return [task for task in self.ctx.stream.tasks if task.num_seen <= self.num_seen]

    def seen_heads(self, heads: nn.ModuleList) -> nn.ModuleList:
        return heads[: len(self.seen_tasks)]

    # --- stage 1: slow backbone, fast new head ---------------------------------------------------

    def trainable(self) -> list[nn.Parameter]:
        new_head = self.seen_heads(self.net["heads"])[-1]
        return list(self.ctx.backbone.parameters()) + list(new_head.parameters())

    def param_groups(self, parameters: list[nn.Parameter]) -> list[dict]:
        """The backbone at ``lrate * bcb_lrscale``, the head at ``lrate`` (weight decay on both, as official)."""
        in_backbone = {id(p) for p in self.ctx.backbone.parameters()}
        slow = [p for p in parameters if id(p) in in_backbone]
        fast = [p for p in parameters if id(p) not in in_backbone]
        groups = [{"params": fast, "lr": self.config.lrate}]
        if slow:
            groups.insert(0, {"params": slow, "lr": self.config.lrate * self.config.bcb_lrscale})
        return groups

    def make_optimizer(self, parameters: list[nn.Parameter]) -> torch.optim.Optimizer:
        return make_optimizer(self.param_groups(parameters), self.config)

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

    @torch.no_grad()
    def encode(self, split: Split) -> tuple[torch.Tensor, torch.Tensor]:
        """Current-backbone features of ``split`` (test transform, eval mode) and their labels, on the CPU."""
        self.set_train_mode(False)
        chunks = []
        for images, _, _ in self.ctx.eval_loader(split):
            with self.ctx.autocast():
                chunks.append(self.ctx.backbone(images.to(self.ctx.device)).float().cpu())
        return torch.cat(chunks), torch.as_tensor(split.labels)

    def add_class_statistics(self, task: Task) -> None:
        """Mean and covariance (+ ridge) of each new class's training features; old classes keep theirs."""
        features, labels = self.encode(task.train)
        means, covs = [], []
        for label in task.classes:
            rows = features[labels == label].double()
            if len(rows) < 2:
                raise PilotError(f"SLCA models each class as a Gaussian and needs at least 2 training images per "
                                 f"class; class {label} has {len(rows)} (raise train_per_class).")
            means.append(rows.mean(0))
            covs.append(torch.cov(rows.T) + COVARIANCE_RIDGE * torch.eye(rows.shape[1], dtype=torch.float64))
        self.class_means = torch.cat([self.class_means, torch.stack(means).float()])
        self.class_covs = torch.cat([self.class_covs, torch.stack(covs).float()])

    def mean_scales(self) -> torch.Tensor:
        """Official CA shrinks the sampling mean of a class of task j, at task t, by 0.9 + 0.1 (j + 1) / (t + 1).

        The official code finds j as ``class // current task size``; this uses the class's actual task,
        which is the same when all tasks have the same size.
        """
        tasks = self.seen_tasks
        return torch.cat([torch.full((len(t.classes),), 0.9 + 0.1 * (t.index + 1) / len(tasks)) for t in tasks])

    def sample_features(self, cholesky_factors: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """256 features per seen class from its Gaussian (run's generator), shuffled, with their labels.

        ``cholesky_factors`` [classes, D, D] of the covariances: x = scaled mean + L z, z ~ N(0, I), which is
        what the official ``MultivariateNormal(mean, cov).sample()`` draws.
        """
        generator = self.ctx.generator
        num_classes, dim = self.class_means.shape
        noise = torch.randn(num_classes, CA_SAMPLES_PER_CLASS, dim, generator=generator).to(cholesky_factors.device)
        means = (self.class_means * self.mean_scales()[:, None]).to(cholesky_factors.device)
        samples = means[:, None, :] + noise @ cholesky_factors.transpose(1, 2)
        labels = torch.arange(num_classes).repeat_interleave(CA_SAMPLES_PER_CLASS)
        order = torch.randperm(len(labels), generator=generator)
        return samples.flatten(0, 1)[order], labels[order]

    def align_classifier(self) -> None:
        """Re-train all seen aligned heads on sampled features: SGD at ``lrate``, cosine schedule over ``ca_epochs``."""
        config, device = self.config, self.ctx.device
        heads = self.seen_heads(self.net["aligned_heads"])
        optimizer = make_optimizer(list(heads.parameters()), config)
        scheduler = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=config.ca_epochs)
        cholesky_factors = torch.linalg.cholesky(self.class_covs.to(device, torch.float64)).float()
        for _ in range(config.ca_epochs):
            features, labels = self.sample_features(cholesky_factors)
            for batch, targets in zip(features.split(CA_SAMPLES_PER_CLASS), labels.split(CA_SAMPLES_PER_CLASS)):
                logits = classify(heads, batch)
                if config.ca_with_logit_norm > 0:
                    logits = normalise_logits(logits, self.seen_tasks, config.ca_with_logit_norm)
                loss = F.cross_entropy(logits, targets.to(device))
                optimizer.zero_grad(set_to_none=True)
                loss.backward()
                optimizer.step()
            scheduler.step()

    # --- checkpoint --------------------------------------------------------------------------------

    def state_dict(self):
        return {**super().state_dict(), "class_means": self.class_means, "class_covs": self.class_covs}

    def load_state_dict(self, state):
        super().load_state_dict(state)
        self.class_means, self.class_covs = state["class_means"], state["class_covs"]
