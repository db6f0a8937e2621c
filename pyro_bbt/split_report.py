"""The tables of a split-MNIST sequence run (``python -m pyro_bbt.transfer --sequence split``):
the accuracy matrix and its summaries per method (:func:`split_sequence_table`), regimes side by
side (:func:`regimes_table`), the scenarios against the published results
(:func:`split_comparison_table`, :data:`PUBLISHED_SPLIT_MNIST`), and the per-seed runs of one
scenario merged (:func:`merge_split_runs`). ``python -m pyro_bbt.report`` prints them."""

from __future__ import annotations

import statistics

from .config import CAP_FIELDS, LATER_FIELDS, RUN_FIELDS, ExperimentConfig
from .merging import epoch_cap, pooled_seeds

__all__ = ["split_sequence_table", "regime_label", "regimes_table", "PUBLISHED_SPLIT_MNIST", "merge_split_runs", "split_comparison_table"]


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


def _split_fits_belowepoch_cap(results: dict) -> str | None:
    """The first fit of a ``--sequence split`` run that did not end below its run's cap
    (``max_epochs_a``, every task's fit and EWC's nets): a Bayesian fit by the rule not converged
    or at the cap, an EWC net not stopped by its patience; ``None`` if there is none."""
    cap = epoch_cap(results["config"], "max_epochs_a")
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
            unfinished = (_split_fits_belowepoch_cap(into) or _split_fits_belowepoch_cap(results)) if set(differ) & set(CAP_FIELDS) else None
            if unfinished is not None:
                raise ValueError(f"two {scenario}-scenario runs differ in {', '.join(differ)}, and the fit {unfinished} did not end "
                                 "below its run's cap: runs whose caps differ merge only when every fit in them did")
            for k in (k for k in differ if k in CAP_FIELDS):
                caps_merged.setdefault(scenario, {}).setdefault(k, set()).update(epoch_cap(r["config"], k) for r in (into, results))
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
