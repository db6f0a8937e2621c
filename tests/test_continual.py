"""Tests for pyro_bbt.continual with hand-computed expected values."""

import json
import math

import numpy as np
import pytest

from pyro_bbt.continual import (
    ContinualSummary,
    average_accuracy,
    average_forgetting,
    backward_transfer,
    forgetting,
    forward_transfer,
    summarize,
    validate_accuracy_matrix,
)

# 2 tasks. Row i = after training task i.
#   R = [[0.90, 0.10],
#        [0.60, 0.95]]
# ACC  = (0.60 + 0.95) / 2            = 0.775
# BWT  = (R[1,0] - R[0,0]) / 1        = 0.60 - 0.90 = -0.30
# FWT  (b = [0.1, 0.2]) = R[0,1] - b[1] = 0.10 - 0.20 = -0.10
# f_0  = max(R[0,0]) - R[1,0]          = 0.90 - 0.60 = 0.30 ; avg = 0.30
R2 = [[0.90, 0.10], [0.60, 0.95]]

# 3 tasks.
#   R = [[0.80, 0.30, 0.20],
#        [0.70, 0.90, 0.40],
#        [0.75, 0.60, 0.85]]
# ACC = (0.75 + 0.60 + 0.85) / 3 = 2.20 / 3 = 0.7333...
# BWT = ((0.75 - 0.80) + (0.60 - 0.90)) / 2 = (-0.05 - 0.30) / 2 = -0.175
# FWT (b = [0.1, 0.1, 0.1]) = ((R[0,1] - 0.1) + (R[1,2] - 0.1)) / 2
#     = (0.20 + 0.30) / 2 = 0.25
# f_0 = max(0.80, 0.70) - 0.75 = 0.05
# f_1 = max(0.30, 0.90) - 0.60 = 0.30
# avg forgetting = 0.35 / 2 = 0.175
R3 = np.array([[0.80, 0.30, 0.20], [0.70, 0.90, 0.40], [0.75, 0.60, 0.85]])


def test_two_task_metrics() -> None:
    assert average_accuracy(R2) == pytest.approx(0.775)
    assert backward_transfer(R2) == pytest.approx(-0.30)
    assert forward_transfer(R2, [0.1, 0.2]) == pytest.approx(-0.10)
    np.testing.assert_allclose(forgetting(R2), [0.30])
    assert average_forgetting(R2) == pytest.approx(0.30)


def test_three_task_metrics() -> None:
    assert average_accuracy(R3) == pytest.approx(2.2 / 3)
    assert backward_transfer(R3) == pytest.approx(-0.175)
    assert forward_transfer(R3, np.full(3, 0.1)) == pytest.approx(0.25)
    np.testing.assert_allclose(forgetting(R3), [0.05, 0.30])
    assert average_forgetting(R3) == pytest.approx(0.175)


def test_positive_backward_transfer_gives_negative_forgetting() -> None:
    # R = [[0.5, 0.0], [0.7, 0.9]]: BWT = 0.7 - 0.5 = +0.2; f_0 = 0.5 - 0.7 = -0.2
    R = [[0.5, 0.0], [0.7, 0.9]]
    assert backward_transfer(R) == pytest.approx(0.2)
    np.testing.assert_allclose(forgetting(R), [-0.2])


def test_summarize_and_to_dict() -> None:
    s = summarize(R3, baseline=[0.1, 0.1, 0.1])
    assert isinstance(s, ContinualSummary)
    d = s.to_dict()
    assert d["average_accuracy"] == pytest.approx(2.2 / 3)
    assert d["backward_transfer"] == pytest.approx(-0.175)
    assert d["forward_transfer"] == pytest.approx(0.25)
    assert d["average_forgetting"] == pytest.approx(0.175)
    assert d["forgetting"] == pytest.approx([0.05, 0.30])
    json.dumps(d)  # serialisable
    assert summarize(R2).forward_transfer is None


@pytest.mark.parametrize(
    "bad, match",
    [
        ([[0.5, 0.5, 0.5], [0.5, 0.5, 0.5]], r"\(2, 3\)"),  # non-square
        ([[0.5]], r"T >= 2"),  # single task
        ([0.5, 0.5], r"\(2,\)"),  # 1-D
        ([[0.5, 1.2], [0.5, 0.5]], r"1\.2"),  # > 1
        ([[0.5, 0.5], [-0.1, 0.5]], r"-0\.1"),  # < 0
        ([[0.5, math.nan], [0.5, 0.5]], r"NaN"),
    ],
)
def test_invalid_matrices_raise(bad, match) -> None:
    with pytest.raises(ValueError, match=match):
        validate_accuracy_matrix(bad)
    with pytest.raises(ValueError):
        summarize(bad)


def test_bad_baseline_raises() -> None:
    with pytest.raises(ValueError, match="baseline"):
        forward_transfer(R3, [0.1, 0.1])
