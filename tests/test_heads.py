"""Head initialisation: one switch draws every learner's head as its method's code does."""
import math
import warnings

import pytest
import torch
from torch import nn

from pilot.modules.heads import CosineHead, classify, linear_head, task_heads


def drawn_by_hand(init: str) -> nn.Linear:
    """What the learners drew before the switch was shared, written out."""
    head = nn.Linear(8, 5)
    if init == "trunc_normal":
        nn.init.trunc_normal_(head.weight, std=0.02)
    elif init == "normal":
        nn.init.normal_(head.weight, std=0.001)
    elif init == "kaiming":
        nn.init.kaiming_uniform_(head.weight, nonlinearity="linear")
    if init != "torch":
        nn.init.zeros_(head.bias)
    return head


@pytest.mark.parametrize("init, std", [("trunc_normal", 0.02), ("normal", 0.001), ("kaiming", 0.02), ("torch", 0.02)])
def test_linear_heads_draw_what_each_methods_code_draws(init, std):
    torch.manual_seed(0)
    expected = drawn_by_hand(init)
    torch.manual_seed(0)
    head = linear_head(8, 5, init, std)
    assert torch.equal(head.weight, expected.weight) and torch.equal(head.bias, expected.bias)


def test_cosine_head_draws_pilots_cosine_linear_init():
    torch.manual_seed(0)
    bound = 1 / math.sqrt(8)
    expected = torch.empty(5, 8).uniform_(-bound, bound)
    torch.manual_seed(0)
    assert torch.equal(CosineHead(8, 5).weight, expected)


def test_task_heads_draw_in_the_order_of_earlier_runs():
    torch.manual_seed(0)
    expected = nn.ModuleList(nn.Linear(8, size) for size in (3, 2))  # all built, then all drawn
    for head in expected:
        nn.init.trunc_normal_(head.weight, std=0.02)
    torch.manual_seed(0)
    heads = task_heads(8, (3, 2))
    assert all(torch.equal(a.weight, b.weight) for a, b in zip(heads, expected))


@pytest.mark.parametrize("init", ["trunc_normal", "kaiming"])
def test_zero_width_heads_of_tasks_without_new_classes_build_silently(init):
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        heads = task_heads(8, (3, 0, 0), init)
        assert CosineHead(8, 0).weight.shape == (0, 8)
        assert linear_head(8, 0, "torch").weight.shape == (0, 8)
    assert classify(heads, torch.randn(2, 8)).shape == (2, 3)
