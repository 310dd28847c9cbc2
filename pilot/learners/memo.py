"""MEMO, memory-efficient expandable model (Zhou et al., ICLR 2023), as LAMDA-PILOT's ``models/memo.py`` with its
ViT split (``backbone/vit_memo.py``, ``AdaptiveNet``): DER's growing branches (pilot.learners.der) on top of shared
generic blocks. The ViT's patch embedding and all blocks but the last are generic, shared by every task; each
task adds a specialised copy of the last block, with the final norm and the class-token pooling, started from the
previous task's; the head reads every specialised copy's features side by side, and from the second task the
auxiliary loss is weighted by ``alpha_aux``. The generic blocks train with the first task and are frozen after it
(``train_base`` keeps them training); earlier specialised blocks are frozen (``train_adaptive`` keeps them
training). Settings: finetune's SGD keys, ``scheduler`` ("steplr" or "cosine"), and the memory keys.

As PILOT: the first specialised block is freshly initialised (PyTorch's default init of its layers), not the
pre-trained last block: PILOT's ``Specialized_Vit`` holds it as ``last_block``, which the pre-trained weights,
written to ``blocks.*``, never reach; its final norm is the pre-trained one. PILOT's ``skip`` (load a checkpoint
of its own finetune run for the first task) is refused when true. PILOT's NME accuracy is not reported (its MEMO
keeps the class mean of only the last class of each task).
"""
from __future__ import annotations

import copy
import dataclasses
from dataclasses import dataclass
from typing import Optional

import torch
from timm.models.vision_transformer import VisionTransformer, global_pool_nlc
from torch import nn

from pilot.data.stream import Task
from pilot.errors import PilotError
from pilot.learners import register_learner
from pilot.learners._gradient import TrainConfig
from pilot.learners.der import Der, DerConfig
from pilot.modules.branches import train_if_trainable

SCHEDULERS = ("steplr", "cosine")


@dataclass
class MemoConfig(DerConfig):
    """PILOT's exps/memo.json: DER's keys (20 epochs on later tasks) and MEMO's."""

    epochs: int = 20
    # Each task's learning-rate schedule: "steplr" (the milestones keys) or "cosine" (annealed to 0).
    scheduler: str = "steplr"
    # PILOT's cosine period of later tasks (the first task's is init_epoch); pilot anneals over their epochs.
    t_max: Optional[int] = None
    alpha_aux: float = 1.0  # weight of the auxiliary loss
    train_base: bool = False  # keep training the generic blocks after the first task
    train_adaptive: bool = False  # keep training earlier tasks' specialised blocks
    skip: bool = False  # PILOT: take the first task from a saved finetune checkpoint (not supported)


class GenericBlocks(nn.Module):
    """PILOT's ``Generalized_Vit``: a timm ViT without its last block and final norm, giving every token."""

    def __init__(self, vit: VisionTransformer) -> None:
        super().__init__()
        vit.blocks = vit.blocks[:-1]
        vit.norm = nn.Identity()
        self.vit = vit

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.vit.forward_features(images)


class SpecialisedBlock(nn.Module):
    """PILOT's ``Specialized_Vit``: a ViT's last block (freshly initialised), its final norm and its pooling, on the
    generic blocks' tokens."""

    def __init__(self, vit: VisionTransformer) -> None:
        super().__init__()
        self.block = copy.deepcopy(vit.blocks[-1])
        for layer in self.block.modules():  # PyTorch's default init: what PILOT's last_block starts from
            if hasattr(layer, "reset_parameters"):
                layer.reset_parameters()
        self.norm = copy.deepcopy(vit.norm)
        self.fc_norm = copy.deepcopy(vit.fc_norm)
        self.pool, self.prefix_tokens = vit.global_pool, vit.num_prefix_tokens

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        pooled = global_pool_nlc(self.norm(self.block(tokens)), pool_type=self.pool, num_prefix_tokens=self.prefix_tokens)
        return self.fc_norm(pooled)


@register_learner("memo")
class Memo(Der):
    config_class = MemoConfig

    def __init__(self, config: MemoConfig, ctx):
        super().__init__(config, ctx)
        vit = self.require_vit()
        if len(vit.blocks) < 2 or vit.attn_pool is not None or vit.global_pool not in ("token", "avg"):
            raise PilotError(f"memo splits a ViT into generic blocks and a specialised last block, pooled by class "
                             f"token or average: '{ctx.experiment.backbone_type}' has {len(vit.blocks)} block(s) and "
                             f"pooling '{vit.global_pool}'. Choose a ViT with at least 2 blocks and token or "
                             f"average pooling.")
        self.specialised = SpecialisedBlock(vit).to(ctx.device)  # the first task's
        self.net["generic"] = GenericBlocks(vit)

    @classmethod
    def settings(cls, config: MemoConfig, first_task: bool) -> TrainConfig:
        return dataclasses.replace(super().settings(config, first_task), scheduler=config.scheduler)

    @classmethod
    def validate_config(cls, config: MemoConfig) -> None:
        if config.scheduler not in SCHEDULERS:
            raise PilotError(f"scheduler must be one of {', '.join(SCHEDULERS)} for memo, got '{config.scheduler}'.")
        if config.scheduler == "cosine" and config.t_max != config.epochs:
            raise PilotError(f"scheduler \"cosine\" anneals each later task over its epochs ({config.epochs}): set "
                             f"t_max to {config.epochs} (PILOT's cosine period), or use scheduler \"steplr\".")
        if config.alpha_aux < 0:
            raise PilotError(f"alpha_aux (the auxiliary loss's weight) must be 0 or more, got {config.alpha_aux}.")
        if config.skip:
            raise PilotError("skip loads a checkpoint of PILOT's own finetune run for the first task, which pilot "
                             "does not have: set skip to false.")
        super().validate_config(config)

    def first_branch(self) -> nn.Module:
        return self.specialised

    def features(self, images: torch.Tensor) -> torch.Tensor:
        """Every specialised block's features on the shared generic tokens (PILOT's ``extract_vector``)."""
        return self.net["branches"](self.net["generic"](images))

    def aux_weight(self) -> float:
        return self.config.alpha_aux

    def set_old_trainable(self, task: Task) -> None:
        """PILOT's ``incremental_train`` and ``after_task``: earlier specialised blocks train only with
        ``train_adaptive``, the generic blocks after the first task only with ``train_base``."""
        self.net["branches"].set_old_trainable(self.config.train_adaptive)
        self.net["generic"].requires_grad_(task.index == 0 or self.config.train_base)

    def set_train_mode(self, training: bool) -> None:
        super().set_train_mode(training)
        train_if_trainable(self.net["generic"], training)
