"""MoE-Adapters: noisy top-k gating and a hooked open_clip block against the formulas on hand-set tensors,
the frozen CLIP, bad settings, and resume, on a tiny random CLIP."""
from __future__ import annotations

import json

import pytest
import torch
from open_clip.transformer import ResidualAttentionBlock
from torch.nn import functional as F

from conftest import clean_error, killed_then_resumed
from pilot.assembly import assemble
from pilot.configure import build_config
from pilot.engine import run_experiment
from pilot.errors import PilotError
from pilot.modules.moe import MoEAdapterSet, noisy_top_k_gates
from test_clip import TINY_CLIP, clip_raw


@pytest.fixture(scope="module")
def clip_model(tmp_path_factory) -> str:
    path = tmp_path_factory.mktemp("clip") / "pilot-tiny-text-clip.json"
    path.write_text(json.dumps(TINY_CLIP))
    return str(path)


def moe_raw(tmp_path, model, **overrides) -> dict:
    return clip_raw(tmp_path, model, **{"model_name": "moe_adapters", "templates": ["a bad photo of a {}."],
                                        "batch_size": 16, "warmup_iterations": 2, "max_tasks": 2, **overrides})


def test_noisy_top_k_gates_by_hand():
    tokens = torch.tensor([[1.0, 0.0], [0.0, 2.0]])
    router = torch.tensor([[1.0, 2.0, 0.0], [0.5, -1.0, 1.0]])
    noise_weight = torch.tensor([[0.0, 1.0, -1.0], [2.0, 0.0, 0.0]])
    noise = torch.tensor([[0.5, -1.0, 2.0], [1.0, 0.0, -0.5]])
    # logits x·W_g: [[1, 2, 0], [1, -2, 2]]; noise std softplus(x·W_n) + 0.01: [[sp 0, sp 1, sp -1], [sp 4, sp 0, sp 0]]
    sp = lambda v: torch.log1p(torch.exp(torch.tensor(v))).item() + 0.01  # noqa: E731
    noisy = torch.tensor([[1 + 0.5 * sp(0), 2 - 1 * sp(1), 0 + 2 * sp(-1)], [1 + 1 * sp(4), -2 + 0, 2 - 0.5 * sp(0)]])
    # = [[1.35, 0.68, 0.65], [5.03, -2, 1.65]]: the top 2 are entries 0, 1 of row 0 and 0, 2 of row 1
    expected = torch.zeros(2, 3)
    for row, top in ((0, [0, 1]), (1, [0, 2])):
        kept = noisy[row, top]
        expected[row, top] = torch.exp(kept) / torch.exp(kept).sum()
    torch.testing.assert_close(noisy_top_k_gates(tokens, router, noise_weight, 2, noise), expected)
    # without noise (evaluation): softmax of the router's logits over their top k; top 1 is a one-hot
    clean = torch.tensor([[1.0, 2.0, 0.0], [1.0, -2.0, 2.0]])
    torch.testing.assert_close(noisy_top_k_gates(tokens, router, noise_weight, 3, None), clean.softmax(1))
    assert noisy_top_k_gates(tokens, router, noise_weight, 1, None).tolist() == [[0, 1, 0], [0, 0, 1]]


def test_a_hooked_block_adds_the_gated_experts_by_hand():
    """``x' = x + attn(ln_1 x)``; the block returns ``x' + mlp(ln_2 x') + Σ g_i(x'[:, 0]) · adapter_i(x')``."""
    torch.manual_seed(0)
    block = ResidualAttentionBlock(8, 2).eval()
    transformer = torch.nn.Module()
    transformer.resblocks, transformer.width, transformer.batch_first = torch.nn.ModuleList([block]), 8, True
    moe = MoEAdapterSet([transformer], experts=2, top_k=2, bottleneck=4, scale=0.1, dropout=0.1).eval()
    unit = moe.units[0]
    with torch.no_grad():
        for parameter in (unit.router, unit.noise_weight, *unit.experts.parameters()):
            parameter.normal_()
    x = torch.randn(3, 5, 8)  # [batch, tokens, width]
    with torch.no_grad():
        stock = block(x)
        with moe.switched_on():
            hooked = block(x)
        after_attention = x + block.attention(block.ln_1(x))
        gates = (after_attention[:, 0] @ unit.router).softmax(1)
        experts = [0.1 * (F.relu(after_attention @ e.down.weight.T + e.down.bias) @ e.up.weight.T + e.up.bias)
                   for e in unit.experts]
        expected = (after_attention + block.mlp(block.ln_2(after_attention))
                    + gates[:, 0, None, None] * experts[0] + gates[:, 1, None, None] * experts[1])
        again = block(x)
    torch.testing.assert_close(hooked, expected)
    torch.testing.assert_close(stock, after_attention + block.mlp(block.ln_2(after_attention)))
    assert torch.equal(again, stock)  # switched off again: the stock block


def test_frozen_clip_stays_bit_identical_and_only_the_adapters_train(tmp_path, clip_model):
    run = assemble(build_config(moe_raw(tmp_path, clip_model, max_tasks=1)))
    clip, moe = run.backbone.text.model, run.learner.moe
    before = {name: value.clone() for name, value in clip.state_dict().items()}
    initial = {name: value.clone() for name, value in moe.state_dict().items()}
    for task in run.stream.tasks:
        run.ctx.open_fit(task)
        run.learner.fit(task)
    for name, value in clip.state_dict().items():
        assert torch.equal(value, before[name]), name
    assert not any(name.startswith(("visual.", "transformer.")) and "units" in name for name in clip.state_dict())
    trained = moe.state_dict()
    assert len(moe.units) == TINY_CLIP["vision_cfg"]["layers"] + TINY_CLIP["text_cfg"]["layers"]
    for name in ("units.0.router", "units.1.router", "units.0.experts.1.up.weight", "units.1.experts.0.up.weight"):
        assert not torch.equal(trained[name], initial[name]), name
    assert not moe.enabled and not moe.noisy  # others see the stock CLIP


@clean_error
@pytest.mark.parametrize("overrides, message", [
    ({"top_k": 3}, r"top_k must be between 1 and experts_num \(2\)"),
    ({"ffn_num": 0}, r"ffn_num at least 1"),
    ({"ls": 1.0}, r"ls and adapter_dropout must be in \[0, 1\)"),
])
def test_bad_settings_are_refused_before_anything_is_written(tmp_path, clip_model, overrides, message):
    with pytest.raises(PilotError, match=message):
        run_experiment(build_config(moe_raw(tmp_path, clip_model, **overrides)))
    assert not (tmp_path / "logs").exists()


def test_resume_equals_an_uninterrupted_run(tmp_path, clip_model):
    """Killed after the first task: the second's noisy gates and dropout draw what the uninterrupted run drew."""
    (uninterrupted,) = run_experiment(build_config(moe_raw(tmp_path / "full", clip_model)))
    resumed = killed_then_resumed(build_config(moe_raw(tmp_path / "killed", clip_model)), 1)
    assert resumed["counts"] == uninterrupted["counts"]
    assert resumed["accuracy_curve"] == uninterrupted["accuracy_curve"]
