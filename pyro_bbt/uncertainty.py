"""Does the posterior know what it does not know? Uncertainty on shifted and unseen inputs.

Every predictor here gives, for inputs ``x``, per-sample log class probabilities
``log p(c | x, w_s)``, ``(S, N, C)``: ``S`` posterior weight samples for a Bayesian guide, the
``S`` members of a deep ensemble, ``S = 1`` for a deterministic net. The predictive
distribution is their mean ``p(c | x) = (1/S) sum_s p(c | x, w_s)``, and its entropy splits
(Depeweg et al. 2018) into

* total uncertainty ``H[p(. | x)]`` (predictive entropy),
* aleatoric ``E_s H[p(. | x, w_s)]`` (expected entropy: what each network is unsure of),
* epistemic ``I(y; w | x) = H[p(. | x)] - E_s H[p(. | x, w_s)] >= 0`` (mutual information: how
  much the networks disagree), so that total = aleatoric + epistemic exactly.

Scores (:func:`score`): accuracy, NLL and ECE (15 equal-width confidence bins) where labels
exist; mean confidence, entropy and mutual information everywhere; and :func:`auroc`, the
probability that an uncertainty score ranks a random input of one set above a random input of
another (ties count one half), for telling task A's test digits from digits never seen.

The shifted sets (:func:`shift_suite`) are task A's test images rotated counter-clockwise
(bilinear, :mod:`pyro_bbt.data`), with Gaussian pixel noise added after scaling, and task B's
test images (digits unseen in training) fed to A's network.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, replace

import torch

from .data import Split, Task, load_task
from .evaluation import expected_calibration_error, predictive_log_probs, sample_posterior
from .model import BayesianMLP

__all__ = [
    "ROTATIONS",
    "NOISE_STDS",
    "decompose",
    "auroc",
    "reliability",
    "ShiftScores",
    "score",
    "shift_suite",
    "bayesian_log_probs",
    "network_log_probs",
]

ROTATIONS: tuple[float, ...] = (15.0, 30.0, 45.0, 60.0, 90.0)
NOISE_STDS: tuple[float, ...] = (0.25, 0.5, 1.0)
IN_DISTRIBUTION = "A test"
UNSEEN = "unseen digits"


def _check_log_probs(log_probs: torch.Tensor) -> torch.Tensor:
    if log_probs.dim() == 2:
        log_probs = log_probs.unsqueeze(0)
    if log_probs.dim() != 3:
        raise ValueError(f"log_probs must be (S, N, C) or (N, C), got shape {tuple(log_probs.shape)}")
    return log_probs


def _entropy(log_p: torch.Tensor) -> torch.Tensor:
    return -(log_p.exp() * log_p).nan_to_num(0.0).sum(-1)  # 0 log 0 = 0


def predictive_log_mean(log_probs: torch.Tensor) -> torch.Tensor:
    """``log (1/S) sum_s p(. | x, w_s)``, ``(N, C)``, from ``(S, N, C)``."""
    log_probs = _check_log_probs(log_probs)
    return torch.logsumexp(log_probs, dim=0) - math.log(log_probs.shape[0])


def decompose(log_probs: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Per input ``(total, aleatoric, epistemic)``, each ``(N,)`` in nats: the predictive entropy,
    the expected entropy over samples, and their difference (the mutual information between the
    label and the weights), from per-sample log probabilities ``(S, N, C)``."""
    log_probs = _check_log_probs(log_probs)
    total = _entropy(predictive_log_mean(log_probs))
    aleatoric = _entropy(log_probs).mean(0)
    return total, aleatoric, total - aleatoric


def auroc(negatives: torch.Tensor, positives: torch.Tensor) -> float:
    """Area under the ROC curve for scores where ``positives`` should be higher:
    ``P(s_pos > s_neg) + 1/2 P(s_pos = s_neg)`` over all pairs, computed with mid-ranks (the
    Mann-Whitney statistic ``U / (n_pos n_neg)``)."""
    negatives, positives = negatives.flatten().double(), positives.flatten().double()
    if negatives.numel() == 0 or positives.numel() == 0:
        raise ValueError(f"auroc needs scores in both sets, got {negatives.numel()} and {positives.numel()}")
    scores = torch.cat([negatives, positives])
    sorted_scores, order = scores.sort()
    # mid-ranks: the members of a run of equal scores share the run's mean rank (1-based)
    _, inverse, counts = torch.unique_consecutive(sorted_scores, return_inverse=True, return_counts=True)
    counts = counts.to(scores.dtype)
    mid = counts.cumsum(0) - (counts - 1) / 2
    ranks = torch.empty_like(scores)
    ranks[order] = mid[inverse]
    n_pos, n_neg = positives.numel(), negatives.numel()
    u = ranks[negatives.numel():].sum() - n_pos * (n_pos + 1) / 2
    return float(u / (n_pos * n_neg))


def reliability(probs: torch.Tensor, labels: torch.Tensor, num_bins: int = 15) -> list[dict]:
    """The reliability diagram of predictive probabilities ``(N, C)``: per confidence bin
    ``(k/B, (k+1)/B]`` with examples, its mean confidence, accuracy and count."""
    confidence, prediction = probs.max(dim=-1)
    correct = (prediction == labels).to(probs.dtype)
    bins = torch.clamp((confidence * num_bins).ceil().long() - 1, 0, num_bins - 1)
    rows = []
    for b in range(num_bins):
        in_bin = bins == b
        if in_bin.any():
            rows.append({"bin": b, "confidence": float(confidence[in_bin].mean()), "accuracy": float(correct[in_bin].mean()),
                         "count": int(in_bin.sum())})
    return rows


@dataclass
class ShiftScores:
    """Scores of one predictor on one set; the labelled ones are ``None`` on unseen digits."""

    accuracy: float | None
    nll: float | None
    ece: float | None
    confidence: float
    entropy: float
    aleatoric: float
    mutual_information: float

    def to_dict(self) -> dict:
        return asdict(self)


def score(log_probs: torch.Tensor, labels: torch.Tensor | None, num_bins: int = 15) -> ShiftScores:
    """:class:`ShiftScores` from per-sample log probabilities ``(S, N, C)``; ``labels=None`` for
    inputs whose classes the predictor does not have (unseen digits)."""
    log_mean = predictive_log_mean(log_probs)
    total, aleatoric, epistemic = decompose(log_probs)
    confidence = float(log_mean.exp().max(-1).values.mean())
    labelled = dict(accuracy=None, nll=None, ece=None)
    if labels is not None:
        labelled = dict(
            accuracy=float((log_mean.argmax(-1) == labels).float().mean()),
            nll=float(-log_mean.gather(-1, labels.unsqueeze(-1)).mean()),
            ece=expected_calibration_error(log_mean.exp(), labels, num_bins),
        )
    return ShiftScores(**labelled, confidence=confidence, entropy=float(total.mean()), aleatoric=float(aleatoric.mean()),
                       mutual_information=float(epistemic.mean()))


def shift_name(kind: str, value: float) -> str:
    return f"rotate {value:g}" if kind == "rotation" else f"noise {value:g}"


def shift_suite(task_a: Task, task_b: Task, rotations=ROTATIONS, noise_stds=NOISE_STDS, limit: int | None = None) -> dict[str, tuple[Split, bool]]:
    """Name -> ``(split, labelled)``: A's test set, the same images rotated by each angle and with
    each noise level, and B's test set (``labelled=False``: A's network has no class for them).
    ``limit`` keeps the first images of every set (the same images under every shift)."""

    def test(task: Task) -> Split:
        return load_task(task, limit_eval=limit).test

    suite = {IN_DISTRIBUTION: (test(task_a), True)}
    for angle in rotations:
        suite[shift_name("rotation", angle)] = (test(replace(task_a, rotation=angle)), True)
    for std in noise_stds:
        suite[shift_name("noise", std)] = (test(replace(task_a, noise_std=std)), True)
    suite[UNSEEN] = (test(task_b), False)
    return suite


@torch.no_grad()
def bayesian_log_probs(model: BayesianMLP, guide, x: torch.Tensor, num_samples: int, seed: int = 0) -> torch.Tensor:
    """``(S, N, C)`` per-sample log probabilities of ``guide``'s posterior predictive; the same
    ``num_samples`` weight draws (from ``seed``) for every set a predictor is scored on."""
    with torch.random.fork_rng():
        torch.manual_seed(seed)
        weights = sample_posterior(model, guide, num_samples, x[:1])
    return predictive_log_probs(model, weights, x)


@torch.no_grad()
def network_log_probs(nets: list[torch.nn.Module], x: torch.Tensor) -> torch.Tensor:
    """``(S, N, C)`` log probabilities of the deterministic ``nets`` (one net: a deterministic
    predictor; several: a deep ensemble, Lakshminarayanan et al. 2017)."""
    if not nets:
        raise ValueError("network_log_probs needs at least one net")
    return torch.stack([torch.log_softmax(net(x), dim=-1) for net in nets])
