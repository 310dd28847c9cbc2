"""What a learner may use during a run: the backbone, the protocol's facts, the names of the classes
seen, loaders, frozen features, the rehearsal memory, the device and the run's randomness. Learners see
the task they are fitting and the protocol (scenario, task sizes, class count, planned tasks), never
the data of other tasks: the context refuses to load or encode it (``DataAccess``)."""
from __future__ import annotations

import contextlib
import dataclasses
import logging
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Callable, Optional

import numpy as np
import torch

from pilot.backbones import Backbone, BackboneSet
from pilot.clip import TextFeatures, resolve_templates
from pilot.config import ExperimentConfig
from pilot.data import SourceDataset, Split, TaskStream
from pilot.data.loader import make_loader
from pilot.data.transforms import PILOT_CROP_SCALE, Preprocessing
from pilot.distributed import gather_rows, rank_and_size
from pilot.errors import PilotError
from pilot.features import ConcatenatedFeatures, FeatureStore
from pilot.memory import RehearsalMemory
from pilot.outputs import BatchWatcher, Phase


@dataclass(frozen=True)
class Protocol:
    """Facts of the stream that a method may know before it starts (e.g. to size its heads)."""

    task_sizes: tuple[int, ...]  # classes each task introduces, for the tasks this run learns (domain: C, 0, 0, ...)
    planned_tasks: int  # tasks of the full protocol (``max_tasks`` may stop earlier)
    scenario: str = "class"  # "class", "domain" or "task" (the task is known at test time)

    @classmethod
    def of(cls, stream: TaskStream) -> "Protocol":
        return cls(tuple(stream.sizes), stream.planned_tasks, stream.scenario)

    @property
    def num_tasks(self) -> int:
        return len(self.task_sizes)

    @property
    def num_classes(self) -> int:
        return sum(self.task_sizes)

    @property
    def task_classes(self) -> list[range]:
        """Each task's labels (stream order); a task that adds no class has an empty range."""
        bounds = [0]
        for size in self.task_sizes:
            bounds.append(bounds[-1] + size)
        return [range(low, high) for low, high in zip(bounds[:-1], bounds[1:])]

    def task_of(self, labels: torch.Tensor) -> torch.Tensor:
        """The task that introduced each label (past tasks that add no class)."""
        starts = torch.tensor([classes.start for classes in self.task_classes])
        return torch.searchsorted(starts, labels, right=True) - 1

    def tasks_within(self, num_seen: int) -> list[range]:
        """The classes of each task learnt once ``num_seen`` classes have been seen, up to the task that introduced
        the last of them: later tasks that add no class (a domain-incremental stream's) may still be to come."""
        if num_seen == 0:
            return []
        return self.task_classes[: int(self.task_of(torch.tensor(num_seen - 1))) + 1]


class OtherTasksData(PilotError):
    """A learner read images that are not the current task's (nor the memory's, nor a test set in evaluation)."""


class DataAccess:
    """Which images a learner may read now: while it fits a task, that task's training images and the
    rehearsal memory's exemplars (every seen task's for a learner that is not continual, the joint bound);
    while it is evaluated, the test images of the tasks seen. Open (no limit) outside the loop."""

    def __init__(self, learner: str):
        self.learner = learner
        self.phase = ""
        self.allowed: Optional[dict[str, np.ndarray]] = None  # part -> sorted indices into the source

    def allow(self, phase: str, splits: Sequence[Split]) -> None:
        self.phase = phase
        self.allowed = {part: np.unique(np.concatenate([s.indices for s in splits if s.part == part] or [np.zeros(0, int)]))
                        for part in ("train", "test")}

    def open(self) -> None:
        """No limit: the loop has ended (what is read now is inspection, not learning)."""
        self.phase, self.allowed = "", None

    def check(self, split: Split) -> None:
        if self.allowed is None:
            return
        outside = ~np.isin(split.indices, self.allowed[split.part], assume_unique=False)
        if outside.any():
            raise OtherTasksData(
                f"{self.learner} read {int(outside.sum())} {split.part} images that are not its to see {self.phase}: "
                f"a learner sees the current task's training images (and the rehearsal memory's exemplars) while it "
                f"fits, and the test images of the tasks seen while it is evaluated. Keep what a method needs of old "
                f"tasks in its state, or as exemplars in the memory (memory_size, memory_per_class).")


class RunContext:
    """Handed to every learner. ``features`` is the frozen backbone's feature store (for a
    :class:`BackboneSet`, each member's store, with its own preprocessing, joined side by side).
    ``class_names`` are the names of the classes seen so far (stream order); ``memory`` is the
    rehearsal memory (``None`` for a learner that stores no exemplars)."""

    def __init__(self, experiment: ExperimentConfig, backbone: Backbone, dataset: SourceDataset,
                 protocol: Protocol, device: torch.device, generator: torch.Generator, preprocessing: Preprocessing,
                 class_names: Sequence[str] = (), memory: Optional[RehearsalMemory] = None):
        self.experiment = experiment
        self.backbone = backbone
        self.protocol = protocol
        self.device = device
        self.generator = generator
        self.log: logging.Logger = logging.getLogger("pilot")  # the run's log once the run starts
        self.batch_watcher: Optional[BatchWatcher] = None  # the run's size check, told of every phase's batches
        self.preprocessing = preprocessing
        self.memory = memory
        self.access = DataAccess(experiment.model_name)
        self.num_seen = 0  # classes seen once the current task is learnt (set by the loop)
        self._class_names = list(class_names)
        # The feature stores' cache key names where the images are; each row is kept under its image's entry.
        self._dataset_key = f"{dataset.name}|{dataset.manifest.origin}"
        self._row_ids = dataset.manifest.row_ids
        self._stores: list[FeatureStore] = []
        if isinstance(backbone, BackboneSet):
            self.features = ConcatenatedFeatures([
                self.feature_store(member, member.identity, dataclasses.replace(preprocessing, data=member.data_config).eval())
                for member in backbone.members])
        else:
            self.features = self.feature_store(backbone, backbone.identity)
        # CLIP's text side (an open_clip backbone): the prompt templates, and the text features of prompts,
        # each encoded once (``text_features(names, templates)``); None for a backbone without a text tower.
        self.templates = resolve_templates(experiment.templates, dataset.name)
        text = getattr(backbone, "text", None)
        self.text_features = None if text is None else TextFeatures(text, backbone.identity, device,
                                                                     experiment.feature_cache_dir or None)

    @property
    def class_names(self) -> list[str]:
        """Names of the classes seen so far, in label order: a method may know these, not those to come."""
        return self._class_names[: self.num_seen]

    def open_fit(self, task, seen: Sequence = ()) -> None:
        """The loop starts fitting ``task``: its training images and the memory's become readable (with
        ``seen``, the earlier tasks', for a learner that is not continual)."""
        self.num_seen = task.num_seen
        splits = [task.train, *(t.train for t in seen)]
        if self.memory is not None and len(self.memory):
            splits.append(self.memory.split())
        self.access.allow(f"while fitting task {task.index + 1}", splits)

    def open_evaluation(self, tasks: Sequence) -> None:
        """The loop evaluates: the test images of the tasks seen become readable, and nothing else."""
        self.access.allow(f"while evaluated after task {tasks[-1].index + 1}", [t.test for t in tasks])

    # --- encoding ----------------------------------------------------------------------------

    @torch.no_grad()
    def encode(self, encoder: Callable[..., torch.Tensor], split: Split, extra: Optional[torch.Tensor] = None,
               desc: str = "", batch_size: Optional[int] = None, transform=None) -> torch.Tensor:
        """``encoder(images)`` over ``split`` in eval batches and split order, under autocast: float32 on the CPU.

        ``extra`` (rows aligned with the split, e.g. cached queries) gives ``encoder(images, extra[batch])``.
        The caller puts its modules in eval mode. ``desc`` names a progress bar; ``batch_size`` replaces
        ``eval_batch_size`` where the batches matter (batch-wise prompts); ``transform`` replaces the
        eval transform.
        """
        rank, size = rank_and_size()
        if size > 1:  # under torchrun: this rank's share, then everyone's rows on every rank
            shard = Split(split.part, split.source, split.indices[rank::size], split.labels[rank::size])
            extra = None if extra is None else extra[rank::size]
            return gather_rows(self._encode(encoder, shard, extra, desc, batch_size, transform), len(split))
        return self._encode(encoder, split, extra, desc, batch_size, transform)

    def progress(self, batches, desc: str) -> Phase:
        """``batches`` as a phase of the run: a progress bar on a terminal (unless the config's ``progress`` is
        off), one line in the run's log when it ends."""
        return Phase(batches, desc, self.log, self.experiment.progress, self.batch_watcher)

    def _encode(self, encoder, split: Split, extra, desc: str, batch_size: Optional[int], transform) -> torch.Tensor:
        chunks = []
        batches = self.eval_loader(split, transform, batch_size)
        for images, _, positions in self.progress(batches, desc) if desc else batches:
            inputs = (images.to(self.device),) if extra is None else (images.to(self.device), extra[positions].to(self.device))
            with self.autocast():
                chunks.append(encoder(*inputs).float().cpu())
        return torch.cat(chunks)

    def feature_store(self, encoder: torch.nn.Module, identity: str, transform=None) -> FeatureStore:
        """A store of ``encoder``'s eval-mode features: each image encoded at most once per run.

        ``identity`` must name everything the features depend on (architecture, weights, and any
        adaptation, e.g. a hash of adapter weights); it keys the optional disk cache. ``transform``
        replaces the run's eval transform (another backbone's input size and normalisation).
        """
        transform = transform or self.eval_transform
        exp = self.experiment
        store = FeatureStore(lambda split: self.encode(encoder.eval(), split, desc=f"encode {split.part}", transform=transform),
                             f"{identity}|{transform}|{self._dataset_key}", self._row_ids, exp.feature_cache_dir or None,
                             check=self.access.check, width=getattr(encoder, "feature_dim", None))
        self._stores.append(store)
        return store

    @property
    def encoded_images(self) -> int:
        return sum(store.encoded_images for store in self._stores)

    # --- data ------------------------------------------------------------------------------

    @property
    def eval_transform(self):
        return self.preprocessing.eval()

    def train_transform(self, crop_scale: tuple[float, float] = PILOT_CROP_SCALE):
        return self.preprocessing.train(crop_scale)

    def train_loader(self, split: Split, batch_size: int, transform=None, drop_last: bool = False,
                     shard: bool = True):
        """Augmented (``train_transform()`` unless given), shuffled with the run's generator. Under
        torchrun each rank gets its slice of every global batch (``shard=False``: whole batches)."""
        self.access.check(split)
        rank, size = rank_and_size() if shard else (0, 1)
        return make_loader(split, transform or self.train_transform(), batch_size, shuffle=True,
                           num_workers=self.experiment.num_workers, generator=self.generator, drop_last=drop_last,
                           shard=(rank, size))

    def eval_loader(self, split: Split, transform=None, batch_size: Optional[int] = None):
        """In split order, eval transform; draws from no generator, so evaluating never changes
        what training draws next (a resumed run re-evaluates nothing, yet must match)."""
        self.access.check(split)
        return make_loader(split, transform or self.eval_transform, batch_size or self.experiment.eval_batch_size,
                           num_workers=self.experiment.num_workers, generator=torch.Generator())

    def autocast(self):
        """bf16 autocast on CUDA when ``mixed_precision`` is set; a no-op otherwise."""
        if self.experiment.mixed_precision and self.device.type == "cuda":
            return torch.autocast("cuda", dtype=torch.bfloat16)
        return contextlib.nullcontext()
