"""Image transforms: the backbone's pretrained data config (the default), or exactly a reference's.

``Preprocessing`` holds the choice for a run (the ``preprocess`` key):

* ``"backbone"`` follows timm's ``pretrained_cfg`` (input size, crop percentage, interpolation,
  mean/std); a learner may pass its method's crop scale;
* ``"pilot"`` is LAMDA-PILOT's ``utils/data.py`` for its 224-px datasets, which leaves inputs in
  [0, 1]: ``build_transform`` for every method but CODA-Prompt, ``build_transform_coda_prompt``
  for it (the learner's ``pilot_variant``);
* ``"official"`` is the method's own repository (the learner's ``official_variant``).

The reference transforms, each complete (a learner's crop scale does not change them), at input
size 224 as the references write them:

| family | train | test | normalise |
|---|---|---|---|
| ``default`` (PILOT; official L2P, DualPrompt) | RandomResizedCrop(224, scale 0.05-1) + flip | Resize(256, bicubic) + CenterCrop(224) | none |
| ``coda_prompt`` (PILOT's CODA branch; official CODA) | RandomResizedCrop(224) + flip | Resize(224) | none (its Normalize((0,0,0), (1,1,1))) |
| ``lae`` (official LAE) | RandomResizedCrop(224) + flip | Resize(256) + CenterCrop(224) | none |
| ``slca`` (official SLCA and CoFiMA, CIFAR-100) | RandomResizedCrop(224, bicubic) + flip + ColorJitter(brightness 63/255) | Resize(256, bicubic) + CenterCrop(224) | CIFAR-100 mean/std |

RandomResizedCrop keeps torchvision's defaults where a reference does (scale 0.08-1, ratio 3/4-4/3,
bilinear).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

from torchvision import transforms as T

from pilot.errors import PilotError

INTERPOLATIONS = {"bicubic": T.InterpolationMode.BICUBIC, "bilinear": T.InterpolationMode.BILINEAR,
                  "nearest": T.InterpolationMode.NEAREST}
PREPROCESS_PROFILES = ("backbone", "pilot", "official")
REFERENCE_FAMILIES = ("default", "coda_prompt", "lae", "slca")
PILOT_CROP_SCALE = (0.05, 1.0)  # PILOT's RandomResizedCrop scale for every method but CODA-Prompt


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


def train_transform(cfg: DataConfig, resize: bool, crop_scale: tuple[float, float] = PILOT_CROP_SCALE) -> T.Compose:
    """PILOT's augmentation: random-resized crop (scale 0.05-1) and flip; padded crop for 32 px; normalise."""
    if resize:
        steps = [T.RandomResizedCrop(cfg.size, scale=crop_scale, ratio=(3 / 4, 4 / 3))]
    else:
        steps = [T.RandomCrop(cfg.size, padding=4)]
    return T.Compose(steps + [T.RandomHorizontalFlip(), T.ToTensor(), T.Normalize(cfg.mean, cfg.std)])


BICUBIC = T.InterpolationMode.BICUBIC
CIFAR100_MEAN, CIFAR100_STD = (0.5071, 0.4867, 0.4408), (0.2675, 0.2565, 0.2761)  # official SLCA's iCIFAR100


def reference_transforms(family: str, size: int) -> tuple[T.Compose, T.Compose]:
    """(train, test) transforms of a reference ``family`` (table above) at input ``size``."""
    resize = int(256 / 224 * size)
    flip = T.RandomHorizontalFlip()
    if family == "default":
        train = [T.RandomResizedCrop(size, scale=PILOT_CROP_SCALE, ratio=(3 / 4, 4 / 3)), flip, T.ToTensor()]
        test = [T.Resize(resize, interpolation=BICUBIC), T.CenterCrop(size), T.ToTensor()]
    elif family == "coda_prompt":
        train, test = [T.RandomResizedCrop(size), flip, T.ToTensor()], [T.Resize(size), T.ToTensor()]
    elif family == "lae":
        train = [T.RandomResizedCrop(size), flip, T.ToTensor()]
        test = [T.Resize(resize), T.CenterCrop(size), T.ToTensor()]
    elif family == "slca":
        normalise = T.Normalize(CIFAR100_MEAN, CIFAR100_STD)
        train = [T.RandomResizedCrop(size, interpolation=BICUBIC), flip, T.ColorJitter(brightness=63 / 255),
                 T.ToTensor(), normalise]
        test = [T.Resize(resize, interpolation=BICUBIC), T.CenterCrop(size), T.ToTensor(), normalise]
    else:
        raise ValueError(f"unknown reference transform family '{family}'; known: {REFERENCE_FAMILIES}")
    return T.Compose(train), T.Compose(test)


@dataclass(frozen=True)
class Preprocessing:
    """A run's transforms: ``profile`` is the ``preprocess`` key; the variants are the learner's reference
    families for PILOT and for its official code (None: no official transforms are recorded)."""

    profile: str
    data: DataConfig
    resize: bool  # the dataset's images are resized to the model's input (cifar224, image folders)
    pilot_variant: str = "default"
    official_variant: Optional[str] = None
    learner: str = ""  # names the learner and dataset in errors
    dataset: str = ""

    def __post_init__(self):
        if self.profile not in PREPROCESS_PROFILES:
            raise PilotError(f"preprocess must be one of {', '.join(PREPROCESS_PROFILES)}, got '{self.profile}'.")
        if self.profile == "official" and self.official_variant is None:
            raise PilotError(f"preprocess 'official': no official transforms are recorded for {self.learner or 'this learner'}; "
                             f"use 'pilot' (PILOT's) or 'backbone'.")
        if self.family == "slca" and self.dataset not in ("", "cifar224"):
            raise PilotError(f"preprocess 'official' for {self.learner} is SLCA's CIFAR-100 transform (CIFAR-100 "
                             f"mean/std); for '{self.dataset}' use 'pilot' or 'backbone'.")
        if self.profile != "backbone" and not self.resize:
            raise PilotError(f"preprocess '{self.profile}' is a reference's transform for 224-px datasets (cifar224, "
                             f"imagenetr, ...); a dataset kept at its native size (cifar100) has none here: use 'backbone'.")

    @property
    def family(self) -> Optional[str]:
        """The reference family in use; None for the backbone's own transforms."""
        return {"pilot": self.pilot_variant, "official": self.official_variant}.get(self.profile)

    def eval(self) -> T.Compose:
        if self.family is None:
            return eval_transform(self.data, self.resize)
        return reference_transforms(self.family, self.data.size)[1]

    def train(self, crop_scale: tuple[float, float] = PILOT_CROP_SCALE) -> T.Compose:
        if self.family is None:
            return train_transform(self.data, self.resize, crop_scale)
        return reference_transforms(self.family, self.data.size)[0]
