"""RAPF (Huang et al., ECCV 2024): adaptive representation adjustment and parameter fusion over a frozen CLIP,
as its official code does it (linlany/RAPF@81d41df, ``main.py run_class_incremental``,
``continual_clip/models.py ClassIncrementalCLIP``; defaults of ``configs/class/cifar100_10-10.yaml``).

CLIP stays frozen; one bias-free ``d×d`` linear adapter ``A`` (torch's default init) acts on the image
features. With ``s = exp(logit_scale)`` and ``t_c`` the normalised text feature of class ``c``::

    logits(f) = s · norm(A f) · tᵀ                      (over every class seen so far)
    loss = CE(logits([f; g]), [y; y_g]) + mean relu(0.1 − norm(A e)·t_o + norm(A e)·t_n)

``f``: a batch of the task's frozen image features; ``g``: pseudo-features of old classes, ``int(10·beta)``
draws from each of ``pseudo_classes_per_batch`` old classes' Gaussians per batch (the classes taken in turn
from an order of the old classes shuffled each epoch, ``list_for_one_batch``); ``e``: ``int(20·beta)`` draws
of old class ``o``'s Gaussian for every hard pair ``(o, n)``, a new class ``n`` whose text feature lies within
``threshold`` (Euclidean distance of normalised features) of old class ``o``'s (``adaptation``). The Gaussians
are the mean and covariance (+1e-4·I) of each class's frozen image features, taken after its task
(``analyze_mean_cov``; optionally shrunk as ``shrink_cov`` before sampling, ``shrinkage``). Adam, MultiStepLR
per epoch. After each task but the first, parameter fusion (``mix_matrix``): with ``W_old = U S Vᵀ``,
``P = Uᵀ W_new``, ``M = min(|P − S Vᵀ| / max|P − S Vᵀ| + mix_bias, 1)``, ``W = U (M ⊙ P + (1 − M) ⊙ S Vᵀ)``.

Departures: the official transform is CLIP's preprocessing for training and test alike (no augmentation), so
training reads the frozen image features from the run's cache (the same values up to the run's precision: the
code's CLIP runs in fp16 on a GPU, statistics included; here float32, statistics in float64); every draw
(batch order, class order, pseudo-features) comes from the run's generator, so a resumed run equals an
uninterrupted one; the class order is the run's (seed-shuffled), not Continual-CLIP's fixed list. The
pseudo-feature counts are tied to the batch size as in the code (its configs warn of this).
"""
from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import nn
from torch.nn import functional as F

from pilot.clip import class_embeddings, require_text, zero_shot_logits
from pilot.data.stream import Split, Task
from pilot.errors import PilotError
from pilot.learners import register_learner
from pilot.learners._base import Learner, require_finite
from pilot.learners._gradient import TrainConfig, descend, make_optimizer, make_scheduler, validate_train_config
from pilot.modules.gaussians import ClassGaussians, shrink_covariance

HINGE_MARGIN = 0.1  # the code's ``+ 0.1`` in loss_hinge


@dataclass
class RAPFConfig(TrainConfig):
    """``configs/class/cifar100_10-10.yaml`` (CIFAR-100 B0 Inc10)."""

    tuned_epoch: int = 15  # cfg epochs
    init_lr: float = 0.001  # cfg lr
    batch_size: int = 100  # cfg train_batch_size
    weight_decay: float = 0.0  # Adam(weight_decay=0.0000)
    optimizer: str = "adam"
    scheduler: str = "steplr"  # MultiStepLR(milestones, gamma=0.1), stepped per epoch
    milestones: list[int] = field(default_factory=lambda: [4, 10])
    lr_decay: float = 0.1
    beta: float = 2.0  # pseudo-features per batch: int(10·beta) per old class, int(20·beta) per hard pair
    mix_bias: float = 0.6  # added to the normalised difference that weighs the new adapter in the fusion
    threshold: float = 0.55  # text-feature distance under which a new class is "hard" for an old one
    shrinkage: bool = False  # shrink each covariance (diag and off-diagonal means added) before sampling
    # Old classes sampled per batch: the code's list_for_one_batch (2 for CIFAR-100 Inc10; 4 for Inc5,
    # 5 for ImageNet-R, 10 for CUB), chosen so that an epoch visits every old class.
    pseudo_classes_per_batch: int = 2


def fuse_adapter(old: torch.Tensor, new: torch.Tensor, mix_bias: float) -> torch.Tensor:
    """``mix_matrix``: the new weight mixed with the old one, element-wise in the old weight's left singular basis."""
    u, s, vh = torch.linalg.svd(old)
    projected, kept = u.T @ new, torch.diag(s) @ vh
    distance = (projected - kept).abs()
    mask = (distance / distance.max() + mix_bias).clamp(max=1)
    return u @ (mask * projected + (1 - mask) * kept)


def hard_pairs(text: torch.Tensor, num_old: int, threshold: float) -> torch.Tensor:
    """``adaptation``: (old class, new class) pairs whose normalised text features ``text`` [C, D] lie closer
    than ``threshold`` (Euclidean), old classes in order, then new ones; ``[pairs, 2]``."""
    distances = torch.cdist(text[:num_old].float(), text[num_old:].float())  # [old, new]
    pairs = torch.nonzero(distances < threshold)
    return pairs + torch.tensor([0, num_old], device=pairs.device)


def hinge_loss(features: torch.Tensor, own_text: torch.Tensor, near_text: torch.Tensor) -> torch.Tensor:
    """``loss_hinge``: normalised adapted features of old-class samples kept ``HINGE_MARGIN`` closer (dot product)
    to their own class's text than to the hard new class's."""
    features = F.normalize(features, dim=-1)
    return F.relu(HINGE_MARGIN - (features * own_text).sum(-1) + (features * near_text).sum(-1)).mean()


def pseudo_classes(order: torch.Tensor, batch: int, per_batch: int) -> torch.Tensor:
    """``list_for_one_batch``: the old classes batch ``batch`` samples, taken in turn from this epoch's ``order``."""
    return order[(batch * per_batch + torch.arange(per_batch)) % len(order)]


@register_learner("rapf")
class RAPF(Learner):
    """RAPF: a linear adapter on frozen CLIP image features, Gaussian pseudo-features, hinge on hard classes, SVD fusion."""

    config_class = RAPFConfig
    needs_text = True
    scenarios = ("class", "task")  # the text classifier grows with each task's new classes
    min_train_per_class = 2  # each class's covariance

    def __init__(self, config: RAPFConfig, ctx):
        super().__init__(config, ctx)
        self.text = require_text(ctx, self.name)
        dim = ctx.backbone.feature_dim
        self.adapter = nn.Linear(dim, dim, bias=False).to(ctx.device)
        self.gaussians = ClassGaussians(dim)

    @classmethod
    def validate_config(cls, config: RAPFConfig) -> None:
        validate_train_config(config)
        if int(10 * config.beta) < 1:
            raise PilotError(f"beta must be at least 0.1 (int(10·beta) pseudo-features per old class), got {config.beta}.")
        if config.pseudo_classes_per_batch < 1:
            raise PilotError(f"pseudo_classes_per_batch must be at least 1, got {config.pseudo_classes_per_batch}.")
        if not 0 <= config.mix_bias <= 1 or config.threshold < 0:
            raise PilotError(f"mix_bias must be in [0, 1] and threshold >= 0, got {config.mix_bias} and {config.threshold}.")

    def class_text(self) -> torch.Tensor:
        """Normalised text features of the seen classes ``[C, D]`` (one template, as the code: its normalised feature)."""
        return class_embeddings(self.text(self.ctx.class_names, self.ctx.templates)).to(self.ctx.device)

    def logits(self, features: torch.Tensor, text: torch.Tensor) -> torch.Tensor:
        return zero_shot_logits(self.adapter(features), text, self.text.tower.logit_scale.to(features.device))

    def sampling_factors(self) -> torch.Tensor:
        """Cholesky factors of the old classes' covariances (shrunk first where ``shrinkage``)."""
        if not self.config.shrinkage:
            return self.gaussians.cholesky_factors(self.ctx.device)
        shrunk = torch.stack([shrink_covariance(cov.double(), 1.0, 1.0) for cov in self.gaussians.covs])
        return torch.linalg.cholesky(shrunk.to(self.ctx.device)).float()

    def draw(self, factors: torch.Tensor, classes: torch.Tensor, per_class: int) -> tuple[torch.Tensor, torch.Tensor]:
        """``sample``: ``per_class`` draws ``mean + L z`` of each of ``classes``' Gaussians, class by class."""
        noise = torch.randn(len(classes), per_class, factors.shape[-1], generator=self.ctx.generator).to(factors.device)
        means = self.gaussians.means[classes.cpu()].to(factors.device)
        samples = means[:, None] + noise @ factors[classes].transpose(1, 2)
        return samples.flatten(0, 1), classes.to(factors.device).repeat_interleave(per_class)

    def fit(self, task: Task) -> None:
        ctx, config = self.ctx, self.config
        device, num_old = ctx.device, task.classes.start
        text = self.class_text()
        pairs = hard_pairs(text, num_old, config.threshold) if num_old else torch.zeros(0, 2, dtype=torch.long)
        factors = self.sampling_factors() if num_old else None
        old_weight = self.adapter.weight.detach().clone()  # ``old_adapter``: the fused adapter of the tasks before
        features = ctx.features(task.train).to(device)
        labels = torch.as_tensor(task.train.labels, device=device)
        optimizer = make_optimizer(list(self.adapter.parameters()), config)
        scheduler = make_scheduler(optimizer, config)
        for epoch in range(config.tuned_epoch):
            classes = torch.randperm(num_old, generator=ctx.generator) if num_old else None
            order = torch.randperm(len(labels), generator=ctx.generator).to(device)
            for step, batch in enumerate(order.split(config.batch_size)):
                inputs, targets = features[batch], labels[batch]
                if num_old:
                    samples, sample_labels = self.draw(factors, pseudo_classes(classes, step, config.pseudo_classes_per_batch),
                                                       int(10 * config.beta))
                    inputs, targets = torch.cat([inputs, samples]), torch.cat([targets, sample_labels])
                loss = F.cross_entropy(self.logits(inputs, text), targets)
                if len(pairs):
                    edges, owners = self.draw(factors, pairs[:, 0], int(20 * config.beta))
                    near = pairs[:, 1].repeat_interleave(int(20 * config.beta))
                    loss = loss + hinge_loss(self.adapter(edges), text[owners], text[near])
                require_finite(loss.detach(), "loss", f"rapf task {task.index + 1}, epoch {epoch + 1}, step {step + 1}")
                descend(optimizer, loss)
            scheduler.step()
        self.gaussians.add_classes(features.cpu(), labels.cpu(), task.classes)
        if num_old:
            with torch.no_grad():
                self.adapter.weight.copy_(fuse_adapter(old_weight, self.adapter.weight, config.mix_bias))

    @torch.no_grad()
    def predict(self, split: Split) -> torch.Tensor:
        return self.logits(self.ctx.features(split).to(self.ctx.device), self.class_text()).cpu()

    def state_dict(self):
        return {"adapter": self.adapter.state_dict(), "gaussians": self.gaussians.state_dict()}

    def load_state_dict(self, state):
        self.adapter.load_state_dict(state["adapter"])
        self.gaussians.load_state_dict(state["gaussians"])
