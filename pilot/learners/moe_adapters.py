"""MoE-Adapters (Yu et al., CVPR 2024): mixture-of-experts adapters on a frozen CLIP, as the official
class-incremental code does it (JiazuoYu/MoE-Adapters4CL@4572d97, ``cil/clip/model.py ResidualAttentionBlock``,
``cil/clip/adapter.py``, ``cil/continual_clip/models.py ClassIncremental.train``; defaults of
``cil/configs/class/cifar100_10-10-MoE-Adapters.yaml``).

CLIP stays frozen (``logit_scale`` too); every block of both towers gets a router, a noise weight and
``experts_num`` AdaptFormer adapters (``pilot.modules.moe``), one set shared by all tasks and trained on each
in turn. Per task: ``tuned_epoch`` (the code hard-codes 1) passes over the task's images plus one step (its
loop runs ``range(total_iterations + 1)``), AdamW, a linear warm-up of ``warmup_iterations`` steps then
cosine to 0, stepped per iteration; noisy gating and adapter dropout while training. With
``s = exp(logit_scale)``::

    loss = CE_ls(s · norm(img(x)) · norm(txt(current task's prompts))ᵀ, y − first class of the task)

Prediction: ``s · norm(img(x)) · class weightsᵀ`` over the seen classes, both towers through the adapters
(each class's weight its prompts' normalised features averaged and renormalised; one template, as the code,
gives ``norm(txt(prompt))``).

The paper's distribution-discriminative auto-selector (DDAS: autoencoders routing out-of-distribution
inputs to the frozen CLIP) and its 22 experts are the multi-domain (MTIL) setting's; the class-incremental
code has neither (one router, 2 experts, no DDAS; issues #9, #14), so neither is here.

Departures: the code builds its blocks once with ``is_train`` frozen at True, so its gates stay noisy at
test time too; here noise is off in evaluation, as the code's docstring and the paper intend
(``noisy_evaluation: true`` keeps it on, as the code runs). The training transform is the run's own with the
code's crop scale (RandomResizedCrop scale 0.9-1; pilot's adds a horizontal flip) and evaluation uses the
run's eval transform (the code evaluates through its training transform); batches, gate noise and dropout
come from the run's generator, so a resumed run equals an uninterrupted one; every expert runs on every
sample (an unchosen expert's gate is 0, so the output is the code's).
"""
from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch.nn import functional as F

from pilot.clip import class_embeddings, endless, require_text, warmup_cosine_lr, zero_shot_logits
from pilot.config import LearnerConfig
from pilot.data.stream import Split, Task
from pilot.errors import PilotError
from pilot.learners import register_learner
from pilot.learners._base import Learner, require_finite
from pilot.modules.adapters import freeze
from pilot.modules.moe import MoEAdapterSet

TRAIN_CROP_SCALE = (0.9, 1.0)  # the code's CLIP training transform: RandomResizedCrop(224, scale=(0.9, 1.0))


@dataclass
class MoEAdaptersConfig(LearnerConfig):
    """``cifar100_10-10-MoE-Adapters.yaml`` and the constants of ``ResidualAttentionBlock``."""

    tuned_epoch: int = 1  # ``EPOCH = 1`` hard-coded in ClassIncremental.train
    init_lr: float = 0.001  # cfg lr
    batch_size: int = 128  # cfg batch_size
    weight_decay: float = 0.0  # cfg weight_decay
    warmup_iterations: int = 30  # utils.cosine_lr(optimizer, lr, 30, total_iterations)
    ls: float = 0.0  # label smoothing of the cross-entropy (cfg ls)
    experts_num: int = 2  # experts per block (the CIL code; 22 in MTIL)
    top_k: int = 2  # experts each sample mixes
    ffn_num: int = 64  # adapter bottleneck
    adapter_scale: float = 0.1  # adapter_scalar
    adapter_dropout: float = 0.1  # dropout inside each adapter (training only)
    noisy_evaluation: bool = False  # the code's gates stay noisy at test time (is_train frozen at True)


@register_learner("moe_adapters")
class MoEAdapters(Learner):
    """MoE-Adapters: noisy top-k routed adapter experts in every block of a frozen CLIP's two towers."""

    config_class = MoEAdaptersConfig
    needs_text = True
    scenarios = ("class", "task")
    domain_refusal = "its loss covers each task's own new classes (the official class-incremental code), which a domain stream does not bring"

    def __init__(self, config: MoEAdaptersConfig, ctx):
        super().__init__(config, ctx)
        tower = require_text(ctx, self.name).tower
        self.tokenizer = tower.tokenizer
        self.clip = tower.model.to(ctx.device)  # the whole CLIP, frozen (its image tower is the backbone)
        freeze(self.clip)
        try:
            self.moe = MoEAdapterSet([self.clip.visual.transformer, self.clip.transformer], config.experts_num,
                                     config.top_k, config.ffn_num, config.adapter_scale,
                                     config.adapter_dropout).to(ctx.device)
        except (AttributeError, ValueError) as err:
            raise PilotError(f"moe_adapters attaches to open_clip's stock CLIP transformer blocks, which this "
                             f"backbone lacks ({err}): use a ViT CLIP such as 'open_clip:ViT-B-16:openai'.") from None
        self.moe.eval()

    @classmethod
    def validate_config(cls, config: MoEAdaptersConfig) -> None:
        if config.tuned_epoch < 1 or config.batch_size < 1 or config.init_lr <= 0 or config.warmup_iterations < 1:
            raise PilotError("tuned_epoch, batch_size and warmup_iterations must be at least 1 and init_lr above 0.")
        if not 1 <= config.top_k <= config.experts_num or config.ffn_num < 1:
            raise PilotError(f"top_k must be between 1 and experts_num ({config.experts_num}) and ffn_num at least 1, "
                             f"got top_k {config.top_k} and ffn_num {config.ffn_num}.")
        if not 0 <= config.ls < 1 or not 0 <= config.adapter_dropout < 1:
            raise PilotError("ls and adapter_dropout must be in [0, 1).")

    def text_features(self, names: Sequence[str]) -> torch.Tensor:
        """The adapted text tower's features ``[C, T, D]`` of ``names`` under the run's templates."""
        prompts = [template.format(name) for name in names for template in self.ctx.templates]
        rows = self.clip.encode_text(self.tokenizer(prompts).to(self.ctx.device))
        return rows.view(len(names), len(self.ctx.templates), -1)

    def fit(self, task: Task) -> None:
        ctx, config = self.ctx, self.config
        names = ctx.class_names[task.classes.start:task.classes.stop]
        loader = ctx.train_loader(task.train, config.batch_size, ctx.train_transform(TRAIN_CROP_SCALE))
        batches = endless(loader)
        parameters = list(self.moe.parameters())
        optimizer = torch.optim.AdamW(parameters, lr=config.init_lr, weight_decay=config.weight_decay)
        total = config.tuned_epoch * len(loader)
        scale = self.clip.logit_scale.exp().detach()
        seed = int(torch.randint(2**62, (1,), generator=ctx.generator))
        device = ctx.device
        with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []), self.moe.switched_on():
            torch.manual_seed(seed)  # gate noise and dropout: the run's draws, so resuming repeats them
            self.moe.train()
            self.moe.noisy = True
            for step in range(total + 1):
                for group in optimizer.param_groups:
                    group["lr"] = warmup_cosine_lr(config.init_lr, config.warmup_iterations, total, step)
                images, labels, _ = next(batches)
                image = F.normalize(self.clip.encode_image(images.to(device)), dim=-1)
                logits = scale * image @ class_embeddings(self.text_features(names)).T
                loss = F.cross_entropy(logits, labels.to(device) - task.classes.start, label_smoothing=config.ls)
                require_finite(loss.detach(), "loss", f"moe_adapters task {task.index + 1}, step {step + 1}")
                optimizer.zero_grad(set_to_none=True)
                loss.backward()
                optimizer.step()
            self.moe.eval()
            self.moe.noisy = False

    @torch.no_grad()
    def predict(self, split: Split) -> torch.Tensor:
        scale = self.clip.logit_scale.exp()
        with self.moe.switched_on():
            self.moe.noisy = self.config.noisy_evaluation
            weights = class_embeddings(self.text_features(self.ctx.class_names))
            logits = self.ctx.encode(lambda images: zero_shot_logits(self.clip.encode_image(images), weights, scale), split)
            self.moe.noisy = False
        return logits

    def state_dict(self):
        return {"moe": self.moe.state_dict()}

    def load_state_dict(self, state):
        self.moe.load_state_dict(state["moe"])
