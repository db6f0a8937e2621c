"""The A -> B experiment's configuration: :class:`ExperimentConfig` (every setting of a run, its
recipes for each fit and the record that ``config.json``, ``results.json`` and the store's hash
hold), the named :data:`PRESETS`, and :data:`LATER_FIELDS` (settings added after runs were
stored, left out of the record at the value those runs had, so they still resume).

The experiment's driver (:mod:`pyro_bbt.experiment`), its plan (:mod:`pyro_bbt.plan`), its units
(:mod:`pyro_bbt.units`) and the sequences (:mod:`pyro_bbt.split_sequence`,
:mod:`pyro_bbt.chain_sequence`) all read it from here.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, replace

import torch

from .convergence import ELBO_TESTS, StoppingRule
from .data import Task, load_task
from .fitting import FitRecipe, new_posterior
from .guides import GUIDES
from .inference import PRECONDITIONERS, check_checkpoint_seconds
from .kl_schedules import validate_schedule
from .objectives import ESTIMATORS
from .priors import GaussianPrior, Prior, ScaleMixturePrior
from .verdict import DEFAULT_TOL_PER_DATUM, OVERRULES, RESCORE_DRAWS, VerdictConfig, check_continuation_base

__all__ = ["METHODS", "Q_INITS", "HEADS", "PRIORS", "FITS_B", "ExperimentConfig", "CONVERGED_FITS", "PRESETS", "LATER_FIELDS", "GRID_FIELDS", "CAP_FIELDS", "PRECISION_FIELDS", "RAISABLE_FIELDS", "RUN_FIELDS"]


METHODS = ("scratch", "transfer", "finetune", "ewc", "joint")
Q_INITS = ("from-posterior", "fresh")
HEADS = ("shared", "multihead")
PRIORS = ("gaussian", "mixture")
FITS_B = ("fixed", "rule")  # B's budget: the same fixed steps for every method, or each Bayesian fit to convergence


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
    ``max_epochs_a`` epochs; with ``max_epochs_a=None``, for exactly ``epochs_a`` epochs. Every
    fit is judged by the convergence verdict (:mod:`pyro_bbt.verdict`): converged when its ELBO
    could gain at most ``verdict_tol`` nats per training example and the blank-pixel check holds;
    under the rule, a fit the verdict does not pass goes on at lower rates (``None``: the rule's
    criteria alone). The deterministic net of EWC and the A share of
    ``joint``'s budget use ``epochs_a`` epochs.

    The prior on A (and on B for ``scratch``, ``finetune``, ``joint``): ``gaussian``,
    ``N(0, prior_scale^2)``, or ``mixture``, Blundell's
    ``mixture_pi N(0, mixture_sigma1^2) + (1 - mixture_pi) N(0, mixture_sigma2^2)``. Under
    ``transfer`` B's prior is the Gaussian built from q_A whatever the prior on A.

    B's Bayesian fits (scratch, transfer, finetune, joint): ``fit_b="fixed"``, the same budget of
    steps for every method (``epochs``, ``min_steps``, at ``lr``); ``"rule"``, each to convergence
    by q_A's rule, rates and verdict (:meth:`recipe_b_converged`), at most ``max_epochs_b`` epochs
    (``None``: q_A's cap), in minibatches of about a tenth of their data (at least 32), or of
    ``batch_size_b`` where set (full batch when that is at least the data). EWC's nets keep the
    fixed budget.

    The rule's ELBO test (``elbo_test``, :class:`~pyro_bbt.convergence.StoppingRule`):
    ``"two-point"`` (``rel_tol`` between two epochs ``window`` apart) or ``"means"`` (two window
    means, two standard errors). What a fit the verdict rejects does (``overrule``, at most
    ``max_overrules`` times, :class:`~pyro_bbt.verdict.VerdictConfig`): ``"drop"`` its rates once
    more, or ``"restart"`` from the first rates. ``confirm_verdict``: a pass counts only when a
    second judgement with noise of its own passes too. ``continuation_epochs`` (``> 0``): a pass
    counts only when the fit, continued for ``max(continuation_epochs, continuation_fraction *
    epochs so far)`` epochs at 0.3 then 0.1 times its first rates, raises its fixed-noise ELBO by
    at most ``verdict_tol`` per example (:class:`~pyro_bbt.verdict.VerdictConfig`);
    ``continuation_rates``: its factors on the first rates, in equal parts (0.3 then 0.1);
    ``continuation_base``: ``(locations' rate, widths' rate)`` that those factors multiply for
    every fit, whatever its own rates (``None``: each fit's first rates), so that the
    confirmation does not depend on the recipe it confirms;
    ``continuation_average``: its end is the average of its epochs at the last factor (tail
    averaging); ``continuation_checks``: how many times a continuation is scored on the way, to
    be rejected as soon as it has certainly gained more than the tolerance (0: off);
    ``continuation_max_draws``: where a continuation's score is too noisy to decide, draws of its
    evaluator are added, doubling, up to this many (0: off); ``rescore_max_draws``: the line
    search's best step scored again with draws of its own, added likewise up to this many (0:
    off; both :class:`~pyro_bbt.verdict.VerdictConfig`);
    ``polish_steps_b``: where the verdict rejects a fit on B (or joint's) at the rule's stop, up
    to this many of the verdict's own full-data steps before it judges again (0: off; q_A's fit
    never takes them, so a task-A stage does not depend on it, :data:`B_ONLY_FIELDS`);
    ``continuation_particles_b``: weight draws per step in the continuations that confirm a pass
    of a fit on B (or joint's), the fit itself keeping ``num_particles``
    (``VerdictConfig.continuation_particles``: would a less noisy step still gain?; ``None``: the
    fit's own; B's fields only, like ``polish_steps_b``).
    ``fast_polish``: those steps (``polish_steps_b > 0``) take their mean gradient in one
    vectorised pass of all its draws and stop the whitening's conjugate gradients at a small
    residual (``VerdictConfig.fast_polish``: the same step in distribution, cheaper where B's data
    are few; B's field only).
    ``precondition_b``: how Adam's step on the locations of every Bayesian fit on B (and joint's)
    is scaled (:attr:`~pyro_bbt.inference.TrainConfig.precondition`; B's field only):
    ``"none"`` (Adam's own, about ``lr`` per coordinate) or ``"prior-scale"`` (each location's
    step times its prior width over the prior's widest: under transfer, the weights q_A
    narrowed move in steps of their width; under a base prior the same steps as ``"none"``).
    ``compile``: every Bayesian fit's Adam steps (the fit's and its continuations', one weight
    draw per step under the ``local`` estimator and a Gaussian prior) run as one function under
    ``torch.compile`` (:class:`~pyro_bbt.objectives.CompiledMeanFieldOps`): the same steps to
    float rounding, each 1.08-1.31x cheaper on this machine, after a compilation of 28-48 s per
    process and minibatch shape (``benchmarks/epoch_cost.py``). Rounding differs, so over a fit of
    thousands of epochs the path differs too: a field of the run, not of how it is run.

    ``kl_beta``: the KL's weight ``beta`` in every Bayesian fit's objective,
    ``E_q log p(D | w) - beta KL(q || p)`` (1: the ELBO; below 1 a tempered posterior, less pruned;
    the rule and the verdict judge that objective). Under ``transfer`` the prior built from a
    tempered posterior may be broadened by ``tau`` (``beta^-1/2`` undoes the narrowing of the
    variances that ``beta`` brings).

    Optimisation: Adam at ``lr`` for the guides' locations and ``scale_lr`` for their widths
    (:func:`~pyro_bbt.guides.guide_parameter_groups`), uniform KL weights ``1/M`` per minibatch.
    q_A is fitted in minibatches of ``batch_size_a`` (``None``: ``batch_size``); it starts at
    ``lr_a`` (``None``: ``lr``) and the stopping rule multiplies both rates by ``lr_factor`` up to
    ``lr_drops`` times, each time the criteria hold, before it stops. Fast progress first, then a
    step small enough to resolve the narrow widths that transfer copies; large minibatches
    because a step's cost grows far slower than its batch on CPU
    (``python -m pyro_bbt.studies convergence``). Every method trains on B in minibatches of
    ``batch_size`` at ``lr``/``scale_lr``: Adam moves each parameter by about ``lr`` per step, and
    a larger step jitters the weights that q_A pins down out of their prior (under N(0, 1) q_A's
    widths are a few thousandths; under the paper preset's N(0, 0.3^2) only A's output rows are,
    0.002-0.009, and ``precondition_b`` measured no need to scale the step by them).
    EWC's deterministic nets train at ``ewc_lr`` (Adam's usual 1e-3 for a plain MLP), for the
    fixed budget, or with ``ewc_patience`` by early stopping: on A's net on A's validation split,
    on B's on B's, each stopped after ``ewc_patience`` epochs without a better validation
    accuracy and given back the weights of its best epoch, at most the Bayesian fits' epoch cap
    (``max_epochs_a`` on A; ``max_epochs_b``, else ``max_epochs_a``, on B; the fixed budget when
    that is ``None``).
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
    verdict_tol: float | None = DEFAULT_TOL_PER_DATUM
    fit_b: str = "fixed"
    window: int = 5
    rel_tol: float = 1e-2
    scale_tol: float = 0.02
    elbo_test: str = "two-point"
    overrule: str = "drop"
    max_overrules: int = 3
    confirm_verdict: bool = False
    continuation_epochs: int = 0
    continuation_fraction: float = 0.0
    continuation_average: bool = False
    continuation_checks: int = 0
    continuation_max_draws: int = 0
    rescore_max_draws: int = 0
    checkpoint_seconds: float = 0.0
    polish_steps_b: int = 0
    continuation_particles_b: int | None = None
    fast_polish: bool = False
    precondition_b: str = "none"
    compile: bool = False
    continuation_rates: tuple[float, ...] = (0.3, 0.1)
    continuation_base: tuple[float, float] | None = None
    kl_beta: float = 1.0
    max_epochs_b: int | None = None
    batch_size_b: int | None = None
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
    ewc_patience: int | None = None
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
        _choice("fit-b", self.fit_b, FITS_B)
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
        if self.batch_size_b is not None and (isinstance(self.batch_size_b, bool) or not isinstance(self.batch_size_b, int) or self.batch_size_b < 1):
            raise ValueError(f"batch-size-b must be None (about a tenth of the fit's data) or an integer >= 1 (at least the data: full batch), got {self.batch_size_b!r}")
        if self.batch_size_b is not None and self.fit_b != "rule":
            raise ValueError(f"batch-size-b sets the minibatch of B's fits by the rule (fit-b rule); with fit-b {self.fit_b!r} B's fits use batch-size")
        for name in ("prior_scale", "init_scale", "lr", "ewc_lr", "ewc_lambda", "mixture_sigma1", "mixture_sigma2", "rel_tol", "scale_tol"):
            value = getattr(self, name)
            if not (math.isfinite(value) and value >= 0) or (name != "ewc_lambda" and value == 0):
                raise ValueError(f"{name.replace('_', '-')} must be a finite number > 0, got {value!r}")
        if not (math.isfinite(self.tau) and self.tau >= 1):
            raise ValueError(f"tau (prior broadening) must be finite and >= 1, got {self.tau!r}")
        if self.elbo_test not in ELBO_TESTS:
            raise ValueError(f"unknown elbo-test {self.elbo_test!r}; allowed: {', '.join(ELBO_TESTS)}")
        if self.overrule not in OVERRULES:
            raise ValueError(f"unknown overrule {self.overrule!r}; allowed: {', '.join(OVERRULES)}")
        if not isinstance(self.confirm_verdict, bool):
            raise ValueError(f"confirm-verdict must be true or false, got {self.confirm_verdict!r}")
        if not isinstance(self.max_overrules, int) or isinstance(self.max_overrules, bool) or self.max_overrules < 0:
            raise ValueError(f"max-overrules must be an integer >= 0, got {self.max_overrules!r}")
        if not isinstance(self.continuation_epochs, int) or isinstance(self.continuation_epochs, bool) or self.continuation_epochs < 0:
            raise ValueError(f"continuation-epochs must be an integer >= 0, got {self.continuation_epochs!r}")
        fraction = self.continuation_fraction
        if isinstance(fraction, bool) or not (isinstance(fraction, (int, float)) and math.isfinite(fraction) and fraction >= 0):
            raise ValueError(f"continuation-fraction must be a finite number >= 0, got {fraction!r}")
        if fraction > 0 and self.continuation_epochs == 0:
            raise ValueError(f"continuation-fraction {fraction!r} needs continuation-epochs >= 1 (0 turns continuations off)")
        rates = self.continuation_rates
        if isinstance(rates, (str, bytes)) or not isinstance(rates, (tuple, list)) or not rates \
                or not all(isinstance(r, (int, float)) and not isinstance(r, bool) and math.isfinite(r) and r > 0 for r in rates):
            raise ValueError(f"continuation-rates must be one or more numbers > 0 (factors on the first rates), got {rates!r}")
        self.continuation_rates = tuple(float(r) for r in rates)
        if self.continuation_base is not None:
            try:
                self.continuation_base = check_continuation_base(self.continuation_base)
            except ValueError:
                raise ValueError(f"continuation-base must be none or two numbers > 0 (the locations' and the widths' rate), got {self.continuation_base!r}") from None
        if not isinstance(self.continuation_average, bool):
            raise ValueError(f"continuation-average must be true or false, got {self.continuation_average!r}")
        if self.continuation_average and self.continuation_epochs == 0:
            raise ValueError("continuation-average needs continuation-epochs >= 1 (it averages a continuation's epochs; 0 turns continuations off)")
        if not isinstance(self.continuation_checks, int) or isinstance(self.continuation_checks, bool) or self.continuation_checks < 0:
            raise ValueError(f"continuation-checks must be an integer >= 0, got {self.continuation_checks!r}")
        if self.continuation_checks and self.continuation_epochs == 0:
            raise ValueError("continuation-checks needs continuation-epochs >= 1 (it scores a continuation on the way; 0 turns continuations off)")
        if self.continuation_checks and self.continuation_average:
            raise ValueError("continuation-checks cannot be combined with continuation-average (an averaged end is not a point on the way)")
        for name, least in (("continuation_max_draws", VerdictConfig.continuation_draws), ("rescore_max_draws", RESCORE_DRAWS)):
            value, flag = getattr(self, name), name.replace("_", "-")
            if not isinstance(value, int) or isinstance(value, bool) or value < 0:
                raise ValueError(f"{flag} must be an integer >= 0, got {value!r}")
            if value and value < least:
                raise ValueError(f"{flag} must be 0 (off) or at least {least} (the draws its score starts from), got {value}")
        if self.continuation_max_draws and self.continuation_epochs == 0:
            raise ValueError("continuation-max-draws needs continuation-epochs >= 1 (it scores continuations; 0 turns them off)")
        check_checkpoint_seconds(self.checkpoint_seconds, "checkpoint-seconds")
        if not isinstance(self.polish_steps_b, int) or isinstance(self.polish_steps_b, bool) or self.polish_steps_b < 0:
            raise ValueError(f"polish-steps-b must be an integer >= 0, got {self.polish_steps_b!r}")
        if self.polish_steps_b and self.fit_b != "rule":
            raise ValueError(f"polish-steps-b acts where the verdict rejects B's fits by the rule (fit-b rule); with fit-b {self.fit_b!r} B's fits have a fixed budget")
        if not isinstance(self.fast_polish, bool):
            raise ValueError(f"fast-polish must be true or false, got {self.fast_polish!r}")
        if not isinstance(self.compile, bool):
            raise ValueError(f"compile must be true or false, got {self.compile!r}")
        if self.precondition_b not in PRECONDITIONERS:
            raise ValueError(f"precondition-b must be one of {', '.join(PRECONDITIONERS)}, got {self.precondition_b!r}")
        if self.precondition_b != "none" and self.guide not in ("normal", "meanfield"):
            raise ValueError(f"precondition-b {self.precondition_b!r} scales the steps of a mean-field guide's locations; guide {self.guide!r} is not one (allowed: normal, meanfield)")
        if self.precondition_b != "none" and self.prior != "gaussian":
            raise ValueError(f"precondition-b {self.precondition_b!r} needs a Gaussian base prior (one width per weight); prior {self.prior!r} is not one (allowed: gaussian)")
        if self.fast_polish and not self.polish_steps_b:
            raise ValueError("fast-polish makes the verdict's own steps on B cheaper: it needs polish-steps-b >= 1 (got 0: no steps)")
        particles = self.continuation_particles_b
        if particles is not None and (not isinstance(particles, int) or isinstance(particles, bool) or particles < 1):
            raise ValueError(f"continuation-particles-b must be an integer >= 1, got {particles!r}")
        if particles is not None and (self.fit_b != "rule" or self.continuation_epochs == 0):
            raise ValueError(f"continuation-particles-b {particles} sets the draws per step of the continuations that confirm B's fits: "
                             f"it needs --fit-b rule and --continuation-epochs >= 1 (got fit-b {self.fit_b!r}, continuation-epochs {self.continuation_epochs})")
        if isinstance(self.kl_beta, bool) or not isinstance(self.kl_beta, (int, float)) or not (math.isfinite(self.kl_beta) and self.kl_beta > 0):
            raise ValueError(f"kl-beta must be a finite number > 0 (the KL's weight in every Bayesian fit's objective), got {self.kl_beta!r}")
        if self.ewc_patience is not None and (not isinstance(self.ewc_patience, int) or isinstance(self.ewc_patience, bool) or self.ewc_patience < 1):
            raise ValueError(f"ewc-patience must be none or an integer >= 1, got {self.ewc_patience!r}")
        if self.max_epochs_b is not None and (not isinstance(self.max_epochs_b, int) or isinstance(self.max_epochs_b, bool) or self.max_epochs_b < self.epochs_a):
            raise ValueError(f"max-epochs-b must be none or an integer >= epochs-a ({self.epochs_a}), got {self.max_epochs_b!r}")
        if self.verdict_tol is not None and not (isinstance(self.verdict_tol, (int, float)) and math.isfinite(self.verdict_tol) and self.verdict_tol > 0):
            raise ValueError(f"verdict-tol must be none or a finite number > 0, got {self.verdict_tol!r}")
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
                            lr_drops=self.lr_drops, lr_factor=self.lr_factor, elbo_test=self.elbo_test)

    def recipe_a(self) -> FitRecipe:
        """How q_A (and every posterior fitted "like q_A") is fitted: by :attr:`stopping_rule` from
        ``lr_a`` and ``scale_lr`` in minibatches of :attr:`a_batch_size`, or, with
        ``max_epochs_a=None``, for exactly ``epochs_a`` epochs, judged by the same rule."""
        common = dict(lr=self.lr if self.lr_a is None else self.lr_a, batch_size=self.a_batch_size, **self._optimiser())
        if self.max_epochs_a is None:
            return FitRecipe(epochs=self.epochs_a, judge=self.stopping_rule, **common)
        return FitRecipe(rule=self.stopping_rule, **common)

    def recipe_b(self, steps: int) -> FitRecipe:
        """B's fixed budget of ``steps`` at ``lr``/``scale_lr`` in minibatches of ``batch_size``,
        judged (not stopped) by the stopping rule without its drops."""
        judge = replace(self.stopping_rule, min_epochs=1, lr_drops=0)
        return FitRecipe(lr=self.lr, batch_size=self.batch_size, steps=steps, judge=judge, precondition=self.precondition_b, **self._optimiser())

    def new_posterior(self, prior: Prior, seed: int):
        """A fresh network of this configuration under ``prior`` and its initialised guide
        (:func:`~pyro_bbt.fitting.new_posterior`: param store cleared, seeded with ``seed``)."""
        return new_posterior(self.sizes, prior, self.guide, init_scale=self.init_scale, seed=seed, num_heads=self.num_heads, device=self.device)

    def recipe_b_converged(self, num_train: int) -> FitRecipe:
        """Every Bayesian fit on B (and joint's) with ``fit_b="rule"``: q_A's rule, cap, rates and
        verdict, in minibatches of about a tenth of the ``num_train`` images (at least 32, at most
        :attr:`a_batch_size`), so that a fit on 1 % of B takes ten steps an epoch rather than
        one; ``batch_size_b``, where set, instead (at least ``num_train``: one full-batch step an
        epoch)."""
        batch = min(self.a_batch_size, max(32, math.ceil(num_train / 10))) if self.batch_size_b is None else min(self.batch_size_b, num_train)
        rule = self.stopping_rule if self.max_epochs_b is None else replace(self.stopping_rule, max_epochs=self.max_epochs_b)
        return FitRecipe(rule=rule, lr=self.lr if self.lr_a is None else self.lr_a, batch_size=batch, precondition=self.precondition_b,
                         **self._optimiser(self.polish_steps_b, self.continuation_particles_b, self.fast_polish))

    def _optimiser(self, polish_steps: int = 0, continuation_particles: int | None = None, fast_polish: bool = False) -> dict:
        verdict = None if self.verdict_tol is None else VerdictConfig(polish_steps=polish_steps, continuation_particles=continuation_particles, fast_polish=fast_polish, tol_per_datum=self.verdict_tol, max_overrules=self.max_overrules, overrule=self.overrule,
                                                                    continuation_epochs=self.continuation_epochs,
                                                                    continuation_fraction=self.continuation_fraction,
                                                                    continuation_average=self.continuation_average,
                                                                    continuation_checks=self.continuation_checks,
                                                                    continuation_max_draws=self.continuation_max_draws,
                                                                    rescore_max_draws=self.rescore_max_draws,
                                                                    continuation_rates=self.continuation_rates,
                                                                    continuation_base=self.continuation_base,
                                                                    confirm=self.confirm_verdict)
        return dict(scale_lr=self.scale_lr, num_particles=self.num_particles, estimator=self.estimator, kl_schedule=self.kl_schedule, verdict=verdict,
                    kl_beta=self.kl_beta, checkpoint_seconds=self.checkpoint_seconds, compile=self.compile)

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
        """The fields as plain data (``config.json``, ``results.json``, the store's configuration
        hash), without a field of :data:`LATER_FIELDS` at the value that does what runs stored
        before it existed did: such a run still matches its configuration (``--resume``)."""
        record = asdict(self)
        for name, neutral in LATER_FIELDS.items():
            if record[name] == neutral:
                del record[name]
        return record


# Fields added after runs were stored, each with the value that reproduces those runs; absent from
# to_dict() at that value (ExperimentConfig(**record) restores it).
LATER_FIELDS: dict[str, object] = {"continuation_epochs": 0, "continuation_fraction": 0.0, "continuation_average": False,
                                   "continuation_rates": (0.3, 0.1), "ewc_patience": None, "continuation_base": None, "kl_beta": 1.0,
                                   "batch_size_b": None, "continuation_checks": 0,
                                   "polish_steps_b": 0, "continuation_max_draws": 0,
                                   "rescore_max_draws": 0, "checkpoint_seconds": 0.0, "continuation_particles_b": None,
                                   "fast_polish": False, "compile": False, "precondition_b": "none"}

# The A -> B grid's axes. A task-A stage depends on its seed alone and a B unit on its method,
# fraction and seed alone (with the other fields), never on which others the grid holds: a stored
# run grows or shrinks along these axes (``--resume``) without refitting what it holds.
GRID_FIELDS: tuple[str, ...] = ("methods", "fractions", "seeds")

# The Bayesian fits' epoch caps. A fit's epochs before its cap do not depend on it (the cap only
# ends the loop), so ``--resume`` may raise them: a fit in progress, or not yet started, runs to
# the new cap; on the A -> B grid a finished fit keeps the record it ended with (one that ended at
# the old cap stays unconverged, and its record names that cap). The split sequence's fits that
# ended at the old cap run on from their kept checkpoints (``Unit.capped``, pyro_bbt.engine).
CAP_FIELDS: tuple[str, ...] = ("max_epochs_a", "max_epochs_b")

# The verdict's added draws (what a configuration that omits one means: none). ``--resume`` may
# raise them too, but unlike a cap they change judgements: a fit resumed with more draws is not
# the fit a fresh run of the new configuration would make. Judgements already made keep the
# draws they had (a continuation's record names its draws), judgements to come use the new cap,
# and the unit's record names each rise and the epoch it came at (``raised_on_resume``).
PRECISION_FIELDS: dict[str, int] = {"continuation_max_draws": 0, "rescore_max_draws": 0}

# How a run is run, not what it computes (the least seconds between two checkpoints of a fit):
# free on ``--resume`` and ``--stages-from``, and in the report's merges.
RUN_FIELDS: tuple[str, ...] = ("checkpoint_seconds",)

# What ``--resume`` may raise, each with its value where a configuration omits it.
RAISABLE_FIELDS: dict[str, int | None] = {**{name: None for name in CAP_FIELDS}, **PRECISION_FIELDS}

# Fields only B's fits (and joint's) read: a task-A stage (q_A, EWC's net on A) does not depend on
# them, so a run may take its stages from another run that differs in them (``--stages-from``)
# and compare B's recipes on the same q_A. B's units do depend on them.
B_ONLY_FIELDS: tuple[str, ...] = ("fit_b", "max_epochs_b", "batch_size_b", "polish_steps_b", "continuation_particles_b", "fast_polish", "precondition_b", "q_init")


# How the paper presets fit every posterior (the A -> B grid's and split MNIST's alike): the stopping
# rule's window-means ELBO test, a rejected fit back to its first rates (at most 60 times), a pass
# confirmed by a second judgement and by a continuation (below), every fit capped at 3,000 epochs,
# EWC's nets by early stopping (patience 3 epochs), a fit in progress checkpointed once a minute.
CONVERGED_FITS: dict[str, object] = dict(elbo_test="means", overrule="restart", max_overrules=60, confirm_verdict=True, continuation_epochs=20,
                                         continuation_fraction=1.0, continuation_base=(1e-2, 3e-2), max_epochs_a=3000, max_epochs_b=3000,
                                         ewc_patience=3, continuation_max_draws=256, checkpoint_seconds=60.0)


PRESETS: dict[str, dict] = {
    # Every method on real MNIST, one seed, little data: a smoke run of the whole protocol.
    "quick": dict(epochs_a=1, max_epochs_a=None, batch_size_a=None, epochs=1, min_steps=50, fractions=(0.01, 0.1), seeds=(0,), eval_samples=16, curve_points=4, limit_eval=2000),
    # The full protocol, the README's answer: every Bayesian fit, on A and on B, to convergence by the
    # rule and the verdict (as paper-v5, below) under a base prior N(0, 0.3^2), where q_A converges in
    # minutes (under paper-v5's N(0, 1): 1,600-8,959 epochs, 1-5.5 h, beyond its cap of 3,000), B's
    # fits polished by up to 30 of the verdict's own steps before each overrule (1 % of B has Adam's
    # noise floor above the tolerance), caps of 12,000 epochs on A and 20,000 on B, every method
    # (transfer first, as the published grids ran), at 1 %, 10 % and 100 % of B, seeds 0-2.
    "paper": dict(epochs_a=5, epochs=5, min_steps=200, fractions=(0.01, 0.1, 1.0), seeds=(0, 1, 2), fit_b="rule",
                  methods=("transfer", "scratch", "finetune", "ewc", "joint"),
                  **CONVERGED_FITS | dict(prior_scale=0.3, polish_steps_b=30, max_epochs_a=12000, max_epochs_b=20000)),
    # The paper preset until 2026-12-07 (N(0, 1), at 1 %, 10 %, 50 % and 100 % of B, caps of 3,000
    # epochs): every Bayesian fit, on A and on B, to convergence by the rule and the verdict:
    # the window-means ELBO test, a rejected fit back to its first rates (at most 60 times), a pass
    # confirmed by a second judgement with noise of its own and then by a continuation as long as the
    # fit so far (at least 20 epochs, at 0.3 then 0.1 times the rates 1e-2 for the locations and 3e-2
    # for the widths, the first rates of this preset, kept whatever rates --lr-a or --scale-lr give
    # the fit, so that the confirmation does not depend on the recipe) that raises the ELBO by
    # at most the tolerance, scored with draws added where 8 cannot decide (up to 256: on B's small
    # splits 8 draws' noise alone is about the tolerance); every fit capped at 3,000 epochs. EWC's
    # nets by early stopping on their task's validation split (patience 3 epochs, the same cap).
    # A fit in progress is checkpointed at most once a minute (paper-v3 and v4 too: fits of
    # thousands of epochs, where a checkpoint after every epoch cost a quarter of the time).
    "paper-v5": dict(epochs_a=5, epochs=5, min_steps=200, fractions=(0.01, 0.1, 0.5, 1.0), seeds=(0, 1, 2), fit_b="rule",
                     **CONVERGED_FITS),
    # The paper preset until 2026-12-05, every continuation scored by 8 draws: the converged runs
    # of 2026-12-04 and 12-05 (q_A of seeds 0-2, B at 10 %) resume under it.
    "paper-v4": dict(epochs_a=5, epochs=5, min_steps=200, fractions=(0.01, 0.1, 0.5, 1.0), seeds=(0, 1, 2), fit_b="rule",
                     elbo_test="means", overrule="restart", max_overrules=60, confirm_verdict=True, continuation_epochs=20,
                     continuation_fraction=1.0, continuation_base=(1e-2, 3e-2), max_epochs_a=3000, max_epochs_b=3000, ewc_patience=3, checkpoint_seconds=60.0),
    # The paper preset of 2026-12-04 with the continuation, before EWC's early stopping (EWC's nets
    # for B's fixed budget): the runs begun that day (runs/qa-converged) resume under it.
    "paper-v3": dict(epochs_a=5, epochs=5, min_steps=200, fractions=(0.01, 0.1, 0.5, 1.0), seeds=(0, 1, 2), fit_b="rule",
                     elbo_test="means", overrule="restart", max_overrules=60, confirm_verdict=True, continuation_epochs=20,
                     continuation_fraction=1.0, max_epochs_a=3000, max_epochs_b=3000, checkpoint_seconds=60.0),
    # The paper preset of 2026-12-04 until the continuation (the 10 % reruns of that day): passes
    # confirmed by a second judgement only, q_A capped at 300 epochs.
    "paper-v2": dict(epochs_a=5, epochs=5, min_steps=200, fractions=(0.01, 0.1, 0.5, 1.0), seeds=(0, 1, 2), fit_b="rule",
                     elbo_test="means", overrule="restart", max_overrules=60, confirm_verdict=True, max_epochs_b=3000),
    # The paper preset until 2026-12-04, which the tables and studies made before then used: the
    # two-point ELBO test, a rejected fit's rates dropped (at most 3 times), no confirmation, B's
    # fits capped like A's (--fit-b fixed gives the fixed budget of B, 5 epochs and at least 200
    # steps, of the tables made before the rule fitted B).
    "paper-v1": dict(epochs_a=5, epochs=5, min_steps=200, fractions=(0.01, 0.1, 0.5, 1.0), seeds=(0, 1, 2), fit_b="rule"),
}
