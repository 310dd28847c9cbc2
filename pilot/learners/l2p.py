"""L2P (Wang et al., CVPR 2022): a pool of prompts with learnable keys; each image picks the top-k
prompts whose keys best match its query and prepends them to its patch tokens; the head reads
the mean of the prompt tokens' outputs. The official code gives each prompt token the [CLS]
token's position embedding: ``prompt_position: "cls"`` (off by default, measured in docs/reproducing.md).
Defaults: PILOT's exps/l2p.json and the official code."""
from __future__ import annotations

from dataclasses import dataclass

import torch

from pilot.errors import PilotError, config_values
from pilot.learners import register_learner
from pilot.learners._prompt import PoolPromptConfig, PoolPromptLearner
from pilot.modules.prompting import PromptPool, pull_loss


@dataclass
class L2PConfig(PoolPromptConfig):
    tuned_epoch: int = 5
    init_lr: float = 0.001875  # 0.03 x batch 16 / 256
    batch_size: int = 16
    optimizer: str = "adam"
    scheduler: str = "constant"
    min_lr: float = 1e-5
    clip_grad: float = 1.0  # official L2P code
    size: int = 10  # pool size
    length: int = 5  # tokens per prompt
    top_k: int = 5
    initializer: str = "uniform"  # prompts: U(-1, 1)
    prompt_key_init: str = "uniform"
    pull_constraint: bool = True
    pull_constraint_coeff: float = 0.1
    # Position embedding of the prompt tokens: "none" adds nothing (a departure on purpose: on P1 with
    # DeiT-Tiny, "cls" costs 45.5 points of average accuracy, docs/reproducing.md); "cls" adds the [CLS] token's to
    # each, as the official code and PILOT do through their resize_pos_embed.
    prompt_position: str = "none"


@register_learner("l2p")
class L2P(PoolPromptLearner):
    config_class = L2PConfig
    official_variant = "default"  # the official build_transform is PILOT's

    def __init__(self, config: L2PConfig, ctx):
        super().__init__(config, ctx)
        with config_values("prompt_key_init", "initializer"):
            self.net["pool"] = PromptPool(config.size, config.length, ctx.backbone.feature_dim, config.top_k,
                                          key_init=config.prompt_key_init, prompt_init=config.initializer)
        self.attach()

    @classmethod
    def validate_config(cls, config: L2PConfig) -> None:
        super().validate_config(config)
        if not 1 <= config.top_k <= config.size:
            raise PilotError(f"top_k ({config.top_k}) must be between 1 and the pool size ({config.size}).")
        if config.prompt_position not in ("cls", "none"):
            raise PilotError(f"prompt_position must be 'cls' or 'none', got '{config.prompt_position}'.")

    def prompted_outputs(self, images, query, task):
        selection = self.select(self.net["pool"], query, task)
        tokens = selection.prompts[:, 0]  # [B, top_k * length, D]: one layer, prompt tuning
        if self.config.prompt_position == "cls":
            tokens = tokens + self.prompts.class_position()
        with self.prompts.use(prompt_tokens=tokens):
            features = self.vit.forward_features(images)
        prompt_outputs = features[:, self.prompts.prompt_slice(tokens.shape[1])].mean(1)
        logits = self.net["head"](prompt_outputs)
        extra = torch.zeros((), device=logits.device)
        if self.config.pull_constraint:
            extra = self.config.pull_constraint_coeff * pull_loss(selection.selected_similarity)
        return logits, extra

    def choice_report(self, choices, tasks):
        """How often each pool entry was used over the seen tasks' test images."""
        return {"prompt_usage": torch.bincount(choices.flatten(), minlength=self.config.size).tolist()}
