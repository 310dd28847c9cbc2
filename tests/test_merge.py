import pytest
import torch
import torch.nn.functional as F
from torch import nn

from pilot.modules.merge import diagonal_fisher, ema_update, fisher_merge, interpolate


def test_ema_update_on_dicts_matches_hand_computation() -> None:
    target = {"w": torch.tensor([1.0, 2.0]), "b": torch.tensor([0.0])}
    source = {"w": torch.tensor([3.0, -2.0]), "b": torch.tensor([10.0])}
    ema_update(target, source, alpha=0.9)
    torch.testing.assert_close(target["w"], torch.tensor([0.9 * 1 + 0.1 * 3, 0.9 * 2 - 0.1 * 2]))
    torch.testing.assert_close(target["b"], torch.tensor([1.0]))


def test_ema_update_on_modules_covers_parameters_and_float_buffers() -> None:
    target, source = nn.BatchNorm1d(2), nn.BatchNorm1d(2)
    with torch.no_grad():
        source.weight.fill_(3.0)
        source.running_mean.fill_(2.0)
    source.num_batches_tracked.fill_(7)
    ema_update(target, source, alpha=0.75)
    torch.testing.assert_close(target.weight, torch.full((2,), 0.75 + 0.25 * 3.0))
    torch.testing.assert_close(target.running_mean, torch.full((2,), 0.5))
    assert target.num_batches_tracked.item() == 0
    assert target.weight.requires_grad


def test_ema_update_rejects_mismatched_names_and_shapes() -> None:
    with pytest.raises(ValueError, match="only in EMA source"):
        ema_update({"w": torch.zeros(2)}, {"w": torch.zeros(2), "v": torch.zeros(1)}, 0.5)
    with pytest.raises(ValueError, match="shape"):
        ema_update({"w": torch.zeros(2)}, {"w": torch.zeros(3)}, 0.5)
    with pytest.raises(ValueError, match="alpha"):
        ema_update({"w": torch.zeros(2)}, {"w": torch.zeros(2)}, 1.5)


def test_fisher_merge_matches_hand_computation() -> None:
    theta_a, theta_b = {"w": torch.tensor([1.0, 4.0])}, {"w": torch.tensor([3.0, 0.0])}
    fisher_a, fisher_b = {"w": torch.tensor([1e-5, 2e-5])}, {"w": torch.tensor([3e-5, 1e-6])}
    merged = fisher_merge(theta_a, fisher_a, theta_b, fisher_b, weight_b=0.4)
    first = (0.6 * 1e-5 * 1.0 + 0.4 * 3e-5 * 3.0) / (0.6 * 1e-5 + 0.4 * 3e-5)
    second = (0.6 * 2e-5 * 4.0 + 0.4 * 1e-6 * 0.0) / (0.6 * 2e-5 + 0.4 * 1e-6)
    torch.testing.assert_close(merged["w"], torch.tensor([first, second]))


def test_fisher_merge_caps_fisher_from_above_like_cofima() -> None:
    theta_a, theta_b = {"w": torch.tensor([0.0])}, {"w": torch.tensor([1.0])}
    merged = fisher_merge(theta_a, {"w": torch.tensor([1e-4])}, theta_b, {"w": torch.tensor([5.0])}, weight_b=0.4)
    torch.testing.assert_close(merged["w"], torch.tensor([0.4]))
    uncapped = fisher_merge(theta_a, {"w": torch.tensor([1e-4])}, theta_b, {"w": torch.tensor([5.0])},
                            weight_b=0.4, fisher_max=None)
    torch.testing.assert_close(uncapped["w"], torch.tensor([0.4 * 5.0 / (0.6 * 1e-4 + 0.4 * 5.0)]))


def test_equal_fisher_reduces_to_weighted_average() -> None:
    generator = torch.Generator().manual_seed(0)
    theta_a = {"w": torch.randn(3, 4, generator=generator), "b": torch.randn(4, generator=generator)}
    theta_b = {name: torch.randn(t.shape, generator=generator) for name, t in theta_a.items()}
    fisher = {name: torch.full_like(t, 3e-5) for name, t in theta_a.items()}
    merged = fisher_merge(theta_a, fisher, theta_b, fisher, weight_b=0.4)
    expected = interpolate(theta_a, theta_b, 0.4)
    for name in theta_a:
        torch.testing.assert_close(merged[name], 0.6 * theta_a[name] + 0.4 * theta_b[name])
        torch.testing.assert_close(expected[name], merged[name])


def test_fisher_merge_zero_fisher_and_new_head() -> None:
    theta_a = {"w": torch.tensor([1.0, 2.0])}
    theta_b = {"w": torch.tensor([3.0, 2.0]), "head": torch.tensor([5.0])}
    zero = {"w": torch.zeros(2)}
    merged = fisher_merge(theta_a, zero, theta_b, zero, weight_b=0.5)
    torch.testing.assert_close(merged["w"], torch.tensor([2.0, 2.0]))
    torch.testing.assert_close(merged["head"], torch.tensor([5.0]))
    with pytest.raises(ValueError, match="fisher_b"):
        fisher_merge(theta_a, zero, theta_b, {"v": torch.zeros(2)})


def test_diagonal_fisher_matches_squared_batch_gradient_mean() -> None:
    torch.manual_seed(0)
    model = nn.Linear(3, 2)
    batches = [(torch.randn(4, 3), torch.randint(0, 2, (4,))) for _ in range(3)]

    def loss_fn(net: nn.Module, batch: tuple[torch.Tensor, torch.Tensor]) -> torch.Tensor:
        inputs, labels = batch
        return F.cross_entropy(net(inputs), labels)

    fisher = diagonal_fisher(model, batches, loss_fn)

    expected_weight, expected_bias = torch.zeros(2, 3), torch.zeros(2)
    for inputs, labels in batches:
        # d(mean CE)/d(logits) = (softmax - onehot) / batch; logits = x W^T + b
        error = (torch.softmax(inputs @ model.weight.detach().T + model.bias.detach(), dim=1)
                 - F.one_hot(labels, 2)) / len(labels)
        expected_weight += (error.T @ inputs) ** 2
        expected_bias += error.sum(0) ** 2
    torch.testing.assert_close(fisher["weight"], expected_weight / 3)
    torch.testing.assert_close(fisher["bias"], expected_bias / 3)
    assert model.weight.grad is None

    first_only = diagonal_fisher(model, batches, loss_fn, params=["bias"], max_batches=1)
    assert list(first_only) == ["bias"]


def test_diagonal_fisher_zero_for_frozen_and_rejects_empty() -> None:
    model = nn.Linear(3, 2)
    model.bias.requires_grad_(False)

    def loss_fn(net: nn.Module, batch: torch.Tensor) -> torch.Tensor:
        return net(batch).pow(2).mean()

    fisher = diagonal_fisher(model, [torch.randn(2, 3)], loss_fn)
    assert torch.count_nonzero(fisher["bias"]) == 0 and torch.count_nonzero(fisher["weight"]) > 0
    with pytest.raises(ValueError, match="no batches"):
        diagonal_fisher(model, [], loss_fn)
