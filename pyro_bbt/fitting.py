"""One way to fit a posterior: every study, unit and sequence fits through :func:`fit_posterior`.

A fit is four things, each a small function here:

* a fresh network and guide (:func:`new_posterior`), on a cleared param store;
* optionally a start at an earlier posterior (:func:`start_from_state`), with the output rows of
  heads or digits that have seen no data kept at the fresh initialisation;
* the optimisation (:func:`fit_posterior`) by a :class:`FitRecipe`: to convergence by a
  :class:`~pyro_bbt.convergence.StoppingRule` (at most its ``max_epochs``), or for a fixed budget
  of steps or epochs, judged by a rule without being stopped by it; checkpointed after every
  epoch when given somewhere to keep them;
* the next task's prior (:func:`prior_from_posterior`): ``p(w) = N(loc_q, (tau * scale_q)^2)``
  per weight, with the base prior on the rows that have seen no data, and
  :func:`broaden` to widen a prior already built.

What a fit returns (:class:`Fit`) is what ``results.json`` keeps of it: the per-epoch history,
the convergence report (:class:`~pyro_bbt.convergence.ConvergenceReport`, with the blank-pixel
ratio) and the wall time.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass, replace
from typing import Protocol

import pyro
import torch

from .convergence import StoppingRule, assess_convergence, uninformed_scale_ratio
from .data import Split
from .guides import GuideConfig, initialize_guide, make_guide, posterior_as_prior
from .inference import EpochDiagnostics, TrainConfig, TrainState, train
from .model import BayesianMLP
from .priors import PerSitePrior, Prior
from .verdict import VerdictConfig

__all__ = [
    "FitRecipe",
    "Fit",
    "CheckpointStore",
    "new_posterior",
    "guide_state",
    "start_from_state",
    "set_means",
    "normal_means",
    "load_rows",
    "prior_from_posterior",
    "broaden",
    "fit_posterior",
]


@dataclass(frozen=True)
class FitRecipe:
    """How a posterior is fitted: Adam at ``lr`` for the locations, ``scale_lr`` for the widths and
    ``flow_lr`` for a flow's transforms (``None``: ``lr``), in minibatches of ``batch_size``, and a
    budget, exactly one of

    * ``rule``: until the stopping rule holds (its learning-rate drops taken), at most
      ``rule.max_epochs`` epochs;
    * ``steps``: exactly this many optimisation steps;
    * ``epochs``: exactly this many passes over the data.

    ``judge`` is the rule whose criteria a fixed budget records (it does not stop the fit; default:
    ``rule``). ``verdict`` (:class:`~pyro_bbt.verdict.VerdictConfig`) judges every fit by the nats
    its ELBO could still gain and the blank-pixel check, and under ``rule`` keeps a fit going at
    lower rates until it holds (:func:`~pyro_bbt.inference.train`); ``None``: the rule's criteria
    alone. The loss is the full-data negative ELBO with the ``kl_schedule``'s weights
    (:mod:`pyro_bbt.inference`), its KL times ``kl_beta`` (1: the ELBO; below 1, tempered).
    ``checkpoint_seconds``: :attr:`~pyro_bbt.inference.TrainConfig.checkpoint_seconds` (how often
    a fit with a store saves its state; not what it computes). ``compile``:
    :attr:`~pyro_bbt.inference.TrainConfig.compile` (the Adam steps under ``torch.compile``).
    ``precondition``: :attr:`~pyro_bbt.inference.TrainConfig.precondition` (``"prior-scale"``:
    each location's step scaled by its prior width over the widest).
    """

    lr: float
    batch_size: int
    scale_lr: float | None = None
    flow_lr: float | None = None
    rule: StoppingRule | None = None
    steps: int | None = None
    epochs: int | None = None
    judge: StoppingRule | None = None
    num_particles: int = 1
    estimator: str = "auto"
    kl_schedule: str = "uniform"
    verdict: VerdictConfig | None = VerdictConfig()
    kl_beta: float = 1.0
    checkpoint_seconds: float = 0.0
    compile: bool = False
    precondition: str = "none"

    def __post_init__(self) -> None:
        budgets = [name for name in ("rule", "steps", "epochs") if getattr(self, name) is not None]
        if len(budgets) != 1:
            raise ValueError(f"a fit needs exactly one budget of rule, steps or epochs; got {', '.join(budgets) or 'none'}")

    @property
    def cap(self) -> int | None:
        """The most epochs a fit by the rule may take (``None`` for a fixed budget)."""
        return None if self.rule is None else self.rule.max_epochs

    @property
    def verdict_rule(self) -> StoppingRule | None:
        """The rule that judges the finished fit."""
        return self.judge or self.rule

    def refined(self, drops: int, factor: float) -> "FitRecipe":
        """The recipe at the rates a fit by it ends with after ``drops`` drops by ``factor``, with
        no drops left: how a richer guide goes on from a fitted one without a fresh Adam's first
        steps knocking it off its optimum."""
        scale = factor ** drops
        rule = None if self.rule is None else replace(self.rule, lr_drops=0)
        return replace(self, lr=self.lr * scale, scale_lr=None if self.scale_lr is None else self.scale_lr * scale, rule=rule)

    def train_config(self, seed: int, eval_samples: int = 0) -> TrainConfig:
        return TrainConfig(
            epochs=self.epochs or 1,
            steps=self.steps,
            stopping=self.rule,
            batch_size=self.batch_size,
            lr=self.lr,
            scale_lr=self.scale_lr,
            flow_lr=self.flow_lr,
            num_particles=self.num_particles,
            estimator=self.estimator,
            kl_schedule=self.kl_schedule,
            kl_beta=self.kl_beta,
            seed=seed,
            eval_samples=eval_samples,
            progress=False,
            verdict=self.verdict,
            warn_unconverged=False,  # the fit's record says so
            checkpoint_seconds=self.checkpoint_seconds,
            compile=self.compile,
            precondition=self.precondition,
        )


@dataclass
class Fit:
    """One finished fit: its per-epoch ``history`` (``TrainHistory.to_records()``), the
    ``convergence`` report as a dict (``None`` when no rule judges it) and its wall time."""

    history: list[dict]
    convergence: dict | None
    seconds: float

    @property
    def steps(self) -> int:
        return self.history[-1]["steps"] if self.history else 0

    @property
    def epochs(self) -> int:
        return len(self.history)

    @property
    def converged(self) -> bool | None:
        return None if self.convergence is None else bool(self.convergence["converged"])


class CheckpointStore(Protocol):
    """Where a fit keeps its epoch checkpoints (a :class:`~pyro_bbt.runstore.RunStore`, or a
    unit's view of one)."""

    def checkpoint(self, key: str) -> dict | None: ...

    def save_checkpoint(self, key: str, data: dict) -> None: ...


def new_posterior(sizes: tuple[int, ...], prior: Prior, guide: str, *, init_scale: float, seed: int, num_heads: int = 1,
                  device: str = "cpu", active_outputs: int | None = None) -> tuple[BayesianMLP, object]:
    """A new ``BayesianMLP(sizes, prior, num_heads)`` and its initialised guide ``guide``
    (:func:`~pyro_bbt.guides.make_guide`, widths starting at ``init_scale``). Pyro's param store
    is cleared first, so nothing is shared with an earlier guide, and the initial values are
    drawn after seeding with ``seed``."""
    pyro.clear_param_store()
    pyro.set_rng_seed(seed)
    model = BayesianMLP(sizes, prior, num_heads=num_heads).to(device)
    model.active_outputs = active_outputs
    q = make_guide(guide, model, GuideConfig(init_scale=init_scale))
    initialize_guide(q, model.sizes[0])
    return model, q


def guide_state(guide) -> dict:
    """A detached copy of the guide's parameters (what a stage or chain link saves)."""
    return {k: v.detach().clone() for k, v in guide.state_dict().items()}


def start_from_state(model: BayesianMLP, guide, state: dict, fresh_rows: slice | None = None) -> None:
    """Set ``guide`` to the saved posterior ``state``, except the output ``fresh_rows`` (heads or
    digits that have seen no data), which keep the guide's own fresh initialisation: under the
    earlier task they were only ever pulled towards the prior."""
    fresh = guide_state(guide)
    guide.load_state_dict(state)
    if fresh_rows is None:
        return
    merged = guide.state_dict()
    for key, value in merged.items():
        if any(site in key for site in model.output_sites):
            value[fresh_rows] = fresh[key][fresh_rows]
    guide.load_state_dict(merged)


def _loc_key(state: dict, site: str, kind: str = "locs") -> str:
    for key in (f"{kind}.{site}", f"{kind}.{site}_unconstrained"):
        if key in state:
            return key
    raise ValueError(f"the guide holds no {kind[:-1]} of site {site!r} (a normal or meanfield guide does)")


def set_means(guide, means: dict[str, torch.Tensor]) -> None:
    """Set the location of every site named in ``means`` (a ``normal`` or ``meanfield`` guide,
    whose locations live in ``guide.locs``; the weights' support is real, so the stored
    unconstrained value is the mean itself)."""
    state = guide.state_dict()
    for site, value in means.items():
        key = _loc_key(state, site)
        if state[key].shape != value.shape:
            raise ValueError(f"site {site!r}: mean of shape {tuple(value.shape)} for a location of shape {tuple(state[key].shape)}")
        state[key] = value.detach().to(state[key])
    guide.load_state_dict(state)


def normal_means(guide, model: BayesianMLP, std: float = 0.1, truncate: bool = True) -> None:
    """Every location from ``N(0, std^2)``, truncated at ``2 std`` (TensorFlow's
    ``truncated_normal``, VCL's initialisation of weights and biases) or not (Swaroop et al.'s
    re-initialisation), drawn from torch's global generator."""
    means = {}
    for site, shape in model.site_shapes.items():
        value = torch.empty(shape)
        means[site] = torch.nn.init.trunc_normal_(value, std=std, a=-2 * std, b=2 * std) if truncate else value.normal_(0.0, std)
    set_means(guide, means)


def load_rows(model: BayesianMLP, guide, state: dict, rows: slice) -> None:
    """Set the output ``rows`` of the guide (locations and scales of the output sites) to those of
    the saved posterior ``state``, leaving everything else as it is: a fresh posterior that keeps
    the heads, or digits, already learnt."""
    merged = guide.state_dict()
    for key, value in merged.items():
        if any(site in key for site in model.output_sites):
            value[rows] = state[key][rows]
    guide.load_state_dict(merged)


def prior_from_posterior(guide, model: BayesianMLP, base_prior: Prior, base_std: float, tau: float = 1.0,
                         fresh_rows: slice | None = None) -> PerSitePrior:
    """The next task's prior from the fitted ``guide``: ``N(loc_q, (tau * scale_q)^2)`` per weight
    (:func:`~pyro_bbt.guides.posterior_as_prior`), ``base_prior`` for sites the guide does not
    hold, and ``N(0, base_std^2)`` on the output ``fresh_rows`` that have seen no data."""
    prior = posterior_as_prior(guide, model, tau, fallback=base_prior)
    if fresh_rows is not None:
        for site in model.output_sites:
            prior.loc(site)[fresh_rows] = 0.0
            prior.scale(site)[fresh_rows] = base_std
    return prior


def broaden(prior: PerSitePrior, tau: float, output_sites: tuple[str, ...] = (), fresh_rows: slice | None = None) -> PerSitePrior:
    """``prior`` with every scale multiplied by ``tau`` (locations and fallback unchanged), except
    the rows ``fresh_rows`` of ``output_sites``: a head that has seen no data holds the base prior
    there (:func:`prior_from_posterior`), and broadening the transferred prior leaves it as it is,
    so that ``broaden(prior_from_posterior(..., 1, rows), tau, sites, rows)`` is
    ``prior_from_posterior(..., tau, rows)``."""
    scales = {s: tau * prior.scale(s) for s in prior.sites}
    if fresh_rows is not None:
        for site in output_sites:
            scales[site][fresh_rows] = prior.scale(site)[fresh_rows]
    return PerSitePrior({s: prior.loc(s) for s in prior.sites}, scales, fallback=prior.fallback)


def fit_posterior(
    model: BayesianMLP,
    guide,
    train_split: Split,
    recipe: FitRecipe,
    seed: int,
    *,
    val_split: Split | None = None,
    eval_samples: int = 0,
    on_epoch: Callable[[EpochDiagnostics], None] | None = None,
    store: CheckpointStore | None = None,
    key: str = "",
    extra: dict[str, list] | None = None,
) -> Fit:
    """Fit ``guide`` to ``model``'s posterior on ``train_split`` by ``recipe`` and judge it by
    ``recipe.verdict_rule`` (with the blank-pixel ratio of
    :func:`~pyro_bbt.convergence.uninformed_scale_ratio`).

    The guide keeps its current parameters: start it where the fit should start
    (:func:`new_posterior`, :func:`start_from_state`). With ``store``, a checkpoint is saved
    under ``key`` after every epoch and, when one exists, the fit continues from it bit for bit;
    ``extra`` (lists, for example a learning curve that ``on_epoch`` fills) is saved and
    restored with it. ``val_split`` and ``eval_samples`` give a per-epoch validation accuracy.
    :raises ~pyro_bbt.inference.NonFiniteLossError: when the loss or a parameter goes non-finite.
    """
    extra = {} if extra is None else extra
    resume = None
    saved = store.checkpoint(key) if store is not None else None
    if saved is not None:
        resume = TrainState.from_dict(saved["train_state"])
        for name, value in saved["extra"].items():
            extra[name][:] = value

    def save(state: TrainState) -> None:
        store.save_checkpoint(key, {"train_state": state.to_dict(), "extra": extra})

    start = time.perf_counter()
    history = train(model, guide, train_split, recipe.train_config(seed, eval_samples), val_split=val_split, on_epoch=on_epoch,
                    on_checkpoint=save if store is not None else None, resume=resume).to_records()
    seconds = time.perf_counter() - start
    convergence = None
    if recipe.verdict_rule is not None:
        report = assess_convergence(history, recipe.verdict_rule, uninformed_scale_ratio(guide, model, train_split.x), recipe.cap)
        convergence = report.to_dict()
    return Fit(history, convergence, seconds)
