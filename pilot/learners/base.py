"""The learner interface: what one continual-learning method adds to the shared task loop."""
from __future__ import annotations

from typing import Any, ClassVar

import torch

from pilot.config import LearnerConfig
from pilot.data.stream import Split, Task


class Learner:
    """One method. The loop (``pilot.engine``) calls, for each task in order:

    ``fit(task)`` to learn the task's classes from ``task.train``; then ``predict(split)`` on the
    test images of every task seen so far; then ``state_dict()`` for the checkpoint. On resume a new
    instance gets ``load_state_dict`` instead of the earlier ``fit`` calls.

    ``ctx`` (a :class:`pilot.engine.RunContext`) gives the backbone, device, loaders, the frozen
    feature store and the run's random generator.
    """

    name: ClassVar[str] = ""
    config_class: ClassVar[type[LearnerConfig]] = LearnerConfig

    def __init__(self, config: LearnerConfig, ctx: Any):
        self.config = config
        self.ctx = ctx

    @classmethod
    def validate_config(cls, config: LearnerConfig) -> None:
        """Raise PilotError for values that are well-typed but meaningless (override as needed)."""

    def fit(self, task: Task) -> None:
        raise NotImplementedError

    def predict(self, split: Split) -> torch.Tensor:
        """Logits ``[len(split), classes seen]`` (CPU); the argmax is the prediction."""
        raise NotImplementedError

    def state_dict(self) -> dict[str, Any]:
        """Everything needed to continue after the last fitted task."""
        return {}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        pass
