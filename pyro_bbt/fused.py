"""The fast path of a mean-field training step: the guide's parameters read without a trace,
``softplus`` without ``log1p``, and the closed-form KL with a hand-written backward.

These compute what the plain path computes (:func:`pyro_bbt.objectives.mean_field_posterior`,
:func:`torch.nn.functional.softplus`, :func:`gaussian_kl` under autograd),
to float rounding (tested), in fewer passes over the 478k weights of the 784-400-400 network.
On this CPU build ``torch.log1p`` costs about eight times ``torch.log`` per element, and the KL's
autograd graph saves and revisits five intermediates per site; together they were a third of
a step (``python benchmarks/bench.py --profile meanfield-local-1``).

The estimators reach these functions through one seam,
:class:`pyro_bbt.objectives.FastMeanFieldOps` (and :class:`~pyro_bbt.objectives.CompiledMeanFieldOps`
for :func:`local_elbo_terms`); :class:`~pyro_bbt.inference.TrainConfig` ``fast=False`` picks the
plain :class:`~pyro_bbt.objectives.MeanFieldOps` instead.
"""

from __future__ import annotations

import torch
from pyro.distributions import constraints

from .model import local_reparameterized_forward
from .pyro_internals import event_dims, unconstrained_loc_scale_parameters

__all__ = ["softplus", "gaussian_kl_sum", "mean_field_loc_scale", "mean_field_loc_rho", "supports_fast_path", "broadcast_scalar", "gaussian_kl", "local_elbo_terms",
           "compiled_local_elbo_terms"]

SOFTPLUS_THRESHOLD = 20.0  # torch's: softplus(x) = x above it
SOFTPLUS_TINY = -16.0  # below it log(1 + e^x) = e^x to float32 precision (relative error e^x / 2 < 6e-8)


def _softplus_middle(x: torch.Tensor, inplace: bool = False) -> torch.Tensor:
    """``log(1 + e^x)`` for ``x`` in ``[-16, 20]`` as ``log(u) * (y / (u - 1))`` with ``y = e^x``,
    ``u = 1 + y`` (rounded): the ratio corrects the rounding of ``u`` (Goldberg 1991, Theorem 4;
    a few ulp), in five elementwise passes of which only ``exp`` and ``log`` are costly
    (``torch.log1p`` is not vectorised on this build: 8x ``torch.log``). The one copy of this
    arithmetic. ``inplace``: the last two passes overwrite ``u`` (the eager path, outside autograd:
    1.5 ms less per call on the 478k widths, one thread); otherwise out of place, so that autograd
    (under ``torch.compile``) can differentiate it. The same values either way."""
    y = torch.exp(x)
    u = y + 1.0
    ratio = y / (u - 1.0)
    return torch.log_(u).mul_(ratio) if inplace else torch.log(u) * ratio


def _softplus_branch_free(x: torch.Tensor) -> torch.Tensor:
    """``softplus(x)`` over the whole range without a data-dependent branch (traceable by
    ``torch.compile``, which fuses it with what follows): ``x`` above 20 (torch's threshold),
    ``e^x`` below -16 (where ``u`` rounds to 1 and ``log(1 + e^x) = e^x`` to float32 precision),
    :func:`_softplus_middle` between."""
    middle = _softplus_middle(x.clamp(SOFTPLUS_TINY, SOFTPLUS_THRESHOLD))
    return torch.where(x > SOFTPLUS_THRESHOLD, x, torch.where(x < SOFTPLUS_TINY, torch.exp(x), middle))


def _softplus_values(x: torch.Tensor) -> torch.Tensor:
    """``softplus(x)``, eagerly: :func:`_softplus_middle` alone when every value lies in
    ``[-16, 20]`` (the usual case: widths near ``softplus^-1(0.01) = -4.6``), else
    :func:`_softplus_branch_free` (its clamp and two ``where`` passes). The same values either way."""
    low, high = torch.aminmax(x)
    if low < SOFTPLUS_TINY or high > SOFTPLUS_THRESHOLD:
        return _softplus_branch_free(x)
    return _softplus_middle(x, inplace=True)


class _Softplus(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x: torch.Tensor) -> torch.Tensor:
        ctx.save_for_backward(x)
        return _softplus_values(x)

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> torch.Tensor:
        (x,) = ctx.saved_tensors
        return grad * torch.sigmoid(x)


def softplus(x: torch.Tensor) -> torch.Tensor:
    """``softplus(x) = log(1 + e^x)`` (``x`` above 20), differentiable: ``d/dx = sigmoid(x)``."""
    return _Softplus.apply(x)


def broadcast_scalar(t: torch.Tensor) -> torch.Tensor | None:
    """The one value of a tensor that is a scalar broadcast to a shape (all strides 0), else ``None``."""
    if t.dim() == 0:
        return t
    if all(stride == 0 for stride in t.stride()):
        return t[(0,) * t.dim()]
    return None


def gaussian_kl(loc_q: torch.Tensor, scale_q: torch.Tensor, loc_p: torch.Tensor, scale_p: torch.Tensor) -> torch.Tensor:
    """Elementwise ``KL(N(loc_q, scale_q^2) || N(loc_p, scale_p^2))``
    ``= 1/2 [r + ((loc_q - loc_p) / scale_p)^2 - 1 - log r]`` with ``r = (scale_q / scale_p)^2``.

    The same arithmetic as ``torch.distributions.kl_divergence`` between two ``Normal``s (equal
    to the last bit, tested), without building the distributions and validating their
    parameters on every step.
    """
    var_ratio = (scale_q / scale_p).pow(2)
    t1 = ((loc_q - loc_p) / scale_p).pow(2)
    return 0.5 * (var_ratio + t1 - 1 - var_ratio.log())


class _GaussianKLSum(torch.autograd.Function):
    @staticmethod
    def forward(ctx, loc, scale, prior_loc, prior_scale):
        p_loc, p_scale = broadcast_scalar(prior_loc), broadcast_scalar(prior_scale)
        if p_loc is not None and p_scale is not None:
            # one prior for the whole site: 1/2 [sum s^2 + sum (m - m0)^2] / s0^2 - sum log s + n (log s0 - 1/2)
            inv_var = p_scale.reciprocal().square()
            diff = loc if bool(p_loc == 0) else loc - p_loc
            flat_diff, flat_scale = diff.reshape(-1), scale.reshape(-1)
            kl = 0.5 * inv_var * (torch.dot(flat_scale, flat_scale) + torch.dot(flat_diff, flat_diff)) - torch.log(scale).sum() \
                + scale.numel() * (torch.log(p_scale) - 0.5)
        else:
            inv_var = prior_scale.reciprocal().square()
            diff = loc - prior_loc
            ratio = scale.square() * inv_var
            kl = 0.5 * (ratio + diff.square() * inv_var - 1.0 - torch.log(ratio)).sum()
        ctx.save_for_backward(diff, scale, inv_var)
        return kl

    @staticmethod
    def backward(ctx, grad):
        diff, scale, inv_var = ctx.saved_tensors
        grad_loc = grad_scale = None
        if ctx.needs_input_grad[0]:
            grad_loc = (grad * inv_var) * diff
        if ctx.needs_input_grad[1]:
            grad_scale = (grad * inv_var) * scale - grad * scale.reciprocal()
        return grad_loc, grad_scale, None, None


def gaussian_kl_sum(loc: torch.Tensor, scale: torch.Tensor, prior_loc: torch.Tensor, prior_scale: torch.Tensor) -> torch.Tensor:
    """``sum KL(N(loc, scale^2) || N(prior_loc, prior_scale^2))``
    ``= 1/2 sum [r + (loc - prior_loc)^2 / prior_scale^2 - 1 - log r]``, ``r = scale^2 / prior_scale^2``,
    with gradients ``(loc - prior_loc) / prior_scale^2`` and ``scale / prior_scale^2 - 1 / scale``
    for the posterior's parameters (the prior is held fixed: no gradient flows to it)."""
    if prior_loc.requires_grad or prior_scale.requires_grad:
        raise ValueError("gaussian_kl_sum holds the prior fixed; use pyro_bbt.fused.gaussian_kl to differentiate it")
    return _GaussianKLSum.apply(loc, scale, prior_loc, prior_scale)


def supports_fast_path(guide) -> bool:
    """Whether ``guide`` stores each site's ``loc`` unconstrained and its ``scale`` as
    ``softplus^{-1}``: Pyro's ``AutoNormal`` family (our ``meanfield``) as of pyro 1.9."""
    constraint = getattr(type(guide), "scale_constraint", None)
    return isinstance(constraint, type(constraints.softplus_positive)) and hasattr(guide, "locs") and hasattr(guide, "scales")


def mean_field_loc_scale(guide) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    """``(loc, scale)`` of every site of an initialised ``AutoNormal``-family guide, read from its
    unconstrained parameters (``scale = softplus(rho)``) instead of tracing the guide; the same
    values as the trace's (tested)."""
    return {name: (loc, softplus(rho)) for name, (loc, rho) in mean_field_loc_rho(guide).items()}


# --------------------------------------------------------------------------- the compiled step

def local_elbo_terms(locs: list[torch.Tensor], rhos: list[torch.Tensor], prior_locs: list[torch.Tensor], prior_scales: list[torch.Tensor],
                     x: torch.Tensor, y: torch.Tensor, eps: list[torch.Tensor], head: tuple[int, int] | None, likelihood_scale: torch.Tensor,
                     kl_weight: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """One particle of :class:`~pyro_bbt.objectives.LocalReparameterizationELBO`, as one pure
    function of the guide's unconstrained parameters, for ``torch.compile``.

    Sites come in layer order, weight then bias (``locs[2l]``, ``locs[2l + 1]``), with
    ``sigma = softplus(rho)``. Layer ``l`` maps ``h`` to
    ``a = h mu_W^T + mu_b + sqrt(h^2 (sigma_W^2)^T + sigma_b^2) * eps_l`` (ReLU between layers):
    :func:`pyro_bbt.model.local_reparameterized_forward`, the eager path's forward, traced here;
    ``head = (start, stop)`` slices the output units. Returns
    ``(loss, log_lik, weighted_kl, logits)`` with ``log_lik = likelihood_scale * sum_n log softmax(a_n)[y_n]``
    and ``weighted_kl = kl_weight * sum_sites 1/2 sum [r + (mu - m0)^2 / s0^2 - 1 - log r]``,
    ``r = sigma^2 / s0^2``; ``loss = weighted_kl - log_lik``. The priors ``(m0, s0)`` are 0-d
    (one value per site) or of the site's shape, held fixed."""
    scales = [_softplus_branch_free(rho) for rho in rhos]
    layers = [(locs[i], scales[i], locs[i + 1], scales[i + 1]) for i in range(0, len(locs), 2)]
    h = local_reparameterized_forward(x, layers, eps)
    kl = x.new_zeros(())
    for loc, scale, prior_loc, prior_scale in zip(locs, scales, prior_locs, prior_scales):
        kl = kl + gaussian_kl(loc, scale, prior_loc, prior_scale).sum()
    logits = h if head is None else h[..., head[0]:head[1]]
    log_lik = likelihood_scale * torch.log_softmax(logits, dim=-1).gather(-1, y.unsqueeze(-1)).sum()
    weighted_kl = kl_weight * kl
    return weighted_kl - log_lik, log_lik, weighted_kl, logits


_COMPILED: dict[str, object] = {}


# Graphs dynamo may keep for local_elbo_terms: one per minibatch shape, prior layout (scalar or
# per-weight) and head. A worker running a grid's units meets about twenty (q_A's, each fraction's
# full and last minibatch, transfer's per-weight priors, two heads); past torch's default of 8 it
# would silently run the function eagerly.
RECOMPILE_LIMIT = 64


def compiled_local_elbo_terms(backend: str = "inductor"):
    """:func:`local_elbo_terms` under ``torch.compile`` with ``backend`` (``inductor``: fused C++
    kernels; ``eager``: traced by dynamo but run by eager torch, for tests), built on first use
    and kept for the process (dynamo keeps one graph per input shape and prior layout, up to
    :data:`RECOMPILE_LIMIT`: torch's ``recompile_limit`` is raised to it where lower)."""
    if backend not in _COMPILED:
        import torch._dynamo.config as dynamo_config

        dynamo_config.recompile_limit = max(dynamo_config.recompile_limit, RECOMPILE_LIMIT)
        _COMPILED[backend] = torch.compile(local_elbo_terms, backend=backend, dynamic=False)
    return _COMPILED[backend]


def mean_field_loc_rho(guide) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    """``(loc, rho)`` of every site of an initialised ``AutoNormal``-family guide: its
    unconstrained parameters, ``scale = softplus(rho)``."""
    return {name: unconstrained_loc_scale_parameters(guide, name) for name in event_dims(guide)}
