"""ZSCL on a tiny random CLIP: the weight ensemble is the running mean, the loss is the formula written out by
hand, a missing reference folder is refused before anything is written, resume equals an uninterrupted run, and
(where the official code is at hand) the check beside Thunderbeee/ZSCL."""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import open_clip
import pytest
import torch
from PIL import Image
from torch.nn import functional as F

from conftest import clean_error, killed_then_resumed
from pilot.configure import build_config
from pilot.engine import run_experiment
from pilot.errors import PilotError
from pilot.learners import zscl
from pilot.learners.zscl import WeightEnsemble, ZSCLConfig, distillation, zscl_loss
from test_clip import TINY_CLIP, clip_raw

ROOT = Path(__file__).resolve().parents[1]
OFFICIAL = Path("/work/.mirror/Thunderbeee+ZSCL/repo")


@pytest.fixture(scope="module")
def clip_model(tmp_path_factory) -> str:
    path = tmp_path_factory.mktemp("clip") / "pilot-tiny-zscl-clip.json"
    path.write_text(json.dumps(TINY_CLIP))
    return str(path)


@pytest.fixture(scope="module")
def ref_folder(tmp_path_factory) -> str:
    """Two classes of three random 32-px images."""
    root = tmp_path_factory.mktemp("reference")
    rng = np.random.default_rng(0)
    for name in ("golden_retriever", "tabby_cat"):
        (root / name).mkdir()
        for i in range(3):
            Image.fromarray(rng.integers(0, 256, (32, 32, 3), dtype=np.uint8)).save(root / name / f"{i}.png")
    return str(root)


def zscl_raw(tmp_path, model, ref, **overrides) -> dict:
    return clip_raw(tmp_path, model, **{"model_name": "zscl", "ref_dataset": ref, "batch_size": 8, "init_lr": 1e-3,
                                        "warmup_iterations": 2, "avg_freq": 2, "synthetic_per_class": 4, "init_cls": 2, "increment": 2,
                                        **overrides})


def test_weight_ensemble_is_the_running_mean():
    start = [torch.nn.Parameter(torch.tensor([1.0, -2.0]))]
    ensemble = WeightEnsemble(start)
    values = [torch.tensor([3.0, 0.0]), torch.tensor([-1.0, 4.0]), torch.tensor([0.5, 0.5])]
    for value in values:
        ensemble.add([torch.nn.Parameter(value)])
    expected = (torch.tensor([1.0, -2.0]) + sum(values)) / 4  # the task's initial weights and every update
    torch.testing.assert_close(ensemble.mean[0], expected)
    ensemble.copy_to(start)
    torch.testing.assert_close(start[0].detach(), expected)


def test_training_ends_with_the_mean_of_the_initial_weights_and_every_avg_freq_th_step(clip_model, monkeypatch):
    clip = open_clip.create_model(_registered(clip_model))
    initial_weights = [p.detach().clone() for p in clip.parameters()]
    snapshots = []
    step = torch.optim.AdamW.step

    def recorded(self, *args, **kwargs):
        result = step(self, *args, **kwargs)
        snapshots.append([p.detach().clone() for p in clip.parameters()])
        return result

    monkeypatch.setattr(torch.optim.AdamW, "step", recorded)
    config = ZSCLConfig(init_lr=1e-2, warmup_iterations=1, avg_freq=2, ref_dataset="unused")
    images, ref_images = torch.randn(4, 3, 32, 32), torch.randn(3, 3, 32, 32)
    batches = iter([(images, torch.tensor([0, 1, 0, 1]))] * 6)
    ref_text = F.normalize(torch.randn(5, 16), dim=-1)
    tokens = open_clip.get_tokenizer(_registered(clip_model))(["a", "b"])
    losses = zscl.train_task(clip, open_clip.create_model(_registered(clip_model)).eval(), batches, iter([ref_images] * 6),
                             4, lambda: clip.encode_text(tokens)[:, None], ref_text, config, torch.device("cpu"))
    assert len(losses) == len(snapshots) == 5  # tuned_epoch · batches + 1, as the official loop
    averaged = [initial_weights] + [snapshots[i] for i in (0, 2, 4)]
    for index, p in enumerate(clip.parameters()):
        torch.testing.assert_close(p.detach(), sum(s[index] for s in averaged) / len(averaged))
    assert any(not torch.equal(p.detach(), last) for p, last in zip(clip.parameters(), snapshots[-1]))


def _registered(path: str) -> str:
    open_clip.add_model_config(path)
    return "pilot-tiny-zscl-clip"


def test_distillation_is_the_soft_target_cross_entropy_by_hand():
    teacher = torch.tensor([[2.0, 0.0, -1.0], [0.5, 1.5, 0.0]])
    student = torch.tensor([[1.0, 1.0, 0.0], [-1.0, 2.0, 0.5]])
    hand = -(torch.softmax(teacher / 2, 1) * torch.log_softmax(student / 2, 1)).sum(1).mean() * 4
    torch.testing.assert_close(distillation(teacher, student, 2.0), hand)
    hand_t = -(torch.softmax(teacher.T / 2, 1) * torch.log_softmax(student.T / 2, 1)).sum(1).mean() * 4
    torch.testing.assert_close(distillation(teacher.T, student.T, 2.0), hand_t)


def test_the_loss_is_the_formula_by_hand(clip_model):
    torch.manual_seed(1)
    clip, initial = open_clip.create_model(_registered(clip_model)), open_clip.create_model(_registered(clip_model))
    images, ref_images, targets = torch.randn(3, 3, 32, 32), torch.randn(4, 3, 32, 32), torch.tensor([1, 0, 1])
    class_text, ref_text = torch.randn(2, 1, 16), F.normalize(torch.randn(5, 16), dim=-1)
    config = ZSCLConfig(ref_dataset="unused")
    scale = clip.logit_scale.exp()

    def unit(x):
        return x / x.norm(dim=-1, keepdim=True)

    logits = scale * unit(clip.encode_image(images)) @ unit(class_text[:, 0]).T
    log_p = torch.log_softmax(logits, 1)
    ce = (0.8 * -log_p[torch.arange(3), targets] + 0.2 * -log_p.mean(1)).mean()  # label smoothing 0.2
    r = scale * unit(initial.encode_image(ref_images)) @ ref_text.T
    s = scale * unit(clip.encode_image(ref_images)) @ ref_text.T

    def kd(t, u):
        return -(torch.softmax(t / 2, 1) * torch.log_softmax(u / 2, 1)).sum(1).mean() * 4

    hand = ce + 5 * kd(r, s) + 5 * kd(r.T, s.T)
    torch.testing.assert_close(zscl_loss(clip, initial, images, targets, class_text, ref_images, ref_text, config), hand)


@clean_error
@pytest.mark.parametrize("ref, message", [
    ("", r"zscl distils on a reference image set, but ref_dataset is empty"),
    ("nowhere", r"zscl's reference folder '.*nowhere' \(ref_dataset\) does not exist"),
])
def test_a_missing_reference_folder_is_refused_before_anything_is_written(tmp_path, clip_model, ref, message):
    raw = zscl_raw(tmp_path, clip_model, str(tmp_path / ref) if ref else "")
    with pytest.raises(PilotError, match=message):
        run_experiment(build_config(raw))
    assert not (tmp_path / "logs").exists()


def test_resume_matches_an_uninterrupted_run(tmp_path, clip_model, ref_folder):
    """Killed after the first task: the second trains from the saved weights against the initial CLIP."""
    (uninterrupted,) = run_experiment(build_config(zscl_raw(tmp_path / "full", clip_model, ref_folder, max_tasks=2)))
    resumed = killed_then_resumed(build_config(zscl_raw(tmp_path / "killed", clip_model, ref_folder, max_tasks=2)), 1)
    assert resumed["counts"] == uninterrupted["counts"]
    assert resumed["accuracy_curve"] == uninterrupted["accuracy_curve"]
    assert uninterrupted["completed_tasks"] == 2 and uninterrupted["templates"] == ["a photo of a {}.", "a drawing of the {}."]


@pytest.mark.slow
@pytest.mark.skipif(not OFFICIAL.exists(), reason=f"the official ZSCL code is not at {OFFICIAL}")
def test_beside_the_official_code():
    result = subprocess.run([sys.executable, str(ROOT / "tools" / "clip_official_zscl.py"), "--zscl-repo",
                             str(OFFICIAL), "--tasks", "1"], capture_output=True, text=True, timeout=300)
    report = json.loads(result.stdout)
    assert result.returncode == 0 and report["agree"], result.stdout
    (task,) = report["tasks"]
    assert task["steps"] == task["official_steps"] == 33 and task["max_logit_difference"] <= 1e-5
