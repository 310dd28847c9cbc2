"""iCaRL (Rebuffi et al., CVPR 2017) as LAMDA-PILOT's ``models/icarl.py`` (its ViT version): replay's training
(the whole ViT and a growing linear head, on each task's images and the memory's exemplars, every seen class in
the cross-entropy), plus from the second task knowledge distillation at temperature ``T`` from a frozen copy of
the network as it was before the task, on the old classes' logits. After each task the memory is herded on the
trained network's features (PILOT's ``build_rehearsal_memory``), and the normalised mean of each class's
exemplar features gives the nearest-mean-of-exemplars (NME) classifier.

PILOT evaluates both classifiers after every task and logs both, the head's ("CNN") first; ``classifier``
says which is this run's accuracy, and the other's is reported beside it (``nme_accuracy`` or ``cnn_accuracy``
in results.json's per-task rows and run.log).
"""
from __future__ import annotations

import copy
from dataclasses import dataclass, field
from typing import Any, Optional

import torch
from torch import nn

from pilot.data.stream import Split, Task
from pilot.errors import PilotError
from pilot.learners import register_learner
from pilot.learners.finetune import FinetuneConfig
from pilot.learners.replay import Replay
from pilot.memory import normalise
from pilot.modules.distillation import kd_loss
from pilot.modules.heads import classify

CLASSIFIERS = ("cnn", "nme")


@dataclass
class IcarlConfig(FinetuneConfig):
    """PILOT's exps/icarl.json: finetune's keys (later tasks' milestones [80, 120]) and the distillation temperature."""

    milestones: list[int] = field(default_factory=lambda: [80, 120])  # past 20 epochs: a constant rate
    T: float = 2.0
    # The run's accuracy: "cnn", the head's argmax, or "nme", the nearest mean of exemplars. PILOT computes both
    # and prints both, CNN first ("Average Accuracy (CNN)", then "(NME)"); the one not chosen is reported per task.
    classifier: str = "cnn"


def exemplar_means(features: torch.Tensor, labels: torch.Tensor, num_classes: int) -> torch.Tensor:
    """``models/base.py``'s class means: per class, the mean of its exemplars' L2-normalised features (norm +
    1e-8), itself normalised (no epsilon); float64, [num_classes, D]."""
    vectors = normalise(features)
    means = torch.stack([vectors[labels == c].mean(0) for c in range(num_classes)])
    return means / means.norm(dim=1, keepdim=True)


def nme_logits(features: torch.Tensor, means: torch.Tensor) -> torch.Tensor:
    """``_eval_nme``: minus the squared Euclidean distance of each L2-normalised feature to each class mean."""
    return -torch.cdist(normalise(features), means) ** 2


@register_learner("icarl")
class Icarl(Replay):
    config_class = IcarlConfig

    def __init__(self, config: IcarlConfig, ctx):
        super().__init__(config, ctx)
        self.old_net: Optional[nn.ModuleDict] = None  # the network before the task, while a later task trains
        self.class_means = torch.zeros(0, ctx.backbone.feature_dim, dtype=torch.float64)
        self.report: dict[str, Any] = {}

    @classmethod
    def validate_config(cls, config: IcarlConfig) -> None:
        super().validate_config(config)
        if config.classifier not in CLASSIFIERS:
            raise PilotError(f"classifier must be one of {', '.join(CLASSIFIERS)} (the head's logits, or the nearest "
                             f"mean of exemplars), got '{config.classifier}'.")
        if config.T <= 0:
            raise PilotError(f"T (the distillation temperature) must be above 0, got {config.T}.")

    def begin_task(self, task: Task) -> None:
        # PILOT's after_task freezes a copy of the network; copied here, before the next task, it is the same
        # network (also after a resume, which restores it), so the checkpoint need not hold a second copy.
        self.old_net = copy.deepcopy(self.net).requires_grad_(False).eval() if task.num_old else None

    def old_logits(self, images: torch.Tensor, num_old: int) -> torch.Tensor:
        heads = self.old_net["heads"][: len(self.ctx.protocol.tasks_within(num_old))]
        with torch.no_grad():
            return classify(heads, self.old_net["backbone"](images))

    def train_outputs(self, images: torch.Tensor, labels: torch.Tensor, task: Task):
        logits, extra = super().train_outputs(images, labels, task)
        if self.old_net is None:
            return logits, extra
        old = self.old_logits(images, task.num_old)
        return logits, extra + kd_loss(logits[:, : task.num_old].float(), old.float(), self.config.T)

    def end_task(self, task: Task) -> None:
        self.old_net = None  # only training distils from it

    def memory_updated(self, task: Task) -> None:
        """PILOT's build_rehearsal_memory computes the class means of the exemplars it keeps."""
        exemplars = self.ctx.memory.split()
        self.class_means = exemplar_means(self.memory_features(exemplars), torch.from_numpy(exemplars.labels),
                                          task.num_seen)

    def both_logits(self, split: Split) -> dict[str, torch.Tensor]:
        """The head's and NME's logits of ``split``, from one pass of the backbone."""
        self.set_train_mode(False)
        features = self.ctx.encode(self.ctx.backbone, split)
        with torch.no_grad(), self.ctx.autocast():
            cnn = classify(self.seen_heads(), features.to(self.ctx.device)).float().cpu()
        return {"cnn": cnn, "nme": nme_logits(features, self.class_means)}

    def predict(self, split: Split) -> torch.Tensor:
        return self.both_logits(split)[self.config.classifier]

    def predict_tasks(self, splits: list[Split]) -> list[torch.Tensor]:
        logits = [self.both_logits(split) for split in splits]
        other = "nme" if self.config.classifier == "cnn" else "cnn"
        hits = sum(int((task[other].argmax(1) == torch.from_numpy(split.labels)).sum())
                   for task, split in zip(logits, splits))
        self.report = {f"{other}_accuracy": 100.0 * hits / sum(len(split) for split in splits)}
        return [task[self.config.classifier] for task in logits]

    def evaluation_report(self) -> dict[str, Any]:
        return self.report

    def state_dict(self):
        return {**super().state_dict(), "class_means": self.class_means}

    def load_state_dict(self, state):
        super().load_state_dict(state)
        self.class_means = state["class_means"]
