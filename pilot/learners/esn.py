"""ESN (Wang et al., AAAI 2023, iamwangyabin/ESN): a frozen ViT with prompt tokens, and one isolated
classifier per task (``pilot.modules.energy.TaskAttentionHead``: a task token attending to the ViT's
output tokens, then a linear layer over the task's classes), combined at test time by an energy vote.

As the official code (``main.py``, ``networks.py``, ``trainer.py``):
* ``prompt_length`` tokens follow the class token (no position embedding); they train on the first task
  and go on training in every later task (the official copies the previous task's trained prompts, which
  keep ``requires_grad``); the latest prompts serve every head at test time;
* the heads read the last block's tokens before the final norm;
* loss on task t: cross-entropy over head t + ``lamda`` x (free energy - ``anchor_energy``)^2;
* after task t > 0, the temperature (of ``temperatures``) under which head t has the largest energy
  ``logsumexp(logits / T)`` for the most of task t's training images (test transform) joins the
  selected ones (task 0: 0.001); a test image goes to the head most of the distinct selected
  temperatures pick, and its prediction is that head's argmax.
``prompt_distillation`` adds the MSE between the tokens under the previous task's prompts (no gradient)
and under the current ones: ``networks.py`` computes it only when ``pre_vitprompt`` is set, which the
official ``main.py`` never does, so it is off by default.

Logits: the chosen head's logits rank above every other head's (each head's are shifted below them),
so the argmax is ESN's prediction and within a task's classes the order is that task's head's (its
task-incremental accuracy). In a domain stream every head covers every class (the official ``--dil``),
and the logits are the chosen head's.
Defaults: README's CIFAR-100 command (``--max_epochs 30``), ``main.py`` and ``trainer.py``.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Optional

import torch
import torch.nn.functional as F
from torch import nn

from pilot.errors import PilotError
from pilot.learners import register_learner
from pilot.learners._gradient import GradientLearner, TrainConfig
from pilot.modules.energy import CANDIDATE_TEMPERATURES, EnergyVote, TaskAttentionHead, energy_alignment_loss, head_energies
from pilot.modules.prompting import PromptedViT


@dataclass
class ESNConfig(TrainConfig):
    tuned_epoch: int = 30  # README: --max_epochs 30 for CIFAR-100
    init_lr: float = 0.01  # main.py --lr
    batch_size: int = 128  # main.py DataLoader
    weight_decay: float = 5e-4  # trainer.py weight_decay=0.0005
    optimizer: str = "sgd"  # networks.py: SGD, momentum 0.9
    momentum: float = 0.9
    scheduler: str = "cosine"  # CosineAnnealingLR(T_max=max_epoch), eta_min 0
    min_lr: float = 0.0
    prompt_length: int = 100  # networks.py: nn.Linear(embed_dim, 100) as the prompt tokens
    anchor_energy: float = -10.0  # main.py --anchor_energy
    energy_beta: float = 1.0  # main.py --energy_beta
    lamda: float = 0.1  # main.py --lamda: weight of the energy alignment
    temperatures: list[float] = field(default_factory=lambda: list(CANDIDATE_TEMPERATURES))  # "fast mode"
    head_num_heads: int = 12  # attention heads of each task's class-attention block
    prompt_distillation: bool = False  # the MSE term, inactive in the official runs (see the module's doc)


@register_learner("esn")
class ESN(GradientLearner):
    config_class = ESNConfig
    scenarios = ("class", "domain", "task")

    def __init__(self, config: ESNConfig, ctx):
        super().__init__(config, ctx)
        self.vit = self.require_vit()
        self.vit.requires_grad_(False)
        dim = ctx.backbone.feature_dim
        if getattr(self.vit, "cls_token", None) is None:
            raise PilotError("esn starts each task token from the ViT's class token; choose a ViT with one.")
        if dim % config.head_num_heads:
            raise PilotError(f"head_num_heads ({config.head_num_heads}) must divide the backbone's width ({dim}).")
        self.prompts = PromptedViT(self.vit)
        self.net["prompt"] = nn.Linear(dim, config.prompt_length, bias=False)  # its weight: the prompt tokens
        self.net["heads"] = nn.ModuleList()
        self.head_classes: list[tuple[int, int]] = []  # each head's classes, [start, stop)
        self.vote = EnergyVote(config.temperatures)
        self._previous_prompt: Optional[torch.Tensor] = None
        self._chosen: list[torch.Tensor] = []  # per evaluation batch: the head each image went to
        self._report: dict = {}
        self.net.to(ctx.device)

    @classmethod
    def validate_config(cls, config: ESNConfig) -> None:
        super().validate_config(config)
        if config.prompt_length < 0:
            raise PilotError(f"prompt_length must be >= 0, got {config.prompt_length}.")
        if not config.temperatures or any(t <= 0 for t in config.temperatures):
            raise PilotError(f"temperatures must be a non-empty list of positive numbers, got {config.temperatures}.")
        if config.energy_beta <= 0 or config.head_num_heads < 1:
            raise PilotError("energy_beta must be > 0 and head_num_heads >= 1.")

    def tokens(self, images: torch.Tensor, prompt: torch.Tensor) -> torch.Tensor:
        """The last block's output tokens [B, N, D] (before the final norm) with ``prompt`` [L, D] after the
        class token."""
        captured = []
        hook = self.vit.blocks.register_forward_hook(lambda module, args, output: captured.append(output))
        try:
            with self.prompts.use(prompt_tokens=prompt.expand(images.shape[0], -1, -1)):
                self.vit.forward_features(images)
        finally:
            hook.remove()
        return captured[0]

    def begin_task(self, task):
        heads = self.net["heads"]
        heads.append(TaskAttentionHead(self.vit.cls_token, len(task.classes), self.config.head_num_heads).to(self.ctx.device))
        self.head_classes.append((task.classes.start, task.classes.stop))
        self._previous_prompt = self.net["prompt"].weight.detach().clone() if task.index > 0 else None

    def trainable(self):
        return [*self.net["heads"][-1].parameters(), *self.net["prompt"].parameters()]

    def train_outputs(self, images, labels, task):
        tokens = self.tokens(images, self.net["prompt"].weight)
        head_logits = self.net["heads"][-1](tokens)
        logits = head_logits.new_zeros(len(images), self.ctx.protocol.num_classes)
        logits[:, task.classes.start:task.classes.stop] = head_logits  # the loss masks the rest
        extra = self.config.lamda * energy_alignment_loss(head_logits.float(), self.config.anchor_energy,
                                                          self.config.energy_beta)
        if self._previous_prompt is not None and self.config.prompt_distillation:
            with torch.no_grad():
                previous = self.tokens(images, self._previous_prompt)
            extra = extra + F.mse_loss(tokens, previous)
        return logits, extra

    def all_head_logits(self, images: torch.Tensor) -> list[torch.Tensor]:
        """Every head's logits under the latest prompts."""
        tokens = self.tokens(images, self.net["prompt"].weight)
        return [head(tokens).float() for head in self.net["heads"]]

    def end_task(self, task):
        energies = None
        if task.index > 0:
            candidates = self.vote.candidates
            flat = self.ctx.encode(lambda images: head_energies(self.all_head_logits(images), candidates).flatten(1),
                                   task.train, desc="energies")
            energies = flat.view(len(flat), -1, len(candidates))
        chosen = self.vote.select(energies, task.index)
        self.ctx.log.info(f"{self.task_tag}: temperature {chosen} selected; voting with {self.vote.temperatures}")

    def eval_logits(self, images, queries):
        head_logits = self.all_head_logits(images)
        chosen = self.vote.vote(head_logits)
        self._chosen.append(chosen.cpu())
        if self.ctx.protocol.scenario == "domain":  # every head covers every class
            return torch.stack(head_logits, dim=1)[torch.arange(len(images)), chosen]
        logits = torch.cat(head_logits, dim=1)
        span = (logits.max(dim=1).values - logits.min(dim=1).values + 1).unsqueeze(1)
        owner = torch.cat([torch.full((stop - start,), h) for h, (start, stop) in enumerate(self.head_classes)])
        return logits - span * (owner.to(logits.device) != chosen.unsqueeze(1))

    def predict_tasks(self, splits):
        self._chosen = []
        logits = [self.predict(split) for split in splits]
        # the splits are the seen tasks' test images, in task order
        own = torch.repeat_interleave(torch.arange(len(splits)), torch.tensor([len(split) for split in splits]))
        self._report = {"task_identification_accuracy": 100.0 * float((torch.cat(self._chosen) == own).double().mean()),
                        "temperatures": self.vote.temperatures}
        return logits

    def evaluation_report(self):
        return self._report

    def state_dict(self):
        return {**super().state_dict(), "head_classes": [list(c) for c in self.head_classes],
                "vote": self.vote.state_dict()}

    def load_state_dict(self, state):
        for start, stop in state["head_classes"]:
            self.net["heads"].append(TaskAttentionHead(self.vit.cls_token, stop - start, self.config.head_num_heads))
        self.net.to(self.ctx.device)
        self.head_classes = [tuple(c) for c in state["head_classes"]]
        self.vote.load_state_dict(state["vote"])
        super().load_state_dict(state)
