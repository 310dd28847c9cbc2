"""The LoRA block on timm's fused qkv projection, checked against the formula on hand-set tensors."""
import copy

import pytest
import timm
import torch
import torch.nn.functional as F

from pilot.modules.lora import attach_lora


@pytest.fixture(scope="module")
def stock():
    torch.manual_seed(0)
    return timm.create_model("vit_tiny_patch16_224", pretrained=False, num_classes=0, img_size=32, patch_size=8,
                             depth=2).eval()


def hand_set(lora, index, seed):
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for parameter in lora.pair_parameters(index):
            parameter.copy_(torch.randn(parameter.shape, generator=generator))


def test_the_qkv_output_gains_each_pairs_scaled_product_on_its_slices_only(stock):
    vit = copy.deepcopy(stock)
    lora = attach_lora(vit, ("v", "q"))
    hand_set(lora, lora.add_pair(4), seed=1)
    hand_set(lora, lora.add_pair(2, magnitude=0.5), seed=2)
    lora.normalise_pair(0)
    with torch.no_grad():
        lora.magnitudes[0].fill_(0.8)
    x = torch.randn(3, 5, 192)
    linear = stock.blocks[1].attn.qkv
    expected = F.linear(x, linear.weight, linear.bias)
    for name, start in (("q", 0), ("v", 384)):
        first, second = lora.units[1].pairs[0][name], lora.units[1].pairs[1][name]
        direction = first.up @ first.down / (first.up.norm() * first.down.norm())
        expected[..., start:start + 192] += x @ (0.8 * direction).T + x @ (0.5 * second.up @ second.down).T
    with torch.no_grad():
        torch.testing.assert_close(vit.blocks[1].attn.qkv(x), expected, rtol=1e-5, atol=1e-4)
        assert torch.equal(vit.blocks[1].attn.qkv(x)[..., 192:384], F.linear(x, linear.weight, linear.bias)[..., 192:384])


def test_off_or_with_zero_up_projections_the_stock_vit_is_exact(stock):
    vit = copy.deepcopy(stock)
    images = torch.randn(2, 3, 32, 32)
    lora = attach_lora(vit, ("k", "v"))
    with torch.no_grad():
        lora.add_pair(3)  # B = 0
        assert torch.equal(vit(images), stock(images))
        hand_set(lora, 0, seed=3)
        assert not torch.equal(vit(images), stock(images))
        with lora.disabled():
            assert torch.equal(vit(images), stock(images))
        lora.remove()
        assert torch.equal(vit(images), stock(images))


def test_merged_weights_compute_what_the_hooks_compute(stock):
    vit = copy.deepcopy(stock)
    lora = attach_lora(vit, ("q", "k", "v"))
    hand_set(lora, lora.add_pair(4), seed=4)
    hand_set(lora, lora.add_pair(3, magnitude=2.0), seed=5)
    lora.normalise_pair(1)
    images = torch.randn(2, 3, 32, 32)
    deployed = copy.deepcopy(stock)
    lora.merge_into(deployed)
    with torch.no_grad():
        torch.testing.assert_close(deployed(images), vit(images), atol=1e-5, rtol=1e-5)


def test_frozen_pairs_get_no_gradient_and_the_vit_none(stock):
    vit = copy.deepcopy(stock).requires_grad_(False)
    lora = attach_lora(vit, ("k", "v"))
    hand_set(lora, lora.add_pair(2), seed=6)
    lora.freeze_pair(0)
    lora.add_pair(2)
    vit(torch.randn(2, 3, 32, 32)).square().sum().backward()
    assert all(p.grad is None for p in lora.pair_parameters(0))
    assert all(p.grad is not None for p in lora.pair_parameters(1, ("up",)))
    assert all(p.grad is None for p in vit.parameters())


def test_the_state_dict_restores_pairs_ranks_magnitudes_and_directions(stock):
    vit = copy.deepcopy(stock)
    lora = attach_lora(vit, ("q", "v"))
    hand_set(lora, lora.add_pair(4), seed=7)
    hand_set(lora, lora.add_pair(2, magnitude=0.3), seed=8)
    lora.normalise_pair(0)
    other_vit = copy.deepcopy(stock)
    restored = attach_lora(other_vit, ("q", "v"))
    restored.load_state_dict(lora.state_dict())
    assert [pair["q"].rank for pair in restored.units[0].pairs] == [4, 2]
    assert restored.normalised == [True, False] and float(restored.magnitudes[1]) == pytest.approx(0.3)
    images = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        assert torch.equal(other_vit(images), vit(images))


def test_recorded_input_matrix_is_the_mean_of_x_transpose_x_over_tokens(stock):
    vit = copy.deepcopy(stock)
    lora = attach_lora(vit, ("k", "v"))
    seen = []
    handle = vit.blocks[0].norm1.register_forward_hook(lambda module, args, output: seen.append(output))
    batches = [torch.randn(2, 3, 32, 32), torch.randn(3, 3, 32, 32)]
    with torch.no_grad(), lora.record_inputs():
        for images in batches:
            vit(images)
    handle.remove()
    tokens = torch.cat([x.reshape(-1, 192) for x in seen])
    torch.testing.assert_close(lora.input_matrices()[0], tokens.T @ tokens / len(tokens))


@pytest.mark.parametrize("slices", [(), ("k", "k"), ("o",)])
def test_bad_slices_are_refused(stock, slices):
    with pytest.raises(ValueError, match="LoRA slices must be distinct names"):
        attach_lora(copy.deepcopy(stock), slices)
