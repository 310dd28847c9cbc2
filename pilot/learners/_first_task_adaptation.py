"""Adapt on the first task only, then freeze: the part RanPAC and APER share.

PILOT (``models/ranpac.py``, ``models/aper_*.py``, ``models/fecam.py``) attaches an adaptation to the
frozen ViT (AdaptFormer adapters by default; APER's variants use SSF, VPT, or fine-tune a copy of
the whole ViT), trains it with a temporary cosine head (``CosineLinear``: learnable scale, initial
value 1) on the first task's classes, then freezes it. Later tasks train nothing; each learner
builds its classifier from features of the adapted backbone, encoded once per image by a feature store.

Hooked adaptations are switched on only while the adapted encoder runs, so ``ctx.features`` keeps
giving the pretrained features of the same ViT weights (one copy of the ViT for both). The same
encoder and frozen stores serve the adapter bank that EASE and MOS keep, one adapter set per task.
"""
from __future__ import annotations

import hashlib
import time
from dataclasses import dataclass

import torch
from torch import nn

from pilot.data.stream import Split, Task
from pilot.errors import PilotError
from pilot.features import FeatureStore
from pilot.learners._gradient import GradientLearner, TrainConfig, validate_train_config
from pilot.modules.adapters import AdapterBank, attach_adapters, freeze
from pilot.modules.heads import CosineHead


@dataclass
class AdaptationConfig(TrainConfig):
    """PILOT's exps/ranpac.json and exps/aper_aperpter.json (identical training keys)."""

    tuned_epoch: int = 20  # epochs on the first task; 0 = no adaptation (pretrained features)
    init_lr: float = 0.01
    batch_size: int = 48
    weight_decay: float = 0.0005
    min_lr: float = 0.0
    optimizer: str = "sgd"
    scheduler: str = "cosine"  # PILOT's code always anneals (CosineAnnealingLR, T_max = tuned_epoch)
    ffn_num: int = 64  # adapter bottleneck


class AdaptedEncoder(nn.Module):
    """The backbone with a hooked adaptation (adapters, SSF, prompts) on; ``eval()``/``train()`` reach both."""

    def __init__(self, backbone: nn.Module, adaptation: nn.Module) -> None:
        super().__init__()
        self.backbone = backbone
        self.adaptation = adaptation

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        self.adaptation.enabled = True
        try:
            return self.backbone(images)
        finally:
            self.adaptation.enabled = False


def weights_digest(module: nn.Module) -> str:
    """Hash of a module's parameter names, shapes and values: keys the adapted feature store."""
    digest = hashlib.sha256()
    for name, tensor in module.state_dict().items():
        digest.update(f"{name}{tuple(tensor.shape)}".encode())
        digest.update(tensor.detach().float().cpu().numpy().tobytes())
    return digest.hexdigest()[:24]


def frozen_store(ctx, encoder: nn.Module, adaptation: nn.Module) -> FeatureStore:
    """Freeze ``adaptation`` for good and give the feature store of ``encoder`` (the backbone with it on),
    keyed by the adaptation's weights."""
    freeze(adaptation)
    identity = f"{ctx.backbone.identity}|{type(adaptation).__name__}:{weights_digest(adaptation)}"
    return ctx.feature_store(encoder, identity)


def adapter_bank(ctx, bottleneck: int) -> AdapterBank:
    """A bank of AdaptFormer adapter sets on the backbone's ViT, each off until an ``AdaptedEncoder`` runs it."""

    def new_set() -> nn.Module:
        adapters = attach_adapters(ctx.backbone.model, bottleneck=bottleneck).to(ctx.device)
        adapters.enabled = False
        return adapters

    return AdapterBank(new_set, lambda adapters: frozen_store(ctx, AdaptedEncoder(ctx.backbone, adapters), adapters))


class FirstTaskAdaptationLearner(GradientLearner):
    """Template: the training template runs on the first task only; then ``update_classifier``
    learns every task's classes from ``adapted_features`` (subclasses define it and ``predict``).

    With ``tuned_epoch`` 0 nothing is attached and ``adapted_features`` is ``ctx.features``.
    ``adapt`` says what trains (adapters by default).
    """

    config_class = AdaptationConfig
    mask_old_classes = False  # the temporary head has the first task's classes only

    def __init__(self, config: AdaptationConfig, ctx):
        super().__init__(config, ctx)
        self.encoder: nn.Module = ctx.backbone
        self.adapted_features: FeatureStore = ctx.features
        if config.tuned_epoch:
            freeze(ctx.backbone)
            self.net["adaptation"], self.encoder = self.adapt()  # checkpoints hold the adaptation, not the ViT
            self.net.to(ctx.device)

    def adapt(self) -> tuple[nn.Module, nn.Module]:
        """(what trains on the first task, the encoder it gives): here AdaptFormer adapters on the shared ViT."""
        return self.hooked(attach_adapters(self.require_vit(), bottleneck=self.config.ffn_num))

    def hooked(self, adaptation: nn.Module) -> tuple[nn.Module, nn.Module]:
        """A hooked adaptation, off except while its encoder runs."""
        adaptation.enabled = False
        return adaptation, AdaptedEncoder(self.ctx.backbone, adaptation)

    @classmethod
    def validate_config(cls, config: AdaptationConfig) -> None:
        validate_train_config(config)
        if config.ffn_num < 1:
            raise PilotError(f"ffn_num (adapter bottleneck) must be at least 1, got {config.ffn_num}.")

    @classmethod
    def frozen_features(cls, config: AdaptationConfig) -> bool:
        return config.tuned_epoch == 0

    @property
    def has_adaptation(self) -> bool:
        return "adaptation" in self.net

    @property
    def adapting(self) -> bool:
        return "head" in self.net

    # --- the training template's hooks ----------------------------------------------------

    def begin_task(self, task: Task) -> None:
        if task.index == 0 and self.has_adaptation:
            self.net["head"] = CosineHead(self.ctx.backbone.feature_dim, len(task.classes)).to(self.ctx.device)
            self.adaptation_started = time.perf_counter()

    def trainable(self) -> list[nn.Parameter]:
        return list(self.net.parameters()) if self.adapting else []

    def set_train_mode(self, training: bool) -> None:
        self.encoder.train(training)

    def train_outputs(self, images: torch.Tensor, labels: torch.Tensor, task: Task):
        return self.net["head"](self.encoder(images)), 0.0

    def end_task(self, task: Task) -> None:
        if self.adapting:
            del self.net["head"]
            self.freeze_adaptation()
            self.ctx.log.info(f"adapted on the first task in {time.perf_counter() - self.adaptation_started:.2f}s")
        self.update_classifier(task)

    def freeze_adaptation(self) -> None:
        """From here on the adapted backbone is fixed: its features go through a store."""
        self.adapted_features = frozen_store(self.ctx, self.encoder, self.net["adaptation"])

    # --- what a learner defines -----------------------------------------------------------

    def update_classifier(self, task: Task) -> None:
        """Add ``task``'s classes to the classifier (every task, after any adaptation)."""
        raise NotImplementedError

    def predict(self, split: Split) -> torch.Tensor:
        raise NotImplementedError

    def load_state_dict(self, state) -> None:
        super().load_state_dict(state)
        if self.has_adaptation:
            self.freeze_adaptation()
