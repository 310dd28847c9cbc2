"""CoFiMA (Marouf et al., ECCV 2024): Continual Fisher-weighted Model Averaging, on top of SLCA.

SLCA's training, plus, from the second task on, a merge of the previous task's final model
(merged backbone, aligned heads) with the model just trained, weighted per parameter by each
model's diagonal Fisher information (``pilot.modules.merge.fisher_merge``; plain interpolation with
``fisher_weighting`` off). Order within a task, as in the official code (IemProg/CoFiMA, and
PILOT's models/cofima.py): train; Fisher of the trained model on the task's training loader
(augmented, train mode, cross-entropy over all seen classes); merge backbone and heads; class
statistics with the merged backbone; classifier alignment starting from the merged heads. The
next task trains from the merged backbone and the trained (unmerged, unaligned) heads. The new
task's head comes out of the merge as its capped Fisher times its trained weights, about zero,
and alignment relearns it (the official code and PILOT); ``new_head: "trained"`` keeps it.

Deliberate departure: the official Fisher of old heads is the square of whatever stale ``.grad``
they hold (they are frozen, and only the optimiser's own parameters are zeroed); here every seen
head gets its true Fisher (``old_head_fisher: "stale_gradient"`` gives PILOT's, as its profile
exps/reproduce/pilot/cofima.json sets). It only changes where alignment starts, from the third task
on. Defaults: PILOT's exps/cofima.json.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import torch
import torch.nn.functional as F
from torch import nn

from pilot.data.stream import Task
from pilot.errors import PilotError
from pilot.learners import register_learner
from pilot.learners.slca import SLCA, SLCAConfig
from pilot.modules.heads import classify
from pilot.modules.merge import diagonal_fisher, fisher_merge, interpolate

Weights = dict[str, torch.Tensor]
NEW_HEAD_RULES = ("fisher_scaled", "trained")
OLD_HEAD_FISHER_RULES = ("true", "stale_gradient")


@dataclass
class CoFiMAConfig(SLCAConfig):
    # Weight the merge by the diagonal Fisher information (else plain interpolation).
    fisher_weighting: bool = True
    # Weight of the current task's model in the merge (the official wt_alpha).
    wt_lambda: float = 0.4
    # Ceiling on each Fisher entry (the official module constant fishermax).
    fishermax: float = 1e-4
    # The new task's head after a Fisher merge: "fisher_scaled" = capped Fisher x trained head, about 0,
    # which alignment then relearns (the official code and PILOT); "trained" keeps the trained head.
    new_head: str = "fisher_scaled"
    # The old (frozen) heads' Fisher in the merge: "true" = their squared gradients on the task's data (pilot);
    # "stale_gradient" = the square of the last gradient each head received (PILOT's getFisherDiagonal adds the
    # .grad a frozen head still holds: from the previous task's last alignment step, or task 1's last Fisher batch).
    old_head_fisher: str = "true"


@register_learner("cofima")
class CoFiMA(SLCA):
    config_class = CoFiMAConfig

    def __init__(self, config: CoFiMAConfig, ctx):
        super().__init__(config, ctx)
        self.previous_weights: Optional[Weights] = None  # taken when a task begins
        self.previous_fisher: Optional[Weights] = None  # checkpointed: it needs the previous task's data
        self.last_head_gradients: Weights = {}  # per head tensor its last gradient (old_head_fisher "stale_gradient")

    @classmethod
    def validate_config(cls, config: CoFiMAConfig) -> None:
        super().validate_config(config)
        if not 0 <= config.wt_lambda <= 1 or config.fishermax <= 0:
            raise PilotError("wt_lambda must lie in [0, 1] and fishermax must be > 0.")
        if config.new_head not in NEW_HEAD_RULES:
            raise PilotError(f"new_head must be one of {', '.join(NEW_HEAD_RULES)}, got '{config.new_head}'.")
        if config.old_head_fisher not in OLD_HEAD_FISHER_RULES:
            raise PilotError(f"old_head_fisher must be one of {', '.join(OLD_HEAD_FISHER_RULES)}, got "
                             f"'{config.old_head_fisher}'.")

    def model(self, heads: nn.ModuleList) -> nn.ModuleDict:
        """The backbone with ``heads``: the network CoFiMA estimates Fisher on and merges (a view, no copy)."""
        return nn.ModuleDict({"backbone": self.ctx.backbone, "heads": heads})

    def begin_task(self, task: Task) -> None:
        super().begin_task(task)
        if task.index > 0:  # the previous task's final model: merged backbone, aligned heads
            previous = self.model(self.net["aligned_heads"][: task.index])
            self.previous_weights = {name: p.detach().clone() for name, p in previous.named_parameters()}

    def start_alignment(self, task: Task) -> None:
        fisher = self.fisher(task) if self.config.fisher_weighting else None
        super().start_alignment(task)
        if task.index > 0:
            self.merge_with_previous(fisher)
        self.previous_fisher = fisher

    def fisher(self, task: Task) -> Weights:
        """Diagonal Fisher of the trained model (backbone, trained heads) on the task's augmented training data,
        in train mode, as the official ``getFisherDiagonal``."""
        model = self.model(self.seen_heads(self.net["heads"]))
        loader = self.ctx.train_loader(task.train, self.config.batch_size, self.train_transform(), shard=False)
        batches = ((images.to(self.ctx.device), labels.to(self.ctx.device)) for images, labels, _ in loader)

        def loss(network: nn.ModuleDict, batch) -> torch.Tensor:
            images, labels = batch
            with self.ctx.autocast():
                logits = classify(network["heads"], network["backbone"](images))
            return F.cross_entropy(logits.float(), labels)

        self.set_train_mode(True)
        if self.config.old_head_fisher == "true":
            fisher = diagonal_fisher(model, batches, loss)
        else:
            fisher = self.stale_gradient_fisher(model, batches, loss, task)
        self.set_train_mode(False)
        return fisher

    def stale_gradient_fisher(self, model: nn.ModuleDict, batches, loss, task: Task) -> Weights:
        """PILOT's Fisher: the old heads' entries are the squares of their last gradients; the new head's last
        Fisher batch gradient is kept as its last one (alignment, if it runs, replaces them all)."""
        last = []

        def remembering_the_last():
            for batch in batches:
                last[:] = [batch]
                yield batch

        fisher = diagonal_fisher(model, remembering_the_last(), loss)
        fisher.update({name: gradient.pow(2) for name, gradient in self.last_head_gradients.items()})
        new_head = {f"heads.{task.index}.{kind}": getattr(model["heads"][task.index], kind)
                    for kind in ("weight", "bias")}
        gradients = torch.autograd.grad(loss(model, last[0]), list(new_head.values()))
        self.last_head_gradients.update({name: g.detach() for name, g in zip(new_head, gradients)})
        return fisher

    def align_classifier(self) -> None:
        super().align_classifier()
        if self.config.old_head_fisher == "stale_gradient":  # what each aligned head's .grad holds now, in PILOT
            heads = self.seen_heads(self.net["aligned_heads"])
            self.last_head_gradients = {f"heads.{t}.{kind}": getattr(head, kind).grad.detach().clone()
                                        for t, head in enumerate(heads) for kind in ("weight", "bias")}

    @torch.no_grad()
    def merge_with_previous(self, fisher: Optional[Weights]) -> None:
        """Backbone and aligned heads <- merge(previous final model, trained model); the new head by ``new_head``."""
        current = dict(self.model(self.seen_heads(self.net["aligned_heads"])).named_parameters())
        trained = {name: p.detach() for name, p in current.items()}
        if fisher is None:
            shared = {name: trained[name] for name in self.previous_weights}
            merged = {**trained, **interpolate(self.previous_weights, shared, self.config.wt_lambda)}
        else:
            merged = fisher_merge(self.previous_weights, self.previous_fisher, trained, fisher,
                                  weight_b=self.config.wt_lambda, fisher_max=self.config.fishermax,
                                  new_tensors="copy" if self.config.new_head == "trained" else "fisher_scaled")
        for name, parameter in current.items():
            parameter.copy_(merged[name])

    def state_dict(self):
        return {**super().state_dict(), "previous_fisher": self.previous_fisher,
                "last_head_gradients": self.last_head_gradients}

    def load_state_dict(self, state):
        super().load_state_dict(state)
        self.previous_fisher = state["previous_fisher"]
        self.last_head_gradients = state.get("last_head_gradients", {})
