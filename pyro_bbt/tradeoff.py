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
point gets the same data and the same fitting rule on B: B's fixed step budget
(:func:`~pyro_bbt.units.steps_for`), or, where ``experiment.fit_b`` is ``"rule"``, every
Bayesian point fitted to the verdict and every EWC point stopped early on B's validation split
(``experiment.ewc_patience``), each row saying whether its fit converged. With ``reuse`` (head ->
directory of a finished ``python -m pyro_bbt.transfer`` run of the same configuration) those
task-A stages are read from that run instead of being fitted again, and so are the rows of the
single points (scratch, finetune, joint) left out of ``baselines``: that run's own units.

The study is a plan of units for the study engine (:mod:`pyro_bbt.engine`): per head and seed
the two task-A stages (:func:`task_a_stage_unit`), per point one unit that needs its stage
(:func:`point_unit`), so it runs on ``--workers N`` processes and a killed run resumes
(``python -m pyro_bbt.studies tradeoff --resume``) as the other side studies do.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, replace
from pathlib import Path

import numpy as np

from .config import B_ONLY_FIELDS, CAP_FIELDS, GRID_FIELDS, LATER_FIELDS, PRESETS, RAISABLE_FIELDS, RUN_FIELDS, ExperimentConfig
from .engine import Unit, UnitCheckpoints, UnitOutcome, failed_outcome, row_outcome, run_study_units
from .ewc import EWCPenalty
from .executors import Executor
from .plan import STAGE_KINDS, StageSpec, stage_key
from .plots import COLORS
from .files import atomic_write_json, atomic_write_text
from .runstore import ReadOnlyStore, RunStore, disallowed_differences
from .stats import sample_std
from .units import (
    FitStorage,
    broadened_stage,
    ewc_stage_from_saved,
    head_view,
    load_task_pair,
    run_bayesian_b,
    run_ewc_b,
    run_joint,
    run_stage,
    stage_from_saved,
    steps_for,
    unit_key,
)

__all__ = ["BASELINES", "TRADEOFF_GRID_FIELDS", "TradeoffConfig", "TRADEOFF_PRESETS", "fit_status", "tradeoff", "task_a_stage_unit", "point_unit", "tradeoff_key", "tradeoff_base",
           "tradeoff_description", "reused_tradeoff_stages", "tradeoff_table", "plot_tradeoff", "MERGE_FREE_FIELDS", "TRADEOFF_CAP_FIELDS", "merge_tradeoff", "main"]


# The axes of the grid (dotted fields of :func:`tradeoff_description`), which a resume may change:
# every point is its own unit, keyed by them, so a run grows or shrinks along them.
TRADEOFF_GRID_FIELDS: tuple[str, ...] = ("config.heads", "config.fractions", "config.seeds", "config.taus", "config.lambdas")

# The single points of every panel (no knob): fitted by the study unless left out of ``baselines``.
BASELINES: tuple[str, ...] = ("scratch", "finetune", "joint")


@dataclass
class TradeoffConfig:
    """The grid of the study; ``experiment`` holds everything else (network, budget, fit of A).
    ``experiment.head``, ``fractions`` and ``seeds`` are overridden by the fields here.
    ``baselines``: which of :data:`BASELINES` the study fits (the others' rows come from the
    ``reuse`` runs, where they have them)."""

    heads: tuple[str, ...] = ("shared", "multihead")
    fractions: tuple[float, ...] = (0.01, 0.1, 1.0)
    seeds: tuple[int, ...] = (0, 1, 2)
    taus: tuple[float, ...] = (1.0, 3.0, 10.0, 100.0)
    lambdas: tuple[float, ...] = (10.0, 1e3, 1e5)
    experiment: ExperimentConfig | None = None
    reuse: dict[str, Path] | None = None
    baselines: tuple[str, ...] = BASELINES

    def __post_init__(self) -> None:
        unknown = [b for b in self.baselines if b not in BASELINES]
        if unknown:
            raise ValueError(f"baselines {', '.join(map(repr, unknown))} unknown; allowed: {', '.join(BASELINES)}")


TRADEOFF_PRESETS = {
    "quick": dict(seeds=(0,), fractions=(0.1,), taus=(1.0, 10.0), lambdas=(10.0, 1e3),
                  experiment=dict(epochs_a=1, max_epochs_a=None, batch_size_a=None, epochs=1, min_steps=50, limit_train=4000, limit_eval=2000, eval_samples=16)),
    # The experiment's paper preset when the study was run (paper-v1): with --reuse, the q_A of
    # its runs (one per head) are read, not refitted.
    "paper": dict(experiment=dict(PRESETS["paper-v1"])),
    # The converged A -> B grid's configuration (README's: the paper preset under N(0, 0.3^2), B's
    # fits polished, caps 12,000 / 20,000 epochs): every point fitted to the verdict (EWC's by early
    # stopping), at 10 % of B, where transfer and scratch are within two points on B and furthest
    # apart on A. (At 1 % a broadened prior fits as slowly as scratch there: tau 3, seed 0, was
    # still in its fit phase after 676 epochs.) With --reuse of that grid's runs (one per head)
    # q_A and EWC's nets are read, and scratch, finetune and joint are that grid's own units.
    # (paper-v5 with the grid's settings, not today's paper preset: the configuration, fractions and
    # methods included, that the study's published runs stored and --resume compares.)
    "converged": dict(fractions=(0.1,), baselines=(),
                      experiment=dict(PRESETS["paper-v5"]) | dict(prior_scale=0.3, polish_steps_b=30, max_epochs_a=12000, max_epochs_b=20000)),
}

def tradeoff_base(config: TradeoffConfig, head: str) -> ExperimentConfig:
    """The experiment configuration of ``head``'s points: ``config.experiment`` with that head and
    tau 1 (q_A's prior as it is; each transfer point broadens it by its own tau)."""
    return replace(config.experiment or ExperimentConfig(), head=head, tau=1.0)


def tradeoff_key(head: str, method: str, knob: float | None, fraction: float, seed: int) -> str:
    """The engine's key of a point (its name in ``units/`` and ``timing.json``), e.g.
    ``shared-scratch-f0.1-s0``, ``multihead-transfer-tau10-f0.01-s2``, ``shared-ewc-lambda1000-f1-s0``."""
    what = method if knob is None else f"{method}-{'tau' if method == 'transfer' else 'lambda'}{knob:g}"
    return f"{head}-{what}-f{fraction:g}-s{seed}"


def tradeoff_description(config: TradeoffConfig) -> dict:
    """What the study records in ``config.json`` and ``tradeoff.json`` and what its store's hash
    covers: the study and its whole configuration (the grid, every setting of the experiment, the
    ``--reuse`` directories by head), so a resume of another configuration is refused."""
    reuse = {head: str(path) for head, path in (config.reuse or {}).items()}
    described = asdict(replace(config, reuse=None)) | {"reuse": reuse}
    if config.baselines == BASELINES:  # as the studies stored before the field existed describe themselves
        del described["baselines"]
    return json.loads(json.dumps({"study": "tradeoff", "config": described}))


def reused_tradeoff_stages(config: TradeoffConfig) -> dict[tuple[str, str, int], dict | None]:
    """Per (head, stage kind, seed), the task-A stage of the finished ``python -m
    pyro_bbt.transfer`` run ``config.reuse`` names for that head (``None`` where there is none);
    ``ValueError`` naming the differences when that run's configuration is not the head's
    :func:`tradeoff_base`. Nothing is written there."""
    saved = {}
    for head, run_dir in (config.reuse or {}).items():
        if head in config.heads:
            store = _reused_store(config, head, run_dir)
            saved |= {(head, kind, seed): store.stage(stage_key(kind, seed)) for kind in STAGE_KINDS for seed in config.seeds}
    return saved


def _reused_store(config: TradeoffConfig, head: str, run_dir: Path) -> ReadOnlyStore:
    """``run_dir`` read as the transfer CLI reads its own store: its files may differ from
    ``head``'s :func:`tradeoff_base` in the grid (methods, fractions, seeds), how it was run and
    caps raised on resume; a stage also in what only B's fits read."""
    return ReadOnlyStore(run_dir, tradeoff_base(config, head).to_dict(), grid_fields=(*GRID_FIELDS, *RUN_FIELDS),
                         raisable_fields=RAISABLE_FIELDS, stage_free_fields=B_ONLY_FIELDS)


def reused_baseline_rows(config: TradeoffConfig) -> list[dict]:
    """The rows of the single points the study does not fit (:data:`BASELINES` not in
    ``config.baselines``), read from each head's ``reuse`` run: its unit of that method, fraction
    and seed (``ValueError`` where the run lacks one or it failed), with the fit's status
    (:func:`fit_status`) and ``"from"`` naming the run."""
    rows = []
    for head, run_dir in (config.reuse or {}).items():
        if head not in config.heads:
            continue
        store = _reused_store(config, head, run_dir)
        for seed in config.seeds:
            for fraction in config.fractions:
                for method in (b for b in BASELINES if b not in config.baselines):
                    record = store.record(unit_key(method, fraction, seed))
                    if record is None or record.get("status") != "ok":
                        raise ValueError(f"--reuse {run_dir}: no finished {method} unit at fraction {fraction:g}, seed {seed} "
                                         f"({'none' if record is None else 'it failed'}); fit it there (--resume) or add {method} to the baselines")
                    rows.append({"head": head, "seed": seed, "fraction": fraction, "method": method, "knob": None, "steps": record["steps"],
                                 "b_test_accuracy": record["b_test"]["accuracy"], "a_test_after_accuracy": record["a_test_after"]["accuracy"],
                                 **fit_status(record), "from": str(run_dir)})
    return rows


def fit_status(outcome: dict) -> dict:
    """Whether a point's fit converged: a Bayesian fit's verdict (``converged``, ``epochs``, where
    it did not, its last judgement's ``reasons``, and where the last judgement scored a
    continuation, what that continuation gained: ``continuation`` with its ``start_epoch``,
    ``epochs``, ``nats``, ``stderr``, ``per_datum`` and ``upper_per_datum``, the evidence of a
    pass), an EWC net's early stopping (converged when its patience stopped it, not its cap;
    ``stopped_by``); ``converged`` ``None`` for an EWC net trained for a fixed budget."""
    if outcome.get("convergence") is not None:
        convergence = outcome["convergence"]
        status = {"converged": bool(convergence["converged"]), "epochs": convergence["epochs"]}
        verdict = convergence.get("verdict")
        if not status["converged"] and isinstance(verdict, dict) and verdict.get("reasons"):
            status["reasons"] = list(verdict["reasons"])  # why the last judgement did not pass
        if isinstance(verdict, dict) and isinstance(verdict.get("continuation"), dict):
            gain = verdict["continuation"]
            status["continuation"] = {k: gain[k] for k in ("start_epoch", "epochs", "nats", "stderr", "per_datum", "upper_per_datum") if k in gain}
        return status
    stopping = outcome.get("early_stopping")
    if stopping is not None:
        return {"converged": stopping["stopped_by"] == "patience", "epochs": stopping["epochs"], "stopped_by": stopping["stopped_by"]}
    return {"converged": None}


def task_a_stage_unit(base: ExperimentConfig, spec: StageSpec, key: str, saved: dict | None, checkpoint: dict | None = None,
                      on_checkpoint: Callable | None = None) -> UnitOutcome:
    """Task A's stage ``spec`` as a unit of the engine, kept under ``key``: q_A fitted by
    ``base``'s recipe, with a checkpoint after every epoch (a resume continues a fit killed
    midway), or EWC's deterministic net and its Fisher, trained for ``spec.steps`` steps (run
    again from its start if killed) -- :func:`~pyro_bbt.units.run_stage` -- or rebuilt from
    ``saved`` (the stage of a finished transfer run, ``--reuse``). Its state is the stage the
    points on B start from; its record, A's test metrics and q_A's verdict (``None`` for EWC's
    net). A non-finite loss is a failed outcome."""
    forward = None if on_checkpoint is None else (lambda _, data: on_checkpoint(key, data))
    outcome = run_stage(base, spec, saved, checkpoint, forward)
    if outcome.error:
        return failed_outcome(outcome.error)
    state = outcome.state if outcome.state is not None else saved
    return UnitOutcome({"status": "ok", "seed": spec.seed, "a_test": outcome.entry["a_test"], "convergence": outcome.entry["convergence"]}, state)


def point_unit(base: ExperimentConfig, method: str, knob: float | None, fraction: float, seed: int, steps_a: int, key: str,
               stage: dict | None, checkpoint: dict | None = None, on_checkpoint: Callable | None = None) -> UnitOutcome:
    """One point of the trade-off: ``method`` on ``fraction`` of B's data for ``seed``, within B's
    step budget (:func:`~pyro_bbt.units.steps_for`, the same for every point), from ``stage``,
    the state of the :func:`task_a_stage_unit` it needs: ``transfer`` from q_A under q_A's prior
    broadened by ``knob`` (tau); ``finetune`` from q_A under N(0, sigma^2); ``ewc`` from EWC's
    net under its Fisher penalty weighted by ``knob`` (lambda); ``scratch`` (``stage`` None)
    afresh; ``joint`` (``stage`` None) on A and B together for ``steps_a`` (A's budget) plus B's
    budget. The Bayesian fits keep a checkpoint under ``key`` after every epoch. The row: B's
    test accuracy and A's after B, the budget, whether the fit converged (:func:`fit_status`), the
    fit's seconds (q_A's verdict is added by :func:`tradeoff`)."""
    tasks = load_task_pair(base, fraction, seed)
    steps = steps_for(len(tasks.b.train), base.epochs, base.batch_size, base.min_steps)
    run = FitStorage(UnitCheckpoints(checkpoint, on_checkpoint))
    start = time.perf_counter()
    if method == "transfer":
        stage_a = stage_from_saved(stage)
        outcome = run_bayesian_b(replace(base, tau=knob), method, tasks, broadened_stage(base, stage_a, knob), steps, seed, run, key)
    elif method == "ewc":
        stage_ewc = ewc_stage_from_saved(base, tasks, seed, stage)
        penalty = EWCPenalty(head_view(base, stage_ewc.net, 0), stage_ewc.penalty.fisher, knob)
        outcome = run_ewc_b(base, tasks, replace(stage_ewc, penalty=penalty), steps, seed)
    elif method == "joint":
        joint_steps = steps_for(len(tasks.a.train) + len(tasks.b.train), 1, base.batch_size, steps_a + steps)
        outcome = run_joint(base, tasks, joint_steps, seed, run, key)
    else:
        outcome = run_bayesian_b(base, method, tasks, None if stage is None else stage_from_saved(stage), steps, seed, run, key)
    return row_outcome({"head": base.head, "seed": seed, "fraction": fraction, "method": method, "knob": knob, "steps": steps,
                        "b_test_accuracy": outcome["b_test"].accuracy, "a_test_after_accuracy": outcome["a_test_after"].accuracy,
                        **fit_status(outcome), "seconds": time.perf_counter() - start})


def _point_line(r: dict) -> str:
    label = r["method"] if r["knob"] is None else f"{r['method']} {'tau' if r['method'] == 'transfer' else 'lambda'} {r['knob']:g}"
    return f"{r['head']} seed {r['seed']} fraction {r['fraction']:g} {label:>22}: B {r['b_test_accuracy']:.4f}, A after B {r['a_test_after_accuracy']:.4f}"


def _tradeoff_line(key: str, record: dict) -> str:
    if record.get("status") != "ok":
        return f"{key} failed: {record.get('error', '')}"
    if "row" in record:
        return _point_line(record["row"])
    verdict = record["convergence"]
    if verdict is None:
        return f"{key}: EWC's net and Fisher on A"
    return f"{key}: q_A {verdict['epochs']} epochs, converged {verdict['converged']}, uninformed sigma ratio {verdict['uninformed_scale_ratio']}"


def tradeoff(config: TradeoffConfig, log: Callable[[str], None] = print, workers: int = 1, executor: Executor | None = None,
             store: RunStore | None = None, saved: dict[tuple[str, str, int], dict | None] | None = None) -> list[dict]:
    """One row per (head, seed, fraction, method, knob): B and A test accuracy after B, and q_A's
    verdict. Per head and seed, one unit for q_A and one for EWC's net and Fisher
    (:func:`task_a_stage_unit`; read from ``saved``, default :func:`reused_tradeoff_stages`,
    where ``config.reuse`` has them), shared by every tau and lambda; per fraction one unit per
    point (:func:`point_unit`). They run by :func:`~pyro_bbt.engine.run_study_units` on
    ``executor`` (default: ``workers`` processes, or this process) and are kept in ``store``."""
    saved = reused_tradeoff_stages(config) if saved is None else saved
    reused = {(r["head"], r["seed"], r["fraction"], r["method"]): r for r in reused_baseline_rows(config)}
    units: list[Unit] = []
    stage_of: dict[str, str] = {}  # point -> the key of its q_A unit, whose verdict its row carries
    order: list[tuple[str, str] | tuple[str, dict, str]] = []  # the rows in grid order: a point's key, or a reused row
    for head in config.heads:
        base = tradeoff_base(config, head)
        for seed in config.seeds:
            steps_a = steps_for(len(load_task_pair(base, 1.0, seed).a.train), base.epochs_a, base.batch_size)
            stages = {kind: f"{head}-{stage_key(kind, seed)}" for kind in STAGE_KINDS}
            units += [Unit(stages[kind], task_a_stage_unit, (base, StageSpec(seed, kind, steps_a if kind == "deterministic" else 0), stages[kind],
                                                             saved.get((head, kind, seed))))
                      for kind in STAGE_KINDS]
            points = [(method, None) for method in config.baselines]
            points += [("transfer", tau) for tau in config.taus] + [("ewc", lam) for lam in config.lambdas]
            for fraction in config.fractions:
                order += [("reused", reused[head, seed, fraction, method], stages["bayesian"]) for method in BASELINES
                          if (head, seed, fraction, method) in reused]
                for method, knob in points:
                    key = tradeoff_key(head, method, knob, fraction, seed)
                    needs = {"transfer": "bayesian", "finetune": "bayesian", "ewc": "deterministic"}.get(method)
                    args = (base, method, knob, fraction, seed, steps_a, key)
                    units.append(Unit(key, point_unit, args, needs=(stages[needs],)) if needs else Unit(key, point_unit, (*args, None)))
                    stage_of[key] = stages["bayesian"]
                    order.append(("unit", key))
    outcomes = run_study_units(units, "tradeoff study", executor, workers, store,
                               on_finish=lambda unit, outcome: log(_tradeoff_line(unit.key, outcome.record)))
    rows = []
    for entry in order:
        row, stage = (outcomes[entry[1]].record["row"], stage_of[entry[1]]) if entry[0] == "unit" else (entry[1], entry[2])
        verdict = outcomes[stage].record["convergence"]
        rows.append({**row, "q_a_converged": verdict["converged"], "q_a_epochs": verdict["epochs"],
                     "q_a_uninformed_scale_ratio": verdict["uninformed_scale_ratio"]})
    return rows


def _points(rows: list[dict]) -> dict:
    """(head, fraction, method, knob) -> list of (B acc, A acc) over seeds, in first-seen order."""
    grouped: dict = {}
    for r in rows:
        grouped.setdefault((r["head"], r["fraction"], r["method"], r["knob"]), []).append((r["b_test_accuracy"], r["a_test_after_accuracy"]))
    return grouped


def _cell(values) -> str:
    return f"{np.mean(values):.3f} ± {float(sample_std(values)):.3f}"


def _knob_text(method: str, knob: float | None) -> str:
    return "—" if knob is None else (f"τ = {knob:g}" if method == "transfer" else f"λ = {knob:g}")


def tradeoff_table(rows: list[dict]) -> str:
    """Markdown: per head and fraction, every point's B and A accuracy (mean ± std over seeds,
    every fit), and how many of its fits converged (:func:`fit_status`; "—" for fixed budgets,
    rows made before it was recorded included); a point read from a reused run is marked
    "(reused)". Below the table, every fit that did not converge, by seed, with its accuracies,
    and its point's mean ± std over the converged fits alone."""
    lines = ["| head | B fraction | method | knob | B test accuracy | A test accuracy after B | seeds | converged fits |",
             "|---|---|---|---|---|---|---|---|"]
    notes = []
    grouped: dict = {}
    for r in rows:
        grouped.setdefault((r["head"], r["fraction"], r["method"], r["knob"]), []).append(r)
    for (head, fraction, method, knob), group in grouped.items():
        knob_text = _knob_text(method, knob)
        b, a = [r["b_test_accuracy"] for r in group], [r["a_test_after_accuracy"] for r in group]
        judged = [r["converged"] for r in group if r.get("converged") is not None]
        converged = f"{sum(judged)}/{len(group)}" if judged else "—"
        source = " (reused)" if any("from" in r for r in group) else ""
        lines.append(f"| {head} | {fraction:g} | {method}{source} | {knob_text} | {_cell(b)} | {_cell(a)} | {len(group)} | {converged} |")
        failed = [r for r in group if r.get("converged") is False]
        if failed:
            kept = [r for r in group if r.get("converged")]
            alone = (f"over the {len(kept)} converged fits alone B {_cell([r['b_test_accuracy'] for r in kept])}, "
                     f"A {_cell([r['a_test_after_accuracy'] for r in kept])}") if kept else "no fit of this point converged"
            seeds = "; ".join(f"seed {r['seed']}: B {r['b_test_accuracy']:.3f}, A {r['a_test_after_accuracy']:.3f}"
                              + (f", {r['epochs']} epochs" if r.get("epochs") is not None else "") for r in failed)
            notes.append(f"* NOT converged: {head}, B fraction {fraction:g}, {method} {knob_text}: {seeds} ({alone}).")
    return "\n".join(lines) + "\n" + ("\n" + "\n".join(notes) + "\n" if notes else "")


def plot_tradeoff(rows: list[dict], path) -> None:
    """One panel per (head, fraction): A accuracy after B (x) against B accuracy (y); transfer a
    curve over tau and EWC a curve over lambda, the other methods points; error bars: std over seeds.
    A point with a fit that did not converge is drawn hollow and labelled with how many did."""
    from .plots import save_figure, plt

    heads = list(dict.fromkeys(r["head"] for r in rows))
    fractions = list(dict.fromkeys(r["fraction"] for r in rows))
    grouped = _points(rows)
    verdicts: dict = {}
    for r in rows:
        verdicts.setdefault((r["head"], r["fraction"], r["method"], r["knob"]), []).append(r.get("converged"))
    failed = {key: f"{sum(bool(v) for v in vs)}/{len(vs)}" for key, vs in verdicts.items() if False in vs}  # "k/n converged"
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
                unconverged = [n for n, k in enumerate(keys) if k in failed]
                if unconverged:  # a point with a fit the verdict did not pass: hollow, and how many passed
                    ax.plot(a[unconverged], b[unconverged], "o" if len(keys) > 1 else "s", ms=6, mfc="white", color=COLORS.get(method))
                    for n in unconverged:
                        ax.annotate(f"{failed[keys[n]]} converged", (a[n], b[n]), textcoords="offset points", xytext=(3, -9), fontsize=6,
                                    color=COLORS.get(method))
                if len(keys) > 1:
                    for k, x, y in zip(keys, a, b):
                        ax.annotate(f"{k[3]:g}", (x, y), textcoords="offset points", xytext=(3, 3), fontsize=6, color=COLORS.get(method))
            ax.set_title(f"{'multi-head' if head == 'multihead' else head + ' head'}, B fraction {fraction:g}", fontsize=9)
            ax.set_xlabel("A test accuracy after B")
            ax.set_ylabel("B test accuracy")
            ax.grid(alpha=0.3)
    axes[0][-1].legend(fontsize=7, loc="lower left")
    save_figure(fig, path)


# What two trade-off results may differ in and still be merged: the grid's axes, where task A's
# stages and the single points were read from (``--reuse``), and which single points were fitted.
MERGE_FREE_FIELDS: tuple[str, ...] = TRADEOFF_GRID_FIELDS + ("config.reuse", "config.baselines")

# The Bayesian fits' epoch caps (dotted fields of :func:`tradeoff_description`): a fit's epochs
# before its cap do not depend on it, so ``--resume`` may raise them (``--max-epochs-b``: a fit in
# progress, or not yet started, runs to the new cap; a finished one keeps the record it ended with),
# and two results may differ in them and still be merged (a row from a file of other caps than the
# merged configuration's carries its own, ``caps``).
TRADEOFF_CAP_FIELDS: tuple[str, ...] = tuple(f"config.experiment.{name}" for name in CAP_FIELDS)


def _caps(results: dict) -> dict[str, int | None]:
    experiment = results["config"].get("experiment") or {}
    return {name: experiment.get(name) for name in CAP_FIELDS}


def _row_key(row: dict) -> tuple:
    return (row["head"], row["fraction"], row["method"], row["knob"], row["seed"])


def merge_tradeoff(base: dict, newer: dict, withdrawn: Sequence[tuple[str, str, float]] = ()) -> tuple[dict, list[tuple]]:
    """``base``'s ``tradeoff.json`` with the fits of ``newer`` (another ``tradeoff.json`` of the same
    configuration) in place of its own: a row is one fit, keyed by (head, fraction, method, knob,
    seed); a key ``newer`` holds replaces ``base``'s row in place, a key only ``newer`` holds is added
    after ``base``'s rows. Made to put refitted points (a defect fixed, a fit run on) into a study
    without fitting the rest again. A point of ``withdrawn`` ((head, method, knob): a finding no
    longer stood behind, whose refit is not finished) loses ``base``'s fits, at every fraction, and
    is listed under ``withdrawn``; ``newer``'s fits of it are kept.

    The two must be one configuration: every setting of the experiment equal (a setting one of them
    predates reads as :data:`~pyro_bbt.config.LATER_FIELDS`' value); only
    :data:`MERGE_FREE_FIELDS` may differ, and the epoch caps (:data:`TRADEOFF_CAP_FIELDS`): the merged
    configuration keeps ``base``'s caps, and each row taken from ``newer`` under other caps records
    ``newer``'s (``caps``: ``{"max_epochs_a": ..., "max_epochs_b": ...}``) unless it already names
    its own. Otherwise ``ValueError``, naming each differing field.
    Returns the merged results (``base``'s, with its grid's axes extended by ``newer``'s) and the
    keys of the replaced rows whose B or A accuracy changed."""
    for name, results in (("base", base), ("newer", newer)):
        if not isinstance(results, dict) or results.get("study") != "tradeoff" or not isinstance(results.get("rows"), list):
            study = results.get("study") if isinstance(results, dict) else type(results).__name__
            raise ValueError(f"{name} is not a trade-off study's results (tradeoff.json): study {study!r}")
    differences = disallowed_differences({"config": base.get("config")}, {"config": newer.get("config")},
                                         grid_fields=MERGE_FREE_FIELDS + TRADEOFF_CAP_FIELDS, neutral_fields=LATER_FIELDS)
    if differences:
        raise ValueError("the two trade-off results are different configurations: " + "; ".join(differences))
    own_caps = _caps(newer) if _caps(newer) != _caps(base) else None
    replacements = {_row_key(r): r if own_caps is None or "caps" in r else {**r, "caps": own_caps} for r in newer["rows"]}
    withdrawn = [(head, method, float(knob)) for head, method, knob in withdrawn]
    if missing := [w for w in withdrawn if not any((r["head"], r["method"], r["knob"]) == w for r in base["rows"])]:
        points = dict.fromkeys(f"{r['head']}:{r['method']}:{r['knob']:g}" for r in base["rows"] if r["knob"] is not None)
        raise ValueError("no such point to withdraw: " + ", ".join(f"{h}:{m}:{k:g}" for h, m, k in missing) + "; base's points: " + ", ".join(points))
    changed, rows = [], []
    for row in base["rows"]:
        key = _row_key(row)
        if (row["head"], row["method"], row["knob"]) in withdrawn and key not in replacements:
            continue
        new = replacements.pop(key, None)
        if new is not None and any(new[k] != row[k] for k in ("b_test_accuracy", "a_test_after_accuracy")):
            changed.append(key)
        rows.append(row if new is None else new)
    rows += [replacements[_row_key(r)] for r in newer["rows"] if _row_key(r) in replacements]
    config = dict(base["config"])
    for field in ("heads", "fractions", "seeds", "taus", "lambdas"):
        config[field] = list(dict.fromkeys([*base["config"].get(field, []), *newer["config"].get(field, [])]))
    merged = {**base, "config": config, "rows": rows}
    if withdrawn:
        merged["withdrawn"] = [{"head": h, "method": m, "knob": k} for h, m, k in withdrawn]
    return merged, changed


def _point(text: str) -> tuple[str, str, float]:
    """``HEAD:METHOD:KNOB`` (``multihead:transfer:10``) as a point of :func:`merge_tradeoff`'s ``withdrawn``."""
    parts = text.split(":")
    try:
        head, method, knob = parts
        return head, method, float(knob)
    except ValueError:
        raise argparse.ArgumentTypeError(f"a point is HEAD:METHOD:KNOB, e.g. multihead:transfer:10; got {text!r}") from None


def main(argv: list[str] | None = None) -> int:
    """``python -m pyro_bbt.tradeoff merge BASE NEWER [NEWER ...] --out DIR``: :func:`merge_tradeoff`
    of ``tradeoff.json`` files, each NEWER in turn into what the ones before made, written as
    ``DIR/tradeoff.json``, ``tradeoff.md`` and ``tradeoff.png`` (``merged_from`` records the paths);
    ``--withdraw HEAD:METHOD:KNOB`` leaves BASE's fits of that point out where no NEWER has them;
    the fits named as changed are BASE's that a NEWER replaced with other accuracies.
    Exit status 2 with one line on bad input."""
    parser = argparse.ArgumentParser(prog="python -m pyro_bbt.tradeoff", description=main.__doc__)
    parser.add_argument("command", choices=["merge"])
    parser.add_argument("base", type=Path, help="tradeoff.json whose rows are kept where NEWER has no fit of theirs")
    parser.add_argument("newer", type=Path, nargs="+", help="tradeoff.json files whose fits replace BASE's, merged in this order")
    parser.add_argument("--out", type=Path, required=True, help="folder for the merged tradeoff.json, .md and .png")
    parser.add_argument("--withdraw", type=_point, action="append", default=[], metavar="HEAD:METHOD:KNOB",
                        help="leave BASE's fits of this point out (a withdrawn finding whose refit is not done), e.g. multihead:transfer:10; repeatable")
    parser.add_argument("--overwrite", action="store_true")
    args = parser.parse_args(argv)

    def usage(message: str) -> int:
        print(f"{parser.prog}: error: {message}", file=sys.stderr)
        return 2

    target = args.out / "tradeoff.json"
    if target.exists() and not args.overwrite:
        return usage(f"{target} exists; pass --overwrite or choose another --out")
    try:
        base, *newer = (json.loads(path.read_text()) for path in (args.base, *args.newer))
        refits = newer[0]
        for later in newer[1:]:  # the refits first, each later one over the ones before
            refits, _ = merge_tradeoff(refits, later)
        merged, changed = merge_tradeoff(base, refits, args.withdraw)
    except (OSError, json.JSONDecodeError) as error:
        return usage(f"cannot read a trade-off result: {error}")
    except ValueError as error:
        return usage(str(error))
    merged["merged_from"] = [str(path) for path in (args.base, *args.newer)]
    plot_tradeoff(merged["rows"], args.out / "tradeoff.png")
    atomic_write_text(args.out / "tradeoff.md", tradeoff_table(merged["rows"]))
    atomic_write_json(target, merged)
    print(f"{len(merged['rows'])} fits; {len(changed)} replaced with other accuracies than they had: "
          + (", ".join(f"{h} f{f:g} {m} {k if k is None else f'{k:g}'} s{s}" for h, f, m, k, s in changed) or "none"))
    return 0


if __name__ == "__main__":
    sys.exit(main())
