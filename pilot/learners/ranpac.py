"""RanPAC (McDonnell et al., NeurIPS 2023): optional first-task adaptation, then a frozen random
projection with ReLU and a ridge-regression classifier on statistics accumulated over all tasks.

Follows PILOT's ``models/ranpac.py`` and the official ``RanPAC.py``: after the first task's
adaptation, each task's training images (eval transform) give features ``h = relu(f W)``;
``G += h^T h``, ``Q += h^T y``; lambda is chosen per task on an 80/20 split of that task's ``h``
alone (MSE to one-hot targets, candidates 10^-8..10^8); ``W_o = (G + lambda I)^-1 Q``
(``RidgeState`` holds ``G`` and ``Q`` exactly, in a compact form while their rank is small).
Logits are ``h @ W_o`` as in the official code (there times the head's positive scale, which
changes no prediction); PILOT's copy feeds ``h`` to a cosine head instead, which also normalises
each class's column of ``W_o`` and can change predictions.
"""
from __future__ import annotations

import time
from dataclasses import dataclass

import torch

from pilot.data.stream import Split, Task
from pilot.errors import PilotError, config_values
from pilot.learners import register_learner
from pilot.learners._first_task_adaptation import AdaptationConfig, FirstTaskAdaptationLearner
from pilot.modules.heads import PrototypeClassifier
from pilot.modules.ridge import RandomProjection, RidgeState, select_lambda, split_fit_val


@dataclass
class RanPACConfig(AdaptationConfig):
    """PILOT's exps/ranpac.json (adapter backbone, same training keys as the official cifar224 args)."""

    # False: cosine class-mean prototypes of the (adapted) features, the official code's no-RP branch.
    use_RP: bool = True
    # Width of the random projection; 0 = ridge on the features themselves (official "M = 0").
    M: int = 10000


def draw_seed(generator: torch.Generator) -> int:
    return int(torch.randint(2**62, (1,), generator=generator))


@register_learner("ranpac")
class RanPAC(FirstTaskAdaptationLearner):
    scenarios = ("class", "domain", "task")
    config_class = RanPACConfig

    def __init__(self, config: RanPACConfig, ctx):
        super().__init__(config, ctx)
        dim = ctx.backbone.feature_dim
        self.projection = None
        if config.use_RP and config.M:
            self.projection = RandomProjection(dim, config.M, seed=draw_seed(ctx.generator)).to(ctx.device)
            dim = config.M
        self.ridge = RidgeState(dim, ctx.device) if config.use_RP else None
        self.readout = torch.zeros(dim, 0, dtype=torch.float64, device=ctx.device)  # W_o
        self.lambdas: list[float] = []  # chosen per task
        self.prototypes = PrototypeClassifier(ctx.backbone.feature_dim)  # the no-projection branch

    @classmethod
    def validate_config(cls, config: RanPACConfig) -> None:
        super().validate_config(config)
        if config.M < 0:
            raise PilotError(f"M (random projection width) must be 0 (no projection) or positive, got {config.M}.")

    def project(self, features: torch.Tensor) -> torch.Tensor:
        features = features.to(self.ctx.device)
        return features if self.projection is None else self.projection(features)

    def update_classifier(self, task: Task) -> None:
        features = self.adapted_features(task.train)
        labels = torch.as_tensor(task.train.labels)
        if self.config.use_RP:
            self.update_ridge(self.project(features), labels, task)
        else:
            self.prototypes.add_classes(features, labels, task.classes)

    def update_ridge(self, h: torch.Tensor, labels: torch.Tensor, task: Task) -> None:
        started = time.perf_counter()
        # The official code splits features read through a shuffled loader; a seeded shuffle here.
        with config_values("train_per_class"):
            lam = select_lambda(*split_fit_val(h, labels, 0.8, seed=draw_seed(self.ctx.generator)))
        selected = time.perf_counter()
        self.ridge.add(h, labels, task.num_seen)
        accumulated = time.perf_counter()
        self.readout = self.ridge.solve(lam)
        solved = time.perf_counter()
        self.lambdas.append(lam)
        self.ctx.log.info(
            f"ranpac task {task.index + 1}: lambda {lam:g}; at dimension {self.ridge.dim}, {self.gram_form()}: selection "
            f"{selected - started:.2f}s, accumulation {accumulated - selected:.2f}s, solve {solved - accumulated:.2f}s")

    def gram_form(self) -> str:
        return f"G compact of rank {self.ridge.statistics.rank}" if self.ridge.is_compact else "G dense"

    def predict(self, split: Split) -> torch.Tensor:
        features = self.adapted_features(split)
        if not self.config.use_RP:
            return self.prototypes(features)
        return (self.project(features).double() @ self.readout).float().cpu()

    def state_dict(self):
        return {**super().state_dict(), "lambdas": self.lambdas, "prototypes": self.prototypes.state_dict(),
                "readout": self.readout.cpu(),
                "projection": None if self.projection is None else self.projection.state_dict(),
                "ridge": None if self.ridge is None else self.ridge.state_dict()}

    def load_state_dict(self, state):
        super().load_state_dict(state)
        self.lambdas = state["lambdas"]
        self.prototypes.load_state_dict(state["prototypes"])
        self.readout = state["readout"].to(self.ctx.device)
        if self.projection is not None:
            self.projection.load_state_dict(state["projection"])
        if self.ridge is not None:
            self.ridge.load_state_dict(state["ridge"])
