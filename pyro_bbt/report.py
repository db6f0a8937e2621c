"""``python -m pyro_bbt.report DIR``: the Markdown tables of a finished transfer run.

Reads ``DIR/results.json`` (written by ``python -m pyro_bbt.transfer``) and prints, per method
and fraction of B's data, mean +- standard deviation over seeds of B's test accuracy, A's test
accuracy after B, B's test NLL and ECE, and backward transfer; task A's accuracy before B; and
the convergence diagnostics of every posterior (epochs, the stopping rule's verdict, median
posterior sigma per weight site, the uninformed-weight sigma ratio) with the run's warnings;
and, where ``DIR/timing.json`` is there, what the fits cost (:func:`cost_lines`: epochs and
seconds per method and fraction, the compute in all, a lower bound on two workers' wall time);
the active hidden units (:func:`census_lines`); and the fits that end in an optimum predicting
their training data worse than they once did (:func:`optima_lines`).
The result tables of docs/transfer-results.md and docs/split-mnist.md are this command's output.
``--plots`` also redraws the run's
figures from ``results.json`` (the same figures ``transfer`` writes at the end of a run);
``--uncertainty`` adds the predictive entropy and mutual information on A's test digits after B,
per method and fraction, and Spearman's correlation of each with forgetting. For a
``--sequence split`` run it prints :func:`split_sequence_table` (``--plots`` redraws
``split_mnist.png`` and ``sequence.png``).
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
from collections.abc import Callable
from pathlib import Path

from .config import CAP_FIELDS, GRID_FIELDS, LATER_FIELDS, PRECISION_FIELDS, RUN_FIELDS, ExperimentConfig
from .convergence import continuation_text, elbo_test_text

__all__ = ["split_sequence_table", "split_comparison_table", "merge_split_runs", "PUBLISHED_SPLIT_MNIST", "transfer_tables", "convergence_lines", "census_lines", "optima_lines", "fit_costs", "cost_lines", "forgetting_uncertainty_lines", "spearman", "build_parser", "main"]


def _cell(entry: dict | None, digits: int = 4) -> str:
    if entry is None:
        return "—"
    return f"{entry['mean']:.{digits}f} ± {entry['std']:.{digits}f}"


def transfer_tables(results: dict) -> str:
    summary = results["summary"]
    fractions = sorted({float(f) for by_fraction in summary.values() for f in by_fraction})
    methods = list(summary)
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
            lines.append(f"| {method} | " + " | ".join(cells) + " |")
        lines.append("")
    by_kind: dict[str, list[float]] = {}
    for stage in results["task_a"]:
        by_kind.setdefault(stage["kind"], []).append(stage["a_test"]["accuracy"])
    for kind, values in by_kind.items():
        mean = sum(values) / len(values)
        lines.append(f"Task A test accuracy before B ({kind} net): {mean:.4f} (seeds: {', '.join(f'{v:.4f}' for v in values)})")
    failed = [u for u in results["units"] if u["status"] != "ok"]
    lines.append(f"Units: {len(results['units'])}, failed: {len(failed)}.")
    return "\n".join(lines) + "\n"


def _percent(entry: dict | None, signed: bool = False) -> str:
    if entry is None:
        return "—"
    return f"{100 * entry['mean']:{'+' if signed else ''}.2f} ± {100 * entry['std']:.2f}"


def _lowest_diagonal(entry: dict) -> str:
    """``min R[t][t]`` (%) over the tasks and seeds that have it, with where it was reached."""
    cells = [(R[t][t], e["seed"], t) for e in entry["per_seed"] for R in [e["accuracy_matrix"]] for t in range(len(R))
             if R[t][t] == R[t][t]]  # NaN: a row not computed
    if not cells:
        return "—"
    value, seed, task = min(cells)
    return f"{100 * value:.1f} (seed {seed}, task {task})"


def split_sequence_table(results: dict) -> str:
    """The Markdown table of a ``--sequence split`` run: per method, the average accuracy after
    the last task (ACC), backward and forward transfer, average forgetting (all in %, mean ± std
    over the seeds whose sequence finished), the average accuracy on the tasks seen after each
    task, how many posteriors the stopping rule calls converged, and the lowest accuracy a fit
    reached on the task it was just trained on, ``min R[t][t]`` over tasks and seeds (the rule's
    verdict alone does not show a fit that stalls on a plateau without learning its task)."""
    tasks = results["tasks"]
    seeds = results["config"]["seeds"]
    lines = [f"**Split MNIST, {results['scenario']} scenario** ({len(tasks)} tasks, fit: {results['fit']}, seeds {', '.join(map(str, seeds))}; "
             "in %, mean ± std over seeds)", "",
             "| method | ACC after the last task | BWT | FWT | forgetting | average accuracy after 1, 2, ... tasks | seeds | converged posteriors "
             "| lowest accuracy on the task just trained |",
             "|---|---|---|---|---|---|---|---|---|"]
    for method, entry in results["methods"].items():
        summary = entry["summary"] or {}
        curve = entry["average_accuracy_curve"]
        steps = "—" if curve is None else ", ".join("—" if a != a else f"{100 * a:.1f}" for a in curve["mean"])  # NaN: a row not computed
        verdicts = [f["convergence"]["converged"] for e in entry["per_seed"] for f in e["fits"] if f.get("convergence") is not None and not f.get("reused")]
        converged = f"{sum(verdicts)}/{len(verdicts)}" if verdicts else ("— (deterministic)" if method == "ewc" else "—")
        lines.append(f"| {method} | {_percent(summary.get('average_accuracy'))} | {_percent(summary.get('backward_transfer'), True)} | "
                     f"{_percent(summary.get('forward_transfer'), True)} | {_percent(summary.get('average_forgetting'))} | {steps} | "
                     f"{entry['seeds_finished']}/{len(entry['per_seed'])} | {converged} | {_lowest_diagonal(entry)} |")
    protocol = results.get("protocol", {})
    if protocol.get("coreset", "none") != "none":
        lines += ["", f"Coreset: {protocol['coreset']}, {protocol['coreset_size']} points per task set aside from training; the rows above of "
                      "transfer and finetune are predicted by copies of each posterior fitted on the coresets (Nguyen et al. 2018). "
                      "Without the copies (the posteriors' own predictions): " + "; ".join(
                          f"{method} ACC {_percent(entry['summary_without_coreset']['average_accuracy'])}, "
                          f"BWT {_percent(entry['summary_without_coreset']['backward_transfer'], True)}"
                          for method, entry in results["methods"].items() if entry.get("summary_without_coreset")) + "."]
    lines += ["", "Tasks: " + "; ".join(
        f"{t['digits'][0]}/{t['digits'][1]} -> labels {t['labels'][0]}/{t['labels'][1]}" + ("" if t["head"] is None else f", head {t['head']}") for t in tasks) + "."]
    lines += [f"WARNING: {warning}" for warning in results.get("warnings", [])]
    lines += [f"FAILED: {method} seed {e['seed']}: {e['error']}" for method, entry in results["methods"].items() for e in entry["per_seed"] if e.get("error")]
    return "\n".join(lines) + "\n"


REGIME_KEYS = ("hidden", "epochs", "batch_size", "lr", "scale_lr", "init_scale", "prior_scale", "estimator", "num_particles", "kl_schedule",
               "tau", "kl_beta", "max_epochs_a", "batch_size_a", "lr_a", "verdict_tol", "elbo_test", "overrule", "continuation_epochs")


def regime_label(results: dict, others: list[dict]) -> str:
    """What sets ``results`` apart from the ``others``: its fit, protocol and the configuration
    values (of :data:`REGIME_KEYS`) that are not the same in every run, ``key=value`` joined."""
    def settings(r: dict) -> dict:  # a key missing from an older run's configuration: the value it ran with
        ran_with = lambda k: LATER_FIELDS[k] if k in LATER_FIELDS else getattr(ExperimentConfig, k, None)
        return {"fit": r.get("fit"), **r.get("protocol", {}), **{k: r["config"].get(k, ran_with(k)) for k in REGIME_KEYS}}

    mine, every = settings(results), [settings(r) for r in others]
    varying = [k for k in mine if any(e.get(k) != mine[k] for e in every)]
    return ", ".join(f"{k}={mine[k]:.3g}" if isinstance(mine[k], float) else f"{k}={mine[k]}" for k in varying) or "—"


def regimes_table(runs: list[dict], names: list[str]) -> str:
    """One row per run (and method) of several ``--sequence split`` runs of one scenario: the
    settings that differ (:func:`regime_label`), ACC and BWT (mean ± std over seeds), the fits the
    convergence verdict passes, the hidden layers' median sigma after the last task, and the active
    hidden units per layer after every task (mean over seeds; :mod:`pyro_bbt.pruning`) with the
    largest |ablation change| (nats per example) of any census."""
    scenarios = {r["scenario"] for r in runs}
    if len(scenarios) != 1:
        raise ValueError(f"--regimes compares runs of one scenario; got {', '.join(sorted(scenarios))}")
    lines = [f"**Split MNIST, {scenarios.pop()} scenario: one row per run** (ACC, BWT in %, mean ± std over seeds)", "",
             "| run | settings | method | ACC | BWT | verdict: converged fits | median sigma, hidden layers, after the last task "
             "| active units per hidden layer after tasks 1..5 | max abs ablation change |",
             "|---|---|---|---|---|---|---|---|---|"]
    for name, results in zip(names, runs):
        label = regime_label(results, [r for r in runs if r is not results])
        for method, entry in results["methods"].items():
            summary = entry["summary"] or {}
            fits = [f for e in entry["per_seed"] for f in e["fits"] if not f["reused"]]
            verdicts = [f["convergence"]["converged"] for f in fits if f["convergence"] is not None]
            last = [e["fits"][-1] for e in entry["per_seed"] if e["fits"] and e["fits"][-1]["convergence"]]
            sigmas = "—"
            if last:
                sites = [k for k in last[0]["convergence"]["median_scale"] if k.endswith("weight")][:-1]
                sigmas = ", ".join(f"{statistics.median(f['convergence']['median_scale'][k] for f in last):.3g}" for k in sites)
            counts = entry.get("active_units_mean")
            units = "—" if not counts else "; ".join("/".join(f"{n:.0f}" for n in per_layer) for per_layer in counts)
            changes = [abs(f["units"]["ablation_change"]) for f in fits if f.get("units")]
            change = f"{max(changes):.3f}" if changes else "—"
            lines.append(f"| {name} | {label} | {method} | {_percent(summary.get('average_accuracy'))} | "
                         f"{_percent(summary.get('backward_transfer'), True)} | {sum(verdicts)}/{len(verdicts)} | {sigmas} | {units} | {change} |")
    return "\n".join(lines) + "\n"


HSU_2018 = "Hsu et al. 2018, *Re-evaluating Continual Learning Scenarios*, Table 2 (784-400-400 MLP, Adam at 1e-3, minibatches of 128)"
NGUYEN_2018 = "Nguyen et al. 2018, *Variational Continual Learning*, split MNIST (multi-head)"
_HSU_LOGS = ("Hsu et al.'s released log, GT-RIPL/Continual-Learning-Benchmark@{commit} outputs/split_MNIST_incremental_{scenario}/{file} "
             "(mean ± std of 10 repeats; 1024-400-400 MLP on 32x32 images, 4 epochs per task, Adam, minibatches of 128)")


def _hsu_log(scenario: str, file: str, commit: str = "851b474") -> str:
    return _HSU_LOGS.format(commit=commit, scenario=scenario, file=file)


# Published average accuracies after the fifth task of split MNIST, in %: (scenario, method, ACC, std or None, source).
# The papers' numbers, then the final summaries ("mean: ... std: ...") of the logs Hsu et al. released with their code,
# read from the files named (the class scenario has no offline log; the task scenario none for EWC or SI).
PUBLISHED_SPLIT_MNIST: tuple[tuple[str, str, float, float | None, str], ...] = (
    ("task", "VCL, no coreset", 97.0, None, NGUYEN_2018),
    ("task", "VCL + random coreset", 98.4, None, NGUYEN_2018),
    ("task", "Adam (naive)", 98.04, 1.02, _hsu_log("task", "Adam.log", "5040135")),
    ("task", "offline (joint)", 99.61, 0.04, _hsu_log("task", "Offline.log", "5040135")),
    ("domain", "EWC", 58.85, None, HSU_2018),
    ("domain", "offline (joint)", 98.59, None, HSU_2018),
    ("domain", "EWC (lambda 100)", 59.99, 0.77, _hsu_log("domain", "EWC.log")),
    ("domain", "online EWC (lambda 700)", 63.31, 1.35, _hsu_log("domain", "EWC_online.log")),
    ("domain", "SI (c 3000)", 64.42, 2.35, _hsu_log("domain", "SI.log")),
    ("domain", "Adam (naive)", 59.58, 0.59, _hsu_log("domain", "Adam.log", "5040135")),
    ("domain", "offline (joint)", 98.49, 0.18, _hsu_log("domain", "Offline.log", "5040135")),
    ("class", "EWC (lambda 600)", 19.75, 0.02, _hsu_log("class", "EWC.log")),
    ("class", "online EWC (lambda 100)", 19.73, 0.05, _hsu_log("class", "EWC_online.log")),
    ("class", "SI (c 600)", 19.79, 0.22, _hsu_log("class", "SI.log")),
    ("class", "Adam (naive)", 19.72, 0.03, _hsu_log("class", "Adam.log", "5040135")),
)


def pooled_seeds(entries: list[dict]) -> dict:
    """One split method's record from per-seed entries made in several runs: the entries in seed
    order and their summary recomputed (:func:`~pyro_bbt.split_sequence.method_summary`)."""
    from .split_sequence import method_summary

    entries = sorted(entries, key=lambda e: e["seed"])
    return {"per_seed": entries, **method_summary(entries)}


def merge_seeds(runs: list[dict], names: list[str]) -> tuple[list[dict], list[str]]:
    """Runs of one configuration made apart for different seeds (``--seeds 0`` and ``--seeds
    1,2``) become one run of all their seeds (per seed entries in seed order, summaries
    recomputed; its name the names joined by ``+``); other runs are left as they are. Two such runs
    that share a seed are refused (``ValueError``)."""
    def key(results: dict) -> str:
        config = {k: v for k, v in results["config"].items() if k != "seeds"}
        return json.dumps({"scenario": results["scenario"], "fit": results["fit"], "joint": results.get("joint"),
                           "protocol": results.get("protocol"), "config": config}, sort_keys=True)

    groups: dict[str, list[int]] = {}
    for index, results in enumerate(runs):
        groups.setdefault(key(results), []).append(index)
    merged, merged_names = [], []
    for indices in groups.values():
        if len(indices) == 1:
            merged.append(runs[indices[0]])
            merged_names.append(names[indices[0]])
            continue
        seeds = [s for i in indices for s in runs[i]["config"]["seeds"]]
        if len(set(seeds)) < len(seeds):
            raise ValueError(f"runs {', '.join(names[i] for i in indices)} have one configuration and share seeds {sorted(seeds)}: "
                             "only runs of different seeds merge")
        first = runs[indices[0]]
        methods = {method: pooled_seeds([e for i in indices for e in runs[i]["methods"][method]["per_seed"]]) for method in first["methods"]}
        merged.append({**first, "config": {**first["config"], "seeds": sorted(seeds)}, "methods": methods,
                       "warnings": [w for i in indices for w in runs[i].get("warnings", [])]})
        merged_names.append("+".join(names[i] for i in indices))
    return merged, merged_names


def _cap(config: dict, field: str) -> float:
    """A run's ``field`` cap in epochs (``max_epochs_b`` falls back to ``max_epochs_a``; ``None``
    is no cap)."""
    cap = config.get(field)
    if cap is None and field == "max_epochs_b":
        cap = config.get("max_epochs_a")
    return float("inf") if cap is None else cap


def _check_converged_below_caps(runs: list[dict], names: list[str]) -> None:
    """Runs whose presets' names or caps differ merge only when every Bayesian fit in them ended
    converged below its own run's cap: the fitting rule is the rest of the configuration (which
    must be equal), so each fit is what that rule gives, whatever cap it ran under."""
    for results, name in zip(runs, names):
        cap_a, cap_b = _cap(results["config"], "max_epochs_a"), _cap(results["config"], "max_epochs_b")
        fits = [(f"task-A stage of seed {stage['seed']}", stage.get("convergence"), cap_a) for stage in results["task_a"]]
        fits += [(f"unit {u['method']} at {u['fraction']:g}, seed {u['seed']}", u.get("convergence"), cap_b) for u in results["units"]]
        for what, convergence, cap in fits:
            if convergence is None:  # a deterministic net or a fixed budget: no cap applies
                continue
            if not convergence.get("converged") or convergence["epochs"] >= cap:
                raise ValueError(f"{name}'s {what} did not end converged below its cap ({cap:g} epochs): runs whose presets, "
                                 f"caps ({', '.join(CAP_FIELDS)}) or verdict's draws ({', '.join(PRECISION_FIELDS)}) differ merge only when every fit in them did")


def merge_transfer_runs(runs: list[dict], names: list[str]) -> dict:
    """One A -> B run from runs of one configuration made apart for different ``--methods``,
    ``--fractions`` or ``--seeds``: their q_A stages (one per seed; a seed's stage fitted in two runs must be the
    same record) and units, with the summary recomputed. Runs whose configurations differ in
    anything else, or that share a (method, fraction, seed) unit, are refused (``ValueError``).
    The preset's name, the caps (``max_epochs_a``, ``max_epochs_b``) and the verdict's added
    draws (:data:`~pyro_bbt.config.PRECISION_FIELDS`: a pass is the same bound, upper ≤ tolerance,
    with more or fewer draws) may also differ when every Bayesian fit in the runs ended converged
    below its cap (:func:`_check_converged_below_caps`); the merged run's ``warnings`` then name
    what differed."""
    from .experiment import summarize_units

    loose = ("preset", *CAP_FIELDS, *PRECISION_FIELDS)

    def rest(results: dict) -> dict:
        return {k: v for k, v in results["config"].items() if k not in GRID_FIELDS and k not in loose and k not in RUN_FIELDS}

    for results, name in zip(runs, names):
        if "units" not in results:
            raise ValueError(f"{name} is not an A -> B transfer run")
        if rest(results) != rest(runs[0]):
            differing = sorted(k for k in set(rest(results)) | set(rest(runs[0])) if rest(results).get(k) != rest(runs[0]).get(k))
            raise ValueError(f"{name} and {names[0]} differ in {', '.join(differing)}: only runs that differ in --methods, --fractions or --seeds merge")
    differing_loose = sorted(k for k in loose if len({json.dumps(results["config"].get(k, LATER_FIELDS.get(k))) for results in runs}) > 1)
    notes = []
    if differing_loose:
        _check_converged_below_caps(runs, names)
        values = "; ".join(f"{name}: " + ", ".join(f"{k}={results['config'].get(k, LATER_FIELDS.get(k))}" for k in differing_loose)
                           for results, name in zip(runs, names))
        notes.append(f"merged runs differ in {', '.join(differing_loose)} ({values}); every Bayesian fit in them ended converged below its cap")
    units, seen, stages = [], set(), {}
    for results, name in zip(runs, names):
        for unit in results["units"]:
            key = (unit["method"], unit["fraction"], unit["seed"])
            if key in seen:
                raise ValueError(f"{name} repeats the unit {key[0]} at {key[1]:g}, seed {key[2]}: only runs of different units merge")
            seen.add(key)
            units.append(unit)
        for stage in results["task_a"]:
            key = (stage.get("kind"), stage["seed"])
            if key in stages and stages[key] != stage:
                raise ValueError(f"{name}'s task-A stage {key[0]} of seed {key[1]} differs from another run's: those runs were not made alike")
            stages[key] = stage
    methods = [m for results in runs for m in results["config"]["methods"]]
    seeds = sorted({s for results in runs for s in results["config"]["seeds"]})
    fractions = sorted({f for results in runs for f in results["config"].get("fractions", [])})
    first = runs[0]
    return {**first, "config": {**first["config"], "methods": list(dict.fromkeys(methods)), "fractions": fractions, "seeds": seeds},
            "task_a": [stages[k] for k in sorted(stages, key=lambda k: (k[1], str(k[0])))], "units": units, "summary": summarize_units(units),
            "warnings": [w for results in runs for w in results.get("warnings", [])] + notes}


def select_fractions(results: dict, timing: dict | None, fractions: tuple[float, ...] | None) -> tuple[dict, dict | None]:
    """An A -> B run's results (and timing.json's unit entries, renumbered) with only the units at
    ``fractions`` of B (``None``: all of them); ``ValueError`` when the run has none there."""
    if fractions is None:
        return results, timing
    kept = [i for i, u in enumerate(results["units"]) if u["fraction"] in fractions]
    if not kept:
        have = sorted({u["fraction"] for u in results["units"]})
        raise ValueError(f"no unit at fractions {', '.join(f'{f:g}' for f in fractions)} (the run has {', '.join(f'{f:g}' for f in have)})")
    from .experiment import summarize_units

    units = [results["units"][i] for i in kept]
    config = {**results["config"], "fractions": [f for f in results["config"].get("fractions", []) if f in fractions]}
    selected = {**results, "config": config, "units": units, "summary": summarize_units(units)}
    if timing is None:
        return selected, None
    new_index = {old: new for new, old in enumerate(kept)}
    return selected, _renumbered(timing, new_index.get, keep_others=True)


def _renumbered(timing: dict, new_index: Callable[[int], int | None], keep_others: bool) -> dict:
    """timing.json's unit entries (``units/I/...``) moved to ``units/new_index(I)/...`` (dropped
    where that is ``None``); its other entries kept where ``keep_others``."""
    result = {}
    for key, value in timing.items():
        parts = key.split("/")
        if len(parts) >= 2 and parts[0] == "units" and parts[1].isdigit():
            index = new_index(int(parts[1]))
            if index is not None:
                result["/".join(["units", str(index), *parts[2:]])] = value
        elif keep_others:
            result[key] = value
    return result


def merge_timing(timings: list[dict], unit_counts: list[int]) -> dict:
    """The timing.json entries of merged runs' units (``units/I/...``), renumbered as
    :func:`merge_transfer_runs` orders the units (each run's after the runs before it)."""
    merged, offset = {}, 0
    for timing, count in zip(timings, unit_counts):
        merged |= _renumbered(timing, lambda index, offset=offset: index + offset, keep_others=False)
        offset += count
    return merged


def _split_fits_below_cap(results: dict) -> str | None:
    """The first fit of a ``--sequence split`` run that did not end below its run's cap
    (``max_epochs_a``, every task's fit and EWC's nets): a Bayesian fit by the rule not converged
    or at the cap, an EWC net not stopped by its patience; ``None`` if there is none."""
    cap = _cap(results["config"], "max_epochs_a")
    for method, entry in results["methods"].items():
        for seed_entry in entry["per_seed"]:
            if seed_entry.get("error"):
                return f"{method}, seed {seed_entry['seed']} (failed)"
            for fit in seed_entry["fits"]:
                what = f"{method}, seed {seed_entry['seed']}, task {fit.get('task')}"
                stopping = fit.get("early_stopping")
                if stopping is not None and stopping.get("stopped_by") != "patience":
                    return what
                convergence = fit.get("convergence")
                if stopping is None and results["fit"] == "rule" and (not convergence or not convergence.get("converged")
                                                                      or convergence["epochs"] >= cap):
                    return what
    return None


def merge_split_runs(runs: list[dict]) -> list[dict]:
    """One ``results.json`` per scenario: runs of the same scenario made apart for different
    ``--methods`` or ``--seeds``, or both (``--methods transfer --seeds 0``, ``--methods
    ewc,joint --seeds 1``, ...) are merged into one whose ``methods`` hold every run's, each
    method's seeds pooled in seed order with its summary recomputed. Their configurations must
    agree except in ``methods`` and ``seeds`` and their fit mode must be the same; a method and
    seed given by two runs of one scenario is refused (``ValueError``). The checkpoint interval
    may differ; the cap (``max_epochs_a``) may when every fit of both runs ended below its own
    run's cap (:func:`_split_fits_below_cap`): a fit's epochs before its cap do not depend on it,
    so each is the fit either cap gives; the merged run's ``warnings`` then name the caps."""
    merged: dict[str, dict] = {}
    loose = (*CAP_FIELDS, *RUN_FIELDS)
    caps_merged: dict[str, dict[str, set[float]]] = {}  # per scenario, each differing cap's values
    for results in runs:
        scenario = results["scenario"]
        if scenario not in merged:
            merged[scenario] = {**results, "methods": dict(results["methods"]), "warnings": list(results.get("warnings", []))}
            continue
        into = merged[scenario]
        differ = sorted(k for k in set(into["config"]) | set(results["config"])
                        if k not in ("methods", "seeds") and into["config"].get(k) != results["config"].get(k))
        if results["fit"] != into["fit"]:
            differ.insert(0, "fit")
        if differ and all(k in loose for k in differ):
            unfinished = (_split_fits_below_cap(into) or _split_fits_below_cap(results)) if set(differ) & set(CAP_FIELDS) else None
            if unfinished is not None:
                raise ValueError(f"two {scenario}-scenario runs differ in {', '.join(differ)}, and the fit {unfinished} did not end "
                                 "below its run's cap: runs whose caps differ merge only when every fit in them did")
            for k in (k for k in differ if k in CAP_FIELDS):
                caps_merged.setdefault(scenario, {}).setdefault(k, set()).update(_cap(r["config"], k) for r in (into, results))
                into["config"] = {**into["config"], k: max((r["config"].get(k) for r in (into, results)), key=lambda v: float("inf") if v is None else v)}
            differ = []
        if differ:
            raise ValueError(f"two {scenario}-scenario runs differ in {', '.join(differ)}: only runs of one configuration merge")
        for method, entry in results["methods"].items():
            if method not in into["methods"]:
                into["methods"][method] = entry
                continue
            if method == "joint" and results.get("joint") != into.get("joint"):
                raise ValueError(f"two {scenario}-scenario runs fit joint differently (--joint {into.get('joint')} and "
                                 f"{results.get('joint')}): only runs of one configuration merge")
            have = {e["seed"] for e in into["methods"][method]["per_seed"]}
            twice = sorted(have & {e["seed"] for e in entry["per_seed"]})
            if twice:
                raise ValueError(f"two {scenario}-scenario runs both hold {method} of seed(s) {', '.join(map(str, twice))}: "
                                 "give each method and seed once")
            into["methods"][method] = pooled_seeds([*into["methods"][method]["per_seed"], *entry["per_seed"]])
        seeds = sorted({*into["config"]["seeds"], *results["config"]["seeds"]})
        methods = list(dict.fromkeys([*into["config"]["methods"], *results["config"]["methods"]]))
        into["config"] = {**into["config"], "methods": methods, "seeds": seeds}
        into["warnings"] += results.get("warnings", [])
        if "joint" in results["methods"]:
            into["joint"] = results.get("joint", "every")
    for scenario, fields in caps_merged.items():
        for k, caps in fields.items():
            merged[scenario]["warnings"].append(f"{scenario} scenario: runs with {k} {', '.join(f'{c:g}' for c in sorted(caps))} merged; "
                                                "every fit ended below its run's cap")
    return list(merged.values())


def _ewc_fit(entry: dict) -> str:
    """How a split run's EWC nets were trained: stopped early (their fits record it) or for the fixed budget."""
    stopped = any("early_stopping" in f for e in entry["per_seed"] for f in e["fits"])
    return "early stopping (deterministic net)" if stopped else "fixed budget (deterministic net)"


def split_comparison_table(runs: list[dict]) -> str:
    """Markdown: per scenario of the ``--sequence split`` runs ``runs``, each method's average
    accuracy after the last task (%, mean ± std over the seeds that finished, with the number of
    seeds and of converged posteriors), then the published numbers of
    :data:`PUBLISHED_SPLIT_MNIST` for that scenario with their source. Runs of one scenario are
    merged first (:func:`merge_split_runs`)."""
    runs = merge_split_runs(runs)
    lines = ["| scenario | method | ACC after task 5 (%) | seeds | converged posteriors | source |", "|---|---|---|---|---|---|"]
    for results in runs:
        scenario = results["scenario"]
        for method, entry in results["methods"].items():
            summary = entry["summary"] or {}
            verdicts = [f["convergence"]["converged"] for e in entry["per_seed"] for f in e["fits"] if f.get("convergence") is not None and not f.get("reused")]
            converged = f"{sum(verdicts)}/{len(verdicts)}" if verdicts else "— (deterministic)" if method == "ewc" else "—"
            lines.append(f"| {scenario} | {method} | {_percent(summary.get('average_accuracy'))} | {entry['seeds_finished']}/{len(entry['per_seed'])} | "
                         f"{converged} | this repo, {_ewc_fit(entry) if method == 'ewc' else 'fit: ' + results['fit']} |")
        for published_scenario, method, accuracy, std, source in PUBLISHED_SPLIT_MNIST:
            if published_scenario == scenario:
                value = f"{accuracy:.2f}" if std is None else f"{accuracy:.2f} ± {std:.2f}"
                lines.append(f"| {scenario} | {method} | {value} | — | — | {source} |")
    return "\n".join(lines) + "\n"


def _sites(medians: dict[str, float]) -> str:
    return ", ".join(f"{site.removesuffix('.weight')} {value:.3g}" for site, value in medians.items())


def _verdicts(fit: dict) -> list[dict]:
    """The verdicts a fit's history recorded, in order."""
    return [r["verdict"] for r in fit.get("history") or [] if r.get("verdict")]


def convergence_lines(results: dict) -> str:
    """The stopping rule's verdict on every q_A, a count of converged q_B per method and fraction,
    and the run's warnings."""
    lines = ["**Convergence** (converged: the verdict, pyro_bbt.verdict, where the fit was judged; else the stopping rule's criteria)", ""]
    lines += ["| q_A, seed | epochs (cap) | converged | ELBO test over the window (its statistic) | last continuation (ELBO gain) | largest last sigma drift | median sigma per layer | uninformed sigma ratio |",
              "|---|---|---|---|---|---|---|---|"]
    for stage in results["task_a"]:
        verdict = stage.get("convergence")
        if verdict is None:
            continue
        gain = elbo_test_text(verdict).replace("n/a", "—")
        drift = "—" if not verdict["last_scale_drift"] else f"{max(verdict['last_scale_drift'].values()):.3f}"
        ratio = "—" if verdict["uninformed_scale_ratio"] is None else f"{verdict['uninformed_scale_ratio']:.3f}"
        cap = verdict["max_epochs"] if verdict["max_epochs"] is not None else "fixed"
        lines.append(f"| {stage['seed']} | {verdict['epochs']} ({cap}) | {'yes' if verdict['converged'] else 'NO'} | {gain} | {continuation_text(verdict.get('verdict'))} | "
                     f"{drift} | {_sites(verdict['median_scale'])} | {ratio} |")
    counts: dict[tuple[str, float], list[bool]] = {}
    for unit in results["units"]:
        if unit.get("convergence"):
            counts.setdefault((unit["method"], unit["fraction"]), []).append(unit["convergence"]["converged"])
    if counts:
        how = "fitted by the rule and the verdict" if results["config"].get("fit_b") == "rule" else "after B's fixed budget"
        lines += ["", f"q_B converged, {how} (converged / units): " + "; ".join(
            f"{method} {fraction:g}: {sum(flags)}/{len(flags)}" for (method, fraction), flags in counts.items())]
        judged = {}
        for unit in results["units"]:
            verdicts = _verdicts(unit)
            if verdicts:
                upper = verdicts[-1].get("gain_upper_per_datum")  # None: the blank-pixel check failed first, the gain was not measured
                continued = "" if not verdicts[-1].get("continuation") else f"; continued: {continuation_text(verdicts[-1])}"
                judged.setdefault((unit["method"], unit["fraction"]), []).append(
                    f"s{unit['seed']} {len(verdicts)}{'*' if verdicts[-1]['converged'] else ''} ({'—' if upper is None else f'{upper:.3g}'}{continued})")
        if judged:
            lines += ["", "Verdicts per q_B (seed, judgements, * when the last passed, its upper bound in nats per example; where a continuation confirmed it, that continuation's ELBO gain): " + "; ".join(
                f"{method} {fraction:g}: {', '.join(items)}" for (method, fraction), items in judged.items())]
    def named(fit: dict) -> str:
        return f"q_A s{fit.get('seed')}" if "method" not in fit else f"{fit['method']} {fit['fraction']:g} s{fit['seed']}"

    unread = {}
    for fit in [*results.get("task_a", []), *results["units"]]:
        verdicts = _verdicts(fit)
        if verdicts and verdicts[-1].get("unread_rows_kl") is not None:
            group = "q_A" if "method" not in fit else f"{fit['method']} {fit['fraction']:g}"
            unread.setdefault(group, []).append(verdicts[-1]["unread_rows_kl"])
    if unread:
        lines += ["", "Unread-rows check (the last verdict's mean KL per weight of the output rows no logit reads, to their prior; "
                      "at most 0.01 to pass), largest over seeds: " + "; ".join(f"{group} {max(values):.2g}" for group, values in unread.items())]

    raised = [f"{named(fit)} at epoch {rise['epoch']} (" + ", ".join(f"{field} {old} → {new}" for field, (old, new) in rise["fields"].items()) + ")"
              for fit in [*results.get("task_a", []), *results["units"]] for rise in fit.get("raised_on_resume") or []]
    if raised:
        lines += ["", "Verdict's draws raised on --resume (judgements before keep their draws): " + "; ".join(raised)]
    for warning in results.get("warnings", []):
        lines.append(f"WARNING: {warning}")
    return "\n".join(lines) + "\n"


def fit_costs(results: dict, timing: dict) -> tuple[dict, dict]:
    """The time and epochs of every fit of one A -> B run, from its ``timing.json``: units keyed
    ``(method, fraction, seed)`` -> ``(seconds, epochs)`` (``units/I``: the unit's whole time, its
    fit and its evaluations), each seed's q_A -> ``(seconds, epochs)`` (its epochs' times,
    ``task_a/I/history/*``). Units without a time (failed, or run before timing.json kept them)
    are left out."""
    units = {}
    for index, unit in enumerate(results["units"]):
        seconds = timing.get(f"units/{index}")
        if unit.get("status") != "ok" or seconds is None:
            continue
        verdict = unit.get("convergence")
        epochs = verdict["epochs"] if verdict else (len(unit.get("history") or []) or None)
        units[(unit["method"], unit["fraction"], unit["seed"])] = (float(seconds), epochs)
    stages = {}
    for index, stage in enumerate(results.get("task_a", [])):
        times = [v for k, v in timing.items() if k.startswith(f"task_a/{index}/history/")]
        if stage.get("kind") == "bayesian" and times:
            verdict = stage.get("convergence")
            stages[stage["seed"]] = (float(sum(times)), verdict["epochs"] if verdict else len(times))
    return units, stages


def cost_lines(runs: list[tuple[dict, dict]], fractions: tuple[float, ...] | None = None, workers: int = 2) -> str:
    """What the fits of one or more A -> B runs (``(results, timing)`` pairs, merged as the
    tables are; the first run's q_A of a seed counts) cost: per method and fraction of B, the
    median and range over seeds of epochs and seconds; the compute in all; and a lower bound on
    the wall time of the same fits with ``workers`` workers, ``max(total / workers, longest
    fit)``. A bound from the fits' own times (one thread each), not a measured wall time: fits
    run beside others are slower, and a fit waits for its seed's q_A."""
    units: dict = {}
    stages: dict = {}
    for results, timing in runs:
        more_units, more_stages = fit_costs(results, timing)
        units |= {key: value for key, value in more_units.items() if fractions is None or key[1] in fractions}
        stages |= {seed: value for seed, value in more_stages.items() if seed not in stages}
    if not units and not stages:
        return ""

    def row(name: str, fraction: str, values: list[tuple[float, int | None]]) -> str:
        seconds = sorted(s for s, _ in values)
        epochs = sorted(e for _, e in values if e is not None)
        span = lambda xs, f: f"{f(statistics.median(xs))} ({f(xs[0])}–{f(xs[-1])})" if len(xs) > 1 else (f(xs[0]) if xs else "—")
        return (f"| {name} | {fraction} | {len(values)} | {span(epochs, lambda x: f'{x:,.0f}')} | "
                f"{span(seconds, lambda x: f'{x:,.0f}')} | {sum(seconds):,.0f} |")

    lines = ["", "**Fit cost** (timing.json, one thread per fit; seconds of a unit include its evaluations; median (range) over seeds)", "",
             "| fit | fraction of B | seeds | epochs | seconds | seconds in all |", "|---|---|---|---|---|---|"]
    if stages:
        lines.append(row("q_A", "—", list(stages.values())))
    grouped: dict[tuple[str, float], list] = {}
    for (method, fraction, _), value in units.items():
        grouped.setdefault((method, fraction), []).append(value)
    for (method, fraction), values in sorted(grouped.items(), key=lambda item: item[0][1]):  # stable: methods as first seen
        lines.append(row(method, f"{fraction:g}", values))
    times = [s for s, _ in stages.values()] + [s for s, _ in units.values()]
    total = sum(times)
    bound = max(total / workers, max(times))
    lines += ["", f"Compute in all: {total:,.0f} s ({total / 3600:.2f} h). With {workers} worker{'s' if workers != 1 else ''} these fits take at least "
                  f"{bound:,.0f} s ({bound / 3600:.2f} h): max(compute / {workers}, longest fit), a bound from their own times, not a measured wall time."]
    return "\n".join(lines) + "\n"


def _num_data(history: list[dict]) -> int | None:
    """The number of training examples a fit's verdicts judged by (its gain's or continuation's
    ``num_data``); None where no verdict recorded it."""
    for record in reversed(history):
        verdict = record.get("verdict") or {}
        for part in (verdict.get("gain"), verdict.get("continuation")):
            if isinstance(part, dict) and part.get("num_data"):
                return int(part["num_data"])
    return None


def _trajectory(history: list[dict]) -> tuple[list[dict], list[dict]]:
    """The epochs that led to the posterior a fit returned, and the continuations that moved it:
    every record with a training ELBO and accuracy, less the epochs of a continuation whose start
    was kept (its end was discarded); and each kept-end continuation's verdict entry, with ``end``
    its last epoch."""
    dropped, moved = [], []
    for record in history:
        continuation = (record.get("verdict") or {}).get("continuation")
        if continuation:
            if continuation.get("kept") == "start":
                dropped.append((continuation["start_epoch"], record["epoch"]))
            else:
                moved.append(continuation | {"end": record["epoch"]})
    kept = [r for r in history if r.get("elbo") is not None and r.get("train_accuracy") is not None
            and not any(a < r["epoch"] <= b for a, b in dropped)]
    return kept, moved


def optima_lines(results: dict, window: int = 100, drop: float = 0.05) -> str:
    """Which optimum each Bayesian fit ended in, where the posterior it returned predicts its own
    training data worse than the fit once did. Per fit (q_A and every q_B with a history), along
    the epochs that led to the returned posterior (fit and continuation phases, less a discarded
    continuation's): the stretch of ``W = min(window, max(5, epochs // 10))`` epochs with the
    highest mean training accuracy, and the last ``W`` epochs; each as mean training accuracy and
    mean ± std of the training ELBO (per example where the verdict recorded the number of
    examples). The per-epoch ELBO is the mean over the epoch's minibatch steps, so it carries
    Adam's noise at that epoch's rate (lower and wider at a larger rate); the fixed-noise ELBO the
    continuations after the best stretch gained (each scored at its start and end with the same
    draws, :func:`pyro_bbt.fixed_noise.continuation_gain`) is given beside it, free of that noise.

    A row is listed when the end's accuracy is ``drop`` or more below the best stretch's; the
    summary counts those that end at a higher training ELBO: the objective preferred the optimum
    that predicts worse (another pruning pattern, typically nearer the prior). That is a spread
    of optima, which the verdict, a local test, does not gate on. Empty where no fit has a history."""
    fits = [("q_A", "—", stage) for stage in results.get("task_a", []) if stage.get("kind", "bayesian") == "bayesian"]
    fits += [(unit["method"], f"{unit['fraction']:g}", unit) for unit in results.get("units", []) if unit.get("status", "ok") == "ok"]
    rows, judged, higher = [], 0, 0
    for name, fraction, fit in fits:
        records, moved = _trajectory(fit.get("history") or [])
        if len(records) < 10:
            continue
        judged += 1
        width = min(window, max(5, len(records) // 10))
        accuracy = [r["train_accuracy"] for r in records]
        sums = [sum(accuracy[:width])]
        for first in range(1, len(records) - width + 1):
            sums.append(sums[-1] - accuracy[first - 1] + accuracy[first + width - 1])
        best = max(range(len(sums)), key=lambda first: (sums[first], -first))  # the first of equal stretches
        stretches = {"best": records[best:best + width], "end": records[-width:]}
        means = {key: statistics.fmean(r["train_accuracy"] for r in part) for key, part in stretches.items()}
        if means["best"] - means["end"] < drop:
            continue
        per = _num_data(fit.get("history") or [])
        scale = 1.0 / per if per else 1.0
        elbo = {key: [r["elbo"] * scale for r in part] for key, part in stretches.items()}
        up = statistics.fmean(elbo["end"]) > statistics.fmean(elbo["best"])
        higher += up
        digits = ".2f" if per else ",.0f"

        def cell(key: str) -> str:
            values = elbo[key]
            spread = statistics.stdev(values) if len(values) > 1 else 0.0
            return (f"{means[key]:.3f} / {statistics.fmean(values):{digits}} ± {spread:{digits}} "
                    f"(epochs {stretches[key][0]['epoch']}–{stretches[key][-1]['epoch']})")

        after = [c for c in moved if c["start_epoch"] >= stretches["best"][-1]["epoch"] and c["end"] <= stretches["end"][-1]["epoch"]]
        fixed = "—" if not after else (f"{sum(c['end_elbo'] - c['start_elbo'] for c in after) * scale:+{digits}} "
                                       f"({len(after)} continuation{'s' if len(after) > 1 else ''})")
        b_test = (fit.get("b_test") or {}).get("accuracy")
        rows.append(f"| {name} | {fraction} | {fit.get('seed')} | {'—' if b_test is None else f'{b_test:.3f}'} | {cell('best')} | {cell('end')} | "
                    f"{'higher' if up else 'lower'} | {fixed} |")
    if not judged:
        return ""
    lines = ["", f"**Optima** (fits whose returned posterior's last {window} epochs, or a tenth of the fit, train {drop:g} or more below "
                 "their best stretch of as many epochs: mean training accuracy / training ELBO per example, mean ± std over the stretch, "
                 "nats where the number of examples is not recorded; the fixed-noise ELBO the continuations gained after the best stretch)", ""]
    if rows:
        lines += ["| fit | fraction of B | seed | B test | best stretch: train acc. / ELBO | end: train acc. / ELBO | training ELBO at the end | "
                  "fixed-noise ELBO gained after the best stretch |", "|---|---|---|---|---|---|---|---|", *rows, ""]
    lines.append(f"{len(rows)} of {judged} fits end {drop:g} or more below their best training accuracy; {higher} of them at a higher ELBO "
                 "(there the objective prefers an optimum that predicts worse: a spread of optima the verdict does not gate on).")
    return "\n".join(lines) + "\n"


def census_lines(results: dict) -> str:
    """The active hidden units of every Bayesian fit that recorded them (``census``:
    :func:`pyro_bbt.pruning.census_after`), q_A first: per hidden layer, with the threshold and
    its ablation check. Empty where no fit recorded one (runs made before the census was)."""
    rows = []
    for stage in results.get("task_a", []):
        if stage.get("census"):
            rows.append(("q_A (on A)", stage["seed"], stage["census"]))
    for unit in results.get("units", []):
        if unit.get("census"):
            on = "on B" if unit["method"] == "scratch" else "on A and B"
            rows.append((f"{unit['method']} {unit['fraction']:g} ({on})", unit["seed"], unit["census"]))
    if not rows:
        return ""
    lines = ["", "**Active hidden units** (pyro_bbt.pruning: mean KL per incoming weight to the base prior above kappa, kappa the largest "
                 "whose ablation lowers no seen task's log-likelihood by delta or more)", "",
             "| fit | seed | active units per hidden layer | kappa | ablation change (nats / example) |", "|---|---|---|---|---|"]
    for name, seed, census in rows:
        counts = ", ".join(f"{a}/{w}" for a, w in zip(census["active"], census["widths"]))
        lines.append(f"| {name} | {seed} | {counts} | {census['kappa']:g} | {census['ablation_change']:+.4f} |")
    return "\n".join(lines) + "\n"


def paired_lines(results: dict, pairs: tuple[tuple[str, str], ...] = (("transfer", "scratch"), ("transfer", "ewc"), ("transfer", "finetune"))) -> str:
    """Per-seed paired differences of B's test accuracy and of A's accuracy after B between two
    methods at each fraction (same seed, same data): mean, and a 95 % t interval over seeds."""
    from statistics import mean, stdev

    # two-sided 95 % t quantiles by degrees of freedom (1..9); a normal 1.96 beyond
    t95 = {1: 12.706, 2: 4.303, 3: 3.182, 4: 2.776, 5: 2.571, 6: 2.447, 7: 2.365, 8: 2.306, 9: 2.262}
    ok = {(u["method"], u["fraction"], u["seed"]): u for u in results["units"] if u["status"] == "ok"}
    fractions = sorted({f for _, f, _ in ok})
    lines = ["**Paired differences over seeds** (mean [95 % t interval], n seeds)", "",
             "| difference | fraction | B test accuracy | A accuracy after B | n |", "|---|---|---|---|---|"]

    def cell(values: list[float]) -> str:
        if len(values) < 2:
            return f"{values[0]:+.3f}" if values else "—"
        half = t95.get(len(values) - 1, 1.96) * stdev(values) / len(values) ** 0.5
        return f"{mean(values):+.3f} [{mean(values) - half:+.3f}, {mean(values) + half:+.3f}]"

    for first, second in pairs:
        for fraction in fractions:
            seeds = sorted(s for m, f, s in ok if m == first and f == fraction and (second, f, s) in ok)
            if not seeds:
                continue
            b = [ok[(first, fraction, s)]["b_test"]["accuracy"] - ok[(second, fraction, s)]["b_test"]["accuracy"] for s in seeds]
            a = [ok[(first, fraction, s)]["a_test_after"]["accuracy"] - ok[(second, fraction, s)]["a_test_after"]["accuracy"] for s in seeds]
            lines.append(f"| {first} − {second} | {fraction:g} | {cell(b)} | {cell(a)} | {len(seeds)} |")
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
        print(transfer_tables(merged), end="")
        print(paired_lines(merged), end="")
        print(convergence_lines(merged), end="")
        print(cost_lines(_with_timing(stored, args.run_dir), args.fractions), end="")
        print(census_lines(merged), end="")
        print(optima_lines(merged), end="")
        return 0
    args.run_dir = args.run_dir[0]
    path = args.run_dir / "results.json"
    results = json.loads(path.read_text())
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
    print(transfer_tables(results), end="")
    print(paired_lines(results), end="")
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
