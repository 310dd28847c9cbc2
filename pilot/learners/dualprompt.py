"""DualPrompt (Wang et al., ECCV 2022): a shared G-prompt in the first blocks and a pool of
task-specific E-prompts in the next ones, both as key/value prefixes. Training uses the current
task's E-prompt (and pulls its key to the task's queries); at test time each image picks the
E-prompt whose key best matches its query. Defaults: PILOT's exps/dualprompt.json."""
from __future__ import annotations

from dataclasses import dataclass, field

import torch

from pilot.errors import PilotError, config_values
from pilot.learners import register_learner
from pilot.learners._prompt import PoolPromptConfig, PoolPromptLearner, check_blocks
from pilot.modules.prompting import GeneralPrompt, PromptPool, prefixes_for_blocks, pull_loss


@dataclass
class DualPromptConfig(PoolPromptConfig):
    tuned_epoch: int = 5
    init_lr: float = 0.001
    batch_size: int = 24
    optimizer: str = "adam"
    scheduler: str = "constant"
    min_lr: float = 1e-5
    clip_grad: float = 1.0  # official DualPrompt code
    g_prompt_length: int = 5
    g_prompt_layer_idx: list[int] = field(default_factory=lambda: [0, 1])
    e_prompt_layer_idx: list[int] = field(default_factory=lambda: [2, 3, 4])
    size: int = 10  # E-prompt pool
    length: int = 5  # E-prompt length
    top_k: int = 1
    initializer: str = "uniform"
    prompt_key_init: str = "uniform"
    # Start task t's E-prompt from task t-1's (PILOT's shared_prompt_pool: true).
    shared_prompt_pool: bool = True
    shared_prompt_key: bool = False
    pull_constraint: bool = True
    pull_constraint_coeff: float = 0.1


@register_learner("dualprompt")
class DualPrompt(PoolPromptLearner):
    config_class = DualPromptConfig
    official_variant = "default"  # the official build_transform is PILOT's

    def __init__(self, config: DualPromptConfig, ctx):
        super().__init__(config, ctx)
        dim = ctx.backbone.feature_dim
        check_blocks(self.vit, "g_prompt_layer_idx", config.g_prompt_layer_idx)
        check_blocks(self.vit, "e_prompt_layer_idx", config.e_prompt_layer_idx)
        if ctx.protocol.num_tasks > config.size:
            raise PilotError(f"DualPrompt has {config.size} E-prompts (size) but the stream has {ctx.protocol.num_tasks} "
                             f"tasks: set size to at least the number of tasks.")
        with config_values("prompt_key_init", "initializer"):
            self.net["g_prompt"] = GeneralPrompt(config.g_prompt_length, dim, len(config.g_prompt_layer_idx),
                                                 init=config.initializer)
            self.net["e_pool"] = PromptPool(config.size, config.length, dim, config.top_k,
                                            num_layers=len(config.e_prompt_layer_idx), prefix=True,
                                            key_init=config.prompt_key_init, prompt_init=config.initializer)
        self.attach()

    @classmethod
    def validate_config(cls, config: DualPromptConfig) -> None:
        super().validate_config(config)
        if set(config.g_prompt_layer_idx) & set(config.e_prompt_layer_idx):
            raise PilotError("g_prompt_layer_idx and e_prompt_layer_idx must not share blocks.")
        if config.top_k != 1:
            raise PilotError("DualPrompt trains one E-prompt per task: top_k must be 1.")

    def begin_task(self, task):
        if task.index > 0:
            pool = self.net["e_pool"]
            with torch.no_grad():
                if self.config.shared_prompt_pool:
                    pool.prompts[task.index] = pool.prompts[task.index - 1]
                if self.config.shared_prompt_key:
                    pool.keys[task.index] = pool.keys[task.index - 1]

    def prompted_outputs(self, images, query, task):
        batch = images.shape[0]
        force = None if task is None else torch.full((batch,), task.index, device=images.device)
        selection = self.select(self.net["e_pool"], query, task, force_index=force)
        prefixes = {**prefixes_for_blocks(self.net["g_prompt"](batch), self.config.g_prompt_layer_idx),
                    **prefixes_for_blocks(selection.prompts, self.config.e_prompt_layer_idx)}
        with self.prompts.use(prefixes=prefixes):
            features = self.vit.forward_features(images)
        logits = self.cls_logits(features)
        extra = torch.zeros((), device=logits.device)
        if self.config.pull_constraint:
            extra = self.config.pull_constraint_coeff * pull_loss(selection.selected_similarity)
        return logits, extra

    def choice_report(self, choices, tasks):
        """Task identification: the share (%) of test images whose E-prompt is their own task's."""
        return {"task_identification_accuracy": 100.0 * float((choices[:, 0] == tasks).double().mean())}
