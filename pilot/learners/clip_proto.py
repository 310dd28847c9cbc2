"""CLIP prototypes + text: SimpleCIL's class-mean prototypes of frozen CLIP image features, their cosine logits
added to zero-shot CLIP's cosine logits. The simplest of PROOF's ablations (its "prototype + text" matching
before any projection or fusion is trained): PROOF's inference sums image·text and image·prototype terms
unscaled, and so does this learner:

    logits = cos(image, text_c) + cos(image, prototype_c)

``text_c`` is the class's template-averaged text feature (``pilot.clip.class_embeddings``); ``prototype_c``
the mean of the class's L2-normalised training features (PROOF's ``cal_prototype``). No training.
"""
from __future__ import annotations

import torch
from torch.nn import functional as F

from pilot.clip import require_text, seen_class_weights
from pilot.data.stream import Split, Task
from pilot.learners import register_learner
from pilot.learners._base import Learner
from pilot.modules.heads import PrototypeClassifier


@register_learner("clip_proto")
class ClipPrototypes(Learner):
    scenarios = ("class", "domain", "task")
    needs_text = True

    def __init__(self, config, ctx):
        super().__init__(config, ctx)
        self.text = require_text(ctx, self.name)
        self.prototypes = PrototypeClassifier(ctx.backbone.feature_dim)

    def fit(self, task: Task) -> None:
        features = F.normalize(self.ctx.features(task.train), dim=-1)
        self.prototypes.add_classes(features, torch.as_tensor(task.train.labels), task.classes)

    def predict(self, split: Split) -> torch.Tensor:
        features = self.ctx.features(split)
        weights = seen_class_weights(self.ctx, self.text, self.ctx.templates)
        return F.normalize(features, dim=-1) @ weights.T + self.prototypes(features)

    def state_dict(self):
        return self.prototypes.state_dict()

    def load_state_dict(self, state):
        self.prototypes.load_state_dict(state)
