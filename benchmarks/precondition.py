"""Must transfer's step be preconditioned? The same B units fitted with Adam's own step on the
locations and with it scaled by the prior's width (``--precondition-b prior-scale``).

Under transfer, q_B starts at q_A and its prior is q_A: a weight q_A pinned to a width
``sigma_A`` is moved by Adam about ``lr`` per step whatever ``sigma_A`` is. The preconditioned
step moves it ``lr sigma_A / max sigma`` instead (Adam in prior-whitened coordinates,
:attr:`pyro_bbt.inference.TrainConfig.precondition`). Each pair of runs holds the same units (method,
fraction, seed: the same q_A, data and seeds, every fit by the same rule and verdict) and differs
only in ``precondition_b``. Per unit this prints, plain → preconditioned: epochs to the end of the
fit, ``converged``, seconds (``timing.json``; both runs side by side on the same machine), B's test
accuracy, A's after B, and the ELBO per example at the end of the confirming continuation (the
fixed-noise evaluator's, with its standard error); per head and fraction, the medians of the
ratios and the paired differences with a t interval and the exact sign test. ``--stages DIR``
adds the quantiles of the factors ``f = sigma_A / max sigma_A`` over each layer of the q_A stored
there (``stages/A-bayesian-sS.pt``)::

    python benchmarks/precondition.py --pair runs/base-shared-s59 runs/pc-shared-s59 \\
        --pair runs/base-mh-s58 runs/pc-mh-s58 --stages runs/ps03-shared-s59
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
from collections import defaultdict
from pathlib import Path

import torch

from pyro_bbt.report import mean_t_interval
from pyro_bbt.runstore import config_differences
from pyro_bbt.stats import sign_test

RUN_ONLY = ("precondition_b", "methods", "fractions", "seeds", "checkpoint_seconds")  # what a pair may differ in


def unit_seconds(run: Path) -> dict[int, float]:
    """Wall seconds per unit index of ``run``'s ``results.json`` (its ``timing.json``, summed)."""
    totals: dict[int, float] = defaultdict(float)
    for key, seconds in json.loads((run / "timing.json").read_text()).items():
        parts = key.split("/")
        if parts[0] == "units":
            totals[int(parts[1])] += seconds
    return totals


def end_elbo(unit: dict) -> tuple[float | None, float | None]:
    """The ELBO per example at the end of the unit's last confirming continuation, and its standard error."""
    verdict = (unit.get("history") or [{}])[-1].get("verdict") or {}
    continuation = verdict.get("continuation")
    if not continuation:
        return None, None
    n = continuation["num_data"]
    return continuation["end_elbo"] / n, continuation["stderr"] / n


def read_units(run: Path) -> tuple[dict, dict]:
    results = json.loads((run / "results.json").read_text())
    seconds = unit_seconds(run)
    units = {}
    for index, unit in enumerate(results["units"]):
        if unit.get("status") != "ok":
            continue
        units[(unit["method"], unit["fraction"], unit["seed"])] = dict(unit, seconds=seconds.get(index))
    return results["config"], units


def compare(plain_run: Path, preconditioned_run: Path) -> tuple[str, list[dict]]:
    plain_config, plain = read_units(plain_run)
    pc_config, preconditioned = read_units(preconditioned_run)
    if plain_config.get("precondition_b", "none") != "none" or pc_config.get("precondition_b") != "prior-scale":
        raise SystemExit(f"error: {plain_run} must be fitted without --precondition-b and {preconditioned_run} with --precondition-b prior-scale")
    other = [d for d in config_differences(plain_config, pc_config) if d.split(":")[0] not in RUN_ONLY]
    if other:
        raise SystemExit(f"error: {plain_run} and {preconditioned_run} differ in more than the preconditioner: {'; '.join(other)}")
    rows = []
    for key in sorted(set(plain) & set(preconditioned)):
        a, b = plain[key], preconditioned[key]
        rows.append(dict(head=plain_config["head"], method=key[0], fraction=key[1], seed=key[2],
                         epochs=(a["convergence"]["epochs"], b["convergence"]["epochs"]),
                         converged=(a["convergence"]["converged"], b["convergence"]["converged"]),
                         seconds=(a["seconds"], b["seconds"]),
                         b_test=(a["b_test"]["accuracy"], b["b_test"]["accuracy"]),
                         a_after=(a["a_test_after"]["accuracy"], b["a_test_after"]["accuracy"]),
                         elbo=(end_elbo(a), end_elbo(b))))
    return plain_config["head"], rows


def _yes(flag: bool) -> str:
    return "yes" if flag else "NO"


def unit_table(rows: list[dict]) -> str:
    lines = ["| head | method | fraction | seed | epochs | converged | seconds | B test | A after B | end ELBO / example (± s.e.) |",
             "|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        (e0, s0), (e1, s1) = r["elbo"]
        elbo = "—" if e0 is None or e1 is None else f"{e0:.4f} (±{s0:.4f}) → {e1:.4f} (±{s1:.4f})"
        seconds = "—" if None in r["seconds"] else f"{r['seconds'][0]:.0f} → {r['seconds'][1]:.0f}"
        lines.append(f"| {r['head']} | {r['method']} | {r['fraction']:g} | {r['seed']} | {r['epochs'][0]} → {r['epochs'][1]} | "
                     f"{_yes(r['converged'][0])} → {_yes(r['converged'][1])} | {seconds} | {r['b_test'][0]:.4f} → {r['b_test'][1]:.4f} | "
                     f"{r['a_after'][0]:.4f} → {r['a_after'][1]:.4f} | {elbo} |")
    return "\n".join(lines)


def summary_table(rows: list[dict]) -> str:
    """Per head, method and fraction: median ratios (preconditioned / plain) of epochs and
    seconds, paired differences (preconditioned − plain) of B, A after B and the end ELBO."""
    groups: dict[tuple, list[dict]] = defaultdict(list)
    for r in rows:
        groups[(r["head"], r["method"], r["fraction"])].append(r)
    lines = ["| head | method | fraction | n (both converged) | epochs, median ratio | seconds, median ratio | B test, difference [95 % t] | B below / above (p) | A after B, difference | end ELBO / example, difference |",
             "|---|---|---|---|---|---|---|---|---|---|"]
    for (head, method, fraction), group in sorted(groups.items()):
        both = sum(all(r["converged"]) for r in group)
        epochs = statistics.median(r["epochs"][1] / r["epochs"][0] for r in group)
        timed = [r["seconds"][1] / r["seconds"][0] for r in group if None not in r["seconds"]]
        seconds = f"{statistics.median(timed):.2f}" if timed else "—"
        b = [r["b_test"][1] - r["b_test"][0] for r in group]
        a = [r["a_after"][1] - r["a_after"][0] for r in group]
        elbo = [r["elbo"][1][0] - r["elbo"][0][0] for r in group if r["elbo"][0][0] is not None and r["elbo"][1][0] is not None]
        below, above, p = sign_test(b)
        lines.append(f"| {head} | {method} | {fraction:g} | {len(group)} ({both}) | {epochs:.2f} | {seconds} | {mean_t_interval(b)} | {below} / {above} ({p:.3g}) | "
                     f"{mean_t_interval(a)} | {mean_t_interval(elbo, digits=4) if elbo else '—'} |")
    return "\n".join(lines)


def factor_quantiles(stages: Path, quantiles: tuple[float, ...] = (0.001, 0.01, 0.05, 0.5)) -> str:
    """Quantiles of ``f = sigma_A / max sigma_A`` per layer of each q_A in ``stages``: what the
    preconditioner multiplies transfer's location steps by (the widest width over all sites)."""
    lines = [f"| q_A | site | min f | {' | '.join(f'f at q={q:g}' for q in quantiles)} |", "|---|---|---|" + "---|" * len(quantiles)]
    for path in sorted((stages / "stages").glob("A-bayesian-s*.pt")):
        widths = torch.load(path, weights_only=True)["data"]["prior"]["scales"]
        widest = max(float(w.max()) for w in widths.values())
        for site, width in widths.items():
            f = (width.flatten().double() / widest)
            values = torch.quantile(f, torch.tensor(quantiles, dtype=torch.double)).tolist() if f.numel() <= 16_000_000 else []
            lines.append(f"| {path.stem} | {site} | {float(f.min()):.4f} | {' | '.join(f'{v:.4f}' for v in values)} |")
    return "\n".join(lines)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python benchmarks/precondition.py", description=__doc__.split("\n\n")[0])
    p.add_argument("--pair", nargs=2, action="append", metavar=("PLAIN", "PRECONDITIONED"), required=True, type=Path,
                   help="two run directories with the same units, fitted without and with --precondition-b prior-scale")
    p.add_argument("--stages", type=Path, action="append", default=[], help="a run directory whose stages/ hold q_A (factor quantiles)")
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    rows = []
    for plain, preconditioned in args.pair:
        for run in (plain, preconditioned):
            if not (run / "results.json").is_file():
                print(f"error: {run} has no results.json (a finished run of python -m pyro_bbt.transfer)", file=sys.stderr)
                return 2
        rows += compare(plain, preconditioned)[1]
    print("**Per unit, plain → preconditioned**\n")
    print(unit_table(rows))
    print("\n**Preconditioned against plain**\n")
    print(summary_table(rows))
    for stages in args.stages:
        print(f"\n**Factors f = sigma_A / max sigma_A, {stages}**\n")
        print(factor_quantiles(stages))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
