"""The fast path of a mean-field training step: the guide's parameters read without a trace,
``softplus`` without ``log1p``, and the closed-form KL with a hand-written backward.

These compute what the plain path computes (:func:`pyro_bbt.objectives.mean_field_posterior`,
:func:`torch.nn.functional.softplus`, :func:`pyro_bbt.objectives.gaussian_kl` under autograd),
to float rounding (tested), in fewer passes over the 478k weights of the 784-400-400 network.
On this CPU build ``torch.log1p`` costs about eight times ``torch.log`` per element, and the KL's
autograd graph saves and revisits five intermediates per site; together they were a third of
a step (``python -m pyro_bbt.bench --profile meanfield-local-1``).
:class:`~pyro_bbt.inference.TrainConfig` ``fast=False`` goes back to the plain path.
"""

from __future__ import annotations

import torch
from pyro.distributions import constraints

__all__ = ["softplus", "gaussian_kl_sum", "mean_field_loc_scale", "supports_fast_path"]

SOFTPLUS_THRESHOLD = 20.0  # torch's: softplus(x) = x above it
SOFTPLUS_TINY = -16.0  # below it log(1 + e^x) = e^x to float32 precision (relative error e^x / 2 < 6e-8)


def _softplus_values(x: torch.Tensor) -> torch.Tensor:
    """``log(1 + e^x)`` as ``log(u) * (y / (u - 1))`` with ``y = e^x``, ``u = 1 + y`` (rounded):
    the ratio corrects the rounding of ``u`` (Goldberg 1991, Theorem 4; a few ulp), in five
    elementwise passes of which only ``exp`` and ``log`` are costly (``torch.log1p`` is not
    vectorised on this build: 8x ``torch.log``). Values outside ``[-16, 20]`` (where ``u``
    rounds to 1, or torch's own softplus returns ``x``) are rare and handled exactly."""
    low, high = torch.aminmax(x)
    if low < SOFTPLUS_TINY or high > SOFTPLUS_THRESHOLD:
        return torch.where(x > SOFTPLUS_THRESHOLD, x, torch.where(x < SOFTPLUS_TINY, torch.exp(x), _softplus_values(x.clamp(SOFTPLUS_TINY, SOFTPLUS_THRESHOLD))))
    y = torch.exp(x)
    u = y + 1.0
    ratio = y / (u - 1.0)
    return torch.log_(u).mul_(ratio)


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


def _scalar(t: torch.Tensor) -> torch.Tensor | None:
    """The one value of a tensor that is a scalar broadcast to a shape (all strides 0), else ``None``."""
    if t.dim() == 0:
        return t
    if all(stride == 0 for stride in t.stride()):
        return t[(0,) * t.dim()]
    return None


class _GaussianKLSum(torch.autograd.Function):
    @staticmethod
    def forward(ctx, loc, scale, prior_loc, prior_scale):
        p_loc, p_scale = _scalar(prior_loc), _scalar(prior_scale)
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
        raise ValueError("gaussian_kl_sum holds the prior fixed; use pyro_bbt.objectives.gaussian_kl to differentiate it")
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
    out = {}
    locs, scales = guide.locs, guide.scales
    for name in guide._event_dims:
        module, _, leaf = name.rpartition(".")
        loc_module = locs.get_submodule(module) if module else locs
        scale_module = scales.get_submodule(module) if module else scales
        out[name] = (loc_module._parameters[f"{leaf}_unconstrained"], softplus(scale_module._parameters[f"{leaf}_unconstrained"]))
    return out
