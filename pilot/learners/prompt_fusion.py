"""PromptFusion (Chen et al., ECCV 2024): a CLIP Stabilizer and a ViT Booster, their logits mixed, as the official
code does it (HaoranChen/PromptFusion@11021f5, ``train_pf.py``, ``model.py Clip_PF``, ``prompt.py``,
``main.py``; defaults of ``config/pf_cifar.json``).

Two backbones, ``backbone_type: [<open_clip CLIP>, <timm ViT>]``, both frozen:

- Stabilizer (CLIP, CoOp-style): each class of a task gets its own ``M`` learnable context vectors (normal,
  std 0.01), which replace the first ``M`` of ``2M`` placeholder tokens "X" in "X … X <name>." before CLIP's
  text transformer (``clip_text_prompt_genarator``); earlier tasks' contexts are frozen. The image side
  inserts ``clip_image_prompt_length`` learnable tokens (``randn``) after the class token and pools the mean
  of their outputs (``VisionEncoder``). CLIP logits ``s · norm(img) · norm(txt)ᵀ`` over the seen classes.
- Booster (VPT on the ViT): ``vpt_prompt_length`` prompt tokens (uniform in [-1, 1]) after the class token,
  the mean of their outputs through a new linear head over all classes, sliced to the seen ones.

``logits = (1 − σ(λ)) · CLIP logits + σ(λ) · ViT logits`` with λ learnable (init 1). The loss is
``NLL(log_softmax(logits) ⊙ W, y)``; from the second task ``W = [θ / σ(β), σ(α)]`` with ``θ = t / 2`` (task
index t from 0), ``α`` ``[batch, increment]`` (init 1, kept across tasks) and ``β`` ``[batch, old classes]``
(init 1, new each task): per batch position and class, so batches are whole (``drop_last``). AdamW
(lr 0.002, weight decay 1e-4) over the prompts, contexts, head, λ, α, β, gradient norm clipped to 1.0,
cosine over ``tuned_epoch`` (3) epochs, batch 32; the rehearsal memory's exemplars (herding on CLIP's frozen
image features) join each later task's data, ``memory_size`` 5000.

Departures: the ViT's prompt tokens get no position embedding (pilot's ``PromptedViT`` inserts them after the
position embeddings; the code widens its frozen ``pos_embed`` by the prompt length, which timm fills by
resampling the pre-trained one); both halves see the same images under the run's preprocessing, which is
CLIP's (the code's dataset file, which sets the transform, is not in its repository); classes in pilot's
seed-1993 order, exemplars chosen by pilot's herding (PILOT's), not continuum's.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import torch
from timm.models.vision_transformer import VisionTransformer
from torch import nn
from torch.nn import functional as F

from pilot.clip import is_open_clip
from pilot.data.stream import Split, Task
from pilot.errors import PilotError
from pilot.learners import register_learner
from pilot.learners._gradient import GradientLearner, TrainConfig, validate_train_config
from pilot.modules.prompting import PromptedViT


@dataclass
class PromptFusionConfig(TrainConfig):
    """``config/pf_cifar.json`` (CIFAR-100, 10 steps)."""

    tuned_epoch: int = 3  # epoch
    init_lr: float = 0.002  # learning_rate
    batch_size: int = 32  # the DataLoader's batch (split over its 2 GPUs by DataParallel)
    weight_decay: float = 1e-4
    optimizer: str = "adamw"
    scheduler: str = "cosine"  # CosineAnnealingLR(T_max=epoch), stepped per epoch
    clip_grad: float = 1.0  # clip_grad_norm_(..., 1.0)
    M: int = 30  # learnable text context vectors per class
    vpt_prompt_length: int = 30  # the ViT's prompt tokens
    clip_image_prompt_length: int = 30  # CLIP's image prompt tokens
    lambda_init: float = 1.0  # λ before the sigmoid (``torch.ones([1])``)


def fuse_logits(clip_logits: torch.Tensor, vit_logits: torch.Tensor, lambda_: torch.Tensor) -> torch.Tensor:
    """``(1 − σ(λ)) · clip + σ(λ) · vit``."""
    weight = torch.sigmoid(lambda_)
    return (1 - weight) * clip_logits + weight * vit_logits


def weighted_nll(logits: torch.Tensor, labels: torch.Tensor, weight: Optional[torch.Tensor]) -> torch.Tensor:
    """``NLL(log_softmax(logits) ⊙ weight, labels)`` (no weight on the first task)."""
    log_probabilities = F.log_softmax(logits, dim=1)
    return F.nll_loss(log_probabilities if weight is None else log_probabilities * weight, labels)


class Stabilizer(nn.Module):
    """CLIP (frozen) with learnable image prompt tokens and per-class text contexts; holds only those."""

    def __init__(self, clip: nn.Module, tokenizer, image_prompt_length: int, context_length: int):
        super().__init__()
        self.clip = [clip]  # not a submodule: its weights are the backbone's, frozen and not checkpointed here
        self.tokenizer = tokenizer
        self.context_length = context_length
        width = clip.visual.class_embedding.shape[-1]
        self.image_prompt = nn.Parameter(torch.randn(1, image_prompt_length, width))
        self.contexts = nn.ParameterList()  # one [classes of the task, M, text width] per task
        self.tokens: Optional[torch.Tensor] = None  # the seen classes' prompts, tokenised

    def add_task(self, names: list[str]) -> None:
        clip = self.clip[0]
        for old in self.contexts:
            old.requires_grad_(False)
        context = torch.empty(len(names), self.context_length, clip.token_embedding.weight.shape[1],
                              device=self.image_prompt.device)
        self.contexts.append(nn.Parameter(nn.init.normal_(context, std=0.01)))
        placeholder = " ".join(["X"] * (2 * self.context_length))
        tokens = self.tokenizer([f"{placeholder} {name.replace('_', ' ')}." for name in names]).to(self.image_prompt.device)
        self.tokens = tokens if self.tokens is None else torch.cat([self.tokens, tokens])

    def text_features(self) -> torch.Tensor:
        """The seen classes' text features: context vectors in place of the first M placeholders."""
        clip, tokens = self.clip[0], self.tokens
        with torch.no_grad():
            embedded = clip.token_embedding(tokens)
        x = torch.cat([embedded[:, :1], torch.cat(list(self.contexts)), embedded[:, 1 + self.context_length:]], dim=1)
        x = clip.transformer(x + clip.positional_embedding, attn_mask=clip.attn_mask)
        x = clip.ln_final(x)
        return x[torch.arange(len(x)), tokens.argmax(dim=-1)] @ clip.text_projection

    def image_features(self, images: torch.Tensor) -> torch.Tensor:
        """Prompt tokens after the class token; the mean of their outputs, through ln_post and the projection."""
        visual = self.clip[0].visual
        x = visual._embeds(images)
        length = self.image_prompt.shape[1]
        x = torch.cat([x[:, :1], self.image_prompt.expand(len(x), -1, -1).to(x.dtype), x[:, 1:]], dim=1)
        x = visual.transformer(x)
        return visual.ln_post(x[:, 1:1 + length].mean(dim=1)) @ visual.proj

    def logits(self, images: torch.Tensor) -> torch.Tensor:
        image = F.normalize(self.image_features(images), dim=-1)
        text = F.normalize(self.text_features(), dim=-1)
        return self.clip[0].logit_scale.exp() * image @ text.T


class Booster(nn.Module):
    """VPT on a frozen timm ViT: prompt tokens after the class token, their outputs' mean, a linear head."""

    def __init__(self, vit: nn.Module, prompt_length: int, num_classes: int):
        super().__init__()
        self.vit = [vit]  # the backbone's, frozen
        self.handle = PromptedViT(vit)
        self.prompt = nn.Parameter(torch.empty(prompt_length, vit.embed_dim).uniform_(-1, 1))
        self.head = nn.Linear(vit.embed_dim, num_classes)  # timm's init of a new head (the code's is new: 100 classes)
        nn.init.trunc_normal_(self.head.weight, std=0.02)
        nn.init.zeros_(self.head.bias)

    def logits(self, images: torch.Tensor) -> torch.Tensor:
        with self.handle.use(prompt_tokens=self.prompt.expand(len(images), -1, -1)):
            tokens = self.vit[0].forward_features(images)
        return self.head(tokens[:, self.handle.prompt_slice(self.prompt.shape[0])].mean(dim=1))


@register_learner("prompt_fusion")
class PromptFusion(GradientLearner):
    config_class = PromptFusionConfig
    uses_memory = True
    mask_old_classes = False  # every seen class in the loss, as the code
    drop_last = True  # the loss weights are per batch position: the code's loader drops the last batch
    backbone_roles = ("an open_clip CLIP (the Stabilizer)", "a timm ViT (the Booster)")

    def __init__(self, config: PromptFusionConfig, ctx):
        super().__init__(config, ctx)
        clip_member, vit_member = self.members()
        sizes = set(ctx.protocol.task_sizes)
        if len(sizes) > 1:
            raise PilotError(f"prompt_fusion's loss weights (alpha) hold one column per class of a task, so every task "
                             f"must bring as many classes (the code's increment); got task sizes "
                             f"{list(ctx.protocol.task_sizes)}. Set init_cls equal to increment.")
        self.increment = sizes.pop()
        tower = clip_member.text
        tower.model.to(ctx.device).requires_grad_(False)  # the whole CLIP (its text side is not the backbone's)
        vit_member.requires_grad_(False)
        self.net["stabilizer"] = Stabilizer(tower.model, tower.tokenizer, config.clip_image_prompt_length, config.M)
        self.net["booster"] = Booster(vit_member.model, config.vpt_prompt_length, ctx.protocol.num_classes)
        self.net["weights"] = nn.ParameterDict({
            "lambda_": nn.Parameter(torch.full((1,), config.lambda_init)),
            "alpha": nn.Parameter(torch.ones(config.batch_size, self.increment)),
            "beta": nn.Parameter(torch.ones(config.batch_size, 0))})
        self.net.to(ctx.device)

    def members(self):
        """The CLIP and the ViT of ``backbone_type`` (the config has checked that it lists two)."""
        backbone = self.ctx.backbone
        clip_member, vit_member = backbone.members
        if clip_member.text is None or not is_open_clip(self.ctx.experiment.backbone_type[0]):
            why = clip_member.text_missing or "it is not an open_clip model"
            raise PilotError(f"prompt_fusion's first backbone must be an open_clip CLIP with its text tower ({why}): "
                             f"set backbone_type to ['open_clip:ViT-B-16:openai', 'vit_base_patch16_224'].")
        if not isinstance(vit_member.model, VisionTransformer):
            raise PilotError(f"prompt_fusion's second backbone must be a timm VisionTransformer (its VPT Booster), got "
                             f"{type(vit_member.model).__name__}: e.g. 'vit_base_patch16_224'.")
        return clip_member, vit_member

    @classmethod
    def validate_config(cls, config: PromptFusionConfig) -> None:
        validate_train_config(config)
        if min(config.M, config.vpt_prompt_length, config.clip_image_prompt_length) < 1:
            raise PilotError("M, vpt_prompt_length and clip_image_prompt_length must be at least 1.")

    def begin_task(self, task: Task) -> None:
        """New contexts for the task's classes, a new β (one column per old class); θ = t / 2."""
        seed = int(torch.randint(2**62, (1,), generator=self.ctx.generator))
        with torch.random.fork_rng(devices=[self.ctx.device] if self.ctx.device.type == "cuda" else []):
            torch.manual_seed(seed)  # the new contexts' draws: the run's, so resuming repeats them
            self.net["stabilizer"].add_task(self.ctx.class_names[task.classes.start:task.classes.stop])
        self.net["weights"]["beta"] = nn.Parameter(torch.ones(self.config.batch_size, task.num_old, device=self.ctx.device))
        self.theta = task.index / 2

    def trainable(self) -> list[nn.Parameter]:
        stabilizer, booster, weights = self.net["stabilizer"], self.net["booster"], self.net["weights"]
        return [stabilizer.image_prompt, stabilizer.contexts[-1], booster.prompt, *booster.head.parameters(),
                *weights.values()]

    def logits(self, images: torch.Tensor) -> torch.Tensor:
        clip_logits = self.net["stabilizer"].logits(images)
        vit_logits = self.net["booster"].logits(images)[:, :clip_logits.shape[1]]
        return fuse_logits(clip_logits, vit_logits, self.net["weights"]["lambda_"])

    def train_outputs(self, images: torch.Tensor, labels: torch.Tensor, task: Task):
        return self.logits(images), 0.0

    def training_loss(self, logits: torch.Tensor, labels: torch.Tensor, task: Task) -> torch.Tensor:
        weights = self.net["weights"]
        mask = None
        if task.index > 0:
            mask = torch.cat([self.theta / torch.sigmoid(weights["beta"]), torch.sigmoid(weights["alpha"])], dim=1)
        return weighted_nll(logits, labels, mask)

    def eval_logits(self, images: torch.Tensor, queries: Optional[torch.Tensor]) -> torch.Tensor:
        return self.logits(images)

    def memory_features(self, split: Split) -> torch.Tensor:
        """CLIP's frozen image features (the code herds on ``clip_model``'s)."""
        return self.ctx.features.stores[0](split)

    def state_dict(self):
        return {**super().state_dict(), "tasks": len(self.net["stabilizer"].contexts),
                "tokens": self.net["stabilizer"].tokens}

    def load_state_dict(self, state):
        """The saved tasks' contexts (frozen: the next task adds its own) and β's shape, then the values."""
        stabilizer, device = self.net["stabilizer"], self.ctx.device
        for index in range(state["tasks"]):
            saved = state["net"][f"stabilizer.contexts.{index}"]
            stabilizer.contexts.append(nn.Parameter(torch.zeros_like(saved, device=device), requires_grad=False))
        stabilizer.tokens = state["tokens"].to(device)
        self.net["weights"]["beta"] = nn.Parameter(torch.zeros_like(state["net"]["weights.beta"], device=device))
        super().load_state_dict(state)
