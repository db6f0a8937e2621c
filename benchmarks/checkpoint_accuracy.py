"""B's and A's test accuracy of a trade-off point still fitting, read from its train checkpoint.

A trade-off unit (``python -m pyro_bbt.studies tradeoff``) records B's test accuracy and A's
after B only when its fit ends. A fit that runs for tens of thousands of epochs keeps, in its
checkpoint (``checkpoints/KEY.pt``, or a copy of it), the posterior at its last epoch and, inside
a continuation, the continuation's start: the end of the continuation before it, a point the
verdict scored. This reads both into the unit's own network (the study configuration saved in
the checkpoint, the point's head, fraction and seed from its key) and evaluates them as the unit
does at its end (posterior predictive over ``eval_samples`` weight draws through B's head on B's
test split, through A's head on A's), ``--repeats R`` times with torch's generator seeded by
``--seed``, ``--seed + 1``, ...: their mean and standard deviation say how much of a recorded
accuracy is the predictive's Monte Carlo noise (a unit evaluates once, with the generator as the
fit left it)::

    python benchmarks/checkpoint_accuracy.py runs/snap-multihead-transfer-tau10-f0.1-s1.pt --repeats 8 --out figs/checkpoint-accuracy-tau10-s1.json

The checkpoint is read with ``weights_only=True``.
"""

from __future__ import annotations

import argparse
import json
import re
import statistics
import sys
from dataclasses import replace
from pathlib import Path

import torch

from pyro_bbt.experiment import ExperimentConfig
from pyro_bbt.files import atomic_write_text
from pyro_bbt.units import bayesian_metrics, load_task_pair

__all__ = ["KEY_PATTERN", "point_of", "checkpoint_accuracy", "main"]

KEY_PATTERN = re.compile(r"^(?P<head>shared|multihead)-(?P<method>scratch|transfer|finetune|joint)(?:-tau[0-9.e+-]+)?-f(?P<fraction>[0-9.e-]+)-s(?P<seed>[0-9]+)$")


def point_of(key: str) -> tuple[str, float, int]:
    """``(head, fraction, seed)`` of a trade-off point's key (``multihead-transfer-tau10-f0.1-s1``);
    ``ValueError`` naming the key where it is not a Bayesian point's."""
    match = KEY_PATTERN.match(key)
    if match is None:
        raise ValueError(f"{key!r} is not the key of a Bayesian trade-off point (e.g. multihead-transfer-tau10-f0.1-s1)")
    return match["head"], float(match["fraction"]), int(match["seed"])


def checkpoint_accuracy(path: Path, seed: int = 0, repeats: int = 1) -> dict:
    """The test accuracies of the posteriors a trade-off unit's checkpoint keeps: ``points``, one per
    posterior (the running continuation's start where there is one, then the last epoch's), each
    with its ``epoch`` and, over ``repeats`` evaluations seeded ``seed``, ``seed + 1``, ..., the
    lists ``b_test_accuracy`` and ``a_test_after_accuracy`` with their means and standard
    deviations (``None`` for one)."""
    if repeats < 1:
        raise ValueError(f"repeats must be an integer >= 1, got {repeats}")
    payload = torch.load(path, map_location="cpu", weights_only=True)
    if not isinstance(payload, dict) or not isinstance(payload.get("data"), dict) or "train_state" not in payload["data"]:
        raise ValueError(f"{path}: not a train checkpoint (no data.train_state)")
    study = (payload.get("config") or {}).get("config") or {}
    if "experiment" not in study:
        raise ValueError(f"{path}: holds no study configuration with an experiment (a trade-off unit's checkpoint has one)")
    head, fraction, point_seed = point_of(str(payload.get("key", "")))
    config = replace(ExperimentConfig(**study["experiment"]), head=head, tau=1.0)
    tasks = load_task_pair(config, fraction, point_seed)
    model, guide = config.new_posterior(config.base_prior(), point_seed)
    state = payload["data"]["train_state"]
    posteriors = []
    if state.get("continuation"):
        posteriors.append(("continuation start", state["continuation"]["start_epoch"], state["continuation"]["guide_state"]))
    posteriors.append(("last epoch", state["epoch"], state["guide_state"]))
    points = []
    for label, epoch, guide_state in posteriors:
        guide.load_state_dict(guide_state)
        point: dict = {"posterior": label, "epoch": epoch}
        for name, split, output_head in (("b_test_accuracy", tasks.b.test, config.b_head), ("a_test_after_accuracy", tasks.a.test, 0)):
            values = []
            for k in range(repeats):
                torch.manual_seed(seed + k)
                values.append(bayesian_metrics(model, guide, split, config.eval_samples, output_head).accuracy)
            point[name] = values
            point[name.replace("accuracy", "mean")] = statistics.fmean(values)
            point[name.replace("accuracy", "std")] = statistics.stdev(values) if repeats > 1 else None
        points.append(point)
    return {"file": str(path), "key": payload["key"], "eval_samples": config.eval_samples, "seed": seed, "repeats": repeats, "points": points}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("checkpoint", type=Path, help="a trade-off unit's train checkpoint (checkpoints/KEY.pt) or a copy of it")
    parser.add_argument("--seed", type=int, default=0, help="torch's seed for the predictive draws (default 0)")
    parser.add_argument("--repeats", type=int, default=1, help="evaluations per posterior, seeded --seed, --seed + 1, ... (default 1)")
    parser.add_argument("--out", type=Path, help="write the accuracies as JSON here")
    args = parser.parse_args(argv)
    torch.set_num_threads(1)
    try:
        record = checkpoint_accuracy(args.checkpoint, args.seed, args.repeats)
    except (ValueError, FileNotFoundError) as error:
        print(f"checkpoint_accuracy: {error}", file=sys.stderr)
        return 2
    for point in record["points"]:
        spread = "" if args.repeats == 1 else f" (sd {point['b_test_std']:.4f}, {point['a_test_after_std']:.4f} over {args.repeats} evaluations)"
        print(f"{record['key']}, {point['posterior']} (epoch {point['epoch']}): B test {point['b_test_mean']:.4f}, "
              f"A after B {point['a_test_after_mean']:.4f}{spread}")
    if args.out is not None:
        atomic_write_text(args.out, json.dumps(record, indent=1) + "\n")
        print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
