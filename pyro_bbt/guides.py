"""Variational posteriors q(w) over the network's weights, chosen by name.

=============  ============================================================================
name           q(w)
=============  ============================================================================
``normal``     Pyro's :class:`~pyro.infer.autoguide.AutoNormal`: ``N(loc, diag(scale^2))``
               sampled as an auxiliary site plus a ``Delta`` at the weight site, so its KL
               is always a Monte Carlo estimate.
``meanfield``  :class:`AutoMeanFieldNormal`: the same family, but ``Normal`` is sampled *at*
               the weight site, so ``KL(q || p)`` is available in closed form for Gaussian
               priors (and local reparameterisation applies).
``lowrank``    :class:`~pyro.infer.autoguide.AutoLowRankMultivariateNormal`:
               ``N(loc, D + F F^T)`` with ``F`` of shape ``(dim, rank)``. Memory is
               ``(rank + 2) * dim`` floats: for the 478k weights of 784-400-400-5 and rank 10,
               about 23 MB.
``planar``     :class:`AutoFlowNormal` with ``K`` planar flows (Rezende & Mohamed 2015) on top
               of a diagonal Normal over all weights: ``w = f_K(...f_1(loc + scale * eps))``,
               ``f(z) = z + u tanh(w^T z + b)``. ``3 * dim`` parameters per flow.
``iaf``        Inverse autoregressive flow (Kingma et al. 2016) on the **output layer** only,
               mean-field Normal elsewhere. An IAF's MADE needs hidden width >= its input
               dimension; over all 478k weights its weight matrices would hold ~dim^2 numbers
               (terabytes), so it is restricted to the ~2k output-layer weights.
``delta``      :class:`~pyro.infer.autoguide.AutoDelta`: MAP estimation.
=============  ============================================================================

:func:`posterior_loc_scale` returns each guide's per-site location and scale, which transfer
copies into the next task's prior. It is exact for the Gaussian guides (for ``lowrank`` the
marginal scale ``sqrt(D + rowsum(F^2))``), moment-matched from samples for the flows, and for
``delta`` the MAP value with the *prior's* scale at that site (a MAP fit has no width of its own;
this convention recentres the prior at the MAP estimate).
"""

from __future__ import annotations

import math
from collections.abc import Callable
from contextlib import ExitStack
from dataclasses import dataclass
from functools import partial

import pyro
import pyro.distributions as dist
import torch
from pyro import poutine
from pyro.distributions.transforms import AffineAutoregressive, Planar, affine_autoregressive
from pyro.infer.autoguide import (
    AutoContinuous,
    AutoDelta,
    AutoGuide,
    AutoGuideList,
    AutoLowRankMultivariateNormal,
    AutoNormal,
)
from pyro.nn import PyroParam
from pyro.infer.autoguide.utils import deep_setattr  # how AutoNormal stores a site's parameters
from torch import nn
from pyro.distributions import constraints

from .model import BayesianMLP
from .priors import PerSitePrior, Prior
from .pyro_internals import (
    continuous_init_loc,
    continuous_loc_scale,
    create_plates,
    event_dims,
    loc_and_scale,
    unconstrained_shapes,
    unpack_latent,
)

__all__ = [
    "GUIDES",
    "parameter_group_roles",
    "GuideConfig",
    "AutoMeanFieldNormal",
    "AutoFlowNormal",
    "make_guide",
    "init_to_fan_in_uniform",
    "posterior_loc_scale",
    "has_closed_form_kl",
    "posterior_as_prior",
    "initialize_guide",
    "guide_parameters",
    "is_scale_parameter",
    "is_flow_parameter",
    "guide_parameter_groups",
    "start_from_posterior",
    "FLOW_GUIDES",
    "WARM_GUIDES",
]

GUIDES = ("normal", "meanfield", "lowrank", "planar", "iaf", "delta")
FLOW_GUIDES = ("planar", "iaf")  # guides with flow transforms (parameters of their own, see is_flow_parameter)
WARM_GUIDES = ("lowrank", "planar", "iaf")  # guides whose family contains the mean-field Gaussian (start_from_posterior)


@dataclass
class GuideConfig:
    """Settings shared by the guides.

    :param init_scale: initial posterior standard deviation of every weight.
    :param rank: rank of the ``lowrank`` guide's covariance factor.
    :param num_flows: number of planar flows (``planar``; 16 as the original).
    :param iaf_flows: number of IAF blocks (``iaf``). Each block's MADE has about
        ``3 * factor * d^2`` weights for the output layer's ``d = 2005`` latents (24M at factor 2),
        so 16 blocks would hold ~1.5 GB of parameters and make each Adam step slow.
    :param iaf_hidden_factor: IAF hidden width as a multiple of the output layer's dimension.
    :param moment_samples: samples used to moment-match flows in :func:`posterior_loc_scale`.
    """

    init_scale: float = 0.01
    rank: int = 10
    num_flows: int = 16
    iaf_flows: int = 2
    iaf_hidden_factor: int = 2
    moment_samples: int = 256

    def __post_init__(self) -> None:
        if not (math.isfinite(self.init_scale) and self.init_scale > 0):
            raise ValueError(f"init_scale must be finite and > 0, got {self.init_scale!r}")
        for name in ("rank", "num_flows", "iaf_flows", "iaf_hidden_factor", "moment_samples"):
            value = getattr(self, name)
            if not isinstance(value, int) or value < 1:
                raise ValueError(f"{name} must be an integer >= 1, got {value!r}")


def init_to_fan_in_uniform(site: dict | None = None) -> torch.Tensor:
    """Initial weights as ``nn.Linear`` draws them: ``U(-1/sqrt(fan_in), 1/sqrt(fan_in))`` for
    matrices, zeros for biases. Sampling from an ``N(0, 1)`` prior instead would give
    pre-activations of standard deviation ~28 in the first layer."""
    if site is None:
        return init_to_fan_in_uniform
    shape = site["fn"].event_shape
    anchor = site["fn"].sample().detach()
    if len(shape) < 2:
        return torch.zeros_like(anchor)
    bound = 1.0 / math.sqrt(shape[-1])
    return torch.empty_like(anchor).uniform_(-bound, bound)


class AutoMeanFieldNormal(AutoNormal):
    """Mean-field Gaussian ``q(w) = prod_site N(w_site | loc_site, diag(scale_site^2))``.

    Unlike :class:`~pyro.infer.autoguide.AutoNormal`, the ``Normal`` is sampled directly at each
    model site (weights have real support, so no transform is needed). Hence
    :class:`~pyro.infer.TraceMeanField_ELBO` computes ``KL(q || p)`` in closed form against a
    Gaussian prior, and the local-reparameterisation estimator can read ``(loc, scale)``.

    Usage::

        guide = AutoMeanFieldNormal(model, init_scale=0.01)
        svi = SVI(model, guide, Adam({"lr": 1e-3}), TraceMeanField_ELBO())
    """

    def __init__(self, model, *, init_loc_fn=init_to_fan_in_uniform, init_scale: float = 0.01, create_plates=None):
        super().__init__(model, init_loc_fn=init_loc_fn, init_scale=float(init_scale), create_plates=create_plates)

    def _setup_prototype(self, *args, **kwargs) -> None:
        super()._setup_prototype(*args, **kwargs)
        for name, site in self.prototype_trace.iter_stochastic_nodes():
            if site["fn"].support is not constraints.real and not isinstance(
                site["fn"].support, constraints.independent
            ):
                raise ValueError(f"AutoMeanFieldNormal needs real-valued sites; {name!r} has support {site['fn'].support}")

    def get_loc_scale(self, name: str) -> tuple[torch.Tensor, torch.Tensor]:
        """``(loc, scale)`` of ``q(w_site)``."""
        return loc_and_scale(self, name)

    def forward(self, *args, **kwargs) -> dict[str, torch.Tensor]:
        if self.prototype_trace is None:
            self._setup_prototype(*args, **kwargs)
        plates = create_plates(self, *args, **kwargs)
        result = {}
        for name, site in self.prototype_trace.iter_stochastic_nodes():
            with ExitStack() as stack:
                for frame in site["cond_indep_stack"]:
                    if frame.vectorized:
                        stack.enter_context(plates[frame.name])
                loc, scale = loc_and_scale(self, name)
                result[name] = pyro.sample(name, dist.Normal(loc, scale).to_event(event_dims(self)[name]))
        return result


class AutoFlowNormal(AutoContinuous):
    """Normalizing-flow posterior over all latent sites, packed into one vector ``z``:

    ``z0 ~ N(loc, diag(scale^2))``, ``z = T_K o ... o T_1 (z0)``.

    The diagonal Normal base is initialised like the mean-field guide (``init_loc_fn``,
    ``init_scale``) so that a flow starts as a sensible mean-field posterior; ``transform_fn(dim)``
    builds the transforms (e.g. planar flows). Pyro's ``AutoNormalizingFlow`` starts from
    ``N(0, I)`` instead, which for a weight vector means unit-variance weights.
    """

    scale_constraint = constraints.softplus_positive

    def __init__(
        self,
        model,
        transform_fn: Callable[[int], list],
        *,
        init_loc_fn=init_to_fan_in_uniform,
        init_scale: float = 0.01,
    ):
        self._transform_fn = transform_fn
        self._init_scale = float(init_scale)
        super().__init__(model, init_loc_fn=init_loc_fn)

    def _setup_prototype(self, *args, **kwargs) -> None:
        super()._setup_prototype(*args, **kwargs)
        self.loc = nn.Parameter(continuous_init_loc(self))
        self.scale = PyroParam(self.loc.new_full((self.latent_dim,), self._init_scale), self.scale_constraint)
        self.flows = nn.ModuleList(self._transform_fn(self.latent_dim)).to(self.loc.device)

    def get_base_dist(self):
        return dist.Normal(self.loc, self.scale).to_event(1)

    def get_posterior(self, *args, **kwargs):
        return dist.TransformedDistribution(self.get_base_dist(), list(self.flows))

    def _loc_scale(self, *args, **kwargs):
        raise NotImplementedError("a flow has no closed-form marginals; use posterior_loc_scale (moment matching)")


def planar_flows(num_flows: int, dim: int) -> list:
    return [Planar(dim) for _ in range(num_flows)]


def iaf_flows(num_flows: int, hidden_factor: int, dim: int) -> list:
    return [affine_autoregressive(dim, hidden_dims=[hidden_factor * dim]) for _ in range(num_flows)]


def make_guide(name: str, model: BayesianMLP, config: GuideConfig | None = None) -> AutoGuide:
    """Build the guide called ``name`` (one of :data:`GUIDES`) for ``model``."""
    config = config or GuideConfig()
    if name == "normal":
        return AutoNormal(model, init_loc_fn=init_to_fan_in_uniform, init_scale=config.init_scale)
    if name == "meanfield":
        return AutoMeanFieldNormal(model, init_scale=config.init_scale)
    if name == "lowrank":
        return AutoLowRankMultivariateNormal(
            model, init_loc_fn=init_to_fan_in_uniform, init_scale=config.init_scale, rank=config.rank
        )
    if name == "planar":
        return AutoFlowNormal(model, partial(planar_flows, config.num_flows), init_scale=config.init_scale)
    if name == "iaf":
        output_sites = list(model.output_sites)
        guide = AutoGuideList(model)
        guide.append(AutoMeanFieldNormal(poutine.block(model, hide=output_sites), init_scale=config.init_scale))
        guide.append(
            AutoFlowNormal(
                poutine.block(model, expose=output_sites),
                partial(iaf_flows, config.iaf_flows, config.iaf_hidden_factor),
                init_scale=config.init_scale,
            )
        )
        return guide
    if name == "delta":
        return AutoDelta(model, init_loc_fn=init_to_fan_in_uniform)
    raise ValueError(f"unknown guide {name!r}; allowed: {', '.join(GUIDES)}")


def has_closed_form_kl(guide: AutoGuide) -> bool:
    """Whether ``guide`` samples Gaussians at the weight sites (closed-form KL, local reparameterisation)."""
    return isinstance(guide, AutoMeanFieldNormal)


@torch.no_grad()
def posterior_loc_scale(
    guide: AutoGuide, model: BayesianMLP, num_samples: int = 256
) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    """Per-site ``(loc, scale)`` of the fitted posterior, detached.

    The guide must have been run at least once (its parameters exist). Conventions:
    Gaussian guides -- exact mean and marginal standard deviation; flows -- sample mean and
    standard deviation over ``num_samples`` draws; ``delta`` -- the MAP value with the prior's
    marginal standard deviation at that site.
    """
    if guide.prototype_trace is None:
        raise ValueError("the guide has not been run yet: call it once (or train it) before reading its posterior")
    if isinstance(guide, AutoGuideList):
        result: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}
        for part in guide:
            result.update(posterior_loc_scale(part, model, num_samples))
        return result
    if isinstance(guide, AutoNormal):  # includes AutoMeanFieldNormal
        return {
            name: tuple(t.detach().clone() for t in loc_and_scale(guide, name))
            for name, _ in guide.prototype_trace.iter_stochastic_nodes()
        }
    if isinstance(guide, AutoDelta):
        shapes = model.site_shapes
        result = {}
        for name, value in guide.median().items():
            prior_std = model.prior.site_distribution(name, shapes[name]).base_dist.stddev
            result[name] = (value.detach().clone(), prior_std.expand(shapes[name]).detach().clone())
        return result
    if isinstance(guide, AutoFlowNormal):
        samples = guide.get_posterior().sample((num_samples,))
        loc = unpack_latent(guide, samples.mean(0))
        scale = unpack_latent(guide, samples.std(0))
        return {name: (loc[name].clone(), scale[name].clone()) for name in loc}
    if isinstance(guide, AutoContinuous):
        loc_vec, scale_vec = continuous_loc_scale(guide)
        loc, scale = unpack_latent(guide, loc_vec.detach()), unpack_latent(guide, scale_vec.detach())
        return {name: (loc[name].clone(), scale[name].clone()) for name in loc}
    raise TypeError(f"no posterior_loc_scale rule for guide type {type(guide).__name__}")


def posterior_as_prior(
    guide: AutoGuide,
    model: BayesianMLP,
    tau: float = 1.0,
    fallback: Prior | None = None,
    sites: tuple[str, ...] | None = None,
) -> PerSitePrior:
    """Transfer: the fitted posterior of one task becomes the prior of the next.

    ``p_B(w_site) = N(w_site | loc_A, (tau * scale_A)^2)`` with ``(loc_A, scale_A)`` from
    :func:`posterior_loc_scale`. ``tau >= 1`` broadens the prior (``tau = 1``: exactly ``q_A``).
    Only ``sites`` (default: all) are transferred; the others get ``fallback``.
    """
    tau = float(tau)
    if not (math.isfinite(tau) and tau >= 1.0):
        raise ValueError(f"prior broadening tau must be finite and >= 1, got {tau!r}")
    posterior = posterior_loc_scale(guide, model)
    chosen = tuple(posterior) if sites is None else sites
    unknown = set(chosen) - set(posterior)
    if unknown:
        raise ValueError(f"unknown sites {sorted(unknown)}; the posterior has {sorted(posterior)}")
    return PerSitePrior(
        {site: posterior[site][0] for site in chosen},
        {site: tau * posterior[site][1] for site in chosen},
        fallback=fallback,
    )


def guide_parameters(guide: AutoGuide) -> list[torch.nn.Parameter]:
    """The unconstrained tensors that training optimises, in a fixed order: the guide's
    ``nn.Module`` parameters (for every guide in :data:`GUIDES` these are exactly the
    parameters :class:`pyro.infer.SVI` would capture from the param store; tested). The guide
    must be initialised (:func:`initialize_guide`)."""
    parameters = list(guide.parameters())
    if not parameters:
        raise ValueError("the guide has no parameters yet: call initialize_guide(guide, input_dim) first")
    return parameters


_SCALE_PARAMETER_PARTS = frozenset({"scales", "scale_unconstrained", "cov_factor"})


def is_scale_parameter(name: str) -> bool:
    """Whether the guide parameter called ``name`` (as ``guide.named_parameters()`` spells it)
    sets a posterior width: AutoNormal's and the mean-field guide's ``scales``, the diagonal
    ``scale`` of the low-rank guide and of the flows' base Normal, and the low-rank factor ``F``
    (whose rows add ``rowsum(F^2)`` to the marginal variance)."""
    return not _SCALE_PARAMETER_PARTS.isdisjoint(name.split("."))


def is_flow_parameter(name: str) -> bool:
    """Whether the guide parameter called ``name`` belongs to a flow's transforms (``planar``'s
    ``u, w, b``; ``iaf``'s MADE weights) rather than to its base Normal."""
    return "flows" in name.split(".")


def guide_parameter_groups(guide: AutoGuide, lr: float, scale_lr: float | None = None, flow_lr: float | None = None) -> list[dict]:
    """Adam parameter groups: the width parameters (:func:`is_scale_parameter`) at ``scale_lr``,
    the flows' transform parameters (:func:`is_flow_parameter`) at ``flow_lr``, everything else
    at ``lr`` (``None``: ``lr``); empty groups are left out. The union is
    :func:`guide_parameters`, in the same order within each group.

    Why a learning rate for the widths: Adam moves an unconstrained parameter by about ``lr`` per
    step, and the scales are stored as ``softplus^{-1}(sigma)``, which near ``sigma = 0.01`` is
    ``log sigma`` to within 1 %. Taking ``sigma`` from 0.01 to a prior's 1 is a move of about
    4.6 in ``log sigma``: 4,600 steps at ``lr = 1e-3`` when every gradient points the same way.

    Why one for the flows: a planar flow ``f(z) = z + u tanh(w^T z + b)`` over ``d`` weights has
    direction vectors ``u, w`` of ``d`` coordinates each, and Adam moves every coordinate by about
    ``lr``: one step changes ``||u||`` by about ``lr sqrt(d)`` (7 for ``d = 478k`` at ``lr = 1e-2``),
    so ``w^T z`` saturates the tanh and each draw shifts *every* weight by ``+-u``. At q_A's
    ``lr = 1e-2`` the ELBO of ``planar`` jumped by orders of magnitude in its first epochs and
    ended on plateaus at 0.24--0.71 accuracy; ``iaf``'s MADE behaved alike (a 4,010-wide last
    layer moved by ``lr`` per weight moves its outputs by up to ``4010 lr``). With the flows at
    1e-3, ``planar`` fitted afresh learns (seed 0: 0.988 test accuracy after 60 epochs); the
    uncertainty study starts the flows at the fitted mean-field posterior with them at 1e-5
    (:func:`pyro_bbt.uncertainty_study.fit_guide`).
    """
    rates = {"locations": lr, "widths": lr if scale_lr is None else scale_lr, "flows": lr if flow_lr is None else flow_lr}
    return [{"params": params, "lr": rates[role]} for role, params in _parameter_groups(guide)]


def parameter_group_roles(guide: AutoGuide) -> list[str]:
    """What each group of :func:`guide_parameter_groups` holds, in its order: ``"locations"``
    (everything not a width or a flow), ``"widths"`` or ``"flows"``."""
    return [role for role, _ in _parameter_groups(guide)]


def _parameter_groups(guide: AutoGuide) -> list[tuple[str, list[torch.nn.Parameter]]]:
    named = list(guide.named_parameters())
    if not named:
        raise ValueError("the guide has no parameters yet: call initialize_guide(guide, input_dim) first")
    flows = [p for n, p in named if is_flow_parameter(n)]
    scales = [p for n, p in named if is_scale_parameter(n) and not is_flow_parameter(n)]
    others = [p for n, p in named if not is_scale_parameter(n) and not is_flow_parameter(n)]
    return [(role, params) for role, params in (("locations", others), ("widths", scales), ("flows", flows)) if params]


@torch.no_grad()
def start_from_posterior(guide: AutoGuide, posterior: dict[str, tuple[torch.Tensor, torch.Tensor]]) -> AutoGuide:
    """Start ``guide`` at a fitted Gaussian posterior: per site ``(loc, scale)`` (e.g.
    :func:`posterior_loc_scale` of a fitted ``meanfield`` guide) become the locations and widths
    of the Gaussian guides and of the flows' base Normal, and every IAF starts as the identity
    (its MADE's last layer zeroed: ``mean = 0``, ``log scale = 0``, Kingma et al. 2016's
    near-identity start); ``lowrank``'s covariance ``diag(s) (F F^T + I) diag(s)`` starts with
    ``F = 0``, i.e. exactly at the mean-field posterior. A planar flow keeps its own small random
    start (``f(z) = z + u_hat tanh(w^T z + b)`` with ``|u|, |w| <= d^{-1/2}`` per coordinate).

    So a richer guide fitted from here starts at the mean-field optimum and can only be judged by
    how far it moves from it. The guide must be initialised (:func:`initialize_guide`); every site of the
    guide must be in ``posterior`` with its shape, else ``ValueError`` naming it.
    """
    if guide.prototype_trace is None:
        raise ValueError("the guide has not been run yet: call initialize_guide(guide, input_dim) first")
    if isinstance(guide, AutoGuideList):
        for part in guide:
            start_from_posterior(part, posterior)
        return guide
    sites = [name for name, _ in guide.prototype_trace.iter_stochastic_nodes()]
    for name in sites:
        if name not in posterior:
            raise ValueError(f"site {name!r} of the guide is not in the posterior to start from (it has {sorted(posterior)})")
    if isinstance(guide, AutoNormal):  # includes AutoMeanFieldNormal
        for name in sites:
            loc, scale = loc_and_scale(guide, name)
            new_loc, new_scale = posterior[name]
            if new_loc.shape != loc.shape or new_scale.shape != scale.shape:
                raise ValueError(f"site {name!r}: the posterior's shape {tuple(new_loc.shape)} differs from the guide's {tuple(loc.shape)}")
            event_dim = event_dims(guide)[name]
            deep_setattr(guide.locs, name, PyroParam(new_loc.detach().clone().to(loc), event_dim=event_dim))
            deep_setattr(guide.scales, name, PyroParam(new_scale.detach().clone().to(scale), constraint=guide.scale_constraint, event_dim=event_dim))
        return guide
    if isinstance(guide, (AutoFlowNormal, AutoLowRankMultivariateNormal)):
        shapes = unconstrained_shapes(guide)
        for name in sites:
            if tuple(posterior[name][0].shape) != tuple(shapes[name]):
                raise ValueError(f"site {name!r}: the posterior's shape {tuple(posterior[name][0].shape)} differs from the guide's {tuple(shapes[name])}")
        loc = torch.cat([posterior[name][0].reshape(-1) for name in sites]).to(guide.loc)
        scale = torch.cat([posterior[name][1].reshape(-1) for name in sites]).to(guide.loc)
        guide.loc.data.copy_(loc)
        guide.scale = PyroParam(scale, guide.scale_constraint)
        if isinstance(guide, AutoLowRankMultivariateNormal):  # cov = diag(s) (F F^T + I) diag(s): F = 0 is the mean-field start
            guide.cov_factor.data.zero_()
            return guide
        for flow in guide.flows:
            if isinstance(flow, AffineAutoregressive):
                last = flow.arn.layers[-1]
                last.weight.zero_()
                last.bias.zero_()
        return guide
    raise TypeError(f"start_from_posterior has no rule for guide type {type(guide).__name__}")


def initialize_guide(guide: AutoGuide, input_dim: int) -> AutoGuide:
    """Create the guide's parameters now (Pyro guides otherwise do it on their first call), by
    running it once on a dummy labelled example; nothing is recorded by outer handlers."""
    if guide.prototype_trace is None:
        x = torch.zeros(1, input_dim)
        with poutine.block():
            guide(x, torch.zeros(1, dtype=torch.long), 1)
    return guide
