"""Tests for benchmarks/checkpoint_accuracy.py (outside the package): a trade-off unit's
checkpoint, written by hand from a tiny real posterior, read back and evaluated as the unit
evaluates; the key's parsing and the errors."""

import json

import pytest
import torch

from conftest import load_benchmark
from pyro_bbt.experiment import ExperimentConfig
from pyro_bbt.units import bayesian_metrics, load_task_pair

accuracy = load_benchmark("checkpoint_accuracy")


def test_keys_of_bayesian_points_parse_and_others_are_refused():
    assert accuracy.point_of("multihead-transfer-tau10-f0.1-s1") == ("multihead", 0.1, 1)
    assert accuracy.point_of("shared-scratch-f0.01-s2") == ("shared", 0.01, 2)
    for key in ("shared-ewc-lambda10-f0.1-s0", "multihead-A-bayesian-s1", "transfer-f0.1-s1"):
        with pytest.raises(ValueError, match="not the key of a Bayesian trade-off point"):
            accuracy.point_of(key)


def test_a_checkpoint_is_evaluated_as_the_unit_evaluates(tmp_path, single_torch_thread):
    """Both posteriors a checkpoint keeps (the continuation's start, the last epoch) through each
    task's head, with the seeds --seed, --seed + 1: the same numbers as the unit's own evaluation
    with those seeds, and two different posteriors give their own."""
    experiment = ExperimentConfig(hidden=(8,), limit_train=200, limit_eval=100, eval_samples=4)
    config = ExperimentConfig(**(experiment.to_dict() | {"head": "multihead"}))
    model, guide = config.new_posterior(config.base_prior(), 1)
    start_state = {k: v.clone() for k, v in guide.state_dict().items()}
    with torch.no_grad():
        for name, value in guide.named_parameters():
            if "locs" in name:
                value.add_(0.5 * torch.randn_like(value))
    end_state = {k: v.clone() for k, v in guide.state_dict().items()}
    payload = {"format_version": 1, "key": "multihead-transfer-tau10-f0.1-s1", "config": {"study": "tradeoff", "config": {"experiment": experiment.to_dict()}},
               "data": {"train_state": {"epoch": 7, "guide_state": end_state, "continuation": {"start_epoch": 4, "guide_state": start_state}}}}
    tasks = load_task_pair(config, 0.1, 1)
    expected = []  # before the script runs: a second guide of the same sites shares Pyro's parameter store with this one
    for state in (start_state, end_state):
        guide.load_state_dict(state)
        point = {}
        for name, split, head in (("b_test_accuracy", tasks.b.test, config.b_head), ("a_test_after_accuracy", tasks.a.test, 0)):
            point[name] = []
            for seed in (3, 4):
                torch.manual_seed(seed)
                point[name].append(bayesian_metrics(model, guide, split, 4, head).accuracy)
        expected.append(point)
    path = tmp_path / "unit.pt"
    torch.save(payload, path)
    assert accuracy.main([str(path), "--seed", "3", "--repeats", "2", "--out", str(tmp_path / "out.json")]) == 0
    record = json.loads((tmp_path / "out.json").read_text())
    assert [(p["posterior"], p["epoch"]) for p in record["points"]] == [("continuation start", 4), ("last epoch", 7)]
    for point, wanted in zip(record["points"], expected):
        for name, values in wanted.items():
            assert point[name] == pytest.approx(values)
            assert point[name.replace("accuracy", "mean")] == pytest.approx(sum(values) / 2)
    assert record["points"][0]["b_test_accuracy"] != record["points"][1]["b_test_accuracy"]


def test_a_file_that_is_not_a_unit_checkpoint_gives_one_line_and_exit_2(tmp_path, capsys):
    path = tmp_path / "stage.pt"
    torch.save({"data": {"history": []}}, path)
    assert accuracy.main([str(path)]) == 2
    assert capsys.readouterr().err.strip() == f"checkpoint_accuracy: {path}: not a train checkpoint (no data.train_state)"
    assert accuracy.main([str(tmp_path / "missing.pt")]) == 2
