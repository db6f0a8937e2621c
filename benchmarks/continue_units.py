"""Do the grid's converged fits on B still change their predictions when fitted on?

A pass of the verdict bounds what the *next doubling* of a fit's own last iterate would gain;
it does not say that B's test accuracy has stopped moving. This bench refits B units of the
A -> B grid exactly as ``python -m pyro_bbt.transfer`` fits them (the same configuration, from
the CLI's own flags after ``--``; the same q_A, the same seeds, the polishing steps, the verdict
and its continuations: :func:`pyro_bbt.units.fit_bayesian_b`), records what the grid records
(B's and A's test accuracy, the epochs, ``converged``, the floor), and then continues each fit for
``--epochs`` epochs at ``--factor`` times its first rates (``averaging.py``'s continuation: a
fresh Adam, the fit's minibatch and KL schedule, no verdict). At every power of two ``k`` it
measures the last iterate (``last_*``) and the average of the guide's unconstrained parameters
over the epochs ``(k/2, k]`` (``avg_*``):

* ``b_test`` / ``a_test``: B's test accuracy through B's head and A's through A's head, the
  predictive mean of the run's ``eval_samples`` weight draws, seeded with the unit's seed
  (common random numbers across points, RNG-neutral);
* ``elbo`` / ``kl``: the fixed-noise ELBO on B's training split under the unit's own prior
  (``converge.py``'s evaluator: ``--eval-draws`` antithetic draws, common random numbers) and
  ``KL(q || p)`` in closed form.

The pass is measured the same way (``pass.seeded``) beside the grid's own numbers
(``pass.b_test``, ``pass.a_test_after``, drawn as the grid draws them); ``--published
RESULTS.json ...`` adds the published record's B accuracy for the same unit, to show the refit
reproduces it. Units that need q_A take it from ``--stages-from DIR`` (a run's ``stages/``:
``A-bayesian-sS.pt``, or ``HEAD-A-bayesian-sS.pt`` as a tradeoff study stores it, checked to load
under this configuration up to B's fields) or fit it first by the configuration's recipe (its
time not counted). Only scratch, transfer and finetune units are taken. One process, one torch
thread; writes ``--out`` (JSON) after every point; ``--table FILE ...`` prints the files' table
(:func:`continued_table`)::

    python benchmarks/continue_units.py --factor 0.1 --epochs 1024 --stages-from runs/tradeoff-conv-f0.1-mh-headfix \\
        --published figs/ps03/results.json --out figs/continue-ps03-mh-transfer-s0.json -- \\
        --preset paper --head multihead --prior-scale 0.3 --polish-steps-b 30 --max-epochs-a 12000 --max-epochs-b 20000 \\
        --methods transfer --fractions 0.1 --seeds 0
    python benchmarks/continue_units.py --table figs/continue-ps03-mh-*.json
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import pyro
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from averaging import continuation_recipe, continue_with_averages  # noqa: E402
from bench_common import positive_int  # noqa: E402
from converge import Evaluator  # noqa: E402

from pyro_bbt.config import B_ONLY_FIELDS, GRID_FIELDS, LATER_FIELDS, RAISABLE_FIELDS, RUN_FIELDS, ExperimentConfig  # noqa: E402
from pyro_bbt.files import atomic_write_text  # noqa: E402
from pyro_bbt.plan import UnitSpec, build_plan  # noqa: E402
from pyro_bbt.report import mean_t_interval  # noqa: E402
from pyro_bbt.runstore import ReadOnlyStore, disallowed_differences  # noqa: E402
from pyro_bbt.transfer import UsageError, build_parser, config_from_args  # noqa: E402
from pyro_bbt.units import bayesian_metrics, fit_bayesian_b, fit_task_a, load_task_pair, stage_from_saved, use_head  # noqa: E402

BAYESIAN_B = ("scratch", "transfer", "finetune")


def stored_stage(source: Path, config: ExperimentConfig, key: str) -> dict | None:
    """The q_A stage ``key`` (``A-bayesian-sS``) in ``source/stages``: as the grid stores it
    (checked by :class:`~pyro_bbt.runstore.RunStore` to load under ``config`` up to B's fields),
    or as a tradeoff study stores it, ``HEAD-A-bayesian-sS.pt`` under the study's configuration
    (its experiment, at this head, checked the same way); ``None`` where neither file exists.
    ``ValueError`` where the file was made by another configuration."""
    free = (*GRID_FIELDS, *RUN_FIELDS, *B_ONLY_FIELDS)
    if (source / "stages" / f"{key}.pt").is_file():
        store = ReadOnlyStore(source, config.to_dict(), grid_fields=(*GRID_FIELDS, *RUN_FIELDS), raisable_fields=RAISABLE_FIELDS, stage_free_fields=B_ONLY_FIELDS)
        return store.stage(key)
    path = source / "stages" / f"{config.head}-{key}.pt"
    if not path.is_file():
        return None
    payload = torch.load(path, map_location="cpu", weights_only=True)
    study = payload.get("config", {})
    if payload.get("key") != f"{config.head}-{key}" or "experiment" not in study.get("config", {}):
        raise ValueError(f"{path}: not a tradeoff study's stage {config.head}-{key}")
    saved = study["config"]["experiment"] | {"head": config.head}  # the study fits each head's q_A with its experiment at that head
    blocking = disallowed_differences(saved, config.to_dict(), free, RAISABLE_FIELDS, LATER_FIELDS)
    if blocking:
        raise ValueError(f"{path}: made by another configuration ({'; '.join(blocking)})")
    return payload["data"]


def published_accuracy(published: list[dict], spec: UnitSpec, head: str) -> float | None:
    """B's test accuracy of the unit ``spec`` in the first of the ``published`` results (each a
    ``results.json``, read) whose run has ``head`` and holds it; ``None`` where none does."""
    for results in published:
        if results.get("config", {}).get("head") != head:
            continue
        for unit in results.get("units", []):
            if (unit.get("method"), unit.get("fraction"), unit.get("seed")) == (spec.method, spec.fraction, spec.seed) and unit.get("status") == "ok":
                return unit["b_test"]["accuracy"]
    return None


def continue_unit(config: ExperimentConfig, spec: UnitSpec, stages_from: Path | None, factor: float, epochs: int, eval_draws: int,
                  on_record=None) -> dict:
    """Refit ``spec`` as the grid does, then continue it (module docstring). Returns the unit's
    record; ``on_record(record)`` is called after the pass and after every point."""
    tasks = load_task_pair(config, spec.fraction, spec.seed)
    q_a = None
    stage = None
    if spec.needs is not None:
        saved = stored_stage(stages_from, config, spec.needs) if stages_from is not None else None
        if saved is None:
            pyro.clear_param_store()
            stage = fit_task_a(config, tasks, spec.seed)
            q_a = {"source": "fitted", "epochs": stage.convergence["epochs"], "converged": stage.convergence["converged"]}
        else:
            stage = stage_from_saved(saved)
            q_a = {"source": str(stages_from), "epochs": stage.convergence["epochs"], "converged": stage.convergence["converged"]}
    pyro.clear_param_store()
    start = time.perf_counter()
    model, guide, outcome = fit_bayesian_b(config, spec.method, tasks, stage, spec.steps, spec.seed)
    fit_seconds = time.perf_counter() - start
    evaluator = Evaluator(num_draws=eval_draws)

    def measure(which: str) -> dict:
        with torch.random.fork_rng():
            torch.manual_seed(spec.seed)
            b_test = bayesian_metrics(model, guide, tasks.b.test, config.eval_samples, config.b_head).accuracy
            a_test = bayesian_metrics(model, guide, tasks.a.test, config.eval_samples, 0).accuracy
        use_head(model, config.b_head)
        score = evaluator.score(model, guide, tasks.b.train)
        return {f"{which}_b_test": b_test, f"{which}_a_test": a_test, f"{which}_elbo": score.elbo, f"{which}_kl": score.kl}

    convergence = outcome["convergence"]
    verdict = (convergence or {}).get("verdict") or {}
    record = {"key": spec.key, "method": spec.method, "fraction": spec.fraction, "seed": spec.seed, "num_train": len(tasks.b.train), "q_a": q_a,
              "pass": {"epochs": convergence["epochs"], "converged": convergence["converged"], "floor": verdict.get("floor"),
                       "seconds": fit_seconds, "b_test": outcome["b_test"].accuracy, "a_test_after": outcome["a_test_after"].accuracy,
                       "seeded": measure("pass")},
              "points": []}
    if on_record is not None:
        on_record(record)

    def on_point(point: dict) -> None:
        record["points"].append(point)
        print(f"[continue_units] {spec.key} epoch {point['epoch']}: B test last {point['last_b_test']:.4f}, average {point['avg_b_test']:.4f}; "
              f"ELBO last {point['last_elbo']:,.1f}, average {point['avg_elbo']:,.1f}", flush=True)
        if on_record is not None:
            on_record(record)

    recipe = config.recipe_b_converged(len(tasks.b.train))
    continue_with_averages(model, guide, tasks.b.train, continuation_recipe(recipe, factor, epochs), spec.seed + 1000, measure, on_point)
    return record


def continued_table(records: list[dict]) -> str:
    """Markdown: per unit of ``records`` (this bench's files; by head, method, seed), its pass (epochs; B's and A's test
    accuracy as the grid draws them, and B's with the points' seeded draws) and, at the last point,
    the last iterate's and the tail average's B and A accuracy and ELBO gain per example over the
    pass (the same seeded draws and evaluator); then, per head and seed holding both, transfer -
    scratch in B accuracy at the pass (the grid's draws, the seeded ones) and at the last point,
    with the mean and its 95 % t interval over seeds (:func:`pyro_bbt.report.mean_t_interval`)."""
    rows = ["| head | unit | pass epochs | B at pass: grid's, seeded | B last | B average | A at pass | A last | ELBO gain / example, last, average |",
            "|---|---|---|---|---|---|---|---|---|"]
    by_pair: dict[tuple[str, int], dict[str, dict]] = {}
    unit_rows: list[tuple[tuple, str]] = []
    for record in records:
        head = record["args"]["head"]
        for unit in record["units"]:
            if not unit.get("points"):
                continue
            end, seeded, n = unit["points"][-1], unit["pass"]["seeded"], unit["num_train"]
            gains = [(end[f"{w}_elbo"] - seeded["pass_elbo"]) / n for w in ("last", "avg")]
            unit_rows.append(((head, unit["method"], unit["seed"]), f"| {head} | {unit['key']} | {unit['pass']['epochs']}{'' if unit['pass']['converged'] else ' (not converged)'} | "
                        f"{unit['pass']['b_test']:.4f}, {seeded['pass_b_test']:.4f} | {end['last_b_test']:.4f} | {end['avg_b_test']:.4f} | {unit['pass']['a_test_after']:.3f} | "
                        f"{end['last_a_test']:.3f} | {gains[0]:+.4f}, {gains[1]:+.4f} (+{end['epoch']} epochs) |"))
            by_pair.setdefault((head, unit["seed"]), {})[unit["method"]] = unit
    rows += [row for _, row in sorted(unit_rows)]
    rows += ["", "| head | seed | transfer - scratch in B: at pass, grid's draws | seeded | last | average |", "|---|---|---|---|---|---|"]
    means: dict[str, list[list[float]]] = {}
    for (head, seed), units in sorted(by_pair.items()):
        if not {"transfer", "scratch"} <= set(units):
            continue
        t, s = units["transfer"], units["scratch"]
        diffs = [t["pass"]["b_test"] - s["pass"]["b_test"], t["pass"]["seeded"]["pass_b_test"] - s["pass"]["seeded"]["pass_b_test"]] + [t["points"][-1][f"{w}_b_test"] - s["points"][-1][f"{w}_b_test"] for w in ("last", "avg")]
        means.setdefault(head, []).append(diffs)
        rows.append(f"| {head} | {seed} | " + " | ".join(f"{d:+.4f}" for d in diffs) + " |")
    for head, diffs in means.items():
        rows.append(f"| {head} | mean [95 % t interval] of {len(diffs)} | " + " | ".join(mean_t_interval(list(column), 4) for column in zip(*diffs)) + " |")
    return "\n".join(rows)


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv[:1] == ["--table"]:
        if len(argv) < 2 or any(not Path(path).is_file() for path in argv[1:]):
            print(f"continue_units: --table takes this bench's JSON files, got {' '.join(argv[1:]) or 'none'}", file=sys.stderr)
            return 2
        print(continued_table([json.loads(Path(path).read_text()) for path in argv[1:]]))
        return 0
    ours, cli = (argv[:argv.index("--")], argv[argv.index("--") + 1:]) if "--" in argv else (argv, [])
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], usage="%(prog)s [options] -- TRANSFER_FLAGS")
    parser.add_argument("--factor", type=float, default=0.1, help="the continuation's rates, times the fit's first rates")
    parser.add_argument("--epochs", type=positive_int, default=1024, help="epochs of the continuation (measured at every power of two)")
    parser.add_argument("--eval-draws", type=positive_int, default=8)
    parser.add_argument("--stages-from", type=Path, help="a run directory whose stages/ holds q_A for these seeds (else q_A is fitted first)")
    parser.add_argument("--published", type=Path, nargs="*", default=[], help="results.json files to compare the refitted B accuracy with")
    parser.add_argument("--threads", type=positive_int, default=1)
    parser.add_argument("--out", type=Path, required=True)
    args = parser.parse_args(ours)
    if not args.factor > 0:
        parser.error(f"--factor must be > 0, got {args.factor}")
    if not cli:
        parser.error("give the grid's flags after --, e.g. -- --preset paper --methods transfer --fractions 0.1 --seeds 0")
    for path in [*args.published, *([args.stages_from] if args.stages_from else [])]:
        if not path.exists():
            parser.error(f"{path} does not exist")
    published = []
    for path in args.published:  # read before any fit: a file that is not a run's results.json is refused up front
        try:
            results = json.loads(path.read_text())
        except (OSError, UnicodeDecodeError, json.JSONDecodeError) as error:
            parser.error(f"--published {path}: not a results.json ({error})")
        if not isinstance(results, dict) or not isinstance(results.get("units"), list):
            parser.error(f"--published {path}: not a results.json (no list of units)")
        published.append(results)
    try:
        transfer_args = build_parser().parse_args(cli)
        if transfer_args.sequence:
            raise UsageError(f"--sequence {transfer_args.sequence}: only the A -> B grid's units can be continued")
        config = config_from_args(transfer_args)
    except UsageError as error:
        parser.error(f"the grid's flags: {error}")
    if config.fit_b != "rule" or config.verdict_tol is None:
        parser.error("the grid's flags must fit B by the rule with a verdict (--preset paper): a fixed budget has no pass to continue")
    specs = [spec for spec in build_plan(config).units if spec.method in BAYESIAN_B]
    if not specs:
        parser.error(f"--methods {','.join(config.methods)}: none of {', '.join(BAYESIAN_B)}, the Bayesian fits on B this bench continues")
    if args.stages_from is not None:  # a stage of another configuration is refused before any fit
        for key in sorted({spec.needs for spec in specs if spec.needs is not None}):
            try:
                stored_stage(args.stages_from, config, key)
            except ValueError as error:
                parser.error(f"--stages-from {args.stages_from}: {error}")
    record = {"args": {"factor": args.factor, "epochs": args.epochs, "eval_draws": args.eval_draws, "grid_flags": cli,
                       "stages_from": str(args.stages_from) if args.stages_from else None, "head": config.head, "prior_scale": config.prior_scale},
              "units": []}

    def write(_=None) -> None:
        atomic_write_text(args.out, json.dumps(record, indent=1))

    threads = torch.get_num_threads()
    torch.set_num_threads(args.threads)
    try:
        for spec in specs:
            unit = {}
            record["units"].append(unit)

            def keep(current: dict, unit=unit) -> None:
                unit.update(current)
                write()

            continue_unit(config, spec, args.stages_from, args.factor, args.epochs, args.eval_draws, keep)
            unit["published_b_test"] = published_accuracy(published, spec, config.head)
            write()
    finally:
        torch.set_num_threads(threads)
    for unit in record["units"]:
        end = unit["points"][-1] if unit["points"] else {}
        print(f"{unit['key']}: pass at {unit['pass']['epochs']} epochs (converged {unit['pass']['converged']}), B test {unit['pass']['b_test']:.4f} "
              f"(published {unit['published_b_test']}); after {end.get('epoch')} more: last {end.get('last_b_test')}, average {end.get('avg_b_test')}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
