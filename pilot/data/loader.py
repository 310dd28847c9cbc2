"""Torch datasets and loaders over stream splits."""
from __future__ import annotations

from typing import Callable, Optional

import torch
from torch.utils.data import DataLoader, Dataset

from pilot.data.stream import Split


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
                drop_last: bool = False) -> DataLoader:
    return DataLoader(
        SplitDataset(split, transform), batch_size=batch_size, shuffle=shuffle,
        num_workers=num_workers, generator=generator, drop_last=drop_last,
        persistent_workers=False, pin_memory=False,
    )
