"""``python -m pyro_bbt.report DIR``: the Markdown tables of a finished transfer run.

Reads ``DIR/results.json`` (written by ``python -m pyro_bbt.transfer``) and prints, per method
and fraction of B's data, mean +- standard deviation over seeds of B's test accuracy, A's test
accuracy after B, B's test NLL and ECE, and backward transfer; task A's accuracy before B; and
the convergence diagnostics of every posterior (epochs, the stopping rule's verdict, median
posterior sigma per weight site, the uninformed-weight sigma ratio) with the run's warnings;
and, where ``DIR/timing.json`` is there, what the fits cost (:func:`~pyro_bbt.fit_report.cost_lines`: epochs and
seconds per method and fraction, the compute in all, a lower bound on two workers' wall time);
the active hidden units (:func:`~pyro_bbt.fit_report.census_lines`); and the fits that end in an optimum predicting
their training data worse than they once did (:func:`~pyro_bbt.fit_report.optima_lines`).
The result tables of docs/transfer-results.md and docs/split-mnist.md are this command's output.
``--plots`` also redraws the run's
figures from ``results.json`` (the same figures ``transfer`` writes at the end of a run);
``--uncertainty`` adds the predictive entropy and mutual information on A's test digits after B,
per method and fraction, and Spearman's correlation of each with forgetting. For a
``--sequence split`` run it prints :func:`~pyro_bbt.split_report.split_sequence_table` (``--plots`` redraws
``split_mnist.png`` and ``sequence.png``).
"""

from __future__ import annotations

import argparse
import json
import sys
from collections import Counter
from pathlib import Path

from .fit_report import census_lines, convergence_lines, cost_lines, optima_lines
from .merging import merge_seeds, merge_timing, merge_transfer_runs, select_fractions
from .split_report import merge_split_runs, regimes_table, split_comparison_table, split_sequence_table
from .stats import sign_test

__all__ = ["transfer_tables", "not_converged", "converged_only", "paired_lines", "mean_t_interval", "spearman", "forgetting_uncertainty_lines", "prior_scale_lines", "build_parser", "main"]


def _cell(entry: dict | None, digits: int = 4) -> str:
    if entry is None:
        return "—"
    return f"{entry['mean']:.{digits}f} ± {entry['std']:.{digits}f}"


def not_converged(units: list[dict]) -> dict[tuple[str, float], list[int]]:
    """The seeds of the finished units whose fit the verdict did not call converged, by (method,
    fraction); units without a verdict (EWC's deterministic nets) are not listed."""
    found: dict[tuple[str, float], list[int]] = {}
    for unit in units:
        convergence = unit.get("convergence")
        if unit["status"] == "ok" and isinstance(convergence, dict) and convergence.get("converged") is False:
            found.setdefault((unit["method"], float(unit["fraction"])), []).append(unit["seed"])
    return found


def converged_only(results: dict) -> tuple[dict, str]:
    """``--converged-only``: ``results`` without the finished units whose fit the verdict did not call
    converged (:func:`not_converged`), its summary recomputed, and a line naming each unit left out
    with its B and A accuracy and its epochs against its cap (empty when none is)."""
    from .experiment import summarize_units

    left = not_converged(results["units"])

    def is_left(unit: dict) -> bool:
        return unit["seed"] in left.get((unit["method"], float(unit["fraction"])), [])

    out = [u for u in results["units"] if is_left(u)]
    if not out:
        return results, ""
    kept = [u for u in results["units"] if not is_left(u)]

    def epochs(convergence: dict) -> str:
        return f", {convergence['epochs']} epochs, cap {convergence['max_epochs']}" if convergence.get("epochs") is not None and convergence.get("max_epochs") else ""

    named = "; ".join(f"{u['method']} at {u['fraction']:g}, seed {u['seed']} (B {u['b_test']['accuracy']:.4f}, A after B "
                      f"{u['a_test_after']['accuracy']:.4f}{epochs(u['convergence'])})"
                      for u in sorted(out, key=lambda u: (u["method"], u["fraction"], u["seed"])))
    return {**results, "units": kept, "summary": summarize_units(kept)}, f"Left out of the tables and paired differences (--converged-only: the verdict did not call them converged): {named}.\n\n"


def transfer_tables(results: dict) -> str:
    """The mean ± std tables over seeds (``results["summary"]``). A cell that averages a fit the
    verdict did not call converged says so, ``(k of n not converged)``, so that no table counts such
    a fit as converged; the line after the tables names each of them."""
    summary = results["summary"]
    fractions = sorted({float(f) for by_fraction in summary.values() for f in by_fraction})
    methods = list(summary)
    unconverged = not_converged(results.get("units", []))
    counts = Counter((u["method"], float(u["fraction"])) for u in results.get("units", []) if u["status"] == "ok")
    lines = []
    for title, key in (
        ("B test accuracy", "b_test_accuracy"),
        ("A test accuracy after training on B (forgetting)", "a_test_after_accuracy"),
        ("B test NLL", "b_test_nll"),
        ("B test ECE", "b_test_ece"),
        ("Backward transfer R[1][0] - R[0][0]", "backward_transfer"),
    ):
        lines += [f"**{title}** (mean ± std over seeds)", "", "| method | " + " | ".join(f"{f:g}" for f in fractions) + " |",
                  "|---|" + "---|" * len(fractions)]
        for method in methods:
            cells = [_cell(summary[method].get(str(f), {}).get(key)) for f in fractions]
            if all(c == "—" for c in cells):
                continue
            cells = [cell if cell == "—" or (method, f) not in unconverged else
                     f"{cell} ({len(unconverged[(method, f)])} of {counts[(method, f)]} not converged)"
                     for cell, f in zip(cells, fractions)]
            lines.append(f"| {method} | " + " | ".join(cells) + " |")
        lines.append("")
    if unconverged:
        lines += ["Not converged (the verdict), counted in the cells marked above: " + "; ".join(
            f"{method} at {fraction:g}, seed{'s' if len(seeds) > 1 else ''} {', '.join(map(str, sorted(seeds)))}"
            for (method, fraction), seeds in sorted(unconverged.items())) + ".", ""]
    by_kind: dict[str, list[float]] = {}
    for stage in results["task_a"]:
        by_kind.setdefault(stage["kind"], []).append(stage["a_test"]["accuracy"])
    for kind, values in by_kind.items():
        mean = sum(values) / len(values)
        lines.append(f"Task A test accuracy before B ({kind} net): {mean:.4f} (seeds: {', '.join(f'{v:.4f}' for v in values)})")
    failed = [u for u in results["units"] if u["status"] != "ok"]
    lines.append(f"Units: {len(results['units'])}, failed: {len(failed)}.")
    return "\n".join(lines) + "\n"


# two-sided 95 % t quantiles by degrees of freedom (1..30); a normal 1.96 beyond
T95 = {1: 12.706, 2: 4.303, 3: 3.182, 4: 2.776, 5: 2.571, 6: 2.447, 7: 2.365, 8: 2.306, 9: 2.262, 10: 2.228,
       11: 2.201, 12: 2.179, 13: 2.160, 14: 2.145, 15: 2.131, 16: 2.120, 17: 2.110, 18: 2.101, 19: 2.093, 20: 2.086,
       21: 2.080, 22: 2.074, 23: 2.069, 24: 2.064, 25: 2.060, 26: 2.056, 27: 2.052, 28: 2.048, 29: 2.045, 30: 2.042}


def mean_t_interval(values: list[float], digits: int = 3) -> str:
    """``mean [low, high]``: the mean of ``values`` and its two-sided 95 % t interval,
    ``mean -+ t_(n-1) s / sqrt(n)`` (one value: itself; none: a dash)."""
    from statistics import mean, stdev

    if len(values) < 2:
        return f"{values[0]:+.{digits}f}" if values else "—"
    half = T95.get(len(values) - 1, 1.96) * stdev(values) / len(values) ** 0.5
    return f"{mean(values):+.{digits}f} [{mean(values) - half:+.{digits}f}, {mean(values) + half:+.{digits}f}]"


def paired_lines(results: dict, pairs: tuple[tuple[str, str], ...] = (("transfer", "scratch"), ("transfer", "ewc"), ("transfer", "finetune"))) -> str:
    """Per-seed paired differences of B's test accuracy and of A's accuracy after B between two
    methods at each fraction (same seed, same data): mean, and a 95 % t interval over seeds; and,
    for B, how many seeds fall below and above 0 with the exact sign test's p-value
    (:func:`~pyro_bbt.stats.sign_test`), which does not assume the differences normal."""
    ok = {(u["method"], u["fraction"], u["seed"]): u for u in results["units"] if u["status"] == "ok"}
    unconverged = not_converged(results["units"])
    fractions = sorted({f for _, f, _ in ok})
    lines = ["**Paired differences over seeds** (mean [95 % t interval], n seeds, of which any pair with a fit the verdict did not call converged; "
             "B's seeds below / above 0, exact two-sided sign test)", "",
             "| difference | fraction | B test accuracy | A accuracy after B | n | B: below / above (p) |", "|---|---|---|---|---|---|"]

    for first, second in pairs:
        for fraction in fractions:
            seeds = sorted(s for m, f, s in ok if m == first and f == fraction and (second, f, s) in ok)
            if not seeds:
                continue
            b = [ok[(first, fraction, s)]["b_test"]["accuracy"] - ok[(second, fraction, s)]["b_test"]["accuracy"] for s in seeds]
            a = [ok[(first, fraction, s)]["a_test_after"]["accuracy"] - ok[(second, fraction, s)]["a_test_after"]["accuracy"] for s in seeds]
            below, above, p = sign_test(b)
            flagged = sorted({s for s in seeds for m in (first, second) if s in unconverged.get((m, float(fraction)), [])})
            n = f"{len(seeds)} ({len(flagged)} not converged)" if flagged else f"{len(seeds)}"
            lines.append(f"| {first} − {second} | {fraction:g} | {mean_t_interval(b)} | {mean_t_interval(a)} | {n} | {below} / {above} ({p:.3g}) |")
    return "\n".join(lines) + "\n"


def _ranks(values: list[float]) -> list[float]:
    """1-based ranks, ties sharing their mean rank."""
    order = sorted(range(len(values)), key=values.__getitem__)
    ranks = [0.0] * len(values)
    start = 0
    while start < len(order):
        end = start
        while end + 1 < len(order) and values[order[end + 1]] == values[order[start]]:
            end += 1
        for position in range(start, end + 1):
            ranks[order[position]] = (start + end) / 2 + 1
        start = end + 1
    return ranks


def spearman(x: list[float], y: list[float]) -> float | None:
    """Spearman's rank correlation (Pearson's on mid-ranks); ``None`` for fewer than 3 pairs or
    a constant variable."""
    if len(x) != len(y):
        raise ValueError(f"spearman needs pairs, got {len(x)} and {len(y)} values")
    if len(x) < 3:
        return None
    rx, ry = _ranks(x), _ranks(y)
    mx, my = sum(rx) / len(rx), sum(ry) / len(ry)
    sxy = sum((a - mx) * (b - my) for a, b in zip(rx, ry))
    sxx, syy = sum((a - mx) ** 2 for a in rx), sum((b - my) ** 2 for b in ry)
    return None if sxx == 0 or syy == 0 else sxy / (sxx * syy) ** 0.5


def forgetting_uncertainty_lines(results: dict) -> str:
    """Does the network's uncertainty on A's test digits after B tell how much of A it forgot?
    Per method and fraction: A's test accuracy after B with the predictive entropy and mutual
    information on A's test set (mean ± std over seeds); per method, Spearman's correlation over
    all its units between forgetting (1 - accuracy) and each of the two."""
    units = [u for u in results["units"] if u["status"] == "ok" and u.get("a_test_after")]
    methods = list(dict.fromkeys(u["method"] for u in units))
    fractions = sorted({u["fraction"] for u in units})
    lines = ["**Uncertainty on A's test digits after B** (accuracy / entropy / mutual information in nats, mean ± std over seeds)", "",
             "| method | " + " | ".join(f"{f:g}" for f in fractions) + " | Spearman: forgetting vs entropy | vs mutual information |",
             "|---|" + "---|" * (len(fractions) + 2)]

    def mean_std(values: list[float]) -> str:
        mean = sum(values) / len(values)
        std = (sum((v - mean) ** 2 for v in values) / (len(values) - 1)) ** 0.5 if len(values) > 1 else 0.0
        return f"{mean:.3f} ± {std:.3f}"

    for method in methods:
        mine = [u for u in units if u["method"] == method]
        cells = []
        for fraction in fractions:
            group = [u["a_test_after"] for u in mine if u["fraction"] == fraction]
            cells.append(" / ".join(mean_std([g[k] for g in group]) for k in ("accuracy", "entropy", "mutual_information")) if group else "—")
        forgetting = [1 - u["a_test_after"]["accuracy"] for u in mine]
        rho = [spearman(forgetting, [u["a_test_after"][k] for u in mine]) for k in ("entropy", "mutual_information")]
        lines.append(f"| {method} | " + " | ".join(cells) + " | " + " | ".join("—" if r is None else f"{r:+.2f}" for r in rho) + " |")
    return "\n".join(lines) + "\n"


def prior_scale_lines(run_dir: Path) -> str:
    """Median scale of the transferred prior (tau * sigma of q_A) per weight site, from the
    task-A stages saved in ``run_dir/stages``."""
    import torch

    lines = []
    for path in sorted((run_dir / "stages").glob("A-bayesian-s*.pt")):
        scales = torch.load(path, map_location="cpu", weights_only=True)["data"]["prior"].get("scales", {})
        medians = ", ".join(f"{site} {float(value.median()):.4f}" for site, value in scales.items() if site.endswith("weight"))
        lines.append(f"Transferred prior scale, median per site ({path.stem}): {medians}")
    return "\n".join(lines) + ("\n" if lines else "")


def _fraction_list(text: str) -> tuple[float, ...]:
    try:
        return tuple(float(part) for part in text.split(","))
    except ValueError:
        raise argparse.ArgumentTypeError(f"must be fractions of B separated by commas, e.g. 0.01,0.1; got {text!r}") from None


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m pyro_bbt.report", description=__doc__)
    parser.add_argument("run_dir", type=Path, nargs="+", help="output directory of python -m pyro_bbt.transfer (several: --published, --regimes, "
                        "--learning-curves, or A -> B runs of one configuration made apart for different --methods, --fractions or --seeds, whose tables are merged)")
    parser.add_argument("--published", action="store_true",
                        help="for --sequence split runs: one table of their average accuracies beside the published numbers "
                             "(runs of one scenario with different --methods or --seeds, or both, are merged)")
    parser.add_argument("--figure", type=Path, default=None, metavar="PNG",
                        help="with --published: also draw the runs' average-accuracy curves side by side into PNG")
    parser.add_argument("--learning-curves", type=Path, default=None, metavar="PNG",
                        help="draw B's learning curves (test accuracy against steps and fit wall time) of the runs given into PNG, one row per head "
                             "(runs of one head are merged as the tables are)")
    parser.add_argument("--fractions", type=_fraction_list, default=None, metavar="F[,F...]",
                        help="for A -> B runs (their tables, merged or not, and --learning-curves): only their units at these fractions of B")
    parser.add_argument("--regimes", action="store_true",
                        help="for several --sequence split runs of one scenario: one row per run (the settings that differ, ACC, BWT, "
                             "converged fits, median sigma, active units after every task; runs of one configuration with different --seeds are "
                             "merged); --figure draws their curves and unit counts")
    parser.add_argument("--converged-only", action="store_true",
                        help="for A -> B runs: leave the units whose fit the verdict did not call converged out of the tables and the paired "
                             "differences, and name them (the sections on convergence and cost still show every unit); by default such a unit "
                             "is counted and its cell marked")
    parser.add_argument("--plots", action="store_true", help="also redraw the run's figures from its results.json (into run_dir)")
    parser.add_argument("--uncertainty", action="store_true", help="also print the uncertainty on A's test digits after B, and how it tracks forgetting")
    return parser


def _with_timing(runs: list[dict], run_dirs: list[Path]) -> list[tuple[dict, dict]]:
    """``(results, timing)`` of each A -> B run that has a readable ``timing.json`` (``results`` as
    stored: timing.json's ``units/I`` keys are its unit indices, which ``--fractions`` renumbers).
    A run without one is left out of the fit-cost table, which is then empty or partial."""
    pairs = []
    for results, run_dir in zip(runs, run_dirs):
        try:
            pairs.append((results, json.loads((run_dir / "timing.json").read_text())))
        except (OSError, json.JSONDecodeError):
            continue
    return pairs


def _split_runs(run_dirs: list[Path], flag: str) -> list[dict]:
    """The ``results.json`` of each ``--sequence split`` run in ``run_dirs``; ``ValueError``
    naming the first that is missing or not a split run."""
    runs = []
    for run_dir in run_dirs:
        path = run_dir / "results.json"
        results = json.loads(path.read_text()) if path.exists() else {}
        if results.get("sequence") != "split":
            raise ValueError(f"{flag} reads --sequence split runs; {path} is {'not one' if results else 'missing'}")
        runs.append(results)
    return runs


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.converged_only and (args.published or args.regimes):
        print(f"{parser.prog}: error: --converged-only selects the units of the A -> B tables; --published and --regimes read --sequence split runs", file=sys.stderr)
        return 2
    if args.regimes:
        try:
            runs = _split_runs(args.run_dir, "--regimes")
        except ValueError as error:
            print(f"{parser.prog}: error: {error}", file=sys.stderr)
            return 2
        names = [run_dir.name for run_dir in args.run_dir]
        try:
            runs, names = merge_seeds(runs, names)
            print(regimes_table(runs, names), end="")
        except ValueError as error:
            print(f"{parser.prog}: error: {error}", file=sys.stderr)
            return 2
        if args.figure is not None:
            from .plots import plot_regimes

            plot_regimes(runs, names, args.figure)
            print(f"wrote {args.figure}")
        return 0
    if args.published:
        try:
            runs = merge_split_runs(_split_runs(args.run_dir, "--published"))  # methods and seeds pooled per scenario
        except ValueError as error:
            print(f"{parser.prog}: error: {error}", file=sys.stderr)
            return 2
        print(split_comparison_table(runs), end="")
        for results in runs:  # each scenario's merged runs in full: BWT, FWT, forgetting, the verdicts
            print("\n" + split_sequence_table(results), end="")
        if args.figure is not None:
            from .plots import plot_split_scenarios

            plot_split_scenarios(runs, args.figure)
            print(f"wrote {args.figure}")
        return 0
    if args.figure is not None:
        print(f"{parser.prog}: error: --figure needs --published or --regimes", file=sys.stderr)
        return 2
    if args.converged_only and args.learning_curves is not None:
        print(f"{parser.prog}: error: --converged-only selects the units of the tables; --learning-curves draws every unit's curve", file=sys.stderr)
        return 2
    if args.learning_curves is not None:
        from .plots import plot_learning_curves

        by_head: dict[str, list[tuple[dict, dict, str]]] = {}
        for run_dir in args.run_dir:
            paths = [run_dir / "results.json", run_dir / "timing.json"]
            missing = [str(p) for p in paths if not p.exists()]
            if missing:
                print(f"{parser.prog}: error: --learning-curves needs transfer runs; {', '.join(missing)} missing", file=sys.stderr)
                return 2
            results, timing = (json.loads(p.read_text()) for p in paths)
            if "units" not in results:
                print(f"{parser.prog}: error: --learning-curves needs A -> B transfer runs; {paths[0]} is not one", file=sys.stderr)
                return 2
            try:
                results, timing = select_fractions(results, timing, args.fractions)
            except ValueError as error:
                print(f"{parser.prog}: error: {run_dir}: {error}", file=sys.stderr)
                return 2
            by_head.setdefault(results["config"]["head"], []).append((results, timing, str(run_dir)))
        runs = {}
        for head, parts in by_head.items():  # runs of one head are merged (merge_transfer_runs' rules)
            try:
                merged = merge_transfer_runs([r for r, _, _ in parts], [n for _, _, n in parts])
            except ValueError as error:
                print(f"{parser.prog}: error: {error}", file=sys.stderr)
                return 2
            runs[head] = (merged, merge_timing([t for _, t, _ in parts], [len(r["units"]) for r, _, _ in parts]))
            for note in merged["warnings"][sum(len(r.get("warnings", [])) for r, _, _ in parts):]:
                print(f"note: {note}")
        plot_learning_curves(runs, args.learning_curves)
        print(f"wrote {args.learning_curves}")
        return 0
    for run_dir in args.run_dir:
        if not (run_dir / "results.json").exists():
            print(f"{parser.prog}: error: {run_dir / 'results.json'} does not exist (run python -m pyro_bbt.transfer --out {run_dir} first)", file=sys.stderr)
            return 2
    if len(args.run_dir) > 1:
        if args.plots or args.uncertainty:
            print(f"{parser.prog}: error: --plots and --uncertainty read one run directory (got {len(args.run_dir)})", file=sys.stderr)
            return 2
        try:
            runs, stored = [], []  # stored: as on disk, whose unit indices timing.json's keys use
            for run_dir in args.run_dir:
                try:
                    loaded = json.loads((run_dir / "results.json").read_text())
                except json.JSONDecodeError as error:
                    raise ValueError(f"{run_dir / 'results.json'} is damaged ({error})") from None
                stored.append(loaded)
                if "units" in loaded and args.fractions is not None:
                    try:
                        loaded = select_fractions(loaded, None, args.fractions)[0]
                    except ValueError as error:
                        raise ValueError(f"{run_dir}: {error}") from None
                runs.append(loaded)
            merged = merge_transfer_runs(runs, [str(d) for d in args.run_dir])
        except ValueError as error:
            print(f"{parser.prog}: error: {error}", file=sys.stderr)
            return 2
        tables, left_out = converged_only(merged) if args.converged_only else (merged, "")
        print(left_out + transfer_tables(tables), end="")
        print(paired_lines(tables), end="")
        print(convergence_lines(merged), end="")
        print(cost_lines(_with_timing(stored, args.run_dir), args.fractions), end="")
        print(census_lines(merged), end="")
        print(optima_lines(merged), end="")
        return 0
    args.run_dir = args.run_dir[0]
    path = args.run_dir / "results.json"
    results = json.loads(path.read_text())
    if args.converged_only and "units" not in results:
        print(f"{parser.prog}: error: --converged-only reads A -> B runs; {path} is not one", file=sys.stderr)
        return 2
    if results.get("sequence") == "split":
        print(split_sequence_table(results), end="")
        if args.plots:
            from .plots import plot_sequence, plot_split_sequence

            for name, plot in (("split_mnist.png", plot_split_sequence), ("sequence.png", plot_sequence)):
                plot(results, args.run_dir / name)
                print(f"wrote {args.run_dir / name}")
        return 0
    if results.get("mode") == "sequence":
        print(f"{parser.prog}: error: {path} is a --sequence run; its matrix is in sequence.png and results.json", file=sys.stderr)
        return 2
    stored = results  # as on disk, whose unit indices timing.json's keys use
    if args.fractions is not None and "units" in results:
        try:
            results = select_fractions(results, None, args.fractions)[0]
        except ValueError as error:
            print(f"{parser.prog}: error: {args.run_dir}: {error}", file=sys.stderr)
            return 2
    tables, left_out = converged_only(results) if args.converged_only else (results, "")
    print(left_out + transfer_tables(tables), end="")
    print(paired_lines(tables), end="")
    print(convergence_lines(results), end="")
    print(cost_lines(_with_timing([stored], [args.run_dir]), args.fractions), end="")
    print(census_lines(results), end="")
    print(optima_lines(results), end="")
    print(prior_scale_lines(args.run_dir), end="")
    if args.uncertainty:
        print(forgetting_uncertainty_lines(results), end="")
    if args.plots:
        from .plots import save_all

        for figure in save_all(results, args.run_dir):
            print(f"wrote {figure}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
