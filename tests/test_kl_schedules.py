"""Tests for pyro_bbt.kl_schedules."""

import math

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from pyro_bbt.kl_schedules import KL_SCHEDULES, kl_weight, validate_schedule


def _epoch(schedule, m, epoch=0, warmup_epochs=5.0):
    return [kl_weight(schedule, i, m, epoch, warmup_epochs) for i in range(1, m + 1)]


@pytest.mark.parametrize("m", [1, 2, 7, 100])
def test_blundell_sums_to_one_and_matches_the_paper(m):
    weights = _epoch("blundell", m)
    assert sum(weights) == pytest.approx(1.0, abs=1e-12)
    # pi_i = 2^(M-i) / (2^M - 1), computed exactly with integers for these M.
    for i, w in enumerate(weights, start=1):
        assert w == pytest.approx(2 ** (m - i) / (2**m - 1), rel=1e-12)
    assert all(a > b for a, b in zip(weights, weights[1:]))  # strictly decreasing


def test_blundell_single_batch_is_one():
    assert kl_weight("blundell", 1, 1) == 1.0


def test_blundell_is_finite_for_thousands_of_batches():
    m = 5000
    weights = _epoch("blundell", m)
    assert all(math.isfinite(w) and w >= 0 for w in weights)
    assert abs(sum(weights) - 1.0) < 1e-12
    assert weights[0] == pytest.approx(0.5)
    # Strictly decreasing while representable (2^-i is a positive double up to i = 1074), then 0.
    assert all(a > b for a, b in zip(weights[:1074], weights[1:1074]))
    assert all(a >= b for a, b in zip(weights, weights[1:]))
    assert weights[-1] == 0.0


@settings(max_examples=40, deadline=None)
@given(st.integers(min_value=1, max_value=3000))
def test_blundell_sum_property(m):
    weights = _epoch("blundell", m)
    assert all(math.isfinite(w) and w >= 0 for w in weights)
    assert abs(sum(weights) - 1.0) < 1e-12
    head = weights[:1074]  # 2^-i underflows to 0.0 beyond i = 1074
    assert all(a > b for a, b in zip(head, head[1:]))
    assert all(a >= b for a, b in zip(weights, weights[1:]))


@pytest.mark.parametrize("m", [1, 3, 10])
def test_uniform_is_one_over_m(m):
    assert _epoch("uniform", m) == [1.0 / m] * m
    assert sum(_epoch("uniform", m, epoch=4)) == pytest.approx(1.0)


def test_none_is_zero():
    assert _epoch("none", 6) == [0.0] * 6
    assert _epoch("none", 6, epoch=10) == [0.0] * 6


def test_warmup_rises_linearly_from_zero_to_one_over_m():
    m, warmup = 4, 2.0
    ramp = [kl_weight("warmup", i, m, epoch, warmup) for epoch in range(2) for i in range(1, m + 1)]
    assert ramp[0] == 0.0
    # beta goes up by 1 / (M * warmup_epochs) per step, so pi goes up by that over M.
    steps = [b - a for a, b in zip(ramp, ramp[1:])]
    for step in steps:
        assert step == pytest.approx(1.0 / (m * warmup) / m)
    assert ramp[-1] < 1.0 / m
    # After warmup_epochs full epochs it is exactly the uniform weight, and stays there.
    for epoch in (2, 3, 50):
        assert _epoch("warmup", m, epoch, warmup) == pytest.approx([1.0 / m] * m)


def test_warmup_with_fractional_epochs():
    m = 10
    # warmup over half an epoch: beta = (i - 1) / 10 / 0.5, capped at 1 from the 6th minibatch.
    weights = _epoch("warmup", m, 0, 0.5)
    expected = [min(1.0, (i - 1) / m / 0.5) / m for i in range(1, m + 1)]
    assert weights == pytest.approx(expected)
    assert weights[5:] == pytest.approx([0.1] * 5)


@pytest.mark.parametrize("bad", [0.0, -1.0, float("nan")])
def test_warmup_rejects_non_positive_length(bad):
    with pytest.raises(ValueError, match="warmup_epochs"):
        kl_weight("warmup", 1, 3, 0, bad)


def test_bad_schedule_names_raise():
    with pytest.raises(ValueError, match="'blundel'"):
        kl_weight("blundel", 1, 3)
    with pytest.raises(ValueError) as info:
        validate_schedule("Uniform")
    for name in KL_SCHEDULES:
        assert name in str(info.value)
    assert validate_schedule("uniform") == "uniform"


@pytest.mark.parametrize("schedule", KL_SCHEDULES)
@pytest.mark.parametrize("index, m, text", [(0, 3, "batch_index"), (4, 3, "batch_index"), (-1, 3, "batch_index"), (1, 0, "num_batches")])
def test_bad_indices_raise(schedule, index, m, text):
    with pytest.raises(ValueError, match=text):
        kl_weight(schedule, index, m)
