"""HiDe-Prompt (Wang et al., NeurIPS 2023): hierarchical decomposition of the continual-learning objective.

Per task, on one frozen ViT:

1. task-identity inference: an MLP and a linear head over all classes on the frozen, unprompted [CLS]
   feature, trained on the task's images (cross-entropy over its classes); then the frozen features of its
   training images are summarised per class (10 k-means centroids with their variances) and, from the second
   task, the MLP and head re-align on features drawn from every seen class's statistics. At test time the
   predicted class's task picks the prompt;
2. within-task prediction: the task's prefix prompt (blocks 0-4, length 5), started from the previous task's,
   trains with the linear head over the task's classes, mixed with the earlier prompts' mean (momentum 0.01),
   plus ``reg`` × a contrastive loss of the prompted features against the old classes' stored means;
3. task-adaptive prediction: the prompted features of the task's training images are summarised per class
   likewise, and from the second task the head re-aligns on features drawn from all of them.

Follows the official code (thu-ml/HiDe-Prompt: ``engines/hide_tii_engine.py`` for 1,
``engines/hide_promtp_wtp_and_tap_engine.py`` for 2-3, ``vits/hide_prompt_vision_transformer.py``,
``peft/prompt/hide_prompt.py``, ``configs/cifar100_hideprompt_5e.py``, ``training_scripts/train_cifar100_vit.sh``).
The official code trains step 1 for every task in one run, then steps 2-3 in another; here each task
runs 1, then 2-3 (step 1 of a task reads only that task's images, so the order changes no value).
"""
from __future__ import annotations

from dataclasses import dataclass, field, replace
from typing import Any, Optional

import torch
from torch import nn

from pilot.data.stream import Split, Task
from pilot.errors import PilotError, config_values
from pilot.learners import register_learner
from pilot.learners._alignment import fit_on_gaussian_samples
from pilot.learners._gradient import TrainConfig
from pilot.learners._prompt import PromptLearner, check_blocks
from pilot.modules.gaussians import ClassGaussians
from pilot.modules.heads import linear_head
from pilot.modules.prompting import prefixes_for_blocks
from pilot.modules.task_prompts import PROMPT_INITS, ResidualMLP, TaskPrompts, prototype_contrast

STORAGE = ("covariance", "variance", "multi-centroid")
CONTRAST_TEMPERATURE = 0.8  # official orth_loss
CA_SAMPLE_FACTOR = 5  # step 3 draws batch_size * 5 features per Gaussian (step 1: batch_size)


@dataclass
class HiDePromptConfig(TrainConfig):
    """The official CIFAR-100 run (train_cifar100_vit.sh, cifar100_hideprompt_5e.py). Its trainers scale
    every rate by batch 24 / 256 (``unscale_lr``) except step 3's ``ca_lr``: the values below are the scaled ones."""

    # --- step 2: within-task prediction (the script's second command) ---
    tuned_epoch: int = 50
    init_lr: float = 0.0028125  # 0.03 x 24 / 256: the prompts' rate; the head trains at a tenth (larger_prompt_lr)
    batch_size: int = 24  # per GPU in the official 8-GPU run
    optimizer: str = "adam"
    # timm's StepLR (decay_epochs 30), stepped with the finished epoch's index: the rate drops from the 32nd epoch
    scheduler: str = "steplr"
    milestones: list[int] = field(default_factory=lambda: [31])
    lr_decay: float = 0.1
    clip_grad: float = 1.0
    e_prompt_layer_idx: list[int] = field(default_factory=lambda: [0, 1, 2, 3, 4])
    length: int = 5
    prompt_init: str = "uniform"
    prompt_momentum: float = 0.01  # the task's prompt mixed with the earlier prompts' mean (0: none)
    reg: float = 0.1  # weight of the contrastive loss against the old classes' means
    larger_prompt_lr: bool = True  # the head at init_lr / 10 (false: at init_lr too)
    # --- steps 1 and 3: class statistics and classifier alignment ---
    crct_epochs: int = 30  # alignment epochs of both heads (0: no alignment)
    ca_lr: float = 0.005  # step 3's alignment rate (its trainer leaves it unscaled)
    ca_storage_efficient_method: str = "multi-centroid"
    n_centroids: int = 10
    # --- step 1: task-identity inference (the script's first command, --train_inference_task_only) ---
    tii_epochs: int = 20
    tii_lr: float = 4.6875e-5  # 0.0005 x 24 / 256, constant
    tii_ca_lr: float = 4.6875e-4  # 0.005 x 24 / 256
    original_model_mlp_structure: list[int] = field(default_factory=lambda: [2])


@register_learner("hide_prompt")
class HiDePrompt(PromptLearner):
    config_class = HiDePromptConfig
    scenarios = ("class", "task")
    domain_refusal = ("its task inference maps the predicted class to the task that brought it, and a domain stream's "
                      "tasks share their classes")
    min_train_per_class = 2  # each class's statistics
    official_variant = "slca"  # the official CIFAR transforms: bicubic crops, ColorJitter, CIFAR-100 mean/std

    def __init__(self, config: HiDePromptConfig, ctx):
        super().__init__(config, ctx)
        dim = ctx.backbone.feature_dim
        check_blocks(self.vit, "e_prompt_layer_idx", config.e_prompt_layer_idx)
        self.net["prompts"] = TaskPrompts(ctx.protocol.num_tasks, config.length, dim, len(config.e_prompt_layer_idx),
                                          config.prompt_init)
        self.net["task_identity"] = nn.Sequential(ResidualMLP(dim, config.original_model_mlp_structure),
                                                  linear_head(dim, ctx.protocol.num_classes))
        self.attach()
        diagonal = config.ca_storage_efficient_method == "variance"
        self.frozen_statistics = ClassGaussians(dim, diagonal)  # step 1: unprompted features
        self.prompted_statistics = ClassGaussians(dim, diagonal)  # step 3: each class under its task's prompt
        self.inferring_tasks = False  # True while step 1 trains
        self._report: dict[str, Any] = {}

    @classmethod
    def validate_config(cls, config: HiDePromptConfig) -> None:
        super().validate_config(config)
        if config.ca_storage_efficient_method not in STORAGE:
            raise PilotError(f"ca_storage_efficient_method must be one of {', '.join(STORAGE)}, got "
                             f"'{config.ca_storage_efficient_method}'.")
        if config.prompt_init not in PROMPT_INITS:
            raise PilotError(f"prompt_init must be one of {', '.join(PROMPT_INITS)}, got '{config.prompt_init}'.")
        if not 0 <= config.prompt_momentum <= 1:
            raise PilotError(f"prompt_momentum must lie in [0, 1], got {config.prompt_momentum}.")
        if config.length < 1 or not config.e_prompt_layer_idx or config.n_centroids < 1:
            raise PilotError("length and n_centroids must be >= 1 and e_prompt_layer_idx name at least one block.")
        if config.reg < 0 or config.crct_epochs < 0 or config.tii_epochs < 0:
            raise PilotError("reg, crct_epochs and tii_epochs must be >= 0.")
        if min(config.ca_lr, config.tii_lr, config.tii_ca_lr) <= 0:
            raise PilotError("ca_lr, tii_lr and tii_ca_lr must be > 0.")
        if any(width < 1 for width in config.original_model_mlp_structure):
            raise PilotError(f"original_model_mlp_structure lists hidden widths as multiples of the feature width, "
                             f"each >= 1, got {config.original_model_mlp_structure}.")

    # --- step 1: task-identity inference on the frozen, unprompted features -------------------

    def begin_task(self, task: Task) -> None:
        self.learn_task_identity(task)
        self.net["prompts"].start_from_previous(task.index)

    def learn_task_identity(self, task: Task) -> None:
        """Train the task-identity head as the official ``--train_inference_task_only`` run: Adam at ``tii_lr``,
        constant, with the template's epoch loop; then its class statistics and, from task 2, its alignment."""
        config, head = self.config, self.net["task_identity"]
        settings = replace(config, tuned_epoch=config.tii_epochs, init_lr=config.tii_lr, scheduler="constant")
        self.inferring_tasks = True
        try:
            if settings.tuned_epoch:
                self.train_epochs(task, list(head.parameters()), settings)
        finally:
            self.inferring_tasks = False
        self.add_statistics(self.frozen_statistics, self.ctx.features(task.train), task)
        if task.index > 0 and config.crct_epochs > 0:
            self.align(head, self.frozen_statistics, config.tii_ca_lr, config.batch_size, task, "task identity")

    def infer_tasks(self, frozen_features: torch.Tensor) -> torch.Tensor:
        """The task of each image's most likely seen class under the task-identity head."""
        classes = self.net["task_identity"](frozen_features)[:, : self.num_seen].argmax(1)
        return self.ctx.protocol.task_of(classes.cpu()).to(frozen_features.device)

    # --- step 2: the task's prompt and the head -------------------------------------------------

    def trainable(self) -> list[nn.Parameter]:
        return list(self.net["prompts"].parameters()) + list(self.net["head"].parameters())

    def param_groups(self, parameters: list[nn.Parameter]) -> list[nn.Parameter] | list[dict]:
        """Step 2: the prompts at ``init_lr``, the head at a tenth of it (``larger_prompt_lr``)."""
        if self.inferring_tasks or not self.config.larger_prompt_lr:
            return parameters
        prompts = {id(p) for p in self.net["prompts"].parameters()}
        return [{"params": [p for p in parameters if id(p) in prompts], "lr": self.config.init_lr},
                {"params": [p for p in parameters if id(p) not in prompts], "lr": self.config.init_lr * 0.1}]

    def train_outputs(self, images: torch.Tensor, labels: torch.Tensor, task: Task):
        if self.inferring_tasks:
            logits = self.net["task_identity"](self.query(images))
            return logits, torch.zeros((), device=logits.device)
        prompts = self.net["prompts"].with_momentum(task.index, self.config.prompt_momentum)
        features = self.prompted_features(images, prompts.expand(len(images), *prompts.shape))
        extra = self.config.reg * prototype_contrast(features.float(), self.prompted_statistics.means,
                                                     CONTRAST_TEMPERATURE)
        return self.net["head"](features), extra

    def prompted_features(self, images: torch.Tensor, prompts: torch.Tensor) -> torch.Tensor:
        """[CLS] after the final norm, each image with its prefix prompts [B, layers, 2, length, D]."""
        with self.prompts.use(prefixes=prefixes_for_blocks(prompts, self.config.e_prompt_layer_idx)):
            return self.vit.forward_head(self.vit.forward_features(images), pre_logits=True)

    def eval_logits(self, images: torch.Tensor, queries: Optional[torch.Tensor]) -> torch.Tensor:
        return self.net["head"](self.prompted_features(images, self.net["prompts"](self.infer_tasks(queries))))

    # --- step 3: statistics of the prompted features, alignment of the head --------------------

    def end_task(self, task: Task) -> None:
        prompts = self.net["prompts"]
        prompts.settle(task.index, self.config.prompt_momentum)
        own = torch.full((1,), task.index, device=self.ctx.device)
        features = self.ctx.encode(lambda images: self.prompted_features(images, prompts(own.expand(len(images)))),
                                   task.train)
        self.add_statistics(self.prompted_statistics, features, task)
        if task.index > 0 and self.config.crct_epochs > 0:
            self.align(self.net["head"], self.prompted_statistics, self.config.ca_lr,
                       self.config.batch_size * CA_SAMPLE_FACTOR, task, "task-adaptive prediction")

    def add_statistics(self, statistics: ClassGaussians, features: torch.Tensor, task: Task) -> None:
        """Per class of the task: mean and covariance, variances, or ``n_centroids`` k-means clusters."""
        labels = torch.as_tensor(task.train.labels)
        with config_values("train_per_class", "n_centroids"):
            if self.config.ca_storage_efficient_method == "multi-centroid":
                statistics.add_centroids(features, labels, task.classes, self.config.n_centroids, self.ctx.generator)
            else:
                statistics.add_classes(features, labels, task.classes)

    def align(self, head: nn.Module, statistics: ClassGaussians, lr: float, samples: int, task: Task,
              what: str) -> None:
        """The official ``train_task_adaptive_prediction``: SGD (momentum 0.9; its parameter group's weight decay,
        args.weight_decay = 0, overrides the optimiser's 5e-4), cosine over ``crct_epochs``; each epoch draws
        ``samples`` features per Gaussian and trains on as many batches of that size as there are old classes."""
        optimizer = torch.optim.SGD(head.parameters(), lr=lr, momentum=0.9, weight_decay=0.0)
        fit_on_gaussian_samples(lambda features: head(features)[:, : self.num_seen], optimizer, statistics,
                                self.ctx.generator, self.ctx.device, epochs=self.config.crct_epochs, samples=samples,
                                batches=task.num_old, where=f"{self.task_tag}, classifier alignment ({what})")

    # --- evaluation report, checkpoint ----------------------------------------------------------

    def predict_tasks(self, splits: list[Split]) -> list[torch.Tensor]:
        logits = [self.predict(split) for split in splits]
        with torch.no_grad():
            chosen = torch.cat([self.infer_tasks(self.ctx.features(split).to(self.ctx.device)).cpu()
                                for split in splits])
        own = torch.cat([self.ctx.protocol.task_of(torch.as_tensor(split.labels)) for split in splits])
        self._report = {"task_identification_accuracy": 100.0 * float((chosen == own).double().mean())}
        return logits

    def evaluation_report(self) -> dict[str, Any]:
        return self._report

    def state_dict(self):
        return {**super().state_dict(), "frozen_statistics": self.frozen_statistics.state_dict(),
                "prompted_statistics": self.prompted_statistics.state_dict()}

    def load_state_dict(self, state):
        super().load_state_dict(state)
        self.frozen_statistics.load_state_dict(state["frozen_statistics"])
        self.prompted_statistics.load_state_dict(state["prompted_statistics"])
