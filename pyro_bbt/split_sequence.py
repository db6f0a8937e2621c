"""Split MNIST as a 5-task continual-learning sequence, in the three scenarios.

The tasks are the digit pairs ``T_t = (2t, 2t + 1)``, ``t = 0..4``, learnt in order. A digit
``d = 2t + k`` (``k`` in {0, 1}, its position in the pair, ``k = d mod 2``) is labelled and
read out according to the scenario (van de Ven & Tolias 2019; Hsu et al. 2018):

=========  ========================  =========  ==========================================
scenario   output layer              label      at test time
=========  ========================  =========  ==========================================
``task``   five 2-way heads          ``k``      task ``t`` is read through head ``t`` (the
           (rows ``[2t, 2t + 2)``)              task id is given): incremental task
``domain`` one shared 2-way head     ``k``      the shared head: incremental domain
``class``  one shared 10-way head    ``d``      the outputs of the classes seen so far
                                                compete: incremental class
=========  ========================  =========  ==========================================

In the class scenario only the *active outputs* enter the softmax: while task ``t`` is trained,
and when the network is tested after it, the logits are those of the digits ``0..2t+1`` seen so
far (``BayesianMLP.active_outputs``; the deterministic nets likewise), as in Hsu et al. 2018's
code (``valid_out_dim``) and van de Ven & Tolias 2019 ("active classes"). After the last task
all ten compete, so the final average accuracy is the one over the full 10-way head. The rows of
digits not yet seen get no likelihood gradient.

Methods, for every seed, task after task (each writes row ``t`` of the accuracy matrix
``R[t][j]``, the test accuracy on task ``j`` after training task ``t``):

* ``transfer`` -- variational continual learning without coreset (Nguyen et al. 2018): the prior
  of task ``t`` is the previous posterior, ``p_t = q_{t-1}`` (scales x ``tau``,
  :func:`~pyro_bbt.guides.posterior_as_prior`), and ``q_t`` starts at ``q_{t-1}``;
* ``finetune`` -- ``q_t`` starts at ``q_{t-1}``, the prior stays the base prior;
* ``ewc`` -- a deterministic MLP of the same size trained on task ``t`` with the penalties of
  every earlier task, ``CE_t(theta) + sum_{s<t} (lambda/2) sum_k F_{s,k} (theta_k - theta*_{s,k})^2``
  (Kirkpatrick et al. 2017; ``F_s`` the diagonal Fisher at ``theta*_s``, the weights after task
  ``s``, from task ``s``'s inputs with sampled labels: :mod:`pyro_bbt.ewc`);
* ``joint`` -- offline, the upper bound: at every step ``t`` a fresh posterior under the base
  prior on the training data of tasks ``0..t`` together, so ``R[t]`` is the joint model of the
  first ``t + 1`` tasks (``SplitConfig.joint == "last"``: the last step alone, the offline model
  of all five tasks; its ACC is reported, the other rows stay NaN). In the task scenario the joint
  fit has one softmax over all heads' outputs (label ``2s + k``, as the A -> B experiment's joint)
  and is read through each task's head.

In the task and class scenarios an output row that has seen no data is not carried over: when
task ``t`` starts from ``q_{t-1}``, the rows ``[2t, 10)`` (the heads of tasks ``t..4``, or the
outputs of the digits ``2t..9``) keep the fresh guide's initialisation and (under ``transfer``)
their prior is the base prior's ``N(0, sigma^2)``, as VCL initialises a new head. Without this
the rows of unseen digits would arrive at task ``t`` as ``q_{t-1}`` left them: at the prior
(their only gradient having been the KL's), with widths near the prior's, whose noise swamps the
new digits' logits.
The first task's fit is the same computation for ``transfer`` and ``finetune`` (base prior,
fresh guide): it is made once per seed and shared (``reused: true`` on the second).

How each posterior is fitted (:attr:`SplitConfig.fit`):

* ``rule`` -- as q_A is (:meth:`~pyro_bbt.experiment.ExperimentConfig.recipe_a`): by the stopping rule
  (``config.stopping_rule``: at least ``epochs_a``, at most ``max_epochs_a`` epochs, learning
  rates dropped ``lr_drops`` times), in minibatches of ``config.a_batch_size``, starting at
  ``lr_a`` for the means and ``scale_lr`` for the widths; with ``max_epochs_a=None`` exactly
  ``epochs_a`` epochs. The rule, its cap and the settings are the same for every task and method.
* ``fixed`` -- every task for B's fixed budget, ``steps_for(N_t, epochs, batch_size, min_steps)``
  steps at ``lr``/``scale_lr`` (``N_t`` task ``t``'s training images); joint's fit on tasks
  ``0..t`` gets the sum of their budgets, as the A -> B joint gets ``steps_A + steps_B``.

Either way the stopping rule's verdict on every Bayesian fit is recorded (under ``fixed`` it
judges without stopping, as for q_B). EWC's deterministic nets have no posterior to converge:
they train for the fixed budget at ``ewc_lr`` in both modes, or with ``ewc_patience`` by early
stopping on each task's validation split (at most ``max_epochs_a`` epochs).

After every Bayesian fit the active hidden units are counted (:mod:`pyro_bbt.pruning`: a unit is
active when its incoming weights' mean KL to the base prior exceeds ``kappa``, the blank pixels of
all images seen so far left out, and ``kappa`` is the largest for which removing every other unit
changes the log-likelihood on the tasks seen so far by less than 0.01 nats per example);
``results.json`` keeps the count, the units' indices (so the units each task recruits can be read
off), ``kappa`` and the ablation change per fit, and ``active_units_mean`` per method.

The protocol's settings beyond the fit (:class:`SplitConfig`: the means' initialisation, pixel
scaling, validation split, and where a chained ``q_t`` starts) are what Nguyen et al.'s and
Swaroop et al.'s published runs fix; the presets ``vcl`` and ``vcl-swaroop`` hold them.

Forward transfer is measured against each method's randomly initialised model (GEM);
:func:`~pyro_bbt.continual.summarize` gives ACC, BWT, FWT and forgetting per seed.
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import numpy as np
import torch

from .config import CONVERGED_FITS, ExperimentConfig
from .continual import summarize
from .coresets import CORESETS, select_coreset
from .data import INPUT_DIM, SCALINGS, Split, Task, load_task
from .evaluation import evaluate_accuracy, predictive_accuracy
from .ewc import MLP, DeterministicTrainConfig, EarlyStopping, EWCPenalty, EWCPenaltySum, fisher_diagonal, train_deterministic
from .checkpoint import prior_from_state, prior_state
from .engine import Unit, UnitCheckpoints, UnitOutcome, run_units
from .executors import Executor
from .fitting import Fit, fit_posterior, guide_state, load_rows, new_posterior, prior_from_posterior, normal_means, set_means, start_from_state
from .guides import GUIDES
from .inference import NonFiniteLossError
from .model import BayesianMLP
from .stats import mean_std, sample_std
from .priors import Prior
from .pruning import census_after
from .runstore import RunStore
from .units import HeadView, check_finite_training, ewc_train_config, steps_for, use_head


__all__ = [
    "SCENARIOS", "SPLIT_METHODS", "FITS", "JOINTS", "SPLIT_PAIRS", "SPLIT_PRESETS", "SplitConfig", "SplitPreset", "SplitTask",
    "MEAN_INITS", "STARTS", "CORESETS", "split_tasks", "load_split_task", "load_split_val", "check_split_methods", "check_split_protocol", "check_split_ewc", "max_likelihood_means", "method_summary", "accuracy_row", "run_split_sequence", "new_split_posterior", "next_prior", "plan_split", "fit_capped_at",
]

SCENARIOS = ("task", "domain", "class")
SPLIT_METHODS = ("transfer", "finetune", "ewc", "joint")
FITS = ("rule", "fixed")
JOINTS = ("every", "last")
MEAN_INITS = ("fan-in", "truncnorm", "normal", "mle")
STARTS = ("previous", "fresh")
SPLIT_PAIRS: tuple[tuple[int, int], ...] = ((0, 1), (2, 3), (4, 5), (6, 7), (8, 9))


def _choice(name: str, value: str, allowed: tuple[str, ...]) -> str:
    if value not in allowed:
        raise ValueError(f"unknown {name} {value!r}; allowed: {', '.join(allowed)}")
    return value


@dataclass(frozen=True)
class SplitConfig:
    """What a split-MNIST sequence adds to an :class:`~pyro_bbt.experiment.ExperimentConfig`:
    the ``scenario`` (one of :data:`SCENARIOS`), how each posterior is ``fit`` (one of
    :data:`FITS`; see the module docstring) and when ``joint`` is fitted (one of :data:`JOINTS`):
    after ``every`` task (row ``t`` of its matrix: the joint model of tasks ``0..t``) or after the
    ``last`` only (the offline model of all five tasks, the upper bound the published tables
    give; its other rows stay NaN and only its ACC is reported).

    The protocol's remaining settings (VCL's and Swaroop et al.'s differ in each):

    * ``mean_init`` (one of :data:`MEAN_INITS`): where the means of a posterior started fresh
      begin (task 0's, joint's, and every task's under ``start="fresh"``): ``fan-in``,
      ``U(-1/sqrt(fan_in), 1/sqrt(fan_in))`` weights and zero biases; ``truncnorm``, weights and
      biases from N(0, 0.1^2) truncated at two standard deviations (TensorFlow's
      ``truncated_normal(stddev=0.1)``, VCL's new heads); ``normal``, N(0, 0.1^2) (Swaroop et
      al.'s re-initialisation); ``mle``, the weights of a deterministic net
      of the same shape (``truncnorm`` start) trained by Adam on the fit's data for the fixed budget
      of that data (``epochs``/``min_steps``/``batch_size`` at ``lr``), VCL's start of task 1. Output
      rows that have seen no data when a posterior starts from the previous one begin as a fresh
      posterior's (``truncnorm`` under ``mle``).
    * ``pixels`` (one of :data:`~pyro_bbt.data.SCALINGS`) and ``val_fraction``: the pixel scaling and
      the share of each digit's training images held out (``0``: all 60,000, as VCL).
    * ``start`` (one of :data:`STARTS`): ``q_t`` of a chained task starts at ``q_{t-1}``
      (``previous``, VCL) or ``fresh`` by ``mean_init`` and ``init_scale`` (Swaroop et al. 2019),
      keeping only the output rows of the tasks already learnt (the old heads, or the digits seen).
    * ``coreset`` (one of :data:`~pyro_bbt.coresets.CORESETS`) and ``coreset_size``: VCL's
      coresets (:mod:`pyro_bbt.coresets`). ``coreset_size`` points of every task's training
      split are set aside (for every method: all train on the rest); after each task ``t`` a
      ``transfer`` or ``finetune`` chain predicts task ``i <= t`` by a copy of ``q_t`` fitted,
      under ``q_t`` as its prior, on coreset ``i`` through head ``i`` (task scenario) or on the
      coresets ``0..t`` together (one shared head), by the fit of the tasks (``fit``; under
      ``fixed`` the budget of the coreset's size). The copy is not propagated; the row without it
      is kept too (``row_without_coreset``).
    """

    scenario: str
    fit: str = "rule"
    joint: str = "every"
    mean_init: str = "fan-in"
    pixels: str = "blundell"
    val_fraction: float = 0.1
    start: str = "previous"
    coreset: str = "none"
    coreset_size: int = 40

    def __post_init__(self) -> None:
        _choice("scenario", self.scenario, SCENARIOS)
        _choice("fit", self.fit, FITS)
        _choice("joint", self.joint, JOINTS)
        _choice("mean init", self.mean_init, MEAN_INITS)
        _choice("pixel scaling", self.pixels, SCALINGS)
        _choice("start", self.start, STARTS)
        _choice("coreset", self.coreset, CORESETS)
        if isinstance(self.coreset_size, bool) or not isinstance(self.coreset_size, int) or self.coreset_size < 1:
            raise ValueError(f"coreset size must be an integer >= 1, got {self.coreset_size!r}")
        if not (isinstance(self.val_fraction, (int, float)) and 0.0 <= self.val_fraction < 1.0):
            raise ValueError(f"val-fraction must be a number in [0, 1), got {self.val_fraction!r}")

    @property
    def num_heads(self) -> int:
        """Output heads: one per task in the task scenario, else one shared head."""
        return len(SPLIT_PAIRS) if self.scenario == "task" else 1

    @property
    def classes_per_head(self) -> int:
        """Outputs per head: 10 digits in the class scenario, 2 positions in a pair otherwise."""
        return 2 * len(SPLIT_PAIRS) if self.scenario == "class" else 2

    def active_outputs(self, task: int) -> int | None:
        """Outputs in the softmax while task ``task`` is trained and after it: the digits seen so
        far, ``2 (task + 1)``, in the class scenario; ``None`` (the whole head) otherwise."""
        return 2 * (task + 1) if self.scenario == "class" else None

    def untrained_rows(self, first_untrained: int) -> slice | None:
        """Output rows no task before ``first_untrained`` has trained: ``[2 t, 10)`` for
        ``t = first_untrained`` in the task and class scenarios (heads or digits ``t..``); ``None``
        in the domain scenario (one shared head, trained by every task) or after the last task."""
        if self.scenario == "domain" or first_untrained >= len(SPLIT_PAIRS):
            return None
        return slice(2 * first_untrained, 2 * len(SPLIT_PAIRS))

    def sizes(self, hidden: Sequence[int]) -> tuple[int, ...]:
        """Layer widths of the network (one head's outputs last; see ``BayesianMLP(num_heads=)``)."""
        return (INPUT_DIM, *hidden, self.classes_per_head)

    def learnt_rows(self, first_untrained: int) -> slice | None:
        """Output rows the tasks before ``first_untrained`` have trained, ``[0, 2 t)`` in the task and
        class scenarios; ``None`` in the domain scenario (its one head belongs to no task alone)."""
        if self.scenario == "domain" or first_untrained < 1:
            return None
        return slice(0, 2 * first_untrained)

    def protocol(self) -> dict:
        """The settings besides scenario, fit and joint (``results.json``'s ``"protocol"``); the
        coreset's only when there is one (runs made before coresets keep their description)."""
        out = {"mean_init": self.mean_init, "pixels": self.pixels, "val_fraction": self.val_fraction, "start": self.start}
        if self.coreset != "none":
            out.update(coreset=self.coreset, coreset_size=self.coreset_size)
        return out

    def to_dict(self) -> dict:
        return {"scenario": self.scenario, "fit": self.fit, "joint": self.joint, **self.protocol()}


@dataclass(frozen=True)
class SplitTask:
    """Task ``index`` of the sequence: its two ``digits``, the output ``head`` it is trained and
    read through (``None``: the one shared head) and its labels, ``label_offset + k`` for
    ``digits[k]``."""

    index: int
    digits: tuple[int, int]
    head: int | None
    label_offset: int

    @property
    def labels(self) -> tuple[int, int]:
        return (self.label_offset, self.label_offset + 1)

    @property
    def name(self) -> str:
        return f"{self.digits[0]}/{self.digits[1]}"

    def to_dict(self) -> dict:
        return {"index": self.index, "digits": list(self.digits), "labels": list(self.labels), "head": self.head}


def split_tasks(scenario: str) -> list[SplitTask]:
    """The five tasks of split MNIST under ``scenario``: digits ``(2t, 2t + 1)``; labels 0/1 read
    through head ``t`` (``task``), 0/1 through the shared head (``domain``), or the digits
    themselves through the shared 10-way head (``class``)."""
    _choice("scenario", scenario, SCENARIOS)
    return [
        SplitTask(
            index=t,
            digits=pair,
            head=t if scenario == "task" else None,
            label_offset=pair[0] if scenario == "class" else 0,
        )
        for t, pair in enumerate(SPLIT_PAIRS)
    ]


ROW_GUIDES = ("normal", "meanfield", "delta")  # guides whose state holds each output row of a site


def check_split_methods(methods: Sequence[str], scenario: str | None = None, guide: str | None = None) -> tuple[str, ...]:
    """``methods`` if every one is a method of the split sequence, else ``ValueError`` naming it.
    With ``scenario`` and ``guide``: also refuse a guide that cannot start new output rows fresh
    (the task and class scenarios' ``transfer`` and ``finetune`` reset the rows of untrained heads
    or digits)."""
    bad = [m for m in methods if m not in SPLIT_METHODS]
    if bad or not methods:
        raise ValueError(f"the split sequence runs the methods {', '.join(SPLIT_METHODS)}; got {', '.join(bad or ['none'])}")
    chained = [m for m in methods if m in ("transfer", "finetune")]
    if scenario in ("task", "class") and chained and guide in GUIDES and guide not in ROW_GUIDES:  # an unknown guide: ExperimentConfig says so
        raise ValueError(f"the {scenario} scenario's {' and '.join(chained)} start the output rows of every new "
                         f"{'head' if scenario == 'task' else 'digit'} fresh, which the guides "
                         f"{', '.join(ROW_GUIDES)} support; got guide {guide!r}")
    return tuple(methods)


MEAN_GUIDES = ("normal", "meanfield")  # guides whose means a mean initialisation can set


def check_split_protocol(split: SplitConfig, guide: str) -> None:
    """``ValueError`` when ``guide`` cannot follow ``split``'s protocol: a mean initialisation
    other than fan-in sets the locations of a ``normal`` or ``meanfield`` guide."""
    if split.mean_init != "fan-in" and guide in GUIDES and guide not in MEAN_GUIDES:
        raise ValueError(f"mean init {split.mean_init!r} sets the means of the guides {', '.join(MEAN_GUIDES)}; got guide {guide!r}")


def check_split_ewc(split: SplitConfig, methods: Sequence[str], ewc_patience: int | None) -> None:
    """``ValueError`` when EWC is to stop early (``ewc_patience``) with no validation split to
    stop on (``split.val_fraction == 0``)."""
    if "ewc" in methods and ewc_patience is not None and split.val_fraction == 0:
        raise ValueError(f"ewc-patience {ewc_patience} stops EWC's nets on each task's validation split, but val-fraction is 0 "
                         "(no validation split): give a val-fraction > 0 or ewc-patience none")


@dataclass(frozen=True)
class SplitPreset:
    """A preset of ``--sequence split``: ``overrides`` of :class:`ExperimentConfig`'s defaults, the
    ``fit`` mode, when ``joint`` is fitted and the ``protocol`` settings of :class:`SplitConfig`."""

    overrides: dict = field(default_factory=dict)
    fit: str = "rule"
    joint: str = "every"
    protocol: dict = field(default_factory=dict)  # SplitConfig's mean_init, pixels, val_fraction, start


SPLIT_PRESETS: dict[str, SplitPreset] = {
    # Every method on real MNIST, one seed, 1000 images per task, a few passes each: a smoke run.
    "quick": SplitPreset(
        dict(methods=SPLIT_METHODS, hidden=(100, 100), epochs=1, min_steps=40, seeds=(0,), eval_samples=8, limit_train=1000,
             limit_eval=500, fisher_samples=500),
        fit="fixed",
    ),
    # Hsu et al. 2018's network (784-400-400 MLP), three seeds, every posterior fitted as the A -> B paper preset
    # fits its own (CONVERGED_FITS: q_A's rule in minibatches of 2048, Adam from 1e-2 with the widths at 3e-2, the
    # verdict with its confirmation and continuation, at most 3,000 epochs); EWC's deterministic nets at Hsu et
    # al.'s optimiser (Adam at 1e-3, minibatches of 128), each stopped early on its task's validation split
    # (patience 3 epochs). Joint is fitted once, on all five tasks (the offline model the published tables give):
    # after every task it would cost 15 tasks' fits per seed.
    "paper": SplitPreset(
        dict(methods=SPLIT_METHODS, hidden=(400, 400), epochs=10, min_steps=1, seeds=(0, 1, 2), batch_size=128, lr=1e-3, ewc_lr=1e-3,
             **CONVERGED_FITS),
        fit="rule",
        joint="last",
    ),
    # The paper preset until 2026-12-05, which the published split tables used: the stopping rule's two-point test
    # with at most 300 epochs and the one-step verdict (no continuation), EWC's nets for 10 epochs per task.
    "paper-v1": SplitPreset(
        dict(methods=SPLIT_METHODS, hidden=(400, 400), epochs=10, min_steps=1, seeds=(0, 1, 2), batch_size=128, lr=1e-3, ewc_lr=1e-3),
        fit="rule",
        joint="last",
    ),
    # Nguyen et al. 2018's published run (nvcuong/variational-continual-learning, ddm/run_split.py, without coreset):
    # 784-256-256, all 60,000 training images with pixels in [0, 1], task 1's means from a max-likelihood net, log-variance
    # -6 (sigma = e^-3), N(0, 1) prior, 120 full-batch Adam steps at 1e-3 per task (widths at 5e-4 on softplus^-1(sigma):
    # VCL's 1e-3 on log sigma^2 moves log sigma by half as much), 10 weight samples shared across the batch, 100 test
    # samples. Three seeds where the paper reports one run. The verdict is recorded, not acted on (--fit fixed).
    "vcl": SplitPreset(
        dict(methods=("transfer",), hidden=(256, 256), epochs=120, min_steps=1, batch_size=100_000, lr=1e-3, scale_lr=5e-4,
             init_scale=math.exp(-3), prior="gaussian", prior_scale=1.0, estimator="weights", num_particles=10, eval_samples=100,
             kl_schedule="uniform", tau=1.0, seeds=(0, 1, 2)),
        fit="fixed",
        joint="last",
        protocol=dict(mean_init="mle", pixels="unit", val_fraction=0.0, start="previous"),
    ),
    # Swaroop et al. 2019 (the same repository, improved_ddm/run_multihead_split.py): 784-200, 600 epochs per task in
    # minibatches of 256, Adam at 5e-3 (widths at 2.5e-3, as above), every task's q_t re-initialised (means N(0, 0.1^2),
    # log-variance -6) under the previous posterior as prior, the old heads kept, Adam new for every task.
    "vcl-swaroop": SplitPreset(
        dict(methods=("transfer",), hidden=(200,), epochs=600, min_steps=1, batch_size=256, lr=5e-3, scale_lr=2.5e-3,
             init_scale=math.exp(-3), prior="gaussian", prior_scale=1.0, estimator="weights", num_particles=10, eval_samples=100,
             kl_schedule="uniform", tau=1.0, seeds=(0, 1, 2)),
        fit="fixed",
        joint="last",
        protocol=dict(mean_init="normal", pixels="unit", val_fraction=0.0, start="fresh"),
    ),
}


# --------------------------------------------------------------------------- data and networks


def load_split_task(task: SplitTask, seed: int = 0, limit_train: int | None = None, limit_eval: int | None = None,
                    device: str = "cpu", pixels: str = "blundell", val_fraction: float = 0.1) -> tuple[Split, Split]:
    """``(train, test)`` of ``task`` with the scenario's labels (``load_task`` labels
    ``digits[k]`` as ``k``; the offset is added here), capped at ``limit_train`` / ``limit_eval``
    images, pixels scaled by ``pixels``, ``val_fraction`` of each digit's training images held out."""
    data = load_task(Task(digits=task.digits, seed=seed, name=task.name, scaling=pixels, val_fraction=val_fraction),
                     limit_train=limit_train, limit_eval=limit_eval)

    def relabel(split: Split) -> Split:
        return Split(split.x, split.y + task.label_offset).to(device)

    return relabel(data.train), relabel(data.test)


def load_split_val(task: SplitTask, seed: int = 0, limit_eval: int | None = None, device: str = "cpu", pixels: str = "blundell",
                   val_fraction: float = 0.1) -> Split:
    """The validation split of ``task`` (the ``val_fraction`` of each digit's training images that
    :func:`load_split_task` holds out; empty at ``0``), with the scenario's labels, capped at
    ``limit_eval`` images."""
    data = load_task(Task(digits=task.digits, seed=seed, name=task.name, scaling=pixels, val_fraction=val_fraction), limit_train=0,
                     limit_eval=limit_eval)
    return Split(data.val.x, data.val.y + task.label_offset).to(device)


def new_split_posterior(config: ExperimentConfig, split: SplitConfig, prior: Prior, seed: int, task: int) -> tuple[BayesianMLP, object]:
    """A new network of the scenario's shape under ``prior``, with the outputs active while
    ``task`` is trained, and its initialised guide (:func:`~pyro_bbt.fitting.new_posterior`)."""
    return new_posterior(split.sizes(config.hidden), prior, config.guide, init_scale=config.init_scale, seed=seed, num_heads=split.num_heads,
                         device=config.device, active_outputs=split.active_outputs(task))


def _fresh_means(split: SplitConfig, model: BayesianMLP, guide) -> None:
    """The random start of the means of a new posterior: N(0, 0.1^2) under ``normal``, truncated
    at 0.2 under ``truncnorm`` and ``mle``; the guide's own fan-in draw under ``fan-in``."""
    if split.mean_init != "fan-in":
        normal_means(guide, model, truncate=split.mean_init != "normal")


def max_likelihood_means(config: ExperimentConfig, split: SplitConfig, train_split: Split, head: int | None, task: int,
                         seed: int) -> dict[str, torch.Tensor]:
    """VCL's start of task 1: the weights of a deterministic net of the posterior's shape, started
    from N(0, 0.1^2) truncated at 0.2 (weights and biases), trained by Adam at ``config.lr`` on
    the mean cross-entropy of ``train_split`` through output ``head`` (``None``: the outputs
    active at ``task``) for the fixed budget of that data, ``steps_for(N, epochs, batch_size,
    min_steps)`` (VCL: 120 full-batch steps). Returns them keyed by the model's site names.
    :raises ~pyro_bbt.inference.NonFiniteLossError: when its loss or weights go non-finite."""
    torch.manual_seed(seed)
    width = split.classes_per_head
    net = MLP((*split.sizes(config.hidden)[:-1], width * split.num_heads)).to(config.device)
    with torch.no_grad():
        for parameter in net.parameters():
            torch.nn.init.trunc_normal_(parameter, std=0.1, a=-0.2, b=0.2)
    rows = slice(head * width, (head + 1) * width) if head is not None else slice(0, split.active_outputs(task) or width * split.num_heads)
    view = HeadView(net, rows)
    steps = _fixed_budget(config, [train_split])
    losses = train_deterministic(view, train_split.x, train_split.y, DeterministicTrainConfig(config.lr, config.batch_size, steps, seed))
    check_finite_training(view, losses, train_split.x[:256], "the max-likelihood start (--mean-init mle)", config.lr)
    return {name: value.detach().clone() for name, value in net.named_parameters()}


def _initial_means(config: ExperimentConfig, split: SplitConfig, model: BayesianMLP, guide, train_split: Split, head: int | None,
                   task: int, seed: int) -> None:
    """Under ``mean_init="mle"``, set the means of the fresh posterior about to be fitted on
    ``train_split`` to :func:`max_likelihood_means` (the other initialisations are already in
    place: :func:`_fresh_means`)."""
    if split.mean_init == "mle":
        set_means(guide, max_likelihood_means(config, split, train_split, head, task, seed))


def next_prior(config: ExperimentConfig, model: BayesianMLP, guide, rows: slice | None) -> Prior:
    """VCL's next prior: ``q`` (scales x tau), with the base prior's ``N(0, sigma^2)`` on the
    output ``rows`` of heads or digits that have seen no data."""
    return prior_from_posterior(guide, model, config.base_prior(), config.base_prior_std, config.tau, rows)


def accuracy_row(model: BayesianMLP, guide, tasks: Sequence[SplitTask], tests: Sequence[Split], samples: int) -> list[float]:
    """Posterior-predictive test accuracy on every task, each read through its own head
    (``task.head``; the shared head when ``None``) and the model's active outputs, with
    ``samples`` weight samples. A digit whose output is not active yet is never predicted."""
    row = []
    for task, test in zip(tasks, tests):
        use_head(model, task.head)
        row.append(evaluate_accuracy(model, guide, test.x, test.y, num_samples=samples))
    return row


def _net_accuracy(net: torch.nn.Module, test: Split) -> float:
    """Test accuracy of a deterministic net (a head view); labels beyond its outputs count as wrong."""
    net.eval()
    with torch.no_grad():
        accuracy = predictive_accuracy(torch.log_softmax(net(test.x), dim=-1), test.y)
    net.train()
    return accuracy


# --------------------------------------------------------------------------- the units
#
# The sequence is a plan of units (pyro_bbt.engine): per seed, task 0's fit under the base prior
# (``first``, shared by transfer and finetune), then per chained method one unit per task t >= 1
# that needs the unit of task t - 1 (its posterior and, under transfer, the prior it leaves);
# joint's fits (one per t, or the last only) and EWC's whole chain need nothing.


def _fit_record(task: int, trained_on: list[int], fit, units: dict | None = None, reused: bool = False) -> dict:
    """What ``results.json`` keeps of one posterior's fit (``units``: its :func:`_census`)."""
    return {"task": task, "trained_on": trained_on, "steps": fit.steps, "epochs": fit.epochs, "convergence": fit.convergence,
            "units": units, "reused": reused, "seconds": fit.seconds}


def _census(config: ExperimentConfig, model: BayesianMLP, guide, tasks: Sequence[SplitTask], trains: Sequence[Split], seen: list[int],
            seed: int) -> dict:
    """The active hidden units of the posterior after the tasks ``seen``
    (:func:`~pyro_bbt.pruning.census_after`: against the base prior, the blank pixels of all their
    images left out, the threshold found by ablation on each task seen, through its head)."""
    return census_after(guide, model, config.base_prior_std, [(tasks[s].head, trains[s]) for s in seen], seed)


def _fixed_budget(config: ExperimentConfig, trains: Sequence[Split]) -> int:
    """The fixed budget of a fit on the tasks ``trains`` together: the sum of each task's,
    ``sum_s steps_for(N_s, epochs, batch_size, min_steps)`` (one task: B's budget)."""
    return sum(steps_for(len(s), config.epochs, config.batch_size, config.min_steps) for s in trains)


def _split_data(config: ExperimentConfig, split: SplitConfig, seed: int
                ) -> tuple[list[SplitTask], list[Split], list[Split], list[Split] | None]:
    """The tasks, their training and test splits and their coresets (``None`` without): with a
    coreset, each training split is what is left once task ``t``'s coreset (drawn with seed
    ``10_000 seed + t`` when random) is set aside."""
    tasks = split_tasks(split.scenario)
    data = [load_split_task(task, seed, config.limit_train, config.limit_eval, config.device, split.pixels, split.val_fraction) for task in tasks]
    trains, tests = [d[0] for d in data], [d[1] for d in data]
    if split.coreset == "none":
        return tasks, trains, tests, None
    chosen = [select_coreset(train, split.coreset, split.coreset_size, 10_000 * seed + t) for t, train in enumerate(trains)]
    return tasks, [rest for _, rest in chosen], tests, [coreset for coreset, _ in chosen]


def _fit(config: ExperimentConfig, split: SplitConfig, model: BayesianMLP, guide, train_split: Split, head: int | None, seed: int,
         fixed_steps: int, key: str, checkpoint: dict | None, on_checkpoint) -> Fit:
    """Fit ``guide`` on ``train_split`` through output ``head`` (``None``: all outputs) as
    ``split.fit`` says: q_A's recipe (``rule``) or B's budget of ``fixed_steps`` (``fixed``),
    continuing from ``checkpoint`` and sending each epoch's to ``on_checkpoint``."""
    use_head(model, head)
    recipe = config.recipe_a() if split.fit == "rule" else config.recipe_b(fixed_steps)
    store = UnitCheckpoints(checkpoint, on_checkpoint) if on_checkpoint is not None else None
    return fit_posterior(model, guide, train_split, recipe, seed, store=store, key=key)


def _failed(error: str, **fields) -> UnitOutcome:
    return UnitOutcome({"status": "failed", "error": error, **fields})


def _coreset_row(config: ExperimentConfig, split: SplitConfig, tasks: Sequence[SplitTask], tests: Sequence[Split], coresets: Sequence[Split],
                 task: int, seed: int, posterior: dict, prior: Prior, row: list[float]) -> tuple[list[float], list[dict]]:
    """``row`` with the accuracy on every task ``i <= task`` predicted by a copy of the posterior
    ``posterior`` (a guide state) fitted under ``prior`` on the coresets (one copy per task's
    head in the task scenario, one on the coresets ``0..task`` together otherwise), and a record
    of each copy's fit. Builds new guides (Pyro's param store is cleared): call it after
    everything else is read from the posterior's own guide."""
    row = list(row)
    seen = list(range(task + 1))
    groups = [[i] for i in seen] if split.scenario == "task" else [seen]
    fits = []
    for group in groups:
        data = Split(torch.cat([coresets[i].x for i in group]), torch.cat([coresets[i].y for i in group]))
        head = tasks[group[0]].head if split.scenario == "task" else None
        model, guide = new_split_posterior(config, split, prior, seed, task)
        start_from_state(model, guide, posterior)
        fit = _fit(config, split, model, guide, data, head, seed, _fixed_budget(config, [data]), "coreset", None, None)
        for i in group:
            use_head(model, tasks[i].head)
            row[i] = evaluate_accuracy(model, guide, tests[i].x, tests[i].y, num_samples=config.eval_samples)
        fits.append({"tasks": group, "examples": len(data), "steps": fit.steps, "epochs": fit.epochs, "convergence": fit.convergence,
                     "seconds": fit.seconds})
    return row, fits


def _with_coreset(config: ExperimentConfig, split: SplitConfig, record: dict, model: BayesianMLP, guide, tasks, tests, coresets,
                  task: int, seed: int, state: dict) -> dict:
    """``record`` (a finished task's, its ``row`` from the posterior itself) with VCL's coreset
    prediction as its ``row`` and the posterior's own as ``row_without_coreset`` (no coreset:
    ``record`` unchanged)."""
    if coresets is None:
        return record
    prior = next_prior(config, model, guide, split.untrained_rows(task + 1))
    row, fits = _coreset_row(config, split, tasks, tests, coresets, task, seed, state["guide"], prior, record["row"])
    return {**record, "row": row, "row_without_coreset": record["row"], "coreset_fits": fits}


def first_task_unit(config: ExperimentConfig, split: SplitConfig, seed: int, key: str, checkpoint: dict | None = None,
                    on_checkpoint=None) -> UnitOutcome:
    """Task 0 under the base prior from a fresh guide (the same computation for ``transfer`` and
    ``finetune``): its accuracy row, the untrained network's row (``baseline``) and its fit; the
    state is the posterior and the prior it leaves for task 1 under ``transfer``."""
    tasks, trains, tests, coresets = _split_data(config, split, seed)
    model, guide = new_split_posterior(config, split, config.base_prior(), seed, 0)
    _fresh_means(split, model, guide)
    baseline = accuracy_row(model, guide, tasks, tests, config.eval_samples)
    try:
        _initial_means(config, split, model, guide, trains[0], tasks[0].head, 0, seed)
        fit = _fit(config, split, model, guide, trains[0], tasks[0].head, seed, _fixed_budget(config, trains[:1]), key, checkpoint, on_checkpoint)
    except NonFiniteLossError as error:
        return _failed(f"task 0: {error}", baseline=baseline)
    row = accuracy_row(model, guide, tasks, tests, config.eval_samples)
    units = _census(config, model, guide, tasks, trains, [0], seed)
    state = {"guide": guide_state(guide), "prior": prior_state(next_prior(config, model, guide, split.untrained_rows(1)))}
    record = {"status": "ok", "task": 0, "row": row, "baseline": baseline, "fit": _fit_record(0, [0], fit, units)}
    try:
        record = _with_coreset(config, split, record, model, guide, tasks, tests, coresets, 0, seed, state)
    except NonFiniteLossError as error:
        return _failed(f"task 0, coreset: {error}", baseline=baseline)
    return UnitOutcome(record, state)


def chain_unit(config: ExperimentConfig, split: SplitConfig, method: str, seed: int, task: int, key: str, previous: dict,
               checkpoint: dict | None = None, on_checkpoint=None) -> UnitOutcome:
    """Task ``task`` of ``method``'s chain, from the posterior ``previous`` of task ``task - 1``
    (its output rows of untrained heads or digits fresh); under ``transfer`` its prior is the one
    ``previous`` left, under ``finetune`` the base prior. With ``split.start == "fresh"`` the
    posterior starts fresh instead (``mean_init``), keeping only the rows of the tasks learnt."""
    tasks, trains, tests, coresets = _split_data(config, split, seed)
    prior = prior_from_state(previous["prior"]) if method == "transfer" else config.base_prior()
    model, guide = new_split_posterior(config, split, prior, seed, task)
    _fresh_means(split, model, guide)
    learnt = split.learnt_rows(task)
    if split.start == "previous":
        start_from_state(model, guide, previous["guide"], split.untrained_rows(task))
    elif learnt is not None:
        load_rows(model, guide, previous["guide"], learnt)
    try:
        if split.start == "fresh":
            _initial_means(config, split, model, guide, trains[task], tasks[task].head, task, seed)
            if learnt is not None:  # the max-likelihood net's rows of the old heads are not theirs
                load_rows(model, guide, previous["guide"], learnt)
        fit = _fit(config, split, model, guide, trains[task], tasks[task].head, seed, _fixed_budget(config, trains[task:task + 1]), key,
                   checkpoint, on_checkpoint)
    except NonFiniteLossError as error:
        return _failed(f"task {task}: {error}")
    row = accuracy_row(model, guide, tasks, tests, config.eval_samples)
    units = _census(config, model, guide, tasks, trains, list(range(task + 1)), seed)
    state = {"guide": guide_state(guide)}
    if method == "transfer" and task + 1 < len(tasks):
        state["prior"] = prior_state(next_prior(config, model, guide, split.untrained_rows(task + 1)))
    record = {"status": "ok", "task": task, "row": row, "fit": _fit_record(task, [task], fit, units)}
    try:
        record = _with_coreset(config, split, record, model, guide, tasks, tests, coresets, task, seed, state)
    except NonFiniteLossError as error:
        return _failed(f"task {task}, coreset: {error}")
    return UnitOutcome(record, state)


def joint_unit(config: ExperimentConfig, split: SplitConfig, seed: int, task: int, with_baseline: bool, key: str,
               checkpoint: dict | None = None, on_checkpoint=None) -> UnitOutcome:
    """A fresh posterior under the base prior on tasks ``0..task`` together (all heads' outputs in
    one softmax in the task scenario, each task's labels shifted to its head's rows);
    ``with_baseline``: also the untrained network's accuracy row."""
    tasks, trains, tests, _ = _split_data(config, split, seed)
    fields = {}
    if with_baseline:
        model, guide = new_split_posterior(config, split, config.base_prior(), seed, 0)
        _fresh_means(split, model, guide)
        fields["baseline"] = accuracy_row(model, guide, tasks, tests, config.eval_samples)
    seen = list(range(task + 1))
    offsets = [0 if tasks[s].head is None else tasks[s].head * split.classes_per_head for s in seen]
    union = Split(torch.cat([trains[s].x for s in seen]), torch.cat([trains[s].y + o for s, o in zip(seen, offsets)]))
    model, guide = new_split_posterior(config, split, config.base_prior(), seed, task)
    _fresh_means(split, model, guide)
    try:
        _initial_means(config, split, model, guide, union, None, task, seed)
        fit = _fit(config, split, model, guide, union, None, seed, _fixed_budget(config, trains[: task + 1]), key, checkpoint, on_checkpoint)
    except NonFiniteLossError as error:
        return _failed(f"tasks 0..{task}: {error}", **fields)
    row = accuracy_row(model, guide, tasks, tests, config.eval_samples)
    units = _census(config, model, guide, tasks, trains, seen, seed)
    return UnitOutcome({"status": "ok", "task": task, "row": row, "fit": _fit_record(task, seen, fit, units), **fields})


def ewc_unit(config: ExperimentConfig, split: SplitConfig, seed: int, checkpoint: dict | None = None, on_checkpoint=None) -> UnitOutcome:
    """EWC over the whole sequence (short deterministic fits, one unit): task ``t`` with the sum of
    the penalties of tasks ``0..t-1``; rows not reached after a non-finite loss are ``None``. Each
    net trains for the fixed budget of its task or, with ``config.ewc_patience``, by early stopping
    on its task's validation split within ``config.max_epochs_a`` epochs, given back its best
    epoch's weights before its Fisher is taken (:func:`~pyro_bbt.units.ewc_train_config`); the
    record's ``fits`` then say, per task, the steps run and what early stopping did."""
    tasks, trains, tests, _ = _split_data(config, split, seed)
    T = len(tasks)
    rows: list[list[float] | None] = [None] * T
    torch.manual_seed(seed)
    width = split.classes_per_head
    net = MLP((*split.sizes(config.hidden)[:-1], width * split.num_heads)).to(config.device)

    def view(task: SplitTask, after: int) -> HeadView:
        """``task``'s head while task ``after`` is trained and after it (its active outputs)."""
        if task.head is not None:
            return HeadView(net, slice(task.head * width, (task.head + 1) * width))
        return HeadView(net, slice(0, split.active_outputs(after) or width))

    def row(after: int) -> list[float]:
        return [_net_accuracy(view(task, after), test) for task, test in zip(tasks, tests)]

    baseline = row(0)
    penalties: list[EWCPenalty] = []
    fits: list[dict] = []  # with ewc_patience: per task, the steps run and what early stopping did
    for t in range(T):
        steps = _fixed_budget(config, trains[t:t + 1])
        current = view(tasks[t], t)
        stopping: list[EarlyStopping] = []
        val = None
        if config.ewc_patience is not None:
            held_out = load_split_val(tasks[t], seed, config.limit_eval, config.device, split.pixels, split.val_fraction)
            val = (held_out.x, held_out.y)
        losses = train_deterministic(current, trains[t].x, trains[t].y, ewc_train_config(config, len(trains[t]), steps, seed, config.max_epochs_a),
                                     EWCPenaltySum(penalties) if penalties else None, val=val, stopping=stopping)
        if stopping:
            fits.append({"task": t, "steps": len(losses), "early_stopping": stopping[0].to_dict()})
        try:
            check_finite_training(current, losses, trains[t].x[:256], f"EWC on task {t}", config.ewc_lr)
        except NonFiniteLossError as error:
            return UnitOutcome({"status": "ok", "rows": rows, "baseline": baseline, "error": f"task {t}: {error}", "fits": fits})
        rows[t] = row(t)
        generator = torch.Generator(device=config.device).manual_seed(seed)
        fisher = fisher_diagonal(current, trains[t].x[: config.fisher_samples], generator=generator)
        penalties.append(EWCPenalty(current, fisher, config.ewc_lambda))
    return UnitOutcome({"status": "ok", "rows": rows, "baseline": baseline, "error": "", "fits": fits})


def _chain_keys(method: str, seed: int) -> list[str]:
    """The units of ``method``'s chain for ``seed``, task by task (task 0: the shared first fit)."""
    return [f"split-first-s{seed}"] + [f"split-{method}-t{t}-s{seed}" for t in range(1, len(SPLIT_PAIRS))]


def _joint_tasks(split: SplitConfig) -> list[int]:
    return [len(SPLIT_PAIRS) - 1] if split.joint == "last" else list(range(len(SPLIT_PAIRS)))


def fit_capped_at(record: dict) -> int | None:
    """The cap (epochs) at which the fit of a Bayesian unit's ``record`` stopped unconverged;
    ``None`` if it converged, failed, or ran a fixed budget (no cap). Its coreset fits, if any,
    are not looked at."""
    fit = record.get("fit") if record.get("status") == "ok" else None
    convergence = fit.get("convergence") if isinstance(fit, dict) else None
    if not isinstance(convergence, dict) or convergence.get("converged", True):
        return None
    cap = convergence.get("max_epochs")
    return cap if cap is not None and fit.get("epochs", 0) >= cap else None


def plan_split(config: ExperimentConfig, split: SplitConfig) -> list[Unit]:
    """The units of the sequence for every seed and method of ``config``. Fitted by the rule, each
    Bayesian fit's unit says where it stopped (:func:`fit_capped_at`), so a resume that raises
    ``max_epochs_a`` runs a fit that stopped at the old cap on to the new one, and every later
    task of its chain again (:mod:`pyro_bbt.engine`, "Raised caps"). EWC's nets (early stopping)
    keep their records."""
    methods = check_split_methods(config.methods, split.scenario, config.guide)
    check_split_protocol(split, config.guide)
    cap = config.recipe_a().cap if split.fit == "rule" else None  # None: a fixed budget, no cap to raise
    bayesian = dict(capped=fit_capped_at, cap=cap) if cap is not None else {}
    units: list[Unit] = []
    for seed in config.seeds:
        chained = [m for m in methods if m in ("transfer", "finetune")]
        if chained:
            key = f"split-first-s{seed}"
            units.append(Unit(key, first_task_unit, (config, split, seed, key), **bayesian))
        for method in chained:
            keys = _chain_keys(method, seed)
            units += [Unit(keys[t], chain_unit, (config, split, method, seed, t, keys[t]), needs=(keys[t - 1],), **bayesian)
                      for t in range(1, len(keys))]
        if "joint" in methods:
            for i, t in enumerate(_joint_tasks(split)):
                key = f"split-joint-t{t}-s{seed}"
                units.append(Unit(key, joint_unit, (config, split, seed, t, i == 0, key), **bayesian))
        if "ewc" in methods:
            units.append(Unit(f"split-ewc-s{seed}", ewc_unit, (config, split, seed)))
    return units


# --------------------------------------------------------------------------- the summary


@dataclass
class _Chain:
    """One method's run over the sequence for one seed."""

    R: np.ndarray
    baseline: list[float]
    fits: list[dict]
    error: str = ""  # why the sequence stopped early (a non-finite loss); rows not reached are NaN
    last_only: bool = False  # only the last row was computed (joint after the last task): ACC alone
    R_without_coreset: np.ndarray | None = None  # with a coreset: the rows predicted by the posteriors themselves

    def entry(self, seed: int) -> dict:
        out = {"seed": seed, "accuracy_matrix": self.R.tolist(), "random_init_accuracy": self.baseline, "summary": None,
               "fits": self.fits, "error": self.error}
        if self.R_without_coreset is not None:
            out["accuracy_matrix_without_coreset"] = self.R_without_coreset.tolist()
            out["summary_without_coreset"] = (None if np.isnan(self.R_without_coreset).any()
                                              else summarize(self.R_without_coreset, self.baseline).to_dict())
        if self.last_only and not self.error:
            out["summary"] = {"average_accuracy": float(np.mean(self.R[-1])), "backward_transfer": None, "forward_transfer": None,
                              "average_forgetting": None}
        elif not np.isnan(self.R).any():
            out["summary"] = summarize(self.R, self.baseline).to_dict()
        return out


def _own_error(record: dict, task: int, what: str) -> str:
    """A failed unit's error as the sequence reports it (a unit that raised has only a traceback)."""
    error = record.get("error", "")
    return error if error.startswith(what) else f"{what}: {error}"


def _assemble_chain(outcomes: dict[str, UnitOutcome], method: str, seed: int, first_reused: bool) -> _Chain:
    T = len(SPLIT_PAIRS)
    R = np.full((T, T), np.nan)
    first = outcomes[f"split-first-s{seed}"].record
    baseline = first.get("baseline")
    fits: list[dict] = []
    R0 = np.full((T, T), np.nan) if "row_without_coreset" in first else None
    for t, key in enumerate(_chain_keys(method, seed)):
        record = outcomes[key].record
        if record["status"] != "ok":
            return _Chain(R, baseline, fits, _own_error(record, t, f"task {t}"), R_without_coreset=R0)
        R[t] = record["row"]
        if R0 is not None:
            R0[t] = record["row_without_coreset"]
        fit = dict(record["fit"])
        if "coreset_fits" in record:
            fit["coreset_fits"] = record["coreset_fits"]
        if t == 0 and first_reused:
            fit.update(reused=True, seconds=0.0)
        fits.append(fit)
    return _Chain(R, baseline, fits, R_without_coreset=R0)


def _assemble_joint(outcomes: dict[str, UnitOutcome], split: SplitConfig, seed: int) -> _Chain:
    T = len(SPLIT_PAIRS)
    R = np.full((T, T), np.nan)
    last_only = split.joint == "last"
    joint_tasks = _joint_tasks(split)
    baseline = outcomes[f"split-joint-t{joint_tasks[0]}-s{seed}"].record.get("baseline")
    fits: list[dict] = []
    for t in joint_tasks:
        record = outcomes[f"split-joint-t{t}-s{seed}"].record
        if record["status"] != "ok":
            return _Chain(R, baseline, fits, _own_error(record, t, f"tasks 0..{t}"), last_only)
        R[t] = record["row"]
        fits.append(record["fit"])
    return _Chain(R, baseline, fits, last_only=last_only)


def _assemble_ewc(outcomes: dict[str, UnitOutcome], seed: int) -> _Chain:
    T = len(SPLIT_PAIRS)
    record = outcomes[f"split-ewc-s{seed}"].record
    if record["status"] != "ok":
        return _Chain(np.full((T, T), np.nan), record.get("baseline"), [], _own_error(record, 0, "task 0"))
    R = np.array([[np.nan] * T if row is None else row for row in record["rows"]], dtype=float)
    return _Chain(R, record["baseline"], record.get("fits", []), record["error"])


# --------------------------------------------------------------------------- the run


def _average_accuracy_curve(R: np.ndarray) -> list[float]:
    """``a_t = 1/(t+1) sum_{j<=t} R[t][j]``: the average accuracy on the tasks seen so far."""
    return [float(np.mean(R[t, : t + 1])) for t in range(R.shape[0])]


def method_summary(entries: list[dict]) -> dict:
    """Mean and standard deviation over the seeds whose sequence finished."""
    done = [e for e in entries if e["summary"] is not None]
    with warnings.catch_warnings():  # a row no seed reached stays NaN
        warnings.simplefilter("ignore", RuntimeWarning)
        matrix_mean = np.nanmean([e["accuracy_matrix"] for e in entries], axis=0).tolist()
    out: dict = {
        "accuracy_matrix_mean": matrix_mean,
        "seeds_finished": len(done),
        "summary": None,
        "average_accuracy_curve": None,
    }
    if done:
        out["summary"] = {  # a metric the seeds do not have (joint fitted after the last task only: ACC alone) is None
            key: None if done[0]["summary"][key] is None else mean_std([e["summary"][key] for e in done])
            for key in ("average_accuracy", "backward_transfer", "forward_transfer", "average_forgetting")
        }
        curves = np.array([_average_accuracy_curve(np.array(e["accuracy_matrix"])) for e in done])  # NaN where a row is
        out["average_accuracy_curve"] = {"mean": curves.mean(0).tolist(), "std": sample_std(curves, axis=0).tolist(), "n": len(done)}
    without = [e.get("summary_without_coreset") for e in done]
    if done and all(without):  # with a coreset: the posteriors' own predictions, for comparison
        out["summary_without_coreset"] = {key: mean_std([w[key] for w in without]) for key in ("average_accuracy", "backward_transfer")}
    counts = [[f["units"]["active"] for f in e["fits"]] for e in done if e["fits"] and all(f.get("units") for f in e["fits"])]
    if counts and len({np.shape(c) for c in counts}) == 1:  # active units per fit and hidden layer, mean over the seeds
        out["active_units_mean"] = np.mean(counts, axis=0).tolist()
    return out


def _convergence_warnings(method: str, seed: int, fits: list[dict], fit_mode: str) -> list[str]:
    missed = [f for f in fits if f.get("convergence") is not None and not f["convergence"]["converged"] and not f.get("reused")]  # EWC's: none
    if not missed:
        return []
    how = "fitted by the stopping rule" if fit_mode == "rule" else "trained for the fixed budget (--fit fixed)"
    return [f"seed {seed} {method}: posterior of task(s) {', '.join(str(f['task']) for f in missed)} NOT converged by the stopping rule "
            f"(each {how}; epochs {', '.join(str(f['epochs']) for f in missed)})"]


def _log_unit(split: SplitConfig, log: Callable[[str], None]) -> Callable[[Unit, UnitOutcome], None]:
    def on_finish(unit: Unit, outcome: UnitOutcome) -> None:
        record = outcome.record
        if record["status"] != "ok":
            log(f"{unit.key} ({split.scenario} scenario) failed: {record.get('error', '')}")
        elif "row" in record:
            log(f"{unit.key} ({split.scenario} scenario): after task {record['task']}: " + " ".join(f"{a:.3f}" for a in record["row"]))
        else:
            log(f"{unit.key} ({split.scenario} scenario): " + " | ".join(" ".join(f"{a:.3f}" for a in r) for r in record["rows"] if r is not None))
    return on_finish


def run_split_sequence(config: ExperimentConfig, split: SplitConfig, log: Callable[[str], None] = print, executor: Executor | None = None,
                       store: RunStore | None = None, progress: bool = False) -> dict:
    """Run the five tasks of split MNIST under ``split.scenario`` with every method of
    ``config.methods`` (all in :data:`SPLIT_METHODS`) and every seed, as the units of
    :func:`plan_split` on ``executor`` (default: serial) through :func:`~pyro_bbt.engine.run_units`;
    return the content of ``results.json`` (its ``"seconds"`` entries are wall-clock times, which
    the CLI moves to ``timing.json``). With ``store``, every finished unit and the one in progress
    (after every epoch) are kept, so a rerun on the same store resumes."""
    methods = check_split_methods(config.methods, split.scenario, config.guide)
    check_split_ewc(split, methods, config.ewc_patience)
    tasks = split_tasks(split.scenario)
    outcomes = run_units(plan_split(config, split), executor, store, on_finish=_log_unit(split, log), progress=progress)
    per_method: dict[str, list[dict]] = {m: [] for m in methods}
    unconverged: list[str] = []
    for seed in config.seeds:
        first_used = False
        for method in methods:
            if method in ("transfer", "finetune"):
                chain = _assemble_chain(outcomes, method, seed, first_reused=first_used)
                first_used = True
            elif method == "joint":
                chain = _assemble_joint(outcomes, split, seed)
            else:
                chain = _assemble_ewc(outcomes, seed)
            per_method[method].append(chain.entry(seed))
            for warning in _convergence_warnings(method, seed, chain.fits, split.fit):
                log(f"warning: {warning}")
                unconverged.append(warning)
    return {
        "schema_version": 1,
        "mode": "sequence",
        "sequence": "split",
        "scenario": split.scenario,
        "fit": split.fit,
        "joint": split.joint,
        "protocol": split.protocol(),
        "tasks": [task.to_dict() for task in tasks],
        "domains": [task.name for task in tasks],
        "config": config.to_dict(),
        "warnings": unconverged,
        "methods": {m: {"per_seed": entries, **method_summary(entries)} for m, entries in per_method.items()},
    }
