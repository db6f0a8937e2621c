"""Time to a converged posterior: pyro_bbt's q_A recipe against IVON, plain Pyro SVI,
bayesian-torch's layers and the deterministic floor, on one problem and under one verdict.

Run ``python benchmarks/converge.py`` from the repository's root (``--help`` for the flags). Like
``benchmarks/bench.py`` (the step bench) this script is not part of the installed package: it
imports ``pyro_bbt`` like any user's code; the IVON row needs ``ivon-opt`` (``pip install -e
".[bench]"``).

The step bench times one optimisation step. What a study waits for is a *converged* posterior:
this bench times each way of fitting the same mean-field posterior until the library's verdict
(:func:`pyro_bbt.verdict.judge`) calls it converged, counting the verdict's own judgements.

The problem (``--problem``)
---------------------------
The posterior of task A of split MNIST (digits 0-4, the ``train`` split of
:func:`pyro_bbt.data.load_task` as the paper preset loads it) under the paper preset as it was until 2026-12-07
(:data:`pyro_bbt.experiment.PRESETS` ``"paper-v5"``, the default ``--preset``): prior ``N(0, 1)`` on every weight and bias,
``meanfield`` guide ``q(w) = N(mu, diag sigma^2)`` starting at ``sigma = init_scale = 0.01``.

* ``task-a``: all of A's training images, 784-400-400-5 (the issue's target problem);
* ``small``: A's first 2,000 training images, 784-32-5 (the small problem of
  :mod:`pyro_bbt.verdict`'s measurements);
* ``b-10``: task B (digits 5-9) on its stratified tenth (2,647 images, seed 0's split),
  784-400-400-5, fitted by the same q_A recipe: a B fit from the base prior (``averaging.py
  --transfer`` starts it from q_A instead).

``--limit-train`` and ``--hidden`` override the problem's size (tests go tiny with them).

The rows (``--rows``)
---------------------
* ``recipe``: today's q_A recipe, exactly as the paper preset fits q_A:
  :meth:`~pyro_bbt.experiment.ExperimentConfig.recipe_a` through
  :func:`~pyro_bbt.fitting.fit_posterior` (Adam, the stopping rule with its learning-rate drops,
  then the verdict, which overrules the rule's stop until it passes or its overrules are spent,
  and, in the paper preset, its continuation: a pass counts once a continuation as long as the fit
  so far no longer raises the ELBO), from :meth:`~pyro_bbt.experiment.ExperimentConfig.new_posterior`. Where a tenth of the data is
  fewer than the preset's 2,048 images, the minibatch is that tenth (at least 32), as the small
  problem's measurements used (200 on 2,000 images) and as
  :meth:`~pyro_bbt.experiment.ExperimentConfig.recipe_b_converged` does; on task A the recipe is
  ``recipe_a()`` itself. The row follows the library: change the preset's recipe and it changes.
* ``recipe-mle``: the same recipe with the means started at the weights of the ``mlp`` row's
  deterministic net after early stopping (VCL's start for its first task), the net's fit counted
  in the row's time (``start_seconds``); the widths start at ``init_scale`` as in ``recipe``.
* ``ivon``: IVON (Shen et al. 2024, ``ivon.IVON`` of ``ivon-opt``) on a deterministic
  :class:`pyro_bbt.ewc.MLP` of the same sizes, started at the recipe's initial means. IVON keeps
  a diagonal Gaussian ``N(m, diag s^2)`` over the parameters; the parameters hold ``m`` and, per
  ``ivon/_ivon.py`` (ivon-opt 0.1.3), ``_sample_params`` draws
  ``noise = randn / (ess * (hess + weight_decay)).sqrt()`` (lines 200-205) and adds it to ``m``
  (line 218), with ``hess`` starting at ``hess_init`` (line 126). So

      s = 1 / sqrt(ess * (hess + weight_decay)),

  and its objective, ``E_q[mean loss(w) + weight_decay/2 |w|^2] - H(q)/ess`` for the mean
  cross-entropy, times ``ess = N``, is the negative ELBO under the prior ``N(0, 1/(N weight_decay))``
  up to a constant.
  Hence ``ess = N`` and ``weight_decay = 1/(N sigma_p^2)`` (the package's default weight decay,
  1e-4, would silently change the prior: ``sigma_p = 1/sqrt(1e-4 N)``, 0.6 on task A), and
  ``hess_init = 1/(N sigma_0^2) - weight_decay`` so that IVON starts at the recipe's
  ``sigma_0 = init_scale``. Its posterior ``(m, s)`` is copied into a ``meanfield`` guide of the
  library (:func:`~pyro_bbt.guides.start_from_posterior`) to be judged and scored.
  Hyperparameters from the paper and its code: ``beta1`` 0.9, ``beta2`` 0.99999 (the package's
  defaults and the paper's image-classification runs), one Monte Carlo sample per step (the
  package's "standard setting"), ``lr`` 0.1 (the package README's example; its rescaled step
  ``lr (hess_init + weight_decay) (g + weight_decay m) / (hess + weight_decay)`` starts as SGD with
  momentum at ``lr``), constant by default (the paper anneals it over a fixed budget, which a fit
  to a verdict does not have; ``--ivon-lr-drops N`` drops it by ``--ivon-lr-factor`` where the
  recipe's stopping rule would drop the recipe's rates, :func:`ivon_annealer`), minibatches of 128. Note: a weight whose input is 0 in every image has
  no likelihood curvature, so its ``hess`` only decays as ``beta2^t``: its ``s`` reaches the
  prior's (the verdict's blank-pixel check) after about ``ln(N hess_init / 0.235) / (1 - beta2)``
  steps, 10^6 at ``beta2 = 0.99999`` (the paper's code ran its small UCI problems at 0.999,
  ``ivon-experiments/bdl_competition/run_uci.sh``). Every ``--ivon-*`` flag changes one of these.
* ``pyro-svi``: Pyro written the obvious way, as the step bench's ``pyro-autonormal-svi``:
  :class:`~pyro_bbt.model.BayesianMLP` with the preset's prior, ``AutoNormal(model,
  init_scale=init_scale)`` (its default ``init_to_feasible`` starts every mean at 0),
  ``SVI(model, guide, pyro.optim.Adam({"lr": 1e-3}), Trace_ELBO())``, minibatches of 128.
* ``bayes-torch``: bayesian-torch's ``LinearReparameterization`` layers (``bayesian-torch`` from
  ``pip install -e ".[bench]"``; skipped with one line when missing) with the library's own
  initialisation of the means, widths ``log(1 + exp(rho))`` starting near ``init_scale``, one
  weight draw per step, Adam 1e-3 on every parameter, minibatches of 128, the loss per step the
  mean cross-entropy plus ``KL / N`` (the ELBO's weighting; the library's MNIST example divides
  the KL by the batch size, another objective); its ``(mu, sigma)`` copied into a ``meanfield``
  guide after every epoch, as IVON's (:func:`run_bayes_torch`).
* ``mlp``: the floor, not Bayesian: :class:`pyro_bbt.ewc.MLP`, Adam 1e-3, minibatches of 128,
  early stopping on the accuracy of A's ``val`` split with patience 3 (stop after 3 epochs
  without a new best; the best epoch's weights are kept).

``ivon``, ``pyro-svi`` and ``bayes-torch`` are stopped the same way: every ``--judge-every`` epochs their
posterior is judged by :func:`~pyro_bbt.verdict.judge_by` with the recipe's own
:class:`~pyro_bbt.verdict.VerdictConfig` (its tolerance, seeded ``verdict.seed + epoch`` as
:func:`~pyro_bbt.inference.train` does). With ``--judge whole`` (the default) a pass counts, as
the recipe's do, once a continuation as long as the fit so far, in the row's own step at the
preset's ``continuation_rates`` times its own rate (``--peer-rates``), no longer raises the
fixed-noise ELBO by more than the tolerance (:class:`OwnStepContinuation`; a continuation that
gained starts the next at once); with ``--judge line-search`` the line
search's pass alone stops the row. They stop there, or at ``--time-cap`` seconds or
``--max-epochs`` epochs (judged once more there, outside a continuation; inside one the row is
not converged). ``mlp`` stops by early stopping or at
the same caps; ``recipe`` by its rule, at most its own cap (``--max-epochs`` lowers it). A row
that ends without a pass is reported "not converged by cap"; one whose loss goes non-finite
(``ivon``, ``pyro-svi``, ``bayes-torch``) "diverged", with its last finite posterior scored, and the others go on.

What is recorded
----------------
For every Bayesian row and round: the wall seconds from building the posterior to the end of
its last judgement (judgements included; ``judge_seconds`` says how much of it for the rows this
script judges), whether the verdict passed and its last upper bound per datum
(``gain_upper_per_datum``; ``None`` where the blank-pixel check already failed and the gain was
not measured), epochs, optimisation steps, and, after the clock stops:

* from **one evaluator** for every row (:class:`Evaluator`): the full-data ELBO
  ``L = sum_n E_q log p(y_n | x_n, w) - KL(q || p)`` by
  :func:`~pyro_bbt.fixed_noise.fixed_noise_elbo` with ``--eval-draws`` antithetic draws whose noise
  depends only on ``--eval-seed`` (the same draws for every row), and the expected train NLL per
  datum ``-(L + KL) / N`` with the closed-form KL;
* A's test accuracy: :func:`~pyro_bbt.evaluation.evaluate` on A's ``test`` split with 32 weight
  samples (seeded; the MLP: :func:`pyro_bbt.ewc.accuracy`);
* the ELBO against wall time: per epoch, the training estimate (the mean over the epoch's steps
  of each step's full-data ELBO estimate; IVON: ``-N`` times its mean cross-entropy at the sampled
  weights minus the closed-form KL at the epoch's end) at the wall second the epoch ended.

Rounds and output
-----------------
``--rounds R``: every row runs once per round, in turn (interleaved, so that a slow spell of the
machine falls on every row alike), on ``--threads`` torch threads (default 1), in this process
(not in a child per row as the step bench: fits last seconds to minutes, and no memory is read).
Round ``r`` seeds every row with ``--seed + r - 1``: a row's time to a verdict depends on its
trajectory, so the medians are over seeds and over the machine's noise together. The table gives
medians over rounds, the ratio of each row's median time to ``recipe``'s and to ``mlp``'s, and
each row's ELBO gap per datum to the best row's (median) ELBO. The JSON report (``--out``,
rewritten after every row, ``meta.complete`` says whether every row of every round finished)
keeps every round's raw record; the figure (``--figure``) draws ``-ELBO`` against wall seconds
on a log scale, one line per row and round, with the MLP's median time to early stopping as a
vertical line.

The target (the issue): q_A on ``task-a`` reaching the verdict, with an ELBO within the verdict's
tolerance per datum of the best row's, at least 4x faster than ``recipe`` reaches it, judgements
counted; ``target met`` in the table says which rows do (passing in every round).
"""

from __future__ import annotations

import argparse
import ast
import math
import os
import platform
import re
import statistics
import sys
import time
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from dataclasses import asdict, dataclass, field, fields, replace
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path

import pyro
import torch
import torch.nn.functional as F
from pyro.infer import SVI, Trace_ELBO
from pyro.infer.autoguide import AutoNormal
from torch import nn

from bench_common import INSTALL_HINT, bayes_torch_net, load_average, name_list, positive_int, select_available
from pyro_bbt.data import Split, Task, load_task
from pyro_bbt.evaluation import evaluate
from pyro_bbt.elbo_gradient import Posterior, read_posterior
from pyro_bbt.ewc import MLP, accuracy
from pyro_bbt.experiment import PRESETS, ExperimentConfig
from pyro_bbt.files import atomic_write_json
from pyro_bbt.fitting import FitRecipe, fit_posterior, set_means
from pyro_bbt.fixed_noise import continuation_gain, fixed_noise_elbo
from pyro_bbt.guides import AutoMeanFieldNormal, posterior_loc_scale, start_from_posterior
from pyro_bbt.inference import CONTINUATION_SEED_OFFSET
from pyro_bbt.model import BayesianMLP
from pyro_bbt.objectives import closed_form_kl
from pyro_bbt.convergence import StoppingRule
from pyro_bbt.verdict import VerdictConfig, continuation_verdict, judge_by

__all__ = [
    "Problem",
    "PROBLEMS",
    "IVONSettings",
    "ConvergeConfig",
    "ProblemData",
    "Evaluator",
    "Row",
    "ROWS",
    "load_problem",
    "experiment_overrides",
    "recipe_for",
    "verdict_config",
    "posterior_accuracy",
    "run_recipe",
    "run_judged",
    "OwnStepContinuation",
    "judge_row",
    "rate_setter",
    "ivon_optimizer",
    "ivon_posterior",
    "ivon_epoch",
    "run_ivon",
    "run_pyro_svi",
    "run_mlp",
    "select_rows",
    "run_row",
    "summarize",
    "markdown_table",
    "plot_elbo_against_time",
    "build_parser",
    "main",
]

BATCH_SIZE = 128  # the minibatch of pyro-svi, ivon (by default) and the MLP floor, as in the step bench
LR = 1e-3  # Adam's rate for pyro-svi and the MLP floor
PATIENCE = 3  # epochs without a new best validation accuracy before the MLP stops
EVAL_SAMPLES = 32  # weight samples of the test accuracy (the paper preset's eval_samples)
TARGET_SPEEDUP = 4.0  # the issue: at least 4x faster than today's recipe
DEFAULT_ROUNDS = 3
DEFAULT_TIME_CAP = 600.0
# How a row judged every k epochs stops at a pass (--judge): the line search alone (and its confirmation where the preset asks for
# one), or the whole verdict, the line search's pass confirmed by continuations of the row's own step (OwnStepContinuation).
JUDGED_PASS = "verdict's line search (no continuation)"
WHOLE_PASS = "verdict with its continuation (the row's own step)"
JUDGE_MODES = ("whole", "line-search")
DEFAULT_JUDGE_EVERY = 5
RECIPE, MLP_ROW = "recipe", "mlp"
CAP_REASONS = ("epoch cap", "time cap", "rule (verdict's overrules spent)")  # a row's stop that is no verdict and no failure


# ----------------------------------------------------------------------------- problems


@dataclass(frozen=True)
class Problem:
    """Task A's posterior on its first ``limit_train`` training images (``None``: all of them),
    network ``784 - hidden - 5``, under the paper preset's prior and guide; with ``digits``, the
    task of those digits instead (task B: 5-9), on the stratified ``fraction`` of its training
    images that :class:`~pyro_bbt.data.Task` keeps with seed 0 (B's split of seed 0 in the grid)."""

    name: str
    limit_train: int | None
    hidden: tuple[int, ...]
    description: str
    digits: tuple[int, ...] | None = None
    fraction: float = 1.0


PROBLEMS: dict[str, Problem] = {
    p.name: p
    for p in (
        Problem("task-a", None, (400, 400), "task A (digits 0-4), every training image, 784-400-400-5"),
        Problem("small", 2000, (32,), "task A's first 2,000 training images, 784-32-5 (the small problem of pyro_bbt.verdict)"),
        Problem("b-10", None, (400, 400), "task B (digits 5-9), 10 % of its training images (2,647: seed 0's split), 784-400-400-5 "
                "(from the base prior: scratch; averaging.py --transfer: from q_A)", digits=(5, 6, 7, 8, 9), fraction=0.1),
    )
}


@dataclass(frozen=True)
class IVONSettings:
    """IVON's hyperparameters (module docstring): step ``lr``, momenta ``beta1`` (gradient) and
    ``beta2`` (Hessian), ``mc_samples`` weight samples per step, minibatches of ``batch_size``;
    ``lr_drops`` times (0: a constant rate) the rate is multiplied by ``lr_factor`` where the
    recipe's own stopping rule says its ELBO has stopped rising (:func:`ivon_annealer`).
    ``ess``, ``weight_decay`` and ``hess_init`` are not settings: they follow from the prior, the
    data size and the starting width (:func:`ivon_optimizer`)."""

    lr: float = 0.1
    beta1: float = 0.9
    beta2: float = 0.99999
    mc_samples: int = 1
    batch_size: int = BATCH_SIZE
    lr_drops: int = 0
    lr_factor: float = 0.3

    def __post_init__(self) -> None:
        if not (math.isfinite(self.lr) and self.lr > 0):
            raise ValueError(f"IVON's lr must be a finite number > 0, got {self.lr!r}")
        if isinstance(self.lr_drops, bool) or not isinstance(self.lr_drops, int) or self.lr_drops < 0:
            raise ValueError(f"IVON's lr drops must be an integer >= 0, got {self.lr_drops!r}")
        if not 0 < self.lr_factor < 1:
            raise ValueError(f"IVON's lr factor must lie in (0, 1), got {self.lr_factor!r}")
        for name in ("beta1", "beta2"):
            if not 0 <= getattr(self, name) < 1:
                raise ValueError(f"IVON's {name} must lie in [0, 1), got {getattr(self, name)!r}")
        for name in ("mc_samples", "batch_size"):
            if getattr(self, name) < 1:
                raise ValueError(f"IVON's {name} must be an integer >= 1, got {getattr(self, name)!r}")


@dataclass(frozen=True)
class ConvergeConfig:
    """One run of the bench: the ``problem`` (with ``limit_train`` / ``hidden`` already applied),
    the caps (``max_epochs``: every row, the recipe's rule included, ``None``: the rows' own;
    ``time_cap``: seconds for ``ivon``, ``pyro-svi`` and ``mlp``), how often ``ivon`` and
    ``pyro-svi`` are judged (``judge_every`` epochs) and by what (``judge``: ``"whole"``, the line
    search and its continuation; ``"line-search"``, the line search alone) and at what fractions
    of their own rates their continuations run (``peer_rates``; ``None``: the verdict's
    ``continuation_rates``), the common evaluator's draws and seed, and IVON's settings."""

    problem: Problem
    max_epochs: int | None = None
    time_cap: float = DEFAULT_TIME_CAP
    judge_every: int = DEFAULT_JUDGE_EVERY
    eval_draws: int = 8
    eval_seed: int = 0
    ivon: IVONSettings = field(default_factory=IVONSettings)
    continuation: tuple[tuple[int, float], ...] = ()
    experiment: tuple[tuple[str, object], ...] = ()
    preset: str = "paper-v5"
    judge: str = "whole"
    peer_rates: tuple[float, ...] | None = None

    def __post_init__(self) -> None:
        if self.judge not in JUDGE_MODES:
            raise ValueError(f"judge must be one of {', '.join(JUDGE_MODES)}, got {self.judge!r}")
        if self.peer_rates is not None and not (self.peer_rates and all(math.isfinite(f) and f > 0 for f in self.peer_rates)):
            raise ValueError(f"peer_rates must be None or factors > 0, got {self.peer_rates!r}")
        if self.max_epochs is not None and (not isinstance(self.max_epochs, int) or self.max_epochs < 1):
            raise ValueError(f"max_epochs must be None or an integer >= 1, got {self.max_epochs!r}")
        if not (math.isfinite(self.time_cap) and self.time_cap > 0):
            raise ValueError(f"time_cap must be a finite number of seconds > 0, got {self.time_cap!r}")
        for name in ("judge_every", "eval_draws"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be an integer >= 1, got {getattr(self, name)!r}")
        if self.preset not in PRESETS:
            raise ValueError(f"unknown preset {self.preset!r}; allowed: {', '.join(PRESETS)}")
        for epochs, lr in self.continuation:
            if not (isinstance(epochs, int) and epochs >= 1 and math.isfinite(lr) and lr > 0):
                raise ValueError(f"each continuation stage must be EPOCHS@LR with EPOCHS >= 1 and LR > 0, got {epochs!r}@{lr!r}")


@dataclass
class ProblemData:
    """The paper preset sized to the problem (``experiment``) and task A's splits."""

    experiment: ExperimentConfig
    train: Split
    val: Split
    test: Split

    @property
    def num_data(self) -> int:
        return len(self.train)


def load_problem(problem: Problem, overrides: Mapping[str, object] | None = None, preset: str = "paper-v5") -> ProblemData:
    """The ``preset`` (the paper preset, ``--preset``) with the problem's hidden sizes (and
    ``overrides`` of its :class:`~pyro_bbt.experiment.ExperimentConfig` fields, ``--experiment``),
    and the problem's task's ``train`` (its first ``limit_train`` images), ``val`` and ``test``
    splits: task A's, or the task of ``problem.digits`` on its ``fraction``."""
    experiment = ExperimentConfig(**PRESETS[preset] | dict(hidden=problem.hidden) | dict(overrides or {}))
    if problem.digits is None:
        task = load_task(Task(digits=experiment.task_a, name="A"))
    else:
        task = load_task(Task(digits=problem.digits, fraction=problem.fraction, name=problem.name))
    train = task.train if problem.limit_train is None else task.train.subset(problem.limit_train)
    return ProblemData(experiment, train, task.val, task.test)


def add_problem_arguments(parser: argparse.ArgumentParser) -> None:
    """``--problem``, its resizing for tests (``--limit-train``, ``--hidden``), ``--preset`` (whose
    q_A recipe fits to the pass, default ``paper-v2``) and ``--seed``: what the scripts that start
    from a fitted pass (``averaging.py``, ``ngsteps.py``) share; :func:`problem_from_args` reads them."""
    parser.add_argument("--problem", choices=sorted(PROBLEMS), default="small")
    parser.add_argument("--limit-train", type=positive_int, help="the problem's first N training images (tests)")
    parser.add_argument("--hidden", type=positive_int, help="one hidden layer of this width instead of the problem's (tests)")
    parser.add_argument("--preset", choices=sorted(PRESETS), default="paper-v2", help="whose q_A recipe fits to the pass (default paper-v2)")
    parser.add_argument("--seed", type=int, default=0)


def problem_from_args(args: argparse.Namespace) -> Problem:
    """The ``--problem``, resized by ``--limit-train`` and ``--hidden`` where given."""
    problem = PROBLEMS[args.problem]
    if args.limit_train is None and args.hidden is None:
        return problem
    return replace(problem, limit_train=args.limit_train or problem.limit_train, hidden=(args.hidden,) if args.hidden else problem.hidden,
                   description=problem.description + " (resized)")


def recipe_for(experiment: ExperimentConfig, num_data: int, max_epochs: int | None = None) -> FitRecipe:
    """``experiment.recipe_a()`` in minibatches of ``min(its batch, max(32, ceil(N / 10)))`` (on
    task A its own 2,048), its epochs at most ``max_epochs`` (``None``: its own cap)."""
    recipe = experiment.recipe_a()
    recipe = replace(recipe, batch_size=min(recipe.batch_size, max(32, math.ceil(num_data / 10))))
    if max_epochs is None:
        return recipe
    if recipe.rule is not None:
        rule = replace(recipe.rule, max_epochs=min(recipe.rule.max_epochs, max_epochs), min_epochs=min(recipe.rule.min_epochs, max_epochs))
        return replace(recipe, rule=rule)
    if recipe.epochs is not None:
        return replace(recipe, epochs=min(recipe.epochs, max_epochs))
    return recipe


def verdict_config(experiment: ExperimentConfig) -> VerdictConfig:
    """The verdict every Bayesian row is judged by: the recipe's own (the library's default
    where the preset has none). The rows that run their own loops (``ivon``, ``pyro-svi``,
    ``bayes-torch``) get its line search and, with ``--judge whole`` (the default) and a preset whose
    verdict continues, its continuation in their own step (:class:`OwnStepContinuation`)."""
    return experiment.recipe_a().verdict or VerdictConfig()


# ---------------------------------------------------------------------------- evaluator


@dataclass(frozen=True)
class Score:
    """The common evaluator's numbers: the full-data ELBO ``L`` (nats), ``L / N``, the
    closed-form ``KL(q || p)`` and the expected train NLL per datum ``-(L + KL) / N``."""

    elbo: float
    elbo_per_datum: float
    kl: float
    train_nll_per_datum: float


@dataclass(frozen=True)
class Evaluator:
    """One scorer for every row's posterior: :func:`~pyro_bbt.fixed_noise.fixed_noise_elbo` on the
    training split with ``num_draws`` antithetic local-reparameterisation draws whose noise
    depends only on ``seed``, ``batch_size`` and the shapes (common random numbers: the same
    posterior gets the same ELBO whichever row fitted it, and two rows are compared on the same
    draws), and ``KL(q || p)`` in closed form (:func:`~pyro_bbt.objectives.closed_form_kl`)."""

    num_draws: int = 8
    seed: int = 0
    batch_size: int = 1000

    @torch.no_grad()
    def score(self, model: BayesianMLP, guide: AutoNormal, split: Split) -> Score:
        elbo = fixed_noise_elbo(model, guide, split, num_draws=self.num_draws, seed=self.seed, batch_size=self.batch_size)
        kl = float(closed_form_kl(model, posterior_loc_scale(guide, model)))
        num_data = len(split)
        return Score(elbo, elbo / num_data, kl, -(elbo + kl) / num_data)


@torch.no_grad()
def posterior_accuracy(model: BayesianMLP, guide: AutoNormal, split: Split, seed: int) -> float:
    """Accuracy of the predictive mean over :data:`EVAL_SAMPLES` weight samples
    (:func:`~pyro_bbt.evaluation.evaluate`), drawn after seeding with ``seed`` (RNG-neutral)."""
    with torch.random.fork_rng():
        torch.manual_seed(seed)
        return evaluate(model, guide, split.x, split.y, num_samples=EVAL_SAMPLES).accuracy


# ------------------------------------------------------------------------------ records


@dataclass(frozen=True)
class TracePoint:
    """One epoch: its training ELBO estimate (or the MLP's validation accuracy) at the wall
    second it ended, judgements before it included."""

    epoch: int
    steps: int
    seconds: float
    elbo: float | None = None
    val_accuracy: float | None = None


@dataclass
class Finished:
    """How a row's fit ended: wall ``seconds`` (judgements included), its epochs, steps and trace,
    the last verdict record (``None``: never judged), what stopped it, and how many judgements
    took how long (``judge_seconds``: ``None`` where the library judged inside its own fit)."""

    seconds: float
    epochs: int
    steps: int
    trace: list[TracePoint]
    verdict: dict | None
    stopped_by: str
    judgements: int
    judge_seconds: float | None
    start_seconds: float | None = None
    continuations: list[dict] = field(default_factory=list)


def _verdict_summary(verdict: dict | None) -> dict:
    if verdict is None:
        return {"converged": False, "gain_upper_per_datum": None, "reasons": ["never judged"]}
    return {"converged": bool(verdict["converged"]), "gain_upper_per_datum": verdict["gain_upper_per_datum"], "reasons": list(verdict["reasons"])}


def continue_fit(data: ProblemData, config: ConvergeConfig, model: BayesianMLP, guide: AutoNormal, seed: int) -> list[dict]:
    """What the ELBO still gains (off the clock): the posterior fitted further, stage by stage of
    ``config.continuation`` (``EPOCHS`` epochs at Adam ``LR`` for the means and ``3 LR`` for the
    widths, fresh moments, the recipe's minibatch and KL schedule, no verdict), each stage's end
    scored by the common evaluator. The verdict's gain is what *one* step still finds; this is
    what the optimiser still finds in hundreds of epochs (a long, gently sloped valley that one
    step cannot follow shows here and not there). Only for the ``meanfield`` guide (every row's
    posterior is scored in one: ``pyro-svi``'s ``AutoNormal`` is copied into one at its end)."""
    if not config.continuation or not isinstance(guide, AutoMeanFieldNormal):
        return []
    evaluator = Evaluator(config.eval_draws, config.eval_seed)
    recipe = recipe_for(data.experiment, data.num_data)
    stages, total = [], 0
    for index, (epochs, lr) in enumerate(config.continuation):
        more = FitRecipe(lr=lr, scale_lr=3 * lr, batch_size=recipe.batch_size, epochs=epochs, kl_schedule=recipe.kl_schedule,
                         estimator=recipe.estimator, num_particles=recipe.num_particles, verdict=None)
        fit_posterior(model, guide, data.train, more, seed + 1_000 * (index + 1))
        total += epochs
        stages.append({"epochs": total, "lr": lr, "elbo": evaluator.score(model, guide, data.train).elbo})
    return stages


def bayesian_record(data: ProblemData, config: ConvergeConfig, model: BayesianMLP, guide: AutoNormal, finished: Finished, seed: int) -> dict:
    """A Bayesian row's raw record: how it finished, then (off the clock) the common evaluator's
    ELBO and train NLL and A's test accuracy, and, with ``config.continuation``, the ELBO after
    fitting on (:func:`continue_fit`) and the gain per datum that still remained."""
    score = Evaluator(config.eval_draws, config.eval_seed).score(model, guide, data.train)
    accuracy = posterior_accuracy(model, guide, data.test, config.eval_seed)
    continued = continue_fit(data, config, model, guide, seed)
    verdict = _verdict_summary(finished.verdict)
    return {
        "seconds": finished.seconds,
        "converged": verdict["converged"],
        "gain_upper_per_datum": verdict["gain_upper_per_datum"],
        "verdict_reasons": verdict["reasons"],
        "stopped_by": finished.stopped_by,
        "judgements": finished.judgements,
        "judge_seconds": finished.judge_seconds,
        "continuations": finished.continuations,
        "start_seconds": finished.start_seconds,
        "epochs": finished.epochs,
        "steps": finished.steps,
        **asdict(score),
        "test_accuracy": accuracy,
        "trace": [asdict(point) for point in finished.trace],
        "continued": continued,
        "remaining_gain_per_datum": (max(stage["elbo"] for stage in continued) - score.elbo) / data.num_data if continued else None,
    }


# --------------------------------------------------------------------------- the recipe


def _recipe_stopped_by(fit_converged: bool | None, epochs: int, cap: int | None) -> str:
    if fit_converged:
        return "verdict"
    if cap is not None and epochs >= cap:
        return "epoch cap"
    return "rule (verdict's overrules spent)"


def run_recipe(data: ProblemData, config: ConvergeConfig, seed: int, mle_start: bool = False) -> dict:
    """Today's q_A recipe: the paper preset's ``recipe_a`` (:func:`recipe_for`) through
    :func:`~pyro_bbt.fitting.fit_posterior`, from the preset's fresh posterior; the verdict's
    judgements happen inside the fit and are timed with it. With ``mle_start`` (the
    ``recipe-mle`` row) the posterior's means start at the deterministic MLP's weights after
    early stopping (:func:`fit_mlp`, as VCL starts its first task), its time counted
    (``start_seconds``); the widths start as the recipe's."""
    experiment = data.experiment
    recipe = recipe_for(experiment, data.num_data, config.max_epochs)
    start = time.perf_counter()
    model, guide = experiment.new_posterior(experiment.base_prior(), seed)
    start_seconds = None
    if mle_start:
        set_means(guide, {name: value.detach() for name, value in fit_mlp(data, config, seed, start).net.named_parameters()})
        start_seconds = time.perf_counter() - start
    marks: list[float] = []
    fit = fit_posterior(model, guide, data.train, recipe, seed, on_epoch=lambda _: marks.append(time.perf_counter() - start))
    seconds = time.perf_counter() - start
    trace = [TracePoint(r["epoch"], r["steps"], mark, elbo=r["elbo"]) for r, mark in zip(fit.history, marks)]
    judged = [r["verdict"] for r in fit.history if r["verdict"] is not None]
    judgements = sum(1 + ("confirmation" in v) for v in judged)
    finished = Finished(seconds, fit.epochs, fit.steps, trace, judged[-1] if judged else None,
                        _recipe_stopped_by(fit.converged, fit.epochs, recipe.cap), judgements, None, start_seconds)
    return bayesian_record(data, config, model, guide, finished, seed)


def run_recipe_mle(data: ProblemData, config: ConvergeConfig, seed: int) -> dict:
    """:func:`run_recipe` with the means started at the deterministic MLP's weights."""
    return run_recipe(data, config, seed, mle_start=True)


def run_recipe_averaged(data: ProblemData, config: ConvergeConfig, seed: int) -> dict:
    """:func:`run_recipe` with ``continuation_average``: each continuation's end is the average of
    the guide's parameters over its epochs at the last rate (a preset with continuations only)."""
    return run_recipe(replace(data, experiment=replace(data.experiment, continuation_average=True)), config, seed)


# ------------------------------------------------------------------- judged every k epochs


def run_judged(train_epoch: Callable[[], tuple[float, int]], judge: Callable[[int], dict], config: ConvergeConfig, start: float,
               continuer: "OwnStepContinuation | None" = None, anneal: Callable[[], None] | None = None) -> Finished:
    """Epochs of ``train_epoch`` (returns the epoch's training ELBO estimate and the steps so far)
    from the clock's ``start``, ``judge(epoch)`` after every ``config.judge_every``-th epoch and
    after the last: stop at the first pass, or after the epoch that reaches ``config.time_cap``
    seconds or ``config.max_epochs`` epochs, or where ``train_epoch`` raises
    ``FloatingPointError`` (diverged: the posterior stays the last finite epoch's, the other rows
    go on).

    With a ``continuer`` (``--judge whole``, :class:`OwnStepContinuation`) a pass of the line
    search counts, as in :func:`~pyro_bbt.inference.train`, only once a continuation as long as
    the fit so far (``VerdictConfig.continuation_length``) no longer raises the fixed-noise ELBO by
    more than the tolerance: ``continuer.start(epoch)`` where it starts, ``continuer.finish(...)``
    after its last epoch (the verdict's record; its cost counts in ``judge_seconds``). A
    continuation that gained starts the next one at once, confirming the same pass; a cap inside a
    continuation ends the row ``converged: false``, as in ``train``. Before each of a
    continuation's epochs ``continuer.before_epoch(done, running)`` sets the row's rate for it.
    ``anneal()``, where given, runs after every epoch outside a continuation (a row's own rate
    schedule, :func:`ivon_annealer`); a continuation sets its own rates."""
    trace: list[TracePoint] = []
    verdict, judgements, judge_seconds, stopped_by = None, 0, 0.0, "epoch cap"
    epoch = steps = 0
    pass_record: dict | None = None  # the line-search pass the running continuation confirms
    running: dict | None = None  # the running continuation (continuer.start's record)
    continuations: list[dict] = []
    while True:
        epoch += 1
        if running is not None:
            continuer.before_epoch(epoch - 1 - running["start_epoch"], running)
        try:
            elbo, steps = train_epoch()
        except FloatingPointError as error:
            stopped_by = f"diverged in epoch {epoch} ({error})"
            if running is not None:
                verdict = _unfinished(pass_record, running, epoch - 1, f"the row diverged in epoch {epoch}")
            break
        trace.append(TracePoint(epoch, steps, time.perf_counter() - start, elbo=elbo))
        over_time = time.perf_counter() - start >= config.time_cap
        at_cap = config.max_epochs is not None and epoch >= config.max_epochs
        cap = "time cap" if over_time else "epoch cap"
        if running is not None:
            if epoch - running["start_epoch"] < running["epochs"]:
                if over_time or at_cap:
                    verdict, stopped_by = _unfinished(pass_record, running, epoch, f"the row reached its {cap}"), cap
                    break
                continue
            judged_at = time.perf_counter()
            verdict = continuer.finish(running, epoch, pass_record)
            judge_seconds += time.perf_counter() - judged_at
            continuations.append(verdict["continuation"])
            if verdict["converged"]:
                stopped_by = WHOLE_PASS
                break
            running = continuer.start(epoch)  # it gained: the next continuation starts here and confirms the same pass
        else:
            if anneal is not None:
                anneal()
            if epoch % config.judge_every == 0 or over_time or at_cap:
                judged_at = time.perf_counter()
                verdict = judge(epoch)
                judge_seconds += time.perf_counter() - judged_at
                judgements += 1 + ("confirmation" in verdict)
                if verdict["converged"]:
                    if continuer is None:
                        stopped_by = JUDGED_PASS
                        break
                    pass_record, running = verdict, continuer.start(epoch)
                    if over_time or at_cap:
                        verdict = _unfinished(pass_record, running, epoch, f"the row reached its {cap}")
        if over_time or at_cap:
            stopped_by = cap
            break
    return Finished(time.perf_counter() - start, len(trace), steps, trace, verdict, stopped_by, judgements, judge_seconds,
                    continuations=continuations)


def _unfinished(pass_record: dict, running: dict, epoch: int, why: str) -> dict:
    """The record of a row that stopped inside the continuation confirming ``pass_record``:
    not converged."""
    done = epoch - running["start_epoch"]
    return dict(pass_record) | {"converged": False, "reasons": [f"{why} {done} epochs into the {running['epochs']}-epoch continuation that "
                                                              f"confirms the pass of epoch {pass_record.get('epoch', running['start_epoch'])}"]}


@dataclass
class OwnStepContinuation:
    """The verdict's continuation for a row that runs its own loop (``--judge whole``): the row's
    posterior, mirrored in ``guide`` after every epoch, fitted on by the row's own step for
    ``L = verdict.continuation_length(t)`` epochs after a pass at epoch ``t`` (rounded up to a
    multiple of ``len(rates)``), in ``len(rates)`` equal parts at ``rates[k]`` times the row's own
    rate (``set_rate(factor)``; the recipe's continuations run at ``continuation_rates`` times its
    first rates, and ``rates`` are those factors unless ``--peer-rates`` says otherwise), then
    scored as :func:`~pyro_bbt.inference.train` scores the recipe's continuations:
    :func:`~pyro_bbt.fixed_noise.continuation_gain` from the start to the end (the same
    ``continuation_draws`` antithetic draws for both, added up to ``continuation_max_draws``,
    seeded ``verdict.seed + CONTINUATION_SEED_OFFSET + t``), converged when the gain's upper bound
    ``(nats + 2 stderr) / N`` is at most ``tol_per_datum`` and the exact checks hold for the
    posterior kept (the start where the ELBO fell, written back into ``guide``; else the end). A
    continuation that gained is followed by the next at ``rates[0]`` again, as in ``train``."""

    model: BayesianMLP
    guide: AutoNormal
    split: Split
    verdict: VerdictConfig
    set_rate: Callable[[float], None]
    rates: tuple[float, ...] = (1.0,)

    def start(self, epoch: int) -> dict:
        """A continuation starting after ``epoch`` epochs: the posterior there, its length and seed."""
        parts = len(self.rates)
        length = -(-self.verdict.continuation_length(epoch) // parts) * parts
        return {"start_epoch": epoch, "epochs": length, "posterior": read_posterior(self.guide),
                "seed": self.verdict.seed + CONTINUATION_SEED_OFFSET + epoch}

    def before_epoch(self, done: int, running: dict) -> None:
        """The row's rate for the continuation's epoch after ``done`` of its epochs."""
        self.set_rate(self.rates[min(done // (running["epochs"] // len(self.rates)), len(self.rates) - 1)])

    def finish(self, running: dict, epoch: int, pass_record: dict) -> dict:
        """The verdict after the continuation ``running`` ended at ``epoch``: ``pass_record`` (the
        line search's pass it confirms) with ``continuation`` (the gain, what was kept) and the
        exact checks of the posterior kept, by the rule ``train`` applies
        (:func:`~pyro_bbt.verdict.continuation_verdict`)."""
        v = self.verdict
        gain = continuation_gain(self.model, running["posterior"], read_posterior(self.guide), self.split, num_draws=v.continuation_draws,
                                 seed=running["seed"], batch_size=v.batch_size, epochs=epoch - running["start_epoch"], factors=self.rates,
                                 max_draws=v.continuation_max_draws, tol_per_datum=v.tol_per_datum)
        passed = gain.upper_per_datum <= v.tol_per_datum
        kept = "start" if passed and gain.nats < 0 else "end"
        if kept == "start":
            start_from_posterior(self.guide, running["posterior"])
        return continuation_verdict(self.model, self.guide, self.split, v, pass_record, gain,
                                    f"of the row's own step at {', '.join(f'{f:g}' for f in self.rates)} x its rate",
                                    {"kept": kept, "start_epoch": running["start_epoch"]})


def rate_setter(groups: Callable[[], Iterable[dict]], rate: float) -> Callable[[float], None]:
    """``set_rate(factor)``: every parameter group that ``groups()`` yields then gets the learning
    rate ``factor * rate`` (a row's continuation at a fraction of its own rate)."""
    def set_rate(factor: float) -> None:
        for group in groups():
            group["lr"] = factor * rate
    return set_rate


def _judge_with(model: BayesianMLP, guide: AutoNormal, split: Split, verdict: VerdictConfig) -> Callable[[int], dict]:
    """``judge(epoch)``: the verdict's record of ``guide`` after ``epoch``, seeded as
    :func:`~pyro_bbt.inference.train` seeds its judgements."""
    return lambda epoch: judge_by(model, guide, split, verdict, verdict.seed + epoch) | {"epoch": epoch}


def judge_row(train_epoch: Callable[[], tuple[float, int]], model: BayesianMLP, guide: AutoNormal, data: ProblemData, config: ConvergeConfig,
              start: float, set_rate: Callable[[float], None], anneal: Callable[[], None] | None = None) -> Finished:
    """:func:`run_judged` for a row whose posterior ``guide`` mirrors after every epoch, judged by
    the recipe's verdict (:func:`verdict_config`): the line search alone (``config.judge``
    ``"line-search"``) or with its continuation of the row's own step (``"whole"``), at
    ``config.peer_rates`` (``None``: the verdict's ``continuation_rates``) times its rate
    (``set_rate``)."""
    verdict = verdict_config(data.experiment)
    rates = config.peer_rates or verdict.continuation_rates
    continuer = (OwnStepContinuation(model, guide, data.train, verdict, set_rate, tuple(rates))
                 if config.judge == "whole" and verdict.continuation_epochs > 0 else None)
    return run_judged(train_epoch, _judge_with(model, guide, data.train, verdict), config, start, continuer, anneal)


# ----------------------------------------------------------------------------- IVON


def ivon_optimizer(net: nn.Module, num_data: int, prior_std: float, init_std: float, settings: IVONSettings):
    """``ivon.IVON`` over ``net``'s parameters (the means ``m``) for the posterior under the prior
    ``N(0, prior_std^2)`` on ``num_data`` examples, every width starting at ``init_std``:
    ``ess = N``, ``weight_decay = 1 / (N prior_std^2)``, ``hess_init = 1 / (N init_std^2) -
    weight_decay``, so ``s = 1 / sqrt(ess (hess + weight_decay))`` is ``init_std`` at the start
    (module docstring). ``ValueError`` unless ``init_std < prior_std``."""
    import ivon

    if not 0 < init_std < prior_std:
        raise ValueError(f"IVON's starting width must lie in (0, prior std {prior_std}), got {init_std!r}")
    weight_decay = 1.0 / (num_data * prior_std**2)
    hess_init = 1.0 / (num_data * init_std**2) - weight_decay
    return ivon.IVON(net.parameters(), lr=settings.lr, ess=float(num_data), hess_init=hess_init, beta1=settings.beta1, beta2=settings.beta2,
                     weight_decay=weight_decay, mc_samples=settings.mc_samples)


@torch.no_grad()
def ivon_posterior(optimizer, net: nn.Module) -> Posterior:
    """IVON's Gaussian per parameter of ``net`` (named as the sites of
    :class:`~pyro_bbt.model.BayesianMLP`): ``(m, 1 / sqrt(ess (hess + weight_decay)))``, read
    between steps, when the parameters hold the means."""
    by_parameter: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}
    for group in optimizer.param_groups:  # IVON's buffers are flat, in the order of the group's parameters
        scale = (group["ess"] * (group["hess"] + group["weight_decay"])).rsqrt()
        offset = 0
        for parameter in group["params"]:
            size = parameter.numel()
            by_parameter[id(parameter)] = (parameter.detach().clone(), scale[offset:offset + size].view_as(parameter).clone())
            offset += size
    return {name: by_parameter[id(parameter)] for name, parameter in net.named_parameters()}


def ivon_epoch(net: nn.Module, optimizer, split: Split, settings: IVONSettings, order: torch.Generator) -> tuple[float, int]:
    """One pass of IVON over ``split`` (the package's loop: per step, ``mc_samples`` gradients of
    the mean cross-entropy at weights drawn by ``sampled_params(train=True)``, then ``step()``);
    the mean over the epoch's steps of the mean cross-entropy, and the number of steps."""
    losses = []
    for x, y in split.batches(settings.batch_size, shuffle=True, generator=order):
        loss = 0.0
        for _ in range(settings.mc_samples):
            with optimizer.sampled_params(train=True):
                optimizer.zero_grad(set_to_none=True)
                sample_loss = F.cross_entropy(net(x), y)
                sample_loss.backward()
            loss += sample_loss.item() / settings.mc_samples
        optimizer.step()
        if not math.isfinite(loss):
            raise FloatingPointError(f"ivon: loss is {loss}; try a lower --ivon-lr (now {settings.lr})")
        losses.append(loss)
    return sum(losses) / len(losses), len(losses)


def run_ivon(data: ProblemData, config: ConvergeConfig, seed: int) -> dict:
    """IVON on a deterministic MLP from the recipe's initial means, its posterior copied into the
    preset's ``meanfield`` guide and judged every ``judge_every`` epochs (module docstring)."""
    experiment = data.experiment
    start = time.perf_counter()
    model, guide = experiment.new_posterior(experiment.base_prior(), seed)
    net = MLP(experiment.sizes)
    start_means = posterior_loc_scale(guide, model)
    with torch.no_grad():
        for name, parameter in net.named_parameters():
            parameter.copy_(start_means[name][0])
    optimizer = ivon_optimizer(net, data.num_data, experiment.base_prior_std, experiment.init_scale, config.ivon)
    torch.manual_seed(seed)
    order = torch.Generator().manual_seed(seed)
    steps = 0

    set_rate = rate_setter(lambda: optimizer.param_groups, config.ivon.lr)
    epochs: list[dict] = []  # the annealer's record of the epochs outside continuations

    def train_epoch() -> tuple[float, int]:
        nonlocal steps
        mean_loss, epoch_steps = ivon_epoch(net, optimizer, data.train, config.ivon, order)
        steps += epoch_steps
        posterior = ivon_posterior(optimizer, net)
        start_from_posterior(guide, posterior)
        elbo = -data.num_data * mean_loss - float(closed_form_kl(model, posterior))
        if config.ivon.lr_drops:  # what the annealer's rule reads
            epochs.append({"elbo": elbo, "median_scale": {name: float(scale.median()) for name, (_, scale) in posterior.items() if name.endswith("weight")}})
        return elbo, steps

    anneal = ivon_annealer(experiment.stopping_rule, config.ivon, epochs, set_rate) if config.ivon.lr_drops else None
    finished = judge_row(train_epoch, model, guide, data, config, start, set_rate, anneal)
    record = bayesian_record(data, config, model, guide, finished, seed)
    if anneal is not None:
        record["lr_drops_after"] = [k + 1 for k, e in enumerate(epochs) if e.get("dropped")]  # the epochs after which the rate dropped
    return record


def ivon_annealer(rule: StoppingRule, settings: IVONSettings, epochs: list[dict], set_rate: Callable[[float], None]) -> Callable[[], None]:
    """``anneal()``, run after each epoch outside a continuation: IVON's rate is multiplied by
    ``settings.lr_factor`` where the recipe's stopping rule (``rule``: its window, ELBO test and
    width test; :meth:`~pyro_bbt.convergence.StoppingRule.decide`) would drop the recipe's rates,
    ``settings.lr_drops`` times at most; after that the rate stays and the verdict alone decides.
    ``epochs``: the records ``train_epoch`` appends (``elbo``, ``median_scale``); each gets the
    rate it ran at (``lr_scale``), so the rule judges the epochs since the last drop, and
    ``dropped: True`` where the rate dropped after it. The
    recipe anneals the same way; IVON's paper anneals over a fixed budget, which a fit to a
    verdict does not have."""
    rule = replace(rule, lr_drops=settings.lr_drops, lr_factor=settings.lr_factor)
    scale = 1.0

    def anneal() -> None:
        nonlocal scale
        epochs[-1]["lr_scale"] = scale
        if rule.decide(epochs) == "drop":
            scale *= settings.lr_factor
            set_rate(scale)
            epochs[-1]["dropped"] = True

    return anneal


# ------------------------------------------------------------------------- bayesian-torch


def bayes_torch_posterior(net: nn.Sequential, requires_grad: bool = False) -> Posterior:
    """``(mu, log(1 + exp(rho)))`` of every weight and bias of :func:`bayes_torch_net`'s layers,
    named as the sites of :class:`~pyro_bbt.model.BayesianMLP` (``layers.{i}.weight``,
    ``layers.{i}.bias``); detached copies unless ``requires_grad`` (then the KL's gradient flows to
    the layers' parameters)."""
    from bayesian_torch.layers import LinearReparameterization

    layers = [m for m in net if isinstance(m, LinearReparameterization)]
    posterior = {}
    for index, layer in enumerate(layers):
        for kind, mu, rho in (("weight", layer.mu_weight, layer.rho_weight), ("bias", layer.mu_bias, layer.rho_bias)):
            pair = (mu, F.softplus(rho))
            posterior[f"layers.{index}.{kind}"] = pair if requires_grad else tuple(t.detach().clone() for t in pair)
    return posterior


def run_bayes_torch(data: ProblemData, config: ConvergeConfig, seed: int) -> dict:
    """bayesian-torch's layers (:func:`bayes_torch_net`), Adam 1e-3 on every parameter, minibatches
    of 128, one weight draw per step, the loss per step ``mean CE + KL / N`` (the full-data
    negative ELBO over ``N``, the KL in closed form: the library's ``kl_div`` per weight; its MNIST
    example divides the KL by the batch size instead, another objective, which no verdict on this
    ELBO would pass); its posterior copied into the preset's ``meanfield`` guide and judged every
    ``judge_every`` epochs, as IVON's."""
    experiment = data.experiment
    start = time.perf_counter()
    model, guide = experiment.new_posterior(experiment.base_prior(), seed)
    torch.manual_seed(seed)
    net = bayes_torch_net(experiment.sizes, experiment.base_prior_std, experiment.init_scale)
    optimizer = torch.optim.Adam(net.parameters(), lr=LR)
    order = torch.Generator().manual_seed(seed)
    steps = 0

    def train_epoch() -> tuple[float, int]:
        nonlocal steps
        elbos = []
        for x, y in data.train.batches(BATCH_SIZE, shuffle=True, generator=order):
            optimizer.zero_grad(set_to_none=True)
            nll = F.cross_entropy(net(x), y)
            kl = closed_form_kl(model, bayes_torch_posterior(net, requires_grad=True))
            loss = nll + kl / data.num_data
            value = float(loss.detach())
            if not math.isfinite(value):
                raise FloatingPointError(f"bayes-torch: loss is {value}")
            loss.backward()
            optimizer.step()
            elbos.append(-data.num_data * value)
        steps += len(elbos)
        start_from_posterior(guide, bayes_torch_posterior(net))
        return sum(elbos) / len(elbos), steps

    finished = judge_row(train_epoch, model, guide, data, config, start, rate_setter(lambda: optimizer.param_groups, LR))
    return bayesian_record(data, config, model, guide, finished, seed)


# ------------------------------------------------------------------------- plain Pyro SVI


def run_pyro_svi(data: ProblemData, config: ConvergeConfig, seed: int) -> dict:
    """Plain Pyro: ``BayesianMLP`` + ``AutoNormal(init_scale)`` + ``SVI(Trace_ELBO)`` with Adam
    1e-3 in minibatches of 128, judged every ``judge_every`` epochs (``AutoNormal`` is the
    ``normal`` guide the verdict judges)."""
    experiment = data.experiment
    start = time.perf_counter()
    pyro.clear_param_store()
    pyro.set_rng_seed(seed)
    model = BayesianMLP(experiment.sizes, experiment.base_prior())
    guide = AutoNormal(model, init_scale=experiment.init_scale)
    optim = pyro.optim.Adam({"lr": LR})
    svi = SVI(model, guide, optim, Trace_ELBO())
    order = torch.Generator().manual_seed(seed)
    steps = 0

    def train_epoch() -> tuple[float, int]:
        nonlocal steps
        losses = [svi.step(x, y, data.num_data) for x, y in data.train.batches(BATCH_SIZE, shuffle=True, generator=order)]
        steps += len(losses)
        return -sum(losses) / len(losses), steps

    finished = judge_row(train_epoch, model, guide, data, config, start,
                         rate_setter(lambda: (g for opt in optim.optim_objs.values() for g in opt.param_groups), LR))
    meanfield_model, meanfield = experiment.new_posterior(experiment.base_prior(), seed)  # the same posterior, in the guide --continue fits on
    start_from_posterior(meanfield, posterior_loc_scale(guide, model))
    return bayesian_record(data, config, meanfield_model, meanfield, finished, seed)


# ------------------------------------------------------------------------ the MLP floor


@dataclass
class MLPFit:
    """The deterministic MLP after early stopping (the best epoch's weights loaded)."""

    net: nn.Module
    trace: list[TracePoint]
    best_epoch: int
    val_accuracy: float
    steps: int
    stopped_by: str


def fit_mlp(data: ProblemData, config: ConvergeConfig, seed: int, start: float) -> MLPFit:
    """The deterministic MLP, Adam 1e-3, minibatches of 128, early stopping on A's validation
    accuracy (patience 3; the best epoch's weights kept), at most the caps; the trace's seconds
    count from the clock's ``start``."""
    torch.manual_seed(seed)
    net = MLP(data.experiment.sizes)
    optimizer = torch.optim.Adam(net.parameters(), lr=LR)
    order = torch.Generator().manual_seed(seed)
    trace: list[TracePoint] = []
    best_accuracy, best_state, best_epoch, steps, stopped_by = -1.0, None, 0, 0, "early stopping"
    while True:
        epoch = len(trace) + 1
        for x, y in data.train.batches(BATCH_SIZE, shuffle=True, generator=order):
            optimizer.zero_grad(set_to_none=True)
            F.cross_entropy(net(x), y).backward()
            optimizer.step()
            steps += 1
        val_accuracy = accuracy(net, data.val.x, data.val.y)
        trace.append(TracePoint(epoch, steps, time.perf_counter() - start, val_accuracy=val_accuracy))
        if val_accuracy > best_accuracy:
            best_accuracy, best_epoch = val_accuracy, epoch
            best_state = {k: v.detach().clone() for k, v in net.state_dict().items()}
        if epoch - best_epoch >= PATIENCE:
            break
        if trace[-1].seconds >= config.time_cap:
            stopped_by = "time cap"
            break
        if config.max_epochs is not None and epoch >= config.max_epochs:
            stopped_by = "epoch cap"
            break
    net.load_state_dict(best_state)
    return MLPFit(net, trace, best_epoch, best_accuracy, steps, stopped_by)


def run_mlp(data: ProblemData, config: ConvergeConfig, seed: int) -> dict:
    """The floor: :func:`fit_mlp`, timed."""
    start = time.perf_counter()
    fit = fit_mlp(data, config, seed, start)
    seconds = time.perf_counter() - start
    return {
        "seconds": seconds,
        "converged": None,
        "stopped_by": fit.stopped_by,
        "epochs": len(fit.trace),
        "best_epoch": fit.best_epoch,
        "steps": fit.steps,
        "val_accuracy": fit.val_accuracy,
        "test_accuracy": accuracy(fit.net, data.test.x, data.test.y),
        "trace": [asdict(point) for point in fit.trace],
    }


# --------------------------------------------------------------------------------- rows


@dataclass(frozen=True)
class Row:
    """One way to fit: its ``run(data, config, seed)``, whether it is Bayesian (judged by the
    verdict, scored by the evaluator), and the module and pip package it needs beyond pyro_bbt's
    own dependencies (``None``: none)."""

    name: str
    description: str
    run: Callable[[ProblemData, ConvergeConfig, int], dict]
    bayesian: bool = True
    module: str | None = None
    package: str | None = None


ROWS: dict[str, Row] = {
    r.name: r
    for r in (
        Row(RECIPE, "today's q_A recipe: the paper preset's recipe_a through fit_posterior (rule, verdict and its continuation)", run_recipe),
        Row("recipe-mle", "the recipe from the deterministic MLP's weights as means (VCL's start), the MLP's time counted", run_recipe_mle),
        Row("recipe-avg", "the recipe with each continuation's end the average of its epochs at the last rate (continuation_average)",
            run_recipe_averaged),
        Row("ivon", "IVON (Shen et al. 2024) on a deterministic MLP, its posterior judged every k epochs", run_ivon, module="ivon",
            package="ivon-opt"),
        Row("pyro-svi", "plain Pyro: AutoNormal + SVI(Trace_ELBO) + Adam 1e-3, batch 128, judged every k epochs", run_pyro_svi),
        Row("bayes-torch", "bayesian-torch's LinearReparameterization layers, Adam 1e-3, batch 128, the ELBO's KL weight, judged every k epochs",
            run_bayes_torch, module="bayesian_torch", package="bayesian-torch"),
        Row(MLP_ROW, "deterministic MLP, Adam 1e-3, batch 128, early stopping on validation accuracy (patience 3): the floor", run_mlp,
            bayesian=False),
    )
}


def select_rows(names: Sequence[str] | None, rows: Mapping[str, Row] = ROWS) -> tuple[list[str], list[str]]:
    """The rows to run and one line per row skipped (:func:`bench_common.select_available`):
    ``names=None`` selects every row, skipping those whose package is missing; naming such a row
    raises ``ValueError`` naming its package."""
    return select_available(names, rows)


def run_row(name: str, data: ProblemData, config: ConvergeConfig, seed: int) -> dict:
    """Row ``name``'s raw record for ``seed``, with its name, seed and load averages."""
    load_before = load_average()
    record = ROWS[name].run(data, config, seed)
    return {"name": name, "seed": seed, **record, "load_average": [load_before, load_average()]}


# ------------------------------------------------------------------------------ summary


def _median(values: Sequence[float | None]) -> float | None:
    present = [v for v in values if v is not None]
    return statistics.median(present) if present else None


def _ratio(value: float | None, reference: float | None) -> float | None:
    return None if value is None or not reference else value / reference


def summarize(raw: Sequence[dict], num_data: int, tol_per_datum: float) -> list[dict]:
    """Per row (in order of first appearance): medians over its rounds, the ratios of its median
    time to ``recipe``'s and to ``mlp``'s, its ELBO gap per datum to the best row's median ELBO,
    and whether it meets the target (Bayesian rows but the recipe: passing in every round, the gap
    and, where ``--continue`` measured it, the median gain still left both within
    ``tol_per_datum``, at most ``1 / TARGET_SPEEDUP`` of the recipe's time)."""
    by_row: dict[str, list[dict]] = {}
    for record in raw:
        by_row.setdefault(record["name"], []).append(record)
    medians = {name: _median([r["seconds"] for r in records]) for name, records in by_row.items()}
    elbos = {name: _median([r.get("elbo") for r in records]) for name, records in by_row.items()}
    best_elbo = max((e for e in elbos.values() if e is not None), default=None)
    summary = []
    for name, records in by_row.items():
        bayesian = ROWS[name].bayesian
        gap = None if elbos[name] is None or best_elbo is None else (best_elbo - elbos[name]) / num_data
        converged = sum(bool(r["converged"]) for r in records) if bayesian else None
        ratio_to_recipe = _ratio(medians[name], medians.get(RECIPE))
        remaining = [r.get("remaining_gain_per_datum") for r in records]
        still = _median(remaining)
        target = None
        if bayesian and name != RECIPE and ratio_to_recipe is not None:
            target = (converged == len(records) and gap is not None and gap <= tol_per_datum and ratio_to_recipe <= 1 / TARGET_SPEEDUP
                      and (still is None or still <= tol_per_datum))
        summary.append({
            "name": name,
            "description": ROWS[name].description,
            "rounds": len(records),
            "seconds": [r["seconds"] for r in records],
            "median_seconds": medians[name],
            "converged_rounds": converged,
            "stopped_by": [r["stopped_by"] for r in records],
            "median_epochs": _median([r["epochs"] for r in records]),
            "median_steps": _median([r["steps"] for r in records]),
            "median_elbo": elbos[name],
            "median_elbo_per_datum": _median([r.get("elbo_per_datum") for r in records]),
            "elbo_gap_per_datum_to_best": gap,
            "median_train_nll_per_datum": _median([r.get("train_nll_per_datum") for r in records]),
            "median_gain_upper_per_datum": _median([r.get("gain_upper_per_datum") for r in records]),
            "remaining_gain_per_datum": remaining,
            "median_remaining_gain_per_datum": still,
            "median_test_accuracy": _median([r["test_accuracy"] for r in records]),
            "ratio_to_recipe": ratio_to_recipe,
            "ratio_to_mlp": _ratio(medians[name], medians.get(MLP_ROW)),
            "target_met": target,
        })
    return summary


def _fmt(value: float | None, spec: str, suffix: str = "") -> str:
    return "n/a" if value is None else f"{value:{spec}}{suffix}"


def _stopped_by_text(summary: dict) -> str:
    reasons = list(dict.fromkeys(summary["stopped_by"]))
    if summary["converged_rounds"] == 0:
        return ("not converged by cap: " if all(r in CAP_REASONS for r in reasons) else "not converged: ") + ", ".join(reasons)
    return ", ".join(reasons)


def markdown_table(summary: Sequence[dict]) -> str:
    lines = [
        "| row | converged | median s | x recipe | x mlp | epochs | steps | ELBO | ELBO gap /datum | train NLL /datum | upper /datum "
        "| still gains /datum | test accuracy | stopped by | target met |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---|---|",
    ]
    for s in summary:
        converged = "n/a" if s["converged_rounds"] is None else f"{s['converged_rounds']}/{s['rounds']}"
        target = "n/a" if s["target_met"] is None else ("yes" if s["target_met"] else "no")
        lines.append(
            f"| {s['name']} | {converged} | {s['median_seconds']:.2f} | {_fmt(s['ratio_to_recipe'], '.2f', 'x')} "
            f"| {_fmt(s['ratio_to_mlp'], '.2f', 'x')} | {_fmt(s['median_epochs'], '.0f')} | {_fmt(s['median_steps'], '.0f')} "
            f"| {_fmt(s['median_elbo'], ',.1f')} | {_fmt(s['elbo_gap_per_datum_to_best'], '.4f')} | {_fmt(s['median_train_nll_per_datum'], '.4f')} "
            f"| {_fmt(s['median_gain_upper_per_datum'], '.4f')} | {_fmt(s['median_remaining_gain_per_datum'], '.4f')} "
            f"| {_fmt(s['median_test_accuracy'], '.4f')} | {_stopped_by_text(s)} | {target} |"
        )
    return "\n".join(lines)


# ------------------------------------------------------------------------------- figure


def plot_elbo_against_time(raw: Sequence[dict], summary: Sequence[dict], path: Path) -> None:
    """``-ELBO`` (training estimate, log scale) against wall seconds, one line per Bayesian row and
    round (a filled circle where the verdict passed, a cross where the row stopped without), and
    the MLP's median time to early stopping as a vertical line."""
    import matplotlib.pyplot as plt

    from pyro_bbt.plots import save_figure

    fig, ax = plt.subplots(figsize=(7, 4.2))
    colors: dict[str, str] = {}
    for record in raw:
        if not ROWS[record["name"]].bayesian or not record["trace"]:
            continue
        first = record["name"] not in colors  # one legend entry per row, whatever its rounds
        color = colors.setdefault(record["name"], f"C{len(colors)}")
        seconds = [p["seconds"] for p in record["trace"]]
        loss = [-p["elbo"] for p in record["trace"]]
        ax.plot(seconds, loss, color=color, alpha=0.8, label=record["name"] if first else None)
        ax.plot([record["seconds"]], [loss[-1]], "o" if record["converged"] else "x", color=color, ms=6)
    mlp = next((s for s in summary if s["name"] == MLP_ROW), None)
    if mlp is not None:
        ax.axvline(mlp["median_seconds"], color="black", ls="--", lw=1, label="mlp: early stopping (median)")
    ax.set_yscale("log")
    ax.set_xlabel("wall seconds (one thread; verdict's judgements included)")
    ax.set_ylabel("-ELBO, training estimate (nats)")
    ax.set_title("Time to a converged posterior (o: verdict passed, x: stopped without)", fontsize=9)
    ax.grid(alpha=0.3, which="both")
    ax.legend(fontsize=8)
    save_figure(fig, path)


# ---------------------------------------------------------------------------------- CLI


def _positive_float(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a positive number, got {text!r}") from None
    if not (math.isfinite(value) and value > 0):
        raise argparse.ArgumentTypeError(f"expected a positive number, got {text!r}")
    return value


def _factors(text: str) -> tuple[float, ...]:
    """``--peer-rates``: comma-separated factors > 0."""
    try:
        factors = tuple(float(part) for part in text.split(","))
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated factors > 0, e.g. 0.3,0.1, got {text!r}") from None
    if not all(math.isfinite(f) and f > 0 for f in factors):
        raise argparse.ArgumentTypeError(f"expected comma-separated factors > 0, e.g. 0.3,0.1, got {text!r}")
    return factors


def _row_list(text: str) -> list[str]:
    return name_list(text, list(ROWS), "rows")


def _continuation(text: str) -> tuple[tuple[int, float], ...]:
    stages = []
    for item in text.split(","):
        epochs, _, lr = item.strip().partition("@")
        try:
            stage = (int(epochs), float(lr))
        except ValueError:
            raise argparse.ArgumentTypeError(f"continuation stage {item!r} is not EPOCHS@LR (e.g. 300@3e-3)") from None
        if stage[0] < 1 or not (math.isfinite(stage[1]) and stage[1] > 0):
            raise argparse.ArgumentTypeError(f"continuation stage {item!r} needs EPOCHS >= 1 and LR > 0")
        stages.append(stage)
    return tuple(stages)


def experiment_overrides(text: str) -> tuple[tuple[str, object], ...]:
    """``KEY=VALUE,...`` over :class:`~pyro_bbt.experiment.ExperimentConfig`'s fields (values as
    Python literals, ``none`` for ``None``, else strings; a tuple in parentheses, e.g.
    ``continuation_rates=(0.1,0.03)``); checked by building the configuration."""
    names = {f.name for f in fields(ExperimentConfig)}
    overrides = []
    for item in re.split(r",(?![^()]*\))", text):  # commas outside parentheses
        key, sep, raw = item.strip().partition("=")
        if not sep or key not in names:
            raise argparse.ArgumentTypeError(f"--experiment item {item!r} is not KEY=VALUE with KEY a field of ExperimentConfig (e.g. window=10)")
        try:
            value = None if raw.lower() == "none" else ast.literal_eval(raw)
        except (ValueError, SyntaxError):
            value = raw
        overrides.append((key, value))
    try:
        ExperimentConfig(**PRESETS["paper-v5"] | dict(overrides))
    except (TypeError, ValueError) as error:
        raise argparse.ArgumentTypeError(f"--experiment {text!r}: {error}") from None
    return tuple(overrides)


def _hidden(text: str) -> tuple[int, ...]:
    try:
        widths = tuple(int(w) for w in text.split(","))
    except ValueError:
        widths = ()
    if not widths or any(w < 1 for w in widths):
        raise argparse.ArgumentTypeError(f"expected comma-separated positive widths such as 400,400, got {text!r}")
    return widths


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python benchmarks/converge.py",
        description="Time each way of fitting task A's mean-field posterior until the library's verdict passes: today's recipe, "
                    "the recipe from the MLP's weights, IVON, plain Pyro SVI, and the deterministic MLP's early stopping as the floor; "
                    "--continue measures what each posterior still gains after it.",
    )
    parser.add_argument("--problem", choices=list(PROBLEMS), default="task-a",
                        help="; ".join(f"{p.name}: {p.description}" for p in PROBLEMS.values()) + " (default task-a)")
    parser.add_argument("--limit-train", type=positive_int, default=None, help="use only the first N training images (overrides the problem's)")
    parser.add_argument("--hidden", type=_hidden, default=None, help="hidden widths, e.g. 400,400 (overrides the problem's)")
    parser.add_argument("--rows", type=_row_list, default=None,
                        help=f"comma-separated subset of: {', '.join(ROWS)} (default: all, skipping a row whose package is not installed: "
                             f"{INSTALL_HINT})")
    parser.add_argument("--rounds", type=positive_int, default=DEFAULT_ROUNDS,
                        help=f"interleaved rounds: every row once per round, in turn, round r seeded --seed + r - 1; medians over rounds "
                             f"(default {DEFAULT_ROUNDS})")
    parser.add_argument("--time-cap", type=_positive_float, default=DEFAULT_TIME_CAP,
                        help=f"seconds after which ivon, pyro-svi and mlp stop (judged once more) (default {DEFAULT_TIME_CAP:g})")
    parser.add_argument("--max-epochs", type=positive_int, default=None,
                        help="at most this many epochs for every row, the recipe's rule included (default: the rows' own caps)")
    parser.add_argument("--judge-every", type=positive_int, default=DEFAULT_JUDGE_EVERY,
                        help=f"ivon and pyro-svi are judged by the verdict every K epochs (default {DEFAULT_JUDGE_EVERY})")
    parser.add_argument("--judge", choices=JUDGE_MODES, default="whole",
                        help="how ivon, pyro-svi and bayes-torch are judged: whole, the line search's pass confirmed by continuations of the "
                             "row's own step as long as the fit so far, as train() confirms the recipe's (a preset whose verdict continues); "
                             "line-search, the line search alone (the measurements before 2026-12-07's eleventh session) (default whole)")
    parser.add_argument("--peer-rates", type=_factors, default=None,
                        help="with --judge whole: the factors on ivon's, pyro-svi's and bayes-torch's own rate in their continuations' "
                             "equal parts, e.g. 1 (the row's own step throughout) (default: the preset's continuation_rates, as the "
                             "recipe's continuations take them on its first rates)")
    parser.add_argument("--eval-draws", type=positive_int, default=Evaluator.num_draws,
                        help=f"antithetic draws of the common fixed-noise ELBO (default {Evaluator.num_draws})")
    parser.add_argument("--eval-seed", type=int, default=Evaluator.seed, help="seed of the common evaluator's draws and of the test accuracy's")
    defaults = IVONSettings()
    parser.add_argument("--ivon-lr", type=_positive_float, default=defaults.lr, help=f"IVON's learning rate (default {defaults.lr:g})")
    parser.add_argument("--ivon-beta1", type=float, default=defaults.beta1, help=f"IVON's gradient momentum (default {defaults.beta1:g})")
    parser.add_argument("--ivon-beta2", type=float, default=defaults.beta2, help=f"IVON's Hessian momentum (default {defaults.beta2:g})")
    parser.add_argument("--ivon-mc-samples", type=positive_int, default=defaults.mc_samples,
                        help=f"IVON's weight samples per step (default {defaults.mc_samples})")
    parser.add_argument("--ivon-lr-drops", type=int, default=defaults.lr_drops,
                        help="times IVON's rate drops by --ivon-lr-factor where the recipe's stopping rule would drop the recipe's "
                             f"(default {defaults.lr_drops}: a constant rate)")
    parser.add_argument("--ivon-lr-factor", type=float, default=defaults.lr_factor, help=f"IVON's rate drop (default {defaults.lr_factor:g})")
    parser.add_argument("--ivon-batch-size", type=positive_int, default=defaults.batch_size,
                        help=f"IVON's minibatch size (default {defaults.batch_size})")
    parser.add_argument("--continue", dest="continuation", type=_continuation, default=(),
                        help="after each Bayesian row (off the clock), fit its posterior further in stages EPOCHS@LR, e.g. 300@3e-3,300@1e-3, "
                             "and report the ELBO it still gained per datum (what the verdict's one step does not see); default: none")
    parser.add_argument("--experiment", type=experiment_overrides, default=(),
                        help="change the paper preset's configuration that the recipe rows fit by, KEY=VALUE,... over ExperimentConfig's fields, "
                             "e.g. window=10 or verdict_tol=0.003 (default: the preset as it is)")
    parser.add_argument("--preset", choices=[name for name in PRESETS if name.startswith("paper")], default="paper-v5",
                        help="the A -> B preset whose q_A recipe the recipe rows fit by (default paper-v5, N(0, 1): the paper preset until 2026-12-07, "
                             "which every measurement of this bench used; paper: the README's, N(0, 0.3^2); paper-v2: the recipe before the continuation, "
                             "whose passes the measurements of 2026-12-04 continued)")
    parser.add_argument("--threads", type=positive_int, default=1, help="torch.set_num_threads (default 1)")
    parser.add_argument("--seed", type=int, default=0, help="seed of round 1 (round r: seed + r - 1)")
    parser.add_argument("--out", type=Path, default=None, help="JSON report (default figs/converge-PROBLEM.json)")
    parser.add_argument("--figure", type=Path, default=None, help="ELBO against wall time (default: --out with .png)")
    return parser


def config_from_args(args: argparse.Namespace) -> ConvergeConfig:
    base = PROBLEMS[args.problem]
    problem = replace(base, limit_train=args.limit_train or base.limit_train, hidden=args.hidden or base.hidden)
    ivon_settings = IVONSettings(args.ivon_lr, args.ivon_beta1, args.ivon_beta2, args.ivon_mc_samples, args.ivon_batch_size, args.ivon_lr_drops,
                                 args.ivon_lr_factor)
    return ConvergeConfig(problem, args.max_epochs, args.time_cap, args.judge_every, args.eval_draws, args.eval_seed, ivon_settings, args.continuation,
                          args.experiment, args.preset, args.judge, args.peer_rates)


def _package_version(package: str) -> str | None:
    try:
        return version(package)
    except PackageNotFoundError:
        return None


def _meta(config: ConvergeConfig, data: ProblemData, args: argparse.Namespace, raw: Sequence[dict]) -> dict:
    recipe = recipe_for(data.experiment, data.num_data, config.max_epochs)
    return {
        "problem": asdict(config.problem),
        "sizes": list(data.experiment.sizes),
        "train_size": data.num_data,
        "val_size": len(data.val),
        "test_size": len(data.test),
        "prior_std": data.experiment.base_prior_std,
        "init_scale": data.experiment.init_scale,
        "guide": data.experiment.guide,
        "recipe": asdict(recipe),
        "verdict": asdict(verdict_config(data.experiment)),
        "evaluator": asdict(Evaluator(config.eval_draws, config.eval_seed)),
        "test_samples": EVAL_SAMPLES,
        "config": asdict(config),
        "rows": list(args.rows),
        "rounds": args.rounds,
        "seed": args.seed,
        "skipped": list(args.skipped),
        "num_threads": torch.get_num_threads(),
        "cpu_count": os.cpu_count(),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "pyro": pyro.__version__,
        "ivon_opt": _package_version("ivon-opt"),
        "platform": platform.platform(),
        "complete": len(raw) == len(args.rows) * args.rounds,
        "timestamp": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
    }


def build_report(config: ConvergeConfig, data: ProblemData, args: argparse.Namespace, raw: Sequence[dict]) -> dict:
    """The JSON report: ``meta``, per-row ``summary`` and every round's ``raw`` record."""
    summary = summarize(raw, data.num_data, verdict_config(data.experiment).tol_per_datum)
    return {"meta": _meta(config, data, args, raw), "summary": summary, "raw": list(raw)}


def _run_all(config: ConvergeConfig, data: ProblemData, args: argparse.Namespace) -> Iterator[dict]:
    for line in args.skipped:
        print(f"[converge] {line}", file=sys.stderr, flush=True)
    for round_index in range(args.rounds):
        seed = args.seed + round_index
        for name in args.rows:
            print(f"[converge] round {round_index + 1}/{args.rounds}: {name} (seed {seed}) ...", file=sys.stderr, flush=True)
            record = run_row(name, data, config, seed) | {"round": round_index + 1}
            verdict = "" if record["converged"] is None else (", verdict passed" if record["converged"] else ", not converged")
            print(f"[converge] {name}: {record['seconds']:.2f} s, {record['epochs']} epochs, stopped by {record['stopped_by']}{verdict}, "
                  f"test accuracy {record['test_accuracy']:.4f}", file=sys.stderr, flush=True)
            yield record


def print_report(report: dict) -> None:
    meta = report["meta"]
    sizes = "-".join(str(s) for s in meta["sizes"])
    print(f"\nProblem {meta['problem']['name']}: task A, {meta['train_size']} training images, {sizes}, prior N(0, {meta['prior_std']:g}^2), "
          f"{meta['guide']} guide from sigma {meta['init_scale']:g}; verdict tol {meta['verdict']['tol_per_datum']:g} nats/datum; "
          f"{meta['rounds']} interleaved round(s), medians; {meta['num_threads']} torch thread(s); ELBO from {meta['evaluator']['num_draws']} "
          f"fixed draws (seed {meta['evaluator']['seed']}); test accuracy on {meta['test_size']} test images.\n")
    print(markdown_table(report["summary"]))
    if meta["skipped"]:
        print("\nSkipped:\n\n" + "\n".join(f"- {line}" for line in meta["skipped"]))
    met = [s["name"] for s in report["summary"] if s["target_met"]]
    print(f"\nTarget (passes the verdict, ELBO and what --continue still gains within tol, <= 1/{TARGET_SPEEDUP:g} of recipe's time): "
          f"{', '.join(met) if met else 'no row meets it'}")


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        args.rows, args.skipped = select_rows(args.rows)
        if not args.rows:
            raise ValueError("no row left to run: " + "; ".join(args.skipped))
        config = config_from_args(args)
    except ValueError as error:
        parser.error(str(error))
    out = args.out or Path(f"figs/converge-{config.problem.name}.json")
    figure = args.figure or out.with_suffix(".png")  # beside --out: a run never overwrites another's figure
    threads = torch.get_num_threads()
    torch.set_num_threads(args.threads)
    try:
        data = load_problem(config.problem, dict(config.experiment), config.preset)
        raw: list[dict] = []
        for record in _run_all(config, data, args):
            raw.append(record)
            report = build_report(config, data, args, raw)
            atomic_write_json(out, report)  # after every row, so a killed run keeps what it measured
    finally:
        torch.set_num_threads(threads)
    plot_elbo_against_time(raw, report["summary"], figure)
    print_report(report)
    print(f"\nwrote {out} and {figure}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
