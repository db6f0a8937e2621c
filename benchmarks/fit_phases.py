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

``--fast-polish both --rounds R``: the same fit with the verdict's steps as they are and fast
(``ExperimentConfig.fast_polish``), in ``R`` interleaved rounds: per fit its parts, and the medians
of the seconds per line-search step (every line search's seconds over their number: the
judgements' and the polishing steps') and of the polishing phase, with their ratios. The two fits
part after the first polishing step (another random stream), so they take their own numbers of
steps; the price per step is what the option changes::

    python benchmarks/fit_phases.py --profile --fast-polish both --rounds 2 --method scratch --fraction 0.01 --head shared --max-epochs-b 150 --out figs/fit-profile-fast-polish.json

``--time-to-verdict``: whole B fits to the verdict, without and with ``fast_polish``, one pair per
seed of ``--seeds`` (interleaved; fine-tuning and transfer start from the q_A that
``--stages-from RUN`` holds for the seed): per fit its wall seconds, epochs, whether it
converged, B's test accuracy and its full-data ELBO on B's training split by one evaluator (64
antithetic draws, the same noise for every fit); then the median of the per-seed wall ratios
off / on and the per-seed ELBO differences on - off per example, beside the verdict's tolerance
(``--out`` is rewritten after every fit, its ``summary`` null until the last)::

    python benchmarks/fit_phases.py --time-to-verdict --method finetune --fraction 0.01 --head shared --seeds 0,1,2 --max-epochs-b 20000 --stages-from runs/ps03-shared --out figs/fast-polish-finetune-f0.01.json

``--stages FILE [FILE ...]``: the same split for q_A, from the stage files a run keeps
(``stages/*-A-bayesian-s*.pt``; read with ``weights_only=True``): per stage its epochs per phase,
the price of one epoch of Adam (the median epoch without a verdict), the verdict's seconds (what
each judgement, confirmation and continuation score added to its epoch) and **the floor that
verdict sets** (the paper preset's rule and verdict, read from the stage's configuration):

* ``rule_floor``: a fit that meets the stopping rule's test in the fewest epochs it allows at
  every rate (``2 window`` epochs per rate with the window-means test, ``window + 1`` with the
  two-point one, ``min_epochs`` at least; ``lr_drops + 1`` rates), passes the line search
  and its confirmation at once, and whose continuation
  (``max(continuation_epochs, continuation_fraction x P)`` epochs after a pass at ``P``) passes
  the first time: those epochs at the stage's price of an epoch, plus the verdict seconds this
  stage's own pass cost (its confirmed judgement and one continuation score);
* ``oracle_floor``: an optimiser already at the optimum, ``P = 0``: only the shortest
  continuation and that verdict.

The fit's own seconds over each floor is the most any recipe can gain under that rule and
verdict: the time-to-convergence issue's "at least 4x faster" needs a quarter of the fit's
seconds to exceed ``oracle_floor`` at least::

    python benchmarks/fit_phases.py --stages runs/tradeoff-conv-f1-shared/stages/shared-A-bayesian-s*.pt --out figs/fit-phases-qa.json

``--judgement-cost FILE [FILE ...]``: what a cheaper judgement would save there. On each stage's
posterior (task A's training split, as its fit saw it), ``--rounds`` pairs of one line search as a
judgement takes it (:func:`~pyro_bbt.verdict.line_search_gain` with the verdict's settings) and the
same with ``fast`` (the mean gradient of the same estimates in one vectorised pass, the whitening's
conjugate gradients stopped at a relative residual of 1e-3, no quadratic model ``G``: the gain
the same in distribution), round ``r`` seeded ``r`` for both; per stage the median seconds of each
and of the pairs' ratios, and the gains found (nats, standard error)::

    python benchmarks/fit_phases.py --judgement-cost runs/tradeoff-conv-f1/stages/multihead-A-bayesian-s0.pt --rounds 3 --out figs/judgement-cost.json
"""

from __future__ import annotations

import argparse
import cProfile
import json
import pstats
import statistics
import sys
import time
from pathlib import Path

from pyro_bbt.files import atomic_write_text

# The parts of a fit that --profile reports: (label, file suffix, function name), cumulative seconds (nested
# parts overlap; the final evaluations run after fit_posterior, so shares need not sum to 100 %).
PARTS = (
    ("the whole fit", "pyro_bbt/fitting.py", "fit_posterior"),
    ("verdict: polishing steps (after a rejection)", "pyro_bbt/inference.py", "_polish_last"),
    ("verdict: judgements (line search, confirmation)", "pyro_bbt/verdict.py", "judge_by"),
    ("  line-search steps, all (judgements and polishing)", "pyro_bbt/verdict.py", "line_search_gain"),
    ("    their full-data gradient estimates", "pyro_bbt/elbo_gradient.py", "elbo_gradients"),
    ("    their whitened directions", "pyro_bbt/elbo_gradient.py", "whitened_direction"),
    ("    their fixed-noise scores", "pyro_bbt/fixed_noise.py", "crn_log_liks"),
    ("continuations' fixed-noise scores", "pyro_bbt/fixed_noise.py", "continuation_gain"),
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


def _configuration(config: dict) -> dict:
    """The experiment's fields of a stage's saved configuration: a transfer run's own, or a
    study's ``config.experiment``."""
    if "continuation_epochs" in config:
        return config
    nested = (config.get("config") or {}).get("experiment") or {}
    if "continuation_epochs" not in nested:
        raise ValueError("the stage's configuration names no continuation_epochs: not a stage of a fit by the paper preset's verdict")
    return nested


def rule_floor_epochs(rule: dict) -> int:
    """The fewest epochs the stopping rule ``rule`` (a ``StoppingRule`` as a dict) lets a fit
    stop after: its test needs ``2 window`` epochs at each of its ``lr_drops + 1`` rates
    (``window + 1`` with the two-point test, ``window`` on a schedule), the first at least ``min_epochs``."""
    per_rate = {"means": 2 * rule["window"], "schedule": rule["window"]}.get(rule["elbo_test"], rule["window"] + 1)
    return max(rule["min_epochs"], per_rate) + rule["lr_drops"] * per_rate


def stage_row(path: Path) -> dict:
    """One q_A stage's epochs per phase, price of an epoch, verdict seconds and floors (module
    docstring, ``--stages``)."""
    import torch

    from pyro_bbt.verdict import VerdictConfig

    payload = torch.load(path, map_location="cpu", weights_only=True)
    data, config = payload["data"], _configuration(payload["config"])
    history = data["history"]
    rule = data["convergence"]["rule"]
    plain = [e["seconds"] for e in history if e["verdict"] is None]
    epoch_seconds = statistics.median(plain) if plain else float("nan")
    judged = [e for e in history if e["verdict"] is not None]
    verdict_seconds = sum(max(0.0, e["seconds"] - epoch_seconds) for e in judged)
    phases = [e["phase"] for e in history]
    fit_epochs = phases.count("fit")
    verdict = VerdictConfig(continuation_epochs=config["continuation_epochs"], continuation_fraction=config["continuation_fraction"],
                            continuation_rates=tuple(config.get("continuation_rates") or VerdictConfig.continuation_rates))
    last = history[-1]["verdict"] or {}
    passed = bool(last.get("converged"))
    # this stage's verdict seconds for one pass: its last fit-phase judgement (confirmed) and its last continuation score
    pass_judgement = next((e for e in reversed(history) if e["phase"] == "fit" and e["verdict"] is not None), None)
    pass_seconds = 0.0 if pass_judgement is None else max(0.0, pass_judgement["seconds"] - epoch_seconds)
    score_seconds = max(0.0, history[-1]["seconds"] - epoch_seconds) if "continuation" in last else 0.0
    one_pass = pass_seconds + score_seconds
    floor_fit = rule_floor_epochs(rule)
    rule_floor_epochs_total = floor_fit + verdict.continuation_length(floor_fit)
    oracle_epochs = verdict.continuation_length(0)
    total = sum(e["seconds"] for e in history)
    return {"stage": str(path), "epochs": len(history), "fit_epochs": fit_epochs, "continuation_epochs": len(history) - fit_epochs,
            "converged": passed, "judged_epochs": len(judged), "seconds": total, "epoch_seconds": epoch_seconds,
            "adam_seconds": total - verdict_seconds, "verdict_seconds": verdict_seconds, "one_pass_verdict_seconds": one_pass,
            "pass_judgement_seconds": pass_seconds, "continuation_score_seconds": score_seconds,
            "rule_floor_epochs": rule_floor_epochs_total, "rule_floor_seconds": rule_floor_epochs_total * epoch_seconds + one_pass,
            "oracle_floor_epochs": oracle_epochs, "oracle_floor_seconds": oracle_epochs * epoch_seconds + one_pass,
            "rule": rule}


def stage_table(rows: list[dict]) -> str:
    lines = ["| stage | epochs: fit + continuation | converged | s | s / epoch of Adam | verdict s (share); one pass | "
             "rule floor: epochs, s, fit / floor | oracle floor: epochs, s, fit / floor |",
             "|---|---|---|---|---|---|---|---|"]
    for r in rows:
        stage = Path(r["stage"])
        lines.append(f"| {stage.parent.parent.name}/{stage.stem} | {r['fit_epochs']} + {r['continuation_epochs']} | {r['converged']} | {r['seconds']:,.0f} | "
                     f"{r['epoch_seconds']:.2f} | {r['verdict_seconds']:,.0f} ({r['verdict_seconds'] / max(r['seconds'], 1e-9):.0%}); "
                     f"{r['one_pass_verdict_seconds']:,.0f} | "
                     f"{r['rule_floor_epochs']}, {r['rule_floor_seconds']:,.0f}, {r['seconds'] / r['rule_floor_seconds']:.2f}x | "
                     f"{r['oracle_floor_epochs']}, {r['oracle_floor_seconds']:,.0f}, {r['seconds'] / r['oracle_floor_seconds']:.2f}x |")
    return "\n".join(lines) + "\n"


def judgement_cost(path: Path, rounds: int) -> dict:
    """``--judgement-cost`` on one stage (module docstring)."""
    import dataclasses

    import torch

    from pyro_bbt.config import HEADS, ExperimentConfig
    from pyro_bbt.fitting import start_from_state
    from pyro_bbt.units import load_task_pair, use_head
    from pyro_bbt.verdict import VerdictConfig, line_search_gain

    torch.set_num_threads(1)
    payload = torch.load(path, map_location="cpu", weights_only=True)
    saved = _configuration(payload["config"])
    names = {f.name for f in dataclasses.fields(ExperimentConfig)}
    fields = {k: tuple(v) if isinstance(v, list) else v for k, v in saved.items() if k in names}
    prefix = payload["key"].split("-A-")[0]  # a study's stages name their head ("multihead-A-bayesian-s0"); a transfer run's config holds it
    if prefix in HEADS:
        fields["head"] = prefix
    config = ExperimentConfig(**fields)
    seed = int(payload["key"].rsplit("-s", 1)[1])
    train = load_task_pair(config, max(config.fractions), seed).a.train
    model, guide = config.new_posterior(config.base_prior(), seed)
    use_head(model, 0)
    start_from_state(model, guide, payload["data"]["guide_state"])
    v = VerdictConfig()
    pairs = []
    for round_index in range(rounds):
        pair = {}
        for fast in (False, True):
            clock = time.perf_counter()
            gain = line_search_gain(model, guide, train, num_pairs=v.num_pairs, num_draws=v.num_draws, steps=v.steps, batch_size=v.batch_size,
                                    seed=round_index, direction=v.direction, fast=fast)
            pair["fast" if fast else "plain"] = {"seconds": time.perf_counter() - clock, "nats": gain.nats, "stderr": gain.stderr, "step": gain.step}
        pairs.append(pair)
        print(f"{path.name}, round {round_index + 1}: plain {pair['plain']['seconds']:.1f} s (gain {pair['plain']['nats']:.1f} +- {pair['plain']['stderr']:.1f}), "
              f"fast {pair['fast']['seconds']:.1f} s (gain {pair['fast']['nats']:.1f} +- {pair['fast']['stderr']:.1f})", flush=True)
    return {"stage": str(path), "num_data": len(train), "pairs": pairs,
            "median_seconds": {arm: statistics.median(p[arm]["seconds"] for p in pairs) for arm in ("plain", "fast")},
            "median_ratio_plain_over_fast": statistics.median(p["plain"]["seconds"] / p["fast"]["seconds"] for p in pairs)}


def grid_config(head: str, fraction: float, seed: int, max_epochs_b: int, fast_polish: bool):
    """The README grid's configuration (the paper preset under N(0, 0.3^2), B's fits polished,
    caps 12,000 / 20,000) for one head, fraction and seed, B capped at ``max_epochs_b``."""
    from pyro_bbt.config import PRESETS, ExperimentConfig

    return ExperimentConfig(**PRESETS["paper"] | dict(max_epochs_b=max_epochs_b, head=head, fractions=(fraction,), seeds=(seed,), fast_polish=fast_polish))


def profile_fit(method: str, fraction: float, head: str, seed: int, max_epochs_b: int, fast_polish: bool = False) -> dict:
    """One B fit of the README grid's configuration (``fast_polish`` as given), capped at
    ``max_epochs_b``, under cProfile on one torch thread: the cumulative seconds of :data:`PARTS`
    and the number of line searches (``line_searches``)."""
    import torch

    from pyro_bbt.units import FitStorage, load_task_pair, run_bayesian_b, run_joint

    torch.set_num_threads(1)
    config = grid_config(head, fraction, seed, max_epochs_b, fast_polish)
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
    searches = sum(entry[1] for (file, _, func), entry in stats.items() if func == "line_search_gain" and file.endswith("pyro_bbt/verdict.py"))
    return {"method": method, "fraction": fraction, "head": head, "seed": seed, "max_epochs_b": max_epochs_b, "fast_polish": fast_polish,
            "wall_seconds": wall, "epochs": outcome["convergence"]["epochs"], "converged": outcome["convergence"]["converged"],
            "line_searches": searches, "parts_seconds": parts}


def verdict_fit(method: str, fraction: float, head: str, seed: int, max_epochs_b: int, fast_polish: bool, stages_from: Path | None) -> dict:
    """One B fit of the README grid's configuration to the verdict (``fast_polish`` as given; a
    q_A stage of ``stages_from`` where ``method`` starts from q_A, read as the transfer CLI's
    ``--stages-from`` reads it: ``ValueError`` where that run's configuration is not this one up
    to the grid, the caps and B's fields), on one torch thread: wall seconds, epochs, converged,
    B's test accuracy, and the ELBO on B's training split by
    :func:`~pyro_bbt.fixed_noise.fixed_noise_elbo` (64 draws, seed 0)."""
    import torch

    from pyro_bbt.config import B_ONLY_FIELDS, GRID_FIELDS, RAISABLE_FIELDS, RUN_FIELDS
    from pyro_bbt.fixed_noise import fixed_noise_elbo
    from pyro_bbt.plan import stage_key
    from pyro_bbt.runstore import ReadOnlyStore
    from pyro_bbt.units import FitStorage, _train_bayesian, bayesian_metrics, load_task_pair, posterior_for_b, stage_from_saved

    torch.set_num_threads(1)
    config = grid_config(head, fraction, seed, max_epochs_b, fast_polish)
    tasks = load_task_pair(config, fraction, seed)
    stage = None
    if method != "scratch":
        store = ReadOnlyStore(Path(stages_from), config.to_dict(), grid_fields=(*GRID_FIELDS, *RUN_FIELDS), raisable_fields=RAISABLE_FIELDS,
                              stage_free_fields=B_ONLY_FIELDS)
        saved = store.stage(stage_key("bayesian", seed))
        if saved is None:
            raise ValueError(f"--stages-from {stages_from}: no q_A stage for seed {seed}")
        stage = stage_from_saved(saved)
    model, guide = posterior_for_b(config, method, stage, seed)
    start = time.perf_counter()
    _, history, convergence = _train_bayesian(config, model, guide, tasks.b.train, 0, seed, tasks, config.b_head, FitStorage(), "")
    wall = time.perf_counter() - start
    return {"method": method, "fraction": fraction, "head": head, "seed": seed, "fast_polish": fast_polish, "wall_seconds": wall,
            "epochs": convergence["epochs"], "converged": convergence["converged"], "num_train": len(tasks.b.train),
            "tol_per_datum": config.verdict_tol,
            "b_test_accuracy": bayesian_metrics(model, guide, tasks.b.test, config.eval_samples, config.b_head).accuracy,
            "elbo": fixed_noise_elbo(model, guide, tasks.b.train, num_draws=64, seed=0)}


def verdict_summary(fits: list[dict]) -> dict:
    """Per seed with both fits, the wall ratio off / on and the ELBO difference on - off per
    example; their medians, and every fit's convergence."""
    pairs = {}
    for f in fits:
        pairs.setdefault(f["seed"], {})[f["fast_polish"]] = f
    per_seed = [{"seed": seed, "wall_ratio": p[False]["wall_seconds"] / p[True]["wall_seconds"],
                 "elbo_difference_per_datum": (p[True]["elbo"] - p[False]["elbo"]) / p[True]["num_train"]}
                for seed, p in sorted(pairs.items()) if set(p) == {False, True}]
    return {"per_seed": per_seed, "median_wall_ratio": statistics.median(r["wall_ratio"] for r in per_seed),
            "median_elbo_difference_per_datum": statistics.median(r["elbo_difference_per_datum"] for r in per_seed),
            "all_converged": all(f["converged"] for f in fits)}


SEARCHES = "  line-search steps, all (judgements and polishing)"
POLISHING = "verdict: polishing steps (after a rejection)"


def fast_polish_summary(fits: list[dict]) -> dict:
    """Per setting of ``fast_polish`` (``"off"``, ``"on"``), the medians over ``fits`` of the wall
    seconds, the polishing phase's seconds and the seconds per line search; and the ratios
    off / on of the last two."""
    out: dict = {}
    for flag, name in ((False, "off"), (True, "on")):
        group = [f for f in fits if f["fast_polish"] == flag]
        out[name] = {"fits": len(group), "wall_seconds": statistics.median(f["wall_seconds"] for f in group),
                     "polishing_seconds": statistics.median(f["parts_seconds"][POLISHING] for f in group),
                     "line_searches": [f["line_searches"] for f in group],
                     "seconds_per_line_search": statistics.median(f["parts_seconds"][SEARCHES] / max(1, f["line_searches"]) for f in group)}
    out["ratio_seconds_per_line_search"] = out["off"]["seconds_per_line_search"] / out["on"]["seconds_per_line_search"]
    out["ratio_polishing_seconds"] = out["off"]["polishing_seconds"] / out["on"]["polishing_seconds"]
    return out


def _print_fit(result: dict) -> None:
    print(f"{result['method']} at {result['fraction']:g} of B, {result['head']} head, seed {result['seed']}, fast polish "
          f"{'on' if result['fast_polish'] else 'off'}: {result['epochs']} epochs (cap {result['max_epochs_b']}), {result['wall_seconds']:.1f} s wall, "
          f"{result['line_searches']} line searches", flush=True)
    whole = result["parts_seconds"]["the whole fit"]
    for label, seconds in result["parts_seconds"].items():
        print(f"  {label:55s} {seconds:8.1f} s  {seconds / whole:6.1%}", flush=True)


def _per_stage(parser: argparse.ArgumentParser, files: list[Path], read) -> list[dict]:
    """``read`` of each q_A stage file; one parser error naming the files that are missing or not
    stages of a fit by the rule and the verdict."""
    missing = [str(f) for f in files if not f.is_file()]
    if missing:
        parser.error(f"no stage file {', '.join(missing)}: give q_A stage files, stages/*-A-bayesian-s*.pt of a run")
    try:
        return [read(f) for f in files]
    except (KeyError, ValueError) as error:
        parser.error(f"not a q_A stage of a fit by the rule and the verdict: {error}")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--runs", type=Path, nargs="+", help="finished python -m pyro_bbt.transfer runs whose units to read")
    parser.add_argument("--stages", type=Path, nargs="+", help="q_A stage files (stages/*-A-bayesian-s*.pt) whose phases and floors to read")
    parser.add_argument("--judgement-cost", type=Path, nargs="+", help="q_A stage files on whose posteriors to time a judgement's line search plain and fast")
    parser.add_argument("--profile", action="store_true", help="profile one B fit instead")
    parser.add_argument("--time-to-verdict", action="store_true", help="whole B fits to the verdict without and with fast polish, per seed")
    parser.add_argument("--method", choices=("scratch", "joint", "finetune", "transfer"), default="scratch",
                        help="--profile: scratch or joint (no task-A stage); --time-to-verdict: scratch, finetune or transfer")
    parser.add_argument("--seeds", default="0", help="--time-to-verdict: comma-separated seeds (default 0)")
    parser.add_argument("--stages-from", type=Path, help="--time-to-verdict with finetune or transfer: a python -m pyro_bbt.transfer run holding q_A per seed")
    parser.add_argument("--fraction", type=float, default=0.01)
    parser.add_argument("--head", default="shared")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--max-epochs-b", type=int, default=150)
    parser.add_argument("--fast-polish", choices=("off", "on", "both"), default="off",
                        help="--profile: the verdict's steps as they are, fast (ExperimentConfig.fast_polish), or both in interleaved rounds")
    parser.add_argument("--rounds", type=int, default=1, help="--profile --fast-polish both: rounds of the two fits (default 1)")
    parser.add_argument("--out", type=Path, help="write the rows (or the profile) as JSON here")
    args = parser.parse_args(argv)
    if (bool(args.runs), bool(args.stages), bool(args.judgement_cost), args.profile, args.time_to_verdict).count(True) != 1:
        parser.error("give one of --runs DIR [DIR ...], --stages FILE [FILE ...], --judgement-cost FILE [FILE ...], --profile, --time-to-verdict")
    if args.profile and args.method not in ("scratch", "joint"):
        parser.error(f"--profile fits scratch or joint (no task-A stage), got --method {args.method}")
    if args.time_to_verdict and args.method == "joint":
        parser.error("--time-to-verdict fits scratch, finetune or transfer, got --method joint")
    if args.time_to_verdict and args.method != "scratch" and (args.stages_from is None or not (args.stages_from / "stages").is_dir()):
        parser.error(f"--time-to-verdict --method {args.method} needs --stages-from RUN, a run directory with stages/ (got {args.stages_from})")
    if args.rounds < 1 or (args.rounds > 1 and args.fast_polish != "both" and not args.judgement_cost):
        parser.error(f"--rounds must be >= 1 and applies to --fast-polish both and --judgement-cost only, got {args.rounds}")
    if args.runs:
        missing = [str(d) for d in args.runs if not ((d / "results.json").is_file() and (d / "timing.json").is_file())]
        if missing:
            parser.error(f"no results.json and timing.json in {', '.join(missing)}: give the directories of finished python -m pyro_bbt.transfer runs")
        result = phase_rows(args.runs)
        print(phase_table(result), end="")
    elif args.stages:
        result = _per_stage(parser, args.stages, stage_row)
        print(stage_table(result), end="")
    elif args.judgement_cost:
        result = _per_stage(parser, args.judgement_cost, lambda f: judgement_cost(f, args.rounds))
        for r in result:
            print(f"{Path(r['stage']).name}: median {r['median_seconds']['plain']:.1f} s plain, {r['median_seconds']['fast']:.1f} s fast; "
                  f"plain / fast {r['median_ratio_plain_over_fast']:.2f}x over {len(r['pairs'])} pairs")
    elif args.time_to_verdict:
        fits = []
        for seed in (int(s) for s in args.seeds.split(",")):
            for flag in (False, True):
                try:
                    fits.append(verdict_fit(args.method, args.fraction, args.head, seed, args.max_epochs_b, flag, args.stages_from))
                except ValueError as error:  # the configuration (a cap below epochs-a), or --stages-from of another one
                    parser.error(str(error))
                f = fits[-1]
                print(f"{f['method']} at {f['fraction']:g} of B, {f['head']} head, seed {seed}, fast polish {'on' if flag else 'off'}: "
                      f"{f['wall_seconds']:.1f} s, {f['epochs']} epochs, converged {f['converged']}, B test {f['b_test_accuracy']:.4f}, "
                      f"ELBO {f['elbo']:.1f}", flush=True)
                if args.out:  # every fit so far, so that a long comparison stopped part-way keeps what it measured
                    atomic_write_text(args.out, json.dumps({"fits": fits, "summary": None}, indent=1) + "\n")
        result = {"fits": fits, "summary": verdict_summary(fits)}
        summary = result["summary"]
        print(f"off / on wall, median over seeds: {summary['median_wall_ratio']:.2f}x; ELBO on - off per example, median: "
              f"{summary['median_elbo_difference_per_datum']:+.4f} (tolerance {fits[0]['tol_per_datum']}); every fit converged: {summary['all_converged']}")
    elif args.fast_polish != "both":
        result = profile_fit(args.method, args.fraction, args.head, args.seed, args.max_epochs_b, args.fast_polish == "on")
        _print_fit(result)
    else:
        fits = []
        for _ in range(args.rounds):
            for flag in (False, True):
                fits.append(profile_fit(args.method, args.fraction, args.head, args.seed, args.max_epochs_b, flag))
                _print_fit(fits[-1])
        result = {"fits": fits, "summary": fast_polish_summary(fits)}
        summary = result["summary"]
        for name in ("off", "on"):
            print(f"fast polish {name}: median {summary[name]['seconds_per_line_search']:.3f} s per line search, "
                  f"polishing {summary[name]['polishing_seconds']:.1f} s, wall {summary[name]['wall_seconds']:.1f} s ({summary[name]['fits']} fits)")
        print(f"off / on: {summary['ratio_seconds_per_line_search']:.2f}x per line search, {summary['ratio_polishing_seconds']:.2f}x polishing")
    if args.out:
        atomic_write_text(args.out, json.dumps(result, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
