"""Transferability estimators: how well a pre-trained model's frozen features suit a labelled task,
from one forward pass over its images (no training). Each takes features ``[n, D]`` and integer labels
``[n]`` (LEEP: the source model's class probabilities instead of features); higher is better.
"""
from __future__ import annotations

import math

import torch

EPSILON = 1e-12


def logme(features: torch.Tensor, labels: torch.Tensor, iterations: int = 100, tolerance: float = 1e-4) -> float:
    """LogME (You et al., "LogME: Practical Assessment of Pre-trained Models for Transfer Learning",
    ICML 2021): the log evidence per sample of a Bayesian linear model from features to each class's
    one-hot target, prior precision ``alpha`` and noise precision ``beta`` set by MacKay's fixed-point
    iteration (the paper's Algorithm 1), averaged over classes.

    With ``F^T F = V diag(s) V^T``: ``gamma = sum(beta s / (alpha + beta s))``, ``m = beta A^-1 F^T y``
    with ``A = alpha I + beta F^T F``, ``alpha = gamma / m^T m``, ``beta = (n - gamma) / |F m - y|^2``;
    the evidence is ``n/2 log beta + D/2 log alpha - n/2 log 2 pi - beta/2 |F m - y|^2 - alpha/2 m^T m
    - 1/2 log |A|``.
    """
    f = features.double()
    n, dim = f.shape
    s, v = torch.linalg.eigh(f.T @ f)
    s = s.clamp(min=0)
    evidences = []
    for label in labels.unique():
        y = (labels == label).double()
        projected = v.T @ (f.T @ y)  # V^T F^T y
        alpha, beta = 1.0, 1.0
        for _ in range(iterations):
            gamma = (beta * s / (alpha + beta * s)).sum()
            m = v @ (beta * projected / (alpha + beta * s))
            residual = ((f @ m - y) ** 2).sum()
            alpha_next = float(gamma / ((m * m).sum() + EPSILON))
            beta_next = float((n - gamma) / (residual + EPSILON))
            converged = abs(alpha_next / beta_next - alpha / beta) <= tolerance * alpha / beta
            alpha, beta = alpha_next, beta_next
            if converged:
                break
        m = v @ (beta * projected / (alpha + beta * s))
        residual = ((f @ m - y) ** 2).sum()
        evidence = (n / 2 * math.log(beta) + dim / 2 * math.log(alpha) - n / 2 * math.log(2 * math.pi)
                    - beta / 2 * residual - alpha / 2 * (m * m).sum() - torch.log(alpha + beta * s).sum() / 2)
        evidences.append(float(evidence) / n)
    return sum(evidences) / len(evidences)


def h_score(features: torch.Tensor, labels: torch.Tensor) -> float:
    """H-score (Bao et al., "An Information-Theoretic Approach to Transferability in Task Transfer
    Learning", ICIP 2019): ``tr(cov(f)^+ cov(E[f | y]))``, how much of the features' variance lies
    between the class means (the pseudo-inverse keeps it defined where ``cov(f)`` is singular)."""
    f = features.double()
    f = f - f.mean(0)
    means = torch.zeros_like(f)
    for label in labels.unique():
        members = labels == label
        means[members] = f[members].mean(0)
    cov_f = f.T @ f / (len(f) - 1)
    cov_means = means.T @ means / (len(f) - 1)
    return float(torch.trace(torch.linalg.pinv(cov_f, hermitian=True) @ cov_means))


def ncm_accuracy(features: torch.Tensor, labels: torch.Tensor) -> float:
    """Leave-one-out accuracy (%) of the nearest class mean by cosine similarity (SimpleCIL's classifier,
    Zhou et al., "Revisiting Class-Incremental Learning with Pre-Trained Models", IJCV 2024): each image
    is classified by the class means of all the other images, its own left out. An image whose class
    has no other image counts as wrong."""
    f = features.double()
    classes, index = labels.unique(return_inverse=True)
    sums = torch.zeros(len(classes), f.shape[1], dtype=f.dtype).index_add_(0, index, f)
    counts = torch.bincount(index, minlength=len(classes)).double()
    similarity = torch.nn.functional.normalize(f, dim=1) @ torch.nn.functional.normalize(sums / counts[:, None], dim=1).T
    own = sums[index] - f  # each image's class mean without it
    own_similarity = torch.nn.functional.cosine_similarity(f, own / (counts[index] - 1).clamp(min=1)[:, None], dim=1)
    own_similarity[counts[index] == 1] = -math.inf
    similarity[torch.arange(len(f)), index] = own_similarity
    return float(100.0 * (similarity.argmax(1) == index).double().mean())


def leep(source_probabilities: torch.Tensor, labels: torch.Tensor) -> float:
    """LEEP (Nguyen et al., "LEEP: A New Measure to Evaluate Transferability of Learned
    Representations", ICML 2020): with ``theta(x)`` the source model's class distribution, the empirical
    joint ``P(y, z) = 1/n sum_{i: y_i = y} theta(x_i)_z`` gives ``P(y | z) = P(y, z) / P(z)``, and LEEP is
    ``1/n sum_i log sum_z P(y_i | z) theta(x_i)_z``, the mean log-likelihood of the expected empirical
    predictor."""
    theta = source_probabilities.double()
    _, index = labels.unique(return_inverse=True)
    joint = torch.zeros(int(index.max()) + 1, theta.shape[1], dtype=theta.dtype).index_add_(0, index, theta) / len(theta)
    conditional = joint / joint.sum(0, keepdim=True).clamp(min=EPSILON)  # P(y | z)
    return float(torch.log((theta @ conditional.T)[torch.arange(len(theta)), index]).mean())


def kendall_tau(first: list[float], second: list[float]) -> float:
    """Kendall's rank correlation tau-b of two scorings of the same items (ties counted as neither)."""
    concordant = discordant = ties_first = ties_second = 0
    for i in range(len(first)):
        for j in range(i + 1, len(first)):
            a, b = (first[i] > first[j]) - (first[i] < first[j]), (second[i] > second[j]) - (second[i] < second[j])
            concordant += a * b > 0
            discordant += a * b < 0
            ties_first += a == 0 and b != 0
            ties_second += b == 0 and a != 0
    denominator = math.sqrt((concordant + discordant + ties_first) * (concordant + discordant + ties_second))
    return (concordant - discordant) / denominator if denominator else float("nan")


ESTIMATORS = {"logme": logme, "h_score": h_score, "ncm_accuracy": ncm_accuracy}
