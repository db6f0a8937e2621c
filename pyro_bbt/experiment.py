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
:mod:`pyro_bbt.config` (re-exported here); this module holds :func:`run_experiment` (plan -> the study
engine's units, :func:`grid_units`, on an executor and a store -> summary) and
the sequential mode's entry :func:`run_sequence` (the rotation and permutation chains live in
:mod:`pyro_bbt.chain_sequence`, the split-MNIST sequence of five tasks in
:mod:`pyro_bbt.split_sequence`); :mod:`pyro_bbt.plan` lists the units of a run and what each needs,
:mod:`pyro_bbt.units` trains them (the studies import its training helpers from there), and
:mod:`pyro_bbt.executors` runs them in this process, in worker processes or as Ray tasks.
"""

from __future__ import annotations

import sys
from collections.abc import Callable
from functools import partial

from tqdm import tqdm

from .config import FITS_B, HEADS, LATER_FIELDS, METHODS, PRESETS, PRIORS, Q_INITS, ExperimentConfig
from .convergence import elbo_test_text
from .engine import Unit, UnitOutcome, run_units
from .executors import Executor, SerialExecutor
from .plan import Plan, StageSpec, UnitSpec, build_plan
from .stats import mean_std
from .runstore import RunStore
from .split_sequence import SplitConfig, run_split_sequence
from .chain_sequence import CHAIN_SEQUENCES, SEQUENCE_LENGTH, SEQUENCE_METHODS, run_chain_sequence, sequence_tasks
from .units import b_unit, failed_b_unit, failed_stage, stage_unit, steps_for, unit_key

__all__ = [
    "METHODS", "Q_INITS", "HEADS", "PRIORS", "FITS_B", "LATER_FIELDS", "SEQUENCES", "CHAIN_SEQUENCES", "SEQUENCE_METHODS", "SEQUENCE_LENGTH", "ExperimentConfig", "PRESETS",
    "grid_units", "run_experiment", "run_sequence", "sequence_tasks", "steps_for", "summarize_units", "unit_key",
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


def grid_units(config: ExperimentConfig, plan: Plan) -> list[Unit]:
    """The engine's units of ``plan`` (``config``'s grid), in its order: each task-A stage a
    :func:`~pyro_bbt.units.stage_unit` kept by its state alone (``stages/KEY.pt``, no record: the
    layout of every A -> B run directory, so one written before the grid ran on the engine
    resumes), hence run on every resume, rebuilding its ``task_a`` entry from the saved stage;
    each B unit a :func:`~pyro_bbt.units.b_unit` needing its stage (if any), failing with
    :func:`~pyro_bbt.units.failed_unit_record`."""
    out = []
    for item in plan.order:
        if isinstance(item, StageSpec):
            out.append(Unit(item.key, stage_unit, (config, item), failed=failed_stage, kept="state"))
        else:
            failed = partial(failed_b_unit, item)
            out.append(Unit(item.key, b_unit, (config, item), needs=(item.needs,), failed=failed) if item.needs is not None
                       else Unit(item.key, b_unit, (config, item, None), failed=failed))
    return out


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
    them, run as :func:`grid_units` by the study engine (:func:`~pyro_bbt.engine.run_units`) on
    ``executor`` (default: :class:`~pyro_bbt.executors.SerialExecutor` with one torch thread).
    With ``store``, every finished B unit (its record) and task-A stage (its state) is saved as
    it completes, the unit in progress after every epoch (sent back by the workers), and
    whatever the store already holds is reused, so a rerun resumes, under any executor: B units
    read back, stages rebuilt from their saved state, not fitted again. Records come out in the
    plan's order whatever order units finish in, so the results do not depend on the executor
    or its number of workers.

    A unit whose loss or parameters become non-finite is recorded with ``status: "failed"``
    and its error (and saved: a resume keeps it); a unit that raises or whose worker dies is
    recorded failed with the error too, but not saved, so a resume runs it again. A task-A
    stage that fails fails the units that need it with ``task A failed: ...`` (saved unless the
    stage raised or its worker died); the stage itself is never saved failed, so a resume runs
    it again. Either way the others go on. A q_A that the stopping rule does not call converged
    is reported through ``warn`` (default: ``log``) when ``transfer`` will use it, and listed
    under ``"warnings"``. ``progress`` shows one bar for the grid (units done / total, failures).
    """
    warn = warn or log
    if progress:  # lines printed while the bar is shown: clear it first, redraw it after
        log, warn = _around_bar(log), _around_bar(warn)
    executor = executor or SerialExecutor()
    plan = build_plan(config)
    specs = {item.key: item for item in plan.order}

    def report(unit: Unit, outcome: UnitOutcome) -> None:
        spec = specs[unit.key]
        if isinstance(spec, StageSpec):
            _log_stage(config, spec, outcome.record, log, warn)
        else:
            _log_unit(spec, outcome.record, log)

    outcomes = run_units(grid_units(config, plan), executor, store, on_finish=report, progress=progress)
    entries = {s.key: outcomes[s.key].record["entry"] for s in plan.stages if not outcomes[s.key].failed}
    units = [outcomes[u.key].record for u in plan.units]
    warnings = [
        _not_converged_warning(s.seed, entries[s.key]["convergence"])
        for s in plan.stages
        if s.kind == "bayesian" and s.key in entries and "transfer" in config.methods and not entries[s.key]["convergence"]["converged"]
    ]
    return {
        "schema_version": 3,
        "config": config.to_dict(),
        "threads_per_unit": executor.threads,
        "warnings": warnings,
        "task_a": [entries[s.key] for s in plan.stages if s.key in entries],
        "units": units,
        "summary": summarize_units(units),
    }


def _log_stage(config: ExperimentConfig, spec: StageSpec, record: dict, log: Callable[[str], None], warn: Callable[[str], None]) -> None:
    """Report a finished task-A stage (``record``: :func:`~pyro_bbt.units.stage_unit`'s): its
    failure, or its fit (q_A's verdict, and the not-converged warning when ``transfer`` uses it)."""
    if record["status"] != "ok":
        log(f"seed {spec.seed}: {record['error']}")
        return
    entry = record["entry"]
    if spec.kind == "bayesian":
        verdict = entry["convergence"]
        how = "taken from the run's store" if record.get("reused") else f"fitted in {record['seconds']:.1f} s"
        log(
            f"seed {spec.seed}: task A {how}, {verdict['epochs']} epochs, "
            f"{'converged' if verdict['converged'] else 'not converged'}, uninformed sigma ratio "
            f"{verdict['uninformed_scale_ratio']}, test accuracy {entry['a_test']['accuracy']:.4f}"
        )
        if "transfer" in config.methods and not verdict["converged"]:
            warn("warning: " + _not_converged_warning(spec.seed, verdict))
    else:
        log(f"seed {spec.seed}: deterministic task A net for EWC, test accuracy {entry['a_test']['accuracy']:.4f}")


def _log_unit(spec: UnitSpec, record: dict, log: Callable[[str], None]) -> None:
    """Report a finished B unit: its accuracies, or its failure."""
    head = f"seed {spec.seed} fraction {spec.fraction:g} {spec.method:>8}"
    if record["status"] == "ok":
        log(f"{head}: B acc {record['b_test']['accuracy']:.4f}, A acc after B {record['a_test_after']['accuracy']:.4f}, "
            f"{record['steps']} steps, {record['seconds']:.1f} s")
    else:
        log(f"{head}: FAILED: {record['error']}")


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
