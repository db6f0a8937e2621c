"""Where a converged fit's time goes: Adam's epochs, or the verdict's own work.

A fit under the paper preset (:meth:`~pyro_bbt.config.ExperimentConfig.recipe_b_converged`)
runs in two phases, recorded per epoch in its unit's ``history`` (``phase``):

* ``fit``: Adam's epochs under the stopping rule, and at each stop the verdict: its line-search
  judgement (8 full-data gradient estimates, a whitened natural-gradient direction and a
  fixed-noise line search) and, on a rejection, up to ``--polish-steps-b`` of its own steps
  before judging again, restarts included. Their cost is added to the epoch they follow.
* ``continuation``: epochs of Adam at 0.3 and 0.1 times the first rates with no judgement
  inside, then one fixed-noise score of what they gained (added to the last one).

So a continuation epoch's seconds are about the price of one epoch of Adam on the same data,
and ``fit seconds - fit epochs x (continuation seconds / continuation epochs)`` estimates what
the fit phase spent in the verdict's judgements and polishing steps ("verdict, est."): an
estimate, since the continuations' own scoring is in their seconds (so it errs low) and the two
phases run at different rates on the same data (the same work per epoch).

``--runs DIR [DIR ...]``: that table for every Bayesian B unit of finished
``python -m pyro_bbt.transfer`` runs (their results.json and timing.json), summed per method
and fraction.
``--profile``: one B fit under ``cProfile`` (``--method``, ``--fraction``, ``--head``,
``--seed``, capped at ``--max-epochs-b`` epochs, the README grid's configuration otherwise) and
the seconds of its parts::

    python benchmarks/fit_phases.py --runs figs/ps03 figs/ps03-s34 figs/ps03-shared figs/ps03-shared-s34 --out figs/fit-phases.json
    python benchmarks/fit_phases.py --profile --method scratch --fraction 0.01 --head shared --max-epochs-b 150 --out figs/fit-profile-scratch-f0.01.json
"""

from __future__ import annotations

import argparse
import cProfile
import json
import pstats
import sys
import time
from pathlib import Path

# The parts of a fit that --profile reports: (label, file suffix, function name), cumulative seconds (nested
# parts overlap; the final evaluations run after fit_posterior, so shares need not sum to 100 %).
PARTS = (
    ("the whole fit", "pyro_bbt/fitting.py", "fit_posterior"),
    ("verdict: polishing steps (after a rejection)", "pyro_bbt/inference.py", "_polish_last"),
    ("verdict: judgements (line search, confirmation)", "pyro_bbt/verdict.py", "judge_by"),
    ("  line-search steps, all (judgements and polishing)", "pyro_bbt/verdict.py", "line_search_gain"),
    ("    their full-data gradient estimates", "pyro_bbt/verdict.py", "_gradients"),
    ("    their whitened directions", "pyro_bbt/verdict.py", "whitened_direction"),
    ("    their fixed-noise scores", "pyro_bbt/verdict.py", "_crn_log_liks"),
    ("continuations' fixed-noise scores", "pyro_bbt/verdict.py", "continuation_gain"),
    ("Adam's steps (ELBO and gradients)", "pyro_bbt/objectives.py", "loss_and_grads"),
    ("evaluations (the learning curve's, and the final ones after the fit)", "pyro_bbt/units.py", "bayesian_metrics"),
)


def phase_rows(run_dirs: list[Path]) -> list[dict]:
    """Per (run, method, fraction), summed over seeds: epochs and seconds per phase, the unit's
    seconds, and the verdict's estimated share (module docstring). Reads each run's
    ``results.json`` (the epochs' phases) and ``timing.json`` (the seconds: ``units/I`` a unit's,
    ``units/I/history/J`` its epochs')."""
    grouped: dict[tuple[str, str, float], dict] = {}
    for run_dir in run_dirs:
        results = json.loads((run_dir / "results.json").read_text())
        timing = json.loads((run_dir / "timing.json").read_text())
        for index, unit in enumerate(results["units"]):
            history = unit.get("history") or []
            if unit.get("status") != "ok" or not history or "phase" not in history[0] or f"units/{index}" not in timing:
                continue
            row = grouped.setdefault((str(run_dir), unit["method"], unit["fraction"]),
                                     {"run": str(run_dir), "method": unit["method"], "fraction": unit["fraction"], "seeds": 0,
                                      "unit_seconds": 0.0, "fit_epochs": 0, "fit_seconds": 0.0, "continuation_epochs": 0,
                                      "continuation_seconds": 0.0, "verdict_seconds_est": 0.0})
            seconds = [timing[f"units/{index}/history/{j}"] for j in range(len(history))]
            fit = [t for e, t in zip(history, seconds) if e["phase"] == "fit"]
            cont = [t for e, t in zip(history, seconds) if e["phase"] == "continuation"]
            row["seeds"] += 1
            row["unit_seconds"] += timing[f"units/{index}"]
            row["fit_epochs"] += len(fit)
            row["fit_seconds"] += sum(fit)
            row["continuation_epochs"] += len(cont)
            row["continuation_seconds"] += sum(cont)
            if cont:
                row["verdict_seconds_est"] += max(0.0, sum(fit) - len(fit) * sum(cont) / len(cont))
    return list(grouped.values())


def phase_table(rows: list[dict]) -> str:
    lines = ["| run | method | fraction | seeds | unit s | fit: epochs, s, s/epoch | continuation: epochs, s, s/epoch | verdict, est. s | share of unit |",
             "|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        fit_rate = r["fit_seconds"] / max(r["fit_epochs"], 1)
        cont_rate = r["continuation_seconds"] / max(r["continuation_epochs"], 1)
        lines.append(f"| {Path(r['run']).name} | {r['method']} | {r['fraction']:g} | {r['seeds']} | {r['unit_seconds']:,.0f} | "
                     f"{r['fit_epochs']:,}, {r['fit_seconds']:,.0f}, {fit_rate:.3f} | {r['continuation_epochs']:,}, {r['continuation_seconds']:,.0f}, "
                     f"{cont_rate:.3f} | {r['verdict_seconds_est']:,.0f} | {r['verdict_seconds_est'] / max(r['unit_seconds'], 1e-9):.0%} |")
    unit, verdict = sum(r["unit_seconds"] for r in rows), sum(r["verdict_seconds_est"] for r in rows)
    lines += ["", f"All these units: {unit:,.0f} s, of which the verdict's judgements and polishing steps (est.) {verdict:,.0f} s "
                  f"({verdict / max(unit, 1e-9):.0%})."]
    return "\n".join(lines) + "\n"


def profile_fit(method: str, fraction: float, head: str, seed: int, max_epochs_b: int) -> dict:
    """One B fit of the README grid's configuration, capped at ``max_epochs_b``, under cProfile
    on one torch thread: the cumulative seconds of :data:`PARTS`."""
    import torch

    from pyro_bbt.config import PRESETS, ExperimentConfig
    from pyro_bbt.units import FitStorage, load_task_pair, run_bayesian_b, run_joint

    torch.set_num_threads(1)
    config = ExperimentConfig(**PRESETS["paper"] | dict(prior_scale=0.3, polish_steps_b=30, max_epochs_a=12000, max_epochs_b=max_epochs_b,
                                                        head=head, fractions=(fraction,), seeds=(seed,)))
    tasks = load_task_pair(config, fraction, seed)
    profiler = cProfile.Profile()
    start = time.perf_counter()
    profiler.enable()
    outcome = run_bayesian_b(config, method, tasks, None, 0, seed) if method == "scratch" else run_joint(config, tasks, 0, seed, FitStorage(), "")
    profiler.disable()
    wall = time.perf_counter() - start
    stats = pstats.Stats(profiler).stats
    parts = {}
    for label, suffix, name in PARTS:
        parts[label] = sum(entry[3] for (file, _, func), entry in stats.items() if func == name and file.endswith(suffix))
    return {"method": method, "fraction": fraction, "head": head, "seed": seed, "max_epochs_b": max_epochs_b, "wall_seconds": wall,
            "epochs": outcome["convergence"]["epochs"], "converged": outcome["convergence"]["converged"], "parts_seconds": parts}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--runs", type=Path, nargs="+", help="finished python -m pyro_bbt.transfer runs whose units to read")
    parser.add_argument("--profile", action="store_true", help="profile one B fit instead")
    parser.add_argument("--method", choices=("scratch", "joint"), default="scratch", help="--profile: the fit (those that need no task-A stage)")
    parser.add_argument("--fraction", type=float, default=0.01)
    parser.add_argument("--head", default="shared")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--max-epochs-b", type=int, default=150)
    parser.add_argument("--out", type=Path, help="write the rows (or the profile) as JSON here")
    args = parser.parse_args(argv)
    if bool(args.runs) == args.profile:
        parser.error("give --runs DIR [DIR ...] or --profile")
    if args.runs:
        missing = [str(d) for d in args.runs if not ((d / "results.json").is_file() and (d / "timing.json").is_file())]
        if missing:
            parser.error(f"no results.json and timing.json in {', '.join(missing)}: give the directories of finished python -m pyro_bbt.transfer runs")
        result = phase_rows(args.runs)
        print(phase_table(result), end="")
    else:
        result = profile_fit(args.method, args.fraction, args.head, args.seed, args.max_epochs_b)
        print(f"{result['method']} at {result['fraction']:g} of B, {result['head']} head, seed {result['seed']}: {result['epochs']} epochs "
              f"(cap {result['max_epochs_b']}), {result['wall_seconds']:.1f} s wall")
        whole = result["parts_seconds"]["the whole fit"]
        for label, seconds in result["parts_seconds"].items():
            print(f"  {label:55s} {seconds:8.1f} s  {seconds / whole:6.1%}")
    if args.out:
        args.out.write_text(json.dumps(result, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
