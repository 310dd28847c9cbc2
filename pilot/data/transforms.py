"""Image transforms from the backbone's pretrained data config (size, crop, mean/std)."""
from __future__ import annotations

from dataclasses import dataclass

from torchvision import transforms as T

INTERPOLATIONS = {"bicubic": T.InterpolationMode.BICUBIC, "bilinear": T.InterpolationMode.BILINEAR,
                  "nearest": T.InterpolationMode.NEAREST}


@dataclass(frozen=True)
class DataConfig:
    """What a pretrained backbone expects of its input (timm's ``pretrained_cfg`` fields)."""

    size: int
    mean: tuple[float, float, float]
    std: tuple[float, float, float]
    interpolation: str = "bicubic"
    crop_pct: float = 0.875


def eval_transform(cfg: DataConfig, resize: bool) -> T.Compose:
    """Resize to size / crop_pct, centre-crop (timm's eval transform), normalise."""
    steps = []
    if resize:
        steps += [T.Resize(int(cfg.size / cfg.crop_pct), interpolation=INTERPOLATIONS[cfg.interpolation]),
                  T.CenterCrop(cfg.size)]
    return T.Compose(steps + [T.ToTensor(), T.Normalize(cfg.mean, cfg.std)])


def train_transform(cfg: DataConfig, resize: bool, crop_scale: tuple[float, float] = (0.05, 1.0)) -> T.Compose:
    """PILOT's augmentation: random-resized crop (scale 0.05-1) and flip; padded crop for 32 px."""
    if resize:
        steps = [T.RandomResizedCrop(cfg.size, scale=crop_scale, ratio=(3 / 4, 4 / 3))]
    else:
        steps = [T.RandomCrop(cfg.size, padding=4)]
    return T.Compose(steps + [T.RandomHorizontalFlip(), T.ToTensor(), T.Normalize(cfg.mean, cfg.std)])
