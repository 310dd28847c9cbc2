"""Torch datasets and loaders over stream splits."""
from __future__ import annotations

from typing import Callable, Optional

import torch
from torch.utils.data import BatchSampler, DataLoader, Dataset, RandomSampler, SequentialSampler

from pilot.data.stream import Split
from pilot.distributed import ShardedBatches


class SplitDataset(Dataset):
    """Yields ``(image tensor, label, position in the split)`` for each image of a split."""

    def __init__(self, split: Split, transform: Callable):
        self.split = split
        self.transform = transform

    def __len__(self) -> int:
        return len(self.split)

    def __getitem__(self, position: int):
        image = self.split.source.load(int(self.split.indices[position]))
        return self.transform(image), int(self.split.labels[position]), position


def make_loader(split: Split, transform: Callable, batch_size: int, shuffle: bool = False,
                num_workers: int = 0, generator: Optional[torch.Generator] = None,
                drop_last: bool = False, shard: tuple[int, int] = (0, 1)) -> DataLoader:
    """``shard`` (rank, size): this rank's slice of each batch; the batches, and what they draw from
    ``generator``, are those of the single-process loader."""
    dataset = SplitDataset(split, transform)
    if shard[1] == 1:
        return DataLoader(dataset, batch_size=batch_size, shuffle=shuffle, num_workers=num_workers,
                          generator=generator, drop_last=drop_last, persistent_workers=False, pin_memory=False)
    sampler = RandomSampler(dataset, generator=generator) if shuffle else SequentialSampler(dataset)
    batches = ShardedBatches(BatchSampler(sampler, batch_size, drop_last), *shard)
    return DataLoader(dataset, batch_sampler=batches, num_workers=num_workers, generator=generator,
                      persistent_workers=False, pin_memory=False)
