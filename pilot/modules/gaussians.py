"""Per-class Gaussian statistics of features, and sampling from them (SLCA's classifier alignment)."""
from __future__ import annotations

import torch

COVARIANCE_RIDGE = 1e-4  # added to each class covariance (SLCA's official code), keeps it positive definite


class ClassGaussians:
    """Mean and covariance (+ ridge) of each class's features, float32, classes appended in label order.

    Statistics are computed in float64 from the features given when the class is added, and kept
    unchanged afterwards (the backbone may move on; old classes keep what it was).
    """

    def __init__(self, feature_dim: int) -> None:
        self.means = torch.zeros(0, feature_dim)
        self.covs = torch.zeros(0, feature_dim, feature_dim)

    @property
    def num_classes(self) -> int:
        return self.means.shape[0]

    def add_classes(self, features: torch.Tensor, labels: torch.Tensor, classes: range) -> None:
        means, covs = [], []
        for label in classes:
            rows = features[labels == label].double()
            if len(rows) < 2:
                raise ValueError(f"a class Gaussian needs at least 2 training images per class; class {label} "
                                 f"has {len(rows)}")
            means.append(rows.mean(0))
            covs.append(torch.cov(rows.T) + COVARIANCE_RIDGE * torch.eye(rows.shape[1], dtype=torch.float64))
        self.means = torch.cat([self.means, torch.stack(means).float()])
        self.covs = torch.cat([self.covs, torch.stack(covs).float()])

    def cholesky_factors(self, device: torch.device) -> torch.Tensor:
        """Lower Cholesky factors [classes, D, D] of the covariances (computed in float64)."""
        return torch.linalg.cholesky(self.covs.to(device, torch.float64)).float()

    def sample(self, cholesky_factors: torch.Tensor, per_class: int, mean_scales: torch.Tensor,
               generator: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
        """``per_class`` draws of each class, shuffled, with their labels: x = scale * mean + L z, z ~ N(0, I).

        That is what ``MultivariateNormal(scale * mean, cov).sample()`` draws; noise and order come
        from ``generator``.
        """
        num_classes, dim = self.means.shape
        noise = torch.randn(num_classes, per_class, dim, generator=generator).to(cholesky_factors.device)
        means = (self.means * mean_scales[:, None]).to(cholesky_factors.device)
        samples = means[:, None, :] + noise @ cholesky_factors.transpose(1, 2)
        labels = torch.arange(num_classes).repeat_interleave(per_class)
        order = torch.randperm(len(labels), generator=generator)
        return samples.flatten(0, 1)[order], labels[order]

    def state_dict(self) -> dict[str, torch.Tensor]:
        return {"means": self.means, "covs": self.covs}

    def load_state_dict(self, state: dict[str, torch.Tensor]) -> None:
        self.means, self.covs = state["means"], state["covs"]
