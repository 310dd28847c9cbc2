"""InfLoRA (Liang and Li, CVPR 2024): interference-free low-rank adaptation, as the official code
(liangyanshuo/InfLoRA, ``methods/inflora.py``, ``models/vit_inflora.py``) does it.

A frozen ViT with LoRA on the keys and values of every block (``pilot.modules.lora``), one pair per task,
and one linear head per task. Before task t trains, each block's input matrix ``C = mean over tokens of x^T x``
(``x``: the input of ``attn.qkv``, over the task's augmented training images, with the earlier tasks' pairs on)
is projected out of the old tasks' input subspace (DualGPM's bases, kept per block), and the new pair's
down-projection of both k and v is its top ``rank`` left singular vectors, / sqrt(3), frozen: the new
branch reads only inputs orthogonal to what earlier tasks' inputs span. Only the new up-projections (from
zero) and the task's head train, on cross-entropy over the task's own classes. After training, the input
matrices (recorded again, with the trained pair) grow the bases (DualGPM, threshold
``lamb + (lame - lamb) * t / T`` for task t of T). A test image passes through all pairs, and the heads'
logits are concatenated.

Defaults: the official ``configs/cifar100_inflora.json`` (20 epochs, Adam lr 5e-4, no weight decay, batch 128,
rank 10, lamb 0.95, lame 1.0); ``scheduler: "cosine"`` is, as there, CODA's CosineSchedule stepped after
each epoch for Adam (``inflora_cosine``) and torch's CosineAnnealingLR for SGD. Departures on purpose: SVDs
and projections in float64 (the official code in float32 numpy); a first-task basis holding more than half
the dimensions is stored as its complement right away (the official code stores it un-complemented under
the "retain" kind, which its own consistency assert then rejects); the official k-means of task features
(``clustering``) is left out: its keys are never read at test time.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import nn

from pilot.data.stream import Task
from pilot.errors import PilotError
from pilot.learners import register_learner
from pilot.learners._gradient import TrainConfig, validate_train_config
from pilot.learners._lora import LoRALearner


@dataclass
class InfLoRAConfig(TrainConfig):
    tuned_epoch: int = 20  # official init_epoch and epochs
    init_lr: float = 0.0005  # official init_lr and lrate
    batch_size: int = 128
    weight_decay: float = 0.0
    optimizer: str = "adam"
    scheduler: str = "cosine"  # the official code's only schedule (CODA's CosineSchedule with Adam)
    rank: int = 10  # of each task's pair
    lamb: float = 0.95  # DualGPM energy threshold at the first task
    lame: float = 1.0  # ... moving linearly towards this at the last


class DualGPM:
    """Per block, an orthonormal basis ``[dim, k]`` and its kind: ``"remove"`` (it spans the old tasks' input
    subspace) or ``"retain"`` (it spans that subspace's complement; kept so once it is the smaller of the two)."""

    def __init__(self) -> None:
        self.bases: list[torch.Tensor] = []  # float64
        self.kinds: list[str] = []

    def outside(self, block: int, matrix: torch.Tensor) -> torch.Tensor:
        """``matrix`` projected onto the complement of block ``block``'s old-task subspace."""
        basis = self.bases[block]
        inside = basis @ (basis.T @ matrix)
        return matrix - inside if self.kinds[block] == "remove" else inside

    def old_projector(self, block: int) -> torch.Tensor:
        """The orthogonal projector onto block ``block``'s old-task input subspace."""
        basis = self.bases[block]
        span = basis @ basis.T
        return span if self.kinds[block] == "remove" else torch.eye(len(basis), dtype=basis.dtype) - span

    def update(self, matrices: list[torch.Tensor], threshold: float) -> None:
        """Grow (or shrink the complement of) each block's subspace by the directions of ``matrices`` needed for
        the subspace to hold ``threshold`` of their energy (the official ``update_DualGPM``)."""
        for block, matrix in enumerate(m.double() for m in matrices):
            if block == len(self.bases):  # the first task
                u, s, _ = torch.linalg.svd(matrix, full_matrices=False)
                energy = s ** 2 / (s ** 2).sum()
                keep = int((torch.cumsum(energy, 0) < threshold).sum())
                self.bases.append(u[:, :max(keep, 1)])
                self.kinds.append("remove")
            elif self.kinds[block] == "remove":
                self._grow(block, matrix, threshold)
            else:
                self._shrink_complement(block, matrix, threshold)
            self._store_smaller(block)

    def _grow(self, block: int, matrix: torch.Tensor, threshold: float) -> None:
        total = (torch.linalg.svdvals(matrix) ** 2).sum()
        u, s, _ = torch.linalg.svd(self.outside(block, matrix), full_matrices=False)
        energy = s ** 2 / total
        captured = 1 - (s ** 2).sum() / total  # already inside the old subspace
        added = 0
        while added < len(energy) and captured < threshold:
            captured += energy[added]
            added += 1
        if added:
            basis = torch.cat([self.bases[block], u[:, :added]], dim=1)
            self.bases[block] = basis[:, :basis.shape[0]]

    def _shrink_complement(self, block: int, matrix: torch.Tensor, threshold: float) -> None:
        total = (torch.linalg.svdvals(matrix) ** 2).sum()
        u, s, _ = torch.linalg.svd(self.outside(block, matrix), full_matrices=False)
        energy = s ** 2 / total
        outside = (s ** 2).sum() / total  # not yet inside the old subspace
        removed = 0
        while removed < len(energy) and outside >= 1 - threshold:
            outside -= energy[removed]
            removed += 1
        if removed:
            complement = self.bases[block]
            taken = u[:, :removed]
            rest = complement - taken @ (taken.T @ complement)
            self.bases[block] = torch.linalg.svd(rest)[0][:, :complement.shape[1] - removed]

    def _store_smaller(self, block: int) -> None:
        basis = self.bases[block]
        if self.kinds[block] == "remove" and basis.shape[1] > basis.shape[0] / 2:
            self.bases[block] = torch.linalg.svd(basis)[0][:, basis.shape[1]:]
            self.kinds[block] = "retain"

    def state_dict(self) -> dict:
        return {"bases": list(self.bases), "kinds": list(self.kinds)}

    def load_state_dict(self, state: dict) -> None:
        self.bases, self.kinds = list(state["bases"]), list(state["kinds"])


@register_learner("inflora")
class InfLoRA(LoRALearner):
    config_class = InfLoRAConfig
    official_variant = "coda_prompt"  # the official CIFAR transforms: RandomResizedCrop(224), flip; Resize(224); no normalisation
    scenarios = ("class", "task")

    lora_slices = ("k", "v")
    head_init = "torch"  # nn.Linear per task

    def __init__(self, config: InfLoRAConfig, ctx):
        super().__init__(config, ctx)
        self.subspaces = DualGPM()

    @classmethod
    def validate_config(cls, config: InfLoRAConfig) -> None:
        validate_train_config(config)
        if config.rank < 1:
            raise PilotError(f"rank must be a positive integer, got {config.rank}.")
        if not 0 < config.lamb <= 1 or not 0 < config.lame <= 1:
            raise PilotError(f"lamb ({config.lamb}) and lame ({config.lame}) are energy thresholds: each must lie in (0, 1].")

    @property
    def cosine_schedule(self) -> str:
        return "inflora_cosine" if self.config.optimizer == "adam" else "cosine_annealing"

    def train_transform(self):
        return self.ctx.train_transform(crop_scale=(0.08, 1.0))  # the official RandomResizedCrop(224)

    def threshold(self, task: Task) -> float:
        return self.config.lamb + (self.config.lame - self.config.lamb) * task.index / self.ctx.protocol.planned_tasks

    @torch.no_grad()
    def input_matrices(self, task: Task) -> list[torch.Tensor]:
        """Each block's qkv input matrix over one pass of the task's augmented training images."""
        loader = self.ctx.train_loader(task.train, self.config.batch_size, self.train_transform())
        with self.net["lora"].record_inputs(), self.ctx.autocast():
            for images, _, _ in loader:
                self.ctx.backbone(images.to(self.ctx.device))
        return self.net["lora"].input_matrices()

    def begin_task(self, task: Task) -> None:
        self.task_index = task.index
        lora = self.net["lora"]
        for earlier in range(len(lora)):  # frozen for good (loaded from a checkpoint, they come back trainable)
            lora.freeze_pair(earlier)
        index = lora.add_pair(self.config.rank)
        for block, matrix in enumerate(self.input_matrices(task)):
            matrix = matrix.double()
            if self.subspaces.bases:
                matrix = self.subspaces.outside(block, matrix)
            down = torch.linalg.svd(matrix, full_matrices=False)[0][:, :self.config.rank].T / math.sqrt(3)
            for name in lora.slices:
                lora.pair(index, name)[block].down.data.copy_(down.float())
        lora.freeze_pair(index)
        for up in lora.pair_parameters(index, ("up",)):
            up.requires_grad_(True)
        self.net["heads"][task.index].requires_grad_(True)

    def trainable(self) -> list[nn.Parameter]:
        return self.net["lora"].pair_parameters(self.task_index, ("up",)) + list(self.net["heads"][self.task_index].parameters())

    def end_task(self, task: Task) -> None:
        self.net["lora"].freeze_pair(task.index)
        self.net["heads"][task.index].requires_grad_(False)
        self.subspaces.update(self.input_matrices(task), self.threshold(task))


    def state_dict(self):
        return {**super().state_dict(), "subspaces": self.subspaces.state_dict()}

    def load_state_dict(self, state):
        super().load_state_dict(state)
        self.subspaces.load_state_dict(state["subspaces"])
