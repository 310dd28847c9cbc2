"""pilot.modules.transport: POT's Sinkhorn-Knopp plan on hand-computed cases, its marginals, POT's handling of an
underflowed kernel, the class-mean cost and the transported rows."""
from __future__ import annotations

import math

import pytest
import torch

from pilot.modules.transport import class_mean_cost, sinkhorn, transport_rows


def test_symmetric_two_by_two_plan_by_hand():
    # cost [[0, 1], [1, 0]], reg 1, masses 1/2: by symmetry the plan is c * K with K = [[1, 1/e], [1/e, 1]]
    # and total mass 1, so c = 1 / (2 + 2/e)
    plan = sinkhorn(torch.tensor([0.5, 0.5]), torch.tensor([0.5, 0.5]), torch.tensor([[0.0, 1.0], [1.0, 0.0]]), 1.0)
    diagonal = 1 / (2 + 2 / math.e)
    expected = torch.tensor([[diagonal, diagonal / math.e], [diagonal / math.e, diagonal]], dtype=torch.float64)
    torch.testing.assert_close(plan, expected, rtol=1e-9, atol=1e-12)
    assert plan.dtype == torch.float64


def test_plan_meets_both_marginals_and_is_a_gibbs_kernel_scaled():
    a, b = torch.tensor([0.7, 0.3], dtype=torch.float64), torch.tensor([0.2, 0.3, 0.5], dtype=torch.float64)
    cost = torch.tensor([[0.0, 2.0, 1.0], [1.5, 0.5, 0.0]])
    plan = sinkhorn(a, b, cost, 0.5)
    torch.testing.assert_close(plan.sum(1), a, rtol=0, atol=1e-9)
    torch.testing.assert_close(plan.sum(0), b, rtol=0, atol=1e-9)
    # plan = diag(u) K diag(v): every 2x2 cross ratio is the kernel's, exp(-(c11 + c22 - c12 - c21) / reg)
    ratio = plan[0, 0] * plan[1, 1] / (plan[0, 1] * plan[1, 0])
    assert float(ratio) == pytest.approx(math.exp(-(0.0 + 0.5 - 2.0 - 1.5) / 0.5), rel=1e-9)


def test_unequal_masses_as_coil_gives_them_meet_the_source_marginal():
    # Coil: 4 old classes at 1/4 each, 2 new classes at 1/4 each: the target mass is half the source's
    a, b = torch.full((4,), 0.25), torch.full((2,), 0.25)
    cost = torch.tensor([[0.1, 0.9], [0.8, 0.2], [0.5, 0.5], [0.3, 0.7]])
    plan = sinkhorn(a, b, cost, 0.464)
    torch.testing.assert_close(plan.sum(1), a.double(), rtol=0, atol=1e-12)  # POT's last update is u's
    assert not torch.allclose(plan.sum(0), b.double())


def test_underflowed_kernel_keeps_the_step_before_as_pot():
    cost = torch.tensor([[30.0, 40.0], [35.0, 30.0]])  # exp(-30 / 0.02) is 0 in float64
    with pytest.warns(UserWarning, match="numerical errors at iteration 0"):
        plan = sinkhorn(torch.tensor([0.5, 0.5]), torch.tensor([0.5, 0.5]), cost, 0.02)
    assert torch.equal(plan, torch.zeros(2, 2, dtype=torch.float64))  # u0 K v0 with K = 0


def test_class_mean_cost_and_transported_rows_by_hand():
    source = torch.tensor([[0.0, 0.0], [1.0, 2.0]])
    target = torch.tensor([[1.0, 0.0]])
    assert class_mean_cost(source, target, p=3).flatten().tolist() == pytest.approx([1.0, 2.0])  # (0 + 8) ** (1/3)
    assert class_mean_cost(source, target).flatten().tolist() == pytest.approx([1.0, 2.0])
    plan = torch.tensor([[0.1, 0.4], [0.3, 0.2]])
    rows = torch.tensor([[1.0, 0.0], [0.0, 2.0]])
    # target class j takes sum_i plan[i, j] * rows[i]
    torch.testing.assert_close(transport_rows(plan, rows), torch.tensor([[0.1, 0.6], [0.4, 0.4]], dtype=torch.float64))


@pytest.mark.parametrize("cost, reg, message", [(torch.zeros(2, 3), 1.0, "cost has shape"),
                                                (torch.zeros(2, 2), 0.0, "reg must be above 0")])
def test_bad_arguments_are_named(cost, reg, message):
    with pytest.raises(ValueError, match=message):
        sinkhorn(torch.tensor([0.5, 0.5]), torch.tensor([0.5, 0.5]), cost, reg)
