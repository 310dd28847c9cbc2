"""Classifier heads shared by learners: a cosine head, per-task linear heads, class-mean prototypes, the
one head initialisation they all use, the CosFace loss and lowest-entropy selection among candidate logits."""
from __future__ import annotations

import math
import warnings
from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import nn


def cosine_logits(features: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
    """cos(feature, row) for every pair: [N, D] x [C, D] -> [N, C]."""
    return F.normalize(features, dim=1) @ F.normalize(weights, dim=1).T


HEAD_INITS = ("trunc_normal", "normal", "kaiming", "uniform", "torch")


def init_head(head: nn.Module, init: str, std: float = 0.02) -> nn.Module:
    """Draw ``head.weight`` in place by the rule of the method's code, and zero its bias if it has one:
    "trunc_normal" (std ``std``: timm's ViT head, as SLCA, MOS, L2P, DualPrompt), "normal" (std ``std``: LAE),
    "kaiming" (Kaiming uniform for a linear layer: PILOT's SimpleLinear), "uniform" (U(+-1/sqrt(in_dim)), PILOT's
    CosineLinear), or "torch" (keep what PyTorch's nn.Linear drew, bias included: CODA-Prompt, the linear probe).
    An empty weight (a task that adds no class) has nothing to draw."""
    if init not in HEAD_INITS:
        raise ValueError(f"head init must be one of {', '.join(HEAD_INITS)}, got '{init}'")
    weight, bias = head.weight, getattr(head, "bias", None)
    if init == "torch" or weight.numel() == 0:
        return head
    if init == "trunc_normal":
        nn.init.trunc_normal_(weight, std=std)
    elif init == "normal":
        nn.init.normal_(weight, std=std)
    elif init == "kaiming":
        nn.init.kaiming_uniform_(weight, nonlinearity="linear")
    else:
        bound = 1 / math.sqrt(weight.shape[1])
        nn.init.uniform_(weight, -bound, bound)
    if bias is not None:
        nn.init.zeros_(bias)
    return head


def linear(in_dim: int, out_dim: int, bias: bool = True) -> nn.Linear:
    """PyTorch's Linear, also zero-wide (a task that adds no class) without torch's warning about its empty weight."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", "Initializing zero-element tensors is a no-op")
        return nn.Linear(in_dim, out_dim, bias=bias)


def linear_head(in_dim: int, num_classes: int, init: str = "trunc_normal", std: float = 0.02) -> nn.Linear:
    """A linear head initialised by ``init_head``."""
    return init_head(linear(in_dim, num_classes), init, std)


class CosineHead(nn.Module):
    """``sigma * cos(features, w_c)`` with a learnable ``sigma`` (PILOT's ``CosineLinear`` and init)."""

    def __init__(self, in_dim: int, num_classes: int) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.empty(num_classes, in_dim))
        self.sigma = nn.Parameter(torch.ones(1))
        init_head(self, "uniform")

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        return self.sigma * cosine_logits(features, self.weight)


class PrototypeClassifier:
    """Class-mean prototypes of features, cosine logits (SimpleCIL; APER; RanPAC without projection).

    Classes are added task by task, in label order. A class seen again (a domain stream's next domain)
    moves to the mean of all its images so far; the prototypes and image counts are the whole state.
    """

    def __init__(self, feature_dim: int) -> None:
        self.prototypes = torch.zeros(0, feature_dim)
        self.counts = torch.zeros(0, dtype=torch.int64)

    def add_classes(self, features: torch.Tensor, labels: torch.Tensor, classes: range) -> None:
        known = len(self.prototypes)
        new = [c for c in classes if c >= known]
        if new:  # in label order, so a new class's row is its label
            self.prototypes = torch.cat([self.prototypes, torch.stack([features[labels == c].mean(0) for c in new])])
            self.counts = torch.cat([self.counts, torch.stack([(labels == c).sum() for c in new])])
        for c in (c for c in classes if c < known):
            rows = labels == c
            count = self.counts[c] + rows.sum()
            self.prototypes[c] = (self.prototypes[c] * self.counts[c] + features[rows].sum(0)) / count
            self.counts[c] = count

    def __call__(self, features: torch.Tensor) -> torch.Tensor:
        return cosine_logits(features, self.prototypes)

    def state_dict(self) -> dict[str, torch.Tensor]:
        return {"prototypes": self.prototypes, "counts": self.counts}

    def load_state_dict(self, state: dict[str, torch.Tensor]) -> None:
        self.prototypes, self.counts = state["prototypes"], state["counts"]


def task_heads(feature_dim: int, task_sizes: Sequence[int], init: str = "trunc_normal",
               bias: bool = True) -> nn.ModuleList:
    """One linear head per task (``init_head``): "trunc_normal" as SLCA's SimpleContinualLinear, "kaiming" as
    PILOT's SimpleLinear (together, the head PILOT's finetune grows by copying old rows into a larger one).
    All are built before any is drawn, the order the random draws of earlier runs came in. ``bias=False``: weights
    only, as the rows of a cosine classifier (TUNA's SimpleContinualLinear)."""
    heads = nn.ModuleList(linear(feature_dim, size, bias) for size in task_sizes)
    for head in heads:
        init_head(head, init)
    return heads


def classify(heads: nn.ModuleList, features: torch.Tensor) -> torch.Tensor:
    """Logits over the classes of ``heads``' tasks, in class order."""
    return torch.cat([head(features) for head in heads], dim=1)


def normalise_logits(logits: torch.Tensor, task_classes: Sequence[range], temperature: float) -> torch.Tensor:
    """SLCA's logit normalisation: logits / (mean over tasks of each task's logit L2 norm) / temperature."""
    norms = torch.stack([logits[:, classes.start:classes.stop].norm(dim=1) + 1e-7 for classes in task_classes], dim=1)
    return logits / norms.mean(dim=1, keepdim=True) / temperature


def cosface_loss(cosines: torch.Tensor, labels: torch.Tensor, scale: float, margin: float) -> torch.Tensor:
    """CosFace (the "cosface" of the AngularPenaltySMLoss that MOS's and TUNA's codes carry): batch mean of
    ``-log(e^{s(cos_y - m)} / (e^{s(cos_y - m)} + sum_{j != y} e^{s cos_j}))``, i.e. cross-entropy of
    ``s * cos`` with the margin ``m`` taken off the true class's cosine."""
    margins = F.one_hot(labels, cosines.shape[1]).to(cosines) * margin
    return F.cross_entropy(scale * (cosines - margins), labels)


def lowest_entropy(logits: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Per image, the candidate whose softmax has the lowest entropy (TUNA's adapter selection):
    ``logits`` [candidates, images, classes] -> (index [images], its logits [images, classes]). Entropy
    ``-sum p log(p + 1e-10)`` as TUNA's code; ties go to the first candidate (``argmin``)."""
    probabilities = logits.softmax(dim=2)
    entropy = -(probabilities * torch.log(probabilities + 1e-10)).sum(dim=2)
    index = entropy.argmin(dim=0)
    return index, logits[index, torch.arange(logits.shape[1], device=logits.device)]


class SubspacePrototypes:
    """EASE's classifier (Zhou et al., CVPR 2024): a prototype per class in every feature subspace
    (one per task adapter, plus optionally the pretrained model's), ``weights[class, subspace, dim]``.

    A class's prototypes in subspaces that did not exist when it was learnt are synthesised from
    class similarities (``complement``); logits add the cosines of each subspace, reweighted by
    ``logits``. Unfilled prototypes are zero and contribute a cosine of 0.
    """

    def __init__(self, feature_dim: int) -> None:
        self.weights = torch.zeros(0, 0, feature_dim)

    @property
    def num_subspaces(self) -> int:
        return self.weights.shape[1]

    def add_subspace(self) -> None:
        classes, subspaces, dim = self.weights.shape
        self.weights = torch.cat([self.weights, torch.zeros(classes, 1, dim)], dim=1)

    def add_classes(self, count: int) -> None:
        _, subspaces, dim = self.weights.shape
        self.weights = torch.cat([self.weights, torch.zeros(count, subspaces, dim)])

    def set_means(self, subspace: int, features: torch.Tensor, labels: torch.Tensor, classes: range) -> None:
        self.weights[classes.start:classes.stop, subspace] = torch.stack([features[labels == c].mean(0) for c in classes])

    def complement(self, task_classes: list[range], first: int, recalc: bool) -> None:
        """EASE's semantic-guided prototype complement (official ``solve_sim_reset``, or ``solve_similarity``
        when not ``recalc``). Task ``i``'s adapter is subspace ``first + i``; for an old task ``i`` and a later
        subspace ``j``, the reference classes are those of tasks ``>= j`` (they have real prototypes in both):

            W[task i, j] = softmax_rows(cos(W[task i, i], W[ref, i])) @ W[ref, j]

        ``recalc`` recomputes every such block each task (more references over time); otherwise only the
        newest subspace is filled.
        """
        newest = len(task_classes) - 1
        for old in range(newest):
            for later in range(old + 1, newest + 1) if recalc else [newest]:
                references = range(task_classes[later].start, task_classes[-1].stop)
                own = self.weights[task_classes[old].start:task_classes[old].stop, first + old]
                anchors = self.weights[references.start:references.stop, first + old]
                targets = self.weights[references.start:references.stop, first + later]
                similarity = torch.softmax(cosine_logits(own, anchors), dim=1)
                self.weights[task_classes[old].start:task_classes[old].stop, first + later] = similarity @ targets

    def logits(self, features: torch.Tensor, task_classes: list[range], first: int, alpha: float,
               beta: float) -> torch.Tensor:
        """EASE's reweighted logits (``forward_reweight``) of ``features[image, subspace, dim]``: for a class
        of task ``i``, the cosine in its own subspace ``first + i``, plus ``alpha / T`` times the cosines in
        the other T adapter subspaces, plus ``beta`` times the cosine in the pretrained subspace (when
        ``first`` is 1)."""
        cosines = torch.einsum("nsd,csd->ncs", F.normalize(features, dim=2), F.normalize(self.weights, dim=2))
        others = len(task_classes) - 1
        weights = torch.full((self.weights.shape[0], self.num_subspaces), alpha / max(others, 1))
        if first:
            weights[:, 0] = beta
        for task, classes in enumerate(task_classes):
            weights[classes.start:classes.stop, first + task] = 1.0
        return (cosines * weights).sum(2)

    def plain_logits(self, features: torch.Tensor) -> torch.Tensor:
        """One cosine between the concatenated features and prototypes (EASE without reweighting)."""
        return cosine_logits(features.flatten(1), self.weights.flatten(1))

    def state_dict(self) -> dict[str, torch.Tensor]:
        return {"weights": self.weights}

    def load_state_dict(self, state: dict[str, torch.Tensor]) -> None:
        self.weights = state["weights"]
