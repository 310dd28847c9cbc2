import copy

import pytest
import timm
import torch
from torch import nn

from pilot.modules.adapters import Adapter, AdapterBank, attach_adapters, attach_ssf, attach_visual_prompts, freeze


def tiny_vit() -> nn.Module:
    torch.manual_seed(0)
    return timm.create_model("vit_tiny_patch16_224", pretrained=False, img_size=32, patch_size=8,
                             depth=4, embed_dim=48, num_heads=3, num_classes=0).eval()


@pytest.fixture
def images() -> torch.Tensor:
    return torch.randn(4, 3, 32, 32, generator=torch.Generator().manual_seed(1))


def randomize(module: nn.Module) -> None:
    with torch.no_grad():
        for parameter in module.parameters():
            parameter.add_(0.1 * torch.randn_like(parameter))


def test_adapter_init_follows_pilot_lora_option() -> None:
    adapter = Adapter(48, bottleneck=64)
    assert adapter.down.weight.abs().sum() > 0
    for zero in (adapter.down.bias, adapter.up.weight, adapter.up.bias):
        assert torch.count_nonzero(zero) == 0


def test_zero_initialised_adapters_leave_output_unchanged(images: torch.Tensor) -> None:
    vit = tiny_vit()
    stock = vit(images)
    adapters = attach_adapters(vit)
    assert len(adapters.units) == len(vit.blocks)
    assert torch.equal(vit(images), stock)


def test_adapter_reads_residual_stream_in_parallel_with_mlp(images: torch.Tensor) -> None:
    vit = tiny_vit()
    adapters = attach_adapters(vit, bottleneck=8, scale=0.1).eval()
    randomize(adapters)
    block, adapter = vit.blocks[0], adapters.units[0]
    tokens = torch.randn(2, 17, 48)
    after_attention = tokens + block.attn(block.norm1(tokens))
    expected = after_attention + block.mlp(block.norm2(after_attention)) + adapter(after_attention)
    torch.testing.assert_close(block(tokens), expected)


def test_training_changes_only_adapter_parameters(images: torch.Tensor) -> None:
    vit = tiny_vit()
    freeze(vit)
    adapters = attach_adapters(vit)
    vit_before = copy.deepcopy(vit.state_dict())
    adapters_before = copy.deepcopy(adapters.state_dict())
    optimizer = torch.optim.SGD(adapters.parameters(), lr=0.5)
    vit.train()
    adapters.train()
    for _ in range(3):
        loss = vit(images).pow(2).mean()
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    assert all(torch.equal(value, vit.state_dict()[name]) for name, value in vit_before.items())
    assert any(not torch.equal(value, adapters.state_dict()[name]) for name, value in adapters_before.items())
    assert all(not parameter.requires_grad for parameter in vit.parameters())


def test_disabled_and_removed_adapters_give_stock_output(images: torch.Tensor) -> None:
    vit = tiny_vit()
    stock = vit(images)
    adapters = attach_adapters(vit).eval()
    randomize(adapters)
    adapted = vit(images)
    assert not torch.allclose(adapted, stock)
    with adapters.disabled():
        assert torch.equal(vit(images), stock)
    assert adapters.enabled and torch.equal(vit(images), adapted)
    adapters.enabled = False
    assert torch.equal(vit(images), stock)
    adapters.enabled = True
    adapters.remove()
    assert torch.equal(vit(images), stock)


def test_adapter_state_dict_round_trip(images: torch.Tensor) -> None:
    vit = tiny_vit()
    adapters = attach_adapters(vit).eval()
    randomize(adapters)
    adapted = vit(images)
    saved = copy.deepcopy(adapters.state_dict())
    adapters.remove()
    fresh = attach_adapters(vit).eval()
    fresh.load_state_dict(saved)
    assert torch.equal(vit(images), adapted)


def test_adapter_bank_closes_sets_and_rebuilds_them_from_its_state_dict(images: torch.Tensor) -> None:
    vit = tiny_vit()

    def bank() -> AdapterBank:  # a store is the frozen set's output on ``images``
        def open_store(adapters):
            freeze(adapters)
            with torch.no_grad():
                return vit(images)
        return AdapterBank(lambda: attach_adapters(vit, bottleneck=8), open_store)

    saved = nn.ModuleDict({"adapters": bank()})  # as in a learner's ``net``
    trained = saved["adapters"].add()
    randomize(trained)
    saved["adapters"].close()
    copied = saved["adapters"].add(trained.state_dict())
    assert torch.equal(copied.units[0].up.weight, trained.units[0].up.weight) and copied.units[0].up.weight.requires_grad
    saved["adapters"].close()
    assert not any(p.requires_grad for p in saved.parameters()) and len(saved["adapters"].stores) == 2

    resumed = nn.ModuleDict({"adapters": bank()})
    resumed.load_state_dict(saved.state_dict())
    assert len(resumed["adapters"]) == 2 and not any(p.requires_grad for p in resumed.parameters())
    assert resumed.state_dict().keys() == saved.state_dict().keys()
    assert all(torch.equal(v, resumed.state_dict()[k]) for k, v in saved.state_dict().items())
    assert len(resumed["adapters"].stores) == 2


def test_deepcopy_of_parent_gives_independent_adapted_model(images: torch.Tensor) -> None:
    parent = nn.Module()
    parent.vit = tiny_vit()
    parent.adapters = attach_adapters(parent.vit).eval()
    randomize(parent.adapters)
    adapted = parent.vit(images)
    clone = copy.deepcopy(parent)
    randomize(parent.adapters)
    assert torch.equal(clone.vit(images), adapted)
    assert not torch.allclose(parent.vit(images), adapted)


def test_ssf_at_identity_init_leaves_output_unchanged(images: torch.Tensor) -> None:
    vit = tiny_vit()
    stock = vit(images)
    attach_ssf(vit, init_std=0.0)
    torch.testing.assert_close(vit(images), stock, rtol=0, atol=0)


def test_ssf_sites_and_official_init(images: torch.Tensor) -> None:
    vit = tiny_vit()
    stock = vit(images)
    ssf = attach_ssf(vit)
    per_block = ["norm1", "attn__qkv", "attn__proj", "norm2", "mlp__fc1", "mlp__fc2"]
    expected = {"patch_embed__proj", "norm"} | {f"blocks__{i}__{site}" for i in range(4) for site in per_block}
    assert set(ssf.units.keys()) == expected
    assert ssf.units["blocks__0__attn__qkv"].scale.shape == (144,)
    assert ssf.units["blocks__0__mlp__fc1"].scale.shape == (192,)
    scales = torch.cat([unit.scale for unit in ssf.units.values()])
    assert abs(scales.mean().item() - 1.0) < 0.01 and 0.01 < scales.std().item() < 0.03
    assert not torch.allclose(vit(images), stock)
    with ssf.disabled():
        assert torch.equal(vit(images), stock)


def test_ssf_scales_patch_channels_and_state_dict_round_trip(images: torch.Tensor) -> None:
    vit = tiny_vit()
    ssf = attach_ssf(vit, init_std=0.0)
    patch = ssf.units["patch_embed__proj"]
    with torch.no_grad():
        patch.scale[0] = 2.0
        patch.shift[1] = 0.5
    tokens = vit.patch_embed(images)
    with ssf.disabled():
        stock_tokens = vit.patch_embed(images)
    torch.testing.assert_close(tokens[..., 0], 2.0 * stock_tokens[..., 0])
    torch.testing.assert_close(tokens[..., 1], stock_tokens[..., 1] + 0.5)

    randomize(ssf)
    adapted = vit(images)
    saved = copy.deepcopy(ssf.state_dict())
    ssf.remove()
    fresh = attach_ssf(vit)
    fresh.load_state_dict(saved)
    assert torch.equal(vit(images), adapted)


def test_non_vit_is_rejected() -> None:
    with pytest.raises(ValueError, match="blocks"):
        attach_adapters(nn.Linear(3, 3))
    with pytest.raises(ValueError, match="bottleneck"):
        attach_adapters(tiny_vit(), bottleneck=0)


def vpt_by_hand(vit: nn.Module, images: torch.Tensor, prompts: list[torch.Tensor], deep: bool) -> torch.Tensor:
    """APER's VPT forward written out: prompts appended after the patch tokens; deep: fresh ones per block."""
    x = vit.norm_pre(vit._pos_embed(vit.patch_embed(images)))
    length = prompts[0].shape[0]
    if deep:
        for block, tokens in zip(vit.blocks, prompts):
            x = block(torch.cat([x, tokens.expand(len(x), -1, -1)], dim=1))[:, :-length]
    else:
        x = torch.cat([x, prompts[0].expand(len(x), -1, -1)], dim=1)
        for block in vit.blocks:
            x = block(x)
        x = x[:, :-length]
    return vit.forward_head(vit.norm(x), pre_logits=True)


@pytest.mark.parametrize("deep", [True, False], ids=["deep", "shallow"])
def test_visual_prompts_follow_apers_vpt_forward(images: torch.Tensor, deep: bool) -> None:
    vit = tiny_vit()
    stock = vit(images)
    prompts = attach_visual_prompts(vit, length=3, deep=deep)
    assert all(torch.equal(p, torch.zeros_like(p)) for p in prompts.parameters())  # APER's zero init
    assert len(list(prompts.parameters())) == (len(vit.blocks) if deep else 1)
    randomize(prompts)
    with torch.no_grad():
        with prompts.disabled():  # the hand-written forward calls the same blocks
            expected = vpt_by_hand(vit, images, [unit.tokens for unit in prompts.units], deep)
        torch.testing.assert_close(vit(images), expected)
        assert not torch.allclose(vit(images), stock)
        with prompts.disabled():
            torch.testing.assert_close(vit(images), stock)
        prompts.remove()
        torch.testing.assert_close(vit(images), stock)
