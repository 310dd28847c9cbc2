"""FeCAM (Goswami et al., NeurIPS 2023): classify frozen features by the Mahalanobis distance to each
class's mean under its own shrunk, normalised covariance (``pilot.modules.gaussians.MahalanobisClassifier``).

As PILOT's ``models/fecam.py``, the ViT first adapts on the first task (AdaptFormer adapters, temporary
cosine head; ``tuned_epoch: 0`` keeps the pretrained features), and the classifier uses the adapted
features alone. The statistics follow the official ViT code (L2-normalised features, shrinkage
γ1 = 1, γ2 = 0 once, unit-diagonal normalisation, no Tukey transform, which needs the paper's
non-negative ResNet features); ``pilot_covariance: true`` gives PILOT's covariance instead.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from pilot.data.stream import Split, Task
from pilot.errors import PilotError, config_values
from pilot.learners import register_learner
from pilot.learners._first_task_adaptation import AdaptationConfig, FirstTaskAdaptationLearner
from pilot.modules.gaussians import MahalanobisClassifier


@dataclass
class FeCAMConfig(AdaptationConfig):
    """PILOT's exps/fecam.json (adaptation keys) and the official FeCAM's statistics keys."""

    alpha1: float = 1.0  # γ1: shrinkage towards the mean variance (official ViT CIFAR value)
    alpha2: float = 0.0  # γ2: shrinkage towards the mean covariance
    norm_cov: bool = True  # normalise each covariance to a unit diagonal
    tukey: bool = False  # Tukey's power transform x^beta (needs non-negative features)
    beta: float = 0.5
    # PILOT's covariance: raw features, + 100 I, then torch.corrcoef of the matrix (its rows' correlations).
    pilot_covariance: bool = False


@register_learner("fecam")
class FeCAM(FirstTaskAdaptationLearner):
    config_class = FeCAMConfig
    min_train_per_class = 2  # each class's covariance

    def __init__(self, config: FeCAMConfig, ctx):
        super().__init__(config, ctx)
        self.classifier = MahalanobisClassifier(ctx.backbone.feature_dim, config.alpha1, config.alpha2,
                                                config.norm_cov, config.beta if config.tukey else None,
                                                config.pilot_covariance)

    @classmethod
    def validate_config(cls, config: FeCAMConfig) -> None:
        super().validate_config(config)
        if config.alpha1 < 0 or config.alpha2 < 0:
            raise PilotError(f"alpha1 and alpha2 (FeCAM's shrinkage γ1, γ2) must be >= 0, got {config.alpha1}, "
                             f"{config.alpha2}.")

    def update_classifier(self, task: Task) -> None:
        with config_values("tukey", "train_per_class"):
            self.classifier.add_classes(self.adapted_features(task.train), torch.as_tensor(task.train.labels),
                                        task.classes)

    def predict(self, split: Split) -> torch.Tensor:
        return self.classifier(self.adapted_features(split))

    def state_dict(self):
        return {**super().state_dict(), "classifier": self.classifier.state_dict()}

    def load_state_dict(self, state):
        super().load_state_dict(state)
        self.classifier.load_state_dict(state["classifier"])
