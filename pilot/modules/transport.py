"""Optimal transport between two sets of classes (Coil's co-transport, DUCT's classifier consolidation).

``sinkhorn`` is POT's ``ot.sinkhorn`` (method "sinkhorn", Sinkhorn-Knopp), which LAMDA-PILOT's ``coil.py``
and ``duct.py`` call, computed the same way in float64 so that a plan matches POT's step for step (POT is
not a dependency). ``class_mean_cost`` is the cost both methods build: the pairwise Minkowski distance of
class means. ``transport_rows`` moves classifier rows along a plan.
"""
from __future__ import annotations

import warnings

import torch


def sinkhorn(source_mass: torch.Tensor, target_mass: torch.Tensor, cost: torch.Tensor, reg: float,
             max_iterations: int = 1000, stop_threshold: float = 1e-9) -> torch.Tensor:
    """The entropic transport plan ``[len(source_mass), len(target_mass)]`` of POT's ``sinkhorn_knopp``
    (its defaults: 1000 iterations, stop at 1e-9), float64.

    With ``K = exp(-cost / reg)`` and ``u``, ``v`` starting at ``1/n``, ``1/m``, each iteration sets
    ``v = b / (Kᵀu)`` and then ``u = a / (K v)``; every tenth iteration stops once the plan's column sums
    are within ``stop_threshold`` (L2) of ``b``. The plan is ``diag(u) K diag(v)``: its row sums are ``a``,
    its column sums ``b`` where the two masses are equal (Coil's are not: its plan meets ``a`` only). A step
    that divides by zero or gives NaN/inf (every ``K`` entry of a column underflowed, as a cost far above
    ``reg`` makes it, or masses of different totals after enough iterations) is undone and the iteration stops
    there, with a warning, as POT does.
    """
    if cost.shape != (len(source_mass), len(target_mass)):
        raise ValueError(f"sinkhorn: cost has shape {tuple(cost.shape)}, masses have {len(source_mass)} and "
                         f"{len(target_mass)} entries")
    if reg <= 0:
        raise ValueError(f"sinkhorn: reg must be above 0, got {reg}")
    a, b, K = source_mass.double(), target_mass.double(), torch.exp(cost.double() / -reg)
    u = torch.full_like(a, 1.0 / len(a))
    v = torch.full_like(b, 1.0 / len(b))
    scaled = K / a[:, None]
    for iteration in range(max_iterations):
        previous = u, v
        column = K.T @ u
        v = b / column
        u = 1.0 / (scaled @ v)
        if bool((column == 0).any()) or not (bool(torch.isfinite(u).all()) and bool(torch.isfinite(v).all())):
            warnings.warn(f"sinkhorn: numerical errors at iteration {iteration} (a scaling reached 0 or inf: exp(-cost "
                          f"/ reg) underflowed, costs up to {float(cost.max()):.3g} at reg {reg}, or the two masses' "
                          f"totals differ, {float(a.sum()):.3g} and {float(b.sum()):.3g}); the plan is that of the step "
                          f"before, as POT's.", stacklevel=2)
            u, v = previous
            break
        if iteration % 10 == 0 and float(torch.linalg.norm(torch.einsum("i,ij,j->j", u, K, v) - b)) < stop_threshold:
            break
    return u[:, None] * K * v[None, :]


def class_mean_cost(source_means: torch.Tensor, target_means: torch.Tensor, p: float = 2.0) -> torch.Tensor:
    """``[source classes, target classes]`` Minkowski-``p`` distances between class means, float64 (Coil:
    ``norm_term`` 3 on L2-normalised means; DUCT: 2 on the pre-trained network's raw means)."""
    return torch.cdist(source_means.double(), target_means.double(), p=p)


def transport_rows(plan: torch.Tensor, rows: torch.Tensor) -> torch.Tensor:
    """Rows of the plan's target classes as the plan's mixture of the source classes' ``rows``:
    ``planᵀ @ rows`` (``[target classes, D]``, float64). A plan whose masses are 1/n carries 1/n of a row's
    weight: PILOT's Coil multiplies back by the class count, DUCT does not."""
    return plan.T.double() @ rows.double()
