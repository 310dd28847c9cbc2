"""Joint training, the upper bound most papers quote: at each task, fine-tune the backbone and the head
on the training images of every task seen so far, all seen classes in the loss. It keeps old data, so it
is not continual learning (results.json records ``"continual": false``). Settings: ``finetune``'s keys.
"""
from __future__ import annotations

import numpy as np

from pilot.data.stream import Split, Task
from pilot.learners import register_learner
from pilot.learners.finetune import Finetune


@register_learner("joint")
class Joint(Finetune):
    continual = False
    mask_old_classes = False

    def __init__(self, config, ctx):
        super().__init__(config, ctx)
        self.seen_indices, self.seen_labels = np.zeros(0, dtype=np.int64), np.zeros(0, dtype=np.int64)

    def begin_task(self, task: Task) -> None:
        self.seen_indices = np.concatenate([self.seen_indices, task.train.indices])
        self.seen_labels = np.concatenate([self.seen_labels, task.train.labels])

    def training_split(self, task: Task) -> Split:
        """Every seen task's training images (the stream's train splits share one source)."""
        return Split(task.train.part, task.train.source, self.seen_indices, self.seen_labels)

    def state_dict(self):
        return {**super().state_dict(), "seen_indices": self.seen_indices, "seen_labels": self.seen_labels}

    def load_state_dict(self, state):
        super().load_state_dict(state)
        self.seen_indices, self.seen_labels = state["seen_indices"], state["seen_labels"]
