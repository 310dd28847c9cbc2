"""The learner interface: what one continual-learning method adds to the shared task loop."""
from __future__ import annotations

from typing import Any, ClassVar, Optional

import torch
from timm.models.vision_transformer import VisionTransformer

from pilot.config import LearnerConfig
from pilot.context import RunContext
from pilot.data.stream import Split, Task
from pilot.errors import PilotError


class NonFiniteValues(PilotError):
    """A learner's loss or logits became NaN or infinite."""


def require_finite(values: torch.Tensor, what: str, where: str) -> None:
    """Stop at the first non-finite loss or logits: a NaN spreads silently through every later step and
    ends as a wrong accuracy. ``where`` names the learner and the point of the run."""
    if not bool(torch.isfinite(values).all()):
        raise NonFiniteValues(
            f"{where}: the {what} became non-finite (NaN or inf). Training diverged or the inputs hold NaN: lower "
            f"the learning rate (init_lr) or set clip_grad, then start over with --restart (or --resume, which "
            f"keeps the tasks completed before this one)."
        )


class Learner:
    """One method. The loop (``pilot.engine``) calls, for each task in order:

    ``fit(task)`` to learn the task's classes from ``task.train``; then ``predict_tasks`` (by default
    ``predict(split)`` per split) on the test images of every task seen so far, and
    ``evaluation_report()`` for what the method reports of that evaluation; then ``state_dict()`` for
    the checkpoint. On resume a new
    instance gets ``load_state_dict`` instead of the earlier ``fit`` calls.

    ``ctx`` gives the backbone, the protocol's facts, device, loaders, the frozen feature store and
    the run's random generator.
    """

    name: ClassVar[str] = ""
    config_class: ClassVar[type[LearnerConfig]] = LearnerConfig
    # The method's reference transforms (families of pilot.data.transforms): PILOT's, used with
    # ``preprocess: "pilot"``, and its official repository's, with ``"official"`` (None: not recorded).
    pilot_variant: ClassVar[str] = "default"
    official_variant: ClassVar[Optional[str]] = None
    # False for a reference point that keeps old tasks' data (the joint upper bound); in results.json.
    continual: ClassVar[bool] = True
    # The scenarios (pilot.data.stream.SCENARIOS) the method honours; a config asking for another is refused.
    scenarios: ClassVar[tuple[str, ...]] = ("class", "task")
    # Why a domain stream is refused, where it is (one line for the error).
    domain_refusal: ClassVar[str] = "its classifier grows with each task's new classes, which a domain stream does not bring"
    # True for a method that replays exemplars from the rehearsal memory (``ctx.memory``, filled after each task).
    uses_memory: ClassVar[bool] = False
    # Training images each class needs in a task (2 for a per-class covariance); checked when the data is loaded.
    min_train_per_class: ClassVar[int] = 1
    # CLIP learners classify through the text tower, so the config must name an open_clip backbone.
    needs_text: ClassVar[bool] = False
    # A learner built on several backbones names their roles; the config's backbone_type lists exactly these.
    backbone_roles: ClassVar[tuple[str, ...]] = ()

    def __init__(self, config: LearnerConfig, ctx: RunContext):
        self.config = config
        self.ctx = ctx

    @classmethod
    def validate_config(cls, config: LearnerConfig) -> None:
        """Raise PilotError for values that are well-typed but meaningless (override as needed)."""

    @classmethod
    def frozen_features(cls, config: LearnerConfig) -> bool:
        """Whether the method, so configured, sees the backbone only through ``ctx.features``: then
        ``backbone_type`` may list several backbones (their features side by side)."""
        return False

    def fit(self, task: Task) -> None:
        raise NotImplementedError

    def memory_features(self, split: Split) -> torch.Tensor:
        """Features that herding selects exemplars by, after the task is learnt (PILOT: the current network's,
        test transform); the frozen backbone's by default."""
        return self.ctx.features(split)

    def memory_updated(self, task: Task) -> None:
        """After the loop has filled the memory for ``task`` (the task's images and the exemplars still
        readable): what a method derives from the exemplars, e.g. iCaRL's class means."""

    def predict(self, split: Split) -> torch.Tensor:
        """Logits ``[len(split), classes seen]`` (CPU); the argmax is the prediction."""
        raise NotImplementedError

    def predict_tasks(self, splits: list[Split]) -> list[torch.Tensor]:
        """Logits for each seen task's test split; a method whose predictions depend on the test batches
        (PILOT's batch-wise prompts) overrides this to see them together, in PILOT's order."""
        return [self.predict(split) for split in splits]

    def evaluation_report(self) -> dict[str, Any]:
        """Diagnostics of the last ``predict_tasks`` (logged, and recorded with the task's metrics)."""
        return {}

    @property
    def batch_dependent_evaluation(self) -> bool:
        """True where predictions depend on how test images are batched (recorded in results.json)."""
        return False

    def state_dict(self) -> dict[str, Any]:
        """Everything needed to continue after the last fitted task."""
        return {}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        pass

    def require_vit(self) -> VisionTransformer:
        """The backbone's timm ViT, which prompts and adapters attach to; a clear error for other backbones."""
        model = self.ctx.backbone.model
        if not isinstance(model, VisionTransformer):
            raise PilotError(f"{self.name} needs a timm VisionTransformer backbone, got {type(model).__name__}; set "
                             f"backbone_type to a ViT, e.g. vit_base_patch16_224.augreg_in21k.")
        return model
