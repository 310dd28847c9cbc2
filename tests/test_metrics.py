import math

import numpy as np
import pytest

from pilot.metrics import AccuracyMatrix

# Three tasks of 10 test images each; counts of correct predictions per step (row) and task (col).
CORRECT = [[9], [6, 8], [5, 7, 10]]
TOTAL = [[10], [10, 10], [10, 10, 10]]


@pytest.fixture
def matrix():
    m = AccuracyMatrix()
    for c, n in zip(CORRECT, TOTAL):
        m.add_step(c, n)
    return m


def test_matrix_is_keyed_by_task(matrix):
    expected = np.array([[90, np.nan, np.nan], [60, 80, np.nan], [50, 70, 100]], dtype=float)
    np.testing.assert_array_equal(matrix.matrix(), expected)


def test_curve_average_and_last(matrix):
    assert matrix.curve() == pytest.approx([90.0, 70.0, 220 / 3])
    assert matrix.average_incremental() == pytest.approx((90 + 70 + 220 / 3) / 3)
    assert matrix.last() == pytest.approx(220 / 3)


def test_forgetting_and_backward_transfer(matrix):
    # f_0 = max(90, 60) - 50 = 40; f_1 = 80 - 70 = 10
    assert matrix.task_forgetting() == pytest.approx([40.0, 10.0])
    assert matrix.forgetting() == pytest.approx(25.0)
    # BWT = ((50 - 90) + (70 - 80)) / 2
    assert matrix.backward_transfer() == pytest.approx(-25.0)
    # after step 1 only task 0 counts: 90 - 60
    assert matrix.forgetting(1) == pytest.approx(30.0)


def test_old_and_new_accuracy(matrix):
    assert math.isnan(matrix.old_accuracy(0))
    assert matrix.new_accuracy(0) == pytest.approx(90.0)
    assert matrix.old_accuracy(2) == pytest.approx(60.0)  # (5 + 7) / 20
    assert matrix.new_accuracy(2) == pytest.approx(100.0)


def test_accuracy_weights_tasks_by_their_test_size():
    m = AccuracyMatrix()
    m.add_step([1], [2])
    m.add_step([1, 30], [2, 40])
    assert m.accuracy(1) == pytest.approx(100 * 31 / 42)


def test_counts_round_trip_and_shape_check(matrix):
    again = AccuracyMatrix(**matrix.to_dict())
    np.testing.assert_array_equal(again.matrix(), matrix.matrix())
    with pytest.raises(ValueError):
        again.add_step([1, 2], [3, 3])
