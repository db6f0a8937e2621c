"""The split-MNIST transfer and forgetting experiment.

Protocol, for every seed::

    1. fit q_A on task A (digits 0-4) from an N(0, sigma^2) prior;
    2. for every fraction f of task B's training data (digits 5-9, labels 0-4: a shared head)
       and every method, train on B for the same number of optimisation steps
           steps_B(f) = M * max(epochs, ceil(min_steps / M)),  M = ceil(N_B(f) / batch_size),
       recording B's validation and test accuracy along the way (the learning curve);
    3. evaluate on B's test set (transfer) and on A's test set (forgetting).

Methods on B (same data, seeds and step budget; the budget is rounded up to whole passes
over the data, see :func:`steps_for`):

* ``scratch``  -- prior N(0, sigma^2), fresh guide;
* ``transfer`` -- prior = q_A (:func:`~pyro_bbt.guides.posterior_as_prior`, scales x tau),
  guide started at q_A (``q_init="from-posterior"``) or fresh (``"fresh"``);
* ``finetune`` -- prior N(0, sigma^2), guide started at q_A;
* ``ewc``      -- a deterministic MLP of the same size trained on A, then on B with Kirkpatrick's
  penalty (lambda/2) sum_k F_k (theta_k - theta*_k)^2, Fisher from A's data with sampled labels;
* ``joint``    -- A's and B's training data together, from scratch, for steps_A + steps_B steps
  (the upper bound for remembering A).

For the sequential methods the 2x2 accuracy matrix ``R[i][j]`` (test accuracy on task j after
training task i) gives backward transfer ``R[1][0] - R[0][0]`` (negative = forgetting) and
forward transfer ``R[0][1] - b_B`` with ``b_B`` the B accuracy of a randomly initialised model
(GEM, Lopez-Paz & Ranzato 2017).
"""

from __future__ import annotations

import copy
import math
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, replace

import numpy as np
import pyro
import torch

from .continual import backward_transfer, forward_transfer, summarize
from .convergence import StoppingRule, assess_convergence, uninformed_scale_ratio
from .data import Split, Task, TaskData, load_task
from .evaluation import PredictiveMetrics, evaluate, metrics_from_log_probs
from .ewc import MLP, DeterministicTrainConfig, EWCPenalty, fisher_diagonal, train_deterministic
from .guides import GUIDES, GuideConfig, initialize_guide, make_guide, posterior_as_prior
from .checkpoint import prior_from_state, prior_state
from .inference import EpochDiagnostics, NonFiniteLossError, TrainConfig, TrainState, train
from .runstore import RunStore
from .kl_schedules import validate_schedule
from .model import BayesianMLP
from .objectives import ESTIMATORS
from .plots import sample_std
from .priors import GaussianPrior, Prior, ScaleMixturePrior

__all__ = [
    "METHODS", "Q_INITS", "HEADS", "SEQUENCES", "ExperimentConfig", "PRESETS", "run_experiment", "run_sequence",
    "sequence_tasks", "summarize_units", "unit_key",
]

METHODS = ("scratch", "transfer", "finetune", "ewc", "joint")
Q_INITS = ("from-posterior", "fresh")
HEADS = ("shared", "multihead")
PRIORS = ("gaussian", "mixture")


def _choice(name: str, value: str, allowed: tuple[str, ...]) -> str:
    if value not in allowed:
        raise ValueError(f"unknown {name} {value!r}; allowed: {', '.join(allowed)}")
    return value


@dataclass
class ExperimentConfig:
    """Everything that defines a transfer run; saved as ``config.json`` next to the results.

    ``limit_train`` / ``limit_eval`` cap the number of training / evaluation images per split
    (for smoke tests); ``None`` uses all of them.

    Task A's fit: with ``max_epochs_a`` set, q_A is fitted by the :class:`StoppingRule`
    (``window``, ``rel_tol``, ``scale_tol``) for at least ``epochs_a`` and at most
    ``max_epochs_a`` epochs; with ``max_epochs_a=None``, for exactly ``epochs_a`` epochs. Either
    way the rule's verdict is recorded. The deterministic net of EWC and the A share of
    ``joint``'s budget use ``epochs_a`` epochs.

    The prior on A (and on B for ``scratch``, ``finetune``, ``joint``): ``gaussian``,
    ``N(0, prior_scale^2)``, or ``mixture``, Blundell's
    ``mixture_pi N(0, mixture_sigma1^2) + (1 - mixture_pi) N(0, mixture_sigma2^2)``. Under
    ``transfer`` B's prior is the Gaussian built from q_A whatever the prior on A.

    Optimisation: Adam at ``lr`` for the guides' locations and ``scale_lr`` for their widths
    (:func:`~pyro_bbt.guides.guide_parameter_groups`), uniform KL weights ``1/M`` per minibatch.
    q_A is fitted in minibatches of ``batch_size_a`` (``None``: ``batch_size``); it starts at
    ``lr_a`` (``None``: ``lr``) and the stopping rule multiplies both rates by ``lr_factor`` up to
    ``lr_drops`` times, each time the criteria hold, before it stops. Fast progress first, then a
    step small enough to resolve the narrow widths that transfer copies; large minibatches
    because a step's cost grows far slower than its batch on CPU
    (``python -m pyro_bbt.studies convergence``). Every method trains on B in minibatches of
    ``batch_size`` at ``lr``/``scale_lr``: Adam moves each parameter by about ``lr`` per step, and
    a larger step jitters the weights that q_A pins down (q_A's narrowest widths are a few
    thousandths) out of their prior.
    EWC's deterministic nets train at ``ewc_lr`` (Adam's usual 1e-3 for a plain MLP).
    """

    task_a: tuple[int, ...] = (0, 1, 2, 3, 4)
    task_b: tuple[int, ...] = (5, 6, 7, 8, 9)
    methods: tuple[str, ...] = METHODS
    guide: str = "meanfield"
    estimator: str = "auto"
    kl_schedule: str = "uniform"
    hidden: tuple[int, ...] = (400, 400)
    prior: str = "gaussian"
    prior_scale: float = 1.0
    mixture_pi: float = 0.5
    mixture_sigma1: float = 1.0
    mixture_sigma2: float = math.exp(-6)
    init_scale: float = 0.01
    tau: float = 1.0
    q_init: str = "from-posterior"
    head: str = "shared"
    epochs_a: int = 5
    max_epochs_a: int | None = 300
    window: int = 5
    rel_tol: float = 1e-2
    scale_tol: float = 0.02
    epochs: int = 5
    min_steps: int = 200
    fractions: tuple[float, ...] = (0.01, 0.1, 0.5, 1.0)
    seeds: tuple[int, ...] = (0, 1, 2)
    lr: float = 1e-3
    lr_a: float | None = 1e-2
    lr_drops: int = 3
    lr_factor: float = 0.3
    scale_lr: float | None = 3e-2
    ewc_lr: float = 1e-3
    batch_size: int = 128
    batch_size_a: int | None = 2048
    num_particles: int = 1
    ewc_lambda: float = 100.0
    fisher_samples: int = 2000
    eval_samples: int = 32
    curve_samples: int = 4
    curve_points: int = 10
    limit_train: int | None = None
    limit_eval: int | None = None
    device: str = "cpu"

    def __post_init__(self) -> None:
        self.task_a, self.task_b = Task(digits=self.task_a).digits, Task(digits=self.task_b).digits
        overlap = sorted(set(self.task_a) & set(self.task_b))
        if overlap:
            raise ValueError(f"tasks A and B share digits {overlap}; split MNIST needs disjoint digit sets")
        if len(self.task_a) != len(self.task_b):
            raise ValueError(f"tasks A and B must have as many classes, got {len(self.task_a)} and {len(self.task_b)}")
        self.methods = tuple(_choice("method", m, METHODS) for m in self.methods)
        if not self.methods:
            raise ValueError(f"methods must name at least one of {', '.join(METHODS)}")
        _choice("guide", self.guide, GUIDES)
        _choice("estimator", self.estimator, ESTIMATORS + ("auto",))
        validate_schedule(self.kl_schedule)
        _choice("q-init", self.q_init, Q_INITS)
        _choice("head", self.head, HEADS)
        _choice("prior", self.prior, PRIORS)
        self.fractions = tuple(float(f) for f in self.fractions)
        for f in self.fractions:
            if not 0.0 < f <= 1.0:
                raise ValueError(f"fraction must be in (0, 1], got {f!r}")
        self.seeds = tuple(self.seeds)
        for s in self.seeds:
            if not isinstance(s, int) or s < 0:
                raise ValueError(f"seeds must be non-negative integers, got {s!r}")
        if not self.fractions or not self.seeds:
            raise ValueError("fractions and seeds must each list at least one value")
        self.hidden = tuple(int(h) for h in self.hidden)
        if self.lr_a is not None and not (math.isfinite(self.lr_a) and self.lr_a > 0):
            raise ValueError(f"lr-a must be a finite number > 0, got {self.lr_a!r}")
        if not isinstance(self.lr_drops, int) or self.lr_drops < 0:
            raise ValueError(f"lr-drops must be an integer >= 0, got {self.lr_drops!r}")
        if not (isinstance(self.lr_factor, (int, float)) and 0 < self.lr_factor < 1):
            raise ValueError(f"lr-factor must lie in (0, 1), got {self.lr_factor!r}")
        if self.batch_size_a is not None and (not isinstance(self.batch_size_a, int) or self.batch_size_a < 1):
            raise ValueError(f"batch-size-a must be None or an integer >= 1, got {self.batch_size_a!r}")
        for name in ("prior_scale", "init_scale", "lr", "ewc_lr", "ewc_lambda", "mixture_sigma1", "mixture_sigma2", "rel_tol", "scale_tol"):
            value = getattr(self, name)
            if not (math.isfinite(value) and value >= 0) or (name != "ewc_lambda" and value == 0):
                raise ValueError(f"{name.replace('_', '-')} must be a finite number > 0, got {value!r}")
        if not (math.isfinite(self.tau) and self.tau >= 1):
            raise ValueError(f"tau (prior broadening) must be finite and >= 1, got {self.tau!r}")
        if self.scale_lr is not None and not (math.isfinite(self.scale_lr) and self.scale_lr > 0):
            raise ValueError(f"scale-lr must be a finite number > 0, got {self.scale_lr!r}")
        if not 0.0 < self.mixture_pi < 1.0:
            raise ValueError(f"mixture-pi must lie in (0, 1), got {self.mixture_pi!r}")
        if self.max_epochs_a is not None and (not isinstance(self.max_epochs_a, int) or self.max_epochs_a < self.epochs_a):
            raise ValueError(f"max-epochs-a must be none or an integer >= epochs-a ({self.epochs_a}), got {self.max_epochs_a!r}")
        for name in ("window", "epochs_a", "epochs", "min_steps", "batch_size", "num_particles", "fisher_samples", "eval_samples", "curve_samples", "curve_points"):
            value = getattr(self, name)
            if not isinstance(value, int) or value < 1:
                raise ValueError(f"{name.replace('_', '-')} must be an integer >= 1, got {value!r}")
        for name in ("limit_train", "limit_eval"):
            value = getattr(self, name)
            if value is not None and (not isinstance(value, int) or value < 1):
                raise ValueError(f"{name.replace('_', '-')} must be None or an integer >= 1, got {value!r}")

        if self.estimator == "local" and self.guide != "meanfield":
            raise ValueError(f"estimator 'local' needs the guide 'meanfield', got guide {self.guide!r}")
        starts_from_a = "finetune" in self.methods or ("transfer" in self.methods and self.q_init == "from-posterior")
        if self.head == "multihead" and starts_from_a and self.guide not in ("normal", "meanfield", "delta"):
            raise ValueError(f"head 'multihead' with q_B started from q_A supports the guides normal, meanfield and delta, not {self.guide!r}")
        try:
            device = torch.device(self.device)
        except RuntimeError:
            raise ValueError(f"unknown device {self.device!r}; use e.g. cpu or cuda") from None
        if device.type == "cuda" and not torch.cuda.is_available():
            raise ValueError(f"device {self.device!r} asked for, but CUDA is not available here; use cpu")

    def check_data(self) -> None:
        """Raise ``ValueError`` now if a fraction leaves a digit of B without training images,
        rather than after task A has been trained."""
        load_task(Task(digits=self.task_b, fraction=min(self.fractions), seed=self.seeds[0], name="B"))

    def base_prior(self) -> Prior:
        """The prior of every fit that does not start from q_A's: Gaussian or scale mixture."""
        if self.prior == "mixture":
            return ScaleMixturePrior(self.mixture_pi, self.mixture_sigma1, self.mixture_sigma2)
        return GaussianPrior(self.prior_scale)

    @property
    def base_prior_std(self) -> float:
        """Marginal standard deviation of :meth:`base_prior` (a new head's prior under transfer)."""
        return self.base_prior().stddev if self.prior == "mixture" else self.prior_scale

    @property
    def stopping_rule(self) -> StoppingRule:
        """The rule that judges every fit and, with ``max_epochs_a`` set, stops task A's."""
        cap = self.max_epochs_a if self.max_epochs_a is not None else self.epochs_a
        return StoppingRule(max_epochs=cap, min_epochs=self.epochs_a, window=self.window, rel_tol=self.rel_tol, scale_tol=self.scale_tol,
                            lr_drops=self.lr_drops, lr_factor=self.lr_factor)

    @property
    def a_batch_size(self) -> int:
        """q_A's minibatch size: ``batch_size_a``, or ``batch_size`` when that is ``None``."""
        return self.batch_size if self.batch_size_a is None else self.batch_size_a

    @property
    def sizes(self) -> tuple[int, ...]:
        return (784, *self.hidden, len(self.task_a))

    @property
    def num_heads(self) -> int:
        return 2 if self.head == "multihead" else 1

    @property
    def b_head(self) -> int:
        """Output head of task B: A's head (0) when shared, a head of its own otherwise."""
        return self.num_heads - 1

    def to_dict(self) -> dict:
        return asdict(self)


PRESETS: dict[str, dict] = {
    # Every method on real MNIST, one seed, little data: a smoke run of the whole protocol.
    "quick": dict(epochs_a=1, max_epochs_a=None, batch_size_a=None, epochs=1, min_steps=50, fractions=(0.01, 0.1), seeds=(0,), eval_samples=16, curve_points=4, limit_eval=2000),
    # The full protocol.
    "paper": dict(epochs_a=5, epochs=5, min_steps=200, fractions=(0.01, 0.1, 0.5, 1.0), seeds=(0, 1, 2)),
}


# --------------------------------------------------------------------------- data


@dataclass
class _Tasks:
    a: TaskData
    b: TaskData


def _limit(split: Split, n: int | None) -> Split:
    return split if n is None else split.subset(n)


def _load(config: ExperimentConfig, fraction: float, seed: int) -> _Tasks:
    a = load_task(Task(digits=config.task_a, seed=seed, name="A"))
    b = load_task(Task(digits=config.task_b, fraction=fraction, seed=seed, name="B"))
    out = []
    for data in (a, b):
        out.append(
            TaskData(
                task=data.task,
                train=_limit(data.train, config.limit_train).to(config.device),
                val=_limit(data.val, config.limit_eval).to(config.device),
                test=_limit(data.test, config.limit_eval).to(config.device),
            )
        )
    return _Tasks(*out)


def steps_for(num_examples: int, epochs: int, batch_size: int, min_steps: int = 1) -> int:
    """The step budget: ``epochs`` passes over the data, or more if that is under ``min_steps``,
    rounded up to whole passes, ``M * max(epochs, ceil(min_steps / M))`` with
    ``M = ceil(num_examples / batch_size)``. Whole passes because a KL schedule's weights sum
    to one over a pass: a run cut mid-pass pays that pass's KL on part of its data."""
    per_epoch = math.ceil(num_examples / batch_size)
    return per_epoch * max(epochs, math.ceil(min_steps / per_epoch))


# --------------------------------------------------------------------------- Bayesian units


@dataclass
class _Run:
    """Where a run keeps its progress (``store=None``: nowhere, nothing is resumable)."""

    store: RunStore | None = None


def _train_config(config: ExperimentConfig, steps: int | None, seed: int, stopping: StoppingRule | None = None, lr: float | None = None,
                  batch_size: int | None = None) -> TrainConfig:
    """B's fixed budget of ``steps``, or (``steps=None``) up to ``stopping``'s cap by its rule;
    at ``lr`` (default ``config.lr``) and ``config.scale_lr``, in minibatches of ``batch_size``
    (default ``config.batch_size``)."""
    return TrainConfig(
        steps=steps,
        stopping=stopping,
        batch_size=config.batch_size if batch_size is None else batch_size,
        lr=config.lr if lr is None else lr,
        scale_lr=config.scale_lr,
        num_particles=config.num_particles,
        estimator=config.estimator,
        kl_schedule=config.kl_schedule,
        seed=seed,
        eval_samples=0,
        progress=False,
    )


def _fresh_bayesian(config: ExperimentConfig, prior: Prior, seed: int):
    """A new model and guide with initialised parameters; clears Pyro's param store first, so
    no parameter is shared with an earlier guide of the same name."""
    pyro.clear_param_store()
    pyro.set_rng_seed(seed)
    model = BayesianMLP(config.sizes, prior, num_heads=config.num_heads).to(config.device)
    guide = make_guide(config.guide, model, GuideConfig(init_scale=config.init_scale))
    initialize_guide(guide, model.sizes[0])
    return model, guide


def _curve_epochs(total_steps: int, steps_per_epoch: int, points: int) -> set[int]:
    num_epochs = math.ceil(total_steps / steps_per_epoch)
    return {int(round(e)) for e in np.linspace(1, num_epochs, min(points, num_epochs))}


def _use_head(model: BayesianMLP, head: int | None) -> None:
    if model.num_heads > 1:
        model.head = head


def _bayes_metrics(model, guide, split: Split, samples: int, head: int) -> PredictiveMetrics:
    """Posterior-predictive metrics on ``split`` through output ``head``."""
    _use_head(model, head)
    return evaluate(model, guide, split.x, split.y, num_samples=samples)


def _train_with_checkpoints(model, guide, train_split: Split, train_config: TrainConfig, run: _Run, key: str, extra: dict, on_epoch=None):
    """``train`` that saves a checkpoint after every epoch under ``key`` and, when one exists,
    continues from it; ``extra`` (for example a learning curve) is saved and restored with it."""
    resume = None
    saved = run.store.checkpoint(key) if run.store is not None else None
    if saved is not None:
        resume = TrainState.from_dict(saved["train_state"])
        for name, value in saved["extra"].items():
            extra[name][:] = value

    def save(state: TrainState) -> None:
        run.store.save_checkpoint(key, {"train_state": state.to_dict(), "extra": extra})

    on_checkpoint = save if run.store is not None else None
    return train(model, guide, train_split, train_config, on_epoch=on_epoch, on_checkpoint=on_checkpoint, resume=resume)


def _train_bayesian(config, model, guide, train_split: Split, steps: int, seed: int, tasks: _Tasks, head: int | None, run: _Run, key: str) -> tuple[list, list, dict]:
    """Train through output ``head`` for ``steps``, record B's learning curve at evenly spaced
    epochs, and judge the fit by the stopping rule (which does not stop it: B's budget is the
    same for every method)."""
    steps_per_epoch = math.ceil(len(train_split) / config.batch_size)
    record_at = _curve_epochs(steps, steps_per_epoch, config.curve_points)
    curve: list[dict] = []

    def on_epoch(diag: EpochDiagnostics) -> None:
        if diag.epoch in record_at:
            curve.append(
                {
                    "epoch": diag.epoch,
                    "step": diag.steps,
                    "b_val_accuracy": _bayes_metrics(model, guide, tasks.b.val, config.curve_samples, config.b_head).accuracy,
                    "b_test_accuracy": _bayes_metrics(model, guide, tasks.b.test, config.curve_samples, config.b_head).accuracy,
                }
            )
            _use_head(model, head)

    _use_head(model, head)
    history = _train_with_checkpoints(model, guide, train_split, _train_config(config, steps, seed), run, key, {"curve": curve}, on_epoch)
    _use_head(model, head)
    rule = replace(config.stopping_rule, min_epochs=1, lr_drops=0)
    convergence = assess_convergence(history.to_records(), rule, uninformed_scale_ratio(guide, model, train_split.x))
    return curve, history.to_records(), convergence.to_dict()


@dataclass
class _StageA:
    """What the sequential methods need from task A for one seed."""

    guide_state: dict
    prior_from_a: Prior
    a_test: PredictiveMetrics
    b_test_before: PredictiveMetrics
    b_random_init: float
    steps: int
    history: list
    convergence: dict

    def to_saved(self) -> dict:
        return {
            "guide_state": self.guide_state,
            "prior": prior_state(self.prior_from_a),
            "a_test": self.a_test.to_dict(),
            "b_test_before": self.b_test_before.to_dict(),
            "b_random_init": self.b_random_init,
            "steps": self.steps,
            "history": self.history,
            "convergence": self.convergence,
        }

    @classmethod
    def from_saved(cls, saved: dict) -> "_StageA":
        return cls(
            guide_state=saved["guide_state"],
            prior_from_a=prior_from_state(saved["prior"]),
            a_test=PredictiveMetrics(**saved["a_test"]),
            b_test_before=PredictiveMetrics(**saved["b_test_before"]),
            b_random_init=saved["b_random_init"],
            steps=saved["steps"],
            history=saved["history"],
            convergence=saved["convergence"],
        )


def _fit_task_a(config: ExperimentConfig, tasks: _Tasks, seed: int, run: _Run | None = None) -> _StageA:
    run = run or _Run()
    key = f"A-bayesian-s{seed}"
    saved = run.store.stage(key) if run.store is not None else None
    if saved is not None:
        return _StageA.from_saved(saved)
    model, guide = _fresh_bayesian(config, config.base_prior(), seed)
    b_random_init = [_bayes_metrics(model, guide, tasks.b.test, config.eval_samples, config.b_head).accuracy]
    lr_a = config.lr if config.lr_a is None else config.lr_a
    batch_a = config.a_batch_size
    if config.max_epochs_a is None:
        train_config = _train_config(config, steps_for(len(tasks.a.train), config.epochs_a, batch_a), seed, lr=lr_a, batch_size=batch_a)
    else:
        train_config = _train_config(config, None, seed, stopping=config.stopping_rule, lr=lr_a, batch_size=batch_a)
    _use_head(model, 0)
    history = _train_with_checkpoints(model, guide, tasks.a.train, train_config, run, key, {"b_random_init": b_random_init})
    convergence = assess_convergence(
        history.to_records(), config.stopping_rule, uninformed_scale_ratio(guide, model, tasks.a.train.x), config.max_epochs_a
    )
    prior_from_a = posterior_as_prior(guide, model, config.tau, fallback=config.base_prior())
    if config.head == "multihead":
        # B's head has seen no data: its prior stays the base prior's width rather than q_A's leftovers.
        rows = model.head_rows(config.b_head)
        for site in model.output_sites:
            prior_from_a.loc(site)[rows] = 0.0
            prior_from_a.scale(site)[rows] = config.base_prior_std
    stage = _StageA(
        guide_state={k: v.detach().clone() for k, v in guide.state_dict().items()},
        prior_from_a=prior_from_a,
        a_test=_bayes_metrics(model, guide, tasks.a.test, config.eval_samples, 0),
        b_test_before=_bayes_metrics(model, guide, tasks.b.test, config.eval_samples, config.b_head),
        b_random_init=b_random_init[0],
        steps=history.epochs[-1].steps,
        history=history.to_records(),
        convergence=convergence.to_dict(),
    )
    if run.store is not None:
        run.store.save_stage(key, stage.to_saved())
    return stage


def _start_from_posterior(config: ExperimentConfig, model: BayesianMLP, guide, state_a: dict) -> None:
    """Set q_B = q_A. With a multi-head network, B's head keeps its fresh initialisation: under
    task A it was only ever pulled towards the prior."""
    fresh = {k: v.detach().clone() for k, v in guide.state_dict().items()}
    guide.load_state_dict(state_a)
    if config.head != "multihead":
        return
    rows = model.head_rows(config.b_head)
    merged = guide.state_dict()
    for key, value in merged.items():
        if any(site in key for site in model.output_sites):
            value[rows] = fresh[key][rows]
    guide.load_state_dict(merged)


def _run_bayesian_b(config, method: str, tasks: _Tasks, stage_a: _StageA | None, steps: int, seed: int, run: _Run | None = None, key: str = "") -> dict:
    prior = stage_a.prior_from_a if method == "transfer" else config.base_prior()
    model, guide = _fresh_bayesian(config, prior, seed)
    start_from_a = method == "finetune" or (method == "transfer" and config.q_init == "from-posterior")
    if start_from_a:
        _start_from_posterior(config, model, guide, stage_a.guide_state)
    curve, history, convergence = _train_bayesian(config, model, guide, tasks.b.train, steps, seed, tasks, config.b_head, run or _Run(), key)
    return {
        "b_test": _bayes_metrics(model, guide, tasks.b.test, config.eval_samples, config.b_head),
        "a_test_after": _bayes_metrics(model, guide, tasks.a.test, config.eval_samples, 0),
        "curve": curve,
        "history": history,
        "convergence": convergence,
    }


def _run_joint(config, tasks: _Tasks, steps: int, seed: int, run: _Run, key: str) -> dict:
    model, guide = _fresh_bayesian(config, config.base_prior(), seed)
    # Multi-head: one softmax over both heads' outputs, B's labels shifted past A's; each task
    # is then evaluated through its own head.
    offset = config.b_head * len(config.task_a)
    both = Split(torch.cat([tasks.a.train.x, tasks.b.train.x]), torch.cat([tasks.a.train.y, tasks.b.train.y + offset]))
    curve, history, convergence = _train_bayesian(config, model, guide, both, steps, seed, tasks, None, run, key)
    return {
        "b_test": _bayes_metrics(model, guide, tasks.b.test, config.eval_samples, config.b_head),
        "a_test_after": _bayes_metrics(model, guide, tasks.a.test, config.eval_samples, 0),
        "curve": curve,
        "history": history,
        "convergence": convergence,
    }


# --------------------------------------------------------------------------- EWC


class _HeadView(torch.nn.Module):
    """The logits of one output head of a deterministic multi-head MLP (all outputs if single-head)."""

    def __init__(self, net: MLP, rows: slice) -> None:
        super().__init__()
        self.net = net
        self.rows = rows

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)[..., self.rows]


def _head_view(config: ExperimentConfig, net: MLP, head: int) -> _HeadView:
    width = len(config.task_a)
    return _HeadView(net, slice(head * width, (head + 1) * width))


def _check_finite(net: torch.nn.Module, losses: list[float], x_probe: torch.Tensor, what: str, lr: float) -> None:
    """Raise :class:`NonFiniteLossError` if training produced a non-finite loss, parameter or output."""
    bad_steps = [step for step, loss in enumerate(losses, start=1) if not math.isfinite(loss)]
    bad = [name for name, value in net.named_parameters() if not torch.isfinite(value).all()]
    with torch.no_grad():
        outputs_finite = bool(torch.isfinite(net(x_probe)).all())
    if bad_steps or bad or not outputs_finite:
        first = f"loss non-finite from step {bad_steps[0]}" if bad_steps else ("finite losses" if outputs_finite else "outputs overflow")
        raise NonFiniteLossError(
            f"{what}: {first}; non-finite parameters: {', '.join(bad) or 'none'}; try a lower learning rate (now {lr})"
        )


def _net_metrics(net: torch.nn.Module, split: Split) -> PredictiveMetrics:
    net.eval()
    with torch.no_grad():
        log_probs = torch.log_softmax(net(split.x), dim=-1)
    net.train()
    return metrics_from_log_probs(log_probs, split.y)


@dataclass
class _StageAEWC:
    net: MLP
    penalty: EWCPenalty
    a_test: PredictiveMetrics
    b_test_before: PredictiveMetrics
    b_random_init: float


def _fit_task_a_ewc(config: ExperimentConfig, tasks: _Tasks, steps: int, seed: int, run: _Run | None = None) -> _StageAEWC:
    """The deterministic net on A and its Fisher; restarts from scratch if interrupted (it is short)."""
    run = run or _Run()
    key = f"A-ewc-s{seed}"
    torch.manual_seed(seed)
    net = MLP((*config.sizes[:-1], config.sizes[-1] * config.num_heads)).to(config.device)
    on_a, on_b = _head_view(config, net, 0), _head_view(config, net, config.b_head)
    saved = run.store.stage(key) if run.store is not None else None
    if saved is None:
        b_random_init = _net_metrics(on_b, tasks.b.test).accuracy
        losses = train_deterministic(on_a, tasks.a.train.x, tasks.a.train.y, DeterministicTrainConfig(config.ewc_lr, config.batch_size, steps, seed))
        _check_finite(on_a, losses, tasks.a.train.x[:256], "deterministic net on task A", config.ewc_lr)
        generator = torch.Generator(device=config.device).manual_seed(seed)
        fisher = fisher_diagonal(on_a, tasks.a.train.x[: config.fisher_samples], generator=generator)
        saved = {"net": {k: v.detach().clone() for k, v in net.state_dict().items()}, "fisher": fisher, "b_random_init": b_random_init}
        if run.store is not None:
            run.store.save_stage(key, saved)
    net.load_state_dict(saved["net"])
    return _StageAEWC(
        net=net,
        penalty=EWCPenalty(on_a, saved["fisher"], config.ewc_lambda),
        a_test=_net_metrics(on_a, tasks.a.test),
        b_test_before=_net_metrics(on_b, tasks.b.test),
        b_random_init=saved["b_random_init"],
    )


def _run_ewc_b(config, tasks: _Tasks, stage: _StageAEWC, steps: int, seed: int) -> dict:
    pyro.set_rng_seed(seed)
    net = copy.deepcopy(stage.net)
    on_a, on_b = _head_view(config, net, 0), _head_view(config, net, config.b_head)
    steps_per_epoch = math.ceil(len(tasks.b.train) / config.batch_size)
    record_at = _curve_epochs(steps, steps_per_epoch, config.curve_points)
    curve: list[dict] = []

    def on_epoch(epoch_index: int, current: torch.nn.Module) -> None:
        epoch = epoch_index + 1
        if epoch in record_at or epoch * steps_per_epoch >= steps:
            if curve and curve[-1]["epoch"] == epoch:
                return
            curve.append(
                {
                    "epoch": epoch,
                    "step": min(epoch * steps_per_epoch, steps),
                    "b_val_accuracy": _net_metrics(current, tasks.b.val).accuracy,
                    "b_test_accuracy": _net_metrics(current, tasks.b.test).accuracy,
                }
            )

    losses = train_deterministic(
        on_b, tasks.b.train.x, tasks.b.train.y, DeterministicTrainConfig(config.ewc_lr, config.batch_size, steps, seed), stage.penalty, on_epoch
    )
    _check_finite(on_b, losses, tasks.b.train.x[:256], "EWC on task B", config.ewc_lr)
    return {
        "b_test": _net_metrics(on_b, tasks.b.test),
        "a_test_after": _net_metrics(on_a, tasks.a.test),
        "curve": curve,
        "history": [{"step": i + 1, "loss": loss} for i, loss in enumerate(losses) if (i + 1) % steps_per_epoch == 0 or i + 1 == steps],
    }


# --------------------------------------------------------------------------- the protocol


def _unit_record(method: str, fraction: float, seed: int, steps: int, outcome: dict, stage, seconds: float) -> dict:
    record = {
        "method": method,
        "fraction": fraction,
        "seed": seed,
        "steps": steps,
        "status": "ok",
        "b_test": outcome["b_test"].to_dict(),
        "a_test_after": outcome["a_test_after"].to_dict(),
        "accuracy_matrix": None,
        "backward_transfer": None,
        "forward_transfer": None,
        "curve": outcome["curve"],
        "history": outcome["history"],
        "convergence": outcome.get("convergence"),
        "prior_converged": stage.convergence["converged"] if method == "transfer" else None,
        "seconds": seconds,
    }
    if stage is not None:
        R = [
            [stage.a_test.accuracy, stage.b_test_before.accuracy],
            [outcome["a_test_after"].accuracy, outcome["b_test"].accuracy],
        ]
        record["accuracy_matrix"] = R
        record["backward_transfer"] = backward_transfer(R)
        record["forward_transfer"] = forward_transfer(R, [0.0, stage.b_random_init])
    return record


def _mean_std(values: list[float]) -> dict:
    return {"mean": float(np.mean(values)), "std": float(sample_std(values)), "n": len(values)}


def summarize_units(units: list[dict]) -> dict:
    """Mean and standard deviation over seeds, per method and fraction."""
    summary: dict = {}
    for unit in units:
        if unit["status"] != "ok":
            continue
        summary.setdefault(unit["method"], {}).setdefault(str(unit["fraction"]), []).append(unit)
    out: dict = {}
    for method, by_fraction in summary.items():
        out[method] = {}
        for fraction, group in by_fraction.items():
            entry = {
                "b_test_accuracy": _mean_std([u["b_test"]["accuracy"] for u in group]),
                "b_test_nll": _mean_std([u["b_test"]["nll"] for u in group]),
                "b_test_ece": _mean_std([u["b_test"]["ece"] for u in group]),
                "a_test_after_accuracy": _mean_std([u["a_test_after"]["accuracy"] for u in group]),
            }
            if group[0]["backward_transfer"] is not None:
                entry["backward_transfer"] = _mean_std([u["backward_transfer"] for u in group])
                entry["forward_transfer"] = _mean_std([u["forward_transfer"] for u in group])
            out[method][fraction] = entry
    return out


def _failed_record(method: str, fraction: float, seed: int, steps: int, error: str) -> dict:
    return {
        "method": method, "fraction": fraction, "seed": seed, "steps": steps, "status": "failed", "error": error,
        "b_test": None, "a_test_after": None, "accuracy_matrix": None, "backward_transfer": None,
        "forward_transfer": None, "curve": [], "history": [], "convergence": None, "prior_converged": None, "seconds": 0.0,
    }


def unit_key(method: str, fraction: float, seed: int) -> str:
    return f"{method}-f{fraction:g}-s{seed}"


def _not_converged_warning(seed: int, convergence: dict) -> str:
    drift = convergence["last_scale_drift"] or {}
    gain, ratio = convergence["elbo_gain"], convergence["uninformed_scale_ratio"]
    return (
        f"seed {seed}: q_A is NOT converged after {convergence['epochs']} epochs "
        f"(relative ELBO gain over the last {convergence['rule']['window']} epochs {'n/a' if gain is None else f'{gain:.2e}'}, "
        f"largest median-sigma drift in the last epoch {max(drift.values(), default=float('nan')):.3f}, "
        f"uninformed-weight sigma ratio {'n/a' if ratio is None else f'{ratio:.3f}'}); "
        "the transfer results of this seed rest on an unconverged posterior"
    )


def run_experiment(
    config: ExperimentConfig,
    log: Callable[[str], None] = print,
    store: RunStore | None = None,
    warn: Callable[[str], None] | None = None,
) -> dict:
    """Run the whole protocol and return the results (the content of ``results.json``).

    With a ``store``, every finished unit and task-A stage is saved as it completes and every
    epoch is checkpointed, and whatever the store already holds is reused: a rerun resumes.
    A unit whose loss or parameters become non-finite is recorded with ``status: "failed"``
    and its error; the others go on. A q_A that the stopping rule does not call converged is
    reported through ``warn`` (default: ``log``) when ``transfer`` will use it, and listed
    under ``"warnings"``.
    """
    warn = warn or log
    run = _Run(store)
    units: list[dict] = []
    stages_a: list[dict] = []
    warnings: list[str] = []
    for seed in config.seeds:
        full = _load(config, 1.0, seed)
        stage_a = stage_ewc = None
        failure_a = ""
        steps_a = steps_for(len(full.a.train), config.epochs_a, config.batch_size)
        if any(m in config.methods for m in ("transfer", "finetune")):
            start = time.perf_counter()
            try:
                stage_a = _fit_task_a(config, full, seed, run)
            except NonFiniteLossError as error:
                failure_a = f"task A failed: {error}"
                log(f"seed {seed}: {failure_a}")
            else:
                verdict = stage_a.convergence
                log(
                    f"seed {seed}: task A fitted in {time.perf_counter() - start:.1f} s, {verdict['epochs']} epochs, "
                    f"{'converged' if verdict['converged'] else 'not converged'}, uninformed sigma ratio "
                    f"{verdict['uninformed_scale_ratio']}, test accuracy {stage_a.a_test.accuracy:.4f}"
                )
                if "transfer" in config.methods and not verdict["converged"]:
                    warnings.append(_not_converged_warning(seed, verdict))
                    warn("warning: " + warnings[-1])
                stages_a.append(
                    {"seed": seed, "kind": "bayesian", "steps": stage_a.steps, "a_test": stage_a.a_test.to_dict(),
                     "b_test_before": stage_a.b_test_before.to_dict(), "b_random_init_accuracy": stage_a.b_random_init,
                     "convergence": verdict, "history": stage_a.history}
                )
        failure_ewc = ""
        if "ewc" in config.methods:
            try:
                stage_ewc = _fit_task_a_ewc(config, full, steps_a, seed, run)
            except NonFiniteLossError as error:
                failure_ewc = f"task A failed: {error}"
                log(f"seed {seed}: {failure_ewc}")
        if stage_ewc is not None:
            log(f"seed {seed}: deterministic task A net for EWC, test accuracy {stage_ewc.a_test.accuracy:.4f}")
            stages_a.append(
                {"seed": seed, "kind": "deterministic", "steps": steps_a, "a_test": stage_ewc.a_test.to_dict(),
                 "b_test_before": stage_ewc.b_test_before.to_dict(), "b_random_init_accuracy": stage_ewc.b_random_init,
                 "convergence": None, "history": []}
            )
        for fraction in config.fractions:
            tasks = _load(config, fraction, seed)
            steps_b = steps_for(len(tasks.b.train), config.epochs, config.batch_size, config.min_steps)
            for method in config.methods:
                key = unit_key(method, fraction, seed)
                steps = steps_b
                if method == "joint":  # A's and B's budgets, in whole passes over the union
                    steps = steps_for(len(tasks.a.train) + len(tasks.b.train), 1, config.batch_size, steps_a + steps_b)
                unit = store.record(key) if store is not None else None
                if unit is None:
                    failure = failure_ewc if method == "ewc" else failure_a
                    unit = _run_unit(config, method, fraction, seed, steps, tasks, stage_a, stage_ewc, failure, run, key)
                    if store is not None:
                        store.save_record(key, unit)
                units.append(unit)
                if unit["status"] == "ok":
                    log(
                        f"seed {seed} fraction {fraction:g} {method:>8}: B acc {unit['b_test']['accuracy']:.4f}, "
                        f"A acc after B {unit['a_test_after']['accuracy']:.4f}, {steps} steps, {unit['seconds']:.1f} s"
                    )
                else:
                    log(f"seed {seed} fraction {fraction:g} {method:>8}: FAILED: {unit['error']}")
    return {
        "schema_version": 2,
        "config": config.to_dict(),
        "warnings": warnings,
        "task_a": stages_a,
        "units": units,
        "summary": summarize_units(units),
    }


def _run_unit(config, method, fraction, seed, steps, tasks, stage_a, stage_ewc, failure, run, key) -> dict:
    if (method in ("transfer", "finetune") and stage_a is None) or (method == "ewc" and stage_ewc is None):
        return _failed_record(method, fraction, seed, steps, failure)
    start = time.perf_counter()
    try:
        if method == "ewc":
            outcome, stage = _run_ewc_b(config, tasks, stage_ewc, steps, seed), stage_ewc
        elif method == "joint":
            outcome, stage = _run_joint(config, tasks, steps, seed, run, key), None
        else:
            outcome = _run_bayesian_b(config, method, tasks, stage_a, steps, seed, run, key)
            stage = stage_a if method != "scratch" else None
    except NonFiniteLossError as error:
        return _failed_record(method, fraction, seed, steps, str(error))
    return _unit_record(method, fraction, seed, steps, outcome, stage, time.perf_counter() - start)


# --------------------------------------------------------------------------- sequential mode

SEQUENCES = ("rotations", "permutations")
SEQUENCE_METHODS = ("transfer", "finetune")
SEQUENCE_LENGTH = 4


def sequence_tasks(kind: str, digits: tuple[int, ...], seed: int) -> list[Task]:
    """The chain A -> B -> C -> D over the same digits: rotated by 0, 15, 30, 45 degrees (as the
    original), or with pixel permutations (task 0 unpermuted)."""
    _choice("sequence", kind, SEQUENCES)
    if kind == "rotations":
        return [Task(digits=digits, rotation=15.0 * k, seed=seed, name=f"rot{15 * k}") for k in range(SEQUENCE_LENGTH)]
    return [Task(digits=digits, permutation_seed=None if k == 0 else 1000 + k, seed=seed, name=f"perm{k}") for k in range(SEQUENCE_LENGTH)]


def run_sequence(config: ExperimentConfig, kind: str, log: Callable[[str], None] = print) -> dict:
    """Train the chain of :func:`sequence_tasks` in order with each Bayesian sequential method
    (``transfer``: every task's prior is the previous posterior and q starts there, as in
    variational continual learning; ``finetune``: q starts at the previous posterior, the prior
    stays the base prior), and fill the accuracy matrix ``R[i][j]`` after every task. Forward
    transfer is measured against the randomly initialised model's accuracy on each task.
    Every task trains for B's fixed budget at ``lr``/``scale_lr``: this mode does not fit its
    posteriors by the stopping rule and records no convergence verdict, so what it transfers is
    not shown converged. The units of this mode are not checkpointed; the run restarts if
    interrupted."""
    methods = [m for m in config.methods if m in SEQUENCE_METHODS]
    if not methods:
        raise ValueError(f"sequential mode runs the methods {', '.join(SEQUENCE_METHODS)}; got {', '.join(config.methods)}")
    per_method: dict[str, list] = {m: [] for m in methods}
    for seed in config.seeds:
        tasks = [load_task(t) for t in sequence_tasks(kind, config.task_a, seed)]
        trains = [_limit(t.train, config.limit_train).to(config.device) for t in tasks]
        tests = [_limit(t.test, config.limit_eval).to(config.device) for t in tasks]
        for method in methods:
            prior: Prior = config.base_prior()
            state = None
            R = np.zeros((len(tasks), len(tasks)))
            baseline = None
            for i, train_split in enumerate(trains):
                model, guide = _fresh_bayesian(config, prior, seed)
                if baseline is None:
                    baseline = [_bayes_metrics(model, guide, test, config.eval_samples, 0).accuracy for test in tests]
                if state is not None:
                    guide.load_state_dict(state)
                steps = steps_for(len(train_split), config.epochs, config.batch_size, config.min_steps)
                try:
                    train(model, guide, train_split, _train_config(config, steps, seed))
                except NonFiniteLossError as error:
                    log(f"seed {seed} {method}: task {i} failed: {error}")
                    R[i:, :] = np.nan
                    break
                R[i] = [_bayes_metrics(model, guide, test, config.eval_samples, 0).accuracy for test in tests]
                state = {k: v.detach().clone() for k, v in guide.state_dict().items()}
                if method == "transfer":
                    prior = posterior_as_prior(guide, model, config.tau, fallback=config.base_prior())
                log(f"seed {seed} {kind} {method}: after task {i}: " + " ".join(f"{a:.3f}" for a in R[i]))
            entry = {"seed": seed, "accuracy_matrix": R.tolist(), "random_init_accuracy": baseline}
            if not np.isnan(R).any():
                entry["summary"] = summarize(R, baseline).to_dict()
            per_method[method].append(entry)
    return {
        "schema_version": 1,
        "mode": "sequence",
        "sequence": kind,
        "domains": [t.name for t in sequence_tasks(kind, config.task_a, 0)],
        "config": config.to_dict(),
        "methods": {
            m: {
                "per_seed": entries,
                "accuracy_matrix_mean": np.nanmean([e["accuracy_matrix"] for e in entries], axis=0).tolist(),
            }
            for m, entries in per_method.items()
        },
    }
