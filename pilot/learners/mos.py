"""MOS (Sun et al., AAAI 2025): Model Surgery. One AdaptFormer adapter per task on the frozen ViT, each
task's adapter starting from the previous task's and pulled after every optimiser step towards the
mean of the earlier tasks' adapters (``adapter_momentum``); a linear head over all classes, trained
with the current task's logits and an orthogonality loss against the old classes' means (``reg``);
from the second task, the head re-aligned on features sampled from stored class statistics. At test
time a training-free, self-refined retrieval picks each image's adapter: the first task's adapter and
cosine prototypes guess the task, then the head on that task's adapter features re-guesses it, up to
4 rounds; ``ensemble`` adds the first guess's softmax.

Settings and mechanisms as the official code (sun-hailong/AAAI25-MOS, identical to PILOT's
``models/mos.py``), with one departure by default: the official code applies the momentum merge in
place before every block of every forward pass as well as after the step (13 pulls per training step
on a 12-block ViT); pilot merges once after each step, as the paper's Eq. (3) reads
(``adapter_merge: "step"``). ``adapter_merge: "forward"`` is the official training: before its
block's forward, the adapter of block k has been pulled k + 1 times that step, and all of them
``depth`` times before the optimiser step. Not reproduced in either mode: the official code also pulls
the current adapter during its statistics pass and the stored adapters at every test forward, so its
statistics and test features depend on the number of batches; pilot keeps stored adapters as stored.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Optional

import torch
from torch import nn

from pilot.data.stream import Split, Task
from pilot.errors import PilotError, config_values
from pilot.learners import register_learner
from pilot.learners._alignment import fit_on_gaussian_samples
from pilot.learners._carried_adapter import CarriedAdapterLearner
from pilot.learners._gradient import TrainConfig
from pilot.modules.gaussians import ClassGaussians
from pilot.modules.heads import PrototypeClassifier, linear_head
from pilot.modules.merge import average, ema_update
from pilot.modules.task_prompts import prototype_contrast

MERGES = ("step", "forward")
ORTHOGONALITY_TEMPERATURE = 0.8  # official orth_loss
RETRIEVAL_ROUNDS = 4  # official MAX_ITER of the self-refined retrieval
CA_SAMPLE_FACTOR = 5  # official num_sampled_pcls = batch_size * 5


@dataclass
class MOSConfig(TrainConfig):
    """PILOT's exps/mos.json (= the official mos_cifar.json)."""

    tuned_epoch: int = 20
    init_lr: float = 0.03  # the adapter's; the head trains at a tenth of it
    batch_size: int = 48
    weight_decay: float = 0.0005
    optimizer: str = "sgd"
    scheduler: str = "cosine"
    init_milestones: list[int] = field(default_factory=lambda: [10])  # for scheduler "steplr"
    init_lr_decay: float = 0.1
    ffn_num: int = 16  # adapter bottleneck
    adapter_momentum: float = 0.1  # pull towards the earlier adapters' mean after each step (0: none)
    adapter_merge: str = "step"  # "step": once after each step (paper); "forward": also in every block (official)
    reg: float = 0.1  # weight of the orthogonality loss
    crct_epochs: int = 30  # classifier alignment epochs (0: none)
    ca_lr: float = 0.005
    ca_storage_efficient_method: str = "covariance"
    n_centroids: int = 10
    ensemble: bool = True


@register_learner("mos")
class MOS(CarriedAdapterLearner):
    config_class = MOSConfig
    storage = ("covariance", "variance", "multi-centroid")

    def __init__(self, config: MOSConfig, ctx):
        super().__init__(config, ctx, config.ffn_num)
        dim = ctx.backbone.feature_dim
        self.net["head"] = linear_head(dim, ctx.protocol.num_classes)  # timm's ViT head init
        self.net.to(ctx.device)
        self.statistics = ClassGaussians(dim, diagonal=config.ca_storage_efficient_method == "variance")
        self.prototypes = PrototypeClassifier(dim)  # first task's adapter: the retrieval's first guess
        self.anchor: Optional[dict[str, torch.Tensor]] = None

    @classmethod
    def validate_config(cls, config: MOSConfig) -> None:
        super().validate_config(config)
        if config.adapter_merge not in MERGES:
            raise PilotError(f"adapter_merge must be one of {', '.join(MERGES)}, got '{config.adapter_merge}'.")
        if not 0 <= config.adapter_momentum <= 1 or config.ffn_num < 1 or config.n_centroids < 1:
            raise PilotError("adapter_momentum must lie in [0, 1], ffn_num and n_centroids be >= 1.")

    # --- training ----------------------------------------------------------------------------

    def begin_task(self, task: Task) -> None:
        stored = [adapters.state_dict() for adapters in self.net["adapters"]]
        self.anchor = average(stored) if stored and self.config.adapter_momentum > 0 else None

    def trainable(self) -> list[nn.Parameter]:
        return list(self.net["current"].parameters()) + list(self.net["head"].parameters())

    def param_groups(self, parameters: list[nn.Parameter]) -> list[dict]:
        """The adapter at ``init_lr``, the head at a tenth of it (official)."""
        head = {id(p) for p in self.net["head"].parameters()}
        return [{"params": [p for p in parameters if id(p) not in head], "lr": self.config.init_lr},
                {"params": [p for p in parameters if id(p) in head], "lr": self.config.init_lr * 0.1}]

    def train_outputs(self, images: torch.Tensor, labels: torch.Tensor, task: Task):
        if self.merges_in_forward:
            self.pull_units(lambda block: block + 1)
        features = self.current_encoder(images)
        logits = self.net["head"](features)[:, : self.num_seen]
        # official orth_loss: the batch's features pushed away from the old classes' means and each other
        orthogonality = prototype_contrast(features.float(), self.statistics.means, ORTHOGONALITY_TEMPERATURE)
        return logits, self.config.reg * orthogonality

    @property
    def merges_in_forward(self) -> bool:
        return self.anchor is not None and self.config.adapter_merge == "forward"

    def before_step(self, task: Task) -> None:
        if self.merges_in_forward:  # the official pulls that follow each block's use, within the same forward
            depth = len(self.net["current"].units)
            self.pull_units(lambda block: depth - 1 - block)

    def after_step(self, task: Task) -> None:
        if self.anchor is not None:
            self.pull_units(lambda block: 1)

    @torch.no_grad()
    def pull_units(self, pulls) -> None:
        """Pull each block's current adapter ``pulls(block)`` times towards the anchor: n momentum merges
        towards a fixed anchor are one with the weight kept ``(1 - momentum) ** n``."""
        kept = 1 - self.config.adapter_momentum
        for block, unit in enumerate(self.net["current"].units):
            prefix = f"units.{block}."
            anchor = {name[len(prefix):]: value for name, value in self.anchor.items() if name.startswith(prefix)}
            ema_update(unit, anchor, kept ** pulls(block))

    # --- after training: statistics, alignment, retrieval prototypes ---------------------------

    def end_task(self, task: Task) -> None:
        self.store_adapter()
        features, labels = self.stores[-1](task.train), torch.as_tensor(task.train.labels)
        with config_values("train_per_class"):
            if self.config.ca_storage_efficient_method == "multi-centroid":
                self.statistics.add_centroids(features, labels, task.classes, self.config.n_centroids,
                                              self.ctx.generator)
            else:
                self.statistics.add_classes(features, labels, task.classes)
        if task.index > 0 and self.config.crct_epochs > 0:
            self.align_classifier()
        self.prototypes.add_classes(self.stores[0](task.train), labels, task.classes)

    def align_classifier(self) -> None:
        """Official ``classifer_align``: the head alone, SGD at ``ca_lr`` with a cosine schedule; each epoch
        draws 5 x batch_size features per stored Gaussian and trains on as many batches of that size as
        classes seen (all samples for one Gaussian per class; a 1/k share for k centroids)."""
        config, head = self.config, self.net["head"].train()
        optimizer = torch.optim.SGD(head.parameters(), lr=config.ca_lr, momentum=0.9, weight_decay=config.weight_decay)
        fit_on_gaussian_samples(lambda features: head(features)[:, : self.num_seen], optimizer, self.statistics,
                                self.ctx.generator, self.ctx.device, epochs=config.crct_epochs,
                                samples=config.batch_size * CA_SAMPLE_FACTOR, batches=self.num_seen,
                                where=f"{self.task_tag}, classifier alignment")

    # --- prediction: self-refined adapter retrieval ---------------------------------------------

    @torch.no_grad()
    def predict(self, split: Split) -> torch.Tensor:
        head, class_tasks = self.net["head"].eval(), self.ctx.protocol.task_of(torch.arange(self.num_seen))
        features = torch.stack([store(split) for store in self.stores], dim=1)  # [images, tasks, dim]
        first_guess = self.prototypes(features[:, 0])
        rows = torch.arange(len(features))
        task = class_tasks[first_guess.argmax(1)]
        final = torch.zeros_like(first_guess)
        searching = torch.ones(len(features), dtype=torch.bool)
        for _ in range(RETRIEVAL_ROUNDS):
            logits = head(features[rows, task].to(self.ctx.device)).cpu()[:, : self.num_seen]
            final[searching] = logits[searching]
            guess = class_tasks[logits.argmax(1)]
            searching &= guess != task
            task = torch.where(searching, guess, task)
            if not searching.any():
                break
        if self.config.ensemble:
            return final.softmax(1) + (first_guess * len(self.stores)).softmax(1)
        return final

    # --- checkpoint ------------------------------------------------------------------------------

    def state_dict(self):
        return {**super().state_dict(), "statistics": self.statistics.state_dict(),
                "prototypes": self.prototypes.state_dict()}

    def load_state_dict(self, state):
        super().load_state_dict(state)
        self.statistics.load_state_dict(state["statistics"])
        self.prototypes.load_state_dict(state["prototypes"])
