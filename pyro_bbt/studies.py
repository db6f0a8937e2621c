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
"""

from __future__ import annotations

import argparse
import itertools
import json
import shutil
import statistics
import sys
import time
from dataclasses import asdict, dataclass, replace
from functools import partial
from pathlib import Path

import numpy as np

from .data import Task, load_task
from .evaluation import evaluate
from .experiment import PRESETS as EXPERIMENT_PRESETS
from .experiment import ExperimentConfig
from .fitting import FitRecipe, broaden, fit_posterior
from .files import atomic_write_json, atomic_write_text
from .guides import GUIDES, WARM_GUIDES, posterior_loc_scale
from .kl_schedules import KL_SCHEDULES
from .convergence import StoppingRule, assess_convergence, uninformed_scale_ratio
from .stats import format_mean_std, sample_std
from .priors import GaussianPrior
from .runstore import ReadOnlyStore, RunStore
from .tradeoff import TRADEOFF_PRESETS, TradeoffConfig, plot_tradeoff, tradeoff, tradeoff_table
from .units import FitStorage, fit_task_a, load_task_pair, run_bayesian_b, steps_for
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
    without_timing,
)

__all__ = ["StudyConfig", "compare_guides", "guides_table", "compare_schedules", "ablation", "build_parser", "main"]

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
                        start: dict | None = None, posteriors: dict | None = None) -> dict:
    """One fit on task A by q_A's recipe, judged by the stopping rule, scored on A's test set;
    started at the posterior ``start`` if given. With ``posteriors``, the fitted posterior
    (:func:`~pyro_bbt.guides.posterior_loc_scale`) is stored there under ``seed``."""
    train_split, _, test = _task_a(config, seed)
    model, q, convergence, history = fit_guide(_recipe(config), guide, train_split, seed, kl_schedule=kl_schedule, start=start)
    metrics = evaluate(model, q, test.x, test.y, num_samples=config.eval_samples)
    if posteriors is not None:
        posteriors[seed] = posterior_loc_scale(q, model)
    return {"seed": seed, **metrics.to_dict(), "seconds_per_epoch": statistics.median(e["seconds"] for e in history),
            "fit_seconds": sum(e["seconds"] for e in history), "epochs": convergence["epochs"], "converged": convergence["converged"],
            "convergence": convergence, "history": history}


def compare_guides(config: StudyConfig, guides: tuple[str, ...] = GUIDES, log=print) -> list[dict]:
    """Every guide fitted on task A by q_A's recipe to convergence (or the cap), per seed. The
    guides of :data:`~pyro_bbt.guides.WARM_GUIDES` start at the same seed's fitted ``meanfield``
    posterior, as in the uncertainty study
    (:attr:`~pyro_bbt.uncertainty_study.UncertaintyConfig.warm_start`); that fit is the
    ``meanfield`` row's when it has one, else it is made for them. ``started_from`` records it as
    the uncertainty study does, and such a fit counts as converged only when that one did too."""
    rows = []
    posteriors: dict[int, dict] = {}
    meanfield: dict[int, dict] = {}  # seed -> its meanfield row, fitted once whichever guide needs it first
    warm = _recipe(config).warm_start == "meanfield"

    def meanfield_row(seed: int) -> dict:
        if seed not in meanfield:
            meanfield[seed] = _fit_to_convergence(config, seed, guide="meanfield", posteriors=posteriors)
        return meanfield[seed]

    for guide, seed in itertools.product(guides, config.seeds):
        started_from = None
        if guide == "meanfield":
            row = dict(meanfield_row(seed))
        elif warm and guide in WARM_GUIDES:
            start = meanfield_row(seed)
            started_from = {"guide": "meanfield", "epochs": start["epochs"], "converged": start["converged"], "fit_seconds": start["fit_seconds"]}
            row = _fit_to_convergence(config, seed, guide=guide, start=posteriors[seed])
            row["converged"] = row["converged"] and start["converged"]
        else:
            row = _fit_to_convergence(config, seed, guide=guide)
        rows.append({"guide": guide, **row, "started_from": started_from})
        r = rows[-1]
        log(f"guide {guide:>9} seed {seed}: accuracy {r['accuracy']:.4f}, NLL {r['nll']:.4f}, ECE {r['ece']:.4f}, "
            f"{r['epochs']} epochs ({'converged' if r['converged'] else 'NOT converged'}), {r['seconds_per_epoch']:.1f} s/epoch"
            + ("" if started_from is None else f", from {started_from['guide']}"))
    return rows


def compare_schedules(config: StudyConfig, schedules: tuple[str, ...] = KL_SCHEDULES, log=print) -> list[dict]:
    """``meanfield`` fitted on task A by q_A's recipe under every KL schedule, per seed."""
    rows = []
    for schedule, seed in itertools.product(schedules, config.seeds):
        rows.append({"kl_schedule": schedule, **_fit_to_convergence(config, seed, kl_schedule=schedule)})
        r = rows[-1]
        log(f"schedule {schedule:>8} seed {seed}: accuracy {r['accuracy']:.4f}, NLL {r['nll']:.4f}, ECE {r['ece']:.4f}, "
            f"ELBO {r['history'][-1]['elbo']:.4g} after {r['epochs']} epochs ({'converged' if r['converged'] else 'NOT converged'})")
    return rows


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


def compare_convergence(config: StudyConfig, rule: StoppingRule | None = None, variants=CONVERGENCE_VARIANTS, log=print) -> list[dict]:
    """Fit q_A under each variant by ``rule`` (its learning-rate drops, their factor and the cap
    set by the variant) for at most ``config.max_epochs``, else ``variant.max_epochs``, else
    ``config.epochs`` epochs; per
    epoch record the ELBO, the cumulative wall time of the optimisation steps, the median sigma
    per weight site and the uninformed-weight sigma ratio; ``rule_epoch`` is where the rule
    stopped the fit (``None``: it never held)."""
    rule = rule or ExperimentConfig().stopping_rule
    rows = []
    for variant, seed in itertools.product(variants, config.seeds):
        ratios: list[float | None] = []
        cap = config.max_epochs or variant.max_epochs or config.epochs
        variant_rule = replace(rule, max_epochs=cap, min_epochs=min(rule.min_epochs, cap), lr_drops=variant.lr_drops, lr_factor=variant.lr_factor)
        history, metrics = _fit_on_a(config, seed, kl_schedule=variant.kl_schedule, lr=variant.lr, scale_lr=variant.scale_lr, stopping=variant_rule,
                                     batch_size=variant.batch_size,
                                     on_epoch=lambda model, q, data, _: ratios.append(uninformed_scale_ratio(q, model, data.x)))
        records = history
        converged = assess_convergence(records, variant_rule).converged
        rows.append({"variant": variant.name, **asdict(variant), "seed": seed,
                     **metrics.to_dict(), "rule_epoch": len(records) if converged else None, "uninformed_scale_ratio": ratios,
                     "wall": list(itertools.accumulate(e["seconds"] for e in records)), "history": records})
        final = records[-1]
        log(f"{variant.name:>42} seed {seed}: ELBO {final['elbo']:.4g} after {len(records)} epochs ({rows[-1]['wall'][-1]:.0f} s), "
            f"median sigma {', '.join(f'{v:.3f}' for v in final['median_scale'].values())}, "
            f"uninformed ratio {ratios[-1]}, rule stopped it at epoch {rows[-1]['rule_epoch']}, test accuracy {metrics.accuracy:.4f}")
    return rows


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


def ablation(config: StudyConfig, log=print, reuse: Path | None = None) -> list[dict]:
    """Transfer on B at ``config.ablation_fraction`` under the variants of
    :data:`ABLATION_VARIANTS`, shared head; task A is fitted once per seed (or read from the
    finished run ``reuse`` of the same configuration) and shared by every variant, the step
    budget is the same. A variant's learning rate other than the base's applies to the widths
    too (the original used one rate for both)."""
    base = ablation_base(config)
    run = FitStorage(ReadOnlyStore(reuse, base.to_dict())) if reuse is not None else FitStorage()
    rows = []
    for seed in config.seeds:
        stage_a = fit_task_a(base, load_task_pair(base, 1.0, seed), seed, run)
        verdict = stage_a.convergence
        log(f"seed {seed}: q_A {verdict['epochs']} epochs, converged {verdict['converged']}, uninformed sigma ratio {verdict['uninformed_scale_ratio']}")
        tasks = load_task_pair(base, config.ablation_fraction, seed)
        steps = steps_for(len(tasks.b.train), base.epochs, base.batch_size, base.min_steps)
        for name, method, q_init, tau, lr in ABLATION_VARIANTS:
            variant = replace(base, q_init=q_init, tau=tau, lr=lr, scale_lr=base.scale_lr if lr == base.lr else None)
            stage = replace(stage_a, prior_from_a=broaden(stage_a.prior_from_a, tau))
            start = time.perf_counter()
            outcome = run_bayesian_b(variant, method, tasks, stage, steps, seed)
            rows.append({"variant": name, "method": method, "q_init": q_init, "tau": tau, "lr": lr, "seed": seed, "steps": steps,
                         "b_test_accuracy": outcome["b_test"].accuracy, "a_test_after_accuracy": outcome["a_test_after"].accuracy,
                         "a_test_before_accuracy": stage_a.a_test.accuracy, "q_a_convergence": verdict, "seconds": time.perf_counter() - start})
            log(f"{name:>62} seed {seed}: B {rows[-1]['b_test_accuracy']:.4f}, A after B {rows[-1]['a_test_after_accuracy']:.4f}")
    return rows


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
    parser.add_argument("--preset", choices=sorted(PRESETS), default="quick")
    parser.add_argument("--out", type=Path, default=Path("runs/studies"))
    parser.add_argument("--overwrite", action="store_true")
    parser.add_argument("--resume", action="store_true",
                        help="uncertainty only: continue the run in --out (same configuration): its finished units (in --out/units) are "
                             "read back, the others run")
    parser.add_argument("--reuse", type=Path, nargs="+", default=[], metavar="RUN_DIR",
                        help="tradeoff and ablation: finished python -m pyro_bbt.transfer runs (tradeoff: one per head; ablation: the "
                             "shared head's) of the preset's configuration, whose fitted q_A (and EWC nets) are read instead of fitted again; "
                             "uncertainty: earlier uncertainty outputs of the same configuration, whose predictors' rows are taken as they are "
                             "(only the other predictors are fitted)")
    parser.add_argument("--workers", type=int, default=1, metavar="N",
                        help="uncertainty only: run its units (one per guide and seed, one per seed for the nets) in N processes")
    parser.add_argument("--predictors", type=_predictor_names, default=None, metavar="NAME,NAME",
                        help=f"uncertainty only: the guides and baselines to fit and score (default all: {', '.join(PREDICTORS)})")
    parser.add_argument("--warm-start", choices=WARM_STARTS, default=None,
                        help="uncertainty only: start lowrank, planar and iaf at the same seed's fitted meanfield posterior "
                             "(meanfield, the default) or afresh (fresh)")
    parser.add_argument("--variants", type=_variant_keys, default=VARIANT_KEYS, metavar="KEY,KEY",
                        help=f"convergence only: the fitting variants to run (default all: {', '.join(VARIANT_KEYS)})")
    return parser


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


def _prepare_study_dir(out: Path, description: dict, resume: bool, overwrite: bool) -> None:
    """``--out`` for a study that runs through the engine: with ``resume``, it must hold a run of
    ``description`` (its ``config.json``); otherwise an unfinished run there needs ``overwrite``,
    which removes it. ``ValueError`` with one line otherwise."""
    if resume:
        path = out / "config.json"
        try:
            saved = json.loads(path.read_text())
        except FileNotFoundError:
            raise ValueError(f"--resume: {out} holds no run to resume (no config.json)") from None
        except (json.JSONDecodeError, UnicodeDecodeError) as error:
            raise ValueError(f"--resume: {path} is damaged ({type(error).__name__}: {error}); rerun with --overwrite") from None
        if not isinstance(saved, dict):
            raise ValueError(f"--resume: {path} is damaged (not a JSON object); rerun with --overwrite")
        saved.pop("preset", None)
        if saved != description:
            keys = sorted(k for k in set(saved.get("config", {})) | set(description["config"])
                          if saved.get("config", {}).get(k) != description["config"].get(k))
            what = f"config: {', '.join(keys)}" if keys else ", ".join(k for k in sorted(set(saved) | set(description)) if saved.get(k) != description.get(k))
            raise ValueError(f"--resume: the run in {out} has another configuration ({what})")
        return
    unfinished = [name for name in STUDY_PROGRESS if (out / name).exists()]
    if unfinished and not overwrite:
        raise ValueError(f"{out} holds an unfinished run ({', '.join(unfinished)}); pass --resume to continue it or --overwrite to start afresh")
    for name in unfinished:
        shutil.rmtree(out / name)


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    target = args.out / f"{args.study}.json"
    if args.resume and args.overwrite:
        print(f"{parser.prog}: error: --overwrite and --resume contradict each other; pass one", file=sys.stderr)
        return 2
    if args.resume and args.study != "uncertainty":
        print(f"{parser.prog}: error: --resume applies to the uncertainty study only (the other studies do not run through the engine yet)",
              file=sys.stderr)
        return 2
    if target.exists() and not args.overwrite and not args.resume:
        print(f"{parser.prog}: error: {target} exists; pass --overwrite or choose another --out", file=sys.stderr)
        return 2
    start = time.perf_counter()
    if args.variants != VARIANT_KEYS and args.study != "convergence":
        print(f"{parser.prog}: error: --variants applies to the convergence study only", file=sys.stderr)
        return 2
    if args.reuse and args.study not in ("tradeoff", "ablation", "uncertainty"):
        print(f"{parser.prog}: error: --reuse applies to the tradeoff, ablation and uncertainty studies only", file=sys.stderr)
        return 2
    if (args.workers != 1 or args.predictors is not None or args.warm_start is not None) and args.study != "uncertainty":
        print(f"{parser.prog}: error: --workers, --predictors and --warm-start apply to the uncertainty study only", file=sys.stderr)
        return 2
    if args.workers < 1:
        print(f"{parser.prog}: error: --workers must be an integer >= 1, got {args.workers}", file=sys.stderr)
        return 2
    if args.study == "tradeoff":
        preset = dict(TRADEOFF_PRESETS[args.preset])
        try:
            config = TradeoffConfig(**preset | {"experiment": ExperimentConfig(**preset.get("experiment", {})), "reuse": _reuse_by_head(args.reuse)})
            rows = tradeoff(config)
        except ValueError as error:  # a --reuse directory of another configuration, or without config.json
            print(f"{parser.prog}: error: {error}", file=sys.stderr)
            return 2
        plot_tradeoff(rows, args.out / "tradeoff.png")
        atomic_write_text(args.out / "tradeoff.md", tradeoff_table(rows))
        atomic_write_json(target, {"study": args.study, "preset": args.preset, "config": asdict(config) | {"reuse": {h: str(d) for h, d in (config.reuse or {}).items()}}, "rows": rows,
                                   "seconds": time.perf_counter() - start})
        print(f"done in {time.perf_counter() - start:.0f} s: {target}")
        return 0
    if args.study == "uncertainty":
        uconfig = UncertaintyConfig(**UNCERTAINTY_PRESETS[args.preset] | ({} if args.predictors is None else {"predictors": args.predictors})
                                    | ({} if args.warm_start is None else {"warm_start": args.warm_start}))
        try:
            reused, reused_from = reused_rows(uconfig, args.reuse)
            description = {"study": args.study, "config": json.loads(json.dumps(config_to_dict(uconfig))), "reused": reused_from}
            _prepare_study_dir(args.out, description, args.resume, args.overwrite)
        except ValueError as error:  # a --reuse directory of another configuration, or without uncertainty.json; a --resume that cannot
            print(f"{parser.prog}: error: {error}", file=sys.stderr)
            return 2
        if not args.resume:
            atomic_write_json(args.out / "config.json", {"preset": args.preset, **description})
        store = RunStore(args.out, description, on_damaged=lambda message: print(f"warning: {message}", file=sys.stderr, flush=True))
        rows = uncertainty_study(uconfig, workers=args.workers, reuse=reused, store=store)
        plot_uncertainty(rows, args.out / "uncertainty.png")
        plot_reliability(rows, args.out / "reliability.png")
        plot_shift(rows, args.out / "shift.png")
        atomic_write_text(args.out / "uncertainty.md", uncertainty_table(rows))
        if any(r["convergence"] is not None for r in rows):
            atomic_write_text(args.out / "guides.md", guides_table(guide_rows(rows)))
        # uncertainty.json is the same bytes whatever the executor and however often the run was resumed: the wall-clock
        # fields of every row go to timing.json
        atomic_write_json(args.out / "timing.json", {"rows": {f"{r['predictor']}-s{r['seed']}": row_timing(r) for r in rows},
                                                      "wall_clock": time.perf_counter() - start, "workers": args.workers})
        atomic_write_json(target, {"study": args.study, "preset": args.preset, "config": description["config"],
                                   "rows": [without_timing(r) for r in rows], "reused": reused_from})
        print(f"done in {time.perf_counter() - start:.0f} s: {target}")
        return 0
    config = StudyConfig(**(PRESETS[args.preset] | STUDY_OVERRIDES.get((args.study, args.preset), {})))
    if args.study == "guides":
        rows = compare_guides(config)
        plot_guides(rows, args.out / "guides.png")
        atomic_write_text(args.out / "guides.md", guides_table(rows))
    elif args.study == "schedules":
        rows = compare_schedules(config)
        plot_schedules(rows, args.out / "comparing_beta.png")
    elif args.study == "convergence":
        rows = compare_convergence(config, variants=[v for v in CONVERGENCE_VARIANTS if v.key in args.variants])
        plot_convergence(rows, args.out / "convergence.png")
        atomic_write_text(args.out / "convergence.md", convergence_table(rows))
    else:
        reuse = _reuse_by_head(args.reuse) if args.reuse else {}
        if set(reuse) - {"shared"}:
            print(f"{parser.prog}: error: --reuse for the ablation takes the shared head's run; got heads {', '.join(sorted(reuse))}", file=sys.stderr)
            return 2
        try:
            rows = ablation(config, reuse=reuse.get("shared"))
        except ValueError as error:  # a --reuse directory of another configuration
            print(f"{parser.prog}: error: {error}", file=sys.stderr)
            return 2
        atomic_write_text(args.out / "ablation.md", ablation_table(rows))
    atomic_write_json(target, {"study": args.study, "preset": args.preset, "config": vars(config) | {"seeds": list(config.seeds)},
                               "rows": rows, "seconds": time.perf_counter() - start})
    print(f"done in {time.perf_counter() - start:.0f} s: {target}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
