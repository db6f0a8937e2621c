"""The full-data ELBO of a mean-field Gaussian posterior, its gradient, and the steps built from it.

For ``q(w) = N(mu, diag sigma^2)`` over a :class:`~pyro_bbt.model.BayesianMLP`'s weights and the
full-data ELBO

    L(mu, sigma) = sum_{n=1}^N E_q[log p(y_n | x_n, w)] - beta KL(q(w) || p(w))

(``beta = 1`` but for tempered fits), this module gives

* :func:`elbo_gradient`: one Monte Carlo estimate of ``L`` and of its gradient ``g`` w.r.t.
  ``(mu, sigma)``, one antithetic pass over the data in chunks (local reparameterisation: the
  pre-activations drawn per example; the mean of the passes with noise ``eps`` and ``-eps``; the
  KL exact, added once);
* :func:`natural_direction`: ``d_mu = sigma^2 g_mu``, ``d_log_sigma = 1/2 sigma g_sigma``
  (``q``'s Fisher metric is ``1/sigma^2`` for ``mu`` and 2 for ``log sigma``), and
  :func:`whitened_direction`, the same with each unit's input correlations undone (a
  Kronecker-factored curvature, as in K-FAC);
* :func:`remaining_gain`: the quadratic model's gain ``G = 1/2 g^T F^-1 g`` of a unit natural
  step, a U-statistic over pairs of independent estimates (a diagnosis);
* :func:`step_posterior`: ``(mu + a d_mu, sigma exp(a d_log_sigma))``.

Everything works on detached copies of ``(mu, sigma)`` (:func:`read_posterior`): the guide and the
global random generators are left as they were. :mod:`pyro_bbt.verdict` judges a fit by the steps
built here, scored by :mod:`pyro_bbt.fixed_noise`.
"""

from __future__ import annotations

import math
import random
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import asdict, dataclass

import numpy as np
import torch
import torch.nn.functional as F
from pyro import poutine
from pyro.infer.autoguide import AutoDelta, AutoNormal

from .data import Split
from .model import BayesianMLP
from .objectives import closed_form_kl
from .priors import prior_loc_scale
from .pyro_internals import loc_and_scale

__all__ = ["GAIN_ESTIMATORS", "DEFAULT_BATCH_SIZE", "SUPPORTED_GUIDES", "Posterior", "ELBOGradient", "GainEstimate", "check_integer", "rng_neutral",
           "read_posterior", "local_log_lik", "log_lik_chunks", "elbo_gradient", "elbo_gradients", "quadratic_gain", "remaining_gain",
           "natural_direction", "whitened_direction", "step_posterior"]

GAIN_ESTIMATORS = ("local", "weights")
DEFAULT_BATCH_SIZE = 2048  # examples per chunk of a full-data pass (memory only)
SUPPORTED_GUIDES = "'meanfield' (AutoMeanFieldNormal) and 'normal' (AutoNormal)"

Posterior = dict[str, tuple[torch.Tensor, torch.Tensor]]


def check_integer(name: str, value: object, minimum: int) -> int:
    """``value``, an integer (not a bool) ``>= minimum``, or one ``ValueError`` naming ``name``."""
    if not isinstance(value, int) or isinstance(value, bool) or value < minimum:
        raise ValueError(f"{name} must be an integer >= {minimum}, got {value!r}")
    return value


@dataclass
class ELBOGradient:
    """One Monte Carlo estimate of the full-data ELBO and its gradient w.r.t. each site's
    ``(loc, scale)``, and the ``(loc, scale)`` it was taken at (all detached)."""

    elbo: float
    posterior: Posterior
    grads: Posterior


@contextmanager
def rng_neutral(seed: int) -> Iterator[None]:
    """Seed torch with ``seed`` inside; on exit torch's, numpy's and python's generators are back."""
    python_state, numpy_state = random.getstate(), np.random.get_state()
    try:
        with torch.random.fork_rng():
            torch.manual_seed(seed)
            yield
    finally:
        random.setstate(python_state)
        np.random.set_state(numpy_state)


def read_posterior(guide, requires_grad: bool = False) -> Posterior:
    """Detached copies of the mean-field ``guide``'s ``(loc, scale)`` per site (leaves that
    accumulate ``.grad`` with ``requires_grad``); ``ValueError`` for an unsupported guide."""
    if not isinstance(guide, AutoNormal):
        raise ValueError(f"no remaining-gain / ELBO rule for guide {type(guide).__name__}; supported: {SUPPORTED_GUIDES}")
    if guide.prototype_trace is None:
        raise ValueError("the guide has not been run yet: train it (or initialize_guide it) first")
    with torch.no_grad():
        posterior = {}
        for name, _ in guide.prototype_trace.iter_stochastic_nodes():
            loc, scale = loc_and_scale(guide, name)
            posterior[name] = (loc.detach().clone().requires_grad_(requires_grad), scale.detach().clone().requires_grad_(requires_grad))
    return posterior


def local_log_lik(model: BayesianMLP, posterior: Posterior, x: torch.Tensor, y: torch.Tensor, noise: list[torch.Tensor],
                  antithetic: bool) -> torch.Tensor:
    """Per-example ``log p(y | x, w)`` under local reparameterisation (the draws of
    :meth:`BayesianMLP.local_reparameterized_logits`), shape ``(D, B)``, for the ``N(0, 1)`` draws
    ``noise[l]`` of shape ``(D, B, d_l)`` per layer; ``antithetic``: the mean of the passes with
    the draws and with their negatives. The first layer's mean and width are computed once for
    all draws and signs."""
    draws = noise[0].shape[0]
    h = x
    for index, eps in enumerate(noise):
        w_loc, w_scale = posterior[f"layers.{index}.weight"]
        b_loc, b_scale = posterior[f"layers.{index}.bias"]
        if antithetic:
            eps = torch.cat([eps, -eps])
        h = F.linear(h, w_loc, b_loc) + F.linear(h * h, w_scale * w_scale, b_scale * b_scale).sqrt() * eps
        if index < len(noise) - 1:
            h = F.relu(h)
    log_p = torch.log_softmax(model._select_head(h), dim=-1).gather(-1, y.expand(h.shape[0], -1).unsqueeze(-1)).squeeze(-1)
    return 0.5 * (log_p[:draws] + log_p[draws:]) if antithetic else log_p


def log_lik_chunks(model: BayesianMLP, posterior: Posterior, split: Split, batch_size: int, estimator: str,
                   antithetic: bool, draws: int = 1) -> Iterator[torch.Tensor]:
    """One Monte Carlo draw of ``log p(y_n | x_n, w)`` for every example of ``split``, a chunk of
    ``batch_size`` at a time, with torch's global generator: ``weights``, one weight draw for all
    the data (the draws of ``objectives.WeightSamplingELBO``), each chunk once per sign;
    ``local``, pre-activations drawn per example (those of ``local_reparameterized_logits``).
    ``antithetic``: the mean of the draws and of their negatives (per chunk tensors scaled so that
    their sum over everything yielded is the log-likelihood's estimate). ``draws > 1`` (``local``
    only): that many independent draws per example in one vectorised pass over chunks of
    ``batch_size // draws`` examples, each chunk their mean (the mean of ``draws`` estimates)."""
    if estimator not in GAIN_ESTIMATORS:
        raise ValueError(f"unknown estimator {estimator!r}; allowed: {', '.join(GAIN_ESTIMATORS)}")
    if estimator == "local":
        for x, y in split.batches(max(1, batch_size // draws), shuffle=False):  # draws x chunk rows: the memory of one draw's chunk
            noise = [torch.randn(draws, x.shape[0], layer.out_features, dtype=x.dtype, device=x.device) for layer in model.layers]
            log_lik = local_log_lik(model, posterior, x, y, noise, antithetic)
            yield log_lik if draws == 1 else log_lik.mean(0)
        return
    if draws != 1:
        raise ValueError(f"draws > 1 needs the local estimator, got estimator {estimator!r}")
    signs = (1.0, -1.0) if antithetic else (1.0,)
    weight_eps = {name: torch.randn(loc.shape, dtype=loc.dtype, device=loc.device) for name, (loc, _) in posterior.items()}
    for x, y in split.batches(batch_size, shuffle=False):
        for sign in signs:
            with poutine.condition(data={name: loc + sign * scale * weight_eps[name] for name, (loc, scale) in posterior.items()}):
                logits = model.logits(x)
            yield torch.log_softmax(logits, dim=-1).gather(-1, y.unsqueeze(-1)).squeeze(-1) / len(signs)


def _gradient_pass(model: BayesianMLP, posterior: Posterior, split: Split, batch_size: int, estimator: str, antithetic: bool,
                   kl_beta: float = 1.0, draws: int = 1) -> float:
    """One Monte Carlo estimate of ``sum_n E_q log p(y_n | x_n, w) - beta KL(q || p)`` whose gradient
    accumulates into the posterior tensors' ``.grad``, one chunk at a time (the draws of
    :func:`log_lik_chunks`, ``draws`` of them averaged), the KL added once."""
    log_lik = 0.0
    for chunk in log_lik_chunks(model, posterior, split, batch_size, estimator, antithetic, draws):
        total = chunk.sum()
        total.backward()
        log_lik += float(total.detach())
    kl = kl_beta * closed_form_kl(model, posterior)
    (-kl).backward()
    return log_lik - float(kl.detach())


def elbo_gradient(model: BayesianMLP, guide, split: Split, *, seed: int = 0, batch_size: int = 1000, estimator: str = "local",
                  antithetic: bool = True, kl_beta: float = 1.0, draws: int = 1) -> ELBOGradient:
    """One estimate of the full-data ELBO (its KL weighted by ``kl_beta``: the tempered objective
    of a fit with that weight) and of its gradient w.r.t. every site's ``(loc, scale)``, with
    torch's generator seeded by ``seed`` inside (the global state is restored). ``draws > 1``
    (local estimator): the mean of that many independent estimates, in one vectorised pass
    (the KL, exact, once): distributed as the mean of ``draws`` calls, at about the price of one
    where the data are few."""
    check_integer("batch_size", batch_size, 1)
    check_integer("draws", draws, 1)
    posterior = read_posterior(guide, requires_grad=True)
    with rng_neutral(seed):
        elbo = _gradient_pass(model, posterior, split, batch_size, estimator, antithetic, kl_beta, draws)
    grads = {name: (loc.grad, scale.grad) for name, (loc, scale) in posterior.items()}
    return ELBOGradient(elbo, {name: (loc.detach(), scale.detach()) for name, (loc, scale) in posterior.items()}, grads)


def elbo_gradients(model: BayesianMLP, guide, split: Split, count: int, batch_size: int, seed: int, estimator: str = "local",
                   antithetic: bool = True, kl_beta: float = 1.0) -> list[ELBOGradient]:
    """``count`` independent :func:`elbo_gradient` estimates, their seeds drawn from ``seed``."""
    seeds = torch.randint(0, 2**62, (count,), generator=torch.Generator().manual_seed(seed)).tolist()
    return [elbo_gradient(model, guide, split, seed=s, batch_size=batch_size, estimator=estimator, antithetic=antithetic, kl_beta=kl_beta)
            for s in seeds]


@dataclass
class GainEstimate:
    """The quadratic model's gain ``G = 1/2 g^T F^-1 g`` (``nats``; ``per_datum = nats / num_data``),
    its jackknife standard error, and the parts from the locations and from the widths."""

    nats: float
    per_datum: float
    stderr: float
    mu_part: float
    scale_part: float
    num_data: int

    def to_dict(self) -> dict:
        return asdict(self)


def _fisher_scaled(gradient: ELBOGradient) -> tuple[torch.Tensor, torch.Tensor]:
    """``(sigma g_mu, sigma g_sigma)`` flattened over all sites: ``G = 1/2 |a|^2 + 1/4 |b|^2``."""
    a = torch.cat([(sigma * gradient.grads[name][0]).reshape(-1) for name, (_, sigma) in gradient.posterior.items()])
    b = torch.cat([(sigma * gradient.grads[name][1]).reshape(-1) for name, (_, sigma) in gradient.posterior.items()])
    return a.double(), b.double()


def quadratic_gain(gradients: list[ELBOGradient], num_data: int) -> GainEstimate:
    """``G`` averaged over all pairs ``i != j`` of the estimates (a U-statistic), with its jackknife
    standard error."""
    scaled = [_fisher_scaled(g) for g in gradients]
    a, b = torch.stack([v[0] for v in scaled]), torch.stack([v[1] for v in scaled])
    gram_mu, gram_scale = 0.5 * a @ a.T, 0.25 * b @ b.T
    gram = gram_mu + gram_scale
    m = gram.shape[0]

    def off_mean(g: torch.Tensor) -> float:
        return float((g.sum() - g.diagonal().sum()) / (m * (m - 1)))

    nats = off_mean(gram)
    off_total, rows = gram.sum() - gram.diagonal().sum(), gram.sum(1) - gram.diagonal()
    leave_one_out = (off_total - 2 * rows) / ((m - 1) * (m - 2))
    stderr = math.sqrt((m - 1) / m * float(((leave_one_out - leave_one_out.mean()) ** 2).sum()))
    return GainEstimate(nats=nats, per_datum=nats / num_data, stderr=stderr, mu_part=off_mean(gram_mu), scale_part=off_mean(gram_scale),
                        num_data=num_data)


def remaining_gain(model: BayesianMLP, guide, split: Split, *, num_pairs: int = 8, batch_size: int = 1000, seed: int = 0,
                   estimator: str = "local", antithetic: bool = True) -> GainEstimate | None:
    """The quadratic model's gain ``G = 1/2 g^T F^-1 g`` of ``guide`` on ``split`` (:mod:`pyro_bbt.verdict`'s
    docstring, "Why not G"), from ``M = 2 num_pairs`` independent gradient estimates (each one pass over
    ``split`` in chunks of ``batch_size``): the mean of ``G`` over all ``M (M - 1) / 2`` pairs,
    with its jackknife standard error. ``None`` for ``delta``. A diagnosis, not the verdict:
    on the full problem it is dominated by stiff directions and noise."""
    check_integer("num_pairs", num_pairs, 2)
    if isinstance(guide, AutoDelta):
        return None
    return quadratic_gain(elbo_gradients(model, guide, split, 2 * num_pairs, batch_size, seed, estimator, antithetic), len(split))


def natural_direction(gradients: Sequence[ELBOGradient]) -> Posterior:
    """The natural gradient of the mean of ``gradients`` in ``(mu, log sigma)``, per site
    ``(d_mu, d_log_sigma) = (sigma^2 g_mu, 1/2 sigma g_sigma)``: a unit step along it is the
    quadratic model's optimum where the curvature is ``q``'s Fisher metric."""
    count = len(gradients)
    direction = {}
    for name, (_, sigma) in gradients[0].posterior.items():
        g_mu = sum(g.grads[name][0] for g in gradients) / count
        g_sigma = sum(g.grads[name][1] for g in gradients) / count
        direction[name] = (sigma * sigma * g_mu, 0.5 * sigma * g_sigma)
    return direction


def _input_moments(model: BayesianMLP, posterior: Posterior, split: Split, batch_size: int) -> list[torch.Tensor]:
    """Every layer's ``E_n[h_n h_n^T]`` (float64) of its input ``h_n`` with a constant 1 appended
    (the bias's input), under the network with the posterior's mean weights."""
    moments: list[torch.Tensor | None] = [None] * len(model.layers)
    with torch.no_grad():
        for x, _ in split.batches(batch_size, shuffle=False):
            h = x
            for index in range(len(model.layers)):
                extended = torch.cat([h, torch.ones(h.shape[0], 1, dtype=h.dtype, device=h.device)], 1)
                moment = (extended.T @ extended).double()
                moments[index] = moment if moments[index] is None else moments[index] + moment
                h = F.relu(F.linear(h, posterior[f"layers.{index}.weight"][0], posterior[f"layers.{index}.bias"][0]))
    return [moment / len(split) for moment in moments]


def whitened_direction(model: BayesianMLP, posterior: Posterior, natural: Posterior, split: Split, *, batch_size: int = DEFAULT_BATCH_SIZE,
                       damping: float = 0.1, iterations: int = 40, tol: float = 0.0) -> Posterior:
    """The natural gradient with the correlations of each layer's inputs undone.

    Unit ``j`` of a layer sees inputs ``h`` (a 1 appended for the bias) with second moments
    ``A = E_n[h h^T]``, correlation ``C = diag(A)^-1/2 A diag(A)^-1/2``. Its likelihood's curvature
    w.r.t. the locations ``mu_j`` is taken to be ``beta_j A`` (a Kronecker factor, as in K-FAC);
    with the prior's ``1 / s^2`` added and ``q``'s optimum ``1 / sigma_j^2`` as its diagonal, it is
    ``S^-1 M_j S^-1`` with ``S = diag(sigma_j)``, ``M_j = R C R + I - R^2`` and
    ``R = diag(rho_j)``, ``rho_ji^2 = 1 - sigma_ji^2 / s_ji^2`` the likelihood's share of the
    precision (0 at a blank input; 1 under a non-Gaussian prior). The location part of the step is
    ``d_mu_j = S M_j^-1 S g_mu_j``, where ``C = I`` gives the natural gradient ``sigma^2 g_mu``;
    ``M_j`` is damped (``R`` scaled by ``sqrt(1 - damping)``) and solved by ``iterations`` steps
    of conjugate gradients, or fewer where ``tol > 0``: a layer's iterations stop once every
    unit's residual is at most ``tol`` times its right-hand side's norm. The widths' part is the
    natural gradient's."""
    moments = _input_moments(model, posterior, split, batch_size)
    whitened = dict(natural)
    for index, moment in enumerate(moments):
        weight, bias = f"layers.{index}.weight", f"layers.{index}.bias"
        diagonal = moment.diagonal()
        live = diagonal > 1e-12 * diagonal.max()
        inverse_sqrt = torch.where(live, diagonal.clamp_min(1e-300).rsqrt(), torch.zeros_like(diagonal))
        correlation = (moment * inverse_sqrt[:, None] * inverse_sqrt[None, :]).to(posterior[weight][0].dtype)
        sigma = torch.cat([posterior[weight][1], posterior[bias][1][:, None]], 1)
        rhs = torch.cat([natural[weight][0], natural[bias][0][:, None]], 1) / sigma  # sigma g_mu
        prior = [prior_loc_scale(model.prior, name, posterior[name][0].shape) for name in (weight, bias)]
        if all(p is not None for p in prior):
            prior_scale = torch.cat([prior[0][1].expand_as(posterior[weight][0]), prior[1][1].expand_as(posterior[bias][0])[:, None]], 1)
            rho = (1 - (sigma / prior_scale.to(sigma)) ** 2).clamp_min(0).sqrt()
        else:
            rho = torch.ones_like(sigma)
        rho = rho * live.to(sigma.dtype)[None, :] * math.sqrt(1 - damping)

        def apply(y: torch.Tensor) -> torch.Tensor:
            return rho * ((rho * y) @ correlation) + (1 - rho * rho) * y

        solution, residual = torch.zeros_like(rhs), rhs.clone()
        search, norm = residual.clone(), (residual * residual).sum(1, keepdim=True)
        stop = tol * tol * norm
        for _ in range(iterations):  # conjugate gradients, every unit at once
            if tol > 0 and bool((norm <= stop).all()):
                break
            product = apply(search)
            alpha = norm / (search * product).sum(1, keepdim=True).clamp_min(1e-30)
            solution += alpha * search
            residual -= alpha * product
            new_norm = (residual * residual).sum(1, keepdim=True)
            search = residual + new_norm / norm.clamp_min(1e-30) * search
            norm = new_norm
        step = sigma * solution
        whitened[weight] = (step[:, :-1].contiguous(), natural[weight][1])
        whitened[bias] = (step[:, -1].contiguous(), natural[bias][1])
    return whitened


def step_posterior(posterior: Posterior, direction: Posterior, step: float) -> Posterior:
    """``(mu + step d_mu, sigma exp(step d_log_sigma))`` per site (detached)."""
    with torch.no_grad():
        return {name: (loc + step * direction[name][0], scale * torch.exp(step * direction[name][1])) for name, (loc, scale) in posterior.items()}
