"""Data-parallel runs under ``torchrun``: every rank runs the same learner on the same stream.

Each epoch's global batches come from the run's seeded generator, the same on every rank; a rank
trains on its slice of each batch and the trainable parameters' gradients are averaged over ranks
(weighted by slice sizes, so the step equals a single process's on the whole batch). Only the
trainable parameters are synchronised: the frozen backbone is never wrapped and each process holds
one copy. Encoding (evaluation and frozen features) is sharded and gathered, so every rank ends with
the same features and the same learner state. Rank 0 alone writes results, logs and checkpoints.
NCCL on GPUs, gloo on CPUs. Outside torchrun every function here is the single-process identity.
"""
from __future__ import annotations

import os
from collections.abc import Iterable, Iterator

import torch
import torch.distributed as dist
from torch import nn


def launched() -> bool:
    """Whether torchrun started this process as one of several."""
    return int(os.environ.get("WORLD_SIZE", "1")) > 1


def initialise(device: torch.device) -> None:
    if launched() and not dist.is_initialized():
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo")


def rank_and_size() -> tuple[int, int]:
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def is_main() -> bool:
    return rank_and_size()[0] == 0


def local_device(device: torch.device) -> torch.device:
    """Each process its own GPU (``LOCAL_RANK``); the CPU is shared."""
    if device.type == "cuda" and launched():
        return torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))
    return device


class ShardedBatches:
    """This rank's slice ``batch[rank::size]`` of each global batch of ``batches`` (a batch sampler)."""

    def __init__(self, batches: Iterable[list[int]], rank: int, size: int) -> None:
        self.batches, self.rank, self.size = batches, rank, size

    def __iter__(self) -> Iterator[list[int]]:
        for batch in self.batches:
            yield batch[self.rank::self.size]

    def __len__(self) -> int:
        return len(self.batches)


def average_gradients(parameters: Iterable[nn.Parameter], local_count: int) -> None:
    """Replace each gradient (of this rank's mean loss) by the mean over every rank's samples."""
    if rank_and_size()[1] == 1:
        return
    parameters = [p for p in parameters if p.grad is not None]
    total = torch.tensor(float(local_count))
    dist.all_reduce(total)
    for parameter in parameters:
        parameter.grad.mul_(local_count / total.item())
        dist.all_reduce(parameter.grad)


def any_rank(mask: torch.Tensor) -> torch.Tensor:
    """Elementwise OR of a boolean mask over ranks (so every rank takes the same branch)."""
    if rank_and_size()[1] == 1:
        return mask
    values = mask.to(torch.uint8)
    dist.all_reduce(values, op=dist.ReduceOp.MAX)
    return values.bool()


def gather_rows(local: torch.Tensor, total: int) -> torch.Tensor:
    """Rows ``rank::size`` from every rank, back in order: ``total`` rows on every rank."""
    rank, size = rank_and_size()
    if size == 1:
        return local
    pieces = [None] * size
    dist.all_gather_object(pieces, local.cpu())
    rows = torch.empty(total, *local.shape[1:], dtype=local.dtype)
    for owner, piece in enumerate(pieces):
        rows[owner::size] = piece
    return rows
