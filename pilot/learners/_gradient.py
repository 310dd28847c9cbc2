"""The training template shared by learners that fit parameters with gradients.

A subclass says what is different about its method: which modules train (``trainable``), the
logits (and any extra loss) of a training batch, and the logits of an evaluation batch; named
hooks (``begin_task``, ``begin_epoch``, ``param_groups``, ``before_step``, ``after_step``, ``end_task``) add what
happens around them. The template owns the optimiser and schedule (PILOT's keys), the epoch loop,
masking of the logits of classes outside the current task, gradient clipping, mixed precision and
evaluation. ``fit_on_features`` is the small loop for heads trained on batches of features.
"""
from __future__ import annotations

import math
import warnings
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import Optional

import torch
import torch.nn.functional as F
from torch import nn

from pilot.config import LearnerConfig
from pilot.data.stream import Split, Task
from pilot.distributed import average_gradients
from pilot.errors import PilotError
from pilot.learners._base import Learner, require_finite

OPTIMIZERS = ("sgd", "adam", "adamw")
# "cosine" is PILOT's key, which means what it meant in PILOT for each method (a learner's
# ``cosine_schedule``): torch's CosineAnnealingLR, or CODA-Prompt's own schedule; either is also
# named outright, so a run can switch one for the other.
SCHEDULERS = ("constant", "cosine", "steplr", "cosine_annealing", "coda_cosine", "inflora_cosine",
              "torch_constant")


@dataclass
class TrainConfig(LearnerConfig):
    """PILOT's optimisation keys; each learner's subclass sets its method's published values.

    PILOT's SLCA names three of them ``epochs``, ``lrate``, ``lrate_decay``: those names work too
    (``pilot.config.PILOT_KEY_ALIASES``).
    """

    tuned_epoch: int = 5
    init_lr: float = 0.001
    batch_size: int = 16
    weight_decay: float = 0.0
    min_lr: float = 0.0
    optimizer: str = "adam"
    scheduler: str = "constant"
    momentum: float = 0.9
    milestones: list[int] = field(default_factory=list)
    lr_decay: float = 0.1
    # Clip the gradient norm of the trained parameters to this (0 = off).
    clip_grad: float = 0.0


def validate_train_config(config: TrainConfig, phase: str = "", warn: bool = True) -> None:
    """``phase`` names the tasks these settings train ("the first task"), where a learner has settings per phase;
    ``warn=False`` leaves the warning about milestones to the caller, which warns once for all its phases."""
    if config.optimizer not in OPTIMIZERS:
        raise PilotError(f"optimizer must be one of {', '.join(OPTIMIZERS)}, got '{config.optimizer}'.")
    if config.scheduler not in SCHEDULERS:
        raise PilotError(f"scheduler must be one of {', '.join(SCHEDULERS)}, got '{config.scheduler}'.")
    if config.tuned_epoch < 0 or config.batch_size < 1 or config.init_lr <= 0:
        raise PilotError("tuned_epoch must be >= 0, batch_size >= 1 and init_lr > 0.")
    if warn:
        warn_of_late_milestones([(phase, config)])


def late_milestones(config: TrainConfig) -> list[int]:
    """The milestones a step schedule never reaches: at or past the last epoch."""
    if config.scheduler != "steplr" or not config.tuned_epoch:
        return []
    return [m for m in config.milestones if m >= config.tuned_epoch]


def warn_of_late_milestones(phases: list[tuple[str, TrainConfig]]) -> None:
    """One warning for every (phase, settings) whose milestones are never reached. PILOT's configs have them
    (finetune.json, icarl.json, der.json, ...): its MultiStepLR then never decays, and pilot runs them alike."""
    late = [f"milestones {late_milestones(config)} are at or past the last epoch ({config.tuned_epoch} epochs)"
            f"{f' of {phase}' if phase else ''}" for phase, config in phases if late_milestones(config)]
    if late:
        warnings.warn(f"{'; '.join(late)}: the learning rate does not decay there, as in PILOT. Set milestones below "
                      f"the number of epochs for a decay.", stacklevel=4)


def make_optimizer(parameters: list[nn.Parameter] | list[dict], config: TrainConfig) -> torch.optim.Optimizer:
    """PILOT's optimiser at ``init_lr``; parameter groups may set their own ``lr``."""
    lr = config.init_lr
    if config.optimizer == "sgd":
        return torch.optim.SGD(parameters, lr=lr, momentum=config.momentum, weight_decay=config.weight_decay)
    if config.optimizer == "adamw":
        return torch.optim.AdamW(parameters, lr=lr, weight_decay=config.weight_decay)
    return torch.optim.Adam(parameters, lr=lr, betas=(0.9, 0.999), weight_decay=config.weight_decay)


def coda_cosine_factor(epoch: int, epochs: int) -> float:
    """CODA-Prompt's ``CosineSchedule`` (official and PILOT's): epoch e >= 1 trains at
    lr * cos(99 pi (e - 1) / (200 (K - 1))) and epoch 0 at lr, so the last epoch ends near lr / 30."""
    if epoch == 0 or epochs < 2:
        return 1.0
    return math.cos(99 * math.pi * (epoch - 1) / (200 * (epochs - 1)))


def make_scheduler(optimizer: torch.optim.Optimizer, config: TrainConfig, cosine: str = "cosine_annealing"):
    """Stepped once per epoch, as PILOT does; ``cosine`` is what the key "cosine" means for the method."""
    kind = cosine if config.scheduler == "cosine" else config.scheduler
    if kind == "cosine_annealing":
        return torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=max(config.tuned_epoch, 1), eta_min=config.min_lr)
    if kind == "coda_cosine":
        return torch.optim.lr_scheduler.LambdaLR(optimizer, lambda epoch: coda_cosine_factor(epoch, config.tuned_epoch))
    if kind == "inflora_cosine":  # the same CosineSchedule as InfLoRA's code steps it: epoch e at lr * cos(99 pi e / (200 (K - 1)))
        return torch.optim.lr_scheduler.LambdaLR(optimizer, lambda epoch: math.cos(99 * math.pi * epoch / (200 * max(config.tuned_epoch - 1, 1))))
    if kind == "torch_constant":  # torch's ConstantLR with its defaults (PILOT's DUCT): a third of the rate for 5 epochs
        return torch.optim.lr_scheduler.ConstantLR(optimizer)
    if config.scheduler == "steplr":
        return torch.optim.lr_scheduler.MultiStepLR(optimizer, milestones=config.milestones, gamma=config.lr_decay)
    return torch.optim.lr_scheduler.LambdaLR(optimizer, lambda epoch: 1.0)


def descend(optimizer: torch.optim.Optimizer, loss: torch.Tensor, clip: Iterable[nn.Parameter] = (),
            clip_grad: float = 0.0, after_backward: Callable[[], None] = lambda: None) -> float:
    """One optimiser step on ``loss``, clipping the gradient norm of ``clip`` to ``clip_grad`` (0 = off);
    ``after_backward`` runs between the backward pass and the clipping (gradient averaging, hooks)."""
    optimizer.zero_grad(set_to_none=True)
    loss.backward()
    after_backward()
    if clip_grad > 0:
        torch.nn.utils.clip_grad_norm_(clip, clip_grad)
    optimizer.step()
    return loss.item()


def fit_on_features(logits: Callable[[torch.Tensor], torch.Tensor], optimizer: torch.optim.Optimizer, epochs: int,
                    batches: Callable[[], Iterable[tuple[torch.Tensor, torch.Tensor]]], scheduler=None,
                    where: str = "training on features") -> None:
    """Cross-entropy training of a head on feature batches: ``batches()`` yields one epoch's
    (features, targets); the scheduler, if any, steps after each epoch. ``where`` names the phase
    (learner, task) in the error that a non-finite loss raises."""
    for epoch in range(epochs):
        for step, (features, targets) in enumerate(batches()):
            loss = F.cross_entropy(logits(features), targets)
            require_finite(loss.detach(), "loss", f"{where}, epoch {epoch + 1}, step {step + 1}")
            descend(optimizer, loss)
        if scheduler is not None:
            scheduler.step()


def mask_to_task(logits: torch.Tensor, task: Task) -> torch.Tensor:
    """Only the current task's classes compete in the training loss (L2P, DualPrompt, CODA)."""
    masked = torch.full_like(logits, -math.inf)
    masked[:, task.classes.start:task.classes.stop] = logits[:, task.classes.start:task.classes.stop]
    return masked


class GradientLearner(Learner):
    """Template: ``fit`` trains ``trainable()`` for ``tuned_epoch`` epochs on the task's data."""

    config_class = TrainConfig
    mask_old_classes = True  # train on logits of the current task's classes only
    cosine_schedule = "cosine_annealing"  # what PILOT's scheduler "cosine" means for the method
    drop_last = False  # drop each epoch's last, smaller batch (CODA-Prompt's loader does)

    def __init__(self, config: TrainConfig, ctx):
        super().__init__(config, ctx)
        self.num_seen = 0
        self.task_tag = ""  # "<learner>: task <k>" while fitting task k, and the training step under way:
        self.position = ""  # both name the point of a non-finite loss in its error
        # Everything the method learns (prompts, heads, ...), saved in checkpoints; subclasses fill it.
        self.net = nn.ModuleDict()

    @classmethod
    def validate_config(cls, config: TrainConfig) -> None:
        validate_train_config(config)

    # --- what a method defines -----------------------------------------------------------

    def trainable(self) -> list[nn.Parameter]:
        raise NotImplementedError

    def train_outputs(self, images: torch.Tensor, labels: torch.Tensor, task: Task) -> tuple[torch.Tensor, torch.Tensor]:
        """Logits over all classes and an extra loss term (0 if none) for a training batch."""
        raise NotImplementedError

    def eval_logits(self, images: torch.Tensor, queries: Optional[torch.Tensor]) -> torch.Tensor:
        """Logits over all classes for an evaluation batch; ``queries`` are its rows of ``eval_queries``."""
        raise NotImplementedError

    def eval_queries(self, split: Split) -> Optional[torch.Tensor]:
        """Per-image inputs computed once per split before evaluating it (e.g. cached frozen features)."""
        return None

    def begin_task(self, task: Task) -> None:
        """Before training on ``task`` (e.g. grow or initialise prompts)."""

    def begin_epoch(self, task: Task, epoch: int) -> None:
        """Before each training epoch (e.g. freeze a module for the first epochs)."""

    def end_task(self, task: Task) -> None:
        """After training on ``task`` (e.g. merge, align, compute statistics)."""

    def train_transform(self):
        return self.ctx.train_transform()

    def training_split(self, task: Task) -> Split:
        """The images a task trains on: its own, then the rehearsal memory's exemplars where the learner keeps
        them (PILOT appends the memory to the task's data: one dataset, shuffled together)."""
        memory = self.ctx.memory
        return task.train.joined(memory.split()) if memory is not None and len(memory) else task.train

    def training_batches(self, task: Task, loader: Iterable) -> Iterable[tuple[torch.Tensor, torch.Tensor, torch.Tensor]]:
        """The (images, labels, positions) batches of one epoch: the loader's (a method that draws, say, a
        separate memory batch per step overrides this)."""
        return loader

    def training_loss(self, logits: torch.Tensor, labels: torch.Tensor, task: Task) -> torch.Tensor:
        """The loss of a training batch's logits over all classes (``train_outputs``' extra term is added to it):
        cross-entropy, over the current task's classes alone where ``mask_old_classes``. A replay or
        distillation method overrides this, not the loop."""
        if self.mask_old_classes:
            logits = mask_to_task(logits, task)
        return F.cross_entropy(logits, labels)

    def task_settings(self, task: Task) -> TrainConfig:
        """The optimisation settings of ``task`` (epochs, rate, schedule): the first task's or the later tasks'."""
        return self.settings(self.config, self.uses_first_settings(task))

    def uses_first_settings(self, task: Task) -> bool:
        """Whether ``task`` trains with the first task's settings: the first task alone, unless a method says otherwise."""
        return task.index == 0

    @classmethod
    def settings(cls, config, first_task: bool) -> TrainConfig:
        """The settings of the first task or of a later one: the config's for both by default; methods with
        PILOT's per-phase keys (finetune's ``init_``, EASE's ``later_``) map them here."""
        return config

    @classmethod
    def validate_settings(cls, config) -> None:
        """Check both phases' settings (what ``validate_config`` of a method with per-phase keys calls): once
        where they are the same, so each problem is reported once."""
        first, later = cls.settings(config, True), cls.settings(config, False)
        if first == later:
            validate_train_config(first)
        else:
            validate_train_config(first, "the first task", warn=False)
            validate_train_config(later, "later tasks", warn=False)
            warn_of_late_milestones([("the first task", first), ("later tasks", later)])

    def param_groups(self, parameters: list[nn.Parameter]) -> list[nn.Parameter] | list[dict]:
        """What the task's optimiser gets: the parameters, or groups with their own ``lr`` (SLCA's slow backbone)."""
        return parameters

    def before_step(self, task: Task) -> None:
        """After the backward pass (gradients averaged over ranks), before clipping and the optimiser step
        (e.g. MOS's official in-forward merge)."""

    def after_step(self, task: Task) -> None:
        """After each optimiser step (e.g. LAE's EMA of the online module)."""

    def set_train_mode(self, training: bool) -> None:
        """Frozen backbones stay in eval mode; override where a method fine-tunes."""
        self.ctx.backbone.eval()

    # --- the template ----------------------------------------------------------------------

    def fit(self, task: Task) -> None:
        self.num_seen = task.num_seen
        self.task_tag = f"{self.name}: task {task.index + 1}"
        self.begin_task(task)
        parameters = [p for p in self.trainable() if p.requires_grad]
        settings = self.task_settings(task)
        if settings.tuned_epoch and parameters:
            self.train_epochs(task, parameters, settings)
        self.end_task(task)

    def train_epochs(self, task: Task, parameters: list[nn.Parameter], config: TrainConfig) -> None:
        ctx = self.ctx
        optimizer = make_optimizer(self.param_groups(parameters), config)  # one per task: PILOT's reinit_optimizer
        scheduler = make_scheduler(optimizer, config, self.cosine_schedule)
        loader = ctx.train_loader(self.training_split(task), config.batch_size, self.train_transform(),
                                  drop_last=self.drop_last)
        self.set_train_mode(True)
        for epoch in range(config.tuned_epoch):
            self.begin_epoch(task, epoch)
            phase = ctx.progress(self.training_batches(task, loader),
                                 f"task {task.index + 1} epoch {epoch + 1}/{config.tuned_epoch}")
            total_loss = 0.0
            for step, (images, labels, _) in enumerate(phase):
                self.position = f"{self.task_tag}, epoch {epoch + 1}, step {step + 1}"
                total_loss += self.train_step(images.to(ctx.device), labels.to(ctx.device), task, optimizer,
                                              parameters, config.clip_grad)
                phase.note(mean_loss=f"{total_loss / (step + 1):.3f}")
            scheduler.step()
        self.set_train_mode(False)

    def train_step(self, images, labels, task, optimizer, parameters, clip_grad: float) -> float:
        with self.ctx.autocast():
            logits, extra = self.train_outputs(images, labels, task)
        require_finite(logits.detach(), "logits", self.position)
        loss = self.training_loss(logits.float(), labels, task) + extra
        require_finite(loss.detach(), "loss", self.position)

        def after_backward():
            average_gradients(parameters, len(labels))  # under torchrun: the whole global batch's gradient
            self.before_step(task)

        value = descend(optimizer, loss, parameters, clip_grad, after_backward)
        self.after_step(task)
        return value

    @property
    def test_batch_size(self) -> Optional[int]:
        """Batch size of evaluation where it changes predictions; None: the run's eval_batch_size."""
        return None

    def predict(self, split: Split) -> torch.Tensor:
        self.set_train_mode(False)
        queries = self.eval_queries(split)
        if queries is None:
            logits = self.ctx.encode(lambda images: self.eval_logits(images, None), split, batch_size=self.test_batch_size)
        else:
            logits = self.ctx.encode(self.eval_logits, split, extra=queries, batch_size=self.test_batch_size)
        return logits[:, : self.num_seen]

    def state_dict(self):
        return {"num_seen": self.num_seen, "net": self.net.state_dict()}

    def load_state_dict(self, state):
        self.num_seen = state["num_seen"]
        self.net.load_state_dict(state["net"])
