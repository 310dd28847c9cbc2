"""The protocol's class -> task map, also for tasks that add no class (a domain stream's later domains)."""
import pytest
import torch

from pilot.context import Protocol


@pytest.mark.parametrize("sizes, tasks", [
    ((4, 2, 2, 2), [0, 0, 0, 0, 1, 1, 2, 2, 3, 3]),
    ((4, 0, 0), [0, 0, 0, 0]),  # domain-incremental: every class comes with the first task
    ((2, 0, 2), [0, 0, 2, 2]),
])
def test_task_of_each_class_is_the_task_that_introduced_it(sizes, tasks):
    assert Protocol(sizes, len(sizes)).task_of(torch.arange(sum(sizes))).tolist() == tasks


def test_tasks_within_end_at_the_task_of_the_last_class_seen():
    assert Protocol((4, 2, 2, 2), 4).tasks_within(0) == []
    assert Protocol((4, 2, 2, 2), 4).tasks_within(6) == [range(0, 4), range(4, 6)]
    assert Protocol((4, 0, 0), 3).tasks_within(4) == [range(0, 4)]  # the later domains may not have come yet
    assert Protocol((2, 0, 2), 3).tasks_within(4) == [range(0, 2), range(2, 2), range(2, 4)]
