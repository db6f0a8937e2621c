"""Do more weight draws per step speed a long B fit's drift? A running unit, continued both ways.

``converge.py --experiment num_particles=4`` showed, on the small problem, that four draws per
step reach the verdict in fewer epochs, at the same time, and higher. Here the question is asked
of a real B fit deep in its continuations (a unit of ``python -m pyro_bbt.transfer`` still
running, read from its checkpoint as ``verdict_draws.py`` does): from the posterior at the start
of its running continuation (the end of a phase at the continuation's lowest rate, so neither
arm starts jittered), each arm ``P`` of ``--particles`` continues for ``--epochs`` epochs with a
fresh Adam at ``--factor`` times the run's continuation base rates (the unit's own minibatch,
estimator and KL schedule, no verdict), and every ``--score-every`` epochs the fixed-noise ELBO
(:func:`pyro_bbt.fixed_noise.posterior_elbo`: ``--draws`` antithetic draws, the same noise for every
arm and point, so differences are paired) is recorded against the epochs and the seconds spent
training (scoring off the clock); at the start and the end of each arm, B's test accuracy and NLL
(the posterior predictive with the run's ``eval_samples`` draws, seeded alike for every arm).
One thread::

    python benchmarks/particles.py runs/cont10-scratch-s1 scratch-f0.1-s1 --particles 1,4 --epochs 600 --out figs/particles-b10-s1.json
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
from verdict_draws import open_unit, unit_parser  # noqa: E402

from pyro_bbt.elbo_gradient import read_posterior  # noqa: E402
from pyro_bbt.files import atomic_write_text  # noqa: E402
from pyro_bbt.fitting import FitRecipe, fit_posterior  # noqa: E402
from pyro_bbt.fixed_noise import posterior_elbo  # noqa: E402
from pyro_bbt.rejudge import judged_unit  # noqa: E402
from pyro_bbt.runstore import RunStore  # noqa: E402
from pyro_bbt.units import bayesian_metrics, load_task_pair  # noqa: E402


def _particle_list(text: str) -> list[int]:
    try:
        values = [int(v) for v in text.split(",")]
    except ValueError:
        values = []
    if not values or any(v < 1 for v in values):
        raise argparse.ArgumentTypeError(f"--particles must be a comma-separated list of integers >= 1, got {text!r}")
    return values


def start_state(run_dir: Path, key: str) -> dict:
    """The guide state at the start of the unit's running continuation."""
    config, saved, _spec = judged_unit(run_dir, key)
    payload = RunStore(run_dir, saved).checkpoint(key)
    continuation = (payload or {}).get("train_state", {}).get("continuation")
    if not continuation:
        raise ValueError(f"{run_dir}: {key} is not inside a continuation (its checkpoint has no continuation's start)")
    return continuation["guide_state"]


def b_test_metrics(model, guide, test, samples: int, head: int, seed: int) -> dict:
    """B's test accuracy and NLL through ``head`` (``samples`` posterior draws, torch seeded with
    ``seed`` inside and its state restored)."""
    with torch.random.fork_rng():
        torch.manual_seed(seed)
        metrics = bayesian_metrics(model, guide, test, samples, head)
    return {"accuracy": metrics.accuracy, "nll": metrics.nll}


def continue_arm(model, guide, state: dict, split, recipe: FitRecipe, particles: int, epochs: int, score_every: int, draws: int,
                 seed: int) -> list[dict]:
    """Load ``state``, fit ``epochs`` epochs of ``recipe`` with ``particles`` draws per step, and
    score the fixed-noise ELBO at the start and every ``score_every`` epochs (and at the end)."""
    guide.load_state_dict(state)
    points = [{"epoch": 0, "seconds": 0.0, "elbo": posterior_elbo(model, read_posterior(guide), split, num_draws=draws, seed=seed)}]
    clock = {"train": 0.0, "since": time.perf_counter(), "epoch": 0}

    def on_epoch(_) -> None:
        clock["train"] += time.perf_counter() - clock["since"]
        clock["epoch"] += 1
        if clock["epoch"] % score_every == 0 or clock["epoch"] == epochs:
            elbo = posterior_elbo(model, read_posterior(guide), split, num_draws=draws, seed=seed)
            points.append({"epoch": clock["epoch"], "seconds": clock["train"], "elbo": elbo})
            print(f"[particles] P = {particles}, epoch {clock['epoch']}: ELBO {elbo:,.1f} after {clock['train']:.1f} s", flush=True)
        clock["since"] = time.perf_counter()

    arm = FitRecipe(lr=recipe.lr, scale_lr=recipe.scale_lr, batch_size=recipe.batch_size, epochs=epochs, num_particles=particles,
                    estimator=recipe.estimator, kl_schedule=recipe.kl_schedule, verdict=None)
    fit_posterior(model, guide, split, arm, seed, on_epoch=on_epoch)
    return points


def main(argv: list[str] | None = None) -> int:
    parser = unit_parser(__doc__.split("\n\n")[0])
    parser.add_argument("--particles", type=_particle_list, default=[1, 4], help="comma-separated draws per step, one arm each (default 1,4)")
    parser.add_argument("--epochs", type=positive_int, default=600)
    parser.add_argument("--factor", type=float, default=0.1, help="times the run's continuation base rates (default 0.1: its lowest rate)")
    parser.add_argument("--score-every", type=positive_int, default=50)
    parser.add_argument("--draws", type=positive_int, default=16)
    args = parser.parse_args(argv)
    if not args.factor > 0:
        parser.error(f"--factor must be a number > 0, got {args.factor}")
    torch.set_num_threads(1)
    unit = open_unit("particles", args.run_dir, args.key)
    if unit is None:
        return 2
    model, guide, start, split, _tol, (start_epoch, epoch) = unit
    if start is None:
        print(f"particles: {args.run_dir}: {args.key} is not inside a continuation (its checkpoint has no continuation's start)", file=sys.stderr)
        return 2
    state = start_state(args.run_dir, args.key)
    config, _saved, spec = judged_unit(args.run_dir, args.key)
    own = config.recipe_b_converged(len(split))
    base_lr, base_scale = config.continuation_base or (own.lr, own.scale_lr or own.lr)
    recipe = FitRecipe(lr=args.factor * base_lr, scale_lr=args.factor * base_scale, batch_size=own.batch_size, epochs=1,
                       estimator=own.estimator, kl_schedule=own.kl_schedule, verdict=None)
    record: dict = {"run": str(args.run_dir), "key": args.key, "start_epoch": start_epoch, "checkpoint_epoch": epoch, "num_data": len(split),
                    "lr": recipe.lr, "scale_lr": recipe.scale_lr, "batch_size": recipe.batch_size, "epochs": args.epochs, "draws": args.draws,
                    "arms": []}
    print(f"{args.key}: from the continuation's start at epoch {start_epoch}, {args.epochs} epochs at lr {recipe.lr:g} "
          f"(widths {recipe.scale_lr:g}), minibatches of {recipe.batch_size}")
    test = load_task_pair(config, spec.fraction, spec.seed).b.test
    guide.load_state_dict(state)
    record["start_test"] = b_test_metrics(model, guide, test, config.eval_samples, config.b_head, args.seed)
    for particles in args.particles:
        points = continue_arm(model, guide, state, split, recipe, particles, args.epochs, args.score_every, args.draws, args.seed)
        record["arms"].append({"particles": particles, "points": points,
                               "end_test": b_test_metrics(model, guide, test, config.eval_samples, config.b_head, args.seed)})
        if args.out is not None:
            atomic_write_text(args.out, json.dumps(record, indent=1))
    for arm in record["arms"]:
        first, last = arm["points"][0], arm["points"][-1]
        print(f"P = {arm['particles']}: ELBO {first['elbo']:,.1f} -> {last['elbo']:,.1f} ({last['elbo'] - first['elbo']:+.1f}) "
              f"in {last['epoch']} epochs, {last['seconds']:.1f} s; B test accuracy {record['start_test']['accuracy']:.4f} -> "
              f"{arm['end_test']['accuracy']:.4f}, NLL {record['start_test']['nll']:.4f} -> {arm['end_test']['nll']:.4f}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
