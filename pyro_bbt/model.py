"""The Bayesian MLP as a Pyro model.

Generative model, for an MLP with sizes ``(d_0, ..., d_L)`` and ReLU between layers::

    W_l ~ p(W_l),  b_l ~ p(b_l)                       (prior sites "layers.{l}.weight", ".bias")
    h_0 = x,  h_l = relu(h_{l-1} W_l^T + b_l),  logits = h_{L-1} W_L^T + b_L
    y_n ~ Categorical(logits_n)   for n in a minibatch of B out of N   (plate "data", scale N/B)

Every layer accepts weights with leading sample dimensions (from a particle plate or from
``Predictive(parallel=True)``): they are flattened into one batch dimension ``S`` and the layer
uses a batched matmul, so logits have shape ``(S, B, C)``. This is what makes
``vectorize_particles=True`` work, which ``PyroModule[nn.Linear]`` does not (its 2-D ``.t()``).

:meth:`BayesianMLP.local_reparameterized_logits` is the local-reparameterisation forward pass
(Kingma et al. 2015) used by the ``local`` estimator: for a Gaussian mean-field posterior it
samples each example's pre-activations ``a ~ N(h mu_W^T + mu_b, h^2 (sigma_W^2)^T + sigma_b^2)``
instead of sharing one weight sample across the minibatch. Its arithmetic is
:func:`local_reparameterized_forward`, which the compiled step (:mod:`pyro_bbt.fused`) traces too.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import TypeAlias

import pyro
import pyro.distributions as dist
import torch
import torch.nn.functional as F
from pyro.nn import PyroModule, PyroSample
from torch import nn

from .priors import GaussianPrior, Prior
from .pyro_internals import pyro_module_fullname

__all__ = ["BayesianLinear", "BayesianMLP", "batched_linear", "local_reparameterized_forward"]

GaussianLayer: TypeAlias = tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]
"""One layer's mean-field Gaussian posterior: ``(mu_W, sigma_W, mu_b, sigma_b)``."""


def batched_linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor) -> torch.Tensor:
    """``x W^T + b`` where ``weight`` may carry leading sample dimensions.

    :param x: ``(B, in)`` or ``(S, B, in)``.
    :param weight: ``(out, in)`` or ``(..., out, in)``; leading dims are flattened to ``S``.
    :param bias: ``(out,)`` or ``(..., out)`` with the same leading dims as ``weight``.
    :returns: ``(B, out)`` when there are no sample dims anywhere, else ``(S, B, out)``.
    """
    if weight.dim() == 2:
        return F.linear(x, weight, bias)
    weight = weight.reshape(-1, *weight.shape[-2:])
    bias = bias.reshape(-1, 1, bias.shape[-1])
    if x.dim() == 2:
        x = x.expand(weight.shape[0], *x.shape)
    return torch.baddbmm(bias, x, weight.transpose(-1, -2))


def local_reparameterized_forward(x: torch.Tensor, layers: Sequence[GaussianLayer], eps: Sequence[torch.Tensor] | None = None) -> torch.Tensor:
    """The output pre-activations of an MLP with ReLU between layers under a Gaussian mean-field
    posterior, sampled by local reparameterisation (Kingma, Salimans & Welling 2015).

    For layer ``l`` with ``W ~ N(mu_W, sigma_W^2)`` and ``b ~ N(mu_b, sigma_b^2)`` elementwise, the
    pre-activation of one example given its input ``h`` is exactly Gaussian::

        a = h mu_W^T + mu_b + sqrt(h^2 (sigma_W^2)^T + sigma_b^2) * eps_l,   eps_l ~ N(0, I)

    :param x: ``(B, d_0)``, or ``(P, B, d_0)`` for ``P`` independent samples per example.
    :param layers: ``(mu_W, sigma_W, mu_b, sigma_b)`` per layer, ``W`` of shape ``(d_l, d_{l-1})``.
    :param eps: the standard-normal draws, one ``x.shape[:-1] + (d_l,)`` tensor per layer;
        ``None``: drawn here, layer by layer (``torch.randn_like``).
    :returns: ``(B, d_L)`` or ``(P, B, d_L)``.

    The one copy of this arithmetic: :meth:`BayesianMLP.local_reparameterized_logits` runs it
    eagerly, :func:`pyro_bbt.fused.local_elbo_terms` under ``torch.compile`` (with ``eps`` drawn
    beforehand, in the same order).
    """
    h = x
    last = len(layers) - 1
    for index, (w_loc, w_scale, b_loc, b_scale) in enumerate(layers):
        mean = F.linear(h, w_loc, b_loc)
        var = F.linear(h * h, w_scale * w_scale, b_scale * b_scale)
        h = mean + var.sqrt() * (torch.randn_like(mean) if eps is None else eps[index])
        if index < last:
            h = F.relu(h)
    return h


class BayesianLinear(PyroModule):
    """A linear layer whose ``weight`` (``out x in``) and ``bias`` (``out``) are Pyro sample sites.

    The prior is looked up at call time from ``prior_fn()`` so that the owning network can swap
    its prior (transfer) without rebuilding layers.
    """

    def __init__(self, in_features: int, out_features: int, prior_fn) -> None:
        super().__init__()
        self.in_features = in_features
        self.out_features = out_features
        self.weight = PyroSample(
            lambda layer: prior_fn().site_distribution(
                pyro_module_fullname(layer, "weight"), torch.Size((layer.out_features, layer.in_features))
            )
        )
        self.bias = PyroSample(
            lambda layer: prior_fn().site_distribution(
                pyro_module_fullname(layer, "bias"), torch.Size((layer.out_features,))
            )
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return batched_linear(x, self.weight, self.bias)

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}"


class BayesianMLP(PyroModule):
    """A Bayesian multilayer perceptron with a categorical likelihood.

    :param sizes: layer widths ``(d_0, ..., d_L)``; the default is the split-MNIST network
        784-400-400-5.
    :param prior: the weight prior (default ``GaussianPrior(1.0)``); replace with :meth:`set_prior`.
    :param num_heads: ``> 1`` makes a multi-head network: the output layer has
        ``num_heads * sizes[-1]`` units and head ``k`` is the slice ``[k C, (k+1) C)``. The
        attribute ``head`` picks the slice the logits come from (``None``: all of them).

    The attribute ``active_outputs`` (``None``: all) keeps only the first ``active_outputs``
    units of the selected head in the logits, so the softmax runs over those classes alone: the
    class-incremental protocol's "active outputs" (only the classes seen so far compete; Hsu et
    al. 2018's ``valid_out_dim``). Inactive rows get no likelihood gradient.

    Call it as a Pyro model: ``model(x, y, num_data=N)``. With ``y=None`` the labels are sampled.
    Returns the logits, ``(B, C)`` or ``(S, B, C)`` under a sample plate.
    """

    def __init__(self, sizes: Sequence[int] = (784, 400, 400, 5), prior: Prior | None = None, num_heads: int = 1) -> None:
        super().__init__()
        sizes = tuple(int(s) for s in sizes)
        if len(sizes) < 2 or any(s < 1 for s in sizes):
            raise ValueError(f"sizes must list at least two positive widths, got {sizes!r}")
        if not isinstance(num_heads, int) or num_heads < 1:
            raise ValueError(f"num_heads must be an integer >= 1, got {num_heads!r}")
        self.sizes = sizes
        self.num_heads = num_heads
        self.head: int | None = 0 if num_heads > 1 else None
        self.active_outputs: int | None = None
        self.prior = prior if prior is not None else GaussianPrior(1.0)
        widths = (*sizes[:-1], sizes[-1] * num_heads)
        self.layers = PyroModule[nn.ModuleList](
            [BayesianLinear(d_in, d_out, lambda: self.prior) for d_in, d_out in zip(widths[:-1], widths[1:])]
        )

    def set_prior(self, prior: Prior) -> None:
        """Swap the prior (for example for a :class:`~pyro_bbt.priors.PerSitePrior` after transfer)."""
        self.prior = prior

    @property
    def site_shapes(self) -> dict[str, torch.Size]:
        """Every latent site's name and shape, in execution order."""
        shapes: dict[str, torch.Size] = {}
        for index, layer in enumerate(self.layers):
            shapes[f"layers.{index}.weight"] = torch.Size((layer.out_features, layer.in_features))
            shapes[f"layers.{index}.bias"] = torch.Size((layer.out_features,))
        return shapes

    @property
    def output_sites(self) -> tuple[str, str]:
        last = len(self.layers) - 1
        return f"layers.{last}.weight", f"layers.{last}.bias"

    @property
    def num_classes(self) -> int:
        return self.sizes[-1]

    def head_rows(self, head: int) -> slice:
        """Rows of the output layer that belong to ``head``."""
        if not 0 <= head < self.num_heads:
            raise ValueError(f"head must lie in 0..{self.num_heads - 1}, got {head!r}")
        return slice(head * self.num_classes, (head + 1) * self.num_classes)

    @property
    def output_rows(self) -> slice | None:
        """Rows of the output layer the logits come from (``None``: all): the rows of ``head``,
        of which the first ``active_outputs``."""
        rows = None if self.head is None else self.head_rows(self.head)
        if self.active_outputs is None:
            return rows
        if not 1 <= self.active_outputs <= self.num_classes:
            raise ValueError(f"active_outputs must lie in 1..{self.num_classes}, got {self.active_outputs!r}")
        start = 0 if rows is None else rows.start
        return slice(start, start + self.active_outputs)

    def _select_head(self, logits: torch.Tensor) -> torch.Tensor:
        rows = self.output_rows
        return logits if rows is None else logits[..., rows]

    def logits(self, x: torch.Tensor) -> torch.Tensor:
        """The network's logits; samples (or reuses, under replay/condition) every weight site."""
        h = x
        for index, layer in enumerate(self.layers):
            h = layer(h)
            if index < len(self.layers) - 1:
                h = F.relu(h)
        return self._select_head(h)

    def forward(self, x: torch.Tensor, y: torch.Tensor | None = None, num_data: int | None = None) -> torch.Tensor:
        logits = self.logits(x)
        batch = x.shape[-2]
        with pyro.plate("data", size=num_data or batch, subsample_size=batch, dim=-1):
            pyro.sample("obs", dist.Categorical(logits=logits), obs=y)
        return logits

    def local_reparameterized_logits(
        self,
        x: torch.Tensor,
        posterior: Mapping[str, tuple[torch.Tensor, torch.Tensor]],
        num_particles: int = 1,
    ) -> torch.Tensor:
        """Logits under local reparameterisation for a Gaussian mean-field posterior
        (:func:`local_reparameterized_forward`, then the selected head's rows).

        For layer ``l`` with ``W ~ N(mu_W, sigma_W^2)`` and ``b ~ N(mu_b, sigma_b^2)`` elementwise,
        the pre-activation of one example given its input ``h`` is exactly Gaussian::

            a = h mu_W^T + mu_b + sqrt(h^2 (sigma_W^2)^T + sigma_b^2) * eps,   eps ~ N(0, I)

        with independent ``eps`` per example and unit. Per example this has the same distribution
        as sampling the weights; across examples the noise is independent, which lowers the
        gradient variance (Kingma, Salimans & Welling 2015).

        :param posterior: site name -> ``(loc, scale)`` for every weight and bias site.
        :param num_particles: independent samples per example; ``> 1`` gives ``(P, B, C)``.
        :returns: ``(B, C)`` if ``num_particles == 1`` else ``(P, B, C)``.
        """
        h = x if num_particles == 1 else x.expand(num_particles, *x.shape)
        layers = [(*posterior[f"layers.{index}.weight"], *posterior[f"layers.{index}.bias"]) for index in range(len(self.layers))]
        return self._select_head(local_reparameterized_forward(h, layers))
