"""Did a rerun reproduce a published A -> B run? Unit by unit, exactly.

A grid rerun in one invocation (to measure its wall time, say) is worth reporting only beside the
proof that it ran the same fits. This script reads two runs' ``results.json`` and compares, for
every task-A stage (keyed by seed and kind) and every B unit (keyed by method, fraction and seed)
that the ``rerun`` holds:

* the number of steps, the status, and for Bayesian fits the verdict's ``converged``, the epochs and
  the last epoch's ELBO;
* every metric of A's and B's test sets (accuracy, NLL, Brier, ECE, entropy, mutual information)
  and the accuracy matrix: equal to the last digit (``--rel-tol 0``, the default) or within a
  relative tolerance.

It prints one line per item that differs and a count, and exits 1 when anything differs or when
the rerun holds an item the published run lacks (so a script can gate on it):

    python benchmarks/same_units.py runs/ps03-wall figs/ps03

Both arguments are a run's folder or its ``results.json``.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
from pathlib import Path

METRIC_FIELDS = ("a_test", "b_test", "a_test_after", "b_test_before", "accuracy_matrix")
SCALAR_FIELDS = ("steps", "status")


def read_results(path: Path) -> dict:
    """A run's results.json, from the file or from the run's folder."""
    file = path / "results.json" if path.is_dir() else path
    if not file.is_file():
        raise ValueError(f"{path}: no results.json there (pass a run's folder or its results.json)")
    try:
        results = json.loads(file.read_text())
    except json.JSONDecodeError as error:
        raise ValueError(f"{file}: not JSON ({error})") from None
    if not isinstance(results, dict) or "units" not in results or "task_a" not in results:
        raise ValueError(f"{file}: not an A -> B run's results.json (it needs 'task_a' and 'units')")
    return results


def _leaves(value, prefix: str = ""):
    """(dotted path, number or string) for every leaf of nested dicts and lists."""
    if isinstance(value, dict):
        for key, inner in value.items():
            yield from _leaves(inner, f"{prefix}.{key}" if prefix else str(key))
    elif isinstance(value, list):
        for index, inner in enumerate(value):
            yield from _leaves(inner, f"{prefix}[{index}]")
    else:
        yield prefix, value


def _same(a, b, rel_tol: float) -> bool:
    if isinstance(a, (int, float)) and isinstance(b, (int, float)) and not isinstance(a, bool) and not isinstance(b, bool):
        return a == b or math.isclose(a, b, rel_tol=rel_tol, abs_tol=0.0)
    return a == b


def _summary(record: dict) -> dict:
    """What is compared of one stage or unit."""
    kept = {field: record[field] for field in (*SCALAR_FIELDS, *METRIC_FIELDS) if field in record}
    convergence = record.get("convergence")
    if isinstance(convergence, dict):
        kept["convergence"] = {key: convergence.get(key) for key in ("converged", "epochs")}
        trace = convergence.get("elbo_trace") or [None]
        kept["convergence"]["last_epoch_elbo"] = trace[-1]
    return kept


def differences(rerun: dict, published: dict, rel_tol: float = 0.0) -> tuple[int, list[tuple[str, str]]]:
    """(items compared, one (item, what differs) per difference) for every stage and unit of
    ``rerun``."""
    def stage_key(stage: dict) -> str:
        return f"task-A stage {stage['kind']}, seed {stage['seed']}"

    def unit_key(unit: dict) -> str:
        return f"{unit['method']} at {unit['fraction']:g} of B, seed {unit['seed']}"

    lines: list[tuple[str, str]] = []
    compared = 0
    for name, key in (("task_a", stage_key), ("units", unit_key)):
        theirs = {key(record): record for record in published[name]}
        for record in rerun[name]:
            label = key(record)
            compared += 1
            if label not in theirs:
                lines.append((label, "not in the published run"))
                continue
            mine, other = dict(_leaves(_summary(record))), dict(_leaves(_summary(theirs[label])))
            for path in sorted(set(mine) | set(other)):
                if path not in mine or path not in other:
                    lines.append((label, f"{path} only in the {'rerun' if path in mine else 'published run'}"))
                elif not _same(mine[path], other[path], rel_tol):
                    lines.append((label, f"{path} {mine[path]!r} (rerun) != {other[path]!r} (published)"))
    return compared, lines


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("rerun", type=Path, help="the rerun's folder or results.json")
    parser.add_argument("published", type=Path, help="the published run's folder or results.json")
    parser.add_argument("--rel-tol", type=float, default=0.0, help="relative tolerance on numbers (default 0: equal to the last digit)")
    args = parser.parse_args(argv)
    if not args.rel_tol >= 0.0:
        parser.error(f"--rel-tol must be a number >= 0, got {args.rel_tol}")
    try:
        rerun, published = read_results(args.rerun), read_results(args.published)
    except ValueError as error:
        parser.error(str(error))
    compared, lines = differences(rerun, published, args.rel_tol)
    for label, what in lines:
        print(f"{label}: {what}")
    stages, units = len(rerun["task_a"]), len(rerun["units"])
    converged = [r for r in (*rerun["task_a"], *rerun["units"]) if isinstance(r.get("convergence"), dict)]
    print(f"{compared} items compared ({stages} task-A stages, {units} B units): "
          f"{'identical' if not lines else f'{len({label for label, _ in lines})} differ ({len(lines)} values)'}; "
          f"Bayesian fits converged in the rerun: {sum(bool(r['convergence'].get('converged')) for r in converged)} of {len(converged)}")
    return 1 if lines else 0


if __name__ == "__main__":
    sys.exit(main())
