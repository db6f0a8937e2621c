"""Posterior-predictive evaluation.

With ``S`` weight samples ``w_s ~ q(w)`` the predictive distribution of an input ``x`` is
``p(y | x) ~= (1/S) sum_s softmax(f(x; w_s))`` (the mean of the softmax, not the softmax of the
mean logits). The weights are sampled once, under a plate of size ``S``, and every batch of
inputs is pushed through all ``S`` networks at once with a batched matmul.

Metrics on labelled data (all means over examples):

* ``accuracy``: ``argmax_c p(c | x) == y``;
* ``nll``: ``-log p(y | x)``;
* ``brier``: ``sum_c (p(c | x) - [c == y])^2``;
* ``ece``: expected calibration error with 15 equal-width confidence bins,
  ``sum_b (n_b / n) |acc_b - conf_b|`` (Guo et al. 2017);
* ``entropy``: predictive entropy ``H[p(. | x)]``;
* ``mutual_information``: ``H[p(. | x)] - (1/S) sum_s H[p(. | x, w_s)]``, the epistemic part.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass

import pyro
import torch
from pyro import poutine

from .guides import posterior_loc_scale
from .model import BayesianMLP

__all__ = [
    "PredictiveMetrics",
    "sample_posterior",
    "predictive_log_probs",
    "evaluate",
    "evaluate_posterior_mean",
    "expected_calibration_error",
    "metrics_from_log_probs",
]


@dataclass
class PredictiveMetrics:
    accuracy: float
    nll: float
    brier: float
    ece: float
    entropy: float
    mutual_information: float

    def to_dict(self) -> dict[str, float]:
        return asdict(self)


@torch.no_grad()
def sample_posterior(model: BayesianMLP, guide, num_samples: int, x: torch.Tensor) -> dict[str, torch.Tensor]:
    """Draw ``num_samples`` joint weight samples from ``guide``: site -> tensor with a leading
    sample dimension. ``x`` is any input batch (the guides here ignore it)."""
    if num_samples < 1:
        raise ValueError(f"num_samples must be >= 1, got {num_samples!r}")
    with poutine.block(), pyro.plate("posterior_samples", num_samples, dim=-2):
        trace = poutine.trace(guide).get_trace(x, None, x.shape[0])
    return {name: trace.nodes[name]["value"] for name in model.site_shapes}


@torch.no_grad()
def predictive_log_probs(
    model: BayesianMLP, weights: dict[str, torch.Tensor], x: torch.Tensor, batch_size: int = 1000
) -> torch.Tensor:
    """Per-sample log class probabilities ``log softmax f(x; w_s)``: ``(S, N, C)`` (or ``(N, C)`` for
    weights without a sample dimension)."""
    chunks = []
    with poutine.block(), poutine.condition(data=weights):
        for start in range(0, x.shape[0], batch_size):
            chunks.append(torch.log_softmax(model.logits(x[start : start + batch_size]), dim=-1))
    return torch.cat(chunks, dim=-2)


def expected_calibration_error(probs: torch.Tensor, labels: torch.Tensor, num_bins: int = 15) -> float:
    """ECE of predictive probabilities ``probs`` ``(N, C)`` against ``labels`` ``(N,)``.

    Bins ``(k/B, (k+1)/B]`` of the confidence ``max_c p_c``; ``sum_b (n_b/N) |acc_b - conf_b|``.
    """
    confidence, prediction = probs.max(dim=-1)
    correct = (prediction == labels).to(probs.dtype)
    bins = torch.clamp((confidence * num_bins).ceil().long() - 1, 0, num_bins - 1)
    ece = probs.new_zeros(())
    for b in range(num_bins):
        in_bin = bins == b
        if in_bin.any():
            ece += in_bin.to(probs.dtype).mean() * (correct[in_bin].mean() - confidence[in_bin].mean()).abs()
    return float(ece)


def _entropy(log_p: torch.Tensor) -> torch.Tensor:
    return -(log_p.exp() * log_p).sum(-1)


def predictive_accuracy(log_probs: torch.Tensor, labels: torch.Tensor) -> float:
    """Accuracy of the predictive mean's class, ``argmax_c (1/S) sum_s p_s(c)``, from per-sample log
    probabilities ``(S, N, C)`` (``(N, C)`` means ``S = 1``). A label ``>= C`` (a class whose
    output is not among the ``C`` active ones, as in class-incremental learning before its task)
    is never predicted: it counts as wrong."""
    if log_probs.dim() == 2:
        log_probs = log_probs.unsqueeze(0)
    log_mean = torch.logsumexp(log_probs, dim=0)
    return float((log_mean.argmax(-1) == labels).float().mean())


def metrics_from_log_probs(log_probs: torch.Tensor, labels: torch.Tensor, num_bins: int = 15) -> PredictiveMetrics:
    """Metrics from per-sample log probabilities ``(S, N, C)`` (``(N, C)`` means ``S = 1``)."""
    if log_probs.dim() == 2:
        log_probs = log_probs.unsqueeze(0)
    num_samples = log_probs.shape[0]
    log_mean = torch.logsumexp(log_probs, dim=0) - math.log(num_samples)
    mean = log_mean.exp()
    onehot = torch.nn.functional.one_hot(labels, mean.shape[-1]).to(mean.dtype)
    entropy = _entropy(log_mean)
    expected_entropy = _entropy(log_probs).mean(0)
    return PredictiveMetrics(
        accuracy=float((mean.argmax(-1) == labels).float().mean()),
        nll=float(-log_mean.gather(-1, labels.unsqueeze(-1)).mean()),
        brier=float(((mean - onehot) ** 2).sum(-1).mean()),
        ece=expected_calibration_error(mean, labels, num_bins),
        entropy=float(entropy.mean()),
        mutual_information=float((entropy - expected_entropy).clamp_min(0).mean()),
    )


@torch.no_grad()
def evaluate(model: BayesianMLP, guide, x: torch.Tensor, y: torch.Tensor, num_samples: int = 100, batch_size: int = 1000) -> PredictiveMetrics:
    """Posterior-predictive metrics of ``guide`` on ``(x, y)`` with ``num_samples`` weight samples."""
    weights = sample_posterior(model, guide, num_samples, x[:1])
    return metrics_from_log_probs(predictive_log_probs(model, weights, x, batch_size), y)


@torch.no_grad()
def evaluate_accuracy(model: BayesianMLP, guide, x: torch.Tensor, y: torch.Tensor, num_samples: int = 100, batch_size: int = 1000) -> float:
    """Posterior-predictive accuracy alone (:func:`predictive_accuracy`; labels may exceed the
    outputs), with the same draws as :func:`evaluate`."""
    weights = sample_posterior(model, guide, num_samples, x[:1])
    return predictive_accuracy(predictive_log_probs(model, weights, x, batch_size), y)


@torch.no_grad()
def evaluate_posterior_mean(model: BayesianMLP, guide, x: torch.Tensor, y: torch.Tensor) -> PredictiveMetrics:
    """Metrics of the single network at the posterior mean weights (see :func:`posterior_loc_scale`)."""
    means = {name: loc for name, (loc, _) in posterior_loc_scale(guide, model).items()}
    return metrics_from_log_probs(predictive_log_probs(model, means, x), y)
