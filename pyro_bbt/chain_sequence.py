"""The chains A -> B -> C -> D of rotated or permuted copies of task A, as units on the study engine.

``python -m pyro_bbt.transfer --sequence rotations|permutations``: the four tasks of
:func:`sequence_tasks` (task A's digits rotated by 0, 15, 30, 45 degrees, or with pixel
permutations, task 0 unpermuted) are learnt in order by each Bayesian sequential method:

* ``transfer`` -- every task's prior is the previous posterior (scales x ``tau``,
  :func:`~pyro_bbt.fitting.prior_from_posterior`) and ``q`` starts there, as in variational
  continual learning;
* ``finetune`` -- ``q`` starts at the previous posterior, the prior stays the base prior.

Every task trains for B's fixed budget, ``steps_for(N, epochs, batch_size, min_steps)`` steps at
``lr``/``scale_lr`` (:func:`~pyro_bbt.fitting.fit_posterior` with
:meth:`~pyro_bbt.experiment.ExperimentConfig.recipe_b`): the stopping rule judges each fit (its
verdict is kept under ``fits``) but stops none. After task ``i`` the posterior's test accuracy
on every task fills row ``i`` of the accuracy matrix ``R[i][j]``; forward transfer is measured
against the randomly initialised model's accuracy on each task (GEM).

The plan (:func:`plan_chains`) holds one unit per method, seed and task (:func:`chain_unit`);
task ``i``'s unit needs task ``i - 1``'s of the same method and seed and receives its state (the
posterior, and under ``transfer`` the prior it leaves). :func:`run_chain_sequence` runs the plan
on any executor through :func:`~pyro_bbt.engine.run_units` and, with a
:class:`~pyro_bbt.runstore.RunStore`, keeps every finished unit and the fit in progress, so a
rerun on the same store resumes. A unit whose fit goes non-finite fails, and so do the later
tasks of its chain: their rows stay NaN and the seed has no ``summary``.
"""

from __future__ import annotations

import warnings
from collections.abc import Callable

import numpy as np

from .config import ExperimentConfig
from .checkpoint import prior_from_state, prior_state
from .continual import summarize
from .data import Split, Task, load_task
from .engine import Unit, UnitCheckpoints, UnitOutcome, run_units
from .executors import Executor
from .fitting import fit_posterior, guide_state, prior_from_posterior
from .inference import NonFiniteLossError
from .runstore import RunStore
from .units import bayesian_metrics, steps_for


__all__ = [
    "CHAIN_SEQUENCES", "SEQUENCE_METHODS", "SEQUENCE_LENGTH", "sequence_tasks", "chain_methods", "chain_key", "chain_unit", "plan_chains",
    "run_chain_sequence",
]

CHAIN_SEQUENCES = ("rotations", "permutations")
SEQUENCE_METHODS = ("transfer", "finetune")
SEQUENCE_LENGTH = 4


def sequence_tasks(kind: str, digits: tuple[int, ...], seed: int) -> list[Task]:
    """The chain A -> B -> C -> D over the same digits: rotated by 0, 15, 30, 45 degrees (as the
    original), or with pixel permutations (task 0 unpermuted). (The ``split`` sequence's tasks
    are :func:`~pyro_bbt.split_sequence.split_tasks`.)"""
    if kind not in CHAIN_SEQUENCES:
        raise ValueError(f"unknown sequence {kind!r}; allowed: {', '.join(CHAIN_SEQUENCES)}")
    if kind == "rotations":
        return [Task(digits=digits, rotation=15.0 * k, seed=seed, name=f"rot{15 * k}") for k in range(SEQUENCE_LENGTH)]
    return [Task(digits=digits, permutation_seed=None if k == 0 else 1000 + k, seed=seed, name=f"perm{k}") for k in range(SEQUENCE_LENGTH)]


def chain_methods(config: ExperimentConfig) -> tuple[str, ...]:
    """The methods of ``config`` the chains run (those in :data:`SEQUENCE_METHODS`, in
    ``config``'s order); ``ValueError`` when there is none."""
    methods = tuple(m for m in config.methods if m in SEQUENCE_METHODS)
    if not methods:
        raise ValueError(f"sequential mode runs the methods {', '.join(SEQUENCE_METHODS)}; got {', '.join(config.methods)}")
    return methods


def chain_key(kind: str, method: str, seed: int, task: int) -> str:
    """The unit of task ``task`` in ``method``'s chain for ``seed``, e.g. ``rotations-transfer-t1-s0``."""
    return f"{kind}-{method}-t{task}-s{seed}"


def _chain_data(config: ExperimentConfig, kind: str, seed: int) -> tuple[list[Split], list[Split]]:
    """The training and test splits of the four tasks for ``seed``, on ``config.device``."""
    data = [load_task(task, limit_train=config.limit_train, limit_eval=config.limit_eval) for task in sequence_tasks(kind, config.task_a, seed)]
    return [d.train.to(config.device) for d in data], [d.test.to(config.device) for d in data]


def _accuracy_row(config: ExperimentConfig, model, guide, tests: list[Split]) -> list[float]:
    """Posterior-predictive test accuracy on every task (``eval_samples`` weight samples, head 0)."""
    return [bayesian_metrics(model, guide, test, config.eval_samples, 0).accuracy for test in tests]


def chain_unit(config: ExperimentConfig, kind: str, method: str, seed: int, task: int, key: str, previous: dict | None,
               checkpoint: dict | None = None, on_checkpoint: Callable[[str, dict], None] | None = None) -> UnitOutcome:
    """Task ``task`` of ``method``'s chain for ``seed``: a fresh network (seeded with ``seed``)
    under the base prior (task 0, and every task under ``finetune``) or the prior ``previous``
    left (``transfer``), its guide started at ``previous``'s posterior (task 0, ``previous=None``:
    at the fresh initialisation), fitted on the task's training split for B's fixed budget,
    continuing from ``checkpoint`` and sending each epoch's to ``on_checkpoint``.

    Its record holds the accuracy ``row`` on every task after the fit and the ``fit`` (steps,
    epochs, the rule's verdict, seconds); task 0's also the untrained network's accuracy row
    (``baseline``). Its state, for task ``task + 1``: the posterior (``guide``) and, under
    ``transfer``, the next prior (``prior``). A non-finite loss fails the unit."""
    trains, tests = _chain_data(config, kind, seed)
    prior = prior_from_state(previous["prior"]) if previous is not None and method == "transfer" else config.base_prior()
    model, guide = config.new_posterior(prior, seed)
    record: dict = {"status": "ok", "task": task}
    if previous is None:
        record["baseline"] = _accuracy_row(config, model, guide, tests)
    else:
        guide.load_state_dict(previous["guide"])
    steps = steps_for(len(trains[task]), config.epochs, config.batch_size, config.min_steps)
    store = UnitCheckpoints(checkpoint, on_checkpoint) if on_checkpoint is not None else None
    try:
        fit = fit_posterior(model, guide, trains[task], config.recipe_b(steps), seed, store=store, key=key)
    except NonFiniteLossError as error:
        return UnitOutcome({**record, "status": "failed", "error": f"task {task}: {error}"})
    record["row"] = _accuracy_row(config, model, guide, tests)
    record["fit"] = {"task": task, "steps": fit.steps, "epochs": fit.epochs, "convergence": fit.convergence, "seconds": fit.seconds}
    if task + 1 == SEQUENCE_LENGTH:
        return UnitOutcome(record)
    state = {"guide": guide_state(guide)}
    if method == "transfer":
        state["prior"] = prior_state(prior_from_posterior(guide, model, config.base_prior(), config.base_prior_std, config.tau))
    return UnitOutcome(record, state)


def plan_chains(config: ExperimentConfig, kind: str) -> list[Unit]:
    """The units of the ``kind`` chains for every seed and method of ``config``: task ``t`` of a
    chain needs task ``t - 1`` of the same chain."""
    units: list[Unit] = []
    for seed in config.seeds:
        for method in chain_methods(config):
            keys = [chain_key(kind, method, seed, t) for t in range(SEQUENCE_LENGTH)]
            units.append(Unit(keys[0], chain_unit, (config, kind, method, seed, 0, keys[0], None)))
            units += [Unit(keys[t], chain_unit, (config, kind, method, seed, t, keys[t]), needs=(keys[t - 1],)) for t in range(1, SEQUENCE_LENGTH)]
    return units


def _chain_entry(outcomes: dict[str, UnitOutcome], kind: str, method: str, seed: int) -> dict:
    """``results.json``'s entry of one chain: the accuracy matrix (rows after a failed task NaN),
    the random-init accuracies, the fits, the summary when every task finished, and the first
    failure's ``error`` when one did not."""
    R = np.full((SEQUENCE_LENGTH, SEQUENCE_LENGTH), np.nan)
    fits: list[dict] = []
    error = ""
    for t in range(SEQUENCE_LENGTH):
        record = outcomes[chain_key(kind, method, seed, t)].record
        if record["status"] != "ok":
            error = record.get("error", "")
            break
        R[t] = record["row"]
        fits.append(record["fit"])
    baseline = outcomes[chain_key(kind, method, seed, 0)].record.get("baseline")
    entry: dict = {"seed": seed, "accuracy_matrix": R.tolist(), "random_init_accuracy": baseline, "fits": fits}
    if error:
        entry["error"] = error
    else:
        entry["summary"] = summarize(R, baseline).to_dict()
    return entry


def _log_unit(log: Callable[[str], None]) -> Callable[[Unit, UnitOutcome], None]:
    def on_finish(unit: Unit, outcome: UnitOutcome) -> None:
        record = outcome.record
        if record["status"] != "ok":
            log(f"{unit.key} failed: {record.get('error', '')}")
        else:
            log(f"{unit.key}: after task {record['task']}: " + " ".join(f"{a:.3f}" for a in record["row"]))
    return on_finish


def run_chain_sequence(config: ExperimentConfig, kind: str, log: Callable[[str], None] = print, executor: Executor | None = None,
                       store: RunStore | None = None, progress: bool = False) -> dict:
    """Run the ``kind`` chains (one of :data:`CHAIN_SEQUENCES`) of every method of ``config``
    in :data:`SEQUENCE_METHODS` and every seed, as the units of :func:`plan_chains` on
    ``executor`` (default: serial), and return the content of ``results.json`` (its fits'
    ``"seconds"`` are wall-clock times, which the CLI moves to ``timing.json``). With ``store``,
    every finished unit and the fit in progress (after every epoch) are kept, so a rerun on the
    same store resumes; the result does not depend on the executor nor on interruptions."""
    methods = chain_methods(config)
    outcomes = run_units(plan_chains(config, kind), executor, store, on_finish=_log_unit(log), progress=progress, description=f"{kind} units")
    per_method = {m: [_chain_entry(outcomes, kind, m, seed) for seed in config.seeds] for m in methods}
    with warnings.catch_warnings():  # a row no seed reached stays NaN
        warnings.simplefilter("ignore", RuntimeWarning)
        means = {m: np.nanmean([e["accuracy_matrix"] for e in entries], axis=0).tolist() for m, entries in per_method.items()}
    return {
        "schema_version": 1,
        "mode": "sequence",
        "sequence": kind,
        "domains": [t.name for t in sequence_tasks(kind, config.task_a, 0)],
        "config": config.to_dict(),
        "methods": {m: {"per_seed": entries, "accuracy_matrix_mean": means[m]} for m, entries in per_method.items()},
    }
