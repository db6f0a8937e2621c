"""What the fits of an A -> B run say about themselves: the verdict on every posterior
(:func:`convergence_lines`), what they cost (:func:`fit_costs`, :func:`cost_lines`), the fits that
end in an optimum predicting their training data worse than they once did (:func:`optima_lines`)
and the active hidden units (:func:`census_lines`). ``python -m pyro_bbt.report`` prints them
after the result tables."""

from __future__ import annotations

import statistics

from .convergence import continuation_text, elbo_test_text

__all__ = ["convergence_lines", "fit_costs", "cost_lines", "optima_lines", "census_lines"]


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
