"""Active hidden units: which units a mean-field posterior uses, and a check by ablation.

Variational BNNs switch units off (over-pruning; Trippe & Turner 2018): every weight into a unit
returns to the prior, and the units after it learn to ignore it. We call hidden unit ``j`` of
layer ``l`` *active* when its incoming weights have left the **base** prior ``N(0, sigma_0^2)``:

    k_lj = 1/|C_l| sum_{i in C_l} KL( N(mu_lji, sigma_lji^2) || N(0, sigma_0^2) )  >  kappa

nats per incoming weight, the bias counted as one more input. ``C_0`` leaves out the pixels that
are 0 in every image seen so far: their weights' exact posterior is the prior whatever the unit
does (:func:`~pyro_bbt.convergence.uninformed_inputs`), so they carry no evidence of use. The base
prior is the yardstick, not the prior of the task being learnt: under VCL that prior is the
previous posterior, against which a unit recruited by an earlier task would look unused.

The threshold ``kappa`` is checked functionally, by ablation: every unit judged inactive is
removed at once (its outgoing weights set to 0 in every posterior draw) and the predictive
log-likelihood per example of ``(x, y)`` is computed with and without it, on the same draws. The
census is trustworthy when that change, :attr:`UnitCensus.ablation_change`, is below ``delta``.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass

import torch

from .convergence import uninformed_inputs
from .evaluation import metrics_from_log_probs, predictive_log_probs, sample_posterior
from .guides import posterior_loc_scale
from .model import BayesianMLP

__all__ = ["DEFAULT_KAPPA", "UnitCensus", "unit_kl", "unit_census"]

DEFAULT_KAPPA = 0.2  # nats per incoming weight


def _kl_to_base(loc: torch.Tensor, scale: torch.Tensor, base_std: float) -> torch.Tensor:
    """Elementwise ``KL(N(loc, scale^2) || N(0, base_std^2))``."""
    ratio = (scale / base_std) ** 2
    return 0.5 * (ratio + (loc / base_std) ** 2 - 1.0 - torch.log(ratio))


@torch.no_grad()
def unit_kl(guide, model: BayesianMLP, base_std: float, x_seen: torch.Tensor, num_samples: int = 64) -> list[torch.Tensor]:
    """``k_l``, one tensor per hidden layer: each unit's mean KL per incoming weight (bias
    included) to ``N(0, base_std^2)``, first layer without the inputs blank in all of ``x_seen``."""
    posterior = posterior_loc_scale(guide, model, num_samples)
    informed = ~uninformed_inputs(x_seen).to("cpu")
    out = []
    for layer in range(len(model.layers) - 1):
        w_loc, w_scale = (t.to("cpu") for t in posterior[f"layers.{layer}.weight"])
        b_loc, b_scale = (t.to("cpu") for t in posterior[f"layers.{layer}.bias"])
        kl_w = _kl_to_base(w_loc, w_scale, base_std)
        if layer == 0:
            kl_w = kl_w[:, informed]
        kl_b = _kl_to_base(b_loc, b_scale, base_std)
        out.append((kl_w.sum(1) + kl_b) / (kl_w.shape[1] + 1))
    return out


@dataclass
class UnitCensus:
    """The active units of every hidden layer (``active``: counts; ``widths``: layer sizes), the
    threshold ``kappa`` and the ablation check: ``ablation_change``, the predictive log-likelihood
    per example after removing all inactive units minus before (same draws), on ``ablation_examples``."""

    active: list[int]
    widths: list[int]
    kappa: float
    ablation_change: float
    ablation_examples: int
    active_units: list[list[int]]

    def to_dict(self) -> dict:
        return asdict(self)


@torch.no_grad()
def unit_census(guide, model: BayesianMLP, base_std: float, x_seen: torch.Tensor, x: torch.Tensor, y: torch.Tensor,
                kappa: float = DEFAULT_KAPPA, num_samples: int = 32, seed: int = 0) -> UnitCensus:
    """Count the active units (:func:`unit_kl` above ``kappa``) and check the count by ablation
    on ``(x, y)`` (the model's current head and active outputs) with ``num_samples`` draws."""
    if not (math.isfinite(kappa) and kappa > 0):
        raise ValueError(f"kappa must be a finite number > 0, got {kappa!r}")
    masks = [k > kappa for k in unit_kl(guide, model, base_std, x_seen)]
    generator_state = torch.get_rng_state()
    torch.manual_seed(seed)
    weights = sample_posterior(model, guide, num_samples, x[:1])
    torch.set_rng_state(generator_state)
    full = metrics_from_log_probs(predictive_log_probs(model, weights, x), y).nll
    ablated = dict(weights)
    for layer, mask in enumerate(masks):
        site = f"layers.{layer + 1}.weight"
        ablated[site] = weights[site].clone()
        ablated[site][..., ~mask.to(ablated[site].device)] = 0.0  # (S, out, in): the inactive inputs of the next layer
    after = metrics_from_log_probs(predictive_log_probs(model, ablated, x), y).nll
    return UnitCensus(
        active=[int(m.sum()) for m in masks],
        widths=[int(m.numel()) for m in masks],
        kappa=kappa,
        ablation_change=float(full - after),  # log-likelihood after minus before: nll before minus after
        ablation_examples=int(x.shape[0]),
        active_units=[torch.nonzero(m).flatten().tolist() for m in masks],
    )
