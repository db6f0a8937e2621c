"""The study engine (pyro_bbt.engine): dependency order, states handed on, failures and resume."""

from __future__ import annotations

import pytest
import torch

from pyro_bbt.engine import Unit, UnitOutcome, run_units
from pyro_bbt.runstore import RunStore

CALLS: list[str] = []


def _add(key: str, value: float, *states_and_checkpoint) -> UnitOutcome:
    """A unit: its state is ``value`` plus the sum of the states it needs."""
    *states, _checkpoint, _on_checkpoint = states_and_checkpoint
    CALLS.append(key)
    total = value + sum(float(s["total"]) for s in states)
    return UnitOutcome({"status": "ok", "total": total}, {"total": torch.tensor(total)})


def _report_failure(key: str, *rest) -> UnitOutcome:
    CALLS.append(key)
    return UnitOutcome({"status": "failed", "error": "loss is nan at step 3"})


def _raise(key: str, *rest) -> UnitOutcome:
    CALLS.append(key)
    raise RuntimeError("worker lost")


def _chain(second) -> list[Unit]:
    return [
        Unit("a", _add, ("a", 1.0)),
        Unit("b", second, ("b", 2.0) if second is _add else ("b",), needs=("a",)),
        Unit("c", _add, ("c", 4.0), needs=("b",)),
        Unit("d", _add, ("d", 8.0), needs=("a",)),
    ]


def test_units_get_the_states_they_need_and_a_store_resumes_without_rerunning(tmp_path):
    CALLS.clear()
    store = RunStore(tmp_path, {"study": "sums"})
    out = run_units(_chain(_add), store=store)
    assert {k: o.record["total"] for k, o in out.items()} == {"a": 1.0, "b": 3.0, "c": 7.0, "d": 9.0}
    assert CALLS == ["a", "b", "c", "d"]
    CALLS.clear()
    again = run_units(_chain(_add), store=RunStore(tmp_path, {"study": "sums"}))
    assert CALLS == [] and {k: o.record for k, o in again.items()} == {k: o.record for k, o in out.items()}
    (tmp_path / "units" / "c.json").unlink()  # c lost: rerun from b's stored state alone
    run_units(_chain(_add), store=RunStore(tmp_path, {"study": "sums"}))
    assert CALLS == ["c"]


def test_a_reported_failure_fails_what_needs_it_and_is_kept(tmp_path):
    CALLS.clear()
    out = run_units(_chain(_report_failure), store=RunStore(tmp_path, {"study": "fail"}))
    assert out["c"].failed and out["c"].record["error"] == "b failed: loss is nan at step 3"
    assert not out["d"].failed and CALLS == ["a", "b", "d"]
    CALLS.clear()
    run_units(_chain(_report_failure), store=RunStore(tmp_path, {"study": "fail"}))
    assert CALLS == []  # kept: a resume does not run it again


def test_a_unit_that_raises_is_not_kept_so_a_resume_runs_it_and_its_dependents_again(tmp_path):
    CALLS.clear()
    out = run_units(_chain(_raise), store=RunStore(tmp_path, {"study": "raise"}))
    assert out["b"].failed and "worker lost" in out["b"].record["error"] and out["c"].failed
    assert sorted(p.stem for p in (tmp_path / "units").iterdir()) == ["a", "d"]
    CALLS.clear()
    out = run_units(_chain(_add), store=RunStore(tmp_path, {"study": "raise"}))
    assert CALLS == ["b", "c"] and out["c"].record["total"] == 7.0


def test_a_plan_with_an_unknown_need_or_a_cycle_is_refused():
    with pytest.raises(ValueError, match="unit 'b' needs z, which the plan does not hold"):
        run_units([Unit("a", _add, ("a", 1.0)), Unit("b", _add, ("b", 1.0), needs=("z",))])
    with pytest.raises(RuntimeError, match="cycle"):
        run_units([Unit("a", _add, ("a", 1.0), needs=("b",)), Unit("b", _add, ("b", 1.0), needs=("a",))])


def test_worker_processes_give_the_serial_outcomes():
    from pyro_bbt.executors import ProcessExecutor

    with ProcessExecutor(workers=2) as executor:
        parallel = run_units(_chain(_add), executor)
    serial = run_units(_chain(_add))
    assert {k: o.record for k, o in parallel.items()} == {k: o.record for k, o in serial.items()}
    assert torch.equal(parallel["c"].state["total"], serial["c"].state["total"])


def _kept_by_state(key: str, value: float, saved: dict | None, _checkpoint, _on_checkpoint) -> UnitOutcome:
    """A unit kept by its state alone: rebuilt from ``saved`` (no state returned), else made."""
    CALLS.append(f"{key} from saved" if saved is not None else key)
    total = float(saved["total"]) if saved is not None else value
    return UnitOutcome({"status": "ok", "total": total}, None if saved is not None else {"total": torch.tensor(total)})


def test_a_unit_kept_by_its_state_runs_on_every_resume_from_the_stored_copy(tmp_path):
    """``kept="state"``: only its state is saved (no record), a rerun runs it again with the store's
    copy, without saving it again, and the units that need it receive that copy."""
    CALLS.clear()
    plan = [Unit("a", _kept_by_state, ("a", 1.0), kept="state"), Unit("b", _add, ("b", 2.0), needs=("a",))]
    out = run_units(plan, store=RunStore(tmp_path, {"study": "kept"}))
    assert CALLS == ["a", "b"] and out["b"].record["total"] == 3.0
    assert [p.name for p in (tmp_path / "units").iterdir()] == ["b.json"]
    stage = tmp_path / "stages" / "a.pt"
    written = (stage.stat().st_mtime_ns, stage.read_bytes())
    (tmp_path / "units" / "b.json").unlink()
    CALLS.clear()
    again = run_units(plan, store=RunStore(tmp_path, {"study": "kept"}))
    assert CALLS == ["a from saved", "b"] and again["b"].record["total"] == 3.0
    assert torch.equal(again["a"].state["total"], torch.tensor(1.0)) and (stage.stat().st_mtime_ns, stage.read_bytes()) == written
    assert [p.name for p in (tmp_path / "units").iterdir()] == ["b.json"]


def _fails_with(error: str, need: str | None) -> UnitOutcome:
    return UnitOutcome({"status": "failed", "error": f"own: {error}", "need": need})


def test_a_unit_says_how_it_fails_when_it_raises_or_what_it_needs_failed(tmp_path):
    CALLS.clear()
    plan = [Unit("a", _raise, ("a",), failed=_fails_with), Unit("b", _add, ("b", 2.0), needs=("a",), failed=_fails_with)]
    out = run_units(plan, store=RunStore(tmp_path, {"study": "failed"}))
    assert out["a"].record["error"].startswith("own: Traceback") and out["a"].record["need"] is None
    assert out["b"].record == {"status": "failed", "error": f"own: {out['a'].record['error']}", "need": "a"}
    assert not (tmp_path / "units").exists() or not any((tmp_path / "units").iterdir())  # a raised: neither is kept


def _epochs_to_ten(key: str, cap: int, checkpoint: dict | None, on_checkpoint) -> UnitOutcome:
    """A "fit" that needs 10 epochs, stopped at ``cap``, checkpointed every epoch, continuing from
    ``checkpoint``: its state is its epoch count."""
    start = checkpoint["epoch"] if checkpoint is not None else 0
    CALLS.append(f"{key} from {start}")
    epoch = start
    while epoch < min(cap, 10):
        epoch += 1
        if on_checkpoint is not None:
            on_checkpoint(key, {"epoch": epoch})
    return UnitOutcome({"status": "ok", "epochs": epoch, "converged": epoch >= 10, "max_epochs": cap}, {"total": torch.tensor(float(epoch))})


def _capped_at(record: dict) -> int | None:
    return record["max_epochs"] if not record["converged"] and record["epochs"] >= record["max_epochs"] else None


def _capped_plan(cap: int) -> list[Unit]:
    return [Unit("fit", _epochs_to_ten, ("fit", cap), capped=_capped_at, cap=cap),
            Unit("after", _add, ("after", 100.0), needs=("fit",)),
            Unit("apart", _add, ("apart", 1.0))]


def test_a_raised_cap_runs_a_capped_unit_on_from_its_kept_checkpoint_and_what_needs_it_again(tmp_path):
    """A unit that stopped unconverged at its cap keeps its checkpoint; a rerun under the same cap
    reads everything back; under a higher cap it continues from the checkpoint, the unit that
    needs it runs again (on the new state), the one apart does not, and the outcomes equal a run
    under the higher cap from the start."""
    CALLS.clear()
    store = lambda root: RunStore(root, {"study": "caps"})
    out = run_units(_capped_plan(4), store=store(tmp_path / "raised"))
    assert CALLS == ["fit from 0", "after", "apart"] and out["after"].record["total"] == 104.0
    assert (tmp_path / "raised" / "checkpoints" / "fit.pt").exists()  # stopped at its cap: kept
    CALLS.clear()
    run_units(_capped_plan(4), store=store(tmp_path / "raised"))
    assert CALLS == []
    raised = run_units(_capped_plan(12), store=store(tmp_path / "raised"))
    assert CALLS == ["fit from 4", "after"]
    assert raised["fit"].record == {"status": "ok", "epochs": 10, "converged": True, "max_epochs": 12}
    assert not (tmp_path / "raised" / "checkpoints" / "fit.pt").exists()  # converged: dropped
    CALLS.clear()
    fresh = run_units(_capped_plan(12), store=store(tmp_path / "fresh"))
    assert CALLS == ["fit from 0", "after", "apart"]
    assert {k: o.record for k, o in raised.items()} == {k: o.record for k, o in fresh.items()}
    assert not (tmp_path / "fresh" / "checkpoints" / "fit.pt").exists()
