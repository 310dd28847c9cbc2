"""CODA-Prompt (Smith et al., CVPR 2023): each image's prompt is a sum of learnable components
weighted by cosine(query * attention vector, key); each task adds a slice of components (earlier
slices frozen), initialised orthogonal to the old ones; prefixes in blocks 0-4. As the official
code and PILOT: ``scheduler: "cosine"`` is CODA's own CosineSchedule (``coda_cosine``; torch's
CosineAnnealingLR is ``cosine_annealing``), the train loader drops its last partial batch, and
PILOT's transforms are its CODA branch. Defaults: PILOT's exps/coda_prompt.json (prompt_param
[100, 8, 0.0])."""
from __future__ import annotations

from dataclasses import dataclass, field

import torch

from pilot.errors import PilotError, config_values
from pilot.learners import register_learner
from pilot.learners._gradient import TrainConfig, validate_train_config
from pilot.learners._prompt import PromptLearner, check_blocks
from pilot.modules.prompting import CodaPrompt, prefixes_for_blocks


@dataclass
class CodaPromptConfig(TrainConfig):
    tuned_epoch: int = 20
    init_lr: float = 0.001
    batch_size: int = 128
    optimizer: str = "adam"
    scheduler: str = "cosine"
    min_lr: float = 1e-5
    # PILOT's [number of components, prompt length, orthogonality weight ortho_mu].
    prompt_param: list[float] = field(default_factory=lambda: [100, 8, 0.0])
    prompt_layer_idx: list[int] = field(default_factory=lambda: [0, 1, 2, 3, 4])


@register_learner("coda_prompt")
class CodaPromptLearner(PromptLearner):
    config_class = CodaPromptConfig
    pilot_variant = official_variant = "coda_prompt"  # PILOT copies the official transforms
    cosine_schedule = "coda_cosine"  # PILOT's and the official CosineSchedule
    drop_last = True  # PILOT's and the official train loader
    head_init = "torch"  # the official head is a plain nn.Linear

    def __init__(self, config: CodaPromptConfig, ctx):
        super().__init__(config, ctx)
        components, length, _ = config.prompt_param
        check_blocks(self.vit, "prompt_layer_idx", config.prompt_layer_idx)
        with config_values("prompt_param"):
            self.net["coda"] = CodaPrompt(ctx.backbone.feature_dim, ctx.protocol.planned_tasks, int(components),
                                          int(length), num_layers=len(config.prompt_layer_idx))
        self.attach()

    @classmethod
    def validate_config(cls, config: CodaPromptConfig) -> None:
        validate_train_config(config)
        if len(config.prompt_param) != 3 or config.prompt_param[0] < 1 or config.prompt_param[1] < 2:
            raise PilotError("prompt_param must be [components >= 1, length >= 2 (even), ortho_mu], e.g. [100, 8, 0.0].")

    def train_transform(self):
        return self.ctx.train_transform(crop_scale=(0.08, 1.0))  # CODA's RandomResizedCrop defaults

    def begin_task(self, task):
        self.net["coda"].set_task(task.index)

    def prompted_outputs(self, images, query, task):
        prefixes = prefixes_for_blocks(self.net["coda"](query), self.config.prompt_layer_idx)
        with self.prompts.use(prefixes=prefixes):
            features = self.vit.forward_features(images)
        logits = self.cls_logits(features)
        ortho_mu = self.config.prompt_param[2]
        extra = ortho_mu * self.net["coda"].orthogonality_loss() if (ortho_mu and task is not None) else torch.zeros((), device=logits.device)
        return logits, extra
