"""``python -m pyro_bbt.transfer``: the split-MNIST transfer and forgetting experiment.

Writes into ``--out DIR``: ``config.json``, ``results.json`` (schema in README.md),
``metrics.csv`` and the figures ``transfer_results.png``, ``forgetting.png`` and
``final_accuracy.png``. Bad arguments print one line on stderr and exit with code 2.
"""

from __future__ import annotations

import argparse
import sys
import time
from dataclasses import fields
from pathlib import Path

from .experiment import HEADS, METHODS, PRESETS, Q_INITS, ExperimentConfig, run_experiment
from .files import atomic_write_json, atomic_write_text
from .guides import GUIDES
from .kl_schedules import KL_SCHEDULES
from .objectives import ESTIMATORS

RESULT_FILES = ("config.json", "results.json", "metrics.csv")
CSV_COLUMNS = (
    "method", "fraction", "seed", "steps", "status", "b_test_accuracy", "b_test_nll", "b_test_ece",
    "a_test_after_accuracy", "backward_transfer", "forward_transfer", "seconds",
)


class UsageError(ValueError):
    """Bad command-line input: reported in one line, exit code 2."""


def _ints(text: str) -> tuple[int, ...]:
    try:
        return tuple(int(t) for t in text.split(",") if t.strip())
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated integers, got {text!r}") from None


def _floats(text: str) -> tuple[float, ...]:
    try:
        return tuple(float(t) for t in text.split(",") if t.strip())
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated numbers, got {text!r}") from None


def _names(text: str) -> tuple[str, ...]:
    return tuple(t.strip() for t in text.split(",") if t.strip())


class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> None:  # one line, exit 2, no usage dump
        self.exit(2, f"{self.prog}: error: {message}\n")


def build_parser() -> argparse.ArgumentParser:
    p = _Parser(prog="python -m pyro_bbt.transfer", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--preset", choices=sorted(PRESETS), default="quick", help="quick (default, minutes on 2 cores) or paper (full protocol); flags below override it")
    p.add_argument("--task-a", type=_ints, help="digits of task A, e.g. 0,1,2,3,4")
    p.add_argument("--task-b", type=_ints, help="digits of task B, e.g. 5,6,7,8,9 (disjoint from A)")
    p.add_argument("--methods", type=_names, help=f"comma list of {', '.join(METHODS)}")
    p.add_argument("--guide", help=f"variational family: {', '.join(GUIDES)}")
    p.add_argument("--estimator", help=f"ELBO estimator: {', '.join(ESTIMATORS)} or auto")
    p.add_argument("--kl-schedule", help=f"KL weight per minibatch: {', '.join(KL_SCHEDULES)}")
    p.add_argument("--epochs", type=int, help="B's budget in epochs of its training data (see --min-steps)")
    p.add_argument("--epochs-a", type=int, help="epochs on task A")
    p.add_argument("--min-steps", type=int, help="minimum optimisation steps on B, whatever the fraction")
    p.add_argument("--fractions", type=_floats, help="fractions of B's training data, e.g. 0.01,0.1,0.5,1")
    p.add_argument("--seeds", type=_ints, help="seeds, e.g. 0,1,2")
    p.add_argument("--head", help=f"output layer: {', '.join(HEADS)}")
    p.add_argument("--q-init", help=f"start of q_B for transfer: {', '.join(Q_INITS)}")
    p.add_argument("--prior-scale", type=float, help="sigma of the N(0, sigma^2) prior")
    p.add_argument("--tau", type=float, help="broadening of the transferred prior's scales (>= 1)")
    p.add_argument("--init-scale", type=float, help="initial posterior standard deviation")
    p.add_argument("--lr", type=float, help="Adam learning rate")
    p.add_argument("--batch-size", type=int, help="minibatch size")
    p.add_argument("--num-particles", type=int, help="Monte Carlo samples per step")
    p.add_argument("--ewc-lambda", type=float, help="EWC penalty strength lambda")
    p.add_argument("--hidden", type=_ints, help="hidden widths, e.g. 400,400")
    p.add_argument("--eval-samples", type=int, help="posterior samples for the final evaluation")
    p.add_argument("--limit-train", type=int, help="cap on training images per task (smoke tests)")
    p.add_argument("--limit-eval", type=int, help="cap on validation/test images per task (smoke tests)")
    p.add_argument("--device", help="torch device, e.g. cpu or cuda")
    p.add_argument("--out", type=Path, default=Path("runs/transfer"), help="output directory (default runs/transfer)")
    p.add_argument("--overwrite", action="store_true", help="replace results already in --out")
    p.add_argument("--quiet", action="store_true", help="no progress lines")
    return p


def config_from_args(args: argparse.Namespace) -> ExperimentConfig:
    values = dict(PRESETS[args.preset])
    for f in fields(ExperimentConfig):
        given = getattr(args, f.name, None)
        if given is not None:
            values[f.name] = given
    try:
        return ExperimentConfig(**values)
    except (TypeError, ValueError) as error:
        raise UsageError(str(error)) from None


def write_csv(path: Path, units: list[dict]) -> None:
    lines = [",".join(CSV_COLUMNS)]
    for u in units:
        row = {
            **{k: u.get(k) for k in ("method", "fraction", "seed", "steps", "status", "backward_transfer", "forward_transfer", "seconds")},
            "b_test_accuracy": u["b_test"]["accuracy"],
            "b_test_nll": u["b_test"]["nll"],
            "b_test_ece": u["b_test"]["ece"],
            "a_test_after_accuracy": u["a_test_after"]["accuracy"],
        }
        lines.append(",".join("" if row[c] is None else str(row[c]) for c in CSV_COLUMNS))
    atomic_write_text(path, "\n".join(lines) + "\n")


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        config = config_from_args(args)
        existing = [name for name in RESULT_FILES if (args.out / name).exists()]
        if existing and not args.overwrite:
            raise UsageError(f"{args.out} already holds results ({', '.join(existing)}); pass --overwrite or choose another --out")
        if args.out.exists() and not args.out.is_dir():
            raise UsageError(f"--out {args.out} exists and is not a directory")
    except UsageError as error:
        print(f"{parser.prog}: error: {error}", file=sys.stderr)
        return 2

    from .plots import save_all  # matplotlib only when there is something to plot

    log = (lambda message: None) if args.quiet else (lambda message: print(message, flush=True))
    start = time.perf_counter()
    results = run_experiment(config, log=log)
    results["seconds"] = time.perf_counter() - start
    args.out.mkdir(parents=True, exist_ok=True)
    atomic_write_json(args.out / "config.json", {"preset": args.preset, **config.to_dict()})
    atomic_write_json(args.out / "results.json", results)
    write_csv(args.out / "metrics.csv", results["units"])
    figures = save_all(results, args.out)
    log(f"done in {results['seconds']:.0f} s: {args.out / 'results.json'}, {args.out / 'metrics.csv'}, " + ", ".join(str(p) for p in figures))
    return 0


if __name__ == "__main__":
    sys.exit(main())
