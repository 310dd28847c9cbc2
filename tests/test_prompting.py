import copy
import math
from collections.abc import Iterator

import pytest
import timm
import torch
import torch.nn.functional as F
from torch import nn

from pilot.modules.prompting import (CodaPrompt, GeneralPrompt, PromptedViT, PromptPool, orthogonality_penalty,
                                     prefix_attention, prefixes_for_blocks, pull_loss)

DIM = 48
HEADS = 3


def tiny_vit() -> nn.Module:
    torch.manual_seed(0)
    return timm.create_model("vit_tiny_patch16_224", pretrained=False, img_size=32, patch_size=8,
                             depth=4, embed_dim=DIM, num_heads=HEADS, num_classes=0).eval()


def freeze(module: nn.Module) -> None:
    for parameter in module.parameters():
        parameter.requires_grad_(False)


@pytest.fixture(autouse=True, scope="module")
def single_thread() -> Iterator[None]:
    """Tiny models run far faster on one thread than on a shared, busy pair of cores."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture
def images() -> torch.Tensor:
    return torch.randn(4, 3, 32, 32, generator=torch.Generator().manual_seed(1))


def random_prefix(batch: int, length: int) -> tuple[torch.Tensor, torch.Tensor]:
    return torch.randn(batch, length, DIM), torch.randn(batch, length, DIM)


# ---------------------------------------------------------------------------------------------
# The stock model is untouched
# ---------------------------------------------------------------------------------------------


def test_empty_prompts_and_detach_give_stock_output(images: torch.Tensor) -> None:
    vit = tiny_vit()
    stock = vit.forward_features(images)
    keys = list(vit.state_dict())
    handle = PromptedViT(vit)
    assert list(vit.state_dict()) == keys
    assert torch.equal(vit.forward_features(images), stock)
    empty = torch.zeros(4, 0, DIM)
    with handle.use(prompt_tokens=empty):
        assert torch.equal(vit.forward_features(images), stock)
    with handle.use(prefixes={0: (empty, empty), 3: (empty, empty)}):
        assert torch.equal(vit.forward_features(images), stock)
    handle.detach()
    assert all("forward" not in vars(block.attn) for block in vit.blocks)
    assert len(vit.norm_pre._forward_pre_hooks) == 0
    assert torch.equal(vit.forward_features(images), stock)


@pytest.mark.parametrize("fused", [True, False])
def test_prefix_attention_without_prefix_matches_timm_attention(fused: bool) -> None:
    attention = tiny_vit().blocks[1].attn
    attention.fused_attn = fused
    x = torch.randn(2, 17, DIM)
    empty = torch.zeros(2, 0, DIM)
    torch.testing.assert_close(prefix_attention(attention, x, empty, empty), attention(x), atol=1e-6, rtol=0)


def test_prompts_apply_only_inside_use(images: torch.Tensor) -> None:
    vit = tiny_vit()
    stock = vit.forward_features(images)
    handle = PromptedViT(vit)
    with handle.use(prompt_tokens=torch.randn(4, 2, DIM), prefixes={1: random_prefix(4, 3)}):
        prompted = vit.forward_features(images)
    assert prompted.shape[1] == stock.shape[1] + 2
    assert not torch.allclose(prompted[:, 0], stock[:, 0])
    assert torch.equal(vit.forward_features(images), stock)


def test_frozen_weights_load_into_prompted_vit(images: torch.Tensor) -> None:
    vit, pretrained = tiny_vit(), tiny_vit()
    nn.init.normal_(pretrained.blocks[0].attn.qkv.weight)
    PromptedViT(vit)
    vit.load_state_dict(pretrained.state_dict())
    assert torch.equal(vit.forward_features(images), pretrained.forward_features(images))


# ---------------------------------------------------------------------------------------------
# Insertion mechanics
# ---------------------------------------------------------------------------------------------


def test_prefix_attention_matches_reference_computation() -> None:
    vit = tiny_vit()
    handle = PromptedViT(vit)
    attention = vit.blocks[2].attn
    x = torch.randn(2, 17, DIM)
    key_prefix, value_prefix = random_prefix(2, 5)
    with handle.use(prefixes={2: (key_prefix, value_prefix)}):
        out = attention(x)

    def heads(t: torch.Tensor) -> torch.Tensor:  # [B, N, D] -> [B, H, N, D / H]
        return t.reshape(t.shape[0], t.shape[1], HEADS, DIM // HEADS).transpose(1, 2)

    q, k, v = (x @ attention.qkv.weight.T + attention.qkv.bias).chunk(3, dim=-1)
    k = torch.cat([key_prefix, k], dim=1)
    v = torch.cat([value_prefix, v], dim=1)
    weights = torch.softmax(heads(q) @ heads(k).transpose(-1, -2) / math.sqrt(DIM // HEADS), dim=-1)
    mixed = (weights @ heads(v)).transpose(1, 2).reshape(2, 17, DIM)
    expected = mixed @ attention.proj.weight.T + attention.proj.bias
    torch.testing.assert_close(out, expected, atol=1e-5, rtol=1e-5)


def test_prompt_tokens_sit_after_class_token(images: torch.Tensor) -> None:
    vit = tiny_vit()
    vit.blocks = nn.Sequential()  # features = norm(embedded sequence) exposes where the tokens went
    handle = PromptedViT(vit)
    tokens = torch.randn(4, 3, DIM)
    with handle.use(prompt_tokens=tokens):
        features = vit.forward_features(images)
    torch.testing.assert_close(features[:, handle.prompt_slice(3)], vit.norm(tokens))
    assert handle.prompt_slice(3) == slice(1, 4)


@pytest.mark.parametrize("mode", ["tokens", "prefixes"])
def test_each_sample_uses_its_own_prompts(images: torch.Tensor, mode: str) -> None:
    vit = tiny_vit()
    handle = PromptedViT(vit)
    tokens = torch.randn(4, 3, DIM)
    prefixes = {0: random_prefix(4, 3), 2: random_prefix(4, 2)}

    def run(rows: slice) -> torch.Tensor:
        if mode == "tokens":
            context = handle.use(prompt_tokens=tokens[rows])
        else:
            context = handle.use(prefixes={block: (k[rows], v[rows]) for block, (k, v) in prefixes.items()})
        with context:
            return vit.forward_features(images[rows])

    batched = run(slice(None))
    for i in range(4):
        torch.testing.assert_close(batched[i:i + 1], run(slice(i, i + 1)), atol=1e-5, rtol=1e-5)


def test_bad_inputs_raise_clear_errors(images: torch.Tensor) -> None:
    with pytest.raises(ValueError, match="VisionTransformer"):
        PromptedViT(nn.Linear(2, 2))
    vit = tiny_vit()
    handle = PromptedViT(vit)
    with pytest.raises(ValueError, match="detach"):
        PromptedViT(vit)
    with pytest.raises(ValueError, match="blocks"):
        with handle.use(prefixes={7: random_prefix(4, 2)}):
            pass
    with pytest.raises(ValueError, match="prompt tokens"), handle.use(prompt_tokens=torch.randn(3, 2, DIM)):
        vit.forward_features(images)
    with pytest.raises(NotImplementedError), handle.use(prefixes={0: random_prefix(2, 2)}):
        vit.blocks[0].attn(torch.randn(2, 17, DIM), attn_mask=torch.zeros(17, 17))
    vit.set_grad_checkpointing(True)
    with pytest.raises(ValueError, match="checkpointing"), handle.use(prompt_tokens=torch.randn(4, 2, DIM)):
        pass


def test_deepcopy_of_vit_with_handle_is_independent(images: torch.Tensor) -> None:
    vit = tiny_vit()
    handle = PromptedViT(vit)
    vit_copy, handle_copy = copy.deepcopy((vit, handle))
    prefixes = {1: random_prefix(4, 2)}
    with handle.use(prefixes=prefixes):
        original = vit.forward_features(images)
        assert torch.equal(vit_copy.forward_features(images), tiny_vit().forward_features(images))
    with handle_copy.use(prefixes=prefixes):
        torch.testing.assert_close(vit_copy.forward_features(images), original)


# ---------------------------------------------------------------------------------------------
# L2P / DualPrompt pool
# ---------------------------------------------------------------------------------------------


def test_pool_initialisation_is_uniform_minus_one_to_one() -> None:
    pool = PromptPool(pool_size=10, length=5, embed_dim=DIM, top_k=1, num_layers=3, prefix=True)
    assert pool.prompts.shape == (10, 3, 2, 5, DIM) and pool.keys.shape == (10, DIM)
    for values in (pool.prompts, pool.keys):
        assert -1 <= values.min() < -0.9 and 0.9 < values.max() <= 1
    assert torch.count_nonzero(PromptPool(4, 2, DIM, 1, key_init="zero").keys) == 0
    with pytest.raises(ValueError):
        PromptPool(4, 2, DIM, 1, prompt_init="normal")


def hand_built_pool() -> PromptPool:
    pool = PromptPool(pool_size=4, length=2, embed_dim=3, top_k=2)
    with torch.no_grad():
        pool.keys.copy_(torch.tensor([[1.0, 0, 0], [0, 1, 0], [0, 0, 1], [1, 1, 0]]))
        pool.prompts.copy_(torch.arange(4.0).view(4, 1, 1, 1).expand(4, 1, 2, 3))
    return pool


def test_pool_selects_top_k_by_cosine_and_pull_loss_matches_hand_computation() -> None:
    pool = hand_built_pool()
    query = torch.tensor([[2.0, 0.1, 0], [0, 3, 0.5]])
    selection = pool.select(query)
    assert selection.indices.tolist() == [[0, 3], [1, 3]]
    assert selection.prompts.shape == (2, 1, 4, 3)
    assert selection.prompts[0, 0, :, 0].tolist() == [0, 0, 3, 3]  # entries joined in top-k order
    cos = F.cosine_similarity
    expected = -(cos(query[0], pool.keys[0], dim=0) + cos(query[0], pool.keys[3], dim=0)
                 + cos(query[1], pool.keys[1], dim=0) + cos(query[1], pool.keys[3], dim=0)) / 2
    torch.testing.assert_close(pull_loss(selection.selected_similarity), expected)


def test_pool_force_index_and_allowed_indices() -> None:
    pool = hand_built_pool()
    query = torch.tensor([[2.0, 0.1, 0], [0, 3, 0.5]])
    forced = pool.select(query, force_index=torch.tensor([[2, 1], [0, 2]]))
    assert forced.indices.tolist() == [[2, 1], [0, 2]]
    assert forced.prompts[1, 0, :, 0].tolist() == [0, 0, 2, 2]
    torch.testing.assert_close(forced.selected_similarity[1, 1], F.cosine_similarity(query[1], pool.keys[2], dim=0))
    restricted = pool.select(query, allowed=[1, 2])
    assert restricted.indices.tolist() == [[1, 2], [1, 2]]
    with pytest.raises(ValueError):
        pool.select(query, force_index=torch.tensor([0, 9]))


def test_l2p_prompts_train_and_vit_stays_frozen(images: torch.Tensor) -> None:
    vit = tiny_vit()
    freeze(vit)
    handle = PromptedViT(vit)
    pool = PromptPool(pool_size=6, length=2, embed_dim=DIM, top_k=2)
    frozen = copy.deepcopy(vit.state_dict())
    with torch.no_grad():
        query = vit.forward_features(images)[:, 0]
    selection = pool.select(query)
    with handle.use(prompt_tokens=selection.prompts[:, 0]):
        features = vit.forward_features(images)
    prompt_outputs = features[:, handle.prompt_slice(4)].mean(1)
    (prompt_outputs.pow(2).sum() + 0.1 * pull_loss(selection.selected_similarity)).backward()
    assert all(p.grad is None for p in vit.parameters())
    used = torch.zeros(6, dtype=torch.bool)
    used[selection.indices.unique()] = True
    assert pool.prompts.grad[used].abs().sum() > 0 and pool.prompts.grad[~used].abs().sum() == 0
    assert pool.keys.grad[used].abs().sum() > 0
    before = copy.deepcopy(pool.state_dict())
    torch.optim.SGD(pool.parameters(), lr=0.1).step()
    assert all(torch.equal(value, vit.state_dict()[name]) for name, value in frozen.items())
    assert not torch.equal(before["prompts"], pool.prompts)


def test_dualprompt_prefixes_train_and_vit_stays_frozen(images: torch.Tensor) -> None:
    vit = tiny_vit()
    freeze(vit)
    handle = PromptedViT(vit)
    general = GeneralPrompt(length=5, embed_dim=DIM, num_layers=2)
    expert = PromptPool(pool_size=10, length=5, embed_dim=DIM, top_k=1, num_layers=2, prefix=True)
    frozen = copy.deepcopy(vit.state_dict())
    query = vit.forward_features(images)[:, 0]
    selection = expert.select(query, force_index=torch.full((4,), 3))
    prefixes = {**prefixes_for_blocks(general(4), [0, 1]), **prefixes_for_blocks(selection.prompts, [2, 3])}
    with handle.use(prefixes=prefixes):
        cls = vit.forward_features(images)[:, 0]
    (cls.pow(2).sum() + 0.1 * pull_loss(selection.selected_similarity)).backward()
    assert all(p.grad is None for p in vit.parameters())
    assert general.prompts.grad.abs().sum() > 0
    assert expert.prompts.grad[3].abs().sum() > 0 and expert.prompts.grad[:3].abs().sum() == 0
    assert expert.keys.grad[3].abs().sum() > 0
    torch.optim.Adam([*general.parameters(), *expert.parameters()], lr=0.1).step()
    assert all(torch.equal(value, vit.state_dict()[name]) for name, value in frozen.items())


# ---------------------------------------------------------------------------------------------
# CODA-Prompt
# ---------------------------------------------------------------------------------------------


def test_coda_weights_follow_official_formula() -> None:
    coda = CodaPrompt(embed_dim=DIM, num_tasks=2, num_components=8, length=4, num_layers=2)
    query = torch.randn(3, DIM)
    prompts = coda(query)
    assert prompts.shape == (3, 2, 2, 2, DIM)
    components, keys, attention = coda.components[0][1], coda.keys[0][1], coda.attention[0][1]
    attended = F.normalize(torch.einsum("bd,kd->bkd", query, attention), dim=2)
    weights = torch.einsum("bkd,kd->bk", attended, F.normalize(keys, dim=1))
    expected = torch.einsum("bk,kld->bld", weights, components)
    torch.testing.assert_close(prompts[:, 1, 0], expected[:, :2])
    torch.testing.assert_close(prompts[:, 1, 1], expected[:, 2:])


def test_coda_task_zero_uses_only_its_slice() -> None:
    coda = CodaPrompt(embed_dim=DIM, num_tasks=3, num_components=6, length=4, num_layers=2)
    query = torch.randn(3, DIM)
    before = coda(query)
    with torch.no_grad():
        for slices in (coda.components, coda.keys, coda.attention):
            for later in (slices[1], slices[2]):
                later.normal_()
    assert torch.equal(coda(query), before)


def test_coda_new_task_trains_only_its_orthogonal_slice() -> None:
    coda = CodaPrompt(embed_dim=DIM, num_tasks=3, num_components=6, length=4, num_layers=2)
    with torch.no_grad():
        coda.keys[0].add_(0.3 * torch.randn_like(coda.keys[0]))  # training left slice 0 non-orthonormal
    slice0 = copy.deepcopy(coda.state_dict())
    coda.set_task(1)
    assert coda.task == 1
    for slices in (coda.components, coda.keys, coda.attention):
        for layer in range(2):
            old, new = slices[0][layer].flatten(1), slices[1][layer].flatten(1)
            torch.testing.assert_close(new @ old.T, torch.zeros(2, 2), atol=1e-5, rtol=0)
            torch.testing.assert_close(new @ new.T, torch.eye(2), atol=1e-5, rtol=0)
        assert torch.count_nonzero(slices[2]) == 0
    assert all(torch.equal(coda.state_dict()[name], value) for name, value in slice0.items() if ".0" in name)
    loss = coda(torch.randn(3, DIM)).pow(2).sum() + coda.orthogonality_loss()
    loss.backward()
    for slices in (coda.components, coda.keys, coda.attention):
        assert slices[0].grad is None and slices[2].grad is None
        assert slices[1].grad.abs().sum() > 0


def test_coda_task_survives_state_dict_round_trip() -> None:
    coda = CodaPrompt(embed_dim=DIM, num_tasks=3, num_components=6, length=4, num_layers=1)
    coda.set_task(2)
    restored = CodaPrompt(embed_dim=DIM, num_tasks=3, num_components=6, length=4, num_layers=1)
    restored.load_state_dict(coda.state_dict())
    assert restored.task == 2
    assert [p.requires_grad for p in restored.keys] == [False, False, True]
    with pytest.raises(ValueError):
        restored.set_task(1)


def test_orthogonality_penalty_is_zero_for_orthonormal_rows() -> None:
    assert orthogonality_penalty(torch.eye(3, 5)) == 0
    torch.testing.assert_close(orthogonality_penalty(2 * torch.eye(2)), torch.tensor(4.5))


def test_coda_prompts_drive_vit_prefixes(images: torch.Tensor) -> None:
    vit = tiny_vit()
    handle = PromptedViT(vit)
    coda = CodaPrompt(embed_dim=DIM, num_tasks=2, num_components=4, length=4, num_layers=2)
    query = vit.forward_features(images)[:, 0]
    with handle.use(prefixes=prefixes_for_blocks(coda(query), [0, 1])):
        assert not torch.allclose(vit.forward_features(images)[:, 0], query)
