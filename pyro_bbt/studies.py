"""Side studies on split MNIST: guides, KL schedules, and the ablation of the original's choices.

``python -m pyro_bbt.studies guides``     every guide on task A, same epochs and seeds:
                                          test accuracy, NLL, ECE, seconds per epoch -> ``guides.png``,
                                          ``guides.md`` (mean ± std over seeds)
``python -m pyro_bbt.studies schedules``  every KL schedule on task A -> ``comparing_beta.png``
``python -m pyro_bbt.studies ablation``   transfer on B with q_B fresh vs from q_A, prior broadening
                                          tau, and learning rate 1e-5 vs 1e-3, against scratch ->
                                          ``ablation.md``
``python -m pyro_bbt.studies convergence`` fitting q_A under KL schedules and scale learning rates:
                                          ELBO against wall time, median sigma, the uninformed-weight
                                          sigma ratio, when the stopping rule fires ->
                                          ``convergence.png``, ``convergence.md``
``python -m pyro_bbt.studies tradeoff``   B accuracy against A accuracy after B: transfer over tau,
                                          EWC over lambda, finetune, scratch, joint; both heads ->
                                          ``tradeoff.png``, ``tradeoff.md`` (:mod:`pyro_bbt.tradeoff`)
``python -m pyro_bbt.studies uncertainty`` every guide, a deterministic net and a deep ensemble on
                                          A's test digits, rotated, noisy and unseen digits ->
                                          ``uncertainty.png``, ``reliability.png``, ``shift.png``,
                                          ``uncertainty.md`` (:mod:`pyro_bbt.uncertainty_study`)

Each writes ``<study>.json`` (all numbers) next to its figure or table in ``--out``.

Every study runs through the study engine (:mod:`pyro_bbt.engine`): a plan of units, one per
row (guide, schedule, variant, predictor or trade-off point, and seed; the ablation's q_A one per
seed, and the trade-off's q_A and EWC net one per head and seed, which their points need), on
``--workers N`` processes or in this process, kept in
``--out`` as they finish (``config.json``, ``units/``, ``stages/``, ``checkpoints/``: a
:class:`~pyro_bbt.runstore.RunStore`), so ``--resume`` continues a killed run and reads its
finished units back. ``<study>.json`` holds no wall-clock field, so it is the same bytes whatever
the executor and however often the run was resumed; the rows' seconds are in ``timing.json``.
One ``--out`` holds one such study's run.
"""

from __future__ import annotations

import argparse
import itertools
import json
import math
import shutil
import statistics
import sys
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, replace
from functools import partial
from pathlib import Path

import numpy as np

from .config import HEADS, LATER_FIELDS
from .data import Task, load_task
from .engine import Unit, UnitCheckpoints, UnitOutcome, row_outcome, run_study_units
from .evaluation import evaluate
from .executors import Executor
from .experiment import PRESETS as EXPERIMENT_PRESETS
from .experiment import ExperimentConfig
from .fitting import FitRecipe, fit_posterior
from .files import atomic_write_json, atomic_write_text
from .guides import GUIDES, WARM_GUIDES, posterior_loc_scale
from .kl_schedules import KL_SCHEDULES
from .convergence import StoppingRule, assess_convergence, uninformed_scale_ratio
from .stats import format_mean_std, sample_std
from .priors import GaussianPrior
from .runstore import ReadOnlyStore, RunStore, differing_fields, disallowed_differences
from .tradeoff import (TRADEOFF_CAP_FIELDS, TRADEOFF_GRID_FIELDS, TRADEOFF_PRESETS, TradeoffConfig, plot_tradeoff, reused_tradeoff_stages, task_a_stage_unit, tradeoff,
                       tradeoff_description, tradeoff_key, tradeoff_table)
from .plan import StageSpec, stage_key
from .units import FitStorage, broadened_stage, load_task_pair, run_bayesian_b, stage_from_saved, steps_for
from .uncertainty_study import (
    WARM_STARTS,
    PREDICTORS,
    UNCERTAINTY_PRESETS,
    UncertaintyConfig,
    config_to_dict,
    fit_guide,
    guide_rows,
    plot_reliability,
    plot_shift,
    plot_uncertainty,
    reused_rows,
    row_timing,
    uncertainty_study,
    uncertainty_table,
    unit_key,
    without_timing,
)

__all__ = ["StudyConfig", "compare_guides", "guide_unit", "warm_guide_unit", "guides_table", "compare_schedules", "schedule_unit",
           "compare_convergence", "convergence_unit", "ablation", "ablation_stage_unit", "ablation_unit", "split_timing",
           "study_description", "row_key", "build_parser", "main"]

STUDIES = ("guides", "schedules", "ablation", "convergence", "tradeoff", "uncertainty")


@dataclass
class StudyConfig:
    """Shared settings; ``limit_train``/``limit_eval`` shrink the data for smoke tests."""

    epochs: int = 3
    seeds: tuple[int, ...] = (0,)
    hidden: tuple[int, ...] = (400, 400)
    eval_samples: int = 32
    limit_train: int | None = None
    limit_eval: int | None = None
    ablation_fraction: float = 0.1
    min_steps: int = 200
    max_epochs: int | None = None  # convergence study: caps every variant (None: each variant's own cap)


PRESETS = {
    "quick": dict(epochs=1, seeds=(0,), limit_train=4000, limit_eval=2000, eval_samples=16),
    "paper": dict(epochs=3, seeds=(0, 1)),
}
# ``epochs`` is B's budget in the ablation (the transfer experiment's 5) and the cap of the
# convergence study's older variants (60; one seed: it chooses defaults, it carries no finding);
# guides and schedules fit q_A by its recipe to convergence, capped at ``max_epochs`` (None: 300).
STUDY_OVERRIDES = {("ablation", "paper"): dict(epochs=5, seeds=(0, 1, 2)), ("convergence", "paper"): dict(epochs=60, seeds=(0,)),
                   ("convergence", "quick"): dict(epochs=3, max_epochs=3), ("guides", "paper"): dict(seeds=(0, 1, 2)),
                   ("guides", "quick"): dict(max_epochs=2), ("schedules", "quick"): dict(max_epochs=2), ("ablation", "quick"): dict(max_epochs=2)}


def _task_a(config: StudyConfig, seed: int):
    data = load_task(Task(digits=(0, 1, 2, 3, 4), seed=seed, name="A"), limit_train=config.limit_train, limit_eval=config.limit_eval)
    return data.train, data.val, data.test


def _fit_on_a(config: StudyConfig, seed: int, guide: str = "meanfield", kl_schedule: str = "blundell", lr: float = 1e-3,
              scale_lr: float | None = None, stopping: StoppingRule | None = None, on_epoch=None, batch_size: int = 128):
    """One fit on task A (the convergence study's variants): ``config.epochs`` epochs, or by
    ``stopping``'s criteria alone (this study measures the rule, not the verdict); returns the
    per-epoch records and the test metrics."""
    experiment = ExperimentConfig(guide=guide, kl_schedule=kl_schedule, hidden=config.hidden, seeds=(seed,))
    train_split, val, test = _task_a(config, seed)
    model, q = experiment.new_posterior(GaussianPrior(experiment.prior_scale), seed)
    budget = dict(rule=stopping) if stopping is not None else dict(epochs=config.epochs)
    recipe = FitRecipe(lr=lr, batch_size=batch_size, scale_lr=scale_lr, kl_schedule=kl_schedule, verdict=None, **budget)
    if on_epoch is not None:
        on_epoch = partial(on_epoch, model, q, train_split)
    fit = fit_posterior(model, q, train_split, recipe, seed, val_split=val, eval_samples=8, on_epoch=on_epoch)
    metrics = evaluate(model, q, test.x, test.y, num_samples=config.eval_samples)
    return fit.history, metrics


def _recipe(config: StudyConfig) -> UncertaintyConfig:
    """q_A's recipe (:meth:`UncertaintyConfig.fitting`) with the study's network, data and cap
    (``config.max_epochs``, else 300 epochs)."""
    cap = config.max_epochs or 300
    return UncertaintyConfig(hidden=config.hidden, max_epochs=cap, min_epochs=min(5, cap), eval_samples=config.eval_samples,
                             limit_train=config.limit_train, limit_eval=config.limit_eval)


def _fit_to_convergence(config: StudyConfig, seed: int, guide: str = "meanfield", kl_schedule: str | None = None,
                        start: dict | None = None, keep_posterior: bool = False) -> tuple[dict, dict | None]:
    """One fit on task A by q_A's recipe, judged by the stopping rule, scored on A's test set;
    started at the posterior ``start`` if given. Returns the row and, with ``keep_posterior``,
    the fitted posterior (:func:`~pyro_bbt.guides.posterior_loc_scale`; else ``None``)."""
    train_split, _, test = _task_a(config, seed)
    model, q, convergence, history = fit_guide(_recipe(config), guide, train_split, seed, kl_schedule=kl_schedule, start=start)
    metrics = evaluate(model, q, test.x, test.y, num_samples=config.eval_samples)
    posterior = posterior_loc_scale(q, model) if keep_posterior else None
    return {"seed": seed, **metrics.to_dict(), "seconds_per_epoch": statistics.median(e["seconds"] for e in history),
            "fit_seconds": sum(e["seconds"] for e in history), "epochs": convergence["epochs"], "converged": convergence["converged"],
            "convergence": convergence, "history": history}, posterior


def guide_unit(config: StudyConfig, guide: str, seed: int, keep_posterior: bool, checkpoint: dict | None = None,
               on_checkpoint: Callable | None = None) -> UnitOutcome:
    """The guides study's row of ``guide`` and ``seed``: the guide fitted afresh on task A by
    q_A's recipe to convergence (or the cap), judged by the stopping rule, scored on A's test
    set. With ``keep_posterior`` (the seed's ``meanfield`` unit, when guides start from it) its
    state is the fitted posterior and the ``started_from`` that those guides record. Its fit keeps
    no epoch checkpoints: a unit killed mid-fit runs again from its start on resume (the units
    finished before the kill are read back)."""
    row, posterior = _fit_to_convergence(config, seed, guide=guide, keep_posterior=keep_posterior)
    state = None
    if keep_posterior:
        state = {"posterior": posterior,
                 "started_from": {"guide": guide, "epochs": row["epochs"], "converged": row["converged"], "fit_seconds": row["fit_seconds"]}}
    return row_outcome({"guide": guide, **row, "started_from": None}, state)


def warm_guide_unit(config: StudyConfig, guide: str, seed: int, start: dict, checkpoint: dict | None = None,
                    on_checkpoint: Callable | None = None) -> UnitOutcome:
    """The guides study's row of a guide of :data:`~pyro_bbt.guides.WARM_GUIDES` and ``seed``:
    fitted on task A by q_A's recipe from the seed's fitted ``meanfield`` posterior (``start``,
    the state of that seed's :func:`guide_unit`), as in the uncertainty study; the row records
    that start (``started_from``) and counts as converged only when that fit did too. No epoch
    checkpoints, as :func:`guide_unit`."""
    row, _ = _fit_to_convergence(config, seed, guide=guide, start=start["posterior"])
    row["converged"] = row["converged"] and start["started_from"]["converged"]
    return row_outcome({"guide": guide, **row, "started_from": start["started_from"]})


def schedule_unit(config: StudyConfig, schedule: str, seed: int, checkpoint: dict | None = None,
                  on_checkpoint: Callable | None = None) -> UnitOutcome:
    """The schedules study's row of ``schedule`` and ``seed``: ``meanfield`` fitted afresh on task
    A by q_A's recipe under that KL schedule, judged by the stopping rule, scored on A's test set.
    No epoch checkpoints, as :func:`guide_unit`."""
    row, _ = _fit_to_convergence(config, seed, kl_schedule=schedule)
    return row_outcome({"kl_schedule": schedule, **row})


def log_rows(line: Callable[[dict], str], log: Callable[[str], None]) -> Callable[[Unit, UnitOutcome], None]:
    """The engine's ``on_finish`` for a side study: ``log(line(row))`` as each unit with a row
    finishes, and a line for each that failed."""
    def on_finish(unit: Unit, outcome: UnitOutcome) -> None:
        if "row" in outcome.record:
            log(line(outcome.record["row"]))
        elif outcome.failed:
            log(f"{unit.key} failed: {outcome.record.get('error', '')}")
    return on_finish


def _guide_line(r: dict) -> str:
    start = r["started_from"]
    return (f"guide {r['guide']:>9} seed {r['seed']}: accuracy {r['accuracy']:.4f}, NLL {r['nll']:.4f}, ECE {r['ece']:.4f}, "
            f"{r['epochs']} epochs ({'converged' if r['converged'] else 'NOT converged'}), {r['seconds_per_epoch']:.1f} s/epoch"
            + ("" if start is None else f", from {start['guide']}"))


def compare_guides(config: StudyConfig, guides: tuple[str, ...] = GUIDES, log=print, workers: int = 1, executor: Executor | None = None,
                   store: RunStore | None = None) -> list[dict]:
    """Every guide fitted on task A by q_A's recipe to convergence (or the cap), per seed, guides
    outer. The guides of :data:`~pyro_bbt.guides.WARM_GUIDES` start at the same seed's fitted
    ``meanfield`` posterior, as in the uncertainty study
    (:attr:`~pyro_bbt.uncertainty_study.UncertaintyConfig.warm_start`); that fit is the
    ``meanfield`` row's (made for them when no such row is asked for). ``started_from`` records
    it as the uncertainty study does, and such a fit counts as converged only when that one did
    too. One unit per guide and seed (:func:`guide_unit`, :func:`warm_guide_unit`), run by
    :func:`~pyro_bbt.engine.run_study_units` on ``executor`` (default: ``workers`` processes,
    or this process) and kept in ``store``."""
    warm = _recipe(config).warm_start == "meanfield"
    starts = warm and any(g in WARM_GUIDES for g in guides)
    units = [Unit(unit_key(("meanfield", seed)), guide_unit, (config, "meanfield", seed, True)) for seed in config.seeds] if starts else []
    for guide, seed in itertools.product(guides, config.seeds):
        if guide == "meanfield" and starts:
            continue
        if warm and guide in WARM_GUIDES:
            units.append(Unit(unit_key((guide, seed)), warm_guide_unit, (config, guide, seed), needs=(unit_key(("meanfield", seed)),)))
        else:
            units.append(Unit(unit_key((guide, seed)), guide_unit, (config, guide, seed, False)))
    outcomes = run_study_units(units, "guides study", executor, workers, store, on_finish=log_rows(_guide_line, log))
    return [outcomes[unit_key((guide, seed))].record["row"] for guide, seed in itertools.product(guides, config.seeds)]


def _schedule_line(r: dict) -> str:
    return (f"schedule {r['kl_schedule']:>8} seed {r['seed']}: accuracy {r['accuracy']:.4f}, NLL {r['nll']:.4f}, ECE {r['ece']:.4f}, "
            f"ELBO {r['history'][-1]['elbo']:.4g} after {r['epochs']} epochs ({'converged' if r['converged'] else 'NOT converged'})")


def compare_schedules(config: StudyConfig, schedules: tuple[str, ...] = KL_SCHEDULES, log=print, workers: int = 1,
                      executor: Executor | None = None, store: RunStore | None = None) -> list[dict]:
    """``meanfield`` fitted on task A by q_A's recipe under every KL schedule, per seed, schedules
    outer: one unit per schedule and seed (:func:`schedule_unit`), run as in
    :func:`compare_guides`."""
    plan = list(itertools.product(schedules, config.seeds))
    units = [Unit(unit_key((schedule, seed)), schedule_unit, (config, schedule, seed)) for schedule, seed in plan]
    outcomes = run_study_units(units, "schedules study", executor, workers, store, on_finish=log_rows(_schedule_line, log))
    return [outcomes[unit.key].record["row"] for unit in units]


@dataclass(frozen=True)
class FitVariant:
    """One way of fitting q_A in the convergence study: KL schedule, learning rates of the
    locations and of the scales, the rule's learning-rate drops (each by ``lr_factor``), the
    minibatch size, and the epoch cap (``None``: the study preset's ``epochs``)."""

    key: str
    name: str
    kl_schedule: str
    lr: float
    scale_lr: float | None
    lr_drops: int = 0
    lr_factor: float = 0.1
    batch_size: int = 128
    max_epochs: int | None = None


CONVERGENCE_VARIANTS = [
    FitVariant("old", "Blundell, lr 1e-3, scale lr 1e-3 (the 5-epoch default)", "blundell", 1e-3, 1e-3),
    FitVariant("blundell-scale-lr", "Blundell, lr 1e-3, scale lr 3e-2", "blundell", 1e-3, 3e-2),
    FitVariant("uniform-scale-lr", "uniform, lr 1e-3, scale lr 3e-2", "uniform", 1e-3, 3e-2),
    FitVariant("lr-1e-2", "uniform, lr 1e-2, scale lr 3e-2", "uniform", 1e-2, 3e-2),
    FitVariant("one-drop", "uniform, lr 1e-2, scale lr 3e-2, then both / 10 (the 80-epoch default)", "uniform", 1e-2, 3e-2, lr_drops=1),
    # Larger minibatches: a step of 1024 or 2048 images costs far less than 8 or 16 steps of 128 on
    # a CPU, and averages away minibatch noise; the rule drops the rates 3 times by 0.3, for at
    # most 300 epochs.
    FitVariant("batch-128", "batch 128, uniform, lr 1e-2, scale lr 3e-2, 3 drops x 0.3", "uniform", 1e-2, 3e-2, 3, 0.3, 128, 300),
    FitVariant("batch-512", "batch 512, uniform, lr 1e-2, scale lr 3e-2, 3 drops x 0.3", "uniform", 1e-2, 3e-2, 3, 0.3, 512, 300),
    FitVariant("batch-1024", "batch 1024, uniform, lr 1e-2, scale lr 3e-2, 3 drops x 0.3", "uniform", 1e-2, 3e-2, 3, 0.3, 1024, 300),
    FitVariant("batch-2048", "batch 2048, uniform, lr 1e-2, scale lr 3e-2, 3 drops x 0.3 (the default)", "uniform", 1e-2, 3e-2, 3, 0.3, 2048, 300),
    FitVariant("batch-4096", "batch 4096, uniform, lr 1e-2, scale lr 3e-2, 3 drops x 0.3", "uniform", 1e-2, 3e-2, 3, 0.3, 4096, 300),
]
VARIANT_KEYS = tuple(v.key for v in CONVERGENCE_VARIANTS)


def convergence_unit(config: StudyConfig, rule: StoppingRule, variant: FitVariant, seed: int, checkpoint: dict | None = None,
                     on_checkpoint: Callable | None = None) -> UnitOutcome:
    """The convergence study's row of ``variant`` and ``seed``: q_A fitted on task A under the
    variant by ``rule`` (its learning-rate drops, their factor and the cap set by the variant)
    for at most ``config.max_epochs``, else ``variant.max_epochs``, else ``config.epochs``
    epochs; per epoch the ELBO, the cumulative wall time of the optimisation steps (``wall``),
    the median sigma per weight site and the uninformed-weight sigma ratio; ``rule_epoch`` is
    where the rule stopped the fit (``None``: it never held); A's test metrics. No epoch
    checkpoints, as :func:`guide_unit`."""
    ratios: list[float | None] = []
    cap = config.max_epochs or variant.max_epochs or config.epochs
    variant_rule = replace(rule, max_epochs=cap, min_epochs=min(rule.min_epochs, cap), lr_drops=variant.lr_drops, lr_factor=variant.lr_factor)
    history, metrics = _fit_on_a(config, seed, kl_schedule=variant.kl_schedule, lr=variant.lr, scale_lr=variant.scale_lr, stopping=variant_rule,
                                 batch_size=variant.batch_size,
                                 on_epoch=lambda model, q, data, _: ratios.append(uninformed_scale_ratio(q, model, data.x)))
    converged = assess_convergence(history, variant_rule).converged
    return row_outcome({"variant": variant.name, **asdict(variant), "seed": seed, **metrics.to_dict(),
                        "rule_epoch": len(history) if converged else None, "uninformed_scale_ratio": ratios,
                        "wall": list(itertools.accumulate(e["seconds"] for e in history)), "history": history})


def _convergence_line(r: dict) -> str:
    final = r["history"][-1]
    return (f"{r['variant']:>42} seed {r['seed']}: ELBO {final['elbo']:.4g} after {len(r['history'])} epochs ({r['wall'][-1]:.0f} s), "
            f"median sigma {', '.join(f'{v:.3f}' for v in final['median_scale'].values())}, "
            f"uninformed ratio {r['uninformed_scale_ratio'][-1]}, rule stopped it at epoch {r['rule_epoch']}, test accuracy {r['accuracy']:.4f}")


def compare_convergence(config: StudyConfig, rule: StoppingRule | None = None, variants=CONVERGENCE_VARIANTS, log=print, workers: int = 1,
                        executor: Executor | None = None, store: RunStore | None = None) -> list[dict]:
    """Fit q_A under each variant by ``rule`` (default: the experiment's stopping rule), per seed,
    variants outer: one unit per variant and seed (:func:`convergence_unit`), run as in
    :func:`compare_guides`."""
    rule = rule or ExperimentConfig().stopping_rule
    units = [Unit(unit_key((variant.key, seed)), convergence_unit, (config, rule, variant, seed))
             for variant, seed in itertools.product(variants, config.seeds)]
    outcomes = run_study_units(units, "convergence study", executor, workers, store, on_finish=log_rows(_convergence_line, log))
    return [outcomes[unit.key].record["row"] for unit in units]


def convergence_table(rows: list[dict], checkpoints: tuple[float, ...] = (60, 120, 300, 600)) -> str:
    """Markdown: per variant, the ELBO after some seconds of optimisation (the last epoch that
    ended by then), the final ELBO with its epoch and seconds, the stopping rule's epoch, the final
    median sigma per layer, the uninformed ratio, test accuracy and seconds per epoch."""
    marks = [c for c in checkpoints if any(r["wall"][-1] >= c for r in rows)]
    lines = ["| variant | " + " | ".join(f"ELBO after {c:g} s" for c in marks)
             + " | final ELBO (epoch, s) | the rule stopped it at epoch | median sigma per layer (last epoch) | uninformed sigma ratio | test accuracy | s / epoch |",
             "|---|" + "---|" * (len(marks) + 6)]
    for row in rows:
        elbos = []
        for c in marks:
            done = [e for e, t in zip(row["history"], row["wall"]) if t <= c]
            elbos.append("(stopped)" if row["wall"][-1] < c else f"{done[-1]['elbo']:.4g}" if done else "—")
        final = row["history"][-1]
        sigma = " / ".join(f"{v:.3f}" for v in final["median_scale"].values())
        ratio = row["uninformed_scale_ratio"][-1]
        seconds = statistics.median(e["seconds"] for e in row["history"])
        lines.append(f"| {row['variant']} (seed {row['seed']}) | {' | '.join(elbos)} | {final['elbo']:.4g} ({final['epoch']}, {row['wall'][-1]:.0f} s) | "
                     f"{row['rule_epoch'] or 'never'} | {sigma} | {'—' if ratio is None else f'{ratio:.3f}'} | {row['accuracy']:.4f} | {seconds:.2f} |")
    return "\n".join(lines) + "\n"


def plot_convergence(rows: list[dict], path: Path) -> None:
    from .plots import save_figure, plt

    fig, axes = plt.subplots(1, 3, figsize=(15, 3.8))
    for row in rows:
        label = row["variant"]
        line, = axes[0].plot(row["wall"], [-e["elbo"] for e in row["history"]], label=label)
        sigma = [list(e["median_scale"].values()) for e in row["history"]]
        epochs = np.arange(1, len(sigma) + 1)
        axes[1].plot(epochs, [s[0] for s in sigma], color=line.get_color())
        axes[1].plot(epochs, [s[1] for s in sigma], color=line.get_color(), ls="--")
        axes[2].plot(epochs, row["uninformed_scale_ratio"], color=line.get_color())
        if row["rule_epoch"]:
            axes[0].plot(row["wall"][row["rule_epoch"] - 1], -row["history"][row["rule_epoch"] - 1]["elbo"], "k*", ms=9)
    axes[0].set(xlabel="wall seconds of optimisation", ylabel="- ELBO (nats, log scale)", yscale="log", title="ELBO (star: the rule stopped the fit)")
    axes[1].set(xlabel="epoch", ylabel="median posterior sigma", yscale="log", title="layer 0 (solid), layer 1 (dashed)")
    axes[2].set(xlabel="epoch", ylabel="median sigma_q / sigma_prior", yscale="log", title="weights of always-blank pixels (exact: 1)")
    for ax in axes:
        ax.grid(alpha=0.3)
    axes[0].legend(fontsize=7)
    save_figure(fig, path)


ABLATION_VARIANTS = [
    # (name, method, q_init, tau, lr)
    ("scratch, lr 1e-3", "scratch", "from-posterior", 1.0, 1e-3),
    ("transfer, q_B from q_A, tau 1, lr 1e-3", "transfer", "from-posterior", 1.0, 1e-3),
    ("transfer, q_B fresh, tau 1, lr 1e-3", "transfer", "fresh", 1.0, 1e-3),
    ("transfer, q_B from q_A, tau 10, lr 1e-3", "transfer", "from-posterior", 10.0, 1e-3),
    ("transfer, q_B fresh, tau 10, lr 1e-3", "transfer", "fresh", 10.0, 1e-3),
    ("scratch, lr 1e-5", "scratch", "from-posterior", 1.0, 1e-5),
    ("transfer, q_B from q_A, tau 1, lr 1e-5", "transfer", "from-posterior", 1.0, 1e-5),
    ("transfer, q_B fresh, tau 1, lr 1e-5 (the original's setting)", "transfer", "fresh", 1.0, 1e-5),
]


def ablation_base(config: StudyConfig) -> ExperimentConfig:
    """The transfer experiment's paper configuration (q_A fitted to convergence by its recipe;
    B's budget and learning rates), with the study's network, seeds, data limits and B epochs;
    ``config.max_epochs`` caps q_A's fit (smoke runs). For the paper preset it equals
    ``python -m pyro_bbt.transfer --preset paper-v1``'s configuration (the transfer experiment's
    paper preset when the ablation was run), so ``--reuse`` can read that run's q_A."""
    cap = {} if config.max_epochs is None else dict(max_epochs_a=config.max_epochs, epochs_a=min(5, config.max_epochs))
    return ExperimentConfig(**EXPERIMENT_PRESETS["paper-v1"] | dict(hidden=config.hidden, seeds=config.seeds, eval_samples=config.eval_samples,
                                                                  limit_train=config.limit_train, limit_eval=config.limit_eval,
                                                                  min_steps=config.min_steps, epochs=config.epochs) | cap)


def ablation_key(variant: tuple, seed: int) -> str:
    """The engine's key of a variant of :data:`ABLATION_VARIANTS` and ``seed``, e.g.
    ``transfer-fresh-tau10-lr1e-05-s0`` or ``scratch-lr0.001-s0``."""
    _, method, q_init, tau, lr = variant
    what = method if method == "scratch" else f"{method}-{q_init}-tau{tau:g}"
    return f"{what}-lr{lr:g}-s{seed}"


def ablation_stage_unit(base: ExperimentConfig, seed: int, saved: dict | None, checkpoint: dict | None = None,
                        on_checkpoint: Callable | None = None) -> UnitOutcome:
    """The ablation's task A for ``seed``: q_A fitted by ``base``'s recipe
    (:func:`~pyro_bbt.tradeoff.task_a_stage_unit`, which keeps a checkpoint after every epoch, so
    a resume continues a fit killed midway), or rebuilt from ``saved`` (the stage of a finished
    transfer run, ``--reuse``). Its state is the stage that every variant of the seed starts from;
    its record, q_A's test metrics and verdict."""
    return task_a_stage_unit(base, StageSpec(seed, "bayesian", 0), stage_key("bayesian", seed), saved, checkpoint, on_checkpoint)


def ablation_unit(base: ExperimentConfig, variant: tuple, seed: int, fraction: float, key: str, stage: dict,
                  checkpoint: dict | None = None, on_checkpoint: Callable | None = None) -> UnitOutcome:
    """The ablation's row of ``variant`` (of :data:`ABLATION_VARIANTS`) and ``seed``: B at
    ``fraction`` of its data fitted by the variant's method, start of q_B, prior broadening tau
    and learning rate (a rate other than ``base``'s applies to the widths too; the original used
    one rate for both) after the seed's q_A (``stage``, the state of :func:`ablation_stage_unit`),
    with ``base``'s step budget; B's fit keeps a checkpoint under ``key`` after every epoch. The
    row: B's test accuracy, A's before and after B, q_A's verdict, the fit's seconds."""
    name, method, q_init, tau, lr = variant
    tasks = load_task_pair(base, fraction, seed)
    steps = steps_for(len(tasks.b.train), base.epochs, base.batch_size, base.min_steps)
    config = replace(base, q_init=q_init, tau=tau, lr=lr, scale_lr=base.scale_lr if lr == base.lr else None)
    stage_a = stage_from_saved(stage)
    start = time.perf_counter()
    outcome = run_bayesian_b(config, method, tasks, broadened_stage(config, stage_a, tau), steps, seed,
                             FitStorage(UnitCheckpoints(checkpoint, on_checkpoint)), key)
    return row_outcome({"variant": name, "method": method, "q_init": q_init, "tau": tau, "lr": lr, "seed": seed, "steps": steps,
                        "b_test_accuracy": outcome["b_test"].accuracy, "a_test_after_accuracy": outcome["a_test_after"].accuracy,
                        "a_test_before_accuracy": stage_a.a_test.accuracy, "q_a_convergence": stage_a.convergence,
                        "seconds": time.perf_counter() - start})


def reused_stages(base: ExperimentConfig, run_dir: Path, seeds: tuple[int, ...]) -> dict[int, dict | None]:
    """Per seed, the q_A stage of the finished ``python -m pyro_bbt.transfer`` run in ``run_dir``
    (``None`` where it has none); ``ValueError`` naming the differences when that run's
    configuration is not ``base``."""
    store = ReadOnlyStore(run_dir, base.to_dict())
    return {seed: store.stage(stage_key("bayesian", seed)) for seed in seeds}


def _ablation_line(key: str, record: dict) -> str:
    if record.get("status") != "ok":
        return f"{key} failed: {record.get('error', '')}"
    if "row" not in record:  # a seed's q_A
        verdict = record["convergence"]
        return f"seed {record['seed']}: q_A {verdict['epochs']} epochs, converged {verdict['converged']}, uninformed sigma ratio {verdict['uninformed_scale_ratio']}"
    r = record["row"]
    return f"{r['variant']:>62} seed {r['seed']}: B {r['b_test_accuracy']:.4f}, A after B {r['a_test_after_accuracy']:.4f}"


def ablation(config: StudyConfig, log=print, reuse: Path | None = None, workers: int = 1, executor: Executor | None = None,
             store: RunStore | None = None) -> list[dict]:
    """Transfer on B at ``config.ablation_fraction`` under the variants of
    :data:`ABLATION_VARIANTS`, shared head, per seed, variants inner; task A is fitted once per
    seed (or read from the finished run ``reuse`` of the same configuration) and shared by every
    variant, the step budget is the same. Per seed one unit for q_A
    (:func:`ablation_stage_unit`) and one per variant that needs it (:func:`ablation_unit`), run
    as in :func:`compare_guides`."""
    base = ablation_base(config)
    saved = reused_stages(base, reuse, config.seeds) if reuse is not None else {}
    units = []
    for seed in config.seeds:
        stage = stage_key("bayesian", seed)
        units.append(Unit(stage, ablation_stage_unit, (base, seed, saved.get(seed))))
        units += [Unit(ablation_key(v, seed), ablation_unit, (base, v, seed, config.ablation_fraction, ablation_key(v, seed)), needs=(stage,))
                  for v in ABLATION_VARIANTS]
    outcomes = run_study_units(units, "ablation study", executor, workers, store,
                               on_finish=lambda unit, outcome: log(_ablation_line(unit.key, outcome.record)))
    return [outcomes[unit.key].record["row"] for unit in units if unit.fn is ablation_unit]


def ablation_table(rows: list[dict]) -> str:
    lines = ["| variant | B test accuracy | A test accuracy after B | seeds |", "|---|---|---|---|"]
    for name, *_ in ABLATION_VARIANTS:
        group = [r for r in rows if r["variant"] == name]
        if group:
            lines.append(f"| {name} | {format_mean_std(r['b_test_accuracy'] for r in group)} | {format_mean_std(r['a_test_after_accuracy'] for r in group)} | {len(group)} |")
    return "\n".join(lines) + "\n"


def guides_table(rows: list[dict]) -> str:
    """Markdown: per guide, mean ± std over seeds of test accuracy, NLL, ECE and of each seed's
    median seconds per epoch; with the fits' epochs and the stopping rule's verdicts when the
    rows have them."""
    judged = all("converged" in r for r in rows)
    extra = " epochs | converged fits |" if judged else ""
    lines = ["| guide | test accuracy | test NLL | test ECE | s / epoch |" + extra + " seeds |", "|---|---|---|---|---|" + "---|---|" * judged + "---|"]
    for guide in dict.fromkeys(r["guide"] for r in rows):
        group = [r for r in rows if r["guide"] == guide]
        cells = [format_mean_std(r[key] for r in group) for key in ("accuracy", "nll", "ece")]
        cells.append(format_mean_std((r["seconds_per_epoch"] for r in group), digits=1))
        if judged:
            epochs = [r["epochs"] for r in group]
            cells += [f"{min(epochs)}–{max(epochs)}" if min(epochs) != max(epochs) else str(epochs[0]), f"{sum(r['converged'] for r in group)}/{len(group)}"]
        lines.append(f"| {guide} | {' | '.join(cells)} | {len(group)} |")
    return "\n".join(lines) + "\n"


def plot_guides(rows: list[dict], path: Path) -> None:
    from .plots import save_figure, plt

    guides = list(dict.fromkeys(r["guide"] for r in rows))
    fig, axes = plt.subplots(1, 4, figsize=(14, 3.2))
    for ax, key, label in zip(axes, ("accuracy", "nll", "ece", "seconds_per_epoch"), ("test accuracy", "test NLL", "test ECE", "seconds per epoch")):
        values = [[r[key] for r in rows if r["guide"] == g] for g in guides]
        errors = [sample_std(v) for v in values]
        ax.bar(guides, [np.mean(v) for v in values], yerr=errors, capsize=3, color="tab:blue")
        ax.set_title(label)
        ax.tick_params(axis="x", rotation=45)
        if key == "accuracy":
            ax.set_ylim(max(0.0, min(np.mean(v) for v in values) - 0.05), 1.0)
    save_figure(fig, path)


def plot_schedules(rows: list[dict], path: Path) -> None:
    """Per schedule and seed: the epoch's objective, expected log-likelihood minus the summed
    weighted KL (left; the ELBO wherever the schedule's weights average 1, the log-likelihood
    alone for ``none``), and that weighted KL (right), against the epoch on A, up to where the
    stopping rule ended the fit."""
    from .plots import save_figure, plt

    fig, axes = plt.subplots(1, 2, figsize=(10, 3.4))
    colours = dict(zip(dict.fromkeys(r["kl_schedule"] for r in rows), plt.rcParams["axes.prop_cycle"].by_key()["color"]))
    for row in rows:
        epochs = np.arange(1, len(row["history"]) + 1)
        label = row["kl_schedule"] if row["seed"] == rows[0]["seed"] else None
        axes[0].plot(epochs, [e["elbo"] for e in row["history"]], color=colours[row["kl_schedule"]], lw=1, label=label)
        axes[1].plot(epochs, [e["weighted_kl"] for e in row["history"]], color=colours[row["kl_schedule"]], lw=1, label=label)
    axes[0].set_ylabel("expected log-lik - weighted KL (nats)")  # the ELBO once the weights are 1 (not for none)
    axes[1].set_ylabel("sum of weighted KL over the epoch")
    for ax in axes:
        ax.set_xlabel("epoch on A")
        ax.set_yscale("symlog")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    save_figure(fig, path)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m pyro_bbt.studies", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("study", choices=STUDIES)
    parser.add_argument("--preset", choices=sorted(set(PRESETS) | set(TRADEOFF_PRESETS)), default="quick",
                        help="quick (default) or paper; the tradeoff study also converged (every point fitted to the verdict, "
                             "at the converged A -> B grid's configuration)")
    parser.add_argument("--out", type=Path, help="the study's folder (its store, results and figures; one study per folder); default runs/studies/STUDY")
    parser.add_argument("--overwrite", action="store_true")
    parser.add_argument("--resume", action="store_true",
                        help="continue the run in --out (same study and configuration): "
                             "its finished units (in --out/units) are read back, the others run; the results file is the same bytes "
                             "as an uninterrupted run's")
    parser.add_argument("--reuse", type=Path, nargs="+", default=[], metavar="RUN_DIR",
                        help="tradeoff and ablation: finished python -m pyro_bbt.transfer runs (tradeoff: one per head; ablation: the "
                             "shared head's) of the preset's configuration, whose fitted q_A (and EWC nets) are read instead of fitted again; "
                             "uncertainty: earlier uncertainty outputs of the same configuration, whose predictors' rows are taken as they are "
                             "(only the other predictors are fitted)")
    parser.add_argument("--workers", type=int, default=1, metavar="N",
                        help="run the study's units (one per row: guide, schedule, variant, predictor or trade-off point and seed; "
                             "the ablation's q_A one per seed, the tradeoff's q_A and EWC net one per head and seed) in N processes; "
                             "same results")
    parser.add_argument("--predictors", type=_predictor_names, default=None, metavar="NAME,NAME",
                        help=f"uncertainty only: the guides and baselines to fit and score (default all: {', '.join(PREDICTORS)})")
    parser.add_argument("--warm-start", choices=WARM_STARTS, default=None,
                        help="uncertainty only: start lowrank, planar and iaf at the same seed's fitted meanfield posterior "
                             "(meanfield, the default) or afresh (fresh)")
    parser.add_argument("--heads", type=_heads, default=None, metavar="HEAD,HEAD",
                        help="tradeoff only: the heads of the grid (default the preset's: shared,multihead)")
    parser.add_argument("--seeds", type=_numbers(int), default=None, metavar="S,S", help="tradeoff only: the seeds of the grid (default the preset's)")
    parser.add_argument("--fractions", type=_numbers(float), default=None, metavar="F,F",
                        help="tradeoff only: the fractions of B's training data, each in (0, 1] (default the preset's: 0.1 for quick and converged, "
                             "0.01,0.1,1 for paper)")
    parser.add_argument("--taus", type=_numbers(float), default=None, metavar="TAU,TAU",
                        help="tradeoff only: transfer's prior broadenings (default the preset's: 1,3,10,100). --heads, --seeds, --fractions, --taus and --lambdas may change "
                             "on --resume: the points the run already has are read back, the others fitted, and tradeoff.json holds the grid asked for")
    parser.add_argument("--lambdas", type=_numbers(float), default=None, metavar="LAMBDA,LAMBDA",
                        help="tradeoff only: EWC's penalties (default the preset's: 10,1000,100000)")
    parser.add_argument("--max-epochs-b", type=int, default=None, metavar="N",
                        help="tradeoff only: the cap in epochs of every fit on B (default the preset's: 20,000 for converged). "
                             "A fit that ended at a lower cap is refitted in a new --out, then put into the study by "
                             "python -m pyro_bbt.tradeoff merge")
    parser.add_argument("--variants", type=_variant_keys, default=VARIANT_KEYS, metavar="KEY,KEY",
                        help=f"convergence only: the fitting variants to run (default all: {', '.join(VARIANT_KEYS)})")
    return parser


def _heads(text: str) -> tuple[str, ...]:
    heads = tuple(dict.fromkeys(h.strip() for h in text.split(",") if h.strip()))
    unknown = [h for h in heads if h not in HEADS]
    if unknown or not heads:
        raise argparse.ArgumentTypeError(f"unknown head {', '.join(unknown) or repr(text)}; allowed: {', '.join(HEADS)}")
    return heads


def _numbers(kind: type) -> Callable[[str], tuple]:
    """A comma-separated list of distinct finite ``kind`` numbers >= 0 (argparse type)."""
    def parse(text: str) -> tuple:
        try:
            values = tuple(dict.fromkeys(kind(v) for v in text.split(",") if v.strip()))
        except ValueError:
            values = ()
        if not values or any(not math.isfinite(v) or v < 0 for v in values):
            raise argparse.ArgumentTypeError(f"{text!r} is not a comma-separated list of finite {kind.__name__}s >= 0")
        return values
    return parse


def _variant_keys(text: str) -> tuple[str, ...]:
    keys = tuple(k.strip() for k in text.split(",") if k.strip())
    unknown = [k for k in keys if k not in VARIANT_KEYS]
    if unknown or not keys:
        raise argparse.ArgumentTypeError(f"unknown variant {', '.join(unknown) or repr(text)}; allowed: {', '.join(VARIANT_KEYS)}")
    return keys


def _predictor_names(text: str) -> tuple[str, ...]:
    names = tuple(dict.fromkeys(n.strip() for n in text.split(",") if n.strip()))
    unknown = [n for n in names if n not in PREDICTORS]
    if unknown or not names:
        raise argparse.ArgumentTypeError(f"unknown predictor {', '.join(unknown) or repr(text)}; allowed: {', '.join(PREDICTORS)}")
    return names


def _reuse_by_head(dirs: list[Path]) -> dict[str, Path]:
    """Head -> run directory, from each directory's config.json; a missing file is an error."""
    by_head = {}
    for run_dir in dirs:
        config_path = run_dir / "config.json"
        if not config_path.exists():
            raise ValueError(f"--reuse {run_dir}: no config.json there (is it a python -m pyro_bbt.transfer output directory?)")
        by_head[json.loads(config_path.read_text()).get("head", "shared")] = run_dir
    return by_head


STUDY_PROGRESS = ("units", "stages", "checkpoints")  # the study engine's store under --out (RunStore)


def split_timing(row: dict) -> tuple[dict, dict]:
    """A side study's ``row`` without its wall-clock fields, and those fields (for
    ``timing.json``): ``fit_seconds``, ``seconds_per_epoch`` and ``started_from``'s
    ``fit_seconds`` (as :func:`~pyro_bbt.uncertainty_study.row_timing`), the ablation's
    ``seconds`` and the trade-off's, the convergence study's ``wall``, and every epoch's ``seconds`` of ``history``
    (as ``epoch_seconds``)."""
    clean, timing = without_timing(row), row_timing(row)
    for key in ("seconds", "wall"):
        if key in clean:
            timing[key] = clean.pop(key)
    if "history" in clean:
        timing["epoch_seconds"] = [e["seconds"] for e in clean["history"]]
        clean["history"] = [{k: v for k, v in e.items() if k != "seconds"} for e in clean["history"]]
    return clean, timing


def row_key(study: str, row: dict) -> str:
    """The key of the unit that made a side study's ``row`` (its name in ``units/`` and in
    ``timing.json``)."""
    if study == "ablation":
        return ablation_key((row["variant"], row["method"], row["q_init"], row["tau"], row["lr"]), row["seed"])
    if study == "tradeoff":
        return tradeoff_key(row["head"], row["method"], row["knob"], row["fraction"], row["seed"])
    return unit_key((row[{"guides": "guide", "schedules": "kl_schedule", "convergence": "key"}[study]], row["seed"]))


def study_description(study: str, config: StudyConfig, variants: tuple[str, ...] = VARIANT_KEYS) -> dict:
    """What a side study run through the engine records in ``config.json`` and its results, and
    what its store's hash covers: the study, its settings, and the recipe they imply (q_A's
    fitting recipe for guides and schedules; the stopping rule and the chosen ``variants`` for
    convergence; the transfer configuration for the ablation), so a resume after the code's
    defaults changed is refused."""
    if study in ("guides", "schedules"):
        recipe = _recipe(config)
        fitting = config_to_dict(recipe)["fitting"]
        recipe = {"fitting": fitting, "flow_lr": recipe.flow_lr, "warm_start": recipe.warm_start}
    elif study == "convergence":
        recipe = {"rule": asdict(ExperimentConfig().stopping_rule), "variants": [asdict(v) for v in CONVERGENCE_VARIANTS if v.key in variants]}
    else:
        recipe = {"experiment": ablation_base(config).to_dict()}
    return json.loads(json.dumps({"study": study, "config": asdict(config), "recipe": recipe}))


def _prepare_study_dir(out: Path, description: dict, resume: bool, overwrite: bool, grid_fields: tuple[str, ...] = (),
                       raisable_fields: tuple[str, ...] = ()) -> None:
    """``--out`` for a study that runs through the engine: with ``resume``, it must hold a run of
    ``description`` (its ``config.json``), up to the fields of ``grid_fields`` (dotted, as
    :func:`~pyro_bbt.runstore.disallowed_differences` reads them: the axes a resume may change,
    its units keyed by them) and the caps of ``raisable_fields`` (dotted too), which it may raise; otherwise an unfinished run there needs ``overwrite``,
    which removes it, and one of another study is never removed (its store would mix with this
    one's: choose another ``--out``). ``ValueError`` with one line otherwise."""
    path = out / "config.json"
    try:
        saved = json.loads(path.read_text())
    except FileNotFoundError:
        if resume:
            raise ValueError(f"--resume: {out} holds no run to resume (no config.json)") from None
        saved = {}
    except (json.JSONDecodeError, UnicodeDecodeError) as error:
        if resume:
            raise ValueError(f"--resume: {path} is damaged ({type(error).__name__}: {error}); rerun with --overwrite") from None
        saved = {}
    if resume and not isinstance(saved, dict):
        raise ValueError(f"--resume: {path} is damaged (not a JSON object); rerun with --overwrite")
    other = saved.get("study") if isinstance(saved, dict) else None
    unfinished = [name for name in STUDY_PROGRESS if (out / name).exists()]
    if other not in (None, description["study"]) and (resume or unfinished):
        raise ValueError(f"{out} holds a run of the {other} study ({', '.join(['config.json', *unfinished])}); give the {description['study']} study "
                         "another --out")
    if resume:
        saved = {k: v for k, v in saved.items() if k != "preset"}
        if grid_fields and saved.get("study") == description["study"]:
            blocking = disallowed_differences(saved, description, grid_fields, raisable_fields, neutral_fields=LATER_FIELDS)
            if blocking:
                raise ValueError(f"--resume: the run in {out} has another configuration ({'; '.join(blocking)})")
            return
        if saved != description:
            keys = sorted(k for k in set(saved.get("config", {})) | set(description["config"])
                          if saved.get("config", {}).get(k) != description["config"].get(k))
            what = f"config: {', '.join(keys)}" if keys else ", ".join(k for k in sorted(set(saved) | set(description)) if saved.get(k) != description.get(k))
            raise ValueError(f"--resume: the run in {out} has another configuration ({what})")
        return
    if unfinished and not overwrite:
        raise ValueError(f"{out} holds an unfinished run ({', '.join(unfinished)}); pass --resume to continue it or --overwrite to start afresh")
    for name in unfinished:
        shutil.rmtree(out / name)


def _open_store(args: argparse.Namespace, description: dict, grid_fields: tuple[str, ...] = (), raisable_fields: tuple[str, ...] = ()) -> RunStore:
    """The engine's store of the study in ``args.out``, after :func:`_prepare_study_dir`; a new
    run's ``config.json`` is written first, and a resume's that changes the grid (``grid_fields``)
    or raises a cap (``raisable_fields``) rewrites it, saying so, as the transfer CLI's does: the
    store's units are read whatever grid made them, and its checkpoints whatever lower cap."""
    _prepare_study_dir(args.out, description, args.resume, args.overwrite, grid_fields, raisable_fields)
    if args.resume and grid_fields:
        saved = {k: v for k, v in json.loads((args.out / "config.json").read_text()).items() if k != "preset"}
        changed = [f for f in differing_fields(saved.get("config", {}), description["config"]) if f"config.{f}" in grid_fields]
        if changed:
            print(f"--resume: the grid changes ({', '.join(changed)}); the points the run holds are read back", file=sys.stderr, flush=True)
        raised = [f"{name.rsplit('.', 1)[-1]} {old} -> {new}" for name in raisable_fields
                  if (old := _dotted(saved, name)) != (new := _dotted(description, name))]
        if raised:
            print(f"--resume: a cap rises ({', '.join(raised)}); a fit in progress runs on to it from its checkpoint, a finished fit keeps "
                  "the record it ended with", file=sys.stderr, flush=True)
    if not args.resume or grid_fields:
        atomic_write_json(args.out / "config.json", {"preset": args.preset, **description})
    return RunStore(args.out, description, on_damaged=lambda message: print(f"warning: {message}", file=sys.stderr, flush=True),
                    grid_fields=grid_fields, raisable_fields=raisable_fields, neutral_fields=LATER_FIELDS)


def _dotted(description: dict, name: str):
    """The field ``name`` (dotted, ``"config.experiment.max_epochs_b"``) of ``description``, or ``None``."""
    value = description
    for part in name.split("."):
        value = value.get(part) if isinstance(value, dict) else None
    return value


def _write_results(args: argparse.Namespace, results: dict, timing: dict[str, dict], start: float) -> None:
    """``<study>.json`` (``results``: the same bytes whatever the executor and however often the
    run was resumed) and ``timing.json`` (every row's wall-clock fields, ``timing``, by row)."""
    atomic_write_json(args.out / "timing.json", {"rows": timing, "wall_clock": time.perf_counter() - start, "workers": args.workers})
    atomic_write_json(args.out / f"{args.study}.json", results)
    print(f"done in {time.perf_counter() - start:.0f} s: {args.out / f'{args.study}.json'}")


def _run_side_study(args: argparse.Namespace, config: StudyConfig, store: RunStore, reuse: Path | None) -> list[dict]:
    """The rows of the side study ``args.study`` (guides, schedules, convergence or ablation), and
    its figures and tables in ``args.out``."""
    run = dict(workers=args.workers, store=store)
    if args.study == "guides":
        rows = compare_guides(config, **run)
        plot_guides(rows, args.out / "guides.png")
        atomic_write_text(args.out / "guides.md", guides_table(rows))
    elif args.study == "schedules":
        rows = compare_schedules(config, **run)
        plot_schedules(rows, args.out / "comparing_beta.png")
    elif args.study == "convergence":
        rows = compare_convergence(config, variants=[v for v in CONVERGENCE_VARIANTS if v.key in args.variants], **run)
        plot_convergence(rows, args.out / "convergence.png")
        atomic_write_text(args.out / "convergence.md", convergence_table(rows))
    else:
        rows = ablation(config, reuse=reuse, **run)
        atomic_write_text(args.out / "ablation.md", ablation_table(rows))
    return rows


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.out is None:
        args.out = Path("runs/studies") / args.study
    target = args.out / f"{args.study}.json"

    def usage(message: str) -> int:
        print(f"{parser.prog}: error: {message}", file=sys.stderr)
        return 2

    if args.resume and args.overwrite:
        return usage("--overwrite and --resume contradict each other; pass one")
    if target.exists() and not args.overwrite and not args.resume:
        return usage(f"{target} exists; pass --overwrite or choose another --out")
    start = time.perf_counter()
    if args.variants != VARIANT_KEYS and args.study != "convergence":
        return usage("--variants applies to the convergence study only")
    if args.reuse and args.study not in ("tradeoff", "ablation", "uncertainty"):
        return usage("--reuse applies to the tradeoff, ablation and uncertainty studies only")
    if (args.predictors is not None or args.warm_start is not None) and args.study != "uncertainty":
        return usage("--predictors and --warm-start apply to the uncertainty study only")
    if args.workers < 1:
        return usage(f"--workers must be an integer >= 1, got {args.workers}")
    grid = {name: value for name in ("heads", "seeds", "fractions", "taus", "lambdas") if (value := getattr(args, name)) is not None}
    if grid and args.study != "tradeoff":
        return usage(f"--{', --'.join(grid)} apply to the tradeoff study only")
    if args.max_epochs_b is not None and args.study != "tradeoff":
        return usage("--max-epochs-b applies to the tradeoff study only")
    if 0.0 in grid.get("taus", ()):
        return usage("--taus must be > 0 (a broadening of q_A's widths), got 0")
    if bad := [f for f in grid.get("fractions", ()) if not 0.0 < f <= 1.0]:
        return usage(f"--fractions must each be in (0, 1] (a fraction of B's training data), got {', '.join(f'{f:g}' for f in bad)}")
    if args.preset not in (TRADEOFF_PRESETS if args.study == "tradeoff" else PRESETS):
        return usage(f"--preset {args.preset} is the tradeoff study's only; the {args.study} study's are {', '.join(sorted(PRESETS))}")
    if args.study == "uncertainty":
        uconfig = UncertaintyConfig(**UNCERTAINTY_PRESETS[args.preset] | ({} if args.predictors is None else {"predictors": args.predictors})
                                    | ({} if args.warm_start is None else {"warm_start": args.warm_start}))
        try:
            reused, reused_from = reused_rows(uconfig, args.reuse)
            description = {"study": args.study, "config": json.loads(json.dumps(config_to_dict(uconfig))), "reused": reused_from}
            store = _open_store(args, description)
        except ValueError as error:  # a --reuse directory of another configuration, or without uncertainty.json; a --resume that cannot
            return usage(str(error))
        rows = uncertainty_study(uconfig, workers=args.workers, reuse=reused, store=store)
        plot_uncertainty(rows, args.out / "uncertainty.png")
        plot_reliability(rows, args.out / "reliability.png")
        plot_shift(rows, args.out / "shift.png")
        atomic_write_text(args.out / "uncertainty.md", uncertainty_table(rows))
        if any(r["convergence"] is not None for r in rows):
            atomic_write_text(args.out / "guides.md", guides_table(guide_rows(rows)))
        _write_results(args, {"study": args.study, "preset": args.preset, "config": description["config"],
                              "rows": [without_timing(r) for r in rows], "reused": reused_from},
                       {f"{r['predictor']}-s{r['seed']}": row_timing(r) for r in rows}, start)
        return 0
    if args.study == "tradeoff":
        preset = dict(TRADEOFF_PRESETS[args.preset]) | grid
        if args.max_epochs_b is not None:
            preset["experiment"] = dict(preset.get("experiment", {})) | {"max_epochs_b": args.max_epochs_b}
        try:
            tconfig = TradeoffConfig(**preset | {"experiment": ExperimentConfig(**preset.get("experiment", {})), "reuse": _reuse_by_head(args.reuse)})
            saved = reused_tradeoff_stages(tconfig)  # its configuration must be the study's, checked before anything is written
            description = tradeoff_description(tconfig)
            store = _open_store(args, description, TRADEOFF_GRID_FIELDS, TRADEOFF_CAP_FIELDS)
        except ValueError as error:  # a --reuse directory of another configuration, or without config.json; a --resume that cannot
            return usage(str(error))
        rows = tradeoff(tconfig, workers=args.workers, store=store, saved=saved)
        plot_tradeoff(rows, args.out / "tradeoff.png")
        atomic_write_text(args.out / "tradeoff.md", tradeoff_table(rows))
    else:
        config = StudyConfig(**(PRESETS[args.preset] | STUDY_OVERRIDES.get((args.study, args.preset), {})))
        description = study_description(args.study, config, args.variants)
        try:
            reuse = _reuse_by_head(args.reuse) if args.reuse else {}
            if set(reuse) - {"shared"}:
                raise ValueError(f"--reuse for the ablation takes the shared head's run; got heads {', '.join(sorted(reuse))}")
            if reuse:  # its configuration must be the ablation's, checked before anything is written
                reused_stages(ablation_base(config), reuse["shared"], config.seeds)
            store = _open_store(args, description)
        except ValueError as error:  # a --reuse directory of another configuration or head, or without config.json; a --resume that cannot
            return usage(str(error))
        rows = _run_side_study(args, config, store, reuse.get("shared"))
    split = [split_timing(r) for r in rows]
    _write_results(args, {"study": args.study, "preset": args.preset, **description, "rows": [clean for clean, _ in split]},
                   {row_key(args.study, r): timing for r, (_, timing) in zip(rows, split)}, start)
    return 0


if __name__ == "__main__":
    sys.exit(main())
