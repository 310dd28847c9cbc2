"""What a learner may use during a run: the backbone, the protocol's facts, loaders, frozen
features, the device and the run's randomness. Learners see the task they are fitting and the
protocol (task sizes, class count, planned tasks), never the data of other tasks."""
from __future__ import annotations

import contextlib
import dataclasses
import logging
from dataclasses import dataclass
from typing import Callable, Optional

import torch
from tqdm import tqdm

from pilot.backbones import Backbone, BackboneSet
from pilot.config import ExperimentConfig
from pilot.data import SourceDataset, Split, TaskStream
from pilot.data.loader import make_loader
from pilot.data.transforms import PILOT_CROP_SCALE, Preprocessing
from pilot.distributed import gather_rows, rank_and_size
from pilot.features import ConcatenatedFeatures, FeatureStore


@dataclass(frozen=True)
class Protocol:
    """Facts of the stream that a method may know before it starts (e.g. to size its heads)."""

    task_sizes: tuple[int, ...]  # classes per task, for the tasks this run learns
    planned_tasks: int  # tasks of the full protocol (``max_tasks`` may stop earlier)

    @classmethod
    def of(cls, stream: TaskStream) -> "Protocol":
        return cls(tuple(stream.sizes), stream.planned_tasks)

    @property
    def num_tasks(self) -> int:
        return len(self.task_sizes)

    @property
    def num_classes(self) -> int:
        return sum(self.task_sizes)

    @property
    def task_classes(self) -> list[range]:
        """Each task's labels (stream order)."""
        bounds = [0]
        for size in self.task_sizes:
            bounds.append(bounds[-1] + size)
        return [range(low, high) for low, high in zip(bounds[:-1], bounds[1:])]

    def tasks_within(self, num_seen: int) -> list[range]:
        """The classes of each task learnt once ``num_seen`` classes have been seen."""
        return [classes for classes in self.task_classes if classes.stop <= num_seen]


class RunContext:
    """Handed to every learner. ``features`` is the frozen backbone's feature store (for a
    :class:`BackboneSet`, each member's store, with its own preprocessing, joined side by side)."""

    def __init__(self, experiment: ExperimentConfig, backbone: Backbone, dataset: SourceDataset,
                 protocol: Protocol, device: torch.device, generator: torch.Generator, preprocessing: Preprocessing):
        self.experiment = experiment
        self.backbone = backbone
        self.protocol = protocol
        self.device = device
        self.generator = generator
        self.log: logging.Logger = logging.getLogger("pilot")  # the run's log once the run starts
        self.preprocessing = preprocessing
        self._dataset_key = f"{dataset.name}|{dataset.fingerprint}"  # the feature stores' cache key
        self._stores: list[FeatureStore] = []
        if isinstance(backbone, BackboneSet):
            self.features = ConcatenatedFeatures([
                self.feature_store(member, member.identity, dataclasses.replace(preprocessing, data=member.data_config).eval())
                for member in backbone.members])
        else:
            self.features = self.feature_store(backbone, backbone.identity)

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

    def _encode(self, encoder, split: Split, extra, desc: str, batch_size: Optional[int], transform) -> torch.Tensor:
        chunks = []
        batches = tqdm(self.eval_loader(split, transform, batch_size), desc=desc, leave=False, disable=not (desc and self.experiment.progress))
        for images, _, positions in batches:
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
                             f"{identity}|{transform}|{self._dataset_key}", exp.feature_cache_dir or None)
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
        rank, size = rank_and_size() if shard else (0, 1)
        return make_loader(split, transform or self.train_transform(), batch_size, shuffle=True,
                           num_workers=self.experiment.num_workers, generator=self.generator, drop_last=drop_last,
                           shard=(rank, size))

    def eval_loader(self, split: Split, transform=None, batch_size: Optional[int] = None):
        """In split order, eval transform; draws from no generator, so evaluating never changes
        what training draws next (a resumed run re-evaluates nothing, yet must match)."""
        return make_loader(split, transform or self.eval_transform, batch_size or self.experiment.eval_batch_size,
                           num_workers=self.experiment.num_workers, generator=torch.Generator())

    def autocast(self):
        """bf16 autocast on CUDA when ``mixed_precision`` is set; a no-op otherwise."""
        if self.experiment.mixed_precision and self.device.type == "cuda":
            return torch.autocast("cuda", dtype=torch.bfloat16)
        return contextlib.nullcontext()
