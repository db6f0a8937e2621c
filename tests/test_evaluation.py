"""Tests for pyro_bbt.evaluation with hand-computed expected values."""

import math

import pyro
import pytest
import torch
from pyro import poutine

from conftest import fresh_model_and_guide, synthetic_batch
from pyro_bbt.evaluation import (
    PredictiveMetrics,
    evaluate,
    evaluate_accuracy,
    evaluate_posterior_mean,
    expected_calibration_error,
    metrics_from_log_probs,
    predictive_accuracy,
    predictive_log_probs,
    sample_posterior,
)
from pyro_bbt.guides import posterior_loc_scale

pytestmark = pytest.mark.usefixtures("single_torch_thread")

# ----------------------------------------------------------------------------- ECE


def test_ece_is_zero_when_confident_and_always_right():
    probs = torch.tensor([[1.0, 0.0, 0.0], [0.0, 1.0, 0.0], [0.0, 0.0, 1.0]])
    assert expected_calibration_error(probs, torch.tensor([0, 1, 2])) == 0.0


def test_ece_is_zero_when_confidence_matches_accuracy():
    # Confidence 0.75 everywhere, 3 of 4 correct: accuracy 0.75 in that bin.
    probs = torch.tensor([[0.75, 0.25]] * 4)
    labels = torch.tensor([0, 0, 0, 1])
    assert expected_calibration_error(probs, labels) == pytest.approx(0.0, abs=1e-7)


def test_ece_of_over_confident_predictions():
    # Confidence 0.9, half correct: |0.5 - 0.9| = 0.4.
    probs = torch.tensor([[0.9, 0.1]] * 4)
    labels = torch.tensor([0, 1, 0, 1])
    assert expected_calibration_error(probs, labels) == pytest.approx(0.4, abs=1e-6)
    # Two bins: conf 0.95 (1 of 2 right: gap 0.45) and conf 0.6 (2 of 2 right: gap 0.4), half the
    # examples each: ECE = 0.5 * 0.45 + 0.5 * 0.4 = 0.425.
    probs = torch.tensor([[0.95, 0.05, 0.0], [0.95, 0.05, 0.0], [0.6, 0.3, 0.1], [0.1, 0.6, 0.3]])
    labels = torch.tensor([0, 1, 0, 1])
    assert expected_calibration_error(probs, labels) == pytest.approx(0.425, abs=1e-6)


def test_ece_bins_are_closed_on_the_right():
    # With 2 bins, (0, 0.5] and (0.5, 1]: a confidence of exactly 0.5 belongs to the first bin.
    probs = torch.tensor([[0.5, 0.5, 0.0], [0.9, 0.1, 0.0]])
    labels = torch.tensor([0, 0])
    # bin 1: conf 0.5, acc 1 -> 0.5 ; bin 2: conf 0.9, acc 1 -> 0.1 ; each weight 1/2.
    assert expected_calibration_error(probs, labels, num_bins=2) == pytest.approx(0.3, abs=1e-6)
    # That value would also come out of a single bin (|1 - 0.7| = 0.3); this case tells them apart.
    probs = torch.tensor([[0.5, 0.5, 0.0], [0.7, 0.3, 0.0]])
    labels = torch.tensor([0, 1])
    # bin 1: conf 0.5 acc 1 -> 0.5 ; bin 2: conf 0.7 acc 0 -> 0.7 ; ECE = 0.6 (one bin would give 0.1).
    assert expected_calibration_error(probs, labels, num_bins=2) == pytest.approx(0.6, abs=1e-6)


# ----------------------------------------------------------------------------- metrics


def test_metrics_from_log_probs_single_sample_hand_computed():
    p = torch.tensor([[0.7, 0.2, 0.1], [0.2, 0.5, 0.3]], dtype=torch.float64)
    labels = torch.tensor([0, 2])
    m = metrics_from_log_probs(p.log(), labels)
    assert isinstance(m, PredictiveMetrics)
    assert m.accuracy == 0.5  # second example predicts class 1
    assert m.nll == pytest.approx(-(math.log(0.7) + math.log(0.3)) / 2, rel=1e-12)
    brier_1 = 0.3**2 + 0.2**2 + 0.1**2
    brier_2 = 0.2**2 + 0.5**2 + 0.7**2
    assert m.brier == pytest.approx((brier_1 + brier_2) / 2, rel=1e-12)

    def h(q):
        return -sum(v * math.log(v) for v in q)

    assert m.entropy == pytest.approx((h([0.7, 0.2, 0.1]) + h([0.2, 0.5, 0.3])) / 2, rel=1e-12)
    assert m.mutual_information == 0.0
    # ECE: conf 0.7 right (gap 0.3) and conf 0.5 wrong (gap 0.5), different bins -> 0.4.
    assert m.ece == pytest.approx(0.4, rel=1e-9)
    # (N, C) and (1, N, C) inputs mean the same thing.
    assert metrics_from_log_probs(p.log().unsqueeze(0), labels) == m


def test_metrics_average_probabilities_over_samples():
    # Two samples that disagree on one example: the predictive is the mean of the softmaxes.
    s1 = torch.tensor([[0.9, 0.1], [0.6, 0.4]], dtype=torch.float64)
    s2 = torch.tensor([[0.1, 0.9], [0.6, 0.4]], dtype=torch.float64)
    labels = torch.tensor([0, 1])
    m = metrics_from_log_probs(torch.stack([s1, s2]).log(), labels)
    mean1, mean2 = [0.5, 0.5], [0.6, 0.4]

    def h(q):
        return -sum(v * math.log(v) for v in q)

    assert m.nll == pytest.approx(-(math.log(0.5) + math.log(0.4)) / 2, rel=1e-12)
    assert m.entropy == pytest.approx((h(mean1) + h(mean2)) / 2, rel=1e-12)
    mi_1 = h(mean1) - (h([0.9, 0.1]) + h([0.1, 0.9])) / 2
    mi_2 = 0.0  # the samples agree on example 2
    assert m.mutual_information == pytest.approx((mi_1 + mi_2) / 2, rel=1e-12)
    assert m.mutual_information > 0.1
    assert m.brier == pytest.approx(((0.5**2 + 0.5**2) + (0.6**2 + 0.6**2)) / 2, rel=1e-12)


def test_mutual_information_is_zero_when_samples_agree():
    g = torch.Generator().manual_seed(0)
    log_p = torch.log_softmax(torch.randn(5, 3, generator=g), -1)
    m = metrics_from_log_probs(log_p.expand(4, 5, 3), torch.tensor([0, 1, 2, 0, 1]))
    assert m.mutual_information == pytest.approx(0.0, abs=1e-6)
    single = metrics_from_log_probs(log_p, torch.tensor([0, 1, 2, 0, 1]))
    assert m.nll == pytest.approx(single.nll, rel=1e-6)
    assert m.entropy == pytest.approx(single.entropy, rel=1e-6)


# ----------------------------------------------------------------------------- posterior predictive


@pytest.fixture
def fitted_meanfield():
    model, guide = fresh_model_and_guide((20, 16, 3), init_scale=0.2, initialize=True)
    x, y = synthetic_batch(batch=30, features=20)
    return model, guide, x, y


def test_predictive_accuracy_takes_the_mean_and_counts_inactive_labels_wrong():
    """Sample 1 says class 0 at 0.9, sample 2 class 1 at 0.6: the mean says 0 (0.65 against
    0.35), though one sample disagrees; a label 2 with two outputs can never be predicted."""
    s1 = torch.tensor([[0.9, 0.1], [0.2, 0.8], [0.5, 0.5]], dtype=torch.float64)
    s2 = torch.tensor([[0.4, 0.6], [0.3, 0.7], [0.9, 0.1]], dtype=torch.float64)
    log_probs = torch.stack([s1, s2]).log()
    assert predictive_accuracy(log_probs, torch.tensor([0, 1, 0])) == 1.0
    assert predictive_accuracy(log_probs, torch.tensor([1, 1, 2])) == pytest.approx(1 / 3)
    assert predictive_accuracy(s1.log(), torch.tensor([0, 1, 1])) == pytest.approx(2 / 3)  # (N, C): one sample
    assert metrics_from_log_probs(log_probs, torch.tensor([1, 1, 0])).accuracy == predictive_accuracy(log_probs, torch.tensor([1, 1, 0]))


def test_evaluate_accuracy_equals_evaluates_accuracy_with_the_same_draws(fitted_meanfield):
    model, guide, x, y = fitted_meanfield
    pyro.set_rng_seed(1)
    full = evaluate(model, guide, x, y, num_samples=7, batch_size=8)
    pyro.set_rng_seed(1)
    assert evaluate_accuracy(model, guide, x, y, num_samples=7, batch_size=8) == full.accuracy


def test_evaluate_returns_metrics_of_the_right_type(fitted_meanfield):
    model, guide, x, y = fitted_meanfield
    pyro.set_rng_seed(1)
    m = evaluate(model, guide, x, y, num_samples=7, batch_size=8)
    assert isinstance(m, PredictiveMetrics)
    d = m.to_dict()
    assert list(d) == ["accuracy", "nll", "brier", "ece", "entropy", "mutual_information"]
    assert all(type(v) is float and math.isfinite(v) for v in d.values())
    assert 0 <= m.accuracy <= 1 and m.nll > 0 and 0 <= m.brier <= 2 and 0 <= m.ece <= 1
    assert 0 <= m.entropy <= math.log(3) + 1e-6
    assert m.mutual_information > 0  # init_scale 0.2: the samples disagree

    # evaluate is sample_posterior + predictive_log_probs + metrics_from_log_probs.
    pyro.set_rng_seed(1)
    weights = sample_posterior(model, guide, 7, x[:1])
    assert {k: tuple(v.shape) for k, v in weights.items()} == {
        "layers.0.weight": (7, 1, 16, 20),
        "layers.0.bias": (7, 1, 16),
        "layers.1.weight": (7, 1, 3, 16),
        "layers.1.bias": (7, 1, 3),
    }
    log_probs = predictive_log_probs(model, weights, x, batch_size=8)
    assert log_probs.shape == (7, 30, 3)
    torch.testing.assert_close(log_probs.exp().sum(-1), torch.ones(7, 30))
    assert metrics_from_log_probs(log_probs, y) == m
    # Chunking the inputs changes nothing.
    torch.testing.assert_close(predictive_log_probs(model, weights, x, batch_size=1000), log_probs)
    # Evaluation leaves no trace in an enclosing Pyro trace (it is blocked).
    with poutine.trace() as tracer:
        evaluate(model, guide, x, y, num_samples=2)
    assert not [n for n, s in tracer.trace.nodes.items() if s["type"] == "sample"]


def test_predictive_log_probs_per_sample_are_the_networks_softmax(fitted_meanfield):
    model, guide, x, _ = fitted_meanfield
    weights = sample_posterior(model, guide, 3, x[:1])
    log_probs = predictive_log_probs(model, weights, x)
    for s in range(3):
        w = {k: v[s, 0] for k, v in weights.items()}
        h = torch.relu(x @ w["layers.0.weight"].T + w["layers.0.bias"])
        expected = torch.log_softmax(h @ w["layers.1.weight"].T + w["layers.1.bias"], -1)
        torch.testing.assert_close(log_probs[s], expected, rtol=1e-5, atol=1e-5)


def test_evaluate_posterior_mean_uses_the_locations(fitted_meanfield):
    model, guide, x, y = fitted_meanfield
    means = {k: loc for k, (loc, _) in posterior_loc_scale(guide, model).items()}
    log_probs = predictive_log_probs(model, means, x)
    assert log_probs.shape == (30, 3)
    m = evaluate_posterior_mean(model, guide, x, y)
    assert m == metrics_from_log_probs(log_probs, y)
    assert m.mutual_information == 0.0


def test_delta_guide_samples_agree_so_mutual_information_is_zero():
    model, guide = fresh_model_and_guide((20, 16, 3), "delta")
    x, y = synthetic_batch(batch=30, features=20)
    with poutine.block():
        guide(x, y, 30)
    m = evaluate(model, guide, x, y, num_samples=5)
    assert m.mutual_information == pytest.approx(0.0, abs=1e-6)
    mean_metrics = evaluate_posterior_mean(model, guide, x, y)
    assert m.accuracy == mean_metrics.accuracy
    assert m.nll == pytest.approx(mean_metrics.nll, rel=1e-5)


def test_sample_posterior_rejects_zero_samples(fitted_meanfield):
    model, guide, x, _ = fitted_meanfield
    with pytest.raises(ValueError, match="num_samples"):
        sample_posterior(model, guide, 0, x)
