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

Where the work lives: the configuration (:class:`ExperimentConfig`, :data:`PRESETS`) is
:mod:`pyro_bbt.config` (re-exported here); this module holds the driver :func:`run_experiment` (plan -> executor -> store -> summary) and
the sequential mode's entry :func:`run_sequence` (the rotation and permutation chains live in
:mod:`pyro_bbt.chain_sequence`, the split-MNIST sequence of five tasks in
:mod:`pyro_bbt.split_sequence`); :mod:`pyro_bbt.plan` lists the units of a run and what each needs,
:mod:`pyro_bbt.units` trains them (the studies import its training helpers from there), and
:mod:`pyro_bbt.executors` runs them in this process, in worker processes or as Ray tasks.
"""

from __future__ import annotations

import sys
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from tqdm import tqdm

from .config import FITS_B, HEADS, LATER_FIELDS, METHODS, PRESETS, PRIORS, Q_INITS, ExperimentConfig
from .convergence import elbo_test_text
from .executors import Executor, Job, JobResult, SerialExecutor
from .plan import Plan, StageSpec, UnitSpec, build_plan
from .stats import mean_std
from .runstore import RunStore
from .split_sequence import SplitConfig, run_split_sequence
from .chain_sequence import CHAIN_SEQUENCES, SEQUENCE_LENGTH, SEQUENCE_METHODS, run_chain_sequence, sequence_tasks
from .units import (
    StageOutcome,
    failed_unit_record,
    run_stage,
    run_unit,
    steps_for,
    unit_key,
)

__all__ = [
    "METHODS", "Q_INITS", "HEADS", "PRIORS", "FITS_B", "LATER_FIELDS", "SEQUENCES", "CHAIN_SEQUENCES", "SEQUENCE_METHODS", "SEQUENCE_LENGTH", "ExperimentConfig", "PRESETS",
    "run_experiment", "run_sequence", "sequence_tasks", "steps_for", "summarize_units", "unit_key",
]

# --------------------------------------------------------------------------- the protocol


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
                "b_test_accuracy": mean_std([u["b_test"]["accuracy"] for u in group]),
                "b_test_nll": mean_std([u["b_test"]["nll"] for u in group]),
                "b_test_ece": mean_std([u["b_test"]["ece"] for u in group]),
                "a_test_after_accuracy": mean_std([u["a_test_after"]["accuracy"] for u in group]),
            }
            if group[0]["backward_transfer"] is not None:
                entry["backward_transfer"] = mean_std([u["backward_transfer"] for u in group])
                entry["forward_transfer"] = mean_std([u["forward_transfer"] for u in group])
            out[method][fraction] = entry
    return out



def _not_converged_warning(seed: int, convergence: dict) -> str:
    drift = convergence["last_scale_drift"] or {}
    ratio = convergence["uninformed_scale_ratio"]
    return (
        f"seed {seed}: q_A is NOT converged after {convergence['epochs']} epochs "
        f"(ELBO test over the last {convergence['rule']['window']} epochs {elbo_test_text(convergence)}, "
        f"largest median-sigma drift in the last epoch {max(drift.values(), default=float('nan')):.3f}, "
        f"uninformed-weight sigma ratio {'n/a' if ratio is None else f'{ratio:.3f}'}); "
        "the transfer results of this seed rest on an unconverged posterior"
    )




@dataclass
class _Grid:
    """The driver's view of a run in progress: what is finished, what each stage left for the
    units that need it."""

    plan: Plan
    stage_states: dict[str, dict | None]
    stage_errors: dict[str, str]
    stage_crashed: set[str]
    entries: dict[str, dict]
    records: dict[str, dict]
    shared_states: dict[str, Any] = field(default_factory=dict)  # stage key -> executor.share(its state)

    def ready(self, item: StageSpec | UnitSpec) -> bool:
        return isinstance(item, StageSpec) or item.needs is None or item.needs in self.stage_states or item.needs in self.stage_errors


def _job(config: ExperimentConfig, item: StageSpec | UnitSpec, grid: _Grid, store: RunStore | None, executor: Executor) -> Job:
    """The job of ``item``: its unit function with the saved stage it needs and its own
    checkpoint, read from ``store`` by the driver; the unit's epoch checkpoints come back through
    the executor's forwarder and are written by the driver. A stage's state goes through
    ``executor.share`` once, for all the units that need it (Ray: one copy in its object store)."""
    checkpoint = store.checkpoint(item.key) if store is not None else None
    on_checkpoint = executor.forwarder(store.save_checkpoint) if store is not None else None
    if isinstance(item, StageSpec):
        saved = store.stage(item.key) if store is not None else None
        return Job(item.key, run_stage, (config, item, saved, checkpoint, on_checkpoint))
    state = None
    if item.needs is not None and item.needs in grid.stage_states:
        if item.needs not in grid.shared_states:
            grid.shared_states[item.needs] = executor.share(grid.stage_states[item.needs])
        state = grid.shared_states[item.needs]
    return Job(item.key, run_unit, (config, item, state, grid.stage_errors.get(item.needs, ""), checkpoint, on_checkpoint))


def _around_bar(write: Callable[[str], None]) -> Callable[[str], None]:
    def around(message: str) -> None:
        with tqdm.external_write_mode(file=sys.stderr):
            write(message)
    return around


def run_experiment(
    config: ExperimentConfig,
    log: Callable[[str], None] = print,
    store: RunStore | None = None,
    warn: Callable[[str], None] | None = None,
    executor: Executor | None = None,
    progress: bool = False,
) -> dict:
    """Run the whole protocol and return the results (the content of ``results.json``).

    The grid is :func:`~pyro_bbt.plan.build_plan`'s: task-A stages, then the B units that need
    them, each run by ``executor`` (default: :class:`~pyro_bbt.executors.SerialExecutor` with
    one torch thread) through :func:`~pyro_bbt.units.run_stage` / :func:`~pyro_bbt.units.run_unit`.
    This function alone writes ``store``: with one, every finished unit and task-A stage is
    saved as it completes, the unit in progress after every epoch (sent back by the workers),
    and whatever the store already holds is reused, so a rerun resumes, under any executor.
    Records come out in the plan's order whatever order units finish in, so the results do not
    depend on the executor or its number of workers.

    A unit whose loss or parameters become non-finite is recorded with ``status: "failed"``
    and its error (and saved: a resume keeps it); a unit that raises or whose worker dies is
    recorded failed with the error too, but not saved, so a resume runs it again. Either way
    the others go on. A q_A that the stopping rule does not call converged is reported through
    ``warn`` (default: ``log``) when ``transfer`` will use it, and listed under ``"warnings"``.
    ``progress`` shows one bar for the grid (units done / total, failures).
    """
    warn = warn or log
    if progress:  # lines printed while the bar is shown: clear it first, redraw it after
        log, warn = _around_bar(log), _around_bar(warn)
    executor = executor or SerialExecutor()
    plan = build_plan(config)
    grid = _Grid(plan, {}, {}, set(), {}, {})
    waiting: list[StageSpec | UnitSpec] = []
    for item in plan.order:
        record = store.record(item.key) if (store is not None and isinstance(item, UnitSpec)) else None
        if record is not None:
            grid.records[item.key] = record
        else:
            waiting.append(item)
    failures = sum(r["status"] != "ok" for r in grid.records.values())
    bar = tqdm(total=len(plan), initial=len(grid.records), disable=not progress, desc="units", unit="unit", file=sys.stderr, dynamic_ncols=True)
    try:
        while waiting or executor.busy():
            while executor.free_slots() > 0:
                item = next((i for i in waiting if grid.ready(i)), None)
                if item is None:
                    break
                waiting.remove(item)
                if isinstance(item, UnitSpec) and item.needs in grid.stage_errors:  # its stage failed: so does it
                    error = grid.stage_errors[item.needs]
                    result = JobResult(item.key, failed_unit_record(item.method, item.fraction, item.seed, item.steps, error))
                    if item.needs in grid.stage_crashed:  # not saved: a resume runs the stage again
                        result.error = error
                    failures += _finish_unit(item, result, grid, store, log)
                    bar.update(1)
                    bar.set_postfix(failed=failures)
                    continue
                executor.submit(_job(config, item, grid, store, executor))
            if not executor.busy():
                if waiting and not any(grid.ready(i) for i in waiting):
                    raise RuntimeError(f"units wait for stages that never ran: {[i.key for i in waiting]}")
                continue
            result = executor.next_result()
            item = next(i for i in plan.order if i.key == result.key)
            if isinstance(item, StageSpec):
                failures += _finish_stage(config, item, result, grid, store, log, warn)
            else:
                failures += _finish_unit(item, result, grid, store, log)
            bar.update(1)
            bar.set_postfix(failed=failures)
    finally:
        bar.close()
    units = [grid.records[u.key] for u in plan.units]
    warnings = [
        _not_converged_warning(s.seed, grid.entries[s.key]["convergence"])
        for s in plan.stages
        if s.kind == "bayesian" and s.key in grid.entries and "transfer" in config.methods and not grid.entries[s.key]["convergence"]["converged"]
    ]
    return {
        "schema_version": 3,
        "config": config.to_dict(),
        "threads_per_unit": executor.threads,
        "warnings": warnings,
        "task_a": [grid.entries[s.key] for s in plan.stages if s.key in grid.entries],
        "units": units,
        "summary": summarize_units(units),
    }


def _finish_stage(config: ExperimentConfig, spec: StageSpec, result: JobResult, grid: _Grid, store: RunStore | None,
                  log: Callable[[str], None], warn: Callable[[str], None]) -> int:
    """Take in a finished stage: save it, keep its state for its units, log it; 1 if it failed."""
    outcome: StageOutcome | None = result.value
    error = result.error or (outcome.error if outcome is not None else "")
    if error:
        grid.stage_errors[spec.key] = error if error.startswith("task A failed") else f"task A failed: {error}"
        if result.error:  # raised or its worker died, rather than a non-finite loss
            grid.stage_crashed.add(spec.key)
        log(f"seed {spec.seed}: {grid.stage_errors[spec.key]}")
        return 1
    if outcome.state is not None:
        if store is not None:
            store.save_stage(spec.key, outcome.state)
        grid.stage_states[spec.key] = outcome.state
    else:  # rebuilt from the store's copy
        grid.stage_states[spec.key] = store.stage(spec.key) if store is not None else None
    grid.entries[spec.key] = entry = outcome.entry
    if spec.kind == "bayesian":
        verdict = entry["convergence"]
        log(
            f"seed {spec.seed}: task A fitted in {outcome.seconds:.1f} s, {verdict['epochs']} epochs, "
            f"{'converged' if verdict['converged'] else 'not converged'}, uninformed sigma ratio "
            f"{verdict['uninformed_scale_ratio']}, test accuracy {entry['a_test']['accuracy']:.4f}"
        )
        if "transfer" in config.methods and not verdict["converged"]:
            warn("warning: " + _not_converged_warning(spec.seed, verdict))
    else:
        log(f"seed {spec.seed}: deterministic task A net for EWC, test accuracy {entry['a_test']['accuracy']:.4f}")
    return 0


def _finish_unit(spec: UnitSpec, result: JobResult, grid: _Grid, store: RunStore | None, log: Callable[[str], None]) -> int:
    """Take in a finished unit: keep (and, unless it crashed, save) its record, log it; 1 if it failed."""
    if result.ok:
        record = result.value
        if store is not None:
            store.save_record(spec.key, record)
    else:  # raised or its worker died: not saved, a resume runs it again
        record = failed_unit_record(spec.method, spec.fraction, spec.seed, spec.steps, result.error)
    grid.records[spec.key] = record
    head = f"seed {spec.seed} fraction {spec.fraction:g} {spec.method:>8}"
    if record["status"] == "ok":
        log(f"{head}: B acc {record['b_test']['accuracy']:.4f}, A acc after B {record['a_test_after']['accuracy']:.4f}, "
            f"{record['steps']} steps, {record['seconds']:.1f} s")
        return 0
    log(f"{head}: FAILED: {record['error']}")
    return 1


# --------------------------------------------------------------------------- sequential mode

SEQUENCES = (*CHAIN_SEQUENCES, "split")


def run_sequence(config: ExperimentConfig, kind: str, log: Callable[[str], None] = print, split: SplitConfig | None = None,
                 executor: Executor | None = None, store: RunStore | None = None, progress: bool = False) -> dict:
    """Run the sequence ``kind`` (one of :data:`SEQUENCES`) as units on ``executor`` (default:
    serial), kept in ``store`` (so a rerun on it resumes), and return the content of
    ``results.json`` (its ``"seconds"`` entries are wall-clock times, which the CLI moves to
    ``timing.json``).

    ``rotations`` and ``permutations``: the chain of :func:`sequence_tasks` with each Bayesian
    sequential method of ``config`` (:func:`~pyro_bbt.chain_sequence.run_chain_sequence`: every
    task for B's fixed budget, its verdict recorded, none fitted by the stopping rule).
    ``split``: the five tasks of split MNIST in the scenario and fit mode of ``split`` (required
    then): :func:`~pyro_bbt.split_sequence.run_split_sequence`."""
    if kind not in SEQUENCES:
        raise ValueError(f"unknown sequence {kind!r}; allowed: {', '.join(SEQUENCES)}")
    if kind == "split":
        if split is None:
            raise ValueError("the split sequence needs a SplitConfig (its scenario: task, domain or class)")
        return run_split_sequence(config, split, log=log, executor=executor, store=store, progress=progress)
    if split is not None:
        raise ValueError(f"a SplitConfig (scenario {split.scenario!r}) is only valid with the sequence 'split', not {kind!r}")
    return run_chain_sequence(config, kind, log=log, executor=executor, store=store, progress=progress)
