"""How noisy are the verdict's scores on a real fit, and what do added draws change?

The verdict decides twice by a score with a standard error: the line search's best step
(``(gain + 2 stderr) / N <= tol``, 2 antithetic draws per step) and, after a pass, each
continuation (8 draws). The standard error is ``sqrt(sum_n s_n^2 / D)`` over ``D`` draws: where
it is comparable to ``tol N`` (small data, broad posteriors) a fit that has stopped gaining is
rejected until one draw of the evaluator falls low enough. ``VerdictConfig.max_draws`` adds
draws where a score cannot decide (:func:`pyro_bbt.fixed_noise.continuation_gain`, "Added draws").

This bench reads a unit's train checkpoint in a run of ``python -m pyro_bbt.transfer`` (a
scratch, transfer or finetune unit on B, still running: a finished unit has no checkpoint) and,
on one thread:

* judges its current posterior ``--judgements`` times (verdict seeds ``--seed + k``), each time
  as the run does (``max_draws`` 0) and with ``max_draws = --max-draws``: the gain, its standard
  error, the upper bound, the draws, whether it passes, the seconds;
* where the checkpoint is inside a continuation, scores the continuation so far (its start
  against the current posterior) with ``D`` = 8, 16, ..., ``--max-draws`` draws (not with
  ``--no-ladder``) and with the added draws, ``--judgements`` times each with noise of its own.

::

    python benchmarks/verdict_draws.py runs/cont10-scratch-s1 scratch-f0.1-s1 --max-draws 256 --out figs/verdict-draws-b10-s1.json
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_common import positive_int  # noqa: E402

from pyro_bbt.elbo_gradient import read_posterior  # noqa: E402
from pyro_bbt.files import atomic_write_text  # noqa: E402
from pyro_bbt.fixed_noise import ADDED_DRAWS_STDERR_FRACTION, continuation_gain  # noqa: E402
from pyro_bbt.rejudge import judged_unit  # noqa: E402
from pyro_bbt.runstore import RunStore  # noqa: E402
from pyro_bbt.units import load_task_pair, stage_prior, use_head  # noqa: E402
from pyro_bbt.verdict import judge  # noqa: E402


def load_unit(run_dir: Path, key: str):
    """``(model, guide, continuation_start, split, tol, epochs)``: the unit's model under its prior
    with B's head on and its guide at the checkpoint's posterior, the running continuation's start
    posterior (``None`` outside one), B's training split, the run's tolerance and ``(continuation
    start epoch or None, current epoch)``."""
    config, saved, spec = judged_unit(run_dir, key)
    store = RunStore(run_dir, saved)  # checks each file's format, key and configuration
    payload = store.checkpoint(key)
    if payload is None:
        raise ValueError(f"{run_dir} holds no checkpoint of {key} (a unit in progress has one; a finished one no longer)")
    state = payload["train_state"]
    prior = stage_prior(store.stage(spec.needs)) if spec.method == "transfer" else config.base_prior()
    model, guide = config.new_posterior(prior, spec.seed)
    use_head(model, config.b_head)
    continuation = state.get("continuation")
    start = None
    if continuation:
        guide.load_state_dict(continuation["guide_state"])
        start = read_posterior(guide)
    guide.load_state_dict(state["guide_state"])
    split = load_task_pair(config, spec.fraction, spec.seed).b.train
    return model, guide, start, split, config.verdict_tol, (continuation["start_epoch"] if continuation else None, state["epoch"])


def unit_parser(description: str) -> argparse.ArgumentParser:
    """The checkpoint-reading benches' common arguments: ``RUN_DIR KEY [--seed S] [--out FILE]``."""
    parser = argparse.ArgumentParser(description=description)
    parser.add_argument("run_dir", type=Path)
    parser.add_argument("key", help="the unit, e.g. scratch-f0.1-s1")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", type=Path)
    return parser


def open_unit(prog: str, run_dir: Path, key: str):
    """:func:`load_unit`, or ``None`` after one line on stderr, ``PROG: what is wrong`` (the
    caller exits with 2): the checkpoint-reading benches share this opening."""
    try:
        return load_unit(run_dir, key)
    except (ValueError, FileNotFoundError) as error:
        print(f"{prog}: {error}", file=sys.stderr)
        return None


def _judgements(model, guide, split, tol: float, repeats: int, seed: int, max_draws: int) -> list[dict]:
    out = []
    for k in range(repeats):
        clock = time.perf_counter()
        verdict = judge(model, guide, split, tol_per_datum=tol, seed=seed + k, max_draws=max_draws)
        gain = verdict.gain
        out.append({"nats": gain.nats, "stderr": gain.stderr, "upper_per_datum": verdict.gain_upper_per_datum, "step": gain.step,
                    "draws": gain.rescored["draws"] if gain.rescored else None, "passes": verdict.converged,
                    "seconds": time.perf_counter() - clock})
    return out


def main(argv: list[str] | None = None) -> int:
    parser = unit_parser(__doc__.split("\n\n")[0])
    parser.add_argument("--max-draws", type=positive_int, default=256)
    parser.add_argument("--judgements", type=positive_int, default=3)
    parser.add_argument("--no-ladder", action="store_true", help="score the continuation with the added draws only, not with 8, 16, ..., --max-draws")
    args = parser.parse_args(argv)
    torch.set_num_threads(1)
    unit = open_unit("verdict_draws", args.run_dir, args.key)
    if unit is None:
        return 2
    model, guide, start, split, tol, (start_epoch, epoch) = unit
    n = len(split)
    print(f"{args.key} at epoch {epoch}: N = {n}, tol = {tol} per example ({tol * n:.2f} nats); "
          f"added draws stop at stderr <= {ADDED_DRAWS_STDERR_FRACTION * tol * n:.2f} nats")
    record: dict = {"run": str(args.run_dir), "key": args.key, "epoch": epoch, "num_data": n, "tol_per_datum": tol,
                    "stderr_fraction": ADDED_DRAWS_STDERR_FRACTION, "max_draws": args.max_draws}
    for name, max_draws in (("judgements", 0), ("judgements_added", args.max_draws)):
        record[name] = _judgements(model, guide, split, tol, args.judgements, args.seed, max_draws)
        print(f"line search, max_draws {max_draws}: " + "; ".join(
            f"{j['nats']:+.1f} ± {j['stderr']:.1f} nats (upper {j['upper_per_datum']:.4f}, {j['draws'] or 2} draws, "
            f"{'passes' if j['passes'] else 'fails'}, {j['seconds']:.1f} s)" for j in record[name]))
    if start is not None:
        end = read_posterior(guide)
        record["continuation"] = {"start_epoch": start_epoch, "fixed": [], "added": []}
        draws = 8
        while draws <= args.max_draws and not args.no_ladder:
            scores = []
            for r in range(args.judgements):
                clock = time.perf_counter()
                gain = continuation_gain(model, start, end, split, num_draws=draws, seed=args.seed + 1000 * r)
                scores.append({"nats": gain.nats, "stderr": gain.stderr, "upper_per_datum": gain.upper_per_datum, "seconds": time.perf_counter() - clock})
            record["continuation"]["fixed"].append({"draws": draws, "scores": scores})
            uppers = ", ".join(f"{s['upper_per_datum']:.4f}" for s in scores)
            print(f"continuation {start_epoch}-{epoch}, D = {draws:>5}: nats " + ", ".join(f"{s['nats']:+.1f} ± {s['stderr']:.1f}" for s in scores)
                  + f"; upper/N {uppers}; s {statistics.median(s['seconds'] for s in scores):.1f}")
            draws *= 2
        for r in range(args.judgements):
            clock = time.perf_counter()
            gain = continuation_gain(model, start, end, split, num_draws=8, seed=args.seed + 1000 * r, max_draws=args.max_draws, tol_per_datum=tol)
            record["continuation"]["added"].append({"draws": gain.draws, "nats": gain.nats, "stderr": gain.stderr, "upper_per_datum": gain.upper_per_datum,
                                                    "passes": gain.upper_per_datum <= tol, "seconds": time.perf_counter() - clock})
        print("continuation, added draws: " + "; ".join(
            f"{a['draws']} draws, {a['nats']:+.1f} ± {a['stderr']:.1f}, upper/N {a['upper_per_datum']:.4f} "
            f"({'passes' if a['passes'] else 'fails'}), {a['seconds']:.1f} s" for a in record["continuation"]["added"]))
    if args.out is not None:
        atomic_write_text(args.out, json.dumps(record, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
