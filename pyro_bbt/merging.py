"""Runs made apart, merged into one: seeds of one configuration (:func:`merge_seeds`), the
``--methods``, ``--fractions`` or ``--seeds`` of one A -> B configuration
(:func:`merge_transfer_runs`), a subset of fractions (:func:`select_fractions`) and the timing
records that go with them (:func:`merge_timing`). Runs whose caps differ merge only where every
fit ended converged below its own cap (:func:`epoch_cap`). ``python -m pyro_bbt.report`` prints
the merged tables."""

from __future__ import annotations

import json
from collections.abc import Callable

from .config import CAP_FIELDS, GRID_FIELDS, LATER_FIELDS, PRECISION_FIELDS, RUN_FIELDS

__all__ = ["pooled_seeds", "merge_seeds", "epoch_cap", "merge_transfer_runs", "select_fractions", "merge_timing"]


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


def epoch_cap(config: dict, field: str) -> float:
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
        cap_a, cap_b = epoch_cap(results["config"], "max_epochs_a"), epoch_cap(results["config"], "max_epochs_b")
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
