import numpy as np
import pytest

from pilot.data.datasets import make_synthetic
from pilot.data.stream import TaskStream, class_order, first_per_class, task_sizes
from pilot.errors import PilotError


@pytest.mark.parametrize("seed", [1993, 0, 42])
def test_class_order_matches_numpy_legacy_permutation(seed):
    np.random.seed(seed)
    expected = np.random.permutation(100).tolist()
    assert class_order(100, shuffle=True, seed=seed) == expected


def test_class_order_1993_first_classes():
    # PILOT's CIFAR-100 order for seed 1993 starts with these classes.
    assert class_order(100, True, 1993)[:5] == [68, 56, 78, 8, 23]


def test_unshuffled_order_is_identity():
    assert class_order(7, shuffle=False, seed=3) == list(range(7))


@pytest.mark.parametrize("n, init, inc, expected", [
    (100, 10, 10, [10] * 10),
    (100, 50, 10, [50, 10, 10, 10, 10, 10]),
    (100, 0 + 5, 5, [5] * 20),
    (10, 4, 4, [4, 4, 2]),
    (10, 10, 3, [10]),
])
def test_task_sizes(n, init, inc, expected):
    assert task_sizes(n, init, inc) == expected


def test_init_cls_larger_than_dataset_is_an_error():
    with pytest.raises(PilotError, match="init_cls is 11 but the dataset has only 10 classes"):
        task_sizes(10, 11, 1)


def test_first_per_class_keeps_dataset_order():
    labels = np.array([2, 0, 2, 1, 0, 2, 0])
    assert first_per_class(labels, 2).tolist() == [0, 1, 2, 3, 4]
    assert first_per_class(labels, 0).tolist() == list(range(7))


def test_stream_relabels_and_splits_by_order():
    data = make_synthetic(num_classes=6, per_class=4, size=8)
    stream = TaskStream(data, init_cls=2, increment=2, shuffle=True, seed=5, train_per_class=3, test_per_class=1)
    order = class_order(6, True, 5)
    assert len(stream) == 3
    for task in stream.tasks:
        assert task.classes == range(2 * task.index, 2 * task.index + 2)
        assert len(task.train) == 2 * 3 and len(task.test) == 2 * 1
        # A task's images are exactly those of its classes in the order, relabelled by position.
        original = data.train.labels[task.train.indices]
        assert set(original) == {order[c] for c in task.classes}
        assert all(order[new] == old for new, old in zip(task.train.labels, original))


def test_max_tasks_stops_early():
    data = make_synthetic(num_classes=6, per_class=2, size=8)
    stream = TaskStream(data, 2, 2, True, 0, max_tasks=2)
    assert stream.sizes == [2, 2] and len(stream) == 2 and stream.num_classes == 4
