"""The full-data ELBO of a mean-field Gaussian posterior, scored with common random numbers.

Two posteriors of the same network are compared by the difference of their full-data ELBOs
``L(end) - L(start)`` under the *same* noise: each of ``D`` antithetic local-reparameterisation
draws depends only on ``(seed, chunk, shapes)`` (:func:`crn_log_liks`), so the noise common to
both cancels. The examples' draws are independent, so the variance of the difference's mean
over the draws is ``sum_n s_n^2 / D``, ``s_n^2`` example ``n``'s variance of
``log p(y_n | end) - log p(y_n | start)`` over the draws (:class:`ELBODifference`).

* :func:`posterior_elbo`, :func:`fixed_noise_elbo`: ``L`` of a posterior or of a guide;
* :func:`continuation_gain`: what a continuation of a fit gained, with draws added where the
  score cannot decide against a tolerance (:func:`scored_difference`).

:mod:`pyro_bbt.verdict` scores its line search and the continuation that confirms a pass here.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import asdict, dataclass

import numpy as np
import torch

from .data import Split
from .elbo_gradient import (DEFAULT_BATCH_SIZE, GAIN_ESTIMATORS, Posterior, check_integer, local_log_lik, log_lik_chunks, read_posterior,
                            rng_neutral)
from .model import BayesianMLP
from .objectives import closed_form_kl

__all__ = ["ADDED_DRAWS_STDERR_FRACTION", "DEFAULT_DRAWS", "check_tol", "crn_log_liks", "posterior_elbo", "fixed_noise_elbo", "ELBODifference",
           "ContinuationGain", "scored_difference", "continuation_gain"]

ADDED_DRAWS_STDERR_FRACTION = 0.25  # added draws stop once stderr <= this x tol x N (VerdictConfig.continuation_max_draws, rescore_max_draws)
DEFAULT_DRAWS = 2  # antithetic draws of a score: the fewest whose spread gives a standard error


def check_tol(tol_per_datum: object) -> None:
    """One ``ValueError`` unless ``tol_per_datum`` is a finite number > 0."""
    if isinstance(tol_per_datum, bool) or not (isinstance(tol_per_datum, (int, float)) and math.isfinite(tol_per_datum) and tol_per_datum > 0):
        raise ValueError(f"tol_per_datum must be a finite number > 0, got {tol_per_datum!r}")


def _chunk_generator(seed: int, chunk: int, device: torch.device) -> torch.Generator:
    state = int(np.random.SeedSequence([seed, chunk]).generate_state(1, np.uint64)[0]) >> 1
    return torch.Generator(device=device).manual_seed(state)


def crn_log_liks(model: BayesianMLP, posterior: Posterior, split: Split, num_draws: int, seed: int, batch_size: int,
                 kl_beta: float = 1.0) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-draw, per-example expected log-likelihoods ``(num_draws, N)`` (antithetic, local
    reparameterisation; float64) and per-draw KLs ``(num_draws,)``, times ``kl_beta``, of ``posterior`` on ``split``,
    with draws that depend only on ``(seed, batch_size)`` and the shapes: common random numbers
    for every posterior of the same network. RNG-neutral (the KL of a non-Gaussian prior draws
    from torch's generator, seeded here)."""
    out = []
    with torch.no_grad():
        for index, (x, y) in enumerate(split.batches(batch_size, shuffle=False)):
            generator = _chunk_generator(seed, index, x.device)
            noise = [torch.randn(num_draws, x.shape[0], layer.out_features, dtype=x.dtype, device=x.device, generator=generator)
                     for layer in model.layers]
            out.append(local_log_lik(model, posterior, x, y, noise, antithetic=True).double())
        with rng_neutral(seed):
            kl = torch.stack([closed_form_kl(model, {n: (l.double(), s.double()) for n, (l, s) in posterior.items()}) for _ in range(num_draws)])
    return torch.cat(out, dim=1), kl_beta * kl.double()


def posterior_elbo(model: BayesianMLP, posterior: Posterior, split: Split, *, num_draws: int = 16, seed: int = 0, batch_size: int = 1000,
                   kl_beta: float = 1.0) -> float:
    """The full-data ELBO (its KL weighted by ``kl_beta``) of the mean-field Gaussian ``posterior`` (site ->
    ``(loc, scale)``) on ``split``: the mean of ``num_draws`` antithetic local-reparameterisation
    passes whose noise depends only on ``seed``, ``batch_size`` and the shapes (common random
    numbers: every posterior of the network is scored with the same draws). RNG-neutral."""
    check_integer("num_draws", num_draws, 1)
    check_integer("batch_size", batch_size, 1)
    log_lik, kl = crn_log_liks(model, posterior, split, num_draws, seed, batch_size, kl_beta)
    return float(log_lik.sum(1).mean() - kl.mean())


def fixed_noise_elbo(model: BayesianMLP, guide, split: Split, *, num_draws: int = 16, seed: int = 0, batch_size: int = 1000,
                     estimator: str = "local", antithetic: bool = True) -> float:
    """The full-data ELBO (kl weight 1) of ``guide`` on ``split``, averaged over ``num_draws``
    Monte Carlo passes whose noise depends only on ``seed`` (and the shapes): the same numbers at
    every call, so two fits' ELBOs are compared with common random numbers. The default
    (``local``, antithetic) is :func:`posterior_elbo` of the guide's posterior. RNG-neutral."""
    check_integer("num_draws", num_draws, 1)
    check_integer("batch_size", batch_size, 1)
    posterior = read_posterior(guide, requires_grad=False)
    if estimator == "local" and antithetic:
        return posterior_elbo(model, posterior, split, num_draws=num_draws, seed=seed, batch_size=batch_size)
    if estimator not in GAIN_ESTIMATORS:  # before any draw
        raise ValueError(f"unknown estimator {estimator!r}; allowed: {', '.join(GAIN_ESTIMATORS)}")
    total = 0.0
    with rng_neutral(seed), torch.no_grad():
        for _ in range(num_draws):
            log_lik = sum(float(chunk.double().sum()) for chunk in log_lik_chunks(model, posterior, split, batch_size, estimator, antithetic))
            total += log_lik - float(closed_form_kl(model, posterior))
    return total / num_draws


class ELBODifference:
    """``L(a) - L(0)`` of the fixed-noise ELBO from per-draw, per-example log-likelihoods and
    per-draw KLs, and its standard error: the examples' draws are independent, so the variance of
    the mean over ``D`` draws is ``sum_n s_n^2 / D`` (``s_n^2``: example ``n``'s variance over the
    draws), plus the KL's (zero for a Gaussian prior)."""

    def __init__(self, base: tuple[torch.Tensor, torch.Tensor]) -> None:
        self.log_lik, self.kl = base

    def __call__(self, other: tuple[torch.Tensor, torch.Tensor]) -> tuple[float, float]:
        delta, delta_kl = other[0] - self.log_lik, other[1] - self.kl
        draws = delta.shape[0]
        gain = float(delta.sum(1).mean() - delta_kl.mean())
        variance = float(delta.var(0).sum() + delta_kl.var()) / draws
        if not math.isfinite(gain):
            return -math.inf, math.inf
        return gain, math.sqrt(max(variance, 0.0))


@dataclass
class ContinuationGain:
    """What a continuation of the fit gained: ``nats = L(end) - L(start)`` of the full-data
    fixed-noise ELBO (common random numbers, :func:`posterior_elbo`'s draws), its standard error,
    ``per_datum = nats / num_data``, ``upper_per_datum = (nats + 2 stderr) / num_data``, both ELBOs,
    the continuation's ``epochs`` and rate ``factors``, the ``base`` rates they multiply
    (``[locations, widths]``; ``None``: the fit's own first rates) and how many antithetic
    ``draws`` scored it (``None`` where draws are not added, ``VerdictConfig.continuation_max_draws`` 0)."""

    nats: float
    stderr: float
    per_datum: float
    upper_per_datum: float
    start_elbo: float
    end_elbo: float
    num_data: int
    epochs: int
    factors: list[float]
    base: list[float] | None = None
    draws: int | None = None

    def to_dict(self) -> dict:
        """The fields as plain data, without ``draws`` where draws are not added (so a record is
        what it was before they could be)."""
        record = asdict(self)
        if record["draws"] is None:
            del record["draws"]
        return record


def _round_seed(seed: int, round_index: int) -> int:
    """The evaluator's seed for the ``round_index``-th set of added draws (``seed`` itself for the
    first set, so a continuation scored without added draws is scored as before they existed)."""
    if round_index == 0:
        return seed
    return int(np.random.SeedSequence([seed, 0x0D2A3, round_index]).generate_state(1, np.uint64)[0]) >> 1


def scored_difference(model: BayesianMLP, start: Posterior, end: Posterior, split: Split, num_draws: int, seed: int, batch_size: int,
                      kl_beta: float, max_draws: int, tol_per_datum: float | None) -> tuple[float, float, int, float]:
    """``(nats, stderr, draws, L(start))``: the fixed-noise ELBO difference ``L(end) - L(start)``
    over ``num_draws`` antithetic draws seeded by ``seed`` (common to both), with draws added in
    rounds where ``max_draws > num_draws`` (:func:`continuation_gain`, "Added draws")."""
    if max_draws > num_draws:
        check_tol(tol_per_datum)
    num_data = len(split)
    log_lik_start, kl_start, log_lik_end, kl_end = [], [], [], []
    draws, round_index = 0, 0
    while True:
        count = num_draws if round_index == 0 else min(draws, max_draws - draws)
        for log_liks, kls, posterior in ((log_lik_start, kl_start, start), (log_lik_end, kl_end, end)):
            log_lik, kl = crn_log_liks(model, posterior, split, count, _round_seed(seed, round_index), batch_size, kl_beta)
            log_liks.append(log_lik)
            kls.append(kl)
        draws += count
        round_index += 1
        at_start = (torch.cat(log_lik_start), torch.cat(kl_start))
        nats, stderr = ELBODifference(at_start)((torch.cat(log_lik_end), torch.cat(kl_end)))
        if draws >= max_draws or not math.isfinite(nats) or stderr <= ADDED_DRAWS_STDERR_FRACTION * tol_per_datum * num_data \
                or (nats - 2 * stderr) / num_data > tol_per_datum:
            break
    return nats, stderr, draws, float(at_start[0].sum(1).mean() - at_start[1].mean())


def continuation_gain(model: BayesianMLP, start: Posterior, end: Posterior, split: Split, *, num_draws: int = DEFAULT_DRAWS,
                      seed: int = 0, batch_size: int = DEFAULT_BATCH_SIZE, epochs: int = 0,
                      factors: Sequence[float] = (), base: Sequence[float] | None = None, kl_beta: float = 1.0,
                      max_draws: int = 0, tol_per_datum: float | None = None) -> ContinuationGain:
    """The fixed-noise ELBO gain from posterior ``start`` to ``end`` on ``split`` (the same
    ``num_draws`` antithetic draws for both, seeded by ``seed``), with the standard error of the
    paired difference (:class:`ELBODifference`); the KL weighted by ``kl_beta`` (the objective of a
    tempered fit). RNG-neutral.

    **Added draws** (``max_draws > num_draws``, with ``tol_per_datum``). The standard error is
    ``sqrt(sum_n s_n^2 / D)`` over ``D`` draws: on small data a continuation's ``s_n`` are large
    (the posterior is broad), and with a fixed ``D`` two standard errors can exceed the whole
    tolerance ``tol N``, so that no continuation passes however little it gained. Then draws are
    added in rounds, each as many as all before it (noise of its own, :func:`_round_seed`), and
    pooled with them (common random numbers still: start and end share every draw), until

    * ``stderr <= ADDED_DRAWS_STDERR_FRACTION tol N`` (two standard errors take at most half the
      tolerance), or
    * the gain's lower bound ``(nats - 2 stderr) / N`` exceeds ``tol``: a rejection that more
      draws could only confirm, or
    * ``max_draws`` draws are spent.

    A pass is never decided before one of these, so the added looks do not make passing easier:
    stopping for a rejection only removes paths that might have passed later, and the standard
    error the first condition waits for does not depend on the gain's sign."""
    check_integer("num_draws", num_draws, 2)
    check_integer("batch_size", batch_size, 1)
    check_integer("max_draws", max_draws, 0)
    nats, stderr, draws, start_elbo = scored_difference(model, start, end, split, num_draws, seed, batch_size, kl_beta, max_draws, tol_per_datum)
    num_data = len(split)
    return ContinuationGain(nats, stderr, nats / num_data, (nats + 2 * stderr) / num_data, start_elbo, start_elbo + nats, num_data, int(epochs),
                            [float(f) for f in factors], None if base is None else [float(r) for r in base],
                            draws if max_draws > num_draws else None)
