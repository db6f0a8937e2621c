"""The training objective: a KL-weighted ELBO and its estimators.

For a minibatch of ``B`` out of ``N`` examples and KL weight ``beta`` the loss is the negative
weighted ELBO::

    L(q) = -(N/B) sum_n E_q[log p(y_n | x_n, w)]  +  beta * KL(q(w) || p(w))

``beta = 1`` is Pyro's ``Trace_ELBO`` (an unbiased estimate of the full-data negative ELBO);
:func:`pyro_bbt.inference.train` passes ``beta = M pi_i`` for minibatch ``i`` of ``M`` under a
KL schedule (:mod:`pyro_bbt.kl_schedules`). ``beta`` multiplies the *whole* KL, the prior's log-density and the guide's entropy alike.
In Pyro terms that is one effect handler, :class:`KLScale`, which scales every latent
(non-observed) sample site in the model and in the guide.

Two estimators of ``L``, both callables ``(model, guide, x, y, num_data, kl_weight) -> loss``
usable as the ``loss`` of :class:`pyro.infer.SVI`:

* :class:`WeightSamplingELBO` (``"weights"``): draws ``P`` weight samples from the guide
  (vectorised over a particle plate), replays the model against them, and sums exactly the
  terms of :class:`~pyro.infer.Trace_ELBO`; where the guide samples Gaussians at the weight
  sites the KL is closed form, as in :class:`~pyro.infer.TraceMeanField_ELBO`.
* :class:`LocalReparameterizationELBO` (``"local"``): the same expectation, with each example's
  pre-activations sampled instead of the weights (Kingma et al. 2015) and the closed-form KL.
  Needs the ``meanfield`` guide.

Both keep the last step's log-likelihood, weighted KL and logits in ``last`` for diagnostics.

How their mean-field pieces are computed -- the posterior's ``(loc, scale)``, the closed-form
KL, and (``local``) the whole single-particle step -- is one object passed to the estimator, the
seam between the plain path and the fast one: :class:`MeanFieldOps` (plain: trace the guide,
autograd through :func:`gaussian_kl`), :class:`FastMeanFieldOps` (:mod:`pyro_bbt.fused`) and
:class:`CompiledMeanFieldOps` (the step under ``torch.compile``). They compute the same values to
float rounding (tested); :func:`mean_field_ops` picks one from
:class:`~pyro_bbt.inference.TrainConfig`'s ``fast`` and ``compile``.
"""

from __future__ import annotations

import math
from contextlib import nullcontext
from dataclasses import dataclass
from typing import ClassVar, TypeAlias

import pyro
import pyro.distributions as dist
import torch
from pyro import poutine
from pyro.distributions.util import scale_and_mask
from pyro.poutine.messenger import Messenger
from pyro.poutine.util import prune_subsample_sites
from torch.distributions import kl_divergence

from .fused import broadcast_scalar, compiled_local_elbo_terms, gaussian_kl, gaussian_kl_sum, mean_field_loc_rho, mean_field_loc_scale, supports_fast_path
from .guides import AutoMeanFieldNormal, has_closed_form_kl
from .model import BayesianMLP
from .priors import prior_loc_scale

__all__ = [
    "ESTIMATORS",
    "KLScale",
    "ELBOTerms",
    "WeightSamplingELBO",
    "LocalReparameterizationELBO",
    "make_estimator",
    "MeanFieldOps",
    "FastMeanFieldOps",
    "CompiledMeanFieldOps",
    "mean_field_ops",
    "mean_field_posterior",
    "closed_form_kl",
    "gaussian_kl",
]

ESTIMATORS = ("weights", "local")

Posterior: TypeAlias = dict[str, tuple[torch.Tensor, torch.Tensor]]
"""Site name -> ``(loc, scale)`` of a mean-field Gaussian posterior, differentiable."""


class KLScale(Messenger):
    """Multiply the log-density of every latent sample site by ``weight``.

    Wrapped around both the model and the guide, this turns ``E_q[log p(y|w)] - KL(q||p)`` into
    ``E_q[log p(y|w)] - weight * KL(q||p)``: the prior term ``log p(w)`` (model) and the entropy
    term ``-log q(w)`` (guide, including auxiliary sites) are scaled together, observed sites
    are not. Usage::

        with KLScale(0.01):
            loss = Trace_ELBO().differentiable_loss(model, guide, x, y)
    """

    def __init__(self, weight: float) -> None:
        weight = float(weight)
        if not (math.isfinite(weight) and weight >= 0):
            raise ValueError(f"KL weight must be finite and >= 0, got {weight!r}")
        super().__init__()
        self.weight = weight

    def _pyro_sample(self, msg) -> None:
        if not msg["is_observed"]:
            msg["scale"] = self.weight * msg["scale"]


@dataclass
class ELBOTerms:
    """One step's pieces: ``loss = -(log_lik - weighted_kl)``; ``logits`` is ``(B, C)`` or ``(P, B, C)``."""

    loss: torch.Tensor
    log_lik: float
    weighted_kl: float
    logits: torch.Tensor


class _Estimator:
    """Shared plumbing: callable as an SVI loss, with a ``loss_and_grads`` that frees the graph."""

    def __init__(self, num_particles: int = 1, ops: MeanFieldOps | None = None) -> None:
        if not isinstance(num_particles, int) or num_particles < 1:
            raise ValueError(f"num_particles must be an integer >= 1, got {num_particles!r}")
        if ops is not None and not isinstance(ops, MeanFieldOps):
            raise ValueError(f"ops must be a MeanFieldOps, got {ops!r}")
        self.num_particles = num_particles
        self.ops = MeanFieldOps() if ops is None else ops  # how the mean-field posterior and KL are computed
        self.last: ELBOTerms | None = None

    def terms(self, model, guide, x, y, num_data: int, kl_weight: float) -> ELBOTerms:
        raise NotImplementedError

    def __call__(self, model, guide, x, y, num_data: int | None = None, kl_weight: float = 1.0) -> torch.Tensor:
        self.last = self.terms(model, guide, x, y, num_data or x.shape[0], kl_weight)
        return self.last.loss

    def loss_and_grads(self, model, guide, *args, **kwargs) -> float:
        loss = self(model, guide, *args, **kwargs)
        loss.backward()
        return loss.item()


def _site_kl(guide_site: dict, model_site: dict, closed_form: bool) -> torch.Tensor:
    """``scale * KL(q || p)`` at one site, closed form when asked and known, else ``log q - log p`` at the sample."""
    if closed_form:
        try:
            return scale_and_mask(kl_divergence(guide_site["fn"], model_site["fn"]), guide_site["scale"]).sum()
        except NotImplementedError:
            pass
    log_q = scale_and_mask(guide_site["fn"].log_prob(guide_site["value"]), guide_site["scale"], guide_site["mask"])
    log_p = scale_and_mask(model_site["fn"].log_prob(model_site["value"]), model_site["scale"], model_site["mask"])
    return log_q.sum() - log_p.sum()


class _RecordWithoutSampling(Messenger):
    """Give every latent site its distribution's mean instead of a random draw.

    Tracing a guide under this records its distributions (and registers its parameters with
    SVI's parameter capture) without spending random numbers on 478k weights.
    """

    def _pyro_sample(self, msg) -> None:
        if not msg["is_observed"]:
            msg["value"] = msg["fn"].mean
            msg["done"] = True


def _traced_posterior(guide, x, y, num_data: int) -> Posterior:
    """``(loc, scale)`` of every sample site of ``guide``, read off one trace of it."""
    with _RecordWithoutSampling():
        trace = poutine.trace(guide).get_trace(x, y, num_data)
    return {
        name: (site["fn"].base_dist.loc, site["fn"].base_dist.scale)
        for name, site in trace.nodes.items()
        if site["type"] == "sample"
    }


def _check_mean_field(guide) -> None:
    if not isinstance(guide, AutoMeanFieldNormal):
        raise ValueError(f"this estimator needs the 'meanfield' guide (a Gaussian at each weight site), got {type(guide).__name__}")


class MeanFieldOps:
    """How a training step computes the pieces of the objective that belong to a mean-field
    Gaussian guide ``q(w) = prod_sites N(loc, scale^2)``: the plain path, and the seam the fast
    path plugs into (:class:`FastMeanFieldOps`, :class:`CompiledMeanFieldOps`). A subclass changes
    how a piece is computed, never what: the same values to float rounding (tested).

    * :meth:`posterior`: ``(loc, scale)`` of every site, read off one trace of the guide
      (``scale = softplus(rho)`` by Pyro's constraint, torch's ``softplus``);
    * :meth:`kl`: ``KL(q || p)``, site by site through :meth:`gaussian_site_kl` (here autograd
      through :func:`gaussian_kl`);
    * :meth:`local_step`: the ``local`` estimator's whole step as one function, where a subclass
      has one (here never: ``None``);
    * :attr:`adam_kernel`: the kernel keyword of ``torch.optim.Adam`` on this path (any guide).
    """

    adam_kernel: ClassVar[dict[str, bool]] = {"foreach": True}

    def posterior(self, guide, x: torch.Tensor, y: torch.Tensor, num_data: int) -> Posterior:
        """``(loc, scale)`` of every site of the ``meanfield`` guide, differentiable, read off one
        trace of the guide (no random numbers spent: each site takes its mean)."""
        _check_mean_field(guide)
        return _traced_posterior(guide, x, y, num_data)

    def gaussian_site_kl(self, loc: torch.Tensor, scale: torch.Tensor, prior_loc: torch.Tensor, prior_scale: torch.Tensor) -> torch.Tensor:
        """``sum KL(N(loc, scale^2) || N(prior_loc, prior_scale^2))``
        ``= 1/2 sum [r + ((loc - prior_loc) / prior_scale)^2 - 1 - log r]``, ``r = (scale / prior_scale)^2``,
        differentiable in all four (autograd)."""
        return gaussian_kl(loc, scale, prior_loc, prior_scale).sum()

    def kl(self, model: BayesianMLP, posterior: Posterior) -> torch.Tensor:
        """``KL(q || p) = sum_sites KL(N(loc, scale^2) || p_site)``: :meth:`gaussian_site_kl` for a
        Gaussian prior (:func:`pyro_bbt.priors.prior_loc_scale`); for another prior (the scale
        mixture) a one-sample estimate ``log q(w) - log p(w)``, ``w = loc + scale * eps``."""
        kl = None
        for name, shape in model.site_shapes.items():
            loc, scale = posterior[name]
            gaussian_prior = prior_loc_scale(model.prior, name, shape)
            if gaussian_prior is not None:
                site_kl = self.gaussian_site_kl(loc, scale, *gaussian_prior)
            else:
                w = loc + scale * torch.randn_like(loc)
                site_kl = dist.Normal(loc, scale).log_prob(w).sum() - model.prior.site_distribution(name, shape).log_prob(w)
            kl = site_kl if kl is None else kl + site_kl
        return kl

    def local_step(self, model: BayesianMLP, guide, x: torch.Tensor, y: torch.Tensor, num_data: int, kl_weight: float,
                   num_particles: int) -> ELBOTerms | None:
        """The terms of :class:`LocalReparameterizationELBO`'s step computed as one function, or
        ``None``: compute them piece by piece (:meth:`posterior`, the forward, :meth:`kl`)."""
        return None

    def __repr__(self) -> str:
        return f"{type(self).__name__}()"


class FastMeanFieldOps(MeanFieldOps):
    """The fast path (:mod:`pyro_bbt.fused`): the posterior read off the guide's parameters,
    ``(loc, softplus(rho))`` with a ``log1p``-free softplus, instead of a trace; the Gaussian KL
    summed with its gradient written out; torch's fused Adam kernel. Falls back to the plain
    computation where it does not apply: a guide outside Pyro's ``AutoNormal`` family or not yet
    set up (the trace sets it up), a prior whose parameters are being learned."""

    adam_kernel: ClassVar[dict[str, bool]] = {"fused": True}

    def posterior(self, guide, x: torch.Tensor, y: torch.Tensor, num_data: int) -> Posterior:
        """:meth:`MeanFieldOps.posterior` read off the guide's parameters
        (:func:`pyro_bbt.fused.mean_field_loc_scale`)."""
        _check_mean_field(guide)
        if guide.prototype_trace is not None and supports_fast_path(guide):
            return mean_field_loc_scale(guide)
        return _traced_posterior(guide, x, y, num_data)

    def gaussian_site_kl(self, loc: torch.Tensor, scale: torch.Tensor, prior_loc: torch.Tensor, prior_scale: torch.Tensor) -> torch.Tensor:
        """:meth:`MeanFieldOps.gaussian_site_kl` with its backward written out
        (:func:`pyro_bbt.fused.gaussian_kl_sum`), for a prior held fixed; autograd otherwise."""
        if prior_loc.requires_grad or prior_scale.requires_grad:
            return super().gaussian_site_kl(loc, scale, prior_loc, prior_scale)
        return gaussian_kl_sum(loc, scale, prior_loc, prior_scale)


class CompiledMeanFieldOps(FastMeanFieldOps):
    """The fast path, with the ``local`` estimator's single-particle step as one function under
    ``torch.compile`` with ``backend`` (:func:`pyro_bbt.fused.local_elbo_terms`; ``"inductor"``:
    fused C++ kernels, ``"eager"``: traced by dynamo and run by eager torch, for tests). Where
    the step does not apply (several particles, a guide outside the ``AutoNormal`` family, a
    prior that is not Gaussian or is being learned at some site) it is :class:`FastMeanFieldOps`."""

    def __init__(self, backend: str = "inductor") -> None:
        if not isinstance(backend, str) or not backend:
            raise ValueError(f"backend must name a torch.compile backend, got {backend!r}")
        self.backend = backend

    def local_step(self, model: BayesianMLP, guide, x: torch.Tensor, y: torch.Tensor, num_data: int, kl_weight: float,
                   num_particles: int) -> ELBOTerms | None:
        """The step through :func:`pyro_bbt.fused.compiled_local_elbo_terms`, or ``None`` where it
        does not apply. Draws the same noise, in the same order, as the eager forward."""
        if num_particles != 1 or guide.prototype_trace is None or not supports_fast_path(guide):
            return None
        params = mean_field_loc_rho(guide)
        locs, rhos, prior_locs, prior_scales = [], [], [], []
        for name, shape in model.site_shapes.items():
            gaussian_prior = prior_loc_scale(model.prior, name, shape)
            if gaussian_prior is None or any(t.requires_grad for t in gaussian_prior) or name not in params:
                return None
            loc, rho = params[name]
            locs.append(loc)
            rhos.append(rho)
            for out, value in zip((prior_locs, prior_scales), gaussian_prior):
                scalar = broadcast_scalar(value)
                out.append(value if scalar is None else scalar)
        # the same draws, in the same order, as local_reparameterized_forward's randn_like per layer
        eps = [torch.randn(x.shape[0], layer.out_features, dtype=x.dtype, device=x.device) for layer in model.layers]
        rows = model.output_rows
        head = None if rows is None else (rows.start, rows.stop)
        loss, log_lik, weighted_kl, logits = compiled_local_elbo_terms(self.backend)(
            locs, rhos, prior_locs, prior_scales, x, y, eps, head, x.new_tensor(num_data / y.shape[0]), x.new_tensor(float(kl_weight)))
        return ELBOTerms(loss, log_lik.item(), weighted_kl.item(), logits.detach())

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.backend!r})"


def mean_field_ops(fast: bool = True, compile: bool | str = False) -> MeanFieldOps:
    """The seam for :class:`~pyro_bbt.inference.TrainConfig`'s ``fast`` and ``compile``:
    :class:`MeanFieldOps` when not ``fast`` (``compile`` is then ignored: it is a form of the
    fast path), else :class:`CompiledMeanFieldOps` when ``compile`` (``True``: inductor, or a
    ``torch.compile`` backend's name), else :class:`FastMeanFieldOps`."""
    if not fast:
        return MeanFieldOps()
    if compile:
        return CompiledMeanFieldOps("inductor" if compile is True else compile)
    return FastMeanFieldOps()


def mean_field_posterior(guide, x, y, num_data: int) -> Posterior:
    """``(loc, scale)`` of every site of a mean-field Gaussian guide, differentiable, read off one
    trace of the guide (:meth:`MeanFieldOps.posterior`)."""
    return MeanFieldOps().posterior(guide, x, y, num_data)


def closed_form_kl(model: BayesianMLP, posterior: Posterior) -> torch.Tensor:
    """``KL(q || p) = sum_sites KL(N(loc, scale^2) || p_site)``: closed form for a Gaussian prior,
    for another prior (the scale mixture) a one-sample estimate ``log q(w) - log p(w)``
    (:meth:`MeanFieldOps.kl`)."""
    return MeanFieldOps().kl(model, posterior)


def _categorical_log_lik(logits: torch.Tensor, y: torch.Tensor, num_data: int, num_particles: int) -> torch.Tensor:
    """``(N/B) (1/P) sum_p sum_n log Categorical(y_n | logits_{p,n})``."""
    return dist.Categorical(logits=logits).log_prob(y).sum() * (num_data / y.shape[0]) / num_particles


class WeightSamplingELBO(_Estimator):
    """Monte Carlo ELBO with ``P`` weight samples from the guide.

    ``L = (1/P) sum_p [ -log p(y | x, w_p) + pi * (log q(w_p) - log p(w_p)) ]``, ``w_p ~ q``.

    General path (any guide): the guide is traced under a particle plate at dim -2 (the model's
    data plate is at -1), the model replayed against it, and the terms of
    :class:`pyro.infer.Trace_ELBO` summed under :class:`KLScale`; with ``closed_form_kl=False``
    this is exactly ``Trace_ELBO`` (tested).

    Mean-field path (``closed_form_kl=True`` and the ``meanfield`` guide): the bracketed KL is
    replaced by ``pi * KL(q || p)`` in closed form, computed once rather than once per particle,
    and the ``P`` weight samples ``w_p = loc + scale * eps_p`` are pushed through the network in
    one batched matmul per layer.
    """

    def __init__(self, num_particles: int = 1, closed_form_kl: bool = True, ops: MeanFieldOps | None = None) -> None:
        super().__init__(num_particles, ops)
        self.closed_form_kl = closed_form_kl

    def terms(self, model, guide, x, y, num_data: int, kl_weight: float) -> ELBOTerms:
        if self.closed_form_kl and isinstance(guide, AutoMeanFieldNormal):
            return self._mean_field_terms(model, guide, x, y, num_data, kl_weight)
        return self._trace_terms(model, guide, x, y, num_data, kl_weight)

    def _mean_field_terms(self, model, guide, x, y, num_data: int, kl_weight: float) -> ELBOTerms:
        posterior = self.ops.posterior(guide, x, y, num_data)
        batch = () if self.num_particles == 1 else (self.num_particles,)
        weights = {name: loc + scale * torch.randn(batch + loc.shape, dtype=loc.dtype, device=loc.device) for name, (loc, scale) in posterior.items()}
        with poutine.condition(data=weights):
            logits = model.logits(x)
        log_lik = _categorical_log_lik(logits, y, num_data, self.num_particles)
        kl = kl_weight * self.ops.kl(model, posterior) if kl_weight > 0 else x.new_zeros(())
        return ELBOTerms(kl - log_lik, log_lik.item(), kl.item(), logits.detach())

    def _trace_terms(self, model, guide, x, y, num_data: int, kl_weight: float) -> ELBOTerms:
        particles = (
            pyro.plate("particles", self.num_particles, dim=-2) if self.num_particles > 1 else nullcontext()
        )
        with KLScale(kl_weight), particles:
            guide_trace = poutine.trace(guide).get_trace(x, y, num_data)
            model_trace = poutine.trace(poutine.replay(model, trace=guide_trace)).get_trace(x, y, num_data)
        logits = model_trace.nodes["_RETURN"]["value"].detach()
        guide_trace, model_trace = prune_subsample_sites(guide_trace), prune_subsample_sites(model_trace)
        log_lik = x.new_zeros(())
        kl = x.new_zeros(())
        for name, site in model_trace.nodes.items():
            if site["type"] != "sample":
                continue
            if site["is_observed"]:
                log_lik = log_lik + scale_and_mask(site["fn"].log_prob(site["value"]), site["scale"], site["mask"]).sum()
            else:
                kl = kl + _site_kl(guide_trace.nodes[name], site, self.closed_form_kl)
        for name, site in guide_trace.nodes.items():
            if site["type"] == "sample" and name not in model_trace.nodes:  # auxiliary guide sites
                kl = kl + scale_and_mask(site["fn"].log_prob(site["value"]), site["scale"], site["mask"]).sum()
        log_lik, kl = log_lik / self.num_particles, kl / self.num_particles
        return ELBOTerms(kl - log_lik, log_lik.item(), kl.item(), logits)


class LocalReparameterizationELBO(_Estimator):
    """The weighted ELBO with local reparameterisation and closed-form KL.

    ``L = -(N/B) (1/P) sum_p sum_n log p(y_n | a_{n,p}) + pi * KL(q || p)`` where the
    pre-activations ``a`` are sampled per example from their exact Gaussian given the layer's
    input (:meth:`BayesianMLP.local_reparameterized_logits`). Its expectation equals that of
    :class:`WeightSamplingELBO`; its variance is lower and one sample costs about two
    deterministic forward passes. Needs the ``meanfield`` guide.
    """

    def terms(self, model: BayesianMLP, guide, x, y, num_data: int, kl_weight: float) -> ELBOTerms:
        step = self.ops.local_step(model, guide, x, y, num_data, kl_weight, self.num_particles)
        if step is not None:
            return step
        posterior = self.ops.posterior(guide, x, y, num_data)
        logits = model.local_reparameterized_logits(x, posterior, self.num_particles)
        log_lik = _categorical_log_lik(logits, y, num_data, self.num_particles)
        kl = kl_weight * self.ops.kl(model, posterior) if kl_weight > 0 else x.new_zeros(())
        return ELBOTerms(kl - log_lik, log_lik.item(), kl.item(), logits.detach())


def make_estimator(name: str, guide, num_particles: int = 1, ops: MeanFieldOps | None = None) -> WeightSamplingELBO | LocalReparameterizationELBO:
    """The estimator called ``name`` (one of :data:`ESTIMATORS`) for ``guide``, computing its
    mean-field pieces with ``ops`` (default: the plain :class:`MeanFieldOps`; :func:`mean_field_ops`
    for the fast path or the compiled step: the same values to float rounding)."""
    if name == "weights":
        return WeightSamplingELBO(num_particles, closed_form_kl=has_closed_form_kl(guide), ops=ops)
    if name == "local":
        if not has_closed_form_kl(guide):
            raise ValueError(f"estimator 'local' needs the 'meanfield' guide, got {type(guide).__name__}")
        return LocalReparameterizationELBO(num_particles, ops=ops)
    raise ValueError(f"unknown estimator {name!r}; allowed: {', '.join(ESTIMATORS)}")
