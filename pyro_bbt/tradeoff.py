"""The transfer / forgetting trade-off: B's test accuracy against A's test accuracy after B.

Every method buys accuracy on B with accuracy on A. One knob each sets the price:

* ``transfer`` -- the broadening ``tau`` of the transferred prior ``N(loc_A, (tau scale_A)^2)``
  (``tau = 1``: q_A itself; ``tau -> inf``: no memory of A), q_B started at q_A;
* ``ewc`` -- the penalty ``lambda`` of ``(lambda/2) sum_k F_k (theta_k - theta*_k)^2``;
* ``finetune`` (``tau = inf`` with q_B from q_A, prior N(0, sigma^2)) and ``scratch`` are points;
  ``joint`` (A and B together) is the reference for remembering.

Per head (``shared``: the original's; ``multihead``: VCL's), seed and fraction of B's data:
q_A is fitted once by the stopping rule (:mod:`pyro_bbt.convergence`) and shared by every
``tau``; the deterministic net of EWC and its Fisher once and shared by every ``lambda``; every
point gets the same data and the same step budget on B (:func:`~pyro_bbt.experiment.steps_for`).
With ``reuse`` (head -> directory of a finished ``python -m pyro_bbt.transfer`` run of the same
configuration) those task-A stages are read from that run instead of being fitted again.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np

from .ewc import EWCPenalty
from .config import PRESETS, ExperimentConfig
from .fitting import broaden
from .plots import COLORS
from .stats import sample_std
from .runstore import ReadOnlyStore
from .units import (
    FitStorage,
    fit_task_a,
    fit_task_a_ewc,
    head_view,
    load_task_pair,
    run_bayesian_b,
    run_ewc_b,
    run_joint,
    steps_for,
)

__all__ = ["TradeoffConfig", "TRADEOFF_PRESETS", "tradeoff", "tradeoff_table", "plot_tradeoff"]


@dataclass
class TradeoffConfig:
    """The grid of the study; ``experiment`` holds everything else (network, budget, fit of A).
    ``experiment.head``, ``fractions`` and ``seeds`` are overridden by the fields here."""

    heads: tuple[str, ...] = ("shared", "multihead")
    fractions: tuple[float, ...] = (0.01, 0.1, 1.0)
    seeds: tuple[int, ...] = (0, 1, 2)
    taus: tuple[float, ...] = (1.0, 3.0, 10.0, 100.0)
    lambdas: tuple[float, ...] = (10.0, 1e3, 1e5)
    experiment: ExperimentConfig | None = None
    reuse: dict[str, Path] | None = None


TRADEOFF_PRESETS = {
    "quick": dict(seeds=(0,), fractions=(0.1,), taus=(1.0, 10.0), lambdas=(10.0, 1e3),
                  experiment=dict(epochs_a=1, max_epochs_a=None, batch_size_a=None, epochs=1, min_steps=50, limit_train=4000, limit_eval=2000, eval_samples=16)),
    # The experiment's paper preset when the study was run (paper-v1): with --reuse, the q_A of
    # its runs (one per head) are read, not refitted.
    "paper": dict(experiment=dict(PRESETS["paper-v1"])),
}


def tradeoff(config: TradeoffConfig, log=print) -> list[dict]:
    """One row per (head, seed, fraction, method, knob): B and A test accuracy after B."""
    rows = []
    for head in config.heads:
        base = replace(config.experiment or ExperimentConfig(), head=head, tau=1.0)
        reused = (config.reuse or {}).get(head)
        run = FitStorage(ReadOnlyStore(reused, base.to_dict())) if reused is not None else FitStorage()
        for seed in config.seeds:
            full = load_task_pair(base, 1.0, seed)
            stage_a = fit_task_a(base, full, seed, run)
            steps_a = steps_for(len(full.a.train), base.epochs_a, base.batch_size)
            stage_ewc = fit_task_a_ewc(base, full, steps_a, seed, run)
            fisher = stage_ewc.penalty.fisher
            verdict = stage_a.convergence
            log(f"{head} seed {seed}: q_A {verdict['epochs']} epochs, converged {verdict['converged']}, uninformed sigma ratio {verdict['uninformed_scale_ratio']}")
            for fraction in config.fractions:
                tasks = load_task_pair(base, fraction, seed)
                steps = steps_for(len(tasks.b.train), base.epochs, base.batch_size, base.min_steps)
                points = [("scratch", None), ("finetune", None), ("joint", None)]
                points += [("transfer", tau) for tau in config.taus] + [("ewc", lam) for lam in config.lambdas]
                for method, knob in points:
                    start = time.perf_counter()
                    if method == "transfer":
                        stage = replace(stage_a, prior_from_a=broaden(stage_a.prior_from_a, knob))
                        outcome = run_bayesian_b(replace(base, tau=knob), method, tasks, stage, steps, seed)
                    elif method == "ewc":
                        penalty = EWCPenalty(head_view(base, stage_ewc.net, 0), fisher, knob)
                        outcome = run_ewc_b(base, tasks, replace(stage_ewc, penalty=penalty), steps, seed)
                    elif method == "joint":
                        joint_steps = steps_for(len(tasks.a.train) + len(tasks.b.train), 1, base.batch_size, steps_a + steps)
                        outcome = run_joint(base, tasks, joint_steps, seed, FitStorage(), key="")
                    else:
                        outcome = run_bayesian_b(base, method, tasks, stage_a, steps, seed)
                    rows.append({
                        "head": head, "seed": seed, "fraction": fraction, "method": method, "knob": knob, "steps": steps,
                        "b_test_accuracy": outcome["b_test"].accuracy, "a_test_after_accuracy": outcome["a_test_after"].accuracy,
                        "q_a_converged": verdict["converged"], "q_a_epochs": verdict["epochs"],
                        "q_a_uninformed_scale_ratio": verdict["uninformed_scale_ratio"], "seconds": time.perf_counter() - start,
                    })
                    label = method if knob is None else f"{method} {'tau' if method == 'transfer' else 'lambda'} {knob:g}"
                    log(f"{head} seed {seed} fraction {fraction:g} {label:>22}: B {rows[-1]['b_test_accuracy']:.4f}, A after B {rows[-1]['a_test_after_accuracy']:.4f}")
    return rows


def _points(rows: list[dict]) -> dict:
    """(head, fraction, method, knob) -> list of (B acc, A acc) over seeds, in first-seen order."""
    grouped: dict = {}
    for r in rows:
        grouped.setdefault((r["head"], r["fraction"], r["method"], r["knob"]), []).append((r["b_test_accuracy"], r["a_test_after_accuracy"]))
    return grouped


def _cell(values) -> str:
    return f"{np.mean(values):.3f} ± {float(sample_std(values)):.3f}"


def tradeoff_table(rows: list[dict]) -> str:
    """Markdown: per head and fraction, every point's B and A accuracy (mean ± std over seeds)."""
    lines = ["| head | B fraction | method | knob | B test accuracy | A test accuracy after B | seeds |", "|---|---|---|---|---|---|---|"]
    for (head, fraction, method, knob), pairs in _points(rows).items():
        knob_text = "—" if knob is None else (f"τ = {knob:g}" if method == "transfer" else f"λ = {knob:g}")
        b, a = zip(*pairs)
        lines.append(f"| {head} | {fraction:g} | {method} | {knob_text} | {_cell(b)} | {_cell(a)} | {len(pairs)} |")
    return "\n".join(lines) + "\n"


def plot_tradeoff(rows: list[dict], path) -> None:
    """One panel per (head, fraction): A accuracy after B (x) against B accuracy (y); transfer a
    curve over tau and EWC a curve over lambda, the other methods points; error bars: std over seeds."""
    from .plots import save_figure, plt

    heads = list(dict.fromkeys(r["head"] for r in rows))
    fractions = list(dict.fromkeys(r["fraction"] for r in rows))
    grouped = _points(rows)
    fig, axes = plt.subplots(len(heads), len(fractions), figsize=(4.2 * len(fractions), 3.8 * len(heads)), squeeze=False)
    for i, head in enumerate(heads):
        for j, fraction in enumerate(fractions):
            ax = axes[i][j]
            for method in dict.fromkeys(r["method"] for r in rows):
                keys = [k for k in grouped if k[:3] == (head, fraction, method)]
                if not keys:
                    continue
                b = np.array([np.mean([p[0] for p in grouped[k]]) for k in keys])
                a = np.array([np.mean([p[1] for p in grouped[k]]) for k in keys])
                b_err = [float(sample_std([p[0] for p in grouped[k]])) for k in keys]
                a_err = [float(sample_std([p[1] for p in grouped[k]])) for k in keys]
                style = "-o" if len(keys) > 1 else "s"
                ax.errorbar(a, b, xerr=a_err, yerr=b_err, fmt=style, ms=4, capsize=2, color=COLORS.get(method), label=method)
                if len(keys) > 1:
                    for k, x, y in zip(keys, a, b):
                        ax.annotate(f"{k[3]:g}", (x, y), textcoords="offset points", xytext=(3, 3), fontsize=6, color=COLORS.get(method))
            ax.set_title(f"{head} head, B fraction {fraction:g}", fontsize=9)
            ax.set_xlabel("A test accuracy after B")
            ax.set_ylabel("B test accuracy")
            ax.grid(alpha=0.3)
    axes[0][-1].legend(fontsize=7, loc="lower left")
    save_figure(fig, path)
