"""Would another order of the units shorten a grid's wall time? A replay of measured unit times.

The study engine (:func:`~pyro_bbt.engine.run_units`) starts, whenever a worker is free, the
first unit of the plan whose needs are done: for the A -> B grid a seed's task-A stages, then its
B units, seed after seed (:attr:`~pyro_bbt.plan.Plan.order`). A long unit that starts late
leaves the other workers idle at the end. This bench replays finished grid runs through the
engine's own dispatch, with a :class:`ReplayExecutor` whose jobs take no time but advance a
virtual clock by the seconds the unit took when it ran (timing.json, one thread per unit), and
reports the makespan per number of workers ``W`` for three orders of the same units:

* ``plan``: the engine's order, as it runs today;
* ``stages first``: every task-A stage before any B unit (a critical-path priority with every
  unit costing 1, the best one can do without knowing the costs);
* ``critical path (oracle)``: the units ordered by their measured seconds plus the longest chain
  of measured seconds that needs them (Hu's list-scheduling priority, knowing every unit's time
  in advance), an upper bound on what any priority rule the engine could learn would save;

beside the lower bound ``max(total / W, longest chain)``. Task-A stages' seconds are their
epochs' seconds (``task_a/I/history/*`` in timing.json); EWC's deterministic stages are not
timed there and are counted as ``--ewc-stage-seconds`` (seconds on this machine).

    python benchmarks/schedule_replay.py --runs figs/ps03 figs/ps03-shared --out figs/schedule-replay.json

``--fractions F,F`` replays the grid without the B units at other fractions (a smaller default grid
the README could state): what that grid would have taken, from the same measured units.
"""

from __future__ import annotations

import argparse
import heapq
import json
import sys
from collections import defaultdict
from dataclasses import dataclass
from pathlib import Path

from pyro_bbt.engine import Unit, UnitOutcome, run_units
from pyro_bbt.executors import Job, JobResult
from pyro_bbt.files import atomic_write_json
from pyro_bbt.plan import STAGE_NEEDED, Plan, StageSpec, UnitSpec, stage_key


@dataclass(frozen=True)
class Timed:
    """One unit of a finished run: its key, the stage it needed and the seconds it took."""

    key: str
    seconds: float
    needs: str | None
    seed: int


class ReplayExecutor:
    """``workers`` slots on a virtual clock: a submitted job finishes ``seconds[job.key]`` after
    it was submitted; :meth:`next_result` moves the clock to the earliest finish."""

    threads = 1

    def __init__(self, workers: int, seconds: dict[str, float]) -> None:
        self.workers, self.seconds, self.clock = workers, seconds, 0.0
        self._running: list[tuple[float, int, str]] = []
        self._submitted = 0

    def free_slots(self) -> int:
        return self.workers - len(self._running)

    def submit(self, job: Job) -> None:
        heapq.heappush(self._running, (self.clock + self.seconds[job.key], self._submitted, job.key))
        self._submitted += 1

    def busy(self) -> int:
        return len(self._running)

    def next_result(self) -> JobResult:
        self.clock, _, key = heapq.heappop(self._running)
        return JobResult(key, UnitOutcome({"status": "ok"}, {}))

    def forwarder(self, handler):
        return handler

    def share(self, value):
        return value

    def close(self) -> None:
        pass


def _never_called(*args) -> UnitOutcome:
    raise AssertionError("a replayed unit is never run")


def load_run(run: Path, ewc_stage_seconds: float, fractions: tuple[float, ...] | None = None) -> list[Timed]:
    """The units of a finished grid run in its plan's order (:attr:`~pyro_bbt.plan.Plan.order`:
    per seed, stages, then B units), each with the seconds it took; with ``fractions``, only the B
    units at those fractions of B (every stage kept): the grid the run would have been without
    the others. ``ValueError`` where the run holds none of them."""
    paths = [run / "results.json", run / "timing.json"]
    if not all(p.is_file() for p in paths):
        raise ValueError(f"{run} is not a finished run: it needs results.json and timing.json")
    results, timing = (json.loads(p.read_text()) for p in paths)
    stage_seconds: dict[int, float] = defaultdict(float)
    for key, value in timing.items():
        parts = key.split("/")
        if parts[0] == "task_a" and len(parts) == 4 and parts[2] == "history":
            stage_seconds[int(parts[1])] += value
    seconds: dict[str, float] = {}
    stages = []
    for i, a in enumerate(results["task_a"]):
        stages.append(StageSpec(a["seed"], a["kind"], 0))
        seconds[stages[-1].key] = stage_seconds[i] if a["kind"] == "bayesian" else ewc_stage_seconds
    units = []
    for i, u in enumerate(results["units"]):
        if fractions is not None and u["fraction"] not in fractions:
            continue
        need = STAGE_NEEDED.get(u["method"])
        units.append(UnitSpec(u["method"], u["fraction"], u["seed"], 0, None if need is None else stage_key(need, u["seed"])))
        seconds[units[-1].key] = timing[f"units/{i}"]
    if not units:
        held = sorted({u["fraction"] for u in results["units"]})
        raise ValueError(f"{run} holds no B unit at fractions {', '.join(f'{f:g}' for f in fractions or ())}; it has {', '.join(f'{f:g}' for f in held)}")
    return [Timed(item.key, seconds[item.key], getattr(item, "needs", None), item.seed) for item in Plan(tuple(stages), tuple(units)).order]


def chain_lengths(units: list[Timed], cost) -> dict[str, float]:
    """Each unit's ``cost`` plus the longest chain of costs of the units that need it."""
    children: dict[str, list[Timed]] = defaultdict(list)
    for u in units:
        if u.needs is not None:
            children[u.needs].append(u)
    memo: dict[str, float] = {}

    def length(u: Timed) -> float:
        if u.key not in memo:
            memo[u.key] = cost(u) + max((length(c) for c in children[u.key]), default=0.0)
        return memo[u.key]

    return {u.key: length(u) for u in units}


def replay(order: list[Timed], workers: int) -> float:
    """The makespan of ``order`` run by :func:`~pyro_bbt.engine.run_units` on ``workers`` slots."""
    executor = ReplayExecutor(workers, {u.key: u.seconds for u in order})
    plan = [Unit(u.key, _never_called, needs=() if u.needs is None else (u.needs,)) for u in order]
    outcomes = run_units(plan, executor)
    assert len(outcomes) == len(order)
    return executor.clock


def by_priority(order: list[Timed], priority: dict[str, float]) -> list[Timed]:
    position = {u.key: i for i, u in enumerate(order)}
    return sorted(order, key=lambda u: (-priority[u.key], position[u.key]))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--runs", type=Path, nargs="+", required=True, help="finished grid runs (results.json and timing.json)")
    parser.add_argument("--workers", type=str, default="1,2,3,4", help="numbers of workers, comma-separated")
    parser.add_argument("--ewc-stage-seconds", type=float, default=10.0)
    parser.add_argument("--fractions", type=str, default=None, metavar="F,F",
                        help="replay only the B units at these fractions of B (every task-A stage kept): a smaller grid's wall time")
    parser.add_argument("--out", type=Path)
    args = parser.parse_args(argv)
    try:
        workers = [int(w) for w in args.workers.split(",")]
        if any(w < 1 for w in workers):
            raise ValueError
    except ValueError:
        parser.error(f"--workers must be integers >= 1, comma-separated, got {args.workers!r}")
    try:
        fractions = None if args.fractions is None else tuple(float(f) for f in args.fractions.split(","))
    except ValueError:
        parser.error(f"--fractions must be numbers, comma-separated, got {args.fractions!r}")
    try:
        orders_by_run = {run: load_run(run, args.ewc_stage_seconds, fractions) for run in args.runs}
    except ValueError as error:
        parser.error(str(error))
    rows = []
    for run, order in orders_by_run.items():
        total = sum(u.seconds for u in order)
        longest_chain = max(chain_lengths(order, lambda u: u.seconds).values())
        orders = {
            "plan": order,
            "stages first": by_priority(order, chain_lengths(order, lambda u: 1.0)),
            "critical path (oracle)": by_priority(order, chain_lengths(order, lambda u: u.seconds)),
        }
        for w in workers:
            bound = max(total / w, longest_chain)
            row = {"run": str(run), "units": len(order), "workers": w, "total_seconds": total, "lower_bound": bound,
                   "makespan": {name: replay(o, w) for name, o in orders.items()}}
            rows.append(row)
            print(f"{run}  W={w}  total {total:,.0f} s  bound {bound:,.0f} s  " +
                  "  ".join(f"{name} {m:,.0f} s ({m / bound:.3f}x)" for name, m in row["makespan"].items()))
    if args.out is not None:
        atomic_write_json(args.out, {"command": " ".join(["python", "benchmarks/schedule_replay.py", *(argv if argv is not None else sys.argv[1:])]), "rows": rows})
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
