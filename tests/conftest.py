"""Shared fixtures: a tiny random ViT on synthetic data, and the real assets when present."""
from __future__ import annotations

from pathlib import Path

import pytest

from pilot.config import build_config

ASSETS = Path(__file__).resolve().parents[1].parent / "shared" / "assets"
DEIT_WEIGHTS = ASSETS / "deit_tiny_patch16_224.safetensors"
CIFAR_ARCHIVE = ASSETS / "cifar-100-python.tar.gz"

requires_assets = pytest.mark.skipif(
    not (DEIT_WEIGHTS.is_file() and CIFAR_ARCHIVE.is_file()),
    reason=f"real assets not found at {ASSETS} (DeiT-Tiny weights and CIFAR-100 archive; see README 'Tests')",
)

TINY_VIT = {"img_size": 32, "patch_size": 8, "depth": 2}


def tiny_raw(tmp_path: Path, **overrides) -> dict:
    """A flat config for a 2-block random ViT on 10 synthetic classes (4 + 2 + 2 + 2)."""
    raw = {
        "model_name": "simplecil", "dataset": "synthetic", "init_cls": 4, "increment": 2, "seed": [1],
        "backbone_type": "vit_tiny_patch16_224", "pretrained": False, "backbone_args": TINY_VIT,
        "log_dir": str(tmp_path / "logs"), "progress": False, "device": ["cpu"],
    }
    raw.update(overrides)
    return raw


@pytest.fixture
def tiny_config(tmp_path):
    def make(**overrides):
        return build_config(tiny_raw(tmp_path, **overrides))

    return make
