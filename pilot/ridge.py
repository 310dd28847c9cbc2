"""RanPAC's classifier: a frozen random projection with ReLU, then ridge regression on statistics
accumulated over every task (``G = sum h^T h``, ``Q = sum h^T y``), with lambda chosen per task.
"""

from collections.abc import Iterable
from typing import Literal

import torch
from torch import nn

from pilot.errors import PilotError

OFFICIAL_LAMBDAS: tuple[float, ...] = tuple(10.0 ** exponent for exponent in range(-8, 9))
"""RanPAC's candidates ``10.0 ** np.arange(-8, 9)``."""


class RandomProjection(nn.Module):
    """``relu(features @ W)`` with a fixed ``W ~ N(0, 1)`` of shape ``[in_dim, out_dim]`` (RanPAC's ``W_rand``).

    ``W`` comes from a generator seeded with ``seed``, so the same seed rebuilds the same projection;
    it is also a buffer, so it travels with ``state_dict``.
    """

    def __init__(self, in_dim: int, out_dim: int = 10000, *, seed: int) -> None:
        super().__init__()
        if in_dim < 1 or out_dim < 1:
            raise PilotError(f"random projection needs positive sizes, got in_dim={in_dim}, out_dim={out_dim}")
        generator = torch.Generator().manual_seed(seed)
        self.register_buffer("weight", torch.randn(in_dim, out_dim, generator=generator))

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        return torch.relu(features @ self.weight.to(features.dtype))


def _one_hot(labels: torch.Tensor, num_classes: int) -> torch.Tensor:
    return torch.nn.functional.one_hot(labels.long(), num_classes).to(torch.float64)


class RidgeState:
    """Running ``G = sum h^T h`` ([M, M]) and ``Q = sum h^T onehot(y)`` ([M, classes]) in float64.

    ``Q`` gains zero columns as new classes arrive, so class-incremental tasks just keep adding.
    """

    def __init__(self, dim: int, device: torch.device | str = "cpu") -> None:
        self.gram = torch.zeros(dim, dim, dtype=torch.float64, device=device)
        self.class_sums = torch.zeros(dim, 0, dtype=torch.float64, device=device)

    @property
    def dim(self) -> int:
        return self.gram.shape[0]

    @property
    def num_classes(self) -> int:
        return self.class_sums.shape[1]

    def add(self, features: torch.Tensor, labels: torch.Tensor, num_classes: int) -> None:
        """Accumulate features ``[n, M]`` with integer labels in ``[0, num_classes)`` (classes seen so far)."""
        if features.dim() != 2 or features.shape[1] != self.dim or len(labels) != len(features):
            raise PilotError(f"ridge features must be [n, {self.dim}] with n labels, "
                             f"got {tuple(features.shape)} and {len(labels)} labels")
        if num_classes < self.num_classes:
            raise PilotError(f"num_classes can only grow: state has {self.num_classes}, got {num_classes}")
        if len(labels) and not 0 <= int(labels.min()) <= int(labels.max()) < num_classes:
            raise PilotError(f"labels must lie in [0, {num_classes}); pass the number of classes seen so far")
        grown = torch.zeros(self.dim, num_classes - self.num_classes, dtype=torch.float64, device=self.gram.device)
        self.class_sums = torch.cat([self.class_sums, grown], dim=1)
        features = features.detach().to(self.gram.device, torch.float64)
        self.gram += features.T @ features
        self.class_sums.index_add_(1, labels.to(self.gram.device).long(), features.T)

    def solve(self, lam: float) -> torch.Tensor:
        """``W_o = (G + lam I)^-1 Q`` ([M, classes], float64); logits are ``h @ W_o``."""
        if lam <= 0:
            raise PilotError(f"ridge lambda must be positive, got {lam}")
        # G + lam I is symmetric positive definite: Cholesky, built in one M x M buffer, halves
        # the time and memory of a general solve at M = 10000.
        regularised = self.gram.clone()
        regularised.diagonal().add_(lam)
        factor = torch.linalg.cholesky(regularised)
        del regularised
        return torch.cholesky_solve(self.class_sums, factor)

    def state_dict(self) -> dict[str, torch.Tensor]:
        """The live tensors (a checkpoint writes them out; G is 800 MB at M = 10000)."""
        return {"gram": self.gram, "class_sums": self.class_sums}

    def load_state_dict(self, state: dict[str, torch.Tensor]) -> None:
        gram, class_sums = state["gram"], state["class_sums"]
        if gram.shape != (self.dim, self.dim) or class_sums.shape[0] != self.dim:
            raise PilotError(f"ridge state is for dimension {gram.shape[0]}, this one has {self.dim}; "
                             "use the same random-projection size as the saved run")
        self.gram = gram.to(self.gram.device, torch.float64).clone()
        self.class_sums = class_sums.to(self.gram.device, torch.float64).clone()


def split_fit_val(features: torch.Tensor, labels: torch.Tensor, fit_fraction: float = 0.8,
                  seed: int = 0) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Shuffle, then the first ``int(n * fit_fraction)`` samples fit and the rest validate.

    RanPAC takes the first 80% of features extracted through a shuffled loader; the explicit,
    seeded shuffle here gives the same kind of random split from features in any order.
    """
    order = torch.randperm(len(features), generator=torch.Generator().manual_seed(seed)).to(features.device)
    num_fit = int(len(features) * fit_fraction)
    if not 0 < num_fit < len(features):
        raise PilotError(f"cannot split {len(features)} samples with fit_fraction={fit_fraction} "
                         "into non-empty fit and validation parts")
    fit, val = order[:num_fit], order[num_fit:]
    return features[fit], labels[fit.to(labels.device)], features[val], labels[val.to(labels.device)]


def _spectral_factors(h_fit: torch.Tensor, targets_fit: torch.Tensor,
                      h_val: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``(left, eigenvalues, right)`` with ``h_val @ W(lam) = left @ diag(1 / (eigenvalues + lam)) @ right``.

    One ``eigh`` serves every lambda. With at least M fitting samples it decomposes ``G = h^T h = V e V^T``
    ([M, M]): ``left = h_val V``, ``right = V^T Q``. With fewer samples it decomposes the smaller
    ``K = h h^T = U e U^T`` ([n, n]) and uses ``(h^T h + lam I)^-1 h^T = h^T (h h^T + lam I)^-1``:
    ``left = h_val h^T U``, ``right = U^T Y``. Rounding can make a zero eigenvalue slightly
    negative; it is clamped to 0 (both Gram matrices are positive semi-definite).
    """
    if len(h_fit) >= h_fit.shape[1]:
        eigenvalues, vectors = torch.linalg.eigh(h_fit.T @ h_fit)
        left, right = h_val @ vectors, vectors.T @ (h_fit.T @ targets_fit)
    else:
        eigenvalues, vectors = torch.linalg.eigh(h_fit @ h_fit.T)
        left, right = (h_val @ h_fit.T) @ vectors, vectors.T @ targets_fit
    return left, eigenvalues.clamp(min=0), right


def select_lambda(h_fit: torch.Tensor, y_fit: torch.Tensor, h_val: torch.Tensor, y_val: torch.Tensor,
                  candidates: Iterable[float] = OFFICIAL_LAMBDAS,
                  criterion: Literal["mse", "accuracy"] = "mse") -> float:
    """Ridge lambda whose fit on ``(h_fit, y_fit)`` predicts ``(h_val, y_val)`` best.

    Official RanPAC (``optimise_ridge_parameter``) fits on 80% of the *current task's* features only
    (its own ``G``/``Q``, not the ones accumulated over tasks) and scores the other 20% by
    ``F.mse_loss`` between predictions and one-hot targets, keeping the first minimum in candidate
    order (``np.argmin``). ``criterion="mse"`` does exactly that; ``"accuracy"`` keeps the first
    maximum of top-1 accuracy instead. The chosen lambda is then used with the accumulated state
    (``RidgeState.solve``). The official code solves once per candidate; one ``eigh`` does here.
    """
    lambdas = [float(lam) for lam in candidates]
    if not lambdas or min(lambdas) <= 0:
        raise PilotError(f"lambda candidates must be a non-empty list of positive numbers, got {lambdas}")
    if criterion not in ("mse", "accuracy"):
        raise PilotError(f"criterion must be 'mse' or 'accuracy', got {criterion!r}")
    # One-hot width only needs to cover the labels present: classes absent from the fit part get zero
    # predictions for every lambda, so RanPAC's wider one-hot (all classes) changes no comparison.
    num_classes = max(int(y_fit.max()), int(y_val.max())) + 1
    h_fit, h_val = h_fit.detach().to(torch.float64), h_val.detach().to(h_fit.device, torch.float64)
    left, eigenvalues, right = _spectral_factors(h_fit, _one_hot(y_fit.to(h_fit.device), num_classes), h_val)
    targets_val = _one_hot(y_val.to(h_fit.device), num_classes)
    best_lambda, best_score = lambdas[0], None
    for lam in lambdas:
        predictions = (left / (eigenvalues + lam)) @ right
        if criterion == "mse":
            score = -(predictions - targets_val).pow(2).mean().item()
        else:
            score = (predictions.argmax(dim=1) == targets_val.argmax(dim=1)).double().mean().item()
        if best_score is None or score > best_score:
            best_lambda, best_score = lam, score
    return best_lambda
