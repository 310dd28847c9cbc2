"""A run assembled from its config, in one order: seed → device → dataset → stream → backbone →
context → learner. ``Run``, ``pilot evaluate`` and ``pilot select`` build from these steps, so each
fact of a run (which stream, which preprocessing) is decided in one place. Nothing here writes.
"""
from __future__ import annotations

import random
import warnings
from dataclasses import dataclass
from typing import Optional

import numpy as np
import torch

from pilot.backbones import Backbone, BackboneSet, create_backbone
from pilot.checkpoints import RandomState, StatePart, Stateful
from pilot.config import ExperimentConfig, RunConfig
from pilot.context import Protocol, RunContext
from pilot.data import SourceDataset, TaskStream, load_dataset
from pilot.data.checks import check_train_counts
from pilot.data.transforms import Preprocessing
from pilot.distributed import initialise, local_device
from pilot.errors import PilotError
from pilot.learners import learner_class
from pilot.learners._base import Learner
from pilot.memory import RehearsalMemory
from pilot.outputs import require_folder

TRAIN_AND_TEST = ("train", "test")


def resolve_device(requested: list[str]) -> torch.device:
    """"auto" (the default): CUDA where there is one, else the CPU, silently. PILOT writes GPU ids ("0"); "cpu"
    or "-1" mean the CPU. A GPU asked for by name without CUDA: the CPU, with a warning."""
    name = str(requested[0]) if requested else "auto"
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name in ("cpu", "-1"):
        return torch.device("cpu")
    if name.isdigit():
        name = f"cuda:{name}"
    if name.startswith("cuda") and not torch.cuda.is_available():
        warnings.warn(f"device '{requested[0]}' asks for CUDA, which is not available: running on the CPU.", stacklevel=2)
        return torch.device("cpu")
    try:
        return torch.device(name)
    except RuntimeError:
        raise PilotError(f"Unknown device '{requested[0]}': use \"auto\", \"cpu\", a GPU id like \"0\", or \"cuda:0\".") from None


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def load_stream(exp: ExperimentConfig, seed: int, parts: tuple[str, ...] = TRAIN_AND_TEST
                ) -> tuple[SourceDataset, TaskStream]:
    """The dataset's ``parts`` (loaded and checked) and the task stream the config describes."""
    dataset = load_dataset(exp, parts)
    stream = TaskStream(dataset, exp.init_cls, exp.increment, exp.shuffle, seed, exp.train_per_class,
                        exp.test_per_class, exp.max_tasks, checked=parts, scenario=exp.scenario,
                        domain_order=tuple(exp.domain_order), val_fraction=exp.val_fraction,
                        val_per_class=exp.val_per_class)
    return dataset, stream


def make_memory(exp: ExperimentConfig, learner_cls: type, stream: TaskStream) -> Optional[RehearsalMemory]:
    """The rehearsal memory of a learner that replays exemplars, its budget checked against the stream."""
    if not learner_cls.uses_memory:
        return None
    memory = RehearsalMemory.from_config(exp, stream.sizes)
    if not memory.enabled:
        raise PilotError(f"{exp.model_name} replays exemplars, but memory_size and memory_per_class are 0: set "
                         f"memory_size (a total shared by the classes seen; PILOT's CIFAR configs use 2000) or "
                         f"memory_per_class with fixed_memory true.")
    return memory


def build_backbone(exp: ExperimentConfig, seed: int, spec: Optional[str] = None) -> Backbone | BackboneSet:
    """The config's backbone, or the candidate ``spec`` (which ``pretrained_path`` does not describe)."""
    if spec is None:
        return create_backbone(exp.backbone_type, exp.pretrained, exp.pretrained_path, exp.weights_dir, seed,
                               **exp.backbone_args)
    return create_backbone(spec, exp.pretrained, None, exp.weights_dir, seed, **exp.backbone_args)


def make_context(exp: ExperimentConfig, backbone, dataset: SourceDataset, stream: TaskStream, device: torch.device,
                 generator: torch.Generator) -> RunContext:
    """What the learner of ``exp`` gets: the backbone on ``device``, with the preprocessing its config asks for."""
    learner_cls = learner_class(exp.model_name)
    preprocessing = Preprocessing(exp.preprocess, backbone.data_config, dataset.resize_to_model, learner_cls.pilot_variant,
                                  learner_cls.official_variant, exp.model_name, exp.dataset)
    return RunContext(exp, backbone.to(device), dataset, Protocol.of(stream), device, generator, preprocessing,
                      class_names=stream.class_names, memory=make_memory(exp, learner_cls, stream))


@dataclass
class Assembly:
    """One seed's run, built and checked: what the loop drives and a checkpoint restores."""

    config: RunConfig
    seed: int
    device: torch.device
    dataset: SourceDataset
    stream: TaskStream
    backbone: Backbone | BackboneSet
    generator: torch.Generator
    ctx: RunContext
    learner: Learner

    def backbone_facts(self) -> list[dict]:
        """Each backbone as results.json describes it: its config spec, identity and feature size."""
        exp = self.config.experiment
        specs = exp.backbone_type if isinstance(exp.backbone_type, list) else [exp.backbone_type]
        members = list(self.backbone.members) if isinstance(self.backbone, BackboneSet) else [self.backbone]
        return [{"type": spec, "identity": member.identity, "feature_dim": member.feature_dim}
                for spec, member in zip(specs, members)]

    def state_parts(self) -> dict[str, Stateful]:
        """The parts whose state a checkpoint keeps (the run adds what it measured)."""
        parts = {"learner": self.learner, "rng": RandomState(self.generator)}
        memory = self.ctx.memory
        if memory is not None:  # its indices point into the stream's training images
            parts["memory"] = StatePart(memory.state_dict, lambda state: memory.load_state_dict(state, self.dataset.train))
        return parts


def assemble(config: RunConfig, parts: tuple[str, ...] = TRAIN_AND_TEST) -> Assembly:
    """Build the run of ``config``'s first seed; ``parts`` are the dataset's parts to load and check
    (``pilot evaluate`` needs only "test")."""
    exp = config.experiment
    seed = exp.seed[0]
    seed_everything(seed)
    device = local_device(resolve_device(exp.device))
    initialise(device)  # under torchrun: join the process group (gloo on CPUs, NCCL on GPUs)
    require_folder(exp.feature_cache_dir, "feature_cache_dir")
    dataset, stream = load_stream(exp, seed, parts)
    if "train" in parts:
        check_train_counts(stream, learner_class(exp.model_name).min_train_per_class, exp.model_name)
    backbone = build_backbone(exp, seed)
    generator = torch.Generator().manual_seed(seed)
    ctx = make_context(exp, backbone, dataset, stream, device, generator)
    learner = learner_class(exp.model_name)(config.learner, ctx)
    return Assembly(config, seed, device, dataset, stream, backbone, generator, ctx, learner)
