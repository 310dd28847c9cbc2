"""RanPAC's classifier: a frozen random projection with ReLU, then ridge regression on statistics
accumulated over every task (``G = sum h^T h``, ``Q = sum h^T y``), with lambda chosen per task.
"""

from collections.abc import Iterable
from typing import Literal

import torch
from torch import nn


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
            raise ValueError(f"random projection needs positive sizes, got in_dim={in_dim}, out_dim={out_dim}")
        generator = torch.Generator().manual_seed(seed)
        self.register_buffer("weight", torch.randn(in_dim, out_dim, generator=generator))

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        return torch.relu(features @ self.weight.to(features.dtype))


def _one_hot(labels: torch.Tensor, num_classes: int) -> torch.Tensor:
    return torch.nn.functional.one_hot(labels.long(), num_classes).to(torch.float64)


def _with_columns(matrix: torch.Tensor, num_columns: int) -> torch.Tensor:
    """``matrix`` padded with zero columns up to ``num_columns`` (classes arriving)."""
    return torch.nn.functional.pad(matrix, (0, num_columns - matrix.shape[1]))


def _cholesky_solve_shifted(symmetric: torch.Tensor, lam: float, right: torch.Tensor) -> torch.Tensor:
    """``(S + lam I)^-1 right`` for a positive semi-definite ``S``, by Cholesky (half a general solve's
    time, and one extra matrix of memory, at M = 10000)."""
    shifted = symmetric.clone()
    shifted.diagonal().add_(lam)
    factor = torch.linalg.cholesky(shifted)
    del shifted
    return torch.cholesky_solve(right, factor)


class DenseStatistics:
    """``G`` ([M, M]) and ``Q`` ([M, classes]) as they are."""

    def __init__(self, gram: torch.Tensor, class_sums: torch.Tensor) -> None:
        self.gram, self.class_sums = gram, class_sums

    def add(self, features: torch.Tensor, targets: torch.Tensor) -> None:
        self.gram.addmm_(features.T, features)
        self.class_sums = _with_columns(self.class_sums, targets.shape[1]).addmm_(features.T, targets)

    def solve(self, lam: float) -> torch.Tensor:
        return _cholesky_solve_shifted(self.gram, lam, self.class_sums)

    def dense(self) -> tuple[torch.Tensor, torch.Tensor]:
        return self.gram, self.class_sums


class CompactStatistics:
    """``G = B C B^T`` and ``Q = B P`` with ``B`` ([M, r]) orthonormal spanning the features added so far,
    ``C`` ([r, r]) and ``P`` ([r, classes]): exact while the rank r is below M, and small while r << M."""

    def __init__(self, basis: torch.Tensor, core: torch.Tensor, class_coordinates: torch.Tensor) -> None:
        self.basis, self.core, self.class_coordinates = basis, core, class_coordinates

    @property
    def rank(self) -> int:
        return self.basis.shape[1]

    def add(self, features: torch.Tensor, targets: torch.Tensor) -> None:
        """Extend ``B`` by the new features' directions outside it; ``h^T = B' z`` then adds ``z z^T`` to
        ``C`` and ``z y`` to ``P``."""
        basis, columns = self.basis, features.T
        in_basis = basis.T @ columns
        residual = columns - basis @ in_basis
        # Directions of the residual above rounding level (numpy's matrix_rank tolerance, relative to h).
        q, r = torch.linalg.qr(residual)
        u, singular, _ = torch.linalg.svd(r)
        tolerance = max(columns.shape) * torch.finfo(torch.float64).eps * torch.linalg.matrix_norm(columns)
        new = q @ u[:, singular > tolerance]
        # One projection leaves rounding-sized parts in B's span, which normalising can magnify:
        # project these k <= n columns once more where that left them short of orthogonal.
        overlap = basis.T @ new
        if overlap.numel() and overlap.abs().max() > 64 * torch.finfo(torch.float64).eps:
            new, _ = torch.linalg.qr(new - basis @ overlap)
        self.basis = torch.cat([basis, new], dim=1)
        coordinates = torch.cat([in_basis, new.T @ columns])  # z
        rank = self.rank
        self.core = torch.nn.functional.pad(self.core, (0, rank - len(self.core), 0, rank - len(self.core)))
        self.core.addmm_(coordinates, coordinates.T)
        coordinates_of_sums = _with_columns(self.class_coordinates, targets.shape[1])
        self.class_coordinates = torch.nn.functional.pad(coordinates_of_sums, (0, 0, 0, new.shape[1]))
        self.class_coordinates.addmm_(coordinates, targets)

    def solve(self, lam: float) -> torch.Tensor:
        # G + lam I = B (C + lam I) B^T + lam (I - B B^T), and Q = B P lies in B's span.
        return self.basis @ _cholesky_solve_shifted(self.core, lam, self.class_coordinates)

    def dense(self) -> tuple[torch.Tensor, torch.Tensor]:
        return self.basis @ self.core @ self.basis.T, self.basis @ self.class_coordinates


class RidgeState:
    """Running ``G = sum h^T h`` ([M, M]) and ``Q = sum h^T onehot(y)`` ([M, classes]) in float64.

    ``Q`` gains zero columns as new classes arrive, so class-incremental tasks just keep adding.
    ``G`` has rank at most the number of samples added: while that stays within ``M / 4``, both are
    held exactly in compact form (``CompactStatistics``), where adding ``n`` samples costs O(M r n)
    rather than O(M^2 n), a solve O(r^3 + M r classes) rather than O(M^3), and a checkpoint holds
    about M r numbers rather than M^2. Past that they are dense (``DenseStatistics``).
    """

    def __init__(self, dim: int, device: torch.device | str = "cpu") -> None:
        self.dim, self.device = dim, torch.device(device)
        empty = torch.zeros(dim, 0, dtype=torch.float64, device=device)
        self.statistics: CompactStatistics | DenseStatistics = CompactStatistics(empty, empty[:0], empty[:0])
        self.num_classes = 0

    @property
    def is_compact(self) -> bool:
        return isinstance(self.statistics, CompactStatistics)

    def gram(self) -> torch.Tensor:
        """``G`` as a dense [M, M] tensor (built from the compact form when that is how it is held)."""
        return self.statistics.dense()[0]

    def class_sums(self) -> torch.Tensor:
        """``Q`` as a dense [M, classes] tensor."""
        return _with_columns(self.statistics.dense()[1], self.num_classes)

    def add(self, features: torch.Tensor, labels: torch.Tensor, num_classes: int) -> None:
        """Accumulate features ``[n, M]`` with integer labels in ``[0, num_classes)`` (classes seen so far)."""
        if features.dim() != 2 or features.shape[1] != self.dim or len(labels) != len(features):
            raise ValueError(f"ridge features must be [n, {self.dim}] with n labels, "
                             f"got {tuple(features.shape)} and {len(labels)} labels")
        if num_classes < self.num_classes:
            raise ValueError(f"num_classes can only grow: state has {self.num_classes}, got {num_classes}")
        if len(labels) and not 0 <= int(labels.min()) <= int(labels.max()) < num_classes:
            raise ValueError(f"labels must lie in [0, {num_classes}); pass the number of classes seen so far")
        self.num_classes = num_classes
        if not len(features):
            return
        features = features.detach().to(self.device, torch.float64)
        targets = _one_hot(labels.to(self.device), num_classes)
        if self.is_compact and self.statistics.rank + len(features) > self.dim // 4:
            self.statistics = DenseStatistics(*self.statistics.dense())
        self.statistics.add(features, targets)

    def solve(self, lam: float) -> torch.Tensor:
        """``W_o = (G + lam I)^-1 Q`` ([M, classes], float64); logits are ``h @ W_o``."""
        if lam <= 0:
            raise ValueError(f"ridge lambda must be positive, got {lam}")
        return _with_columns(self.statistics.solve(lam), self.num_classes)

    def state_dict(self) -> dict:
        """The live tensors of the form held (at M = 10000 a dense ``G`` is 800 MB)."""
        return {"num_classes": self.num_classes, "form": "compact" if self.is_compact else "dense",
                "tensors": vars(self.statistics)}

    def load_state_dict(self, state: dict) -> None:
        tensors = state["tensors"]
        saved_dim = len(next(iter(tensors.values())))
        if saved_dim != self.dim:
            raise ValueError(f"ridge state is for dimension {saved_dim}, this one has {self.dim}; "
                             "use the same random-projection size as the saved run")
        form = CompactStatistics if state["form"] == "compact" else DenseStatistics
        self.statistics = form(**{name: t.to(self.device, torch.float64).clone() for name, t in tensors.items()})
        self.num_classes = state["num_classes"]


def split_fit_val(features: torch.Tensor, labels: torch.Tensor, fit_fraction: float = 0.8,
                  seed: int = 0) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Shuffle, then the first ``int(n * fit_fraction)`` samples fit and the rest validate.

    RanPAC takes the first 80% of features extracted through a shuffled loader; the explicit,
    seeded shuffle here gives the same kind of random split from features in any order.
    """
    order = torch.randperm(len(features), generator=torch.Generator().manual_seed(seed)).to(features.device)
    num_fit = int(len(features) * fit_fraction)
    if not 0 < num_fit < len(features):
        raise ValueError(f"cannot split {len(features)} samples with fit_fraction={fit_fraction} "
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
        raise ValueError(f"lambda candidates must be a non-empty list of positive numbers, got {lambdas}")
    if criterion not in ("mse", "accuracy"):
        raise ValueError(f"criterion must be 'mse' or 'accuracy', got {criterion!r}")
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
