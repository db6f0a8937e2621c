"""``python -m pyro_bbt.transfer``: the split-MNIST transfer and forgetting experiment.

Writes into ``--out DIR``: ``config.json``, ``results.json`` (schema in docs/experiment.md),
``metrics.csv``, ``timing.json`` and the figures ``transfer_results.png``, ``forgetting.png``
and ``final_accuracy.png``. ``--sequence split --scenario task|domain|class`` runs the five
tasks of split MNIST instead (:mod:`pyro_bbt.split_sequence`, with its own ``--preset`` values)
and writes ``config.json``, ``results.json``, ``timing.json``, ``split_mnist.md``,
``split_mnist.png`` and ``sequence.png``; ``--sequence rotations|permutations`` runs the chain of
four rotated or permuted copies of task A (:mod:`pyro_bbt.chain_sequence`) and writes
``config.json``, ``results.json``, ``timing.json`` and ``sequence.png``. Progress (finished units,
per-epoch checkpoints) is kept under ``DIR/units``, ``DIR/stages`` and ``DIR/checkpoints``;
``--resume`` continues an interrupted run, whatever the mode; for the A -> B grid it may also
name other ``--methods``, ``--fractions`` or ``--seeds`` (every other setting the same), and the
stored fits are reused: a converged q_A is not fitted again to add a fraction. It may also
raise ``--max-epochs-a`` / ``--max-epochs-b``: fits in progress and to come run to the new cap (and
under ``--sequence split`` a fit that ended at the old cap runs on, with the tasks after it).

Units run one after another in this process (``--executor serial``, the default), in a pool
of ``--workers N`` local processes (``--executor processes``), or as Ray tasks, at most
``--workers N`` at a time, on a local Ray or on the cluster at ``--ray-address``
(``--executor ray``, needs ``pip install -e ".[ray]"``; a unit whose worker process or node
dies is run again, on any node, up to ``--ray-retries`` times); this process alone writes
``--out``, and the workers return their results to it. Every unit runs with ``--threads-per-unit`` torch
threads (default 1) whatever the executor, because torch's float results depend on the number
of threads.

Exit codes: 0 done; 1 done, but some units failed (NaN/inf, an error, a worker process that
died, or a Ray task that died more than ``--ray-retries`` times; see ``results.json``); 2 bad input, or ``--executor ray`` without Ray or with
a cluster that cannot run the units (nothing written). ``results.json`` holds no wall-clock times (they are in
``timing.json``), so the same seeds, configuration and ``--threads-per-unit`` give an identical
file whatever the executor and number of workers.
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
import time
from collections.abc import Callable
from dataclasses import fields
from pathlib import Path

from .executors import EXECUTORS, Executor, ExecutorUnavailableError, make_executor
from .ray_executor import DEFAULT_MAX_RETRIES
from .convergence import ELBO_TESTS
from .data import SCALINGS
from .chain_sequence import SEQUENCE_METHODS
from .config import B_ONLY_FIELDS, CAP_FIELDS, GRID_FIELDS, PRECISION_FIELDS, RAISABLE_FIELDS, RUN_FIELDS
from .experiment import HEADS, METHODS, PRESETS, PRIORS, Q_INITS, SEQUENCES, ExperimentConfig, run_experiment, run_sequence
from .split_sequence import (CORESETS, FITS, JOINTS, MEAN_INITS, SCENARIOS, SPLIT_METHODS, SPLIT_PRESETS, STARTS, SplitConfig, check_split_methods,
                             check_split_ewc, check_split_protocol, load_split_task, split_tasks)
from .files import atomic_write, atomic_write_json, atomic_write_text
from .runstore import RunStore, config_differences, differing_fields, disallowed_differences
from .verdict import OVERRULES
from .guides import FLOW_GUIDES, GUIDES
from .kl_schedules import KL_SCHEDULES
from .objectives import ESTIMATORS
from .inference import PRECONDITIONERS

RESULT_FILES = ("config.json", "results.json", "metrics.csv", "timing.json")
PROGRESS_DIRS = ("units", "stages", "checkpoints")
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


def _floats_or_none(text: str) -> tuple[float, ...] | str:
    return "none" if text.strip().lower() == "none" else _floats(text)


def _int_or_none(text: str) -> int | str:
    if text.strip().lower() == "none":
        return "none"
    try:
        return int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected an integer or none, got {text!r}") from None


def _float_or_none(text: str) -> float | str:
    if text.strip().lower() == "none":
        return "none"
    try:
        return float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number or none, got {text!r}") from None


def _int_at_least(minimum: int) -> Callable[[str], int]:
    """``argparse`` type: an integer >= ``minimum``, else one line naming the value."""

    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            value = None
        if value is None or value < minimum:
            raise argparse.ArgumentTypeError(f"expected an integer >= {minimum}, got {text!r}")
        return value

    return parse


_positive_int, _nonnegative_int = _int_at_least(1), _int_at_least(0)


def _gpu_fraction(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        value = float("nan")
    if not (0 < value <= 1 or (value > 1 and value == int(value))):
        raise argparse.ArgumentTypeError(f"expected a fraction in (0, 1] or a whole number of GPUs, got {text!r}")
    return value


def _names(text: str) -> tuple[str, ...]:
    return tuple(t.strip() for t in text.split(",") if t.strip())


class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> None:  # one line, exit 2, no usage dump
        self.exit(2, f"{self.prog}: error: {message}\n")


def build_parser() -> argparse.ArgumentParser:
    p = _Parser(prog="python -m pyro_bbt.transfer", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--preset", choices=sorted(set(PRESETS) | set(SPLIT_PRESETS)), default="quick", help="quick (default, minutes on 2 cores), paper (full protocol, the README's answer: every fit to the verdict and its continuation "
                        "under N(0, 0.3^2), B's fits polished, caps 12,000 / 20,000 epochs, EWC by early stopping, 1 %%, 10 %% and 100 %% of B, seeds 0-2), "
                        "paper-v5 (paper until 2026-12-07: N(0, 1), 50 %% of B too, caps 3,000), paper-v4 (paper-v5 with 8 draws per continuation), "
                        "paper-v3 (paper before EWC's early stopping), paper-v2 (before the continuation) or paper-v1 (until 2026-12-04: two-point ELBO "
                        "test, drop overrule, no confirmation); with --sequence split also vcl and vcl-swaroop (Nguyen et al. 2018's and Swaroop "
                        "et al. 2019's published split-MNIST runs); flags below override it")
    p.add_argument("--task-a", type=_ints, help="digits of task A, e.g. 0,1,2,3,4")
    p.add_argument("--task-b", type=_ints, help="digits of task B, e.g. 5,6,7,8,9 (disjoint from A)")
    p.add_argument("--methods", type=_names, help=f"comma list of {', '.join(METHODS)}")
    p.add_argument("--guide", help=f"variational family: {', '.join(GUIDES)}")
    p.add_argument("--estimator", help=f"ELBO estimator: {', '.join(ESTIMATORS)} or auto")
    p.add_argument("--kl-schedule", help=f"KL weight per minibatch: {', '.join(KL_SCHEDULES)}")
    p.add_argument("--kl-beta", type=float, help="the KL's weight beta in every Bayesian fit's objective, E log p(D|w) - beta KL(q||p) (default 1, the ELBO; below 1 a tempered posterior, judged by the rule and the verdict on that objective; pair with --tau beta^-1/2 to undo the narrower variances a transferred prior inherits)")
    p.add_argument("--epochs", type=int, help="B's budget in epochs of its training data (see --min-steps)")
    p.add_argument("--epochs-a", type=int, help="epochs on task A: the minimum when --max-epochs-a is set, else exactly this many")
    p.add_argument("--max-epochs-a", type=_int_or_none, help="fit q_A until the stopping rule holds, at most this many epochs (12000 in the paper preset, 3000 in paper-v5); none: exactly --epochs-a")
    p.add_argument("--rel-tol", type=float, help="stopping rule: relative ELBO gain over the last --window epochs below which the ELBO has converged")
    p.add_argument("--scale-tol", type=float, help="stopping rule: largest |log| change per epoch of every weight site's median sigma")
    p.add_argument("--fit-b", choices=("fixed", "rule"), help="how every Bayesian fit on B (scratch, transfer, finetune, joint) is made: fixed, the same budget of steps for all (--epochs, --min-steps at --lr; the paper preset's until now); rule, each to convergence by q_A's rule, rates and verdict, in minibatches of about a tenth of its data (EWC's nets: the fixed budget, or early stopping with --ewc-patience)")
    p.add_argument("--verdict-tol", type=_float_or_none, help="convergence verdict: the nats per training example the ELBO may still be able to gain (estimated from independent full-data gradients, whatever the step size) for a fit to count as converged; under the stopping rule a fit goes on (--overrule) until it holds (default 0.01); none: the rule's criteria alone, which a slow step can fool (to reproduce fixed-budget regimes only)")
    p.add_argument("--window", type=int, help="stopping rule: epochs over which both criteria must hold")
    p.add_argument("--elbo-test", help=f"stopping rule: how the ELBO is told to have stopped rising, {' or '.join(ELBO_TESTS)} (two-point: --rel-tol between two epochs --window apart; means: the last --window epochs' mean not two standard errors above the --window before; schedule: neither, the rates fall after every --window epochs and the verdict alone judges the fit); default two-point, means in the paper preset")
    p.add_argument("--overrule", help=f"what a fit the verdict rejects does, {' or '.join(OVERRULES)} (drop: its rates once more; restart: from the first rates, the rule's drops renewed); default drop, restart in the paper presets")
    p.add_argument("--max-overrules", type=int, help="how many times the verdict may overrule the rule's stop (default 3, 60 in the paper presets)")
    p.add_argument("--confirm-verdict", action=argparse.BooleanOptionalAction, help="a fit passes the verdict only when a second judgement, with noise of its own, passes too (a fit judged at every overrule otherwise passes on the first judgement whose noise falls low enough); on in the paper presets, --no-confirm-verdict turns it off")
    p.add_argument("--continuation-epochs", type=int, help="convergence verdict: a pass counts only when the fit, continued this many epochs or more (--continuation-fraction) at --continuation-rates times its first rates, raises its fixed-noise ELBO by at most --verdict-tol per example; a continuation that gains more is followed by another; 0 (default): off")
    p.add_argument("--continuation-fraction", type=float, help="with --continuation-epochs: each continuation lasts at least this fraction of the epochs so far (1: the fit doubles, so a pass says its last half gained at most --verdict-tol); default 0")
    p.add_argument("--continuation-average", action=argparse.BooleanOptionalAction, help="with --continuation-epochs: a continuation's end is the average of the guide's parameters over its epochs at the last rate (tail averaging), not its last iterate; default off")
    p.add_argument("--continuation-checks", type=int, help="with --continuation-epochs: score each continuation this many times on the way and reject it as soon as it has certainly gained more than the tolerance (its point the next start); a pass still needs a whole continuation; default 0 (off)")
    p.add_argument("--continuation-max-draws", type=int, help="with --continuation-epochs: where a continuation's score is too noisy to decide (two standard errors above half of --verdict-tol, its lower bound not above it), add draws of its evaluator, doubling them, up to this many (its first 8 always); on small data the evaluator's noise alone can exceed the tolerance; default 0 (off)")
    p.add_argument("--rescore-max-draws", type=int, help="score the line search's best step again with 8 draws of its own (not those that chose it), adding draws as --continuation-max-draws does, up to this many; the judgement's gain is that score; default 0 (off: the search's own score)")
    p.add_argument("--checkpoint-seconds", type=float, help="save a fit in progress at most once in this many seconds (a resume redoes at most that much; what the run computes does not depend on it, and --resume may change it); default 0: after every epoch, 60 in the paper presets")
    p.add_argument("--continuation-particles-b", type=int, help="with --fit-b rule and --continuation-epochs: weight draws per step in the continuations that confirm a pass of a fit on B (or joint's); the fit itself keeps --num-particles; a continuation that draws once per step can stall on the fit's own noise floor, so more draws ask whether a less noisy step would still gain (each continuation epoch costs about this many times as much); q_A's continuations keep --num-particles; default: --num-particles")
    p.add_argument("--polish-steps-b", type=int, help="with --fit-b rule: where the verdict rejects a fit on B (or joint's) at the rule's stop, first take up to this many of the verdict's own steps (full-data whitened natural gradient with its line search, until two in a row each gain less than half of --verdict-tol), then judge again; the continuation still confirms a pass; q_A's fit never takes them; default 0 (off), 30 in the paper preset")
    p.add_argument("--fast-polish", action=argparse.BooleanOptionalAction, help="with --polish-steps-b: each of the verdict's own steps takes its mean gradient in one vectorised pass of all its draws (the same distribution) and stops the whitening's conjugate gradients at a relative residual of 1e-3 (not 40 iterations): cheaper where B's data are few; a step of another random stream, so a fit is not the one made without it; default off")
    p.add_argument("--compile", action=argparse.BooleanOptionalAction, help="every Bayesian fit's Adam steps (one weight draw, local estimator, Gaussian prior) run under torch.compile (inductor's fused C++): 1.08-1.31x cheaper per epoch on this machine after 28-48 s of compilation per worker process and minibatch shape (an empty inductor cache) (benchmarks/epoch_cost.py); the same steps to float rounding, so a long fit's path is not the eager one's; default off")
    p.add_argument("--continuation-rates", type=_floats, help="with --continuation-epochs: the continuation's factors on the first rates (or on --continuation-base), in equal parts; default 0.3,0.1")
    p.add_argument("--continuation-base", type=_floats_or_none, help="with --continuation-epochs: LR,SCALE_LR, the locations' and the widths' rates that --continuation-rates multiply for every fit, whatever its own rates, so the confirmation does not depend on the recipe (the paper presets: 0.01,0.03); none: each fit's own first rates (the default)")
    p.add_argument("--precondition-b", choices=PRECONDITIONERS, help="with a mean-field guide: how Adam's step on the locations of every Bayesian fit on B (and joint's) is scaled: none (default; Adam's own, about the rate per coordinate) or prior-scale (each location's step times its prior width over the prior's widest: under transfer the weights q_A narrowed move in steps of their width, under a base prior nothing changes)")
    p.add_argument("--batch-size-b", type=int, help="with --fit-b rule: the minibatch of every Bayesian fit on B (and joint's); at least the fit's data: one full-batch step an epoch (default: about a tenth of the fit's data, at least 32, at most --batch-size-a)")
    p.add_argument("--max-epochs-b", type=_int_or_none, help="with --fit-b rule: the most epochs of a fit on B (or joint's); none (default): --max-epochs-a; 20000 in the paper preset, 3000 in paper-v5")
    p.add_argument("--min-steps", type=int, help="minimum optimisation steps on B, whatever the fraction")
    p.add_argument("--fractions", type=_floats, help="fractions of B's training data, e.g. 0.01,0.1,0.5,1")
    p.add_argument("--seeds", type=_ints, help="seeds, e.g. 0,1,2")
    p.add_argument("--head", help=f"output layer: {', '.join(HEADS)}")
    p.add_argument("--q-init", help=f"start of q_B for transfer: {', '.join(Q_INITS)}")
    p.add_argument("--prior", help=f"prior on A (and on B without transfer): {', '.join(PRIORS)} (Blundell's scale mixture)")
    p.add_argument("--prior-scale", type=float, help="sigma of the N(0, sigma^2) prior (default 1, 0.3 in the paper preset)")
    p.add_argument("--mixture-pi", type=float, help="scale mixture: weight pi of the wide component (default 0.5)")
    p.add_argument("--mixture-sigma1", type=float, help="scale mixture: sigma1 of the wide component (default 1 = exp(0))")
    p.add_argument("--mixture-sigma2", type=float, help="scale mixture: sigma2 of the narrow component (default exp(-6))")
    p.add_argument("--tau", type=float, help="broadening of the transferred prior's scales (>= 1)")
    p.add_argument("--init-scale", type=float, help="initial posterior standard deviation")
    p.add_argument("--lr", type=float, help="Adam learning rate of the posterior means on B, for every method (default 1e-3)")
    p.add_argument("--lr-a", type=float, help="Adam learning rate at which q_A starts (default 1e-2; the stopping rule lowers it)")
    p.add_argument("--lr-drops", type=int, help="stopping rule: times q_A's learning rates are multiplied by --lr-factor when the rule holds, before it stops (default 3)")
    p.add_argument("--lr-factor", type=float, help="stopping rule: the factor of each learning-rate drop, in (0, 1) (default 0.3)")
    p.add_argument("--scale-lr", type=float, help="Adam learning rate of the guide's scale parameters (default 3e-2)")
    p.add_argument("--ewc-lr", type=float, help="Adam learning rate of EWC's deterministic nets (default 1e-3)")
    p.add_argument("--batch-size", type=int, help="minibatch size on B, for every method, and of EWC's task-A net (default 128)")
    p.add_argument("--batch-size-a", type=_int_or_none, help="minibatch size of q_A's fit (default 2048 in the paper presets); none: --batch-size")
    p.add_argument("--num-particles", type=int, help="Monte Carlo samples per step")
    p.add_argument("--ewc-lambda", type=float, help="EWC penalty strength lambda")
    p.add_argument("--hidden", type=_ints, help="hidden widths, e.g. 400,400")
    p.add_argument("--eval-samples", type=int, help="posterior samples for the final evaluation")
    p.add_argument("--limit-train", type=int, help="cap on training images per task (smoke tests)")
    p.add_argument("--limit-eval", type=int, help="cap on validation/test images per task (smoke tests)")
    p.add_argument("--ewc-patience", type=_int_or_none,
                   help="EWC's deterministic nets by early stopping: stop after this many epochs without a better validation accuracy "
                        "(A's net on A's, B's on B's; in the split sequence each task's net on its task's), keep the best epoch's weights, at most "
                        "the Bayesian fits' epoch cap; none: the fixed budget (default: the preset's; paper: 3)")
    p.add_argument("--device", help="torch device, e.g. cpu or cuda")
    p.add_argument("--sequence", choices=SEQUENCES, help=f"run the chain A -> B -> C -> D over task A's digits instead (rotations by 0/15/30/45 degrees or permutations) with the methods {', '.join(SEQUENCE_METHODS)}, each task for B's fixed budget (not fitted by the stopping rule); writes sequence.png. split: the five tasks 0/1, 2/3, 4/5, 6/7, 8/9 of split MNIST in the --scenario given, with the methods {', '.join(SPLIT_METHODS)} and the split presets; writes split_mnist.png, split_mnist.md and sequence.png")
    p.add_argument("--scenario", help=f"only with --sequence split: {', '.join(SCENARIOS)} (incremental task: a 2-way head per task, the task id given at test time; domain: one shared 2-way head; class: one shared 10-way head)")
    p.add_argument("--joint", help=f"only with --sequence split: when the joint (offline) posterior is fitted, {' or '.join(JOINTS)} (every: on tasks 0..t after every task t; last: once, on all five tasks, ACC alone); default: the preset's")
    p.add_argument("--fit", help=f"only with --sequence split: how each posterior is fitted, {' or '.join(FITS)} (rule: by the stopping rule as q_A, --max-epochs-a, --batch-size-a, --lr-a; fixed: --epochs/--min-steps at --lr, the verdict recorded); default: the preset's")
    p.add_argument("--mean-init", help=f"only with --sequence split: where the means of a posterior started fresh begin, {', '.join(MEAN_INITS)} (mle: a max-likelihood net trained on the fit's data for its fixed budget, VCL's start); default: the preset's")
    p.add_argument("--pixels", help=f"only with --sequence split: pixel scaling, {', '.join(SCALINGS)} (blundell x/126, unit x/255); default: the preset's")
    p.add_argument("--val-fraction", type=float, help="only with --sequence split: share of each digit's training images held out for validation, in [0, 1) (0: all 60,000, as VCL); default: the preset's")
    p.add_argument("--start", help=f"only with --sequence split: where q_t of a chained task starts, {' or '.join(STARTS)} (previous: q_(t-1), VCL; fresh: by --mean-init and --init-scale, keeping the heads learnt, Swaroop et al. 2019); default: the preset's")
    p.add_argument("--coreset", help=f"only with --sequence split: VCL's coreset, {', '.join(CORESETS)} (random or kcenter: --coreset-size points of "
                                     "every task set aside from training; transfer and finetune predict each task by a copy of the posterior "
                                     "fitted on them, Nguyen et al. 2018); default: the preset's (none)")
    p.add_argument("--coreset-size", type=int, help="only with --sequence split and --coreset: points per task (default 40, VCL's)")
    p.add_argument("--out", type=Path, default=Path("runs/transfer"), help="output directory (default runs/transfer)")
    p.add_argument("--overwrite", action="store_true", help="delete results and progress already in --out and start afresh")
    p.add_argument("--stages-from", type=Path, metavar="RUN",
                   help="start this run with the task-A stages (q_A, EWC's net on A) of the run in RUN for this run's seeds, which must "
                        "differ from this one in B's fields only (" + ", ".join("--" + f.replace("_", "-") for f in B_ONLY_FIELDS)
                        + ") and the grid's: B's recipes compared on the same q_A; a fresh --out only")
    p.add_argument("--resume", action="store_true", help="continue the run in --out (same configuration): finished units are reused, an interrupted one continues from its last epoch; the A -> B grid may grow or shrink (other --methods, --fractions, --seeds) and its caps rise (--max-epochs-a, --max-epochs-b), keeping what it holds")
    p.add_argument("--executor", default="serial", help=f"where units run: {', '.join(EXECUTORS)} (default serial: one after another in this process; processes: a pool of --workers local processes; ray: Ray tasks, --workers at a time, on a local Ray or --ray-address; results identical)")
    p.add_argument("--workers", type=_positive_int, default=1, help="worker processes of --executor processes, or Ray tasks in flight at once under --executor ray (default 1)")
    p.add_argument("--ray-address", help="--executor ray: HOST:PORT of a running Ray cluster's head (ray start --head), or auto; default: start a local Ray with --workers x --threads-per-unit CPUs")
    p.add_argument("--ray-retries", type=_nonnegative_int, help=f"--executor ray: times Ray runs a unit again, on any node, when its worker process or node dies (default {DEFAULT_MAX_RETRIES}; 0: the unit fails and waits for --resume); a unit that raises is not retried; results do not depend on it")
    p.add_argument("--gpus-per-unit", type=_gpu_fraction, help="--executor ray with --device cuda: GPUs each task asks Ray for, a fraction in (0, 1] or a whole number (default 1/--workers)")
    p.add_argument("--threads-per-unit", type=_positive_int, default=1, help="torch intra-op threads of every unit, whatever the executor (default 1); results depend on it, so keep it to compare runs")
    p.add_argument("--quiet", action="store_true", help="no progress lines and no progress bar")
    return p


# ExperimentConfig fields that --sequence split sets itself (--scenario) or does not use
NOT_FOR_SPLIT = ("task_a", "task_b", "fractions", "head", "q_init", "fit_b", "polish_steps_b", "continuation_particles_b", "fast_polish", "precondition_b")


def split_config_from_args(args: argparse.Namespace) -> SplitConfig | None:
    """The :class:`SplitConfig` of ``--sequence split`` (``None`` for the other modes); raises
    :class:`UsageError` for ``--scenario``/``--fit`` without it, a missing or unknown scenario,
    and flags the split sequence does not use."""
    sequence = getattr(args, "sequence", None)
    scenario, fit, joint = getattr(args, "scenario", None), getattr(args, "fit", None), getattr(args, "joint", None)
    protocol = {name: getattr(args, name, None) for name in ("mean_init", "pixels", "val_fraction", "start", "coreset", "coreset_size")}
    if sequence != "split":
        for flag, value in (("--scenario", scenario), ("--fit", fit), ("--joint", joint), *((f"--{k.replace('_', '-')}", v) for k, v in protocol.items())):
            if value is not None:
                raise UsageError(f"{flag} {value} is only valid with --sequence split (got {'--sequence ' + sequence if sequence else 'no --sequence'})")
        if args.preset not in PRESETS:
            raise UsageError(f"--preset {args.preset} is a preset of --sequence split; the A -> B experiment's are {', '.join(sorted(PRESETS))}")
        return None
    if scenario is None:
        raise UsageError(f"--sequence split needs --scenario ({', '.join(SCENARIOS)})")
    if args.preset not in SPLIT_PRESETS:
        raise UsageError(f"--preset {args.preset} is a preset of the A -> B experiment; --sequence split's are {', '.join(sorted(SPLIT_PRESETS))}")
    unused = [f"--{name.replace('_', '-')}" for name in NOT_FOR_SPLIT if getattr(args, name, None) is not None]
    if unused:
        raise UsageError(f"{', '.join(unused)} not used by --sequence split (its tasks, heads and starts are set by --scenario)")
    try:
        preset = SPLIT_PRESETS[args.preset]
        given = {name: value for name, value in protocol.items() if value is not None}
        return SplitConfig(scenario=scenario, fit=preset.fit if fit is None else fit, joint=preset.joint if joint is None else joint,
                           **{**preset.protocol, **given})
    except ValueError as error:
        raise UsageError(str(error)) from None


def _check_coreset_size(split: SplitConfig, limit_train: int | None) -> None:
    """``ValueError`` when ``split``'s coreset would leave some task no training data: with
    ``limit_train``, against it; else against the smallest task's training split (loaded)."""
    if limit_train is not None:
        if split.coreset_size >= limit_train:
            raise ValueError(f"--coreset-size {split.coreset_size} leaves no training data from tasks cut to --limit-train {limit_train}: "
                             "it must be smaller")
        return
    smallest = min(len(load_split_task(task, pixels=split.pixels, val_fraction=split.val_fraction)[0]) for task in split_tasks(split.scenario))
    if split.coreset_size >= smallest:
        raise ValueError(f"--coreset-size {split.coreset_size} leaves no training data from the smallest task ({smallest} training images): "
                         "it must be smaller")


def config_from_args(args: argparse.Namespace) -> ExperimentConfig:
    split = split_config_from_args(args)
    if split is None:
        values = dict(PRESETS[args.preset])
    else:  # the split presets; the task scenario's heads are ExperimentConfig's multihead
        values = {**SPLIT_PRESETS[args.preset].overrides, "head": "multihead" if split.scenario == "task" else "shared"}
    for f in fields(ExperimentConfig):
        given = getattr(args, f.name, None)
        if given is not None:
            values[f.name] = None if (f.name in ("max_epochs_a", "max_epochs_b", "batch_size_a", "verdict_tol", "ewc_patience", "continuation_base") and given == "none") else given
    try:
        if split is not None:  # before ExperimentConfig, whose message would speak of heads and q_B
            check_split_methods(values.get("methods", METHODS), split.scenario, values.get("guide", ExperimentConfig.guide))
            check_split_protocol(split, values.get("guide", ExperimentConfig.guide))
            check_split_ewc(split, values.get("methods", METHODS), values.get("ewc_patience"))
            if split.coreset != "none":
                _check_coreset_size(split, values.get("limit_train"))
        config = ExperimentConfig(**values)
        if split is None:
            config.check_data()
    except (TypeError, ValueError) as error:
        raise UsageError(str(error)) from None
    return config


def split_timing(obj, path: str = ""):
    """``obj`` without its ``"seconds"`` entries, and those entries keyed by where they were."""
    timing: dict[str, float] = {}

    def strip(value, where: str):
        if isinstance(value, dict):
            out = {}
            for key, item in value.items():
                if key == "seconds":
                    timing[where or "total"] = item
                else:
                    out[key] = strip(item, f"{where}/{key}" if where else str(key))
            return out
        if isinstance(value, list):
            return [strip(item, f"{where}/{index}") for index, item in enumerate(value)]
        return value

    return strip(obj, path), timing


def write_csv(path: Path, units: list[dict], timing: dict[str, float]) -> None:
    lines = [",".join(CSV_COLUMNS)]
    for index, u in enumerate(units):
        ok = u["status"] == "ok"
        row = {
            **{k: u.get(k) for k in ("method", "fraction", "seed", "steps", "status", "backward_transfer", "forward_transfer")},
            "b_test_accuracy": u["b_test"]["accuracy"] if ok else None,
            "b_test_nll": u["b_test"]["nll"] if ok else None,
            "b_test_ece": u["b_test"]["ece"] if ok else None,
            "a_test_after_accuracy": u["a_test_after"]["accuracy"] if ok else None,
            "seconds": timing.get(f"units/{index}"),
        }
        lines.append(",".join("" if row[c] is None else str(row[c]) for c in CSV_COLUMNS))
    atomic_write_text(path, "\n".join(lines) + "\n")


def run_description(config: ExperimentConfig, split: SplitConfig | None, sequence: str | None = None) -> dict:
    """What ``config.json`` holds besides the preset, and what ``--resume`` compares: the
    configuration, with a ``--sequence`` run's sequence (and for ``--sequence split`` its
    scenario, fit, joint and protocol)."""
    if split is not None:
        return {"sequence": "split", **split.to_dict(), **config.to_dict()}
    return config.to_dict() if sequence is None else {"sequence": sequence, **config.to_dict()}


def sequence_raisable(split: SplitConfig | None) -> dict[str, None]:
    """The fields a ``--sequence`` run's ``--resume`` may raise: the epoch caps for the split
    sequence, whose units are one fit each (a task's fit, a chain's step), so a fit in progress
    or to come runs to the new cap, and one that ended at the old cap unconverged runs on from its
    kept checkpoint, with the later tasks of its chain (:func:`~pyro_bbt.split_sequence.plan_split`);
    none for the rotation and permutation chains."""
    return {name: None for name in CAP_FIELDS} if split is not None else {}


def _prepare_out_dir(out: Path, config: ExperimentConfig, args: argparse.Namespace, split: SplitConfig | None = None) -> None:
    """Refuse to mix runs: existing results need --overwrite (start afresh) or --resume (same config)."""
    if out.exists() and not out.is_dir():
        raise UsageError(f"--out {out} exists and is not a directory")
    if args.overwrite and args.resume:
        raise UsageError("--overwrite and --resume contradict each other; pass one")
    if args.stages_from is not None and args.resume:
        raise UsageError("--stages-from starts a run; --resume continues one with its own stages")
    existing = [name for name in (*RESULT_FILES, *PROGRESS_DIRS) if (out / name).exists()]
    if args.resume:
        saved_path = out / "config.json"
        if not saved_path.exists():
            raise UsageError(f"--resume: {out} holds no run to resume (no config.json)")
        try:
            saved = json.loads(saved_path.read_text())
        except (json.JSONDecodeError, UnicodeDecodeError) as error:
            raise UsageError(f"--resume: {saved_path} is damaged ({type(error).__name__}: {error}); rerun with --overwrite") from None
        if not isinstance(saved, dict):
            raise UsageError(f"--resume: {saved_path} is damaged (not a JSON object); rerun with --overwrite")
        saved.pop("preset", None)
        current = run_description(config, split, args.sequence)
        differences = config_differences(saved, current)
        free, raisable = (RUN_FIELDS, sequence_raisable(split)) if args.sequence else ((*GRID_FIELDS, *RUN_FIELDS), RAISABLE_FIELDS)
        if disallowed_differences(saved, current, free, raisable):
            raise UsageError(f"--resume: the run in {out} has another configuration ({'; '.join(differences)})")
        if differences:  # the grid grows or shrinks, a cap or the verdict's draws rise: what the run holds is reused, config.json says the new run
            fields = set(differing_fields(saved, current))
            parts = (("the grid changes", GRID_FIELDS), ("a cap rises", CAP_FIELDS), ("the verdict's draws rise", PRECISION_FIELDS),
                     ("the checkpoint interval changes", RUN_FIELDS))
            what = " and ".join(part for part, names in parts if fields & set(names))
            caps = ("; fits in progress and to come run to the new cap, " + ("and those that ended at the old cap run on, with the tasks after them"
                    if split is not None else "a finished fit keeps the record it ended with")) if fields & set(CAP_FIELDS) else ""
            draws = ("; judgements already made keep their draws, those to come use the new cap, and a fit in progress records the rise "
                     "(raised_on_resume)") if fields & set(PRECISION_FIELDS) else ""
            print(f"--resume: {what} ({'; '.join(differences)}); stored stages and units are reused{caps}{draws}", file=sys.stderr, flush=True)
            atomic_write_json(out / "config.json", {"preset": args.preset, **current})
        return
    if existing and not args.overwrite:
        raise UsageError(f"{out} already holds a run ({', '.join(existing)}); pass --overwrite to replace it, --resume to continue it, or choose another --out")
    stages = _stages_from(args.stages_from, config, args) if args.stages_from is not None else {}
    if existing:
        for name in RESULT_FILES:
            (out / name).unlink(missing_ok=True)
        for name in PROGRESS_DIRS:
            shutil.rmtree(out / name, ignore_errors=True)
    for source in stages.values():  # copied whole: the file keeps the header of the run that made it
        atomic_write(out / "stages" / source.name, lambda tmp, source=source: shutil.copyfile(source, tmp))


def _stages_from(source: Path, config: ExperimentConfig, args: argparse.Namespace) -> dict[str, Path]:
    """``--stages-from``: the stage files of ``source`` for this run's seeds, each checked to
    load under this run's configuration up to :data:`~pyro_bbt.config.B_ONLY_FIELDS` (and the
    grid's fields and raisable caps); ``UsageError`` naming what is wrong, before anything is written."""
    if args.sequence:
        raise UsageError("--stages-from takes the A -> B grid's task-A stages; a --sequence run has none")
    store = RunStore(source, config.to_dict(), grid_fields=(*GRID_FIELDS, *RUN_FIELDS), raisable_fields=RAISABLE_FIELDS, stage_free_fields=B_ONLY_FIELDS)
    found = {}
    for path in sorted((source / "stages").glob("*.pt")) if (source / "stages").is_dir() else []:
        key = path.stem
        if not any(key.endswith(f"-s{seed}") for seed in config.seeds):
            continue
        try:
            store.stage(key)
        except ValueError as error:
            raise UsageError(f"--stages-from {source}: {error}") from None
        found[key] = path
    if not found:
        raise UsageError(f"--stages-from {source}: no task-A stage for --seeds {','.join(map(str, config.seeds))} in {source / 'stages'}")
    return found


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        split = split_config_from_args(args)
        config = config_from_args(args)
        if args.sequence and split is None and not set(config.methods) & set(SEQUENCE_METHODS):
            raise UsageError(f"--sequence runs the methods {', '.join(SEQUENCE_METHODS)}; got --methods {','.join(config.methods)}")
        if args.executor not in EXECUTORS:
            raise UsageError(f"unknown --executor {args.executor!r}; allowed: {', '.join(EXECUTORS)}")
        if args.workers > 1 and args.executor not in ("processes", "ray"):
            raise UsageError(f"--workers {args.workers} needs --executor processes or ray (--executor {args.executor} runs one unit at a time)")
        _check_ray_only_flags(args)
        gpus_per_unit = _gpus_per_unit(args, config)
        executor = make_executor(args.executor, args.workers, args.threads_per_unit, ray_address=args.ray_address, gpus_per_unit=gpus_per_unit,
                                 ray_retries=args.ray_retries)
    except UsageError as error:
        print(f"{parser.prog}: error: {error}", file=sys.stderr)
        return 2
    except ExecutorUnavailableError as error:
        print(f"{parser.prog}: error: --executor {args.executor}: {error}", file=sys.stderr)
        return 2
    try:
        _prepare_out_dir(args.out, config, args, split)
    except UsageError as error:
        executor.close()
        print(f"{parser.prog}: error: {error}", file=sys.stderr)
        return 2
    if config.guide in FLOW_GUIDES:
        print(f"{parser.prog}: warning: --guide {config.guide}: this experiment trains the flows' own parameters at the locations' "
              f"learning rate (--lr-a, --lr), where their fits plateau or diverge (docs/studies.md, uncertainty study); its results with "
              f"this guide are not to be trusted", file=sys.stderr)
    try:
        return _run(args, config, split, executor, parser.prog)
    finally:
        executor.close()


def _check_ray_only_flags(args: argparse.Namespace) -> None:
    """``UsageError`` naming the first flag of the Ray executor given without ``--executor ray``."""
    if args.executor == "ray":
        return
    for flag, value in (("--ray-address", args.ray_address), ("--ray-retries", args.ray_retries), ("--gpus-per-unit", args.gpus_per_unit)):
        if value is not None:
            raise UsageError(f"{flag} needs --executor ray (got --executor {args.executor})")


def _gpus_per_unit(args: argparse.Namespace, config: ExperimentConfig) -> float:
    """The GPUs each Ray task asks for: ``--gpus-per-unit``, by default ``1 / --workers`` with a
    CUDA device (the tasks in flight share one GPU) and 0 without; ``UsageError`` for settings
    that cannot work."""
    cuda = config.device.startswith("cuda")
    if args.executor != "ray":
        return 0.0
    if cuda and config.device != "cuda":
        raise UsageError(f"--executor ray gives each task its GPU itself: pass --device cuda, not --device {config.device}")
    if args.gpus_per_unit is not None and not cuda:
        raise UsageError(f"--gpus-per-unit {args.gpus_per_unit:g} needs --device cuda (got --device {config.device})")
    if not cuda:
        return 0.0
    return args.gpus_per_unit if args.gpus_per_unit is not None else 1.0 / args.workers


def _run(args: argparse.Namespace, config: ExperimentConfig, split: SplitConfig | None, executor: Executor, prog: str) -> int:
    """Run the checked command line ``args`` (``split``: its ``--sequence split`` settings) into
    ``args.out`` with ``executor``; the exit code."""
    from .plots import save_all  # matplotlib only when there is something to plot

    log = (lambda message: None) if args.quiet else (lambda message: print(message, flush=True))
    start = time.perf_counter()
    if not args.resume:
        atomic_write_json(args.out / "config.json", {"preset": args.preset, **run_description(config, split, args.sequence)})
    if args.sequence:
        return _run_sequence(args, config, split, executor, log, start)
    warn = lambda message: print(message, file=sys.stderr, flush=True)  # noqa: E731
    store = RunStore(args.out, config.to_dict(), on_damaged=lambda message: warn(f"warning: {message}"), grid_fields=(*GRID_FIELDS, *RUN_FIELDS),
                     raisable_fields=RAISABLE_FIELDS, stage_free_fields=B_ONLY_FIELDS, recorded_fields=PRECISION_FIELDS)
    raw = run_experiment(config, log=log, store=store, warn=warn, executor=executor, progress=not args.quiet)
    results, timing = split_timing(raw)
    timing["wall_clock"] = time.perf_counter() - start
    timing["workers"] = args.workers if args.executor in ("processes", "ray") else 1
    atomic_write_json(args.out / "results.json", results)
    atomic_write_json(args.out / "timing.json", timing)
    write_csv(args.out / "metrics.csv", results["units"], timing)
    figures = save_all(results, args.out)
    failed = [u for u in results["units"] if u["status"] != "ok"]
    log(f"done in {timing['wall_clock']:.0f} s: {args.out / 'results.json'}, {args.out / 'metrics.csv'}, " + ", ".join(str(p) for p in figures))
    if failed:
        print(f"{prog}: {len(failed)} of {len(results['units'])} units failed (see 'error' in {args.out / 'results.json'})", file=sys.stderr)
        return 1
    return 0


def _run_sequence(args: argparse.Namespace, config: ExperimentConfig, split: SplitConfig | None, executor: Executor, log,
                  start: float) -> int:
    """``--sequence``: run its units on ``executor``, kept in ``--out`` (so ``--resume`` continues
    it), then write results.json, timing.json (the fits' wall-clock seconds) and sequence.png
    (the mean accuracy matrices); for ``--sequence split`` (``split``) also split_mnist.md (the
    table) and split_mnist.png. Exit code 1 when a chain stopped at a failed task."""
    from .plots import plot_sequence, plot_split_sequence
    from .split_report import split_sequence_table

    warn = lambda message: print(message, file=sys.stderr, flush=True)  # noqa: E731
    store = RunStore(args.out, run_description(config, split, args.sequence), on_damaged=lambda message: warn(f"warning: {message}"), grid_fields=RUN_FIELDS,
                     raisable_fields=sequence_raisable(split))
    raw = run_sequence(config, args.sequence, log=log, split=split, executor=executor, store=store, progress=not args.quiet)
    results, timing = split_timing(raw)
    timing["wall_clock"] = time.perf_counter() - start
    timing["workers"] = args.workers if args.executor in ("processes", "ray") else 1
    atomic_write_json(args.out / "results.json", results)
    atomic_write_json(args.out / "timing.json", timing)
    written = [args.out / "results.json", args.out / "sequence.png"]
    if split is not None:
        atomic_write_text(args.out / "split_mnist.md", split_sequence_table(results))
        plot_split_sequence(results, args.out / "split_mnist.png")
        written += [args.out / "split_mnist.md", args.out / "split_mnist.png"]
    plot_sequence(results, args.out / "sequence.png")
    log(f"done in {timing['wall_clock']:.0f} s: " + ", ".join(str(path) for path in written))
    if split is not None:
        unfinished = [m for m, entry in results["methods"].items() if entry["seeds_finished"] < len(entry["per_seed"])]
    else:
        unfinished = [m for m, entry in results["methods"].items() if any("error" in e for e in entry["per_seed"])]
    if unfinished:
        print(f"python -m pyro_bbt.transfer: a task failed (NaN/inf, or an error) for {', '.join(unfinished)} (see {args.out / 'results.json'})",
              file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
