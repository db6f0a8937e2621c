"""After the recipe's pass, does the verdict's own step raise the ELBO faster than Adam does?

Fits task A's posterior (``benchmarks/converge.py``'s problems: ``small`` is 2,000 images at
784-32-5, ``task-a`` all 27,537 at 784-400-400) by the ``--preset``'s q_A recipe to its verdict
(``paper-v2``: the line-search pass, confirmed, no continuation), or, with ``--start-epochs E``,
by E epochs of Adam at the recipe's first rates (no drops, no verdict). From that one posterior
two arms run, each for ``--seconds`` of wall time (or ``--points`` points, whichever comes first):

* ``adam``: the fit continued in chunks of ``--chunk`` epochs at ``--factor`` times the recipe's
  first rates for the first half of the time, ``--factor / 3`` for the second (the
  continuation's 0.3 then 0.1 of the paper preset), a fresh Adam per chunk, the recipe's
  minibatch and KL schedule;
* ``ng``: steps along the whitened natural gradient of the full-data ELBO, each with the
  verdict's line search (:func:`pyro_bbt.verdict.line_search_gain`, ``keep_posterior``: 8
  antithetic gradient passes, the step sizes of :data:`~pyro_bbt.verdict.DEFAULT_STEPS`, a
  parabola through the best three), the step taken when its estimated gain is positive.

After every chunk or step the posterior is scored by ``converge.py``'s evaluator (the
fixed-noise ELBO, ``--eval-draws`` antithetic draws, common random numbers, off the clock).
One process, one torch thread. Writes ``--out`` (JSON: the start, then each arm's points)::

    python benchmarks/ngsteps.py --problem small --seed 0 --seconds 60 --out figs/ngsteps-small-s0.json
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_common import positive_int  # noqa: E402
from converge import Evaluator, Problem, add_problem_arguments, load_problem, problem_from_args, recipe_for  # noqa: E402

from pyro_bbt.files import atomic_write_text  # noqa: E402
from pyro_bbt.fitting import FitRecipe, fit_posterior  # noqa: E402
from pyro_bbt.guides import start_from_posterior  # noqa: E402
from pyro_bbt.verdict import line_search_gain  # noqa: E402


def compare_arms(problem: Problem, preset: str, seed: int, start_epochs: int | None, seconds: float, points: int | None, factor: float,
                 chunk: int, eval_draws: int, out: Path | None = None) -> dict:
    """The measurement above; returns (and writes to ``out``) ``{"args", "start", "adam", "ng"}``."""
    data = load_problem(problem, preset=preset)
    evaluator = Evaluator(num_draws=eval_draws)
    model, guide = data.experiment.new_posterior(data.experiment.base_prior(), seed)
    recipe = recipe_for(data.experiment, data.num_data)
    clock = time.perf_counter()
    if start_epochs is None:
        fit = fit_posterior(model, guide, data.train, recipe, seed)
        start = {"epochs": fit.epochs, "converged": fit.converged}
    else:
        first = FitRecipe(lr=recipe.lr, scale_lr=recipe.scale_lr, batch_size=recipe.batch_size, epochs=start_epochs, kl_schedule=recipe.kl_schedule,
                          estimator=recipe.estimator, num_particles=recipe.num_particles, verdict=None)
        fit_posterior(model, guide, data.train, first, seed)
        start = {"epochs": start_epochs, "converged": None}
    start |= {"seconds": time.perf_counter() - clock, "elbo": evaluator.score(model, guide, data.train).elbo}
    record = {"args": {"problem": problem.name, "limit_train": problem.limit_train, "hidden": list(problem.hidden), "preset": preset, "seed": seed,
                       "start_epochs": start_epochs, "seconds": seconds, "points": points, "factor": factor, "chunk": chunk, "eval_draws": eval_draws},
              "start": start, "adam": [], "ng": []}
    state = {k: v.detach().clone() for k, v in guide.state_dict().items()}

    def run_arm(name: str, advance) -> None:
        guide.load_state_dict(state)
        elapsed, index = 0.0, 0
        while elapsed < seconds and (points is None or index < points):
            began = time.perf_counter()
            extra = advance(index, elapsed)
            elapsed += time.perf_counter() - began
            index += 1
            elbo = evaluator.score(model, guide, data.train).elbo
            record[name].append({"seconds": elapsed, "elbo": elbo, **extra})
            print(f"[ngsteps] {name} {elapsed:.1f} s: ELBO {elbo:,.1f} ({(elbo - start['elbo']) / data.num_data:+.4f} per example)", flush=True)
            if out is not None:
                atomic_write_text(out, json.dumps(record, indent=1))

    def adam_chunk(index: int, elapsed: float) -> dict:
        rate = factor if elapsed < seconds / 2 else factor / 3
        more = FitRecipe(lr=recipe.lr * rate, scale_lr=(recipe.scale_lr or recipe.lr) * rate, batch_size=recipe.batch_size, epochs=chunk,
                         kl_schedule=recipe.kl_schedule, estimator=recipe.estimator, num_particles=recipe.num_particles, verdict=None)
        fit_posterior(model, guide, data.train, more, seed + 1000 + index)
        return {"epochs": chunk * (index + 1), "factor": rate}

    def ng_step(index: int, elapsed: float) -> dict:
        gain = line_search_gain(model, guide, data.train, seed=seed * 1000 + index, keep_posterior=True)
        if gain.nats > 0:
            start_from_posterior(guide, gain.posterior)
        return {"step": gain.step, "estimated_gain": gain.nats}

    run_arm("adam", adam_chunk)
    run_arm("ng", ng_step)
    if out is not None:
        atomic_write_text(out, json.dumps(record, indent=1))
    return record


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    add_problem_arguments(parser)
    parser.add_argument("--start-epochs", type=positive_int, help="start the arms after this many epochs of Adam at the first rates, not at the pass")
    parser.add_argument("--seconds", type=float, default=60.0, help="wall time of each arm")
    parser.add_argument("--points", type=positive_int, help="at most this many chunks or steps per arm (tests)")
    parser.add_argument("--factor", type=float, default=0.3, help="adam: its rates, times the recipe's first rates (a third of it for the second half)")
    parser.add_argument("--chunk", type=positive_int, default=25, help="adam: epochs between two scores")
    parser.add_argument("--eval-draws", type=positive_int, default=8)
    parser.add_argument("--out", type=Path, required=True)
    args = parser.parse_args(argv)
    for name in ("seconds", "factor"):
        if not getattr(args, name) > 0:
            parser.error(f"--{name} must be > 0, got {getattr(args, name)}")
    problem = problem_from_args(args)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        compare_arms(problem, args.preset, args.seed, args.start_epochs, args.seconds, args.points, args.factor, args.chunk, args.eval_draws, args.out)
    finally:
        torch.set_num_threads(threads)
    return 0


if __name__ == "__main__":
    sys.exit(main())
