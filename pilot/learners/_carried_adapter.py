"""The adapter MOS and TUNA carry from task to task (TUNA's official code descends from MOS's): one
AdaptFormer set on the frozen ViT, trained on every task and never re-initialised, a frozen copy with its
feature store kept per finished task, class Gaussians for classifier alignment, and every task's rate
stepped at the ``init_`` keys."""
from __future__ import annotations

from dataclasses import replace

from pilot.errors import PilotError
from pilot.features import FeatureStore
from pilot.learners._first_task_adaptation import AdaptedEncoder, adapter_bank
from pilot.learners._gradient import GradientLearner, TrainConfig
from pilot.modules.adapters import freeze


class CarriedAdapterLearner(GradientLearner):
    """``net["current"]`` trains; ``net["adapters"]`` holds each finished task's copy (``store_adapter``).
    Configs carry ``init_milestones``, ``init_lr_decay``, ``crct_epochs``, ``ca_lr``, ``reg`` and
    ``ca_storage_efficient_method`` (one of ``storage``)."""

    min_train_per_class = 2  # each class's Gaussian (or k-means clusters with spread)
    storage: tuple[str, ...] = ("covariance", "variance")

    def __init__(self, config, ctx, bottleneck: int):
        super().__init__(config, ctx)
        freeze(ctx.backbone)
        self.require_vit()
        bank = adapter_bank(ctx, bottleneck)
        self.net["current"] = bank.new_set()
        self.net["adapters"] = bank

    @classmethod
    def validate_config(cls, config) -> None:
        cls.validate_settings(config)
        if config.ca_storage_efficient_method not in cls.storage:
            raise PilotError(f"ca_storage_efficient_method must be one of {', '.join(cls.storage)}, got "
                             f"'{config.ca_storage_efficient_method}'.")
        if config.crct_epochs < 0 or config.ca_lr <= 0 or config.reg < 0:
            raise PilotError("crct_epochs and reg must be >= 0 and ca_lr > 0.")

    @classmethod
    def settings(cls, config, first_task: bool) -> TrainConfig:
        """Every task steps its rate at the ``init_`` keys (official)."""
        return replace(config, milestones=config.init_milestones, lr_decay=config.init_lr_decay)

    @property
    def current_encoder(self) -> AdaptedEncoder:
        return AdaptedEncoder(self.ctx.backbone, self.net["current"])

    @property
    def stores(self) -> list[FeatureStore]:
        """Each finished task's adapter features."""
        return self.net["adapters"].stores

    def store_adapter(self) -> None:
        """Keep a frozen copy of the current adapter as the finished task's, with its feature store."""
        self.net["adapters"].add(self.net["current"].state_dict())
        self.net["adapters"].close()

    def set_train_mode(self, training: bool) -> None:
        self.current_encoder.train(training)
