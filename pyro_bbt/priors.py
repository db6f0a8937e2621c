"""Weight priors p(w) for the Bayesian MLP.

A prior maps a weight site (its name, such as ``"layers.0.weight"``, and its shape) to a
distribution whose event shape is the site's shape. Three families:

* :class:`GaussianPrior` -- isotropic ``N(0, sigma^2)``, ``sigma`` per layer allowed;
* :class:`ScaleMixturePrior` -- Blundell et al. (2015):
  ``pi * N(0, sigma1^2) + (1 - pi) * N(0, sigma2^2)`` independently per weight;
* :class:`PerSitePrior` -- ``N(loc_site, scale_site^2)`` with one loc and scale per weight,
  which is what posterior-as-prior transfer builds from a fitted guide.

Priors are ``nn.Module``\\ s holding their tensors as buffers, so they move with ``.to(device)``
and are saved in ``state_dict``.
"""

from __future__ import annotations

import math
from collections.abc import Mapping

import pyro.distributions as dist
import torch
from pyro.distributions import constraints
from torch import nn

__all__ = [
    "Prior",
    "GaussianPrior",
    "ScaleMixturePrior",
    "PerSitePrior",
    "prior_loc_scale",
]


def _check_positive(name: str, value: float) -> float:
    value = float(value)
    if not math.isfinite(value) or value <= 0:
        raise ValueError(f"{name} must be a finite number > 0, got {value!r}")
    return value


class Prior(nn.Module):
    """Base class: ``site_distribution(name, shape)`` returns ``p(w_site)`` with event shape ``shape``."""

    def site_distribution(self, name: str, shape: torch.Size) -> dist.TorchDistribution:
        raise NotImplementedError

    def describe(self) -> dict:
        """A JSON-serialisable description (saved in configs and checkpoints)."""
        raise NotImplementedError

    def _anchor(self) -> torch.Tensor:
        return self.get_buffer("_device_anchor")


class GaussianPrior(Prior):
    """Isotropic Gaussian prior ``w ~ N(0, sigma^2 I)``.

    :param scale: the default ``sigma`` for every site.
    :param layer_scales: optional overrides by site-name prefix, e.g. ``{"layers.2": 0.1}`` gives
        both ``layers.2.weight`` and ``layers.2.bias`` ``sigma = 0.1``.
    """

    def __init__(self, scale: float = 1.0, layer_scales: Mapping[str, float] | None = None):
        super().__init__()
        self.scale = _check_positive("prior scale", scale)
        self.layer_scales = {k: _check_positive(f"prior scale of {k!r}", v) for k, v in (layer_scales or {}).items()}
        self.register_buffer("_device_anchor", torch.zeros(()))

    def site_scale(self, name: str) -> float:
        for prefix, value in self.layer_scales.items():
            if name == prefix or name.startswith(prefix + "."):
                return value
        return self.scale

    def site_distribution(self, name: str, shape: torch.Size) -> dist.TorchDistribution:
        zero = self._anchor()
        return dist.Normal(zero, zero + self.site_scale(name)).expand(shape).to_event(len(shape))

    def describe(self) -> dict:
        return {"type": "gaussian", "scale": self.scale, "layer_scales": dict(self.layer_scales)}


class _RealMixtureSameFamily(dist.MixtureSameFamily):
    """A mixture of real-valued components, declaring its support as the real line. Torch reports
    ``MixtureSameFamilyConstraint(real)`` instead, for which no bijection is registered, so every
    autoguide (which calls ``biject_to(site.support)`` when it sets up) would reject the site."""

    support = constraints.real


class ScaleMixturePrior(Prior):
    """Blundell et al. (2015) scale mixture, independently for every weight:

    ``p(w) = pi * N(w | 0, sigma1^2) + (1 - pi) * N(w | 0, sigma2^2)``, with ``sigma1 > sigma2``
    typically (a wide component and a spike near zero). The paper's MNIST choice is
    ``pi = 0.5, sigma1 = exp(0), sigma2 = exp(-6)``. No closed-form KL to a Gaussian exists, so the
    ELBO's KL term for this prior is estimated by Monte Carlo.
    """

    def __init__(self, pi: float = 0.5, sigma1: float = 1.0, sigma2: float = math.exp(-6)):
        super().__init__()
        pi = float(pi)
        if not 0.0 < pi < 1.0:
            raise ValueError(f"mixture weight pi must lie in (0, 1), got {pi!r}")
        self.pi = pi
        self.sigma1 = _check_positive("sigma1", sigma1)
        self.sigma2 = _check_positive("sigma2", sigma2)
        self.register_buffer("_device_anchor", torch.zeros(()))

    def site_distribution(self, name: str, shape: torch.Size) -> dist.TorchDistribution:
        zero = self._anchor()
        mixing = dist.Categorical(probs=torch.stack([zero + self.pi, zero + 1.0 - self.pi]))
        components = dist.Normal(torch.stack([zero, zero]), torch.stack([zero + self.sigma1, zero + self.sigma2]))
        return _RealMixtureSameFamily(mixing, components).expand(shape).to_event(len(shape))

    @property
    def stddev(self) -> float:
        """Marginal standard deviation ``sqrt(pi sigma1^2 + (1 - pi) sigma2^2)``."""
        return math.sqrt(self.pi * self.sigma1**2 + (1 - self.pi) * self.sigma2**2)

    def describe(self) -> dict:
        return {"type": "scale_mixture", "pi": self.pi, "sigma1": self.sigma1, "sigma2": self.sigma2}


def _buffer_name(site: str) -> str:
    return site.replace(".", "__")


class PerSitePrior(Prior):
    """Gaussian prior with its own location and scale per weight:

    ``p(w_site) = N(w_site | loc_site, diag(scale_site^2))``.

    This is the prior that transfer builds from task A's posterior. Sites missing from
    ``locs`` (for instance a new output head) use ``fallback``.

    :param locs: site name -> tensor of the site's shape.
    :param scales: site name -> positive tensor of the same shape.
    :param fallback: prior for any other site (``None``: such a site is an error).
    """

    def __init__(
        self,
        locs: Mapping[str, torch.Tensor],
        scales: Mapping[str, torch.Tensor],
        fallback: Prior | None = None,
    ):
        super().__init__()
        if set(locs) != set(scales):
            raise ValueError(f"locs and scales must name the same sites, got {sorted(locs)} and {sorted(scales)}")
        self.sites = tuple(locs)
        for site in self.sites:
            loc, scale = torch.as_tensor(locs[site]), torch.as_tensor(scales[site])
            if loc.shape != scale.shape:
                raise ValueError(f"site {site!r}: loc shape {tuple(loc.shape)} != scale shape {tuple(scale.shape)}")
            if not torch.isfinite(loc).all():
                raise ValueError(f"site {site!r}: loc has non-finite values")
            if not (torch.isfinite(scale).all() and (scale > 0).all()):
                raise ValueError(f"site {site!r}: scale must be finite and > 0 everywhere")
            self.register_buffer("loc__" + _buffer_name(site), loc.detach().clone())
            self.register_buffer("scale__" + _buffer_name(site), scale.detach().clone())
        self.fallback = fallback
        self.register_buffer("_device_anchor", torch.zeros(()))

    def loc(self, site: str) -> torch.Tensor:
        return self.get_buffer("loc__" + _buffer_name(site))

    def scale(self, site: str) -> torch.Tensor:
        return self.get_buffer("scale__" + _buffer_name(site))

    def site_distribution(self, name: str, shape: torch.Size) -> dist.TorchDistribution:
        if name not in self.sites:
            if self.fallback is None:
                raise KeyError(f"PerSitePrior has no site {name!r}; it has {list(self.sites)}")
            return self.fallback.site_distribution(name, shape)
        loc, scale = self.loc(name), self.scale(name)
        if loc.shape != torch.Size(shape):
            raise ValueError(f"prior for site {name!r} has shape {tuple(loc.shape)}, the model asks for {tuple(shape)}")
        return dist.Normal(loc, scale).to_event(len(shape))

    def describe(self) -> dict:
        return {
            "type": "per_site",
            "sites": list(self.sites),
            "fallback": None if self.fallback is None else self.fallback.describe(),
        }


def prior_loc_scale(prior: Prior, name: str, shape: torch.Size) -> tuple[torch.Tensor, torch.Tensor] | None:
    """The prior's Gaussian ``(loc, scale)`` at a site, or ``None`` if it is not Gaussian there."""
    if isinstance(prior, PerSitePrior):
        if name in prior.sites:
            return prior.loc(name), prior.scale(name)
        return None if prior.fallback is None else prior_loc_scale(prior.fallback, name, shape)
    if isinstance(prior, GaussianPrior):
        zero = prior._anchor()
        return zero.expand(shape), (zero + prior.site_scale(name)).expand(shape)
    return None


def build_prior(description: Mapping) -> Prior:
    """Rebuild a :class:`GaussianPrior` or :class:`ScaleMixturePrior` from :meth:`Prior.describe`.

    A :class:`PerSitePrior` also needs its tensors: load it with :func:`pyro_bbt.checkpoint.load`.
    """
    kind = description.get("type")
    if kind == "gaussian":
        return GaussianPrior(description["scale"], description.get("layer_scales"))
    if kind == "scale_mixture":
        return ScaleMixturePrior(description["pi"], description["sigma1"], description["sigma2"])
    raise ValueError(f"cannot rebuild a prior of type {kind!r} from its description alone; allowed: gaussian, scale_mixture")
