"""Per-class Gaussian statistics of features: sampling from them (SLCA's classifier alignment), and
Mahalanobis distances under them (FeCAM)."""
from __future__ import annotations

import torch
import torch.nn.functional as F

COVARIANCE_RIDGE = 1e-4  # added to each class covariance (SLCA's official code), keeps it positive definite
DISTANCE_CHUNK = 256  # images per distance computation: bounds the [images, classes, dim] intermediate
PILOT_FECAM_RIDGE = 100.0  # PILOT's FeCAM adds 100·I before its corrcoef (``self.alpha``, hard-coded)


class ClassGaussians:
    """Gaussians of class features, float32, appended in label order: one per class (mean, covariance +
    ridge), or several per class (MOS's multi-centroid statistics, diagonal); ``owners`` gives each
    Gaussian's class.

    Statistics are computed in float64 from the features given when the class is added, and kept
    unchanged afterwards (the backbone may move on; old classes keep what it was). ``diagonal``
    keeps the variances only (MOS's "variance" storage).
    """

    def __init__(self, feature_dim: int, diagonal: bool = False) -> None:
        self.diagonal = diagonal
        self.means = torch.zeros(0, feature_dim)
        self.covs = torch.zeros(0, feature_dim, feature_dim)
        self.owners = torch.zeros(0, dtype=torch.long)

    @property
    def num_classes(self) -> int:
        return self.means.shape[0]

    def _append(self, means: list[torch.Tensor], covs: list[torch.Tensor], owners: list[int]) -> None:
        covs = [cov.diagonal().diag() for cov in covs] if self.diagonal else covs
        self.means = torch.cat([self.means, torch.stack(means).float()])
        self.covs = torch.cat([self.covs, torch.stack(covs).float()])
        self.owners = torch.cat([self.owners, torch.as_tensor(owners, dtype=torch.long)])

    def add_classes(self, features: torch.Tensor, labels: torch.Tensor, classes: range) -> None:
        means, covs = [], []
        for label in classes:
            rows = features[labels == label].double()
            if len(rows) < 2:
                raise ValueError(f"a class Gaussian needs at least 2 training images per class; class {label} "
                                 f"has {len(rows)}")
            means.append(rows.mean(0))
            covs.append(torch.cov(rows.T) + COVARIANCE_RIDGE * torch.eye(rows.shape[1], dtype=torch.float64))
        self._append(means, covs, list(classes))

    def add_centroids(self, features: torch.Tensor, labels: torch.Tensor, classes: range, centroids: int,
                      generator: torch.Generator) -> None:
        """MOS's "multi-centroid" storage: k-means (``centroids`` clusters) of each class's features, and per
        cluster its mean and variances (+ ridge); clusters without spread (a single image) are dropped."""
        means, covs, owners = [], [], []
        for label in classes:
            rows = features[labels == label].double()
            assignment = kmeans(rows, centroids, generator)
            for cluster in assignment.unique():
                members = rows[assignment == cluster]
                variance = members.var(0, unbiased=False)
                if variance.mean() == 0:
                    continue
                means.append(members.mean(0))
                covs.append((variance + COVARIANCE_RIDGE).diag())
                owners.append(label)
        self._append(means, covs, owners)

    def cholesky_factors(self, device: torch.device) -> torch.Tensor:
        """Lower Cholesky factors [classes, D, D] of the covariances (computed in float64)."""
        return torch.linalg.cholesky(self.covs.to(device, torch.float64)).float()

    def sample(self, cholesky_factors: torch.Tensor, per_class: int, mean_scales: torch.Tensor,
               generator: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
        """``per_class`` draws of each Gaussian, shuffled, with their classes: x = scale * mean + L z, z ~ N(0, I).

        That is what ``MultivariateNormal(scale * mean, cov).sample()`` draws; noise and order come
        from ``generator``.
        """
        num_classes, dim = self.means.shape
        noise = torch.randn(num_classes, per_class, dim, generator=generator).to(cholesky_factors.device)
        means = (self.means * mean_scales[:, None]).to(cholesky_factors.device)
        samples = means[:, None, :] + noise @ cholesky_factors.transpose(1, 2)
        labels = self.owners.repeat_interleave(per_class)
        order = torch.randperm(len(labels), generator=generator)
        return samples.flatten(0, 1)[order], labels[order]

    def state_dict(self) -> dict[str, torch.Tensor]:
        return {"means": self.means, "covs": self.covs, "owners": self.owners}

    def load_state_dict(self, state: dict[str, torch.Tensor]) -> None:
        self.means, self.covs, self.owners = state["means"], state["covs"], state["owners"]


def kmeans(points: torch.Tensor, clusters: int, generator: torch.Generator, iterations: int = 300) -> torch.Tensor:
    """Cluster index of each point: k-means++ seeding, then Lloyd's iterations until no point moves (as
    scikit-learn's ``KMeans``, which MOS calls, with one initialisation)."""
    centres = points[torch.randint(len(points), (1,), generator=generator)]
    while len(centres) < clusters:
        nearest = torch.cdist(points, centres).min(1).values.pow(2)
        if nearest.sum() == 0:  # fewer distinct points than clusters
            break
        centres = torch.cat([centres, points[torch.multinomial(nearest / nearest.sum(), 1, generator=generator)]])
    assignment = torch.cdist(points, centres).argmin(1)
    for _ in range(iterations):
        centres = torch.stack([points[assignment == c].mean(0) if (assignment == c).any() else centre
                               for c, centre in enumerate(centres)])
        moved = torch.cdist(points, centres).argmin(1)
        if torch.equal(moved, assignment):
            break
        assignment = moved
    return assignment


# ---------------------------------------------------------------------------------------------
# FeCAM: Mahalanobis distance to class means under shrunk, normalised class covariances
# ---------------------------------------------------------------------------------------------


def shrink_covariance(cov: torch.Tensor, gamma1: float, gamma2: float) -> torch.Tensor:
    """FeCAM's shrinkage: Σ + γ1·mean(diag Σ)·I + γ2·mean(offdiag Σ)·(11ᵀ − I) (official ``shrink_cov``;
    its mean over the off-diagonal skips exact zeros, as here)."""
    identity = torch.eye(cov.shape[0], dtype=cov.dtype, device=cov.device)
    off_diagonal = cov * (1 - identity)
    nonzero = off_diagonal != 0
    off_mean = off_diagonal.sum() / nonzero.sum().clamp(min=1)
    return cov + gamma1 * cov.diagonal().mean() * identity + gamma2 * off_mean * (1 - identity)


def normalise_covariance(cov: torch.Tensor) -> torch.Tensor:
    """Σ_ij / (σ_i σ_j): FeCAM's ``normalize_cov`` (unit diagonal, so classes of different spread compare)."""
    scale = cov.diagonal().sqrt()
    return cov / (scale[:, None] * scale[None, :])


def tukey(features: torch.Tensor, beta: float) -> torch.Tensor:
    """Tukey's ladder of powers: x^β (log x for β = 0); defined for non-negative features only."""
    if (features < 0).any():
        raise ValueError("Tukey's power transform needs non-negative features (the FeCAM paper's ResNet features "
                         "after ReLU); these have negative values (a ViT's [CLS] output is signed)")
    return features.log() if beta == 0 else features.pow(beta)


class MahalanobisClassifier:
    """FeCAM (Goswami et al., NeurIPS 2023), as its official ViT code (``FeCAM_vit_cifar100.py``):
    features are L2-normalised (then Tukey-transformed if ``tukey_beta`` is set); each class keeps its
    mean and the pseudo-inverse of its covariance, shrunk once and normalised; logits are minus the
    squared Mahalanobis distance ``(x − μ_c)ᵀ Σ_c⁺ (x − μ_c)``.

    ``pilot_covariance`` gives PILOT's ``models/fecam.py`` instead: covariance of the raw features plus
    100·I, then ``torch.corrcoef`` of that matrix (correlations between its rows), with x and μ each
    L2-normalised only inside the distance.
    """

    def __init__(self, feature_dim: int, gamma1: float = 1.0, gamma2: float = 0.0, normalise: bool = True,
                 tukey_beta: float | None = None, pilot_covariance: bool = False) -> None:
        self.gamma1, self.gamma2, self.normalise = gamma1, gamma2, normalise
        self.tukey_beta, self.pilot_covariance = tukey_beta, pilot_covariance
        self.means = torch.zeros(0, feature_dim)
        self.precisions = torch.zeros(0, feature_dim, feature_dim)

    def transform(self, features: torch.Tensor) -> torch.Tensor:
        if self.pilot_covariance:
            return features
        features = F.normalize(features.double(), dim=1)
        return features if self.tukey_beta is None else tukey(features, self.tukey_beta)

    def covariance(self, rows: torch.Tensor) -> torch.Tensor:
        cov = torch.cov(rows.T)
        if self.pilot_covariance:
            return torch.corrcoef(cov + PILOT_FECAM_RIDGE * torch.eye(cov.shape[0], dtype=cov.dtype))
        cov = shrink_covariance(cov, self.gamma1, self.gamma2)
        return normalise_covariance(cov) if self.normalise else cov

    def add_classes(self, features: torch.Tensor, labels: torch.Tensor, classes: range) -> None:
        features = self.transform(features.double())
        means, precisions = [], []
        for label in classes:
            rows = features[labels == label]
            if len(rows) < 2:
                raise ValueError(f"a class covariance needs at least 2 training images per class; class {label} "
                                 f"has {len(rows)}")
            means.append(rows.mean(0))
            precisions.append(torch.linalg.pinv(self.covariance(rows), hermitian=True))
        self.means = torch.cat([self.means, torch.stack(means).float()])
        self.precisions = torch.cat([self.precisions, torch.stack(precisions).float()])

    def __call__(self, features: torch.Tensor) -> torch.Tensor:
        features, means = self.transform(features).float(), self.means
        if self.pilot_covariance:
            features, means = F.normalize(features, dim=1), F.normalize(means, dim=1)
        return torch.cat([-self.distances(chunk, means) for chunk in features.split(DISTANCE_CHUNK)])

    def distances(self, features: torch.Tensor, means: torch.Tensor) -> torch.Tensor:
        differences = features[:, None, :] - means[None, :, :]  # [N, C, D]
        projected = torch.einsum("ncd,cde->nce", differences, self.precisions)
        return (projected * differences).sum(-1)

    def state_dict(self) -> dict[str, torch.Tensor]:
        return {"means": self.means, "precisions": self.precisions}

    def load_state_dict(self, state: dict[str, torch.Tensor]) -> None:
        self.means, self.precisions = state["means"], state["precisions"]
