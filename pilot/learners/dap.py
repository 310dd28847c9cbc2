"""DAP (Jung et al., ICCV 2023, naver-ai/dap-cl): a frozen ViT whose prompts are generated per image
before every block (``pilot.modules.prompt_generation``) from the block's input, modulated by the
embedding of a task key; the key is the task being trained, and at test time the key that best
matches the image's frozen [CLS] feature. Loss: cross-entropy over the current task's classes minus
``sim_lambda`` x the cosine of the used key to the query. The down-projections train on the first task
only (official ``trainer.py``). The head reads the [CLS] output.

The official test picks one key per batch by majority vote (``vit_dap/vit.py``), each task's test images
batched on their own: ``batchwise_prompt: true`` does that; by default each image uses its own key, so
predictions do not depend on the batch. Departures: one optimiser per task (the official one runs on
across tasks), and no ImageNet-R special case (no prompts in the last block there).
Defaults: ``configs/base-dap.yaml`` and ``configs/dap/cifar.yaml``.
"""
from __future__ import annotations

import math
import warnings
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from pilot.errors import PilotError
from pilot.learners import register_learner
from pilot.learners._gradient import validate_train_config
from pilot.learners._prompt import PoolPromptConfig, PoolPromptLearner
from pilot.modules.prompt_generation import GeneratedPrompts, PromptGenerator
from pilot.modules.prompting import pull_loss


@dataclass
class DAPConfig(PoolPromptConfig):
    tuned_epoch: int = 5  # cifar.yaml TOTAL_EPOCH
    init_lr: float = 0.01  # BASE_LR
    batch_size: int = 128  # DATA.BATCH_SIZE
    optimizer: str = "adam"
    scheduler: str = "constant"  # "linear" with WARMUP_EPOCH 0 is a constant rate
    clip_grad: float = 1.0  # GRAD_CLIP, GRAD_CLIP_APPLY: True
    adam_betas: list[float] = field(default_factory=lambda: [0.9, 0.9])  # SOLVER.BETA1, BETA2
    amsgrad: bool = True  # the official optimizer.py builds Adam with amsgrad=True
    num_dap_tokens: int = 10  # prompts generated per block
    task_emb: int = 16  # width of the task embedding
    prompt_pool: int = 10  # task keys (and embedding rows): at least the number of tasks
    sim_lambda: float = 0.1  # weight of the key-query cosine subtracted from the loss


@register_learner("dap")
class DAP(PoolPromptLearner):
    config_class = DAPConfig

    def __init__(self, config: DAPConfig, ctx):
        super().__init__(config, ctx)
        if ctx.protocol.planned_tasks > config.prompt_pool:
            raise PilotError(f"DAP keeps one key per task: prompt_pool ({config.prompt_pool}) must be at least the "
                             f"number of tasks ({ctx.protocol.planned_tasks}).")
        self.generated = GeneratedPrompts(self.vit)
        patch = self.vit.patch_embed.patch_size
        self.net["dap"] = PromptGenerator(len(self.vit.blocks), self.generated.num_tokens, ctx.backbone.feature_dim,
                                          config.num_dap_tokens, config.prompt_pool, config.task_emb,
                                          patch[0] if isinstance(patch, tuple) else patch)
        head = self.net["head"]  # the official MLP head with MLP_NUM 0: one Linear, "special_bias"
        nn.init.kaiming_normal_(head.weight, a=0, mode="fan_out")
        nn.init.constant_(head.bias, -math.log((1 - 0.01) / 0.01))
        self.attach()

    @classmethod
    def validate_config(cls, config: DAPConfig) -> None:
        validate_train_config(config)
        if config.batchwise_prompt:
            warnings.warn(f"batchwise_prompt: true (dap): each test batch votes on one task key, so accuracy depends "
                          f"on the test batches (the official: each task's test images alone, batch_size "
                          f"{config.batch_size}); results.json records batch_dependent_evaluation: true.", stacklevel=3)
        if config.num_dap_tokens < 1 or config.task_emb < 1 or config.prompt_pool < 1:
            raise PilotError("num_dap_tokens, task_emb and prompt_pool must be >= 1 (official: 10, 16, 10).")
        if len(config.adam_betas) != 2 or not all(0 <= b < 1 for b in config.adam_betas):
            raise PilotError(f"adam_betas must be two numbers in [0, 1), got {config.adam_betas}.")

    def param_groups(self, parameters):
        if self.config.optimizer == "adam":
            return [{"params": parameters, "betas": tuple(self.config.adam_betas), "amsgrad": self.config.amsgrad}]
        return parameters

    def begin_task(self, task):
        self.net["dap"].downsample.requires_grad_(task.index == 0)

    def prompted_outputs(self, images, query, task):
        generator = self.net["dap"]
        similarity = generator.similarity(query)
        keys = generator.choose(similarity, force_index=None if task is None else task.index,
                                batchwise=self.config.batchwise_prompt)
        if task is None:
            self._choices.append(keys.cpu().unsqueeze(1))
        with self.generated.use(generator, generator.task_embedding(keys)):
            features = self.vit.forward_features(images)
        logits = self.cls_logits(features)
        return logits, self.config.sim_lambda * pull_loss(similarity.gather(1, keys.unsqueeze(1)))

    def predict_tasks(self, splits):
        """As the official evaluation: each task's test images on their own (in batches of ``batch_size``
        where the batch votes)."""
        self._choices = []
        logits = [self.predict(split) for split in splits]
        tasks = torch.repeat_interleave(torch.arange(len(splits)), torch.tensor([len(split) for split in splits]))
        self._report = self.choice_report(torch.cat(self._choices), tasks)
        return logits

    def choice_report(self, choices, tasks) -> dict[str, Any]:
        """Task identification: the share (%) of test images whose key is their own task's."""
        return {"task_identification_accuracy": 100.0 * float((choices[:, 0] == tasks).double().mean())}
