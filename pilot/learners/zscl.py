"""ZSCL (Zheng et al., ICCV 2023): fine-tuning CLIP while keeping its zero-shot ability, as the official
class-incremental code does it (Thunderbeee/ZSCL@b96e714, ``cil/continual_clip/models.py ClassIncremental.train``,
``cil/continual_clip/utils.py``; defaults of ``cil/configs/class/imagenet100_10-10-ZSCL.yaml``).

Every CLIP weight trains except ``logit_scale``, for ``tuned_epoch`` (the code hard-codes 1) passes over the
task's images plus one step (its loop runs ``range(total_iterations + 1)``), AdamW with a linear warm-up of
``warmup_iterations`` steps then cosine to 0, stepped per iteration. With ``s = exp(logit_scale)``::

    loss = CE_ls(s · norm(img(x)) · norm(txt(current task's prompts))ᵀ, y − first class of the task)
         + 5 · KD(R, S) + 5 · KD(Rᵀ, Sᵀ)
    R = s · norm(img₀(x_ref)) · norm(txt₀(ref texts))ᵀ,   S = s · norm(img(x_ref)) · norm(txt₀(ref texts))ᵀ
    KD(t, s) = CE(s / T, softmax(t / T)) · T²,  T = 2

``img₀``/``txt₀``: the frozen initial CLIP (the code reloads the pre-trained model each task); ``x_ref``: a
batch of the reference image folder (``ref_dataset``; Conceptual Captions in the CIL code, ImageNet in the
paper and MTIL), drawn without augmentation; reference texts: ``ref_sentences`` (one per line, the captions'
role) or the folder's class names in ``ref_template``. Weight ensemble (``we``): after the steps whose index is
a multiple of ``avg_freq`` (step 0 included), the running mean ``W ← (W·n + θ)/(n + 1)`` is updated (``W``
starts as the task's initial weights, ``n`` counts the updates); at the end of the task the model takes ``W``.
Prediction: ``s · norm(img(x)) · class weightsᵀ`` over the seen classes, each class's weight its prompts'
normalised features averaged and renormalised (one template, as the code, gives ``norm(txt(prompt))``).

Departures: the training transform is the run's own with the code's crop scale (RandomResizedCrop scale
0.9-1; pilot's transform adds a horizontal flip) and evaluation uses the run's eval transform (the code
evaluates through its training transform); batches and reference batches come from the run's generator, so a
resumed run equals an uninterrupted one; the code's optional ``l2`` term (off in its configs) is not offered.
Agreement with the official losses, weights and logits: ``tools/clip_official_zscl.py``.
"""
from __future__ import annotations

import copy
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch import nn
from torch.nn import functional as F

from pilot.clip import (check_templates, class_embeddings, endless, require_text, warmup_cosine_lr,
                        zero_shot_logits)
from pilot.config import LearnerConfig
from pilot.data.datasets import IMAGE_SUFFIXES, ImageSet
from pilot.data.loader import make_loader
from pilot.data.names import folder_class_name, same_form
from pilot.data.stream import Split, Task
from pilot.errors import PilotError
from pilot.learners import register_learner
from pilot.learners._base import Learner, require_finite

REFERENCE_HELP = ("Set ref_dataset to a folder of reference images with one sub-folder per class (ImageNet's train/ "
                  "in the paper; any image folder will do), e.g. \"ref_dataset\": \"/data/imagenet/train\".")
TRAIN_CROP_SCALE = (0.9, 1.0)  # the code's CLIP training transform: RandomResizedCrop(224, scale=(0.9, 1.0))
TEXT_CHUNK = 256  # reference texts encoded this many at a time


@dataclass
class ZSCLConfig(LearnerConfig):
    """``imagenet100_10-10-ZSCL.yaml`` (no CIFAR-100 ZSCL config exists in the official code)."""

    tuned_epoch: int = 1  # ``EPOCH = 1`` hard-coded in ClassIncremental.train
    init_lr: float = 7e-6  # cfg lr
    batch_size: int = 128  # cfg batch_size: task batches and reference batches alike
    weight_decay: float = 0.0  # the ZSCL yaml has none; its sibling CIL configs set 0.0
    warmup_iterations: int = 30  # utils.cosine_lr(optimizer, lr, 30, total_iterations)
    ls: float = 0.2  # label smoothing of the task's cross-entropy
    we: bool = True  # weight ensemble (cfg we: 1)
    avg_freq: int = 10  # steps between weight-ensemble updates
    distillation_weight: float = 5.0  # ``loss + 5 * loss_ZSCL + 5 * loss_ZSCL_2``
    distillation_temperature: float = 2.0  # ``distillation(..., T=2)``
    ref_dataset: str = ""  # the reference image folder (required): <class>/<image>
    ref_sentences: str = ""  # a text file of reference sentences, one per line; empty: the folder's class names
    ref_template: str = "a photo of a {}."  # the class names' prompt (conceptual_captions.template, CLIP's plain one)


def reference_folders(root: Path) -> list[str]:
    return sorted((p.name for p in root.iterdir() if p.is_dir()), key=same_form)


def reference_images(root: Path) -> ImageSet:
    """The reference folder's images, labelled by class sub-folder (sorted as the folder datasets are)."""
    paths, labels = [], []
    for label, folder in enumerate(reference_folders(root)):
        files = sorted(str(p) for p in (root / folder).iterdir() if p.suffix.lower() in IMAGE_SUFFIXES)
        paths += files
        labels += [label] * len(files)
    return ImageSet(paths, np.asarray(labels, dtype=np.int64))


def check_reference(config: ZSCLConfig) -> None:
    if not config.ref_dataset:
        raise PilotError(f"zscl distils on a reference image set, but ref_dataset is empty. {REFERENCE_HELP}")
    root = Path(config.ref_dataset).expanduser()
    if not root.is_dir():
        raise PilotError(f"zscl's reference folder '{root}' (ref_dataset) does not exist. {REFERENCE_HELP}")
    if not len(reference_images(root)):
        raise PilotError(f"zscl's reference folder '{root}' (ref_dataset) holds no images in class sub-folders "
                         f"(<class>/<image>, suffixes {', '.join(IMAGE_SUFFIXES)}). {REFERENCE_HELP}")
    if config.ref_sentences:
        path = Path(config.ref_sentences).expanduser()
        if not path.is_file() or not reference_sentences(path):
            raise PilotError(f"zscl's reference sentences file '{path}' (ref_sentences) is missing or empty: give a "
                             f"text file with one sentence per line, or leave ref_sentences empty to use the "
                             f"reference folder's class names in ref_template.")


def reference_sentences(path: Path) -> list[str]:
    return [line.strip() for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]


def reference_texts(config: ZSCLConfig) -> list[str]:
    if config.ref_sentences:
        return reference_sentences(Path(config.ref_sentences).expanduser())
    root = Path(config.ref_dataset).expanduser()
    return [config.ref_template.format(folder_class_name(folder)) for folder in reference_folders(root)]


def distillation(teacher: torch.Tensor, student: torch.Tensor, temperature: float) -> torch.Tensor:
    """Soft-target cross-entropy at temperature T, times T² (the code's ``utils.distillation``)."""
    return F.cross_entropy(student / temperature, F.softmax(teacher / temperature, dim=1)) * temperature ** 2


class WeightEnsemble:
    """The running mean of a model's parameters (``utils.merge_we``), starting from their current values."""

    def __init__(self, parameters: Sequence[nn.Parameter]):
        self.mean = [p.detach().clone() for p in parameters]
        self.count = 0

    @torch.no_grad()
    def add(self, parameters: Sequence[nn.Parameter]) -> None:
        self.count += 1
        for mean, p in zip(self.mean, parameters):
            mean.mul_(self.count).add_(p.detach()).div_(self.count + 1)

    @torch.no_grad()
    def copy_to(self, parameters: Sequence[nn.Parameter]) -> None:
        for mean, p in zip(self.mean, parameters):
            p.copy_(mean)


def encode_prompts(clip: nn.Module, tokenizer, prompts: list[str], device: torch.device) -> torch.Tensor:
    return clip.encode_text(tokenizer(prompts).to(device))


def zscl_loss(clip: nn.Module, initial: nn.Module, images: torch.Tensor, targets: torch.Tensor,
              class_text: torch.Tensor, ref_images: torch.Tensor, ref_text: torch.Tensor,
              config: ZSCLConfig) -> torch.Tensor:
    """The training loss of one step. ``class_text``: the current model's (un-normalised) text features of the
    current task's classes ``[C, T, D]``; ``ref_text``: the initial model's normalised reference text features;
    ``targets`` within the task (0 = its first class)."""
    scale = clip.logit_scale.exp()
    image = F.normalize(clip.encode_image(images), dim=-1)
    loss = F.cross_entropy(scale * image @ class_embeddings(class_text).T, targets, label_smoothing=config.ls)
    with torch.no_grad():
        teacher = scale * F.normalize(initial.encode_image(ref_images), dim=-1) @ ref_text.T
    student = scale * F.normalize(clip.encode_image(ref_images), dim=-1) @ ref_text.T
    t = config.distillation_temperature
    return loss + config.distillation_weight * (distillation(teacher, student, t) + distillation(teacher.T, student.T, t))


def train_task(clip: nn.Module, initial: nn.Module, batches: Iterator, ref_batches: Iterator, num_batches: int,
               class_prompts: Callable, ref_text: torch.Tensor, config: ZSCLConfig, device: torch.device,
               where: str = "zscl") -> list[float]:
    """One task of ``ClassIncremental.train``: ``tuned_epoch · num_batches + 1`` steps on (images, targets)
    ``batches`` and reference image ``ref_batches``; ``class_prompts()`` gives the current model's text features of
    the task's classes. Returns the losses; the model ends with the weight ensemble where ``we``."""
    parameters = [p for name, p in clip.named_parameters() if name != "logit_scale"]
    optimizer = torch.optim.AdamW(parameters, lr=config.init_lr, weight_decay=config.weight_decay)
    ensemble = WeightEnsemble(list(clip.parameters())) if config.we else None
    total = config.tuned_epoch * num_batches
    losses = []
    clip.train()
    for step in range(total + 1):
        for group in optimizer.param_groups:
            group["lr"] = warmup_cosine_lr(config.init_lr, config.warmup_iterations, total, step)
        images, targets = next(batches)
        ref_images = next(ref_batches)
        loss = zscl_loss(clip, initial, images.to(device), targets.to(device), class_prompts(),
                         ref_images.to(device), ref_text, config)
        require_finite(loss.detach(), "loss", f"{where}, step {step + 1}")
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
        if ensemble is not None and step % config.avg_freq == 0:
            ensemble.add(list(clip.parameters()))
    if ensemble is not None:
        ensemble.copy_to(list(clip.parameters()))
    clip.eval()
    return losses


@register_learner("zscl")
class ZSCL(Learner):
    config_class = ZSCLConfig
    needs_text = True
    scenarios = ("class", "task")  # the CIL code: each task's own classes in the loss (a domain stream repeats them)

    def __init__(self, config: ZSCLConfig, ctx):
        super().__init__(config, ctx)
        check_reference(config)  # here, not in validate_config: the exps file names no folder of this machine
        tower = require_text(ctx, self.name).tower
        self.tokenizer = tower.tokenizer
        self.clip = tower.model.to(ctx.device)  # the whole CLIP, fine-tuned (its image tower is the backbone)
        self.initial = copy.deepcopy(self.clip).eval().requires_grad_(False)  # taken before any resume loads weights
        images = reference_images(Path(config.ref_dataset).expanduser())
        self.reference = Split("reference", images, np.arange(len(images)), images.labels)
        self._ref_text = None

    @classmethod
    def validate_config(cls, config: ZSCLConfig) -> None:
        if config.tuned_epoch < 1 or config.batch_size < 1 or config.init_lr <= 0:
            raise PilotError("tuned_epoch and batch_size must be at least 1 and init_lr above 0.")
        if config.avg_freq < 1 or config.warmup_iterations < 1:
            raise PilotError("avg_freq and warmup_iterations must be at least 1.")
        if not 0 <= config.ls < 1 or config.distillation_temperature <= 0:
            raise PilotError("ls must be in [0, 1) and distillation_temperature above 0.")
        check_templates([config.ref_template], "ref_template")

    def ref_text(self) -> torch.Tensor:
        """The initial model's normalised features of the reference texts (fixed: computed once)."""
        if self._ref_text is None:
            texts = reference_texts(self.config)
            with torch.no_grad():
                self._ref_text = F.normalize(torch.cat([
                    encode_prompts(self.initial, self.tokenizer, texts[i:i + TEXT_CHUNK], self.ctx.device)
                    for i in range(0, len(texts), TEXT_CHUNK)]), dim=-1)
        return self._ref_text

    def prompts(self, names: Sequence[str]) -> list[str]:
        return [template.format(name) for name in names for template in self.ctx.templates]

    def text_features(self, names: Sequence[str]) -> torch.Tensor:
        """The current model's text features ``[C, T, D]`` of ``names`` under the run's templates."""
        rows = encode_prompts(self.clip, self.tokenizer, self.prompts(names), self.ctx.device)
        return rows.view(len(names), len(self.ctx.templates), -1)

    def fit(self, task: Task) -> None:
        ctx, config = self.ctx, self.config
        names = ctx.class_names[task.classes.start:task.classes.stop]
        loader = ctx.train_loader(task.train, config.batch_size, ctx.train_transform(TRAIN_CROP_SCALE))
        ref_loader = make_loader(self.reference, ctx.eval_transform, config.batch_size, shuffle=True,
                                 num_workers=ctx.experiment.num_workers, generator=ctx.generator)
        batches = ((images, labels - task.classes.start) for images, labels, _ in endless(loader))
        ref_batches = (images for images, _, _ in endless(ref_loader))
        train_task(self.clip, self.initial, batches, ref_batches, len(loader), lambda: self.text_features(names),
                   self.ref_text(), config, ctx.device, f"zscl task {task.index + 1}")

    @torch.no_grad()
    def predict(self, split: Split) -> torch.Tensor:
        self.clip.eval()
        weights = class_embeddings(self.text_features(self.ctx.class_names))
        scale = self.clip.logit_scale.exp()
        return self.ctx.encode(lambda images: zero_shot_logits(self.clip.encode_image(images), weights, scale), split)

    def state_dict(self):
        return {"clip": self.clip.state_dict()}

    def load_state_dict(self, state):
        self.clip.load_state_dict(state["clip"])
