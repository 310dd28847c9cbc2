"""PROOF: its logits and loss against the formulas on hand-set tensors, old tasks' parts frozen, resume, and
(where the official code is at hand) the check beside zhoudw-zdw/PROOF."""
from __future__ import annotations

import json
import math
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from torch.nn import functional as F

from conftest import killed_then_resumed
from pilot.assembly import assemble
from pilot.configure import build_config
from pilot.engine import run_experiment
from pilot.learners.proof import ProofNet
from test_clip import TINY_CLIP, clip_raw

ROOT = Path(__file__).resolve().parents[1]
OFFICIAL = Path("/work/.mirror/zhoudw-zdw+PROOF/repo")


@pytest.fixture(scope="module")
def clip_model(tmp_path_factory) -> str:
    path = tmp_path_factory.mktemp("clip") / "pilot-tiny-text-clip.json"
    path.write_text(json.dumps(TINY_CLIP))
    return str(path)


def proof_raw(tmp_path, model, **overrides) -> dict:
    return clip_raw(tmp_path, model, **{"model_name": "proof", "memory_size": 20, "tuned_epoch": 1, "batch_size": 8,
                                        **overrides})


def hand_net(dim: int = 8, tasks: int = 2, classes: int = 3) -> ProofNet:
    torch.manual_seed(0)
    net = ProofNet(dim, math.log(1 / 0.07), prompt_length=2)
    for _ in range(tasks):
        net.add_task(classes)
    net.prototypes = torch.randn(classes, dim)
    return net.eval()


def hand_fusion(net: ProofNet, sequence: torch.Tensor) -> torch.Tensor:
    """softmax(QKᵀ/√d)·V through the output layer, plus the input, LayerNorm'd (no dropout: eval)."""
    attention = net.fusion
    q, k, v = (sequence @ layer.weight.T for layer in (attention.query, attention.key, attention.value))
    mixed = torch.softmax(q @ k.transpose(1, 2) / math.sqrt(sequence.shape[-1]), dim=-1) @ v
    out = mixed @ attention.out.weight.T + attention.out.bias + sequence
    return F.layer_norm(out, (sequence.shape[-1],), attention.norm.weight, attention.norm.bias)


def projected(layers, x: torch.Tensor) -> torch.Tensor:
    return sum(x @ layer.weight.T + layer.bias for layer in layers)


def test_fused_logits_are_the_sum_of_the_three_terms_by_hand():
    net = hand_net()
    features, text = torch.randn(5, 8), torch.randn(3, 2, 8)  # 5 images; 3 classes under 2 templates
    with torch.no_grad():
        terms = net.logit_terms(features, text)
        weights = F.normalize(F.normalize(projected(net.text_projections, text), dim=-1).mean(1), dim=-1)
        image = projected(net.image_projections, features)
        prototypes = F.normalize(projected(net.image_projections, net.prototypes), dim=-1)
        prompts = torch.cat(list(net.context_prompts))
        sequence = torch.stack([torch.cat([image[i:i + 1], weights, prototypes, prompts]) for i in range(5)])
        fused = hand_fusion(net, sequence)
        fused_image, fused_text, fused_prototypes = fused[:, 0], fused[:, 1:4].mean(0), fused[:, 4:7].mean(0)
    expected = (image @ weights.T, fused_image @ fused_text.T, fused_image @ fused_prototypes.T)
    for term, by_hand in zip(terms, expected):
        torch.testing.assert_close(term, by_hand, rtol=1e-5, atol=1e-5)


def test_training_loss_by_hand():
    net = hand_net()
    features, text, labels = torch.randn(4, 8), torch.randn(3, 8), torch.tensor([0, 2, 1, 2])
    with torch.no_grad():
        loss = net.training_loss(features, labels, text)
        image = F.normalize(projected(net.image_projections, features), dim=-1)
        weights = F.normalize(projected(net.text_projections, text), dim=-1)
        prototypes = F.normalize(projected(net.image_projections, net.prototypes), dim=-1)
        prompts = torch.cat(list(net.context_prompts))
        fused = hand_fusion(net, torch.stack([torch.cat([image[i:i + 1], weights, prototypes, prompts]) for i in range(4)]))
        fused_image, fused_text, fused_prototypes = fused[:, 0], fused[:, 1:4].mean(0), fused[:, 4:7].mean(0)
        pairs = net.logit_scale.exp() * image @ weights[labels].T
        contrastive = (F.cross_entropy(pairs, torch.arange(4)) + F.cross_entropy(pairs.T, torch.arange(4))) / 2
        expected = (F.cross_entropy(fused_image @ fused_text.T, labels) + contrastive
                    + F.cross_entropy(fused_image @ fused_prototypes.T, labels))
    torch.testing.assert_close(loss, expected)


def test_old_tasks_projections_and_prompts_stay_frozen(tmp_path, clip_model):
    run = assemble(build_config(proof_raw(tmp_path, clip_model, max_tasks=2)))
    net = run.learner.net
    snapshots = []
    for task in run.stream.tasks:
        run.ctx.open_fit(task)
        run.learner.fit(task)
        snapshots.append({name: value.clone() for name, value in net.state_dict().items()})
    before, after = snapshots
    for name in ("image_projections.0.weight", "image_projections.0.bias", "context_prompts.0"):
        torch.testing.assert_close(after[name], before[name], rtol=0, atol=0)
    for name in ("fusion.query.weight", "logit_scale", "image_projections.1.weight"):
        assert not torch.equal(after[name], before.get(name, torch.zeros(0))), name
    # the official code trains every text projection; freeze_old_text_projections keeps the old ones
    assert not torch.equal(after["text_projections.0.weight"], before["text_projections.0.weight"])
    old_text = {id(p) for p in net.text_projections[0].parameters()}
    assert old_text <= {id(p) for p in net.trainable(freeze_old_text=False)}
    assert not old_text & {id(p) for p in net.trainable(freeze_old_text=True)}
    assert len(net.image_projections) == len(net.text_projections) == len(net.context_prompts) == 2


def test_resume_equals_an_uninterrupted_run(tmp_path, clip_model):
    """Killed after the first task: the second adds layers and prompts, trains with dropout and replays exemplars."""
    (uninterrupted,) = run_experiment(build_config(proof_raw(tmp_path / "full", clip_model, max_tasks=2)))
    resumed = killed_then_resumed(build_config(proof_raw(tmp_path / "killed", clip_model, max_tasks=2)), 1)
    assert resumed["counts"] == uninterrupted["counts"]
    assert resumed["accuracy_curve"] == uninterrupted["accuracy_curve"]
    assert uninterrupted["templates"] == ["a photo of a {}.", "a drawing of the {}."]
    assert uninterrupted["batch_dependent_evaluation"] and uninterrupted["memory"][-1]["total"] == 18  # 20 // 6 each


@pytest.mark.slow
@pytest.mark.skipif(not OFFICIAL.exists(), reason=f"the official PROOF code is not at {OFFICIAL}")
def test_beside_the_official_code():
    result = subprocess.run([sys.executable, str(ROOT / "tools" / "clip_official_check.py"), "--proof-repo",
                             str(OFFICIAL), "--tasks", "2"], capture_output=True, text=True, timeout=300)
    report = json.loads(result.stdout)
    assert result.returncode == 0 and report["agree"], result.stdout
    assert all(task["max_logit_difference"] <= 1e-5 and task["max_parameter_difference"] <= 1e-5
               for task in report["tasks"])
