"""TUNA (Wang, Zhou, Ye, ICCV 2025): Task-specific and UNiversal Adapters. One AdaptFormer adapter per task on
the frozen ViT, trained with a cosine classifier (a head per task) and the CosFace loss over the task's classes;
after each task its adapter is kept, the adapters are merged by EMR-merging into a universal adapter, and from
the second task the classifier is re-aligned on features sampled from stored class Gaussians. At test time each
image goes through every task adapter; the one whose prediction has the lowest entropy is chosen, and its
softmax is added to the universal adapter's.

Settings and mechanisms as the official ViT code, LAMDA-CL/ICCV2025-TUNA@77d4f10 (``models/tuna.py``,
``backbone/vit_tuna.py``, ``exps/tuna_cifar.json``), which descends from MOS's: the trained adapter is never
re-initialised (each task's starts from the previous task's); class statistics come from the task's own adapter;
alignment trains every seen head on ``scale`` x cosine for ``crct_epochs`` with a cosine schedule of period
5 epochs (the code's ``T_max=5``). The universal adapter is the unified vector of EMR-merging over the task
adapters' weights themselves (the code's ``TaskVector`` subtracts nothing); its masks and rescalers are not used.

One departure by default: the code's test pass asks for ``adapter_id = cur_task + 1``, which after
``adapter_update`` equals ``len(adapter_list)`` and so runs the trained (= last task's) adapter, never the merged
one; pilot combines with the merged adapter, as the paper describes (``universal_adapter: "merged"``).
``universal_adapter: "last"`` runs what the code runs. Also: ``decay`` scales each class's mean by
0.9 + 0.1 (t_c + 1) / (t + 1), t_c its task, as the code means it (its ``task_size`` has the wrong sign).
"""
from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Optional

import torch
from torch import nn

from pilot.data.stream import Split, Task
from pilot.errors import PilotError, config_values
from pilot.learners import register_learner
from pilot.learners._alignment import fit_on_gaussian_samples
from pilot.learners._carried_adapter import CarriedAdapterLearner
from pilot.learners._first_task_adaptation import AdaptedEncoder
from pilot.learners._gradient import TrainConfig
from pilot.modules.adapters import freeze
from pilot.modules.gaussians import ClassGaussians
from pilot.modules.heads import cosface_loss, cosine_logits, lowest_entropy, task_heads
from pilot.modules.merge import emr_merge

UNIVERSAL = ("merged", "last")
CA_SAMPLE_FACTOR = 5  # official num_sampled_pcls = batch_size * 5
CA_SCHEDULE_EPOCHS = 5  # official classifer_align: CosineAnnealingLR(T_max=5), whatever crct_epochs


@dataclass
class TUNAConfig(TrainConfig):
    """The official exps/tuna_cifar.json (LAMDA-CL/ICCV2025-TUNA@77d4f10)."""

    tuned_epoch: int = 15
    init_lr: float = 0.01  # adapter and heads alike
    batch_size: int = 16
    weight_decay: float = 0.0005
    min_lr: float = 0.0
    optimizer: str = "sgd"
    scheduler: str = "cosine"
    init_milestones: list[int] = field(default_factory=lambda: [10])  # for scheduler "steplr"
    init_lr_decay: float = 0.1
    r: int = 16  # adapter bottleneck (the code hard-codes 16, this key's value)
    scale: float = 20.0  # CosFace s, also the logit scale of alignment and inference
    m: float = 0.0  # CosFace margin
    use_orth: bool = False  # orthogonality of the adapter's up-projections to the earlier tasks'
    reg: float = 0.001  # its weight, times exp(-(task + 1))
    crct_epochs: int = 30  # classifier alignment epochs (0: none)
    ca_lr: float = 0.005
    ca_storage_efficient_method: str = "covariance"  # or "variance" (diagonal Gaussians)
    decay: bool = False  # scale older classes' means down when sampling for alignment
    universal_adapter: str = "merged"  # "merged": EMR-merged (paper); "last": the last task's (the code's index)


@register_learner("tuna")
class TUNA(CarriedAdapterLearner):
    config_class = TUNAConfig

    def __init__(self, config: TUNAConfig, ctx):
        super().__init__(config, ctx, config.r)
        dim = ctx.backbone.feature_dim
        self.net["heads"] = task_heads(dim, ctx.protocol.task_sizes, bias=False)  # cosine rows, trunc_normal 0.02
        self.net.to(ctx.device)
        self.universal = self.net["adapters"].new_set()  # EMR-merged from the bank after each task, never saved
        freeze(self.universal)
        self.universal_features: Optional[Callable[[Split], torch.Tensor]] = None  # from the second task
        self.statistics = ClassGaussians(dim, diagonal=config.ca_storage_efficient_method == "variance")

    @classmethod
    def validate_config(cls, config: TUNAConfig) -> None:
        super().validate_config(config)
        if config.universal_adapter not in UNIVERSAL:
            raise PilotError(f"universal_adapter must be one of {', '.join(UNIVERSAL)}, got "
                             f"'{config.universal_adapter}'.")
        if config.r < 1 or config.scale <= 0:
            raise PilotError(f"r (adapter bottleneck) must be >= 1 and scale > 0, got r={config.r}, "
                             f"scale={config.scale}.")

    # --- heads -------------------------------------------------------------------------------

    def cosines(self, features: torch.Tensor) -> torch.Tensor:
        """cos(feature, class row) over the seen classes (the official SimpleContinualLinear, unscaled)."""
        weights = torch.cat([head.weight for head in self.net["heads"]])[: self.num_seen]
        return cosine_logits(features.to(weights), weights)

    def seen_heads(self) -> list[nn.Parameter]:
        tasks = int(self.ctx.protocol.task_of(torch.tensor(self.num_seen - 1))) + 1
        return [head.weight for head in self.net["heads"][:tasks]]

    # --- training ----------------------------------------------------------------------------

    def trainable(self) -> list[nn.Parameter]:
        return list(self.net["current"].parameters()) + self.seen_heads()

    def train_outputs(self, images: torch.Tensor, labels: torch.Tensor, task: Task):
        features = self.current_encoder(images)
        extra = 0.0
        if self.config.use_orth and task.index > 0:
            extra = self.orthogonality_loss() * self.config.reg * math.exp(-(task.index + 1))
        return self.cosines(features), extra

    def training_loss(self, logits: torch.Tensor, labels: torch.Tensor, task: Task) -> torch.Tensor:
        """CosFace over the current task's classes (official ``loss_cos``)."""
        classes = task.classes
        return cosface_loss(logits[:, classes.start:classes.stop], labels - classes.start, self.config.scale,
                            self.config.m)

    def orthogonality_loss(self) -> torch.Tensor:
        """Official ``orth_loss``: per earlier task, the mean over blocks of |mean(Û_cur Û_oldᵀ)|, Û the
        up-projection's rows L2-normalised."""
        current = self.net["current"].units
        total = 0.0
        for old in self.net["adapters"]:
            per_block = [(nn.functional.normalize(unit.up.weight, dim=1)
                          @ nn.functional.normalize(old_unit.up.weight, dim=1).T).mean().abs()
                         for unit, old_unit in zip(current, old.units)]
            total = total + sum(per_block) / len(per_block)
        return total

    # --- after training: the task's adapter, the universal adapter, statistics, alignment ---------

    def end_task(self, task: Task) -> None:
        self.store_adapter()
        self.merge_universal()
        features, labels = self.stores[-1](task.train), torch.as_tensor(task.train.labels)
        with config_values("train_per_class"):
            self.statistics.add_classes(features, labels, task.classes)
        if task.index > 0 and self.config.crct_epochs > 0:
            self.align_classifier(task.index)

    def merge_universal(self) -> None:
        """The universal adapter: EMR-merging's unified vector of every task adapter (official ``merge``, from
        the second task; with ``universal_adapter: "last"`` the last task's adapter, as the code's index gives)."""
        bank = self.net["adapters"]
        if len(bank) < 2:
            self.universal_features = None
        elif self.config.universal_adapter == "merged":
            unified, _, _ = emr_merge([adapters.state_dict() for adapters in bank])
            self.universal.load_state_dict(unified)
            encoder = AdaptedEncoder(self.ctx.backbone, self.universal)
            # encoded at each evaluation, not stored: the adapter changes every task
            self.universal_features = lambda split: self.ctx.encode(encoder.eval(), split)
        else:
            self.universal_features = self.stores[-1]

    def align_classifier(self, task_index: int) -> None:
        """Official ``classifer_align``: the seen heads alone on ``scale`` x cosine, SGD at ``ca_lr`` (momentum 0.9,
        weight decay), cosine schedule of period 5 epochs; each epoch draws 5 x batch_size features per class
        and trains on all of them in batches of that size."""
        config = self.config
        optimizer = torch.optim.SGD(self.seen_heads(), lr=config.ca_lr, momentum=0.9,
                                    weight_decay=config.weight_decay)
        mean_scales = None
        if config.decay:
            class_tasks = self.ctx.protocol.task_of(torch.arange(self.num_seen)).float()
            mean_scales = 0.9 + (class_tasks + 1) / (task_index + 1) * 0.1
        fit_on_gaussian_samples(lambda features: config.scale * self.cosines(features), optimizer, self.statistics,
                                self.ctx.generator, self.ctx.device, epochs=config.crct_epochs,
                                samples=config.batch_size * CA_SAMPLE_FACTOR, mean_scales=mean_scales,
                                schedule_epochs=CA_SCHEDULE_EPOCHS, where=f"{self.task_tag}, classifier alignment")

    # --- prediction: lowest-entropy task adapter + universal adapter ------------------------------

    @torch.no_grad()
    def predict(self, split: Split) -> torch.Tensor:
        """Official ``_eval_cnn``: after the first task, softmax(s·cos) of the universal adapter plus softmax(s·cos)
        of the task adapter with the lowest entropy; after the first task alone, the first adapter's cosines."""
        if self.universal_features is None:
            return self.cosines(self.stores[0](split)).cpu()
        logits = torch.stack([self.config.scale * self.cosines(store(split)) for store in self.stores])
        _, specific = lowest_entropy(logits)
        universal = self.config.scale * self.cosines(self.universal_features(split))
        return (universal.softmax(1) + specific.softmax(1)).cpu()

    # --- checkpoint ------------------------------------------------------------------------------

    def state_dict(self):
        return {**super().state_dict(), "statistics": self.statistics.state_dict()}

    def load_state_dict(self, state):
        super().load_state_dict(state)
        self.statistics.load_state_dict(state["statistics"])
        self.merge_universal()
