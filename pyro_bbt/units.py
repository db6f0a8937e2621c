"""The units of work of the transfer experiment: task A's stages and the B units.

Every function here is pure in the sense the executors need: a configuration, a unit's spec
and the saved state of the stage it depends on go in; a record (and, for a stage, the state to
save) comes out. Nothing here writes a run directory: the study engine's driver
(:func:`~pyro_bbt.engine.run_units`, on which :func:`~pyro_bbt.experiment.run_experiment` runs
:func:`stage_unit` and :func:`b_unit`) alone does, through :class:`~pyro_bbt.runstore.RunStore`.
The training helpers (``fit_task_a``, ``run_bayesian_b``, ...) are also used by the studies
(:mod:`pyro_bbt.studies`, :mod:`pyro_bbt.tradeoff`), which import them from here.
"""

from __future__ import annotations

import copy
import math
import time
from collections.abc import Callable
from dataclasses import dataclass, replace
from typing import TYPE_CHECKING, Any

import numpy as np
import pyro
import torch

from .config import ExperimentConfig
from .checkpoint import prior_from_state, prior_state
from .continual import backward_transfer, forward_transfer
from .data import Split, Task, TaskData, load_task
from .engine import UnitOutcome, failed_outcome
from .evaluation import PredictiveMetrics, evaluate, metrics_from_log_probs
from .ewc import MLP, DeterministicTrainConfig, EarlyStopping, EWCPenalty, fisher_diagonal, train_deterministic
from .fitting import broaden, fit_posterior, guide_state, prior_from_posterior, start_from_state
from .inference import EpochDiagnostics, NonFiniteLossError
from .model import BayesianMLP
from .priors import Prior
from .pruning import census_after

if TYPE_CHECKING:  # the plan and the store import this module
    from .plan import StageSpec, UnitSpec
    from .runstore import RunStore


# --------------------------------------------------------------------------- data


@dataclass
class _Tasks:
    a: TaskData
    b: TaskData


def load_task_pair(config: ExperimentConfig, fraction: float, seed: int) -> _Tasks:
    limits = dict(limit_train=config.limit_train, limit_eval=config.limit_eval)
    a = load_task(Task(digits=config.task_a, seed=seed, name="A"), **limits)
    b = load_task(Task(digits=config.task_b, fraction=fraction, seed=seed, name="B"), **limits)
    out = []
    for data in (a, b):
        out.append(TaskData(task=data.task, train=data.train.to(config.device), val=data.val.to(config.device), test=data.test.to(config.device)))
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
class FitStorage:
    """Where a fit reads its saved stage and checkpoint and keeps its progress: a
    :class:`RunStore` (the studies), a unit's :class:`_UnitStore` (the executors), or
    ``None``: nowhere, nothing is resumable."""

    store: RunStore | _UnitStore | None = None


def _curve_epochs(total_steps: int, steps_per_epoch: int, points: int) -> set[int]:
    num_epochs = math.ceil(total_steps / steps_per_epoch)
    return {int(round(e)) for e in np.linspace(1, num_epochs, min(points, num_epochs))}


def use_head(model: BayesianMLP, head: int | None) -> None:
    if model.num_heads > 1:
        model.head = head


def bayesian_metrics(model, guide, split: Split, samples: int, head: int) -> PredictiveMetrics:
    """Posterior-predictive metrics on ``split`` through output ``head``."""
    use_head(model, head)
    return evaluate(model, guide, split.x, split.y, num_samples=samples)


def _curve_epochs_by_rule(max_epochs: int, points: int) -> set[int]:
    """Epochs at which a fit by the rule (length unknown in advance) records its curve: about
    ``points`` per decade of epochs, geometrically spaced up to the cap."""
    return {int(round(e)) for e in np.geomspace(1, max_epochs, max(2, round(points * math.log10(max(max_epochs, 10)))))}


def _train_bayesian(config, model, guide, train_split: Split, steps: int, seed: int, tasks: _Tasks, head: int | None, run: FitStorage, key: str) -> tuple[list, list, dict]:
    """Train through output ``head`` on B (or joint's union): for ``steps`` (B's fixed budget,
    :meth:`ExperimentConfig.recipe_b`), or to convergence (``fit_b="rule"``,
    :meth:`ExperimentConfig.recipe_b_converged`); record B's learning curve (validation and test
    accuracy against steps and fit seconds) and the fit's convergence report."""
    if config.fit_b == "rule":
        recipe = config.recipe_b_converged(len(train_split))
        record_at = _curve_epochs_by_rule(recipe.rule.max_epochs, config.curve_points)
    else:
        recipe = config.recipe_b(steps)
        record_at = _curve_epochs(steps, math.ceil(len(train_split) / config.batch_size), config.curve_points)
    curve: list[dict] = []
    elapsed = [0.0]

    def point(epoch: int, step: int) -> dict:
        # A measurement: its weight draws come from a fork of the generators, so the fit is the
        # same whichever epochs the curve records (they depend on the cap, which --resume may raise).
        with torch.random.fork_rng():
            point = {"epoch": epoch, "step": step,
                     "b_val_accuracy": bayesian_metrics(model, guide, tasks.b.val, config.curve_samples, config.b_head).accuracy,
                     "b_test_accuracy": bayesian_metrics(model, guide, tasks.b.test, config.curve_samples, config.b_head).accuracy,
                     "seconds": elapsed[0]}
        use_head(model, head)
        return point

    def on_epoch(diag: EpochDiagnostics) -> None:
        elapsed[0] += diag.seconds
        if diag.epoch in record_at:
            curve.append(point(diag.epoch, diag.steps))

    use_head(model, head)
    fit = fit_posterior(model, guide, train_split, recipe, seed, on_epoch=on_epoch, store=run.store, key=key, extra={"curve": curve})
    if fit.history and (not curve or curve[-1]["epoch"] != fit.epochs):  # the converged end is always a point
        elapsed[0] = sum(e["seconds"] for e in fit.history)
        curve.append(point(fit.epochs, fit.steps))
    use_head(model, head)
    return curve, fit.history, fit.convergence


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
    census: dict | None = None  # q_A's active units (pyro_bbt.pruning.census_after); None in stages saved before it was recorded

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
            "census": self.census,
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
            census=saved.get("census"),
        )


def stage_prior(saved: dict) -> Prior:
    """The prior that ``transfer`` fits B under, from a saved q_A stage."""
    return _StageA.from_saved(saved).prior_from_a


def stage_from_saved(saved: dict) -> _StageA:
    """A q_A stage as :func:`fit_task_a` returns it, from its saved state (``to_saved``)."""
    return _StageA.from_saved(saved)


def fit_task_a(config: ExperimentConfig, tasks: _Tasks, seed: int, run: FitStorage | None = None) -> _StageA:
    run = run or FitStorage()
    key = f"A-bayesian-s{seed}"
    saved = run.store.stage(key) if run.store is not None else None
    if saved is not None:
        return _StageA.from_saved(saved)
    model, guide = config.new_posterior(config.base_prior(), seed)
    b_random_init = [bayesian_metrics(model, guide, tasks.b.test, config.eval_samples, config.b_head).accuracy]
    use_head(model, 0)
    fit = fit_posterior(model, guide, tasks.a.train, config.recipe_a(), seed, store=run.store, key=key, extra={"b_random_init": b_random_init})
    # Multi-head: B's head has seen no data, so its prior stays the base prior rather than q_A's leftovers.
    fresh_rows = model.head_rows(config.b_head) if config.head == "multihead" else None
    prior_from_a = prior_from_posterior(guide, model, config.base_prior(), config.base_prior_std, config.tau, fresh_rows)
    stage = _StageA(
        guide_state=guide_state(guide),
        prior_from_a=prior_from_a,
        a_test=bayesian_metrics(model, guide, tasks.a.test, config.eval_samples, 0),
        b_test_before=bayesian_metrics(model, guide, tasks.b.test, config.eval_samples, config.b_head),
        b_random_init=b_random_init[0],
        steps=fit.steps,
        history=fit.history,
        convergence=fit.convergence,
        census=census_after(guide, model, config.base_prior_std, [(0, tasks.a.train)], seed),
    )
    if run.store is not None:
        run.store.save_stage(key, stage.to_saved())
    return stage


def broadened_stage(config: ExperimentConfig, stage_a: _StageA, tau: float) -> _StageA:
    """``stage_a`` (fitted at ``tau`` 1 and shared by every ``tau`` of a study) with the prior it
    gives B broadened by ``tau``: ``N(loc_A, (tau scale_A)^2)`` on every transferred weight, while
    on the multi-head B's head rows, which have seen no data and hold the base prior
    ``N(0, sigma_p^2)``, keep it. That is the prior :func:`fit_task_a` builds under
    ``config.tau = tau`` (``python -m pyro_bbt.transfer --tau``)."""
    if config.head != "multihead":
        return replace(stage_a, prior_from_a=broaden(stage_a.prior_from_a, tau))
    layout = BayesianMLP(config.sizes, config.base_prior(), config.num_heads)  # only its output sites and head rows are read
    return replace(stage_a, prior_from_a=broaden(stage_a.prior_from_a, tau, layout.output_sites, layout.head_rows(config.b_head)))


def posterior_for_b(config, method: str, stage_a: _StageA | None, seed: int):
    """The network and guide a Bayesian B unit fits: under q_A's prior for ``transfer``, the base
    prior otherwise; started at q_A for ``finetune`` and for ``transfer`` with ``q_init``
    ``from-posterior`` (multi-head: B's head keeps its fresh initialisation)."""
    prior = stage_a.prior_from_a if method == "transfer" else config.base_prior()
    model, guide = config.new_posterior(prior, seed)
    if method == "finetune" or (method == "transfer" and config.q_init == "from-posterior"):
        start_from_state(model, guide, stage_a.guide_state, model.head_rows(config.b_head) if config.head == "multihead" else None)
    return model, guide


def fit_bayesian_b(config, method: str, tasks: _Tasks, stage_a: _StageA | None, steps: int, seed: int, run: FitStorage | None = None,
                   key: str = "") -> tuple[BayesianMLP, Any, dict]:
    """A Bayesian B unit (scratch, transfer, finetune) fitted as the grid fits it:
    ``(model, guide, outcome)``, the network with B's head on, its fitted guide, and the outcome
    :func:`run_bayesian_b` returns (B's and A's test metrics, curve, history, convergence report)."""
    model, guide = posterior_for_b(config, method, stage_a, seed)
    curve, history, convergence = _train_bayesian(config, model, guide, tasks.b.train, steps, seed, tasks, config.b_head, run or FitStorage(), key)
    outcome = _bayes_outcome(config, model, guide, tasks, curve, history, convergence, seen_a=method != "scratch", seed=seed)
    use_head(model, config.b_head)
    return model, guide, outcome


def run_bayesian_b(config, method: str, tasks: _Tasks, stage_a: _StageA | None, steps: int, seed: int, run: FitStorage | None = None, key: str = "") -> dict:
    return fit_bayesian_b(config, method, tasks, stage_a, steps, seed, run, key)[2]


def _bayes_outcome(config, model, guide, tasks: _Tasks, curve, history, convergence, seen_a: bool, seed: int) -> dict:
    """A Bayesian B unit's outcome: B's and A's test metrics through their heads, its curve,
    history and convergence report, and its active units (``census``: against the base prior, on
    B, and on A too where the posterior has seen it, ``seen_a``)."""
    seen = [(0, tasks.a.train), (config.b_head, tasks.b.train)] if seen_a else [(config.b_head, tasks.b.train)]
    return {
        "b_test": bayesian_metrics(model, guide, tasks.b.test, config.eval_samples, config.b_head),
        "a_test_after": bayesian_metrics(model, guide, tasks.a.test, config.eval_samples, 0),
        "curve": curve,
        "history": history,
        "convergence": convergence,
        "census": census_after(guide, model, config.base_prior_std, seen, seed),
    }


def run_joint(config, tasks: _Tasks, steps: int, seed: int, run: FitStorage, key: str) -> dict:
    model, guide = config.new_posterior(config.base_prior(), seed)
    # Multi-head: one softmax over both heads' outputs, B's labels shifted past A's; each task
    # is then evaluated through its own head.
    offset = config.b_head * len(config.task_a)
    both = Split(torch.cat([tasks.a.train.x, tasks.b.train.x]), torch.cat([tasks.a.train.y, tasks.b.train.y + offset]))
    curve, history, convergence = _train_bayesian(config, model, guide, both, steps, seed, tasks, None, run, key)
    return _bayes_outcome(config, model, guide, tasks, curve, history, convergence, seen_a=True, seed=seed)


# --------------------------------------------------------------------------- EWC


class HeadView(torch.nn.Module):
    """The logits of one output head of a deterministic multi-head MLP (all outputs if single-head)."""

    def __init__(self, net: MLP, rows: slice) -> None:
        super().__init__()
        self.net = net
        self.rows = rows

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)[..., self.rows]


def head_view(config: ExperimentConfig, net: MLP, head: int) -> HeadView:
    width = len(config.task_a)
    return HeadView(net, slice(head * width, (head + 1) * width))


def check_finite_training(net: torch.nn.Module, losses: list[float], x_probe: torch.Tensor, what: str, lr: float) -> None:
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
    early_stopping: dict | None = None  # what early stopping did (ewc_patience), None for the fixed budget
    steps: int | None = None  # the steps it ran (None: a stage saved before they were recorded)


def ewc_train_config(config: ExperimentConfig, n: int, steps: int, seed: int, cap_epochs: int | None) -> DeterministicTrainConfig:
    """How an EWC net trains on ``n`` images: the fixed budget of ``steps``, or with
    ``config.ewc_patience`` early stopping within ``cap_epochs`` epochs (``None``: within
    ``steps``)."""
    if config.ewc_patience is not None and cap_epochs is not None:
        steps = cap_epochs * math.ceil(n / config.batch_size)
    return DeterministicTrainConfig(config.ewc_lr, config.batch_size, steps, seed, patience=config.ewc_patience)


def _ewc_val(config: ExperimentConfig, split) -> tuple[torch.Tensor, torch.Tensor] | None:
    return (split.x, split.y) if config.ewc_patience is not None else None


def fit_task_a_ewc(config: ExperimentConfig, tasks: _Tasks, steps: int, seed: int, run: FitStorage | None = None) -> _StageAEWC:
    """The deterministic net on A and its Fisher; restarts from scratch if interrupted (it is short).
    With ``config.ewc_patience``: by early stopping on A's validation split (:func:`ewc_train_config`)."""
    run = run or FitStorage()
    key = f"A-ewc-s{seed}"
    torch.manual_seed(seed)
    net = MLP((*config.sizes[:-1], config.sizes[-1] * config.num_heads)).to(config.device)
    on_a, on_b = head_view(config, net, 0), head_view(config, net, config.b_head)
    saved = run.store.stage(key) if run.store is not None else None
    if saved is None:
        b_random_init = _net_metrics(on_b, tasks.b.test).accuracy
        stopping: list[EarlyStopping] = []
        losses = train_deterministic(on_a, tasks.a.train.x, tasks.a.train.y,
                                     ewc_train_config(config, len(tasks.a.train), steps, seed, config.max_epochs_a), val=_ewc_val(config, tasks.a.val),
                                     stopping=stopping)
        check_finite_training(on_a, losses, tasks.a.train.x[:256], "deterministic net on task A", config.ewc_lr)
        generator = torch.Generator(device=config.device).manual_seed(seed)
        fisher = fisher_diagonal(on_a, tasks.a.train.x[: config.fisher_samples], generator=generator)
        saved = {"net": {k: v.detach().clone() for k, v in net.state_dict().items()}, "fisher": fisher, "b_random_init": b_random_init,
                 "steps": len(losses)}
        if stopping:
            saved["early_stopping"] = stopping[0].to_dict()
        if run.store is not None:
            run.store.save_stage(key, saved)
    net.load_state_dict(saved["net"])
    return _StageAEWC(
        net=net,
        penalty=EWCPenalty(on_a, saved["fisher"], config.ewc_lambda),
        a_test=_net_metrics(on_a, tasks.a.test),
        b_test_before=_net_metrics(on_b, tasks.b.test),
        b_random_init=saved["b_random_init"],
        early_stopping=saved.get("early_stopping"),
        steps=saved.get("steps"),
    )


def ewc_stage_from_saved(config: ExperimentConfig, tasks: _Tasks, seed: int, saved: dict) -> _StageAEWC:
    """EWC's task-A stage as :func:`fit_task_a_ewc` returns it, from its saved state: rebuilt,
    not retrained (only the test splits of ``tasks`` are read)."""
    return fit_task_a_ewc(config, tasks, 0, seed, FitStorage(_UnitStore(saved)))


def run_ewc_b(config, tasks: _Tasks, stage: _StageAEWC, steps: int, seed: int) -> dict:
    """EWC on B from A's net under A's penalty: for B's fixed budget of ``steps``, or with
    ``config.ewc_patience`` by early stopping on B's validation split (its record's
    ``early_stopping``); B's learning curve at about ``curve_points`` epochs."""
    pyro.set_rng_seed(seed)
    net = copy.deepcopy(stage.net)
    on_a, on_b = head_view(config, net, 0), head_view(config, net, config.b_head)
    steps_per_epoch = math.ceil(len(tasks.b.train) / config.batch_size)
    train_config = ewc_train_config(config, len(tasks.b.train), steps, seed, config.max_epochs_b or config.max_epochs_a)
    steps = train_config.steps  # the cap, under early stopping
    record_at = (_curve_epochs(steps, steps_per_epoch, config.curve_points) if config.ewc_patience is None
                 else _curve_epochs_by_rule(math.ceil(steps / steps_per_epoch), config.curve_points))
    curve: list[dict] = []
    start = time.perf_counter()

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
                    "seconds": time.perf_counter() - start,
                }
            )

    stopping: list[EarlyStopping] = []
    losses = train_deterministic(on_b, tasks.b.train.x, tasks.b.train.y, train_config, stage.penalty, on_epoch,
                                 val=_ewc_val(config, tasks.b.val), stopping=stopping)
    check_finite_training(on_b, losses, tasks.b.train.x[:256], "EWC on task B", config.ewc_lr)
    outcome = {
        "b_test": _net_metrics(on_b, tasks.b.test),
        "a_test_after": _net_metrics(on_a, tasks.a.test),
        "curve": curve,
        "history": [{"step": i + 1, "loss": loss} for i, loss in enumerate(losses) if (i + 1) % steps_per_epoch == 0 or i + 1 == len(losses)],
    }
    if stopping:
        outcome["early_stopping"] = stopping[0].to_dict()
    return outcome


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
        "census": outcome.get("census"),
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



def failed_unit_record(method: str, fraction: float, seed: int, steps: int, error: str) -> dict:
    return {
        "method": method, "fraction": fraction, "seed": seed, "steps": steps, "status": "failed", "error": error,
        "b_test": None, "a_test_after": None, "accuracy_matrix": None, "backward_transfer": None,
        "forward_transfer": None, "curve": [], "history": [], "convergence": None, "prior_converged": None, "seconds": 0.0,
    }


def unit_key(method: str, fraction: float, seed: int) -> str:
    return f"{method}-f{fraction:g}-s{seed}"




# --------------------------------------------------------------------------- the unit functions


@dataclass
class _UnitStore:
    """What one unit sees of the run directory, in place of a :class:`RunStore`: the saved
    stage it depends on (``stage_data``) and its own checkpoint to continue from
    (``checkpoint_data``), both handed over by the driver. A checkpoint the unit makes goes to
    ``on_checkpoint`` (the driver's store when the unit runs in the driver's process, else
    nowhere); a stage the unit finishes is kept in ``saved_stage`` for the driver to write."""

    stage_data: dict | None = None
    checkpoint_data: dict | None = None
    on_checkpoint: Callable[[str, dict], None] | None = None
    saved_stage: dict | None = None

    def stage(self, key: str) -> dict | None:
        return self.stage_data

    def save_stage(self, key: str, data: dict) -> None:
        self.saved_stage = data

    def checkpoint(self, key: str) -> dict | None:
        return self.checkpoint_data

    def save_checkpoint(self, key: str, data: dict) -> None:
        if self.on_checkpoint is not None:
            raised = self.raised_on_resume
            self.on_checkpoint(key, data if raised is None else {**data, "raised_on_resume": raised})

    def clear_checkpoint(self, key: str) -> None:
        pass

    @property
    def raised_on_resume(self) -> list[dict] | None:
        """The rises of the verdict's draws since this fit began (``RunStore.checkpoint``), kept
        in every checkpoint it saves and in its record; ``None`` where there were none."""
        return self.checkpoint_data.get("raised_on_resume") if self.checkpoint_data is not None else None


@dataclass
class StageOutcome:
    """What a task-A stage unit returns: ``state``, the stage to save (``None`` when it was
    given saved, or failed), ``entry``, its record under ``results.json``'s ``task_a`` (``None``
    when it failed), and ``error`` (``""`` when it did not)."""

    key: str
    state: dict | None
    entry: dict | None
    error: str = ""
    seconds: float = 0.0


def run_stage(config: ExperimentConfig, spec: StageSpec, saved: dict | None = None, checkpoint: dict | None = None,
              on_checkpoint: Callable[[str, dict], None] | None = None) -> StageOutcome:
    """Fit the task-A stage ``spec`` (q_A, or EWC's deterministic net and Fisher) for ``config``,
    continuing from ``checkpoint`` if given; with ``saved`` (the stage as a finished run saved
    it), only rebuild its record. Clears Pyro's param store first. A non-finite loss is returned
    as ``error``, not raised."""
    pyro.clear_param_store()
    start = time.perf_counter()
    full = load_task_pair(config, 1.0, spec.seed)
    store = _UnitStore(saved, checkpoint, on_checkpoint)
    try:
        if spec.kind == "bayesian":
            stage_a = fit_task_a(config, full, spec.seed, FitStorage(store))
            entry = {"seed": spec.seed, "kind": "bayesian", "steps": stage_a.steps, "a_test": stage_a.a_test.to_dict(),
                     "b_test_before": stage_a.b_test_before.to_dict(), "b_random_init_accuracy": stage_a.b_random_init,
                     "convergence": stage_a.convergence, "history": stage_a.history, "census": stage_a.census}
        else:
            stage_ewc = fit_task_a_ewc(config, full, spec.steps, spec.seed, FitStorage(store))
            entry = {"seed": spec.seed, "kind": "deterministic", "steps": spec.steps, "a_test": stage_ewc.a_test.to_dict(),
                     "b_test_before": stage_ewc.b_test_before.to_dict(), "b_random_init_accuracy": stage_ewc.b_random_init,
                     "convergence": None, "history": []}
            if stage_ewc.early_stopping is not None:
                entry.update(steps=stage_ewc.steps, early_stopping=stage_ewc.early_stopping)
        if store.raised_on_resume is not None:
            entry["raised_on_resume"] = store.raised_on_resume
    except NonFiniteLossError as error:
        return StageOutcome(spec.key, None, None, f"task A failed: {error}", time.perf_counter() - start)
    return StageOutcome(spec.key, store.saved_stage, entry, "", time.perf_counter() - start)


def run_unit(config: ExperimentConfig, spec: UnitSpec, stage_state: dict | None = None,
             checkpoint: dict | None = None, on_checkpoint: Callable[[str, dict], None] | None = None) -> dict:
    """Train the B unit ``spec`` for ``config`` and return its record (as in ``results.json``).

    ``stage_state`` is the saved state of the stage ``spec.needs`` (``None`` where it needs one:
    a failed record, the stage missing); ``checkpoint`` an epoch of this unit to continue from.
    Clears Pyro's param store first. A non-finite loss gives a record with ``status: "failed"``
    and the error rather than an exception."""
    pyro.clear_param_store()
    method, fraction, seed, steps = spec.method, spec.fraction, spec.seed, spec.steps
    if spec.needs is not None and stage_state is None:
        return failed_unit_record(method, fraction, seed, steps, f"stage {spec.needs} is missing")
    tasks = load_task_pair(config, fraction, seed)
    unit_store = _UnitStore(None, checkpoint, on_checkpoint)
    run = FitStorage(unit_store)
    start = time.perf_counter()
    try:
        if method == "ewc":
            stage: Any = ewc_stage_from_saved(config, tasks, seed, stage_state)
            outcome = run_ewc_b(config, tasks, stage, steps, seed)
        elif method == "joint":
            outcome, stage = run_joint(config, tasks, steps, seed, run, spec.key), None
        else:
            stage_a = _StageA.from_saved(stage_state) if stage_state is not None else None
            outcome = run_bayesian_b(config, method, tasks, stage_a, steps, seed, run, spec.key)
            stage = stage_a if method != "scratch" else None
    except NonFiniteLossError as error:
        return failed_unit_record(method, fraction, seed, steps, str(error))
    if method != "ewc" and config.fit_b == "rule" and outcome["history"]:  # fitted to convergence: the steps it took
        steps = outcome["history"][-1]["steps"]
    if "early_stopping" in outcome and outcome["history"]:  # EWC by early stopping: the steps it ran
        steps = outcome["history"][-1]["step"]
    record = _unit_record(method, fraction, seed, steps, outcome, stage, time.perf_counter() - start)
    if "early_stopping" in outcome:
        record["early_stopping"] = outcome["early_stopping"]
    if unit_store.raised_on_resume is not None:
        record["raised_on_resume"] = unit_store.raised_on_resume
    return record


# --------------------------------------------------------------------------- as units of the study engine


def stage_unit(config: ExperimentConfig, spec: StageSpec, saved: dict | None, checkpoint: dict | None = None,
               on_checkpoint: Callable[[str, dict], None] | None = None) -> UnitOutcome:
    """:func:`run_stage` as a unit of the study engine kept by its state (``Unit.kept ==
    "state"``: ``saved`` is the store's copy of the stage, or ``None``). Its record:
    ``{"status": "ok", "entry": ..., "seconds": ..., "reused": ...}`` (the stage's entry under
    ``task_a``, the seconds this call took, and whether the stage was rebuilt from ``saved``
    rather than fitted), with the stage's state when it fitted it (``None`` when rebuilt from
    ``saved``), or ``{"status": "failed", "error": "task A failed: ..."}`` for a non-finite loss."""
    outcome = run_stage(config, spec, saved, checkpoint, on_checkpoint)
    if outcome.error:
        return failed_outcome(outcome.error)
    return UnitOutcome({"status": "ok", "entry": outcome.entry, "seconds": outcome.seconds, "reused": saved is not None}, outcome.state)


def b_unit(config: ExperimentConfig, spec: UnitSpec, stage_state: dict | None, checkpoint: dict | None = None,
           on_checkpoint: Callable[[str, dict], None] | None = None) -> UnitOutcome:
    """:func:`run_unit` as a unit of the study engine: its record, no state."""
    return UnitOutcome(run_unit(config, spec, stage_state, checkpoint, on_checkpoint))


def failed_stage(error: str, need: str | None) -> UnitOutcome:
    """A task-A stage whose job raised or whose worker died (``error``, the traceback): failed
    with ``task A failed: ERROR`` (a stage needs no unit, so ``need`` is ``None``)."""
    return failed_outcome(f"task A failed: {error}")


def failed_b_unit(spec: UnitSpec, error: str, need: str | None) -> UnitOutcome:
    """The B unit ``spec`` failed without a record of its own: its job raised or its worker died
    (``error``, the traceback), or its stage ``need`` failed (``error``, the stage's
    ``task A failed: ...``); :func:`failed_unit_record` with ``error``."""
    return UnitOutcome(failed_unit_record(spec.method, spec.fraction, spec.seed, spec.steps, error))
