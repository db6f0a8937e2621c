"""The split-MNIST sequence (issue #14): five 2-digit tasks in the task, domain and class scenarios."""

from __future__ import annotations

import json
import subprocess
import sys

import numpy as np
import pytest
import torch

from pyro_bbt.continual import summarize
from pyro_bbt.data import Split, load_mnist
from pyro_bbt.experiment import ExperimentConfig, run_sequence
from pyro_bbt.report import main as report_main
from pyro_bbt.split_sequence import (
    SCENARIOS,
    SPLIT_METHODS,
    SplitConfig,
    _fresh_bayesian,
    accuracy_row,
    check_split_methods,
    load_split_task,
    split_tasks,
)
from pyro_bbt.transfer import main

PAIRS = [(0, 1), (2, 3), (4, 5), (6, 7), (8, 9)]
TINY = dict(hidden=(16,), epochs=1, min_steps=4, seeds=(0,), limit_train=200, limit_eval=100, eval_samples=2, fisher_samples=100)
TINY_ARGS = ["--hidden", "16", "--epochs", "1", "--min-steps", "4", "--seeds", "0", "--limit-train", "200", "--limit-eval", "100",
             "--eval-samples", "2", "--quiet"]


def _config(scenario: str, **overrides) -> ExperimentConfig:
    values = {**TINY, "methods": SPLIT_METHODS, "head": "multihead" if scenario == "task" else "shared", **overrides}
    return ExperimentConfig(**values)


@pytest.mark.parametrize("scenario", SCENARIOS)
def test_five_tasks_have_the_right_digits_labels_and_heads(scenario):
    tasks = split_tasks(scenario)
    assert [t.digits for t in tasks] == PAIRS
    for t, task in enumerate(tasks):
        expected_labels = task.digits if scenario == "class" else (0, 1)
        assert task.labels == expected_labels
        assert task.head == (t if scenario == "task" else None)
    _, _, _, raw_test_labels = load_mnist()
    for task in tasks[:: 2]:  # tasks 0, 2, 4 on real data
        _, test = load_split_task(task, limit_eval=300)
        digits = raw_test_labels[torch.isin(raw_test_labels, torch.tensor(task.digits))][:300]  # load_task keeps MNIST's order
        assert torch.equal(test.y, digits if scenario == "class" else digits % 2)
        assert set(test.y.tolist()) == set(task.labels)
    if scenario == "class":
        assert sorted(label for task in tasks for label in task.labels) == list(range(10))
    network = SplitConfig(scenario)
    assert (network.num_heads, network.classes_per_head) == {"task": (5, 2), "domain": (1, 2), "class": (1, 10)}[scenario]


def test_bad_scenario_or_fit_is_one_clear_value_error():
    with pytest.raises(ValueError, match=r"unknown scenario 'incremental'; allowed: task, domain, class"):
        SplitConfig("incremental")
    with pytest.raises(ValueError, match=r"unknown fit 'forever'; allowed: rule, fixed"):
        SplitConfig("task", fit="forever")
    with pytest.raises(ValueError, match="scratch"):
        run_sequence(_config("task", methods=("scratch",)), "split", log=lambda m: None, split=SplitConfig("task"))
    with pytest.raises(ValueError, match="SplitConfig"):
        run_sequence(_config("task"), "split", log=lambda m: None)
    with pytest.raises(ValueError, match="got guide 'planar'"):  # a new head cannot start fresh in a flow's packed vector
        check_split_methods(("ewc", "finetune"), "task", "planar")
    assert check_split_methods(("ewc", "joint"), "task", "planar") == ("ewc", "joint")
    assert check_split_methods(("finetune",), "class", "planar") == ("finetune",)


def _check_results(results: dict, scenario: str) -> None:
    assert results["sequence"] == "split" and results["scenario"] == scenario
    assert results["domains"] == ["0/1", "2/3", "4/5", "6/7", "8/9"]
    assert [t["head"] for t in results["tasks"]] == ([0, 1, 2, 3, 4] if scenario == "task" else [None] * 5)
    assert set(results["methods"]) == set(SPLIT_METHODS)
    for method, entry in results["methods"].items():
        (seed_entry,) = entry["per_seed"]
        R = np.array(seed_entry["accuracy_matrix"])
        assert R.shape == (5, 5) and ((R >= 0) & (R <= 1)).all(), method
        assert seed_entry["summary"] == summarize(R, seed_entry["random_init_accuracy"]).to_dict()
        assert entry["summary"]["average_accuracy"] == {"mean": pytest.approx(R[-1].mean()), "std": 0.0, "n": 1}
        assert entry["average_accuracy_curve"]["mean"] == pytest.approx([R[t, : t + 1].mean() for t in range(5)])
        fits = seed_entry["fits"]
        if method == "ewc":
            assert fits == []
            continue
        assert [f["task"] for f in fits] == [0, 1, 2, 3, 4]
        assert all(isinstance(f["convergence"]["converged"], bool) and f["steps"] >= 4 for f in fits)
        assert [f["trained_on"] for f in fits] == ([list(range(t + 1)) for t in range(5)] if method == "joint" else [[t] for t in range(5)])
    # the first task's fit is one computation, shared by transfer and finetune
    transfer, finetune = (results["methods"][m]["per_seed"][0] for m in ("transfer", "finetune"))
    assert transfer["accuracy_matrix"][0] == finetune["accuracy_matrix"][0]
    assert (transfer["fits"][0]["reused"], finetune["fits"][0]["reused"]) == (False, True)


@pytest.mark.parametrize("scenario", ["task", "domain"])
def test_tiny_run_fills_a_5x5_matrix_per_method(scenario, single_torch_thread):
    results = run_sequence(_config(scenario), "split", log=lambda m: None, split=SplitConfig(scenario, fit="fixed"))
    _check_results(results, scenario)


def test_rule_fit_records_the_stopping_rule_verdict(single_torch_thread):
    config = _config("domain", methods=("transfer",), epochs_a=1, max_epochs_a=2, batch_size_a=None)
    results = run_sequence(config, "split", log=lambda m: None, split=SplitConfig("domain", fit="rule"))
    fits = results["methods"]["transfer"]["per_seed"][0]["fits"]
    for fit in fits:
        verdict = fit["convergence"]
        assert verdict["max_epochs"] == 2 and fit["epochs"] == verdict["epochs"] == 2
        assert verdict["rule"]["window"] == 5 and verdict["converged"] is False  # 2 epochs cannot meet a 5-epoch window
    assert results["warnings"] and "NOT converged" in results["warnings"][0]


def test_a_non_finite_loss_stops_that_sequence_and_is_recorded(single_torch_thread):
    config = _config("domain", methods=("finetune", "ewc"), lr=1e30, scale_lr=1e30, ewc_lr=1e30, init_scale=10.0)
    results = run_sequence(config, "split", log=lambda m: None, split=SplitConfig("domain", fit="fixed"))
    for method, entry in results["methods"].items():
        (seed_entry,) = entry["per_seed"]
        assert seed_entry["error"].startswith("task 0: ") and seed_entry["summary"] is None, method
        assert np.isnan(seed_entry["accuracy_matrix"]).all() and entry["seeds_finished"] == 0
        assert entry["summary"] is None and entry["average_accuracy_curve"] is None


def test_task_scenario_reads_task_t_through_head_t():
    """A hand-built network whose head h says 1 only for an input lit at pixel h: task t's test
    images (pixel t lit, label 1) are all right through head t, all wrong through any other."""
    config = _config("task", guide="delta", methods=("ewc",))
    model, guide = _fresh_bayesian(config, SplitConfig("task"), config.base_prior(), seed=0)
    state = guide.state_dict()
    hidden_w, hidden_b = torch.zeros(16, 784), torch.zeros(16)
    hidden_w[torch.arange(16), torch.arange(16)] = 1.0  # hidden unit i = pixel i
    out_w, out_b = torch.zeros(10, 16), torch.zeros(10)
    for h in range(5):
        out_w[2 * h + 1, h] = 10.0  # head h, class 1: pixel h
        out_b[2 * h] = 1.0          # head h, class 0: a constant 1
    for key, value in (("layers.0.weight", hidden_w), ("layers.0.bias", hidden_b), ("layers.1.weight", out_w), ("layers.1.bias", out_b)):
        state[f"{key}_unconstrained"] = value
    guide.load_state_dict(state)
    tasks = split_tasks("task")
    tests = []
    for t in range(5):
        x = torch.zeros(4, 784)
        x[:, t] = 1.0
        tests.append(Split(x, torch.ones(4, dtype=torch.long)))
    assert accuracy_row(model, guide, tasks, tests, samples=2) == [1.0] * 5
    shifted = [tasks[(t + 1) % 5] for t in range(5)]  # read every task through the next task's head
    assert accuracy_row(model, guide, shifted, tests, samples=2) == [0.0] * 5


def test_cli_class_scenario_writes_results_table_and_figures(tmp_path, capsys):
    out = tmp_path / "split"
    assert main(["--sequence", "split", "--scenario", "class", *TINY_ARGS, "--out", str(out)]) == 0
    for name in ("config.json", "results.json", "timing.json", "split_mnist.md", "split_mnist.png", "sequence.png"):
        assert (out / name).stat().st_size > 0, name
    config = json.loads((out / "config.json").read_text())
    assert (config["sequence"], config["scenario"], config["fit"], config["preset"]) == ("split", "class", "fixed", "quick")
    results = json.loads((out / "results.json").read_text())
    _check_results(results, "class")
    assert [t["labels"] for t in results["tasks"]] == [list(p) for p in PAIRS]
    assert "seconds" not in json.dumps(results)  # wall-clock times go to timing.json
    table = (out / "split_mnist.md").read_text()
    for method in SPLIT_METHODS:
        assert f"| {method} | " in table
    capsys.readouterr()
    assert report_main([str(out)]) == 0
    assert capsys.readouterr().out == table
    # beside the published numbers: ours for every method; the class scenario has no published row in the table
    assert report_main([str(out), "--published", "--figure", str(tmp_path / "both.png")]) == 0
    published = capsys.readouterr().out
    assert (tmp_path / "both.png").stat().st_size > 0
    acc = results["methods"]["transfer"]["summary"]["average_accuracy"]
    assert f"| class | transfer | {100 * acc['mean']:.2f} ± {100 * acc['std']:.2f} | 1/1 | " in published
    assert published.count("| class |") == len(SPLIT_METHODS) and "Hsu et al." not in published
    assert report_main([str(out), str(tmp_path)]) == 2 and "several run directories need --published" in capsys.readouterr().err
    assert report_main([str(out), str(tmp_path), "--published"]) == 2 and "is missing" in capsys.readouterr().err


@pytest.mark.parametrize(
    "args, needle",
    [
        (["--scenario", "task"], "--scenario task is only valid with --sequence split"),
        (["--sequence", "rotations", "--scenario", "class"], "--scenario class is only valid with --sequence split"),
        (["--fit", "rule"], "--fit rule is only valid with --sequence split"),
        (["--sequence", "split"], "--sequence split needs --scenario"),
        (["--sequence", "split", "--scenario", "bogus"], "unknown scenario 'bogus'; allowed: task, domain, class"),
        (["--sequence", "split", "--scenario", "task", "--fit", "maybe"], "unknown fit 'maybe'"),
        (["--sequence", "split", "--scenario", "task", "--methods", "scratch,transfer"], "got scratch"),
        (["--sequence", "split", "--scenario", "task", "--head", "shared"], "--head not used by --sequence split"),
        (["--sequence", "split", "--scenario", "task", "--guide", "lowrank"], "got guide 'lowrank'"),
    ],
)
def test_cli_bad_split_input_exits_2_with_one_line_and_writes_nothing(tmp_path, capsys, args, needle):
    assert main([*args, "--out", str(tmp_path / "x")]) == 2
    lines = capsys.readouterr().err.strip().splitlines()
    assert len(lines) == 1 and needle in lines[0]
    assert not (tmp_path / "x").exists()


def test_cli_process_exits_2_for_scenario_without_split(tmp_path):
    result = subprocess.run([sys.executable, "-m", "pyro_bbt.transfer", "--scenario", "domain", "--out", str(tmp_path / "x")],
                            capture_output=True, text=True, timeout=120)
    assert result.returncode == 2 and "Traceback" not in result.stderr
    assert result.stderr.strip().count("\n") == 0 and "--scenario domain" in result.stderr
    assert not (tmp_path / "x").exists()
