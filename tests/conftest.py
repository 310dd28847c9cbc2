"""Shared fixtures: a tiny random ViT on synthetic data, and the real assets when present."""
from __future__ import annotations

import atexit
import functools
import shutil
import tarfile
import tempfile
from pathlib import Path

import pytest

from pilot.configure import build_config
from pilot.engine import Run, run_experiment

ASSETS = Path(__file__).resolve().parents[1].parent / "shared" / "assets"
DEIT_WEIGHTS = ASSETS / "deit_tiny_patch16_224.safetensors"
CIFAR_ARCHIVE = ASSETS / "cifar-100-python.tar.gz"

requires_assets = pytest.mark.skipif(
    not (DEIT_WEIGHTS.is_file() and CIFAR_ARCHIVE.is_file()),
    reason=f"real assets not found at {ASSETS} (DeiT-Tiny weights and CIFAR-100 archive; see docs/tests.md)",
)

# A hostile input's expected outcome, counted by tools/hostile.py: refused with a clear error, or a correct result.
clean_error = pytest.mark.hostile("clean error")
correct_result = pytest.mark.hostile("correct result")

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


@functools.lru_cache(maxsize=1)
def extracted_cifar() -> Path:
    """The assets' CIFAR-100 archive extracted once per session (CIFAR's own folder layout, which pilot reads as
    it reads the archive): each real-asset run then skips decompressing 168 MB (1.3 s against 2.9 s a load)."""
    folder = Path(tempfile.mkdtemp(prefix="pilot-cifar-"))
    atexit.register(shutil.rmtree, folder, ignore_errors=True)
    with tarfile.open(CIFAR_ARCHIVE, "r:gz") as archive:
        archive.extractall(folder, **({"filter": "data"} if hasattr(tarfile, "data_filter") else {}))
    return folder


def real_raw(tmp_path: Path, **overrides) -> dict:
    """A flat config for DeiT-Tiny on CIFAR-100 from the shared assets (B0 Inc10, seed 1993)."""
    return tiny_raw(tmp_path, **{
        "dataset": "cifar224", "data_path": str(extracted_cifar()), "download": False,
        "backbone_type": "deit_tiny_patch16_224", "pretrained": True, "backbone_args": {},
        "weights_dir": str(ASSETS), "init_cls": 10, "increment": 10, "seed": [1993], **overrides})


class Killed(BaseException):
    """What a signal would do mid-run, as KeyboardInterrupt does: not an error of the run."""


def die_at_task(index):
    """Patch for Run._step: raise (as a kill would) before task ``index`` starts."""
    step = Run._step

    def wrapped(self, task, log, scalars):
        if task.index == index:
            raise Killed
        step(self, task, log, scalars)

    return wrapped


def killed_then_resumed(config, kill_before_task: int = 2) -> dict:
    """Run ``config`` until a simulated kill before ``kill_before_task``, then resume it to the end."""
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(Run, "_step", die_at_task(kill_before_task))
        with pytest.raises(Killed):
            run_experiment(config)
    (resumed,) = run_experiment(config, resume=True)
    return resumed


def assert_resume_matches_uninterrupted(make_config) -> tuple[dict, dict]:
    """``make_config(folder)`` run straight through, and killed then resumed, in separate folders:
    the same per-task counts and curve. Returns (uninterrupted, resumed) results."""
    (uninterrupted,) = run_experiment(make_config("full"))
    resumed = killed_then_resumed(make_config("killed"))
    assert resumed["counts"] == uninterrupted["counts"]
    assert resumed["accuracy_curve"] == uninterrupted["accuracy_curve"]
    return uninterrupted, resumed


def run_recording_each_task(run: Run):
    """Execute ``run``; return the backbone's state before it, the learner's network state after each task,
    and the result."""
    before = {k: v.clone() for k, v in run.ctx.backbone.state_dict().items()}
    after_task, fit = [], run.learner.fit

    def fit_and_record(task):
        fit(task)
        after_task.append({k: v.clone() for k, v in run.learner.net.state_dict().items()})

    run.learner.fit = fit_and_record
    return before, after_task, run.execute()
