"""SD-LoRA (Wu et al., ICLR 2025): scalable decoupled LoRA, as the official code (WuYichen-97/SD-Lora-CL,
``models/sdlora.py``, ``backbone/lora.py``) does it.

A frozen ViT with LoRA on the queries and values of every block (``pilot.modules.lora``), one pair per task,
and a linear head grown per task (PILOT's SimpleLinear init). While task t trains, its own pair (A Kaiming,
B zero) and a magnitude ``m_t`` train; each earlier pair k contributes its frozen direction
``B_k A_k / (||B_k||_F ||A_k||_F)`` (per block and slice) times a magnitude ``m_k`` that trains too, one scalar
per task shared by every block and slice. As in the official code, which builds a new LoRA ViT at each task,
every magnitude restarts at 0.8 when a task begins; evaluation after task t uses the magnitudes trained in
task t and task t's pair as it trained (not yet normalised). Loss: cross-entropy over the task's own classes.

Defaults: the official ``exps/sdlora_c100.json`` as its code reads it: 20 epochs, SGD lr 8e-3 momentum 0.9,
batch 128; the SGD is built without weight decay and its MultiStepLR milestones (60/120/170, 40/70) lie past
epoch 20, so the rate is constant (the file's "cosine" and ``min_lr`` feed a ``get_scheduler`` that is never
called). Rank 10 is hard-coded there (``rank`` here).

``sd_lora_rr`` is SD-LoRA-RR, the rank reduction the official ``update_network`` holds commented out: rank 10
for tasks 1-4, 8 for tasks 5-8, 6 from task 9 on (``rank_reduction``).

``sd_lora_kd`` is SD-LoRA-KD as the paper gives it (arXiv 2501.13198 Sec. 3.5, Eq. 7-8, Algorithm 1 lines 10-12,
threshold in Sec. 4.1); the official repository has no code for it. After each task t > 1, the new pair's
direction ``d_t`` is fitted by least squares on the earlier pairs' directions (Eq. 7); if the residual
``||d_t - sum_k da_k d_k||_F`` is at most ``kd_threshold`` (9e-4), the new pair and its magnitude are dropped and
every earlier magnitude ``a_k`` becomes ``a_k + da_k`` (Eq. 8). Where the paper is silent, our reading:
one least squares over every block and slice together (``d_k`` stacks them), as Eq. 8 updates magnitudes that
are shared by all of them; ``da_k`` added as fitted (Eq. 8 scales it by neither ``a_t`` nor ``||B_t|| ||A_t||``);
and, as the magnitudes restart at 0.8 every task (official code), each pair keeps the sum of what was absorbed
into it and restarts at 0.8 plus that sum, or the next task would erase the absorbed coefficients.
"""
from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import nn

from pilot.data.stream import Task
from pilot.errors import PilotError
from pilot.learners import register_learner
from pilot.learners._gradient import TrainConfig, validate_train_config
from pilot.learners._lora import LoRALearner
from pilot.modules.lora import fit_last_direction


@dataclass
class SDLoRAConfig(TrainConfig):
    tuned_epoch: int = 20  # official init_epoch and epochs
    init_lr: float = 0.008  # official init_lr and lrate
    batch_size: int = 128
    weight_decay: float = 0.0  # the official SGD is built without it
    optimizer: str = "sgd"
    momentum: float = 0.9
    scheduler: str = "constant"  # official MultiStepLR milestones all lie past the 20 epochs
    rank: int = 10  # hard-coded in the official backbone
    magnitude_init: float = 0.8  # every magnitude, at the start of every task (official ParameterWrapper init)
    # [[first task (0-based), rank], ...]: the current pair's rank from that task on (SD-LoRA-RR); [] keeps ``rank``.
    rank_reduction: list[list[int]] = field(default_factory=list)


@dataclass
class SDLoRARRConfig(SDLoRAConfig):
    rank_reduction: list[list[int]] = field(default_factory=lambda: [[4, 8], [8, 6]])  # official, commented out


@register_learner("sd_lora")
class SDLoRA(LoRALearner):
    config_class = SDLoRAConfig
    official_variant = "default"  # the official data code is PILOT's
    scenarios = ("class", "task")

    lora_slices = ("q", "v")
    head_init = "kaiming"  # PILOT's SimpleLinear

    @classmethod
    def validate_config(cls, config: SDLoRAConfig) -> None:
        validate_train_config(config)
        if config.rank < 1:
            raise PilotError(f"rank must be a positive integer, got {config.rank}.")
        steps = config.rank_reduction
        if any(len(step) != 2 or step[0] < 1 or step[1] < 1 for step in steps) or [s[0] for s in steps] != sorted({s[0] for s in steps}):
            raise PilotError(f"rank_reduction must list [first task (0-based, >= 1), rank >= 1] pairs in increasing task "
                             f"order, e.g. [[4, 8], [8, 6]]; got {steps}.")

    def rank_of(self, task: Task) -> int:
        """The rank of ``task``'s pair: ``rank``, or the last ``rank_reduction`` step reached."""
        ranks = [rank for first, rank in self.config.rank_reduction if task.index >= first]
        return ranks[-1] if ranks else self.config.rank

    def begin_task(self, task: Task) -> None:
        self.task_index = task.index
        lora = self.net["lora"]
        for earlier in range(len(lora)):  # past pairs: frozen directions
            lora.freeze_pair(earlier)
            lora.normalise_pair(earlier)
        lora.add_pair(self.rank_of(task))
        with torch.no_grad():
            for magnitude in lora.magnitudes:
                magnitude.fill_(self.config.magnitude_init).requires_grad_(True)
        self.net["heads"][task.index].requires_grad_(True)

    def trainable(self) -> list[nn.Parameter]:
        lora = self.net["lora"]
        return (lora.pair_parameters(len(lora) - 1) + list(lora.magnitudes)
                + list(self.net["heads"][self.task_index].parameters()))

    def end_task(self, task: Task) -> None:
        self.net["lora"].requires_grad_(False)
        self.net["heads"][task.index].requires_grad_(False)



@register_learner("sd_lora_rr")
class SDLoRARR(SDLoRA):
    config_class = SDLoRARRConfig


@dataclass
class SDLoRAKDConfig(SDLoRAConfig):
    kd_threshold: float = 9e-4  # Sec. 4.1: the largest residual of Eq. 7 at which a new direction is absorbed


@register_learner("sd_lora_kd")
class SDLoRAKD(SDLoRA):
    """SD-LoRA-KD: a new direction that the earlier ones fit within ``kd_threshold`` goes into their magnitudes."""

    config_class = SDLoRAKDConfig

    def __init__(self, config: SDLoRAKDConfig, ctx):
        super().__init__(config, ctx)
        self.absorbed: list[float] = []  # per pair, the coefficients absorbed into its magnitude so far

    @classmethod
    def validate_config(cls, config: SDLoRAKDConfig) -> None:
        super().validate_config(config)
        if not config.kd_threshold >= 0:
            raise PilotError(f"kd_threshold must be a number >= 0 (the paper's is 9e-4), got {config.kd_threshold}.")

    def begin_task(self, task: Task) -> None:
        super().begin_task(task)  # every magnitude at magnitude_init
        with torch.no_grad():
            for magnitude, absorbed in zip(self.net["lora"].magnitudes, self.absorbed):
                magnitude.add_(absorbed)
        self.absorbed.append(0.0)

    def end_task(self, task: Task) -> None:
        super().end_task(task)
        lora = self.net["lora"]
        if len(lora) < 2:
            return
        coefficients, residual = fit_last_direction(lora.direction_gram())  # Eq. 7
        absorbed = residual <= self.config.kd_threshold
        self.ctx.log.info(f"{self.task_tag}: least-squares residual of the new direction {residual:.3g} "
                          f"(kd_threshold {self.config.kd_threshold:g}): {'absorbed' if absorbed else 'kept'}")
        if not absorbed:
            return
        lora.remove_last_pair()  # Eq. 8
        self.absorbed.pop()
        with torch.no_grad():
            for index, (magnitude, coefficient) in enumerate(zip(lora.magnitudes, coefficients.tolist())):
                magnitude.add_(coefficient)
                self.absorbed[index] += coefficient

    def state_dict(self):
        return {**super().state_dict(), "absorbed": torch.tensor(self.absorbed, dtype=torch.float64)}

    def load_state_dict(self, state):
        super().load_state_dict(state)
        self.absorbed = state["absorbed"].tolist()
