"""Does averaging the iterates remove Adam's noise floor, and what is left when it does?

Fits a posterior (``benchmarks/converge.py``'s problems: ``small`` is 2,000 images of task A at
784-32-5, ``task-a`` all 27,537 at 784-400-400, ``b-10`` a tenth of task B at 784-400-400; with
``--transfer`` the B problem's fit starts at q_A under the prior q_A, :func:`transferred_posterior`)
by the ``--preset``'s q_A recipe to its verdict (``paper-v2``: the line-search pass, confirmed, no
continuation; ``paper``: with its continuations), then continues it for
``--epochs`` epochs at ``--factor`` times the recipe's first rates (a fresh Adam, the recipe's
minibatch and KL schedule, no verdict). At every power of two ``k`` it scores, with
``converge.py``'s evaluator (the fixed-noise ELBO, 8 antithetic draws, common random numbers;
``KL(q || p)`` in closed form):

* ``last``: the last iterate;
* ``avg``: the average of the guide's unconstrained parameters (locations, log-widths) after each
  epoch of ``(k/2, k]`` (Polyak-Ruppert tail averaging, what
  ``VerdictConfig.continuation_average`` does inside a continuation).

and, for the pass and every average, where its KL to the base prior ``N(0, sigma_p^2)`` lies (also
under ``--transfer``, whose own prior is q_A: the evaluator's ELBO and KL are to q_A there)
(:func:`kl_breakdown`): per weight site, the first layer's blank-pixel columns apart (their exact
posterior is the prior), and the hidden units whose incoming weights sit near the prior (mean KL
per weight below 0.001, 0.01, 0.1 nats: :func:`pyro_bbt.pruning.unit_kl`). The pass, every last
iterate and every average also get the problem's test accuracy (``converge.py``'s
:func:`posterior_accuracy`: the predictive mean of 32 weight draws, seeded, RNG-neutral), so that
what the floor costs in ELBO can be read against what it costs in predictions. ``--experiment
KEY=VALUE,...`` changes the preset's configuration as in ``converge.py`` (``prior_scale=0.3``: the
README answer's prior).

Under ``--transfer`` the record's ``args.q_a`` says how q_A's fit ended (epochs, converged). Off
the clock except ``seconds``, which counts from the start of the fit (q_A's fit not included). One process, one torch
thread. Writes ``--out`` (JSON: the pass, then one point per ``k``) after every point::

    python benchmarks/averaging.py --problem small --factor 0.3 --epochs 1024 --out figs/averaging-small-f0.3.json
    python benchmarks/averaging.py --problem task-a --preset paper-v5 --experiment prior_scale=0.3 --factor 0.1 --epochs 1024 --out figs/averaging-task-a-ps03-s0-f0.1.json
    python benchmarks/averaging.py --problem b-10 --preset paper-v5 --experiment prior_scale=0.3 --factor 0.1 --epochs 1024 --transfer --out figs/averaging-b10-transfer-ps03-s0-f0.1.json
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from collections.abc import Callable
from dataclasses import replace
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_common import positive_int  # noqa: E402
from converge import (PROBLEMS, Evaluator, Problem, add_problem_arguments, experiment_overrides, load_problem,  # noqa: E402
                      posterior_accuracy, problem_from_args, recipe_for)

from pyro_bbt.convergence import uninformed_inputs  # noqa: E402
from pyro_bbt.files import atomic_write_text  # noqa: E402
from pyro_bbt.fitting import FitRecipe, fit_posterior, guide_state, prior_from_posterior, start_from_state  # noqa: E402
from pyro_bbt.guides import posterior_loc_scale  # noqa: E402
from pyro_bbt.pruning import unit_kl  # noqa: E402

UNIT_THRESHOLDS = (0.001, 0.01, 0.1)


@torch.no_grad()
def kl_breakdown(model, guide, x_train: torch.Tensor, prior_std: float) -> dict:
    """Where ``KL(q || N(0, prior_std^2))`` lies: ``sites`` (nats per weight or bias site, closed
    form), ``blank`` (the first layer's columns of pixels 0 in every training image) and
    ``units_near_prior`` (per hidden layer, how many units have a mean KL per incoming weight at
    most each of :data:`UNIT_THRESHOLDS`, blank pixels left out)."""
    posterior = posterior_loc_scale(guide, model)
    blank = uninformed_inputs(x_train)
    sites, blank_kl = {}, 0.0
    for site, (loc, scale) in posterior.items():
        ratio = (scale / prior_std) ** 2
        kl = 0.5 * (ratio + (loc / prior_std) ** 2 - 1.0 - torch.log(ratio))
        sites[site] = float(kl.sum())
        if site == "layers.0.weight":
            blank_kl = float(kl[:, blank].sum())
    units = [{str(t): int((k <= t).sum()) for t in UNIT_THRESHOLDS} | {"units": int(k.numel())}
             for k in unit_kl(guide, model, prior_std, x_train)]
    return {"sites": sites, "total": sum(sites.values()), "blank": blank_kl, "units_near_prior": units}


def transferred_posterior(problem: Problem, preset: str, overrides: tuple[tuple[str, object], ...], seed: int, max_epochs: int | None):
    """``--transfer``: q_A fitted on task A (every training image, or the problem's first
    ``limit_train``; the problem's hidden sizes) by the same recipe to its verdict, then a network
    under the prior q_A (``prior_from_posterior``, tau 1, one shared head) whose guide starts at
    q_A: the transfer fit's start. Returns ``(model, guide, record of q_A's fit)``."""
    task_a = replace(PROBLEMS["task-a"], limit_train=problem.limit_train, hidden=problem.hidden)
    data = load_problem(task_a, dict(overrides), preset=preset)
    experiment = data.experiment
    model_a, guide_a = experiment.new_posterior(experiment.base_prior(), seed)
    fit = fit_posterior(model_a, guide_a, data.train, recipe_for(experiment, data.num_data, max_epochs), seed)
    prior = prior_from_posterior(guide_a, model_a, experiment.base_prior(), experiment.base_prior_std)
    state = guide_state(guide_a)
    model, guide = experiment.new_posterior(prior, seed)
    start_from_state(model, guide, state)
    return model, guide, {"epochs": fit.epochs, "converged": fit.converged}


def continue_and_average(problem: Problem, preset: str, seed: int, factor: float, epochs: int, max_epochs: int | None,
                         eval_draws: int, out: Path | None = None, overrides: tuple[tuple[str, object], ...] = (),
                         transfer: bool = False) -> dict:
    """The measurement above; returns (and writes to ``out``) ``{"args", "pass", "points"}``.
    ``overrides`` change the preset's configuration (``--experiment``, as in ``converge.py``);
    ``transfer`` fits the problem's task from q_A (:func:`transferred_posterior`, its time not
    counted in ``seconds``) instead of from the base prior."""
    data = load_problem(problem, dict(overrides), preset=preset)
    evaluator = Evaluator(num_draws=eval_draws)
    q_a = None
    if transfer:
        model, guide, q_a = transferred_posterior(problem, preset, overrides, seed, max_epochs)
    else:
        model, guide = data.experiment.new_posterior(data.experiment.base_prior(), seed)
    recipe = recipe_for(data.experiment, data.num_data, max_epochs)
    start = time.perf_counter()
    fit = fit_posterior(model, guide, data.train, recipe, seed)
    score = evaluator.score(model, guide, data.train)
    record = {"args": {"problem": problem.name, "limit_train": problem.limit_train, "hidden": list(problem.hidden), "preset": preset,
                       "seed": seed, "factor": factor, "epochs": epochs, "eval_draws": eval_draws, "experiment": dict(overrides),
                       "transfer": transfer, "q_a": q_a},
              "pass": {"epochs": fit.epochs, "converged": fit.converged, "seconds": time.perf_counter() - start, "elbo": score.elbo, "kl": score.kl,
                       "test_accuracy": posterior_accuracy(model, guide, data.test, seed),
                       "kl_breakdown": kl_breakdown(model, guide, data.train.x, data.experiment.base_prior_std)},
              "points": []}

    def measure(which: str) -> dict:
        score = evaluator.score(model, guide, data.train)
        point = {f"{which}_elbo": score.elbo, f"{which}_kl": score.kl, f"{which}_test_accuracy": posterior_accuracy(model, guide, data.test, seed)}
        if which == "avg":
            point["avg_kl_breakdown"] = kl_breakdown(model, guide, data.train.x, data.experiment.base_prior_std)
        return point

    def on_point(point: dict) -> None:
        record["points"].append(point)
        print(f"[averaging] epoch {point['epoch']}: last {point['last_elbo']:,.1f}, average of the last {point['avg_n']} {point['avg_elbo']:,.1f}", flush=True)
        if out is not None:
            atomic_write_text(out, json.dumps(record, indent=1))

    continue_with_averages(model, guide, data.train, continuation_recipe(recipe, factor, epochs), seed + 1000, measure, on_point, start)
    if out is not None:
        atomic_write_text(out, json.dumps(record, indent=1))
    return record


def continuation_recipe(recipe: FitRecipe, factor: float, epochs: int) -> FitRecipe:
    """``epochs`` more epochs at ``factor`` times ``recipe``'s first rates (its minibatch, KL
    schedule, estimator and particles; no rule, no verdict)."""
    return FitRecipe(lr=recipe.lr * factor, scale_lr=(recipe.scale_lr or recipe.lr) * factor, batch_size=recipe.batch_size, epochs=epochs,
                     kl_schedule=recipe.kl_schedule, estimator=recipe.estimator, num_particles=recipe.num_particles, verdict=None)


def continue_with_averages(model, guide, split, recipe: FitRecipe, seed: int, measure: Callable[[str], dict],
                           on_point: Callable[[dict], None], start: float | None = None) -> None:
    """Fit on by ``recipe`` (a fresh Adam) and, after epoch ``k`` for every power of two ``k``,
    measure the last iterate (``measure("last")``) and the average of the guide's unconstrained
    parameters after each epoch of ``(k/2, k]`` (``measure("avg")``, the guide holding that
    average; the last iterate is put back before the fit goes on), and pass
    ``{"epoch", "seconds", "avg_n"} | last | avg`` to ``on_point`` (``seconds`` from ``start``,
    a ``perf_counter()`` reading; default: now). The measurements must leave the global RNG as
    they found it (fork it) so that the fit does not depend on them."""
    start = time.perf_counter() if start is None else start
    window: dict = {"sum": None, "count": 0, "epoch": 0}

    def on_epoch(_) -> None:
        window["epoch"] += 1
        state = {k: v.detach().clone() for k, v in guide.state_dict().items()}
        window["sum"] = state if window["sum"] is None else {k: window["sum"][k] + v for k, v in state.items()}
        window["count"] += 1
        k = window["epoch"]
        if k & (k - 1):
            return
        last = measure("last")
        guide.load_state_dict({name: total / window["count"] for name, total in window["sum"].items()})
        averaged = measure("avg")
        guide.load_state_dict(state)
        on_point({"epoch": k, "seconds": time.perf_counter() - start, "avg_n": window["count"]} | last | averaged)
        window["sum"], window["count"] = None, 0

    fit_posterior(model, guide, split, recipe, seed, on_epoch=on_epoch)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    add_problem_arguments(parser)
    parser.add_argument("--factor", type=float, default=1.0, help="the continuation's rates, times the recipe's first rates")
    parser.add_argument("--epochs", type=int, default=512, help="epochs of the continuation (scored at every power of two)")
    parser.add_argument("--max-epochs", type=positive_int, help="cap the fit to the pass at this many epochs (tests)")
    parser.add_argument("--eval-draws", type=int, default=8)
    parser.add_argument("--experiment", type=experiment_overrides, default=(),
                        help="change the preset's configuration, KEY=VALUE,... over ExperimentConfig's fields, e.g. prior_scale=0.3 (as converge.py)")
    parser.add_argument("--transfer", action="store_true",
                        help="fit the problem's task from q_A (fitted on task A by the same recipe first), under the prior q_A: a transfer fit")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--out", type=Path, required=True)
    args = parser.parse_args(argv)
    for name in ("epochs", "eval_draws", "threads"):
        if getattr(args, name) < 1:
            parser.error(f"--{name.replace('_', '-')} must be >= 1, got {getattr(args, name)}")
    if not args.factor > 0:
        parser.error(f"--factor must be > 0, got {args.factor}")
    if args.transfer and PROBLEMS[args.problem].digits is None:
        parser.error(f"--transfer needs a problem of task B (b-10), got --problem {args.problem} (task A itself)")
    problem = problem_from_args(args)
    threads = torch.get_num_threads()
    torch.set_num_threads(args.threads)
    try:
        continue_and_average(problem, args.preset, args.seed, args.factor, args.epochs, args.max_epochs, args.eval_draws, args.out, args.experiment,
                             args.transfer)
    finally:
        torch.set_num_threads(threads)
    return 0


if __name__ == "__main__":
    sys.exit(main())
