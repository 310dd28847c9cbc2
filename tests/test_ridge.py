import pytest
import torch

from pilot.modules.ridge import (OFFICIAL_LAMBDAS, RandomProjection, RidgeState, _spectral_factors, select_lambda,
                         split_fit_val)


def direct_ridge(h: torch.Tensor, targets: torch.Tensor, lam: float) -> torch.Tensor:
    return torch.linalg.solve(h.T @ h + lam * torch.eye(h.shape[1], dtype=h.dtype), h.T @ targets)


def one_hot(labels: torch.Tensor, num_classes: int) -> torch.Tensor:
    return torch.nn.functional.one_hot(labels, num_classes).double()


def noisy_classes(num_samples: int, dim: int, num_classes: int, noise: float,
                  seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    generator = torch.Generator().manual_seed(seed)
    centres = torch.randn(num_classes, dim, generator=generator, dtype=torch.float64)
    labels = torch.randint(0, num_classes, (num_samples,), generator=generator)
    return centres[labels] + noise * torch.randn(num_samples, dim, generator=generator, dtype=torch.float64), labels


def test_random_projection_is_reproducible_and_saved() -> None:
    first, same, other = (RandomProjection(8, 32, seed=s) for s in (3, 3, 4))
    assert torch.equal(first.weight, same.weight) and not torch.equal(first.weight, other.weight)
    features = torch.randn(5, 8)
    torch.testing.assert_close(first(features), torch.relu(features @ first.weight))
    restored = RandomProjection(8, 32, seed=99)
    restored.load_state_dict(first.state_dict())
    assert torch.equal(restored(features), first(features))


def test_solve_equals_direct_ridge_solve() -> None:
    h, labels = noisy_classes(200, 64, 5, noise=1.0, seed=0)
    state = RidgeState(64)
    state.add(h, labels, num_classes=5)
    for lam in (1e-2, 1.0, 1e3):
        torch.testing.assert_close(state.solve(lam), direct_ridge(h, one_hot(labels, 5), lam))


def test_accumulation_over_calls_equals_one_call_and_grows_classes() -> None:
    h_first, labels_first = noisy_classes(30, 16, 3, noise=1.0, seed=1)
    h_second, labels_second = noisy_classes(40, 16, 3, noise=1.0, seed=2)
    h_first, h_second, labels_second = h_first.float(), h_second.float(), labels_second + 3
    in_two = RidgeState(16)
    in_two.add(h_first, labels_first, num_classes=3)
    in_two.add(h_second, labels_second, num_classes=6)
    in_one = RidgeState(16)
    in_one.add(torch.cat([h_first, h_second]), torch.cat([labels_first, labels_second]), num_classes=6)
    torch.testing.assert_close(in_two.gram(), in_one.gram())
    torch.testing.assert_close(in_two.class_sums(), in_one.class_sums())
    assert in_two.num_classes == 6 and in_two.gram().dtype == torch.float64

    restored = RidgeState(16)
    restored.load_state_dict(in_two.state_dict())
    torch.testing.assert_close(restored.solve(0.1), in_two.solve(0.1))
    with pytest.raises(ValueError, match="only grow"):
        in_two.add(h_first, labels_first, num_classes=3)


def test_compact_gram_is_exact_through_rank_deficiency_and_the_switch_to_dense() -> None:
    """G = B C B^T while the rank is within M/4 (here 64): equal to the dense sum, B orthonormal, and
    solves equal to a direct ridge solve, also for repeated samples, samples in a 3-dim subspace
    of earlier ones, and samples just outside it (which one projection leaves short of orthogonal)."""
    generator = torch.Generator().manual_seed(7)
    distinct, labels = noisy_classes(30, 256, 4, noise=1.0, seed=8)
    in_subspace = torch.rand(20, 3, generator=generator, dtype=torch.float64) @ distinct[:3]
    near_subspace = in_subspace[:5] + 1e-9 * torch.randn(5, 256, generator=generator, dtype=torch.float64)
    batches = [(distinct, labels), (distinct[:10], labels[:10]),  # a repeat adds no direction
               (in_subspace, torch.zeros(20, dtype=torch.long)),  # nor do combinations of earlier ones
               (near_subspace, torch.ones(5, dtype=torch.long)),
               (noisy_classes(20, 256, 4, noise=1.0, seed=9)[0], labels[:20] + 4),  # rank 55 of 64: compact
               (noisy_classes(10, 256, 4, noise=1.0, seed=10)[0], labels[:10] + 4)]  # rank 65: dense
    state, seen_h, seen_y = RidgeState(256), [], []
    for step, (h, y) in enumerate(batches):
        state.add(h, y, num_classes=8)
        seen_h.append(h)
        seen_y.append(y)
        assert state.is_compact == (step < 5)
        if state.is_compact:
            basis = state.statistics.basis
            assert basis.shape[1] == [30, 30, 30, 35, 55][step]
            assert (basis.T @ basis - torch.eye(basis.shape[1], dtype=torch.float64)).abs().max() < 1e-12
        h_all, targets = torch.cat(seen_h), one_hot(torch.cat(seen_y), 8)
        torch.testing.assert_close(state.gram(), h_all.T @ h_all)
        torch.testing.assert_close(state.class_sums(), h_all.T @ targets)
        for lam in (1e-3, 1.0, 1e4):
            torch.testing.assert_close(state.solve(lam), direct_ridge(h_all, targets, lam))
        restored = RidgeState(256)
        restored.load_state_dict(state.state_dict())
        assert restored.is_compact == state.is_compact
        torch.testing.assert_close(restored.solve(1.0), state.solve(1.0))


@pytest.mark.parametrize("num_fit", [120, 40])  # more samples than dimensions (primal) and fewer (dual)
def test_eigendecomposition_path_matches_direct_solve(num_fit: int) -> None:
    h, labels = noisy_classes(num_fit + 30, 64, 4, noise=1.0, seed=3)
    h_fit, h_val, targets = h[:num_fit], h[num_fit:], one_hot(labels[:num_fit], 4)
    left, eigenvalues, right = _spectral_factors(h_fit, targets, h_val)
    for lam in (1e-3, 1e-1, 10.0, 1e4):
        torch.testing.assert_close((left / (eigenvalues + lam)) @ right, h_val @ direct_ridge(h_fit, targets, lam))


@pytest.mark.parametrize("criterion", ["mse", "accuracy"])
def test_select_lambda_picks_best_held_out_candidate(criterion: str) -> None:
    h, labels = noisy_classes(100, 32, 6, noise=2.5, seed=4)
    h = torch.relu(h @ torch.randn(32, 80, generator=torch.Generator().manual_seed(5), dtype=torch.float64))
    h_fit, y_fit, h_val, y_val = split_fit_val(h, labels, fit_fraction=0.8, seed=0)
    assert len(h_fit) == 80 and len(h_val) == 20
    candidates = [10.0 ** e for e in range(-2, 7)]
    scores = []
    for lam in candidates:
        predictions = h_val @ direct_ridge(h_fit, one_hot(y_fit, 6), lam)
        if criterion == "mse":
            scores.append(-(predictions - one_hot(y_val, 6)).pow(2).mean().item())
        else:
            scores.append((predictions.argmax(1) == y_val).double().mean().item())
    best = max(scores)
    expected = candidates[scores.index(best)]  # the first (smallest) of tied candidates, as np.argmin
    assert len(set(scores)) > 1
    assert select_lambda(h_fit, y_fit, h_val, y_val, candidates, criterion=criterion) == expected


def test_select_lambda_defaults_and_validation() -> None:
    h, labels = noisy_classes(50, 8, 2, noise=0.1, seed=6)
    assert select_lambda(h[:40], labels[:40], h[40:], labels[40:]) in OFFICIAL_LAMBDAS
    with pytest.raises(ValueError, match="positive"):
        select_lambda(h[:40], labels[:40], h[40:], labels[40:], candidates=[0.0, 1.0])
    with pytest.raises(ValueError, match="non-empty"):
        split_fit_val(h[:1], labels[:1])
