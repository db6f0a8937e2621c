"""Active hidden units: which units a mean-field posterior uses, and a check by ablation.

Variational BNNs switch units off (over-pruning; Trippe & Turner 2018): every weight into a unit
returns to the prior, and the units after it learn to ignore it. Each hidden unit ``j`` of layer
``l`` is scored by how far its incoming weights have left the **base** prior ``N(0, sigma_0^2)``:

    k_lj = 1/|C_l| sum_{i in C_l} KL( N(mu_lji, sigma_lji^2) || N(0, sigma_0^2) )

nats per incoming weight, the bias counted as one more input. ``C_0`` leaves out the pixels that
are 0 in every image seen so far: their weights' exact posterior is the prior whatever the unit
does (:func:`~pyro_bbt.convergence.uninformed_inputs`), so they carry no evidence of use. The base
prior is the yardstick, not the prior of the task being learnt: under VCL that prior is the
previous posterior, against which a unit recruited by an earlier task would look unused.

A unit is *active* when ``k_lj > kappa``. The threshold is set functionally, by ablation: every
unit at or below ``kappa`` is removed at once (its outgoing weights set to 0 in every posterior
draw) and the predictive log-likelihood per example is computed with and without them, on the
same draws, on each evaluation set given (for example each task seen so far, through its head);
the change on the set where it is lowest is :attr:`UnitCensus.ablation_change` (a unit is needed
if any task needs it; a task already forgotten can even gain from the removal). With ``kappa=None`` the census takes the
largest ``kappa`` of :data:`KAPPA_GRID` whose ablation, and every smaller one's, lowers the
log-likelihood by less than ``delta``: the fewest units, ranked by their distance from the prior,
that carry the network's predictions. A rise is allowed: a unit at the prior feeds the next layer
noise of its prior's width, so removing it can raise the log-likelihood, which is no sign of use. (A fixed ``kappa`` fails both ways: a first-layer unit that
reads a few dozen pixels has a small mean KL over its ~600 inputs, and a unit left near its
initialisation a large one.)
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import asdict, dataclass

import torch

from .convergence import uninformed_inputs
from .data import Split
from .evaluation import metrics_from_log_probs, predictive_log_probs, sample_posterior
from .guides import posterior_loc_scale
from .model import BayesianMLP

__all__ = ["KAPPA_GRID", "DEFAULT_DELTA", "CENSUS_EXAMPLES", "CENSUS_SAMPLES", "UnitCensus", "unit_kl", "unit_census", "ablation_change",
           "census_after"]

KAPPA_GRID: tuple[float, ...] = tuple(round(10 ** (e / 4), 6) for e in range(-16, 5))  # 1e-4 ... 10 nats per incoming weight
DEFAULT_DELTA = 0.01  # nats per example
CENSUS_EXAMPLES = 1000  # training images per task on which :func:`census_after`'s ablation is checked
CENSUS_SAMPLES = 16


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
    """The active units of every hidden layer (``active``: counts; ``widths``: layer sizes;
    ``active_units``: their indices), the threshold ``kappa`` (``kappa_searched``: found by the
    ablation search), and its check: ``ablation_change``, the predictive log-likelihood per example
    after removing every inactive unit minus before (same draws), on the evaluation set where it
    is lowest, ``ablation_examples`` examples in all, against ``delta``."""

    active: list[int]
    widths: list[int]
    kappa: float
    kappa_searched: bool
    ablation_change: float
    ablation_examples: int
    delta: float
    active_units: list[list[int]]

    def to_dict(self) -> dict:
        return asdict(self)


Evaluation = tuple[int | None, torch.Tensor, torch.Tensor]  # (head, x, y)


def _with_head(model: BayesianMLP, head: int | None) -> None:
    if model.num_heads > 1:
        model.head = head


def _ablated(weights: dict[str, torch.Tensor], masks: list[torch.Tensor]) -> dict[str, torch.Tensor]:
    """``weights`` with the outgoing weights of every hidden unit outside ``masks`` zeroed in every
    draw. (Replacing a unit by its mean activation instead keeps ``W_out mean(h)``, which for a unit
    at the prior is a large random shift per draw: its outgoing weights are noise of the prior's
    width.)"""
    ablated = dict(weights)
    for layer, mask in enumerate(masks):
        site = f"layers.{layer + 1}.weight"
        ablated[site] = weights[site].clone()
        ablated[site][..., ~mask.to(ablated[site].device)] = 0.0  # (..., out, in): the removed units' outgoing weights
    return ablated


def _nll(model: BayesianMLP, weights: dict[str, torch.Tensor], evaluations: list[Evaluation], masks: list[torch.Tensor] | None = None) -> list[float]:
    head, out = model.head, []
    for evaluation_head, x, y in evaluations:
        _with_head(model, evaluation_head)
        used = weights if masks is None else _ablated(weights, masks)
        out.append(metrics_from_log_probs(predictive_log_probs(model, used, x), y).nll)
    model.head = head
    return out


@torch.no_grad()
def ablation_change(model: BayesianMLP, weights: dict[str, torch.Tensor], masks: list[torch.Tensor], evaluations: list[Evaluation],
                    before: list[float] | None = None) -> float:
    """The predictive log-likelihood per example with the hidden units outside ``masks`` removed
    (their outgoing weights zeroed in every draw of ``weights``) minus without, on the evaluation
    set where it falls most (``before``: the negative log-likelihoods without, if already
    computed)."""
    before = _nll(model, weights, evaluations) if before is None else before
    after = _nll(model, weights, evaluations, masks)
    return min(float(b - a) for b, a in zip(before, after))


@torch.no_grad()
def unit_census(guide, model: BayesianMLP, base_std: float, x_seen: torch.Tensor, evaluations: list[Evaluation],
                kappa: float | None = None, delta: float = DEFAULT_DELTA, num_samples: int = 16, seed: int = 0) -> UnitCensus:
    """Count the active units (:func:`unit_kl` above ``kappa``; ``None``: the ablation search
    over :data:`KAPPA_GRID`) and check the count by ablation on ``evaluations`` (``(head, x, y)``
    each) with ``num_samples`` posterior draws shared by every comparison."""
    if kappa is not None and not (math.isfinite(kappa) and kappa > 0):
        raise ValueError(f"kappa must be a finite number > 0 or None, got {kappa!r}")
    if not evaluations:
        raise ValueError("unit_census needs at least one evaluation set (head, x, y)")
    scores = unit_kl(guide, model, base_std, x_seen)
    generator_state = torch.get_rng_state()
    torch.manual_seed(seed)
    weights = sample_posterior(model, guide, num_samples, evaluations[0][1][:1])
    torch.set_rng_state(generator_state)
    before = _nll(model, weights, evaluations)
    if kappa is not None:
        chosen, change = kappa, ablation_change(model, weights, [k > kappa for k in scores], evaluations, before)
    else:
        chosen, change = KAPPA_GRID[0], ablation_change(model, weights, [k > KAPPA_GRID[0] for k in scores], evaluations, before)
        for candidate in KAPPA_GRID[1:]:
            candidate_change = ablation_change(model, weights, [k > candidate for k in scores], evaluations, before)
            if candidate_change <= -delta:
                break
            chosen, change = candidate, candidate_change
    masks = [k > chosen for k in scores]
    return UnitCensus(
        active=[int(m.sum()) for m in masks],
        widths=[int(m.numel()) for m in masks],
        kappa=chosen,
        kappa_searched=kappa is None,
        ablation_change=change,
        ablation_examples=sum(int(x.shape[0]) for _, x, _ in evaluations),
        delta=delta,
        active_units=[torch.nonzero(m).flatten().tolist() for m in masks],
    )


def census_after(guide, model: BayesianMLP, base_std: float, seen: Sequence[tuple[int | None, Split]], seed: int = 0) -> dict:
    """The active hidden units of a posterior fitted on the tasks ``seen`` (``(head, training
    split)`` each): :func:`unit_census` against ``N(0, base_std^2)``, the pixels blank in every
    image of every task seen left out, the threshold found by ablation on each task through its
    head, on its first :data:`CENSUS_EXAMPLES` training images, with :data:`CENSUS_SAMPLES`
    draws. RNG-neutral. As a dict (:meth:`UnitCensus.to_dict`)."""
    if not seen:
        raise ValueError("census_after needs at least one task seen, (head, split)")
    x_seen = torch.cat([split.x for _, split in seen])
    evaluations = [(head, split.x[:CENSUS_EXAMPLES], split.y[:CENSUS_EXAMPLES]) for head, split in seen]
    return unit_census(guide, model, base_std, x_seen, evaluations, num_samples=CENSUS_SAMPLES, seed=seed).to_dict()
