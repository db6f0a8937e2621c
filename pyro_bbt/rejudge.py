"""Judge a finished unit's posterior again, with noise of its own.

    python -m pyro_bbt.rejudge RUN_DIR UNIT_KEY [--times 4]

A fit judged at every overrule passes on the first judgement whose noise falls low enough, so a
pass is worth checking. This reruns the unit ``UNIT_KEY`` (for example ``scratch-f0.1-s0``) of
the A -> B run in ``RUN_DIR`` through :func:`~pyro_bbt.units.run_unit` with the run's saved
configuration (and its saved q_A for ``transfer`` and ``finetune``), checks that the rerun
reproduces the recorded verdict exactly, and judges the final posterior ``--times`` more times
with :func:`~pyro_bbt.verdict.judge`, seeds ``epoch + CONFIRMATION_SEED_OFFSET + k`` (none of the
fit's own). It prints one line per judgement: the upper bound ``(gain + 2 stderr) / N`` in nats
per example, the gain and its standard error, and whether it passes. The rerun costs what the
unit cost.
"""

from __future__ import annotations

import argparse
import json
import sys
from dataclasses import fields
from pathlib import Path

import torch

from .config import ExperimentConfig
from .plan import UnitSpec, build_plan
from .runstore import RunStore
from .units import load_task_pair, run_unit, stage_prior, use_head
from .verdict import CONFIRMATION_SEED_OFFSET, judge

__all__ = ["saved_config", "judged_unit", "rejudge", "main"]


def saved_config(run_dir: Path) -> tuple[ExperimentConfig, dict]:
    """The :class:`ExperimentConfig` of ``run_dir/config.json`` (lists as tuples; fields the file
    predates take their defaults) and the file's configuration as saved (what its store checks)."""
    try:
        saved = json.loads((run_dir / "config.json").read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as error:
        raise ValueError(f"{run_dir / 'config.json'} is damaged ({type(error).__name__}: {error})") from None
    if not isinstance(saved, dict):
        raise ValueError(f"{run_dir / 'config.json'} is damaged (not a JSON object)")
    saved.pop("preset", None)
    if saved.get("sequence") is not None:
        raise ValueError(f"{run_dir} is a --sequence run; rejudge reads A -> B runs")
    known = {f.name for f in fields(ExperimentConfig)}
    values = {k: tuple(v) if isinstance(v, list) else v for k, v in saved.items() if k in known}
    return ExperimentConfig(**values), saved


def judged_unit(run_dir: Path, key: str) -> tuple[ExperimentConfig, dict, UnitSpec]:
    """``(config, saved, spec)`` of unit ``key`` of the A -> B run in ``run_dir``: a Bayesian fit on
    B (scratch, transfer, finetune) of a run with a verdict; anything else one clear ``ValueError``."""
    config, saved = saved_config(run_dir)
    specs = {spec.key: spec for spec in build_plan(config).units}
    if key not in specs:
        raise ValueError(f"no unit {key!r} in {run_dir}; its units: {', '.join(specs)}")
    spec = specs[key]
    if spec.method not in ("scratch", "transfer", "finetune") or config.verdict_tol is None:
        raise ValueError(f"unit {key!r} cannot be judged: only scratch, transfer and finetune units of a run with a verdict can "
                         "(EWC's nets have none; joint fits A and B together)")
    return config, saved, spec


def rejudge(run_dir: Path, key: str, times: int = 4) -> dict:
    """Rerun unit ``key`` of ``run_dir`` and judge its posterior ``times`` more times (module
    docstring). Returns ``{"key", "epochs", "recorded", "reproduced", "judgements": [verdicts]}``."""
    config, saved, spec = judged_unit(run_dir, key)
    store = RunStore(run_dir, saved)  # checks each file's format, key and configuration
    recorded = store.record(key)
    if recorded is None or recorded["status"] != "ok":
        raise ValueError(f"unit {key!r} of {run_dir} has not finished, or failed: nothing to judge")
    stage_state = store.stage(spec.needs) if spec.needs is not None else None
    last: dict = {}
    record = run_unit(config, spec, stage_state, on_checkpoint=lambda _key, data: last.update(data))
    verdict = record["convergence"]["verdict"]
    prior = stage_prior(stage_state) if spec.method == "transfer" else config.base_prior()
    tasks = load_task_pair(config, spec.fraction, spec.seed)
    model, guide = config.new_posterior(prior, spec.seed)
    guide.load_state_dict(last["train_state"]["guide_state"])
    use_head(model, config.b_head)
    epochs = record["convergence"]["epochs"]
    judgements = [judge(model, guide, tasks.b.train, tol_per_datum=config.verdict_tol, seed=epochs + CONFIRMATION_SEED_OFFSET + k).to_dict()
                  for k in range(times)]  # the gain measured even where the blank-pixel check fails
    return {"key": key, "epochs": epochs, "recorded": recorded["convergence"]["verdict"],
            "reproduced": verdict == recorded["convergence"]["verdict"], "judgements": judgements}


def _line(label: str, verdict: dict) -> str:
    gain = verdict.get("gain")
    upper = verdict.get("gain_upper_per_datum")
    measured = "gain not measured" if gain is None else f"upper {upper:.4f} nats per example (gain {gain['nats']:.1f} ± {gain['stderr']:.1f} nats)"
    return f"{label}: {measured}, {'passes' if verdict['converged'] else 'fails'}"


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m pyro_bbt.rejudge", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("run_dir", type=Path, help="output directory of python -m pyro_bbt.transfer")
    parser.add_argument("unit", help="the unit's key, METHOD-fFRACTION-sSEED (a file name under RUN_DIR/units without .json)")
    parser.add_argument("--times", type=int, default=4, help="how many more judgements (default 4)")
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.times < 1:
        print(f"{parser.prog}: error: --times must be an integer >= 1, got {args.times}", file=sys.stderr)
        return 2
    if not (args.run_dir / "config.json").exists():
        print(f"{parser.prog}: error: {args.run_dir / 'config.json'} does not exist (run python -m pyro_bbt.transfer --out {args.run_dir} first)", file=sys.stderr)
        return 2
    results_path = args.run_dir / "results.json"
    threads = json.loads(results_path.read_text()).get("threads_per_unit") if results_path.exists() else None
    if threads:
        torch.set_num_threads(threads)  # the run's, so that the rerun reproduces the unit
    try:
        result = rejudge(args.run_dir, args.unit, args.times)
    except ValueError as error:
        print(f"{parser.prog}: error: {error}", file=sys.stderr)
        return 2
    print(f"{result['key']}: {result['epochs']} epochs; rerun reproduces the recorded verdict: {'yes' if result['reproduced'] else 'NO'}")
    print(_line("recorded", result["recorded"]))
    for k, verdict in enumerate(result["judgements"], 1):
        print(_line(f"judgement {k}", verdict))
    return 0 if result["reproduced"] else 1


if __name__ == "__main__":
    sys.exit(main())
