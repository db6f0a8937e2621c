"""The study engine: a plan of units with dependencies, run on any executor, kept in a store.

A study is data: a list of :class:`Unit` s, each a picklable function of its arguments and of
the states of the units it ``needs``, returning a :class:`UnitOutcome` (a JSON ``record`` for
``results.json`` and, for the units others depend on, a ``state`` of tensors). :func:`run_units`
runs them in dependency order on an :class:`~pyro_bbt.executors.Executor` (serial, processes or
Ray), as many at once as it has slots, and, with a :class:`~pyro_bbt.runstore.RunStore`, keeps
every finished unit on disk (the state under ``stages/``, then the record under ``units/``) and
the unit in progress after every epoch (``checkpoints/``), so a rerun on the same store resumes
after a kill: finished units are read back, an interrupted one continues from its last epoch.

Failures:

* a unit that reports a failure itself (``record["status"] == "failed"``, e.g. a non-finite
  loss) is saved like any other; the units that need it fail too, with its error, and are saved;
* a unit that raises, or whose worker dies, fails with the traceback but is **not** saved, and
  neither are the units that need it, so a resume runs them again.

A unit may say how it fails (:attr:`Unit.failed`: the A -> B grid's units fail with a full
record) and how it is kept (:attr:`Unit.kept`: the grid's task-A stages are kept by their state
alone, the layout their run directories have always had).

The outcomes come back keyed by unit, so the summary a study builds from them does not depend on
the order in which units finished, hence not on the executor or its number of workers.

Raised caps: a unit that says where its fit stopped (:attr:`Unit.capped`) and that stopped,
unconverged, at a cap below the one it now runs under (:attr:`Unit.cap`) is not read back but
run again, from the checkpoint the store kept of it, and so is every unit that needs it, directly
or not. A fit's epochs before its cap do not depend on the cap, so the run ends as a run with the
new cap from the start would.
"""

from __future__ import annotations

import sys
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any, Literal

from tqdm import tqdm

from .executors import Executor, Job, JobResult, SerialExecutor, check_positive_int, make_executor
from .runstore import RunStore

__all__ = ["Unit", "UnitOutcome", "UnitCheckpoints", "default_failure", "failed_outcome", "row_outcome", "run_units", "run_study_units"]


@dataclass
class UnitOutcome:
    """What a unit returns: its ``record`` (JSON, with ``status`` ``"ok"`` or ``"failed"``) and the
    ``state`` the units that need it receive (``None`` when nothing depends on it)."""

    record: dict
    state: dict | None = None

    @property
    def failed(self) -> bool:
        return self.record.get("status") == "failed"


def failed_outcome(error: str) -> UnitOutcome:
    return UnitOutcome({"status": "failed", "error": error})


def row_outcome(row: dict, state: dict | None = None) -> UnitOutcome:
    """A side study's unit outcome: its one ``row`` in the record, and ``state`` for the units
    that need it."""
    return UnitOutcome({"status": "ok", "row": row}, state)


def default_failure(error: str, need: str | None) -> UnitOutcome:
    """A unit's outcome when it fails without returning one: ``error`` (the traceback of its job,
    ``need`` ``None``), or ``"NEED failed: ERROR"`` when the unit ``need`` it needs failed with
    ``error``."""
    return failed_outcome(error if need is None else f"{need} failed: {error}")


@dataclass(frozen=True)
class Unit:
    """``fn(*args, *states, checkpoint, on_checkpoint)``, where ``states`` are the states of the
    units named in ``needs`` (in that order), ``checkpoint`` the unit's last saved epoch (or
    ``None``) and ``on_checkpoint(key, data)`` saves one; it returns a :class:`UnitOutcome`.

    ``failed(error, need)`` is its outcome when it returns none (called in the driver's process):
    its job raised or its worker died (``need`` ``None``, ``error`` the traceback), or the unit
    ``need`` it needs failed (``error``: that unit's error, not run then); default
    :func:`default_failure`.

    ``capped(record)``: the cap (epochs) at which the fit whose record this is stopped
    unconverged, ``None`` if it did not stop at one; ``cap``: the cap it runs under now (``None``:
    none). With ``capped`` set, the store keeps the last checkpoint of a unit that stopped at its
    cap, and a rerun whose ``cap`` is higher (or ``None``) runs it on from there instead of reading
    its record back (with every unit that needs it). Without ``capped`` a finished unit is final.

    ``kept`` is how a store holds it once finished. ``"record"``: its record under ``units/``
    (and its state under ``stages/`` when another unit needs it), read back by a rerun instead of
    running it. ``"state"``: its state alone under ``stages/`` (the A -> B grid's task-A stages):
    it runs on every rerun, ``fn`` then taking the store's copy of its state (``None`` if none)
    as one more argument, before ``checkpoint``, from which it rebuilds its record instead of
    fitting again; it returns a state only when it made one (saved then, if it did not fail),
    else the units that need it receive the store's copy; its record is never saved."""

    key: str
    fn: Callable[..., UnitOutcome]
    args: tuple = ()
    needs: tuple[str, ...] = ()
    failed: Callable[[str, str | None], UnitOutcome] = default_failure
    kept: Literal["record", "state"] = "record"
    capped: Callable[[dict], int | None] | None = None
    cap: int | None = None

    def stopped_at_cap(self, record: dict) -> bool:
        """Whether ``record`` is of a fit that stopped unconverged at its cap."""
        return self.capped is not None and self.capped(record) is not None

    def reopens(self, record: dict) -> bool:
        """Whether a stored ``record`` stopped at a cap below the unit's ``cap`` now."""
        stopped = self.capped(record) if self.capped is not None else None
        return stopped is not None and (self.cap is None or self.cap > stopped)


@dataclass
class UnitCheckpoints:
    """A unit's view of its checkpoints, for :func:`~pyro_bbt.fitting.fit_posterior`'s ``store``:
    the last one the engine read for it (``saved``) and where new ones go (``on_checkpoint``, the
    engine's forwarder to the store in the driver's process)."""

    saved: dict | None
    on_checkpoint: Callable[[str, dict], None] | None

    def checkpoint(self, key: str) -> dict | None:
        return self.saved

    def save_checkpoint(self, key: str, data: dict) -> None:
        if self.on_checkpoint is not None:
            self.on_checkpoint(key, data)


def _stored(unit: Unit, store: RunStore | None, needed: set[str]) -> UnitOutcome | None:
    """The finished outcome of ``unit`` in ``store``, or ``None`` if it must run (absent, its
    state is missing while another unit needs it, or it is kept by its state alone)."""
    if store is None or unit.kept == "state":
        return None
    record = store.record(unit.key)
    if record is None:
        return None
    state = store.stage(unit.key) if unit.key in needed and record.get("status") == "ok" else None
    if unit.key in needed and record.get("status") == "ok" and state is None:
        return None
    return UnitOutcome(record, state)


def run_units(
    units: Sequence[Unit],
    executor: Executor | None = None,
    store: RunStore | None = None,
    on_finish: Callable[[Unit, UnitOutcome], None] | None = None,
    progress: bool = False,
    description: str = "units",
) -> dict[str, UnitOutcome]:
    """Run ``units`` (keys unique, every ``needs`` naming an earlier unit) on ``executor``
    (default: serial, one torch thread) with ``store`` (``None``: nothing kept) and return every
    unit's outcome by key. ``on_finish(unit, outcome)`` is called as each unit finishes (not for
    those read back from the store). ``progress`` shows one bar for the whole plan (units done
    of all, and how many failed)."""
    by_key = {u.key: u for u in units}
    if len(by_key) != len(units):
        raise ValueError("unit keys must be unique")
    for unit in units:
        unknown = [n for n in unit.needs if n not in by_key]
        if unknown:
            raise ValueError(f"unit {unit.key!r} needs {', '.join(unknown)}, which the plan does not hold")
    executor = executor or SerialExecutor()
    needed = {n for u in units for n in u.needs}
    done: dict[str, UnitOutcome] = {}
    crashed: set[str] = set()
    shared: dict[str, Any] = {}
    given: dict[str, dict | None] = {}  # the store's copy of the state of a unit kept by its state, while it runs
    waiting: list[Unit] = []
    reopened: set[str] = set()  # stored units that run again: a raised cap, or a unit they need does
    for unit in units:
        outcome = _stored(unit, store, needed)
        upstream = any(n in reopened for n in unit.needs)
        if outcome is not None and (upstream or unit.reopens(outcome.record)):
            reopened.add(unit.key)
            if upstream:  # a checkpoint it kept was made on what it needs as that was
                store.clear_checkpoint(unit.key)
            outcome = None
        if outcome is None:
            waiting.append(unit)
        else:
            done[unit.key] = outcome
    failures = sum(o.failed for o in done.values())
    bar = tqdm(total=len(units), initial=len(done), disable=not progress, desc=description, unit="unit", file=sys.stderr, dynamic_ncols=True)

    def finish(unit: Unit, outcome: UnitOutcome, keep: bool) -> None:
        nonlocal failures
        if unit.kept == "state":
            saved = given.pop(unit.key, None)
            if keep and store is not None and not outcome.failed and outcome.state is not None:
                store.save_stage(unit.key, outcome.state)
            if not outcome.failed and outcome.state is None:  # rebuilt from the store's copy
                outcome = UnitOutcome(outcome.record, saved)
        elif keep and store is not None:
            capped = unit.stopped_at_cap(outcome.record)
            if outcome.state is not None and unit.key in needed:
                store.save_stage(unit.key, outcome.state, keep_checkpoint=capped)
            store.save_record(unit.key, outcome.record, keep_checkpoint=capped)
        if not keep:
            crashed.add(unit.key)
        done[unit.key] = outcome
        if on_finish is not None:
            on_finish(unit, outcome)
        failures += outcome.failed
        bar.update(1)
        bar.set_postfix(failed=failures)

    def job(unit: Unit) -> Job:
        states = []
        for need in unit.needs:
            if need not in shared:
                shared[need] = executor.share(done[need].state)
            states.append(shared[need])
        if unit.kept == "state":
            given[unit.key] = store.stage(unit.key) if store is not None else None
            states.append(given[unit.key])
        checkpoint = store.checkpoint(unit.key) if store is not None else None
        on_checkpoint = executor.forwarder(store.save_checkpoint) if store is not None else None
        return Job(unit.key, unit.fn, (*unit.args, *states, checkpoint, on_checkpoint))

    try:
        while waiting or executor.busy():
            while executor.free_slots() > 0:
                unit = next((u for u in waiting if all(n in done for n in u.needs)), None)
                if unit is None:
                    break
                waiting.remove(unit)
                failed_need = next((n for n in unit.needs if done[n].failed), None)
                if failed_need is not None:  # what it needs failed: so does it, kept only if that one was
                    finish(unit, unit.failed(done[failed_need].record.get("error", ""), failed_need), failed_need not in crashed)
                    continue
                executor.submit(job(unit))
            if not executor.busy():
                if waiting and not any(all(n in done for n in u.needs) for u in waiting):
                    raise RuntimeError(f"units wait for one another in a cycle: {[u.key for u in waiting]}")
                continue
            result: JobResult = executor.next_result()
            unit = by_key[result.key]
            if result.ok:
                finish(unit, result.value, keep=True)
            else:
                finish(unit, unit.failed(result.error, None), keep=False)
    finally:
        bar.close()
    return done


def run_study_units(
    units: Sequence[Unit],
    what: str,
    executor: Executor | None = None,
    workers: int = 1,
    store: RunStore | None = None,
    on_finish: Callable[[Unit, UnitOutcome], None] | None = None,
    progress: bool = False,
) -> dict[str, UnitOutcome]:
    """A study's plan: :func:`run_units` on ``executor``, or by default on ``workers`` worker
    processes (this process when 1; one torch thread per unit either way, so the outcomes do not
    depend on it), closed afterwards; with ``store`` every finished unit is kept and a rerun on
    it resumes. A failed unit raises ``RuntimeError`` naming every failure (``what``: the
    study, in that message and on the progress bar)."""
    check_positive_int("workers", workers)
    own = executor is None
    executor = executor or make_executor("processes" if workers > 1 else "serial", workers)
    try:
        outcomes = run_units(units, executor, store, on_finish=on_finish, progress=progress, description=f"{what} units")
    finally:
        if own:
            executor.close()
    failed = [f"{key}: {o.record.get('error', '')}" for key, o in outcomes.items() if o.failed]
    if failed:
        raise RuntimeError(f"units of the {what} failed: " + "; ".join(failed))
    return outcomes
