"""LAE (Gao et al., ICCV 2023): Learning-Accumulation-Ensemble with parameter-efficient tuning.

A frozen ViT with a small parameter-efficient module (PET) in two copies: the online PET trains
with a linear head on each task (learning); after every optimiser step the offline PET moves
towards it, offline <- ema_decay * offline + (1 - ema_decay) * online (accumulation); each test
image is classified by whichever copy is more confident: per class, the larger of the two softmax
probabilities, as the official code stacks and max-reduces them (ensemble).

The PET is LAE's "Prefix", the one PILOT's LAE config runs: in each of ``adapt_blocks``, ``pet_length``
key and value prefixes (init U(0, 0.01)) times a learnable scalar per key/value (init 1), in
"compensatory" attention, which rescales the prefix's attention weights to sum to one.

Task rules from the official code (gqk/LAE), where PILOT differs: the offline PET is created as a copy
of the online one when the second task starts (before that, the online PET alone predicts), and only
from the second task on does the PET stay frozen for the first ``num_freeze_epochs`` epochs while the
head adapts. The head, shared by both PETs, is initialised N(0, 0.001) as the official head. PILOT's
LAE (models/lae.py) differs in all three, each one key away: ``offline_from_start`` (the offline PET
is copied at initialisation, EMA-updated from the first step and votes from the first task),
``freeze_first_task`` (the PET is frozen for ``num_freeze_epochs`` in every task) and
``head_init: "kaiming"`` (its SimpleLinear head). Key names and values: PILOT's exps/lae.json.
"""
from __future__ import annotations

import copy
from dataclasses import dataclass, field
from typing import Optional

import torch
from torch import nn

from pilot.data.stream import Task
from pilot.errors import PilotError
from pilot.learners import register_learner
from pilot.learners._gradient import GradientLearner, TrainConfig, validate_train_config
from pilot.learners._prompt import check_blocks
from pilot.modules.heads import HEAD_INITS, linear_head
from pilot.modules.merge import ema_update
from pilot.modules.prompting import PrefixPET, PromptedViT, prefixes_for_blocks


@dataclass
class LAEConfig(TrainConfig):
    tuned_epoch: int = 5
    init_lr: float = 0.0028125
    batch_size: int = 128
    weight_decay: float = 0.0
    min_lr: float = 1e-5
    optimizer: str = "adam"
    scheduler: str = "constant"
    ema_decay: float = 0.9999
    # From the second task on, the PET is frozen (the head alone trains) for this many epochs.
    num_freeze_epochs: int = 3
    # Freeze it so in the first task too (PILOT's rule; the official code trains it there from the first epoch).
    freeze_first_task: bool = False
    # The offline PET from initialisation on, EMA-updated and voting from the first task (PILOT's rule; the
    # official code creates it as a copy of the online PET when the second task starts).
    offline_from_start: bool = False
    # "normal": N(0, 0.001), the official head; "kaiming": Kaiming uniform, zero bias (PILOT's SimpleLinear);
    # or another rule of pilot.modules.heads.init_head.
    head_init: str = "normal"
    pet_cls: str = "Prefix"
    pet_length: int = 10
    # Blocks that get prefixes (the official config key; PILOT hard-codes blocks 0-4).
    adapt_blocks: list[int] = field(default_factory=lambda: [0, 1, 2, 3, 4])


@register_learner("lae")
class LAE(GradientLearner):
    config_class = LAEConfig
    official_variant = "lae"

    def __init__(self, config: LAEConfig, ctx):
        super().__init__(config, ctx)
        vit = self.require_vit()
        self.prompts = PromptedViT(vit, compensated=True)
        vit.requires_grad_(False)  # one copy of the ViT, shared by both PETs
        check_blocks(vit, "adapt_blocks", config.adapt_blocks)
        self.net["online"] = PrefixPET(config.pet_length, vit.embed_dim, len(config.adapt_blocks))
        # a copy of the online PET (the official rule copies it again when task 2 starts)
        self.net["offline"] = copy.deepcopy(self.net["online"]).requires_grad_(False)
        self.net["head"] = linear_head(ctx.backbone.feature_dim, ctx.protocol.num_classes, config.head_init, std=0.001)
        self.net.to(ctx.device)

    @classmethod
    def validate_config(cls, config: LAEConfig) -> None:
        validate_train_config(config)
        if config.pet_cls != "Prefix":
            raise PilotError(f"pet_cls '{config.pet_cls}' is not implemented; lae runs LAE's 'Prefix' PET "
                             f"(the one PILOT's exps/lae.json uses).")
        if config.head_init not in HEAD_INITS:
            raise PilotError(f"head_init must be one of {', '.join(HEAD_INITS)}, got '{config.head_init}'.")
        if config.pet_length < 1 or not 0 <= config.ema_decay <= 1:
            raise PilotError("pet_length must be >= 1 and ema_decay must lie in [0, 1].")
        if config.tuned_epoch and not 0 <= config.num_freeze_epochs < config.tuned_epoch:
            raise PilotError(f"num_freeze_epochs ({config.num_freeze_epochs}) must lie in 0..tuned_epoch - 1 "
                             f"({config.tuned_epoch - 1}): otherwise the PET never trains after the first task.")

    @property
    def has_offline(self) -> bool:
        """The offline PET exists from the second task on (from the start with ``offline_from_start``)."""
        return self.config.offline_from_start or len(self.ctx.protocol.tasks_within(self.num_seen)) > 1

    def trainable(self) -> list[nn.Parameter]:
        return list(self.net["online"].parameters()) + list(self.net["head"].parameters())

    def begin_task(self, task: Task) -> None:
        if task.index == 1 and not self.config.offline_from_start:
            self.net["offline"].load_state_dict(self.net["online"].state_dict())

    def begin_epoch(self, task: Task, epoch: int) -> None:
        # A frozen PET gets no gradient, so the optimiser skips it (the official freeze(pets)).
        frozen = (task.index > 0 or self.config.freeze_first_task) and epoch < self.config.num_freeze_epochs
        self.net["online"].requires_grad_(not frozen)

    def after_step(self, task: Task) -> None:
        if self.has_offline:
            ema_update(self.net["offline"], self.net["online"], self.config.ema_decay)

    def pet_logits(self, images: torch.Tensor, pet: PrefixPET) -> torch.Tensor:
        """Head logits over all classes of the frozen ViT with ``pet``'s prefixes."""
        prefixes = prefixes_for_blocks(pet(images.shape[0]), self.config.adapt_blocks)
        with self.prompts.use(prefixes=prefixes):
            return self.net["head"](self.ctx.backbone(images))

    def train_outputs(self, images: torch.Tensor, labels: torch.Tensor, task: Task):
        logits = self.pet_logits(images, self.net["online"])
        return logits, torch.zeros((), device=logits.device)

    def eval_logits(self, images: torch.Tensor, queries: Optional[torch.Tensor]) -> torch.Tensor:
        """Log of the per-class maximum of the online and offline softmax over the seen classes."""
        probabilities = self.pet_logits(images, self.net["online"])[:, : self.num_seen].float().softmax(dim=1)
        if self.has_offline:
            offline = self.pet_logits(images, self.net["offline"])[:, : self.num_seen].float().softmax(dim=1)
            probabilities = torch.maximum(probabilities, offline)
        return probabilities.log()
