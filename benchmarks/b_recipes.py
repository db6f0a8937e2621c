"""The same B units under two recipes for B: does a choice that only B's fits read change what
they reach, and how fast? Two runs of ``python -m pyro_bbt.transfer`` that differ only in B's
fields (:data:`pyro_bbt.config.B_ONLY_FIELDS`: the same q_A, data and seeds, every fit by the same
rule and verdict, the same q_A: checked) are paired unit by unit (head, method, fraction, seed;
``--methods M1 M2`` pairs method ``M1`` of the first runs with ``M2`` of the second, for example
scratch against transfer with q_B started fresh). Each run of ``--second`` is paired with every
run of ``--first`` of its head that holds some of its units.

Made for two questions of the convergence issue:

* **must transfer's step be preconditioned?** (``--precondition-b prior-scale``). Under transfer,
  q_B starts at q_A and its prior is q_A: a weight q_A pinned to a width ``sigma_A`` is moved by
  Adam about ``lr`` per step whatever ``sigma_A`` is. The preconditioned step moves it
  ``lr sigma_p / max sigma_p`` instead (Adam in prior-whitened coordinates,
  :attr:`pyro_bbt.inference.TrainConfig.precondition`);
* **q_B started at q_A or fresh** under the same transferred prior (``--q-init fresh``).

Per unit this prints, first → second: epochs to the end of the fit, ``converged``, seconds
(``timing.json``: compare them only for runs made side by side on the same machine), B's test
accuracy, A's after B, and the ELBO per example at the end of the confirming continuation (the
fixed-noise evaluator's, with its standard error; of each fit's own objective, so differenced only
between fits under the same prior on the same data: not scratch against transfer); per head, pair of methods and fraction, the medians of the
ratios and the paired differences (second − first) with a t interval and the exact sign test.
``--stages DIR`` adds the quantiles of ``f = sigma_A / max sigma_A`` over each layer of the q_A
stored there (``stages/A-bayesian-sS.pt``): what the preconditioner multiplies transfer's steps
by (in a multi-head fit the prior's widest also counts B's fresh head rows, at the base width,
which q_A's widest pruned weights reach)::

    python benchmarks/b_recipes.py --first runs/base-shared-s59 runs/base-mh-s58 --second runs/pc-shared-s59 runs/pc-mh-s58 \\
        --stages runs/ps03-shared-s59
    python benchmarks/b_recipes.py --methods scratch transfer --first figs/ps03-s59 --second runs/fresh-mh-s5 runs/fresh-mh-s6
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
from collections import defaultdict
from pathlib import Path

import torch

from pyro_bbt.config import B_ONLY_FIELDS, GRID_FIELDS, LATER_FIELDS, RUN_FIELDS
from pyro_bbt.report import mean_t_interval
from pyro_bbt.runstore import config_differences
from pyro_bbt.stats import sign_test

FREE = (*B_ONLY_FIELDS, *GRID_FIELDS, *RUN_FIELDS)  # what a first and a second run may differ in


def unit_seconds(run: Path) -> dict[int, float]:
    """Wall seconds per unit index of ``run``'s ``results.json``: its ``timing.json`` entry
    ``units/I`` (the unit's whole time; the ``units/I/history/E`` and ``units/I/curve/K`` entries
    under it are its epochs and the times at its curve points)."""
    timing = json.loads((run / "timing.json").read_text())
    return {int(key.split("/")[1]): seconds for key, seconds in timing.items() if key.count("/") == 1 and key.startswith("units/")}


def prior_of(method: str) -> str:
    """Which prior a B unit's ELBO is of: q_A for transfer, the base prior for the others
    (joint's data differ too)."""
    return {"transfer": "q_A", "joint": "base, A and B"}.get(method, "base")


def end_elbo(unit: dict) -> tuple[float | None, float | None]:
    """The ELBO per example at the end of the unit's last confirming continuation, and its standard error."""
    verdict = (unit.get("history") or [{}])[-1].get("verdict") or {}
    continuation = verdict.get("continuation")
    if not continuation:
        return None, None
    n = continuation["num_data"]
    return continuation["end_elbo"] / n, continuation["stderr"] / n


def read_units(run: Path) -> tuple[dict, dict, dict]:
    """``(configuration, units by (method, fraction, seed), q_A's record by seed)`` of a run."""
    results = json.loads((run / "results.json").read_text())
    seconds = unit_seconds(run)
    units = {}
    for index, unit in enumerate(results["units"]):
        if unit.get("status") != "ok":
            continue
        units[(unit["method"], unit["fraction"], unit["seed"])] = dict(unit, seconds=seconds.get(index))
    stages = {stage["seed"]: stage for stage in results.get("task_a", []) if stage.get("kind", "bayesian") == "bayesian"}
    return LATER_FIELDS | results["config"], units, stages  # a field added later, absent where it was at its neutral value


def same_record(first, second) -> bool:
    """Whether two records are equal on every key both hold (a run made before a field existed
    lacks it: q_A's records of older runs have no ``unread_rows_kl`` or ``floor`` in their verdicts)."""
    if isinstance(first, dict) and isinstance(second, dict):
        return all(same_record(first[key], second[key]) for key in first.keys() & second.keys())
    if isinstance(first, list) and isinstance(second, list):
        return len(first) == len(second) and all(same_record(a, b) for a, b in zip(first, second))
    return first == second


def compare(first_run: Path, second_run: Path, methods: tuple[str, str] | None = None) -> tuple[list[str], list[dict]]:
    """``(the B fields the two runs differ in, one row per unit both hold)``; ``methods``: pair
    ``methods[0]`` of the first run with ``methods[1]`` of the second (``None``: each with
    itself). Runs of different heads, or with no unit in common, give no rows; runs that share
    units but differ in more than B's fields, fit them by the same recipe (without ``methods``)
    or on different q_A (:func:`same_record`) are refused."""
    first_config, first, first_stages = read_units(first_run)
    second_config, second, second_stages = read_units(second_run)
    keys = [(method, fraction, seed) for method, fraction, seed in sorted(first)
            if (methods is None or method == methods[0]) and (method if methods is None else methods[1], fraction, seed) in second]
    if first_config["head"] != second_config["head"] or not keys:
        return [], []
    differences = config_differences(first_config, second_config)
    other = [d for d in differences if d.split(":")[0] not in FREE]
    if other:
        raise SystemExit(f"error: {first_run} and {second_run} differ in more than B's fields: {'; '.join(other)}")
    recipe = [d for d in differences if d.split(":")[0] in B_ONLY_FIELDS]
    if not recipe and methods is None:
        raise SystemExit(f"error: {first_run} and {second_run} fit B by the same recipe: nothing to compare (pass --methods to compare two methods)")
    for seed in sorted({seed for _, _, seed in keys}):
        if not same_record(first_stages.get(seed), second_stages.get(seed)):
            raise SystemExit(f"error: {first_run} and {second_run} fitted seed {seed}'s units on different q_A (their task_a records differ)")
    rows = []
    for method, fraction, seed in keys:
        a, b = first[(method, fraction, seed)], second[(method if methods is None else methods[1], fraction, seed)]
        rows.append(dict(head=first_config["head"], method=b["method"] if method == b["method"] else f"{method} → {b['method']}", fraction=fraction, seed=seed,
                         epochs=(_fit(a).get("epochs"), _fit(b).get("epochs")),
                         converged=(_fit(a).get("converged"), _fit(b).get("converged")),
                         seconds=(a["seconds"], b["seconds"]),
                         b_test=(a["b_test"]["accuracy"], b["b_test"]["accuracy"]),
                         a_after=(a["a_test_after"]["accuracy"], b["a_test_after"]["accuracy"]),
                         elbo=(end_elbo(a), end_elbo(b)), same_objective=prior_of(method) == prior_of(b["method"])))
    return recipe, rows


def _fit(unit: dict) -> dict:
    """A Bayesian unit's convergence record; ``{}`` for EWC's deterministic nets (early stopping)."""
    return unit.get("convergence") or {}


def _yes(flag: bool | None) -> str:
    return "—" if flag is None else "yes" if flag else "NO"


def _pair(values: tuple) -> str:
    return " → ".join("—" if v is None else str(v) for v in values)


def unit_table(rows: list[dict]) -> str:
    lines = ["| head | method | fraction | seed | epochs | converged | seconds | B test | A after B | end ELBO / example (± s.e.) |",
             "|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        (e0, s0), (e1, s1) = r["elbo"]
        elbo = "—" if e0 is None or e1 is None else f"{e0:.4f} (±{s0:.4f}) → {e1:.4f} (±{s1:.4f})"
        seconds = "—" if None in r["seconds"] else f"{r['seconds'][0]:.0f} → {r['seconds'][1]:.0f}"
        lines.append(f"| {r['head']} | {r['method']} | {r['fraction']:g} | {r['seed']} | {_pair(r['epochs'])} | "
                     f"{_yes(r['converged'][0])} → {_yes(r['converged'][1])} | {seconds} | {r['b_test'][0]:.4f} → {r['b_test'][1]:.4f} | "
                     f"{r['a_after'][0]:.4f} → {r['a_after'][1]:.4f} | {elbo} |")
    return "\n".join(lines)


def summary_table(rows: list[dict]) -> str:
    """Per head, method and fraction: median ratios (second / first) of epochs and seconds,
    paired differences (second − first) of B, A after B and the end ELBO."""
    groups: dict[tuple, list[dict]] = defaultdict(list)
    for r in rows:
        groups[(r["head"], r["method"], r["fraction"])].append(r)
    lines = ["| head | method | fraction | n (both converged) | epochs, median ratio | seconds, median ratio | B test, means | B test, difference [95 % t] | B below / above (p) | "
             "A after B, means | A after B, difference | end ELBO / example, difference |",
             "|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for (head, method, fraction), group in sorted(groups.items()):
        both = sum(all(r["converged"]) for r in group)
        ratios = [r["epochs"][1] / r["epochs"][0] for r in group if None not in r["epochs"]]
        epochs = f"{statistics.median(ratios):.2f}" if ratios else "—"
        timed = [r["seconds"][1] / r["seconds"][0] for r in group if None not in r["seconds"]]
        seconds = f"{statistics.median(timed):.2f}" if timed else "—"
        b = [r["b_test"][1] - r["b_test"][0] for r in group]
        a = [r["a_after"][1] - r["a_after"][0] for r in group]
        elbo = [r["elbo"][1][0] - r["elbo"][0][0] for r in group if r["same_objective"] and r["elbo"][0][0] is not None and r["elbo"][1][0] is not None]
        below, above, p = sign_test(b)
        means = {key: " → ".join(f"{statistics.mean(r[key][side] for r in group):.3f}" for side in (0, 1)) for key in ("b_test", "a_after")}
        lines.append(f"| {head} | {method} | {fraction:g} | {len(group)} ({both}) | {epochs} | {seconds} | {means['b_test']} | {mean_t_interval(b)} | {below} / {above} ({p:.3g}) | "
                     f"{means['a_after']} | {mean_t_interval(a)} | {mean_t_interval(elbo, digits=4) if elbo else '— (not the same objective)' if not group[0]['same_objective'] else '—'} |")
    return "\n".join(lines)


def factor_quantiles(stages: Path, quantiles: tuple[float, ...] = (0.001, 0.01, 0.5)) -> str:
    """Per layer of each q_A in ``stages``: its widths ``sigma_A`` (least, quantiles) and the
    factors ``f = sigma_A / max sigma_A`` the preconditioner multiplies transfer's location steps
    by (the widest over all sites)."""
    names = " | ".join(f"sigma q={q:g}" for q in quantiles)
    lines = [f"| q_A | site | widest | sigma min | {names} | f min | f q={quantiles[1]:g} |", "|---|---|---|---|" + "---|" * (len(quantiles) + 2)]
    for path in sorted((stages / "stages").glob("A-bayesian-s*.pt")):
        widths = torch.load(path, weights_only=True)["data"]["prior"]["scales"]
        widest = max(float(w.max()) for w in widths.values())
        for site, width in widths.items():
            sigma = width.flatten().double()
            values = torch.quantile(sigma, torch.tensor(quantiles, dtype=torch.double)).tolist()
            lines.append(f"| {path.stem} | {site} | {widest:.3f} | {float(sigma.min()):.4f} | {' | '.join(f'{v:.4f}' for v in values)} | "
                         f"{float(sigma.min()) / widest:.4f} | {values[1] / widest:.4f} |")
    return "\n".join(lines)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python benchmarks/b_recipes.py", description=__doc__.split("\n\n")[0])
    p.add_argument("--first", nargs="+", required=True, type=Path, metavar="RUN",
                   help="run directories (or published figs/ folders: results.json, timing.json) of the first recipe")
    p.add_argument("--second", nargs="+", required=True, type=Path, metavar="RUN",
                   help="run directories of the second recipe: each is paired with every first run of its head that holds some of its units, "
                        "and the two must differ in B's fields only and hold the same q_A")
    p.add_argument("--methods", nargs=2, metavar=("M1", "M2"), help="pair method M1 of the first runs with M2 of the second (default: each method with itself)")
    p.add_argument("--stages", type=Path, action="append", default=[], help="a run directory whose stages/ hold q_A (factor quantiles)")
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    for run in (*args.first, *args.second):
        if not (run / "results.json").is_file():
            print(f"error: {run} has no results.json (a finished run of python -m pyro_bbt.transfer)", file=sys.stderr)
            return 2
    rows, paired = [], set()
    for second in args.second:
        for first in args.first:
            recipe, pairs = compare(first, second, None if args.methods is None else tuple(args.methods))
            if not pairs:
                continue
            twice = paired & {(r["head"], r["method"], r["fraction"], r["seed"]) for r in pairs}
            if twice:
                print(f"error: {second}'s units {sorted(twice)} are held by more than one first run: pass each once", file=sys.stderr)
                return 2
            paired |= {(r["head"], r["method"], r["fraction"], r["seed"]) for r in pairs}
            print(f"{first} → {second}: {'; '.join(recipe) or 'the same recipe'}, {len(pairs)} units paired")
            rows += pairs
    if not rows:
        print("error: the first and second runs hold no unit in common", file=sys.stderr)
        return 2
    print("\n**Per unit, first → second**\n")
    print(unit_table(rows))
    print("\n**Second against first** (ratios second / first, differences second − first)\n")
    print(summary_table(rows))
    for stages in args.stages:
        print(f"\n**q_A's widths sigma_A and the factors f = sigma_A / max sigma_A, {stages}**\n")
        print(factor_quantiles(stages))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
