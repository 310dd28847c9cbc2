"""PROOF (Zhou et al., TPAMI 2025): projection fusion over a frozen CLIP, as its official code does it
(zhoudw-zdw/PROOF@0bb2052, ``models/proof.py``, ``utils/inc_net.py Proof_Net``, ``convs/projections.py``).

CLIP stays frozen except ``logit_scale``. Each task adds an image and a text projection (one ``d×d`` linear
layer each, ``pure_mlp``) and ``context_prompt_length_per_task`` context prompts (``randn``); a feature's
projection is the sum over all tasks' projections. Old image projections and old context prompts are frozen;
the official ``freeze_projection_weight_new`` leaves every text projection trainable, which
``freeze_old_text_projections`` (off, as the code) changes. The fusion module is one-head self-attention
(``MultiHeadAttention(1, d, d, d, dropout=0.1)``: scaled dot product, dropout on the attention, an output
layer with dropout, a residual and LayerNorm) over, per image, the sequence [image; the seen classes' text
features; their visual prototypes; every context prompt]; its text and prototype outputs are averaged over
the batch. Visual prototypes are class means of L2-normalised frozen CLIP features of the task's training
images (test transform), put through the image projections.

Training (text: ``templates[0]`` only) on the current task's images and the rehearsal memory's::

    img = norm(P_img(f)), txt = norm(P_txt(t)), pro = norm(P_img(p))
    fi, ft, fp = fusion(img, txt, pro, prompts)
    loss = CE(fi·ftᵀ, y) + CLIPLoss(img, txt[y], exp(logit_scale)) + CE(fi·fpᵀ, y)

Evaluation (text: every template, each projected feature normalised, averaged, renormalised = ``T``), with
the image feature *not* normalised, as ``_eval_cnn`` does::

    img = P_img(f); fi, ft, fp = fusion(img, T, pro, prompts)
    logits = img·Tᵀ + fi·ftᵀ + fi·fpᵀ

Departures: CLIP is frozen and the official transform has no augmentation (``utils/data.py build_transform``:
Resize((224, 224), bicubic) + CenterCrop for training and test, every dataset), so training reads the frozen
image and text features from the run's caches instead of re-encoding every batch (the same values; the run's
eval transform resizes the shorter side and centre-crops, which equals the official squash for square images
such as CIFAR's, not for others); the per-task random draws (new layers, prompts, dropout, batch order) come
from the run's generator, so a resumed run equals an uninterrupted one. Agreement with the official code on
the same weights and batches: ``tools/clip_official_check.py``.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import nn
from torch.nn import functional as F

from pilot.clip import require_text
from pilot.data.stream import Split, Task
from pilot.errors import PilotError
from pilot.learners import register_learner
from pilot.learners._base import Learner, require_finite
from pilot.learners._gradient import TrainConfig, descend, make_optimizer, make_scheduler, validate_train_config
from pilot.learners._prompt import class_sorted


@dataclass
class ProofConfig(TrainConfig):
    """The official ``exps/cifar.json`` (CIFAR-100 B0 Inc10)."""

    tuned_epoch: int = 5
    init_lr: float = 0.001
    batch_size: int = 64  # also the test batch: the fused text and prototypes are averaged over each batch
    weight_decay: float = 0.05
    min_lr: float = 0.0
    optimizer: str = "sgd"
    scheduler: str = "cosine"  # CosineAnnealingLR(T_max=tuned_epoch, eta_min=min_lr), stepped per epoch
    # "pure_mlp": one linear layer per task and modality (the only kind the official code builds).
    projection_type: str = "pure_mlp"
    # Learnable context prompts each task adds to the fusion sequence.
    context_prompt_length_per_task: int = 3
    # The official code keeps old text projections trainable; true freezes them as it does the image ones.
    freeze_old_text_projections: bool = False


class FusionAttention(nn.Module):
    """One-head self-attention with a residual and LayerNorm: the official ``MultiHeadAttention(1, d, d, d)``."""

    def __init__(self, dim: int, dropout: float = 0.1):
        super().__init__()
        self.query = nn.Linear(dim, dim, bias=False)
        self.key = nn.Linear(dim, dim, bias=False)
        self.value = nn.Linear(dim, dim, bias=False)
        for layer in (self.query, self.key, self.value):
            nn.init.normal_(layer.weight, mean=0.0, std=math.sqrt(2.0 / (dim + dim)))
        self.temperature = math.sqrt(dim)
        self.attention_dropout = nn.Dropout(dropout)
        self.out = nn.Linear(dim, dim)
        nn.init.xavier_normal_(self.out.weight)
        self.dropout = nn.Dropout(dropout)
        self.norm = nn.LayerNorm(dim)

    def forward(self, sequence: torch.Tensor) -> torch.Tensor:
        scores = self.query(sequence) @ self.key(sequence).transpose(1, 2) / self.temperature
        mixed = self.attention_dropout(scores.softmax(dim=2)) @ self.value(sequence)
        return self.norm(self.dropout(self.out(mixed)) + sequence)


class ProofNet(nn.Module):
    """The trained part of PROOF: per-task projections, context prompts, the fusion module, the visual
    prototypes (raw normalised-feature class means) and CLIP's ``logit_scale`` (log scale, as CLIP keeps it)."""

    def __init__(self, dim: int, logit_scale: float, prompt_length: int):
        super().__init__()
        self.dim, self.prompt_length = dim, prompt_length
        self.fusion = FusionAttention(dim)
        self.image_projections = nn.ModuleList()
        self.text_projections = nn.ModuleList()
        self.context_prompts = nn.ParameterList()
        self.logit_scale = nn.Parameter(torch.tensor(float(logit_scale)))
        self.register_buffer("prototypes", torch.zeros(0, dim))

    def add_task(self, num_seen: int) -> None:
        """The official order: prototype rows, then this task's context prompts, then its two projections."""
        self.prototypes = torch.cat([self.prototypes, self.prototypes.new_zeros(num_seen - len(self.prototypes), self.dim)])
        self.context_prompts.append(nn.Parameter(torch.randn(self.prompt_length, self.dim, device=self.prototypes.device)))
        self.image_projections.append(nn.Linear(self.dim, self.dim).to(self.prototypes.device))
        self.text_projections.append(nn.Linear(self.dim, self.dim).to(self.prototypes.device))

    def trainable(self, freeze_old_text: bool) -> list[nn.Parameter]:
        """The current task's image projection and context prompts, the fusion module, ``logit_scale``, and the
        text projections (all of them, as the official code; the current one only with ``freeze_old_text``)."""
        text = self.text_projections[-1:] if freeze_old_text else self.text_projections
        return [*self.image_projections[-1].parameters(), *(p for layer in text for p in layer.parameters()),
                *self.fusion.parameters(), self.context_prompts[-1], self.logit_scale]

    def project_image(self, features: torch.Tensor) -> torch.Tensor:
        return sum(projection(features) for projection in self.image_projections)

    def project_text(self, features: torch.Tensor) -> torch.Tensor:
        return sum(projection(features) for projection in self.text_projections)

    def projected_prototypes(self) -> torch.Tensor:
        return F.normalize(self.project_image(self.prototypes), dim=-1)

    def fuse(self, image: torch.Tensor, text: torch.Tensor, prototypes: torch.Tensor):
        """Fused (image [B, D], text [C, D], prototypes [C, D]); text and prototypes averaged over the batch."""
        batch, classes = len(image), len(text)
        prompts = torch.cat(list(self.context_prompts))
        sequence = torch.cat([image[:, None], text.expand(batch, -1, -1), prototypes.expand(batch, -1, -1),
                              prompts.expand(batch, -1, -1)], dim=1)
        fused = self.fusion(sequence)
        return fused[:, 0], fused[:, 1:1 + classes].mean(0), fused[:, 1 + classes:1 + 2 * classes].mean(0)

    def training_loss(self, features: torch.Tensor, labels: torch.Tensor, text: torch.Tensor) -> torch.Tensor:
        """``models/proof.py _train_proj``'s total loss on a batch of frozen image features, with the seen
        classes' frozen text features under ``templates[0]`` ([C, D])."""
        image = F.normalize(self.project_image(features), dim=-1)
        text = F.normalize(self.project_text(text), dim=-1)
        fused_image, fused_text, fused_prototypes = self.fuse(image, text, self.projected_prototypes())
        return (F.cross_entropy(fused_image @ fused_text.T, labels)
                + clip_loss(image, text[labels], self.logit_scale.exp())
                + F.cross_entropy(fused_image @ fused_prototypes.T, labels))

    def logit_terms(self, features: torch.Tensor, text: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """The three evaluation terms (image·text, fused image·fused text, fused image·fused prototypes) for a
        batch of frozen image features and the seen classes' frozen text features under every template [C, T, D]."""
        weights = F.normalize(F.normalize(self.project_text(text), dim=-1).mean(1), dim=-1)
        image = self.project_image(features)
        fused_image, fused_text, fused_prototypes = self.fuse(image, weights, self.projected_prototypes())
        return image @ weights.T, fused_image @ fused_text.T, fused_image @ fused_prototypes.T


def clip_loss(image: torch.Tensor, text: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """CLIP's symmetric contrastive loss of matched rows (the official ``ClipLoss``, one process)."""
    logits = scale * image @ text.T
    targets = torch.arange(len(image), device=image.device)
    return (F.cross_entropy(logits, targets) + F.cross_entropy(logits.T, targets)) / 2


@register_learner("proof")
class Proof(Learner):
    config_class = ProofConfig
    needs_text = True
    uses_memory = True

    def __init__(self, config: ProofConfig, ctx):
        super().__init__(config, ctx)
        self.text = require_text(ctx, self.name)
        self.net = ProofNet(ctx.backbone.feature_dim, float(self.text.tower.model.logit_scale.detach()),
                            config.context_prompt_length_per_task).to(ctx.device)

    @classmethod
    def validate_config(cls, config: ProofConfig) -> None:
        validate_train_config(config)
        if config.projection_type != "pure_mlp":
            raise PilotError(f"projection_type must be 'pure_mlp' (the only one PROOF's code builds), got "
                             f"'{config.projection_type}'.")
        if config.context_prompt_length_per_task < 1:
            raise PilotError("context_prompt_length_per_task must be at least 1.")

    @property
    def batch_dependent_evaluation(self) -> bool:
        return True

    def fit(self, task: Task) -> None:
        device, net = self.ctx.device, self.net
        seed = int(torch.randint(2**62, (1,), generator=self.ctx.generator))
        with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []):
            torch.manual_seed(seed)  # new layers, prompts and dropout: the run's draws, so resuming repeats them
            net.add_task(task.num_seen)
            self.set_prototypes(task)
            split = self.training_split(task)
            features, labels = self.ctx.features(split).to(device), torch.as_tensor(split.labels, device=device)
            text = self.text(self.ctx.class_names, self.ctx.templates[:1])[:, 0].to(device)
            parameters = net.trainable(self.config.freeze_old_text_projections)
            optimizer = make_optimizer(parameters, self.config)
            scheduler = make_scheduler(optimizer, self.config)
            net.train()
            for epoch in range(self.config.tuned_epoch):
                order = torch.randperm(len(labels), generator=self.ctx.generator).to(device)
                for step, batch in enumerate(order.split(self.config.batch_size)):
                    loss = net.training_loss(features[batch], labels[batch], text)
                    require_finite(loss.detach(), "loss", f"proof task {task.index + 1}, epoch {epoch + 1}, step {step + 1}")
                    descend(optimizer, loss)
                scheduler.step()
            net.eval()

    def training_split(self, task: Task) -> Split:
        """The task's training images and the memory's exemplars (the official ``appendent``)."""
        memory = self.ctx.memory
        return task.train.joined(memory.split()) if memory is not None and len(memory) else task.train

    def set_prototypes(self, task: Task) -> None:
        """``cal_prototype``: the mean of the L2-normalised frozen features of each new class's training images."""
        features = F.normalize(self.ctx.features(task.train), dim=-1)
        labels = torch.as_tensor(task.train.labels)
        for c in task.classes:
            self.net.prototypes[c] = features[labels == c].mean(0).to(self.ctx.device)

    @torch.no_grad()
    def predict(self, split: Split) -> torch.Tensor:
        text = self.text(self.ctx.class_names, self.ctx.templates).to(self.ctx.device)
        features = self.ctx.features(split).to(self.ctx.device)
        self.net.eval()
        return torch.cat([sum(self.net.logit_terms(batch, text)).cpu()
                          for batch in features.split(self.config.batch_size)])

    def predict_tasks(self, splits: list[Split]) -> list[torch.Tensor]:
        """The official test loader: every seen class's test images together, by class, in batches of batch_size."""
        union, position = class_sorted(splits)
        return list(self.predict(union)[position].split([len(split) for split in splits]))

    def state_dict(self):
        return {"tasks": len(self.net.image_projections), "net": self.net.state_dict()}

    def load_state_dict(self, state):
        classes = state["net"]["prototypes"].shape[0]
        with torch.random.fork_rng(devices=[]):  # the layers' draws are overwritten: leave the run's randomness be
            for _ in range(state["tasks"]):
                self.net.add_task(classes)
        self.net.load_state_dict(state["net"])
