"""Zero-shot CLIP: no training; each seen class is known by its name under the prompt templates.

Follows PROOF's ``models/zs_clip.py`` (zhoudw-zdw/PROOF@0bb2052; also C3Box): per class, every template
filled with the class name is encoded, each feature L2-normalised, averaged and normalised again; an image
is classified among the classes seen so far by ``logit_scale · norm(image) · weightsᵀ`` (the scale changes
no prediction; it makes the logits CLIP's). Templates default to PROOF's per-dataset set.
"""
from __future__ import annotations

import torch

from pilot.clip import require_text, seen_class_weights, zero_shot_logits
from pilot.data.stream import Split, Task
from pilot.learners import register_learner
from pilot.learners._base import Learner


@register_learner("zs_clip")
class ZeroShotCLIP(Learner):
    scenarios = ("class", "domain", "task")
    needs_text = True  # an open_clip backbone (checked with the config)

    def __init__(self, config, ctx):
        super().__init__(config, ctx)
        self.text = require_text(ctx, self.name)

    def fit(self, task: Task) -> None:
        """Nothing to learn: the new classes' names join the classifier when it is next asked."""

    def predict(self, split: Split) -> torch.Tensor:
        weights = seen_class_weights(self.ctx, self.text, self.ctx.templates)
        return zero_shot_logits(self.ctx.features(split), weights, self.text.tower.logit_scale)
