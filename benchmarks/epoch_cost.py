"""What the compiled step saves per epoch of Adam, at the minibatch shapes of the grid's fits.

``ExperimentConfig.compile`` (``--compile``) runs every Bayesian fit's Adam steps as one function
under ``torch.compile`` (:class:`~pyro_bbt.objectives.CompiledMeanFieldOps`, inductor's fused C++
around the matrix products): the eager fast path's steps to float rounding. What it buys a fit is
the seconds per epoch of Adam, in the fit and in its continuations; what it costs is a
compilation per process and minibatch shape. This bench measures both for the fits of the README
grid (784-400-400-5, mean field, prior N(0, 0.3^2), Adam at 1e-2 / 3e-2, uniform KL weights,
one torch thread; the shared head's shapes), each row on its own data and minibatch:

* ``b-0.01``: B's training split at 1 % (265 images of digits 5-9) in minibatches of 32;
* ``b-0.1``: B at 10 % (2,647 images), minibatches of 265;
* ``a``: task A's training split (27,537 images; q_A, and B at 100 % and joint alike), minibatches
  of 2,048 (``--a-images`` keeps the first N: the price of an epoch scales with its images).
* ``a-512``, ``a-8192``, ``a-full`` (not in the default ``--rows``): the same data in minibatches
  of 512, 8,192 and all 27,537 images: what an epoch costs at other minibatch sizes (the
  time-to-convergence issue's "larger or growing minibatches").

For ``R`` rounds (round ``r`` seeded ``--seed + r``), each row fits one fresh posterior (no
verdict) by a few epochs eagerly and as many compiled, then ``--epochs`` pairs of such calls, an eager
one and then a compiled one, each timed by the median of its epochs after its first (which holds
the call's setup), on the same posterior: the machine is shared, and a change of its load then
falls on both arms of a pair alike. The first compiled epoch of a row in the process holds the
compilation of its two shapes (the full and the last, shorter minibatch); ``compile_seconds`` is
that epoch's seconds minus the median of the row's later compiled epochs. Per row, over every
pair of every round: the median seconds of each arm and the median of the pairs' ratios
eager / compiled (the figure to read). The inductor cache is a fresh directory unless ``--cache-dir``
names one, so the compilation is measured cold (a second process with the same ``--cache-dir``
measures it warm)::

    python benchmarks/epoch_cost.py --rounds 3 --epochs 6 --out figs/epoch-cost.json
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import time
from dataclasses import dataclass

EPOCHS_PER_CALL = 4  # epochs per call of train: its first holds the call's setup, the other three are timed


@dataclass(frozen=True)
class Row:
    """One fit's shape: its data (task, fraction, how many images) and its minibatch."""

    name: str
    digits: tuple[int, ...]
    fraction: float
    batch_size: int


GRID_ROWS = {
    "b-0.01": Row("b-0.01", (5, 6, 7, 8, 9), 0.01, 32),
    "b-0.1": Row("b-0.1", (5, 6, 7, 8, 9), 0.1, 265),
    "a": Row("a", (0, 1, 2, 3, 4), 1.0, 2048),
    # q_A's epoch at other minibatches (not the grid's): what larger or growing minibatches would cost per epoch
    "a-512": Row("a-512", (0, 1, 2, 3, 4), 1.0, 512),
    "a-8192": Row("a-8192", (0, 1, 2, 3, 4), 1.0, 8192),
    "a-full": Row("a-full", (0, 1, 2, 3, 4), 1.0, 27537),
}
ROWS = ("b-0.01", "b-0.1", "a")  # the grid's shapes, the default


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python benchmarks/epoch_cost.py", description=__doc__.split("\n\n")[0])
    p.add_argument("--rows", default=",".join(ROWS), help=f"comma-separated subset of {', '.join(GRID_ROWS)} (default: {', '.join(ROWS)})")
    p.add_argument("--rounds", type=int, default=3, help="interleaved rounds (default 3)")
    p.add_argument("--epochs", type=int, default=10, help="pairs of calls (eager, compiled; 4 epochs each, 3 timed) per row and round, after the first of each (default 10)")
    p.add_argument("--a-images", type=int, default=None, help="row a: keep the first N of task A's training images (default: all)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--cache-dir", default=None, help="inductor's cache directory (default: a fresh one, so the compilation is cold)")
    p.add_argument("--out", default="epoch-cost.json")
    args = p.parse_args(argv)
    rows = tuple(r for r in args.rows.split(",") if r)
    unknown = [r for r in rows if r not in GRID_ROWS]
    if unknown or not rows:
        p.error(f"--rows {args.rows!r}: unknown {', '.join(unknown) or 'none given'}; allowed: {', '.join(GRID_ROWS)}")
    args.rows = rows
    if args.rounds < 1:
        p.error(f"--rounds must be at least 1, got {args.rounds}")
    if args.epochs < 1:
        p.error(f"--epochs must be at least 1, got {args.epochs}")
    if args.a_images is not None and args.a_images < 1:
        p.error(f"--a-images must be at least 1, got {args.a_images}")
    return args


def paired_epochs(row: Row, epochs: int, seed: int, a_images: int | None) -> dict[str, list[float]]:
    """Seconds per epoch of Adam on ``row``'s data, eager and compiled in turn on one posterior:
    one call of ``train`` (:data:`EPOCHS_PER_CALL` epochs, a fresh Adam) of each arm, whose first
    epoch's seconds (the compiled one compiling) are kept, then ``epochs`` pairs of calls, eager
    then compiled, each giving the median of its epochs after the first (which holds the call's
    setup): a change of the machine's load falls on both arms of a pair alike."""
    from pyro_bbt.data import Task, load_task
    from pyro_bbt.fitting import new_posterior
    from pyro_bbt.inference import TrainConfig, train
    from pyro_bbt.priors import GaussianPrior

    limit = a_images if row.name == "a" else None
    data = load_task(Task(digits=row.digits, fraction=row.fraction), limit_train=limit)
    model, guide = new_posterior((784, 400, 400, 5), GaussianPrior(0.3), "meanfield", init_scale=0.01, seed=seed)
    configs = {arm: TrainConfig(epochs=EPOCHS_PER_CALL, batch_size=row.batch_size, lr=1e-2, scale_lr=3e-2, kl_schedule="uniform", eval_samples=0,
                                progress=False, verdict=None, warn_unconverged=False, compile=arm == "compiled", seed=seed)
               for arm in ("eager", "compiled")}
    seconds: dict[str, list[float]] = {"eager": [], "compiled": []}
    for call in range(epochs + 1):
        for arm, config in configs.items():
            ends: list[float] = []
            start = time.perf_counter()
            train(model, guide, data.train, config, on_epoch=lambda _: ends.append(time.perf_counter()))
            epoch = [b - a for a, b in zip(ends[:-1], ends[1:])]  # the call's first epoch holds its setup (and the compilation)
            seconds[arm].append(ends[0] - start if call == 0 else statistics.median(epoch))
    return seconds


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    os.environ["TORCHINDUCTOR_CACHE_DIR"] = args.cache_dir or tempfile.mkdtemp(prefix="inductor-")
    import torch

    from pyro_bbt.files import atomic_write_json

    torch.set_num_threads(1)
    record: dict = {"command": "python benchmarks/epoch_cost.py " + " ".join(sys.argv[1:] if argv is None else argv),
                    "cache": "given" if args.cache_dir else "fresh", "rows": {}}
    runs: dict[str, list[dict[str, list[float]]]] = {r: [] for r in args.rows}
    for round_index in range(args.rounds):
        for name in args.rows:
            seconds = paired_epochs(GRID_ROWS[name], args.epochs, args.seed + round_index, args.a_images)
            runs[name].append(seconds)
            ratios = [e / c for e, c in zip(seconds["eager"][1:], seconds["compiled"][1:])]
            print(f"round {round_index + 1}, {name}: first epoch eager {seconds['eager'][0]:.2f} s, compiled {seconds['compiled'][0]:.2f} s; "
                  f"median of the pairs' ratios eager / compiled {statistics.median(ratios):.2f}", flush=True)
    for name in args.rows:
        pairs = [(e, c) for seconds in runs[name] for e, c in zip(seconds["eager"][1:], seconds["compiled"][1:])]
        first = runs[name][0]
        compiled = statistics.median(c for _, c in pairs)
        record["rows"][name] = {"batch_size": GRID_ROWS[name].batch_size, "fraction": GRID_ROWS[name].fraction, "pairs": len(pairs),
                                "seconds_per_epoch": {"eager": statistics.median(e for e, _ in pairs), "compiled": compiled},
                                "eager_over_compiled": statistics.median(e / c for e, c in pairs),
                                "compile_seconds": first["compiled"][0] - statistics.median(first["compiled"][1:]), "epochs": runs[name]}
    atomic_write_json(args.out, record)
    print(f"| fit | minibatch | pairs | s / epoch, eager | compiled | eager / compiled (median of pairs) | compilation (s, {record['cache']} cache) |")
    print("|---|---|---|---|---|---|---|")
    for name, row in record["rows"].items():
        s = row["seconds_per_epoch"]
        print(f"| {name} | {row['batch_size']} | {row['pairs']} | {s['eager']:.3f} | {s['compiled']:.3f} | {row['eager_over_compiled']:.2f}x | {row['compile_seconds']:.0f} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
