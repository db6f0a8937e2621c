"""The split-MNIST sequence (issue #14): five 2-digit tasks in the task, domain and class scenarios."""

from __future__ import annotations

import copy
import json
import math
import subprocess
import sys

import numpy as np
import pytest
import torch

from pyro_bbt.continual import summarize
from pyro_bbt.data import Split, load_mnist
from pyro_bbt.experiment import ExperimentConfig, run_sequence
from pyro_bbt.split_report import PUBLISHED_SPLIT_MNIST
from pyro_bbt.report import main as report_main
from pyro_bbt.split_report import merge_split_runs, split_comparison_table, split_sequence_table
from pyro_bbt.split_sequence import (
    SCENARIOS,
    SPLIT_METHODS,
    SplitConfig,
    accuracy_row,
    check_split_methods,
    load_split_task,
    new_split_posterior,
    next_prior,
    split_tasks,
)
from pyro_bbt.fitting import guide_state, start_from_state
from pyro_bbt.split_sequence import SPLIT_PRESETS, chain_unit, first_task_unit, max_likelihood_means
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
    with pytest.raises(ValueError, match="class scenario's finetune start the output rows of every new digit fresh"):
        check_split_methods(("finetune",), "class", "planar")
    assert check_split_methods(("finetune",), "domain", "planar") == ("finetune",)


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
        for f in fits:  # the active-unit census after every fit (pyro_bbt.pruning), one layer of 16 units here
            units = f["units"]
            assert units["widths"] == [16] and 0 <= units["active"][0] <= 16 and len(units["active_units"][0]) == units["active"][0]
            assert units["ablation_examples"] == 200 * (f["task"] + 1) and units["kappa_searched"]
            assert units["ablation_change"] > -0.01 or units["kappa"] == min(units_grid())
        assert entry["active_units_mean"] == [[float(n) for n in f["units"]["active"]] for f in fits]
    # the first task's fit is one computation, shared by transfer and finetune
    transfer, finetune = (results["methods"][m]["per_seed"][0] for m in ("transfer", "finetune"))
    assert transfer["accuracy_matrix"][0] == finetune["accuracy_matrix"][0]
    assert (transfer["fits"][0]["reused"], finetune["fits"][0]["reused"]) == (False, True)


@pytest.mark.parametrize("scenario", ["task", "domain"])
def test_tiny_run_fills_a_5x5_matrix_per_method(scenario, single_torch_thread):
    results = run_sequence(_config(scenario), "split", log=lambda m: None, split=SplitConfig(scenario, fit="fixed"))
    _check_results(results, scenario)


def test_joint_last_fits_once_on_all_five_tasks_and_reports_its_acc_alone(single_torch_thread):
    config = _config("domain", methods=("joint", "ewc"))
    results = run_sequence(config, "split", log=lambda m: None, split=SplitConfig("domain", fit="fixed", joint="last"))
    assert results["joint"] == "last"
    (seed_entry,) = results["methods"]["joint"]["per_seed"]
    R = np.array(seed_entry["accuracy_matrix"])
    assert np.isnan(R[:4]).all() and ((R[4] >= 0) & (R[4] <= 1)).all()
    (fit,) = seed_entry["fits"]
    assert fit["trained_on"] == [0, 1, 2, 3, 4] and fit["steps"] == sum(max(4, 1 * 200 // 128) for _ in range(5))
    assert seed_entry["summary"] == {"average_accuracy": pytest.approx(R[4].mean()), "backward_transfer": None,
                                     "forward_transfer": None, "average_forgetting": None}
    summary = results["methods"]["joint"]["summary"]
    assert summary["average_accuracy"]["mean"] == pytest.approx(R[4].mean()) and summary["backward_transfer"] is None
    assert results["methods"]["joint"]["average_accuracy_curve"]["mean"][4] == pytest.approx(R[4].mean())
    assert results["methods"]["ewc"]["summary"]["backward_transfer"] is not None  # the other methods keep every metric
    row = next(line for line in split_sequence_table(results).splitlines() if line.startswith("| joint |"))
    assert row.startswith(f"| joint | {100 * R[4].mean():.2f} ± 0.00 | — | — | — | —, —, —, —, {100 * R[4].mean():.1f} | ")


def test_report_merges_runs_of_one_scenario_and_refuses_what_does_not_merge(single_torch_thread, tmp_path, capsys):
    """``--methods ewc`` and ``--methods joint --joint last`` run apart: one domain table with both
    methods and the published domain rows once; the same method twice, or another seed, refused."""
    ewc = run_sequence(_config("domain", methods=("ewc",)), "split", log=lambda m: None, split=SplitConfig("domain", fit="fixed"))
    joint = run_sequence(_config("domain", methods=("joint",)), "split", log=lambda m: None, split=SplitConfig("domain", fit="fixed", joint="last"))
    (merged,) = merge_split_runs([ewc, joint])
    assert list(merged["methods"]) == ["ewc", "joint"] and merged["config"]["methods"] == ["ewc", "joint"] and merged["joint"] == "last"
    assert merged["methods"]["joint"] == joint["methods"]["joint"] and merged["methods"]["ewc"] == ewc["methods"]["ewc"]
    table = split_comparison_table([ewc, joint])
    domain_published = sum(1 for row in PUBLISHED_SPLIT_MNIST if row[0] == "domain")
    assert table.count("| domain |") == 2 + domain_published
    with pytest.raises(ValueError, match="two domain-scenario runs both hold ewc of seed\\(s\\) 0: give each method and seed once"):
        merge_split_runs([ewc, ewc])
    # another seed of one method, made in a run with another method: each method's seeds pooled, its summary recomputed
    other_seed = run_sequence(_config("domain", methods=("ewc", "joint"), seeds=(1,)), "split", log=lambda m: None,
                              split=SplitConfig("domain", fit="fixed", joint="last"))
    (pooled,) = merge_split_runs([ewc, joint, other_seed])
    assert pooled["config"]["seeds"] == [0, 1] and pooled["config"]["methods"] == ["ewc", "joint"]
    accs = [e["summary"]["average_accuracy"] for run in (ewc, other_seed) for e in run["methods"]["ewc"]["per_seed"]]
    assert [e["seed"] for e in pooled["methods"]["ewc"]["per_seed"]] == [0, 1] and pooled["methods"]["ewc"]["seeds_finished"] == 2
    assert pooled["methods"]["ewc"]["summary"]["average_accuracy"]["mean"] == pytest.approx(np.mean(accs))
    assert pooled["methods"]["ewc"]["summary"]["average_accuracy"]["n"] == 2
    assert [e["seed"] for e in pooled["methods"]["joint"]["per_seed"]] == [0, 1]
    other_joint = run_sequence(_config("domain", methods=("joint",), seeds=(1,)), "split", log=lambda m: None,
                               split=SplitConfig("domain", fit="fixed", joint="every"))
    with pytest.raises(ValueError, match="fit joint differently"):
        merge_split_runs([joint, other_joint])
    wider = run_sequence(_config("domain", methods=("ewc",), seeds=(1,), hidden=(8,)), "split", log=lambda m: None, split=SplitConfig("domain", fit="fixed"))
    with pytest.raises(ValueError, match="two domain-scenario runs differ in hidden: only runs of one configuration merge"):
        merge_split_runs([ewc, wider])
    for name, results in (("a", ewc), ("b", ewc)):
        (tmp_path / name).mkdir()
        (tmp_path / name / "results.json").write_text(json.dumps(results))
    capsys.readouterr()
    assert report_main([str(tmp_path / "a"), str(tmp_path / "b"), "--published"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "both hold ewc of seed(s) 0: give each method and seed once" in err[0]  # one run given twice


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
    model, guide = new_split_posterior(config, SplitConfig("task"), config.base_prior(), seed=0, task=0)
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


def test_class_scenario_softmax_runs_over_the_digits_seen_so_far():
    """A hand-built net whose output biases favour digit 9 over digit 0 over the rest: after task 0
    (digits 0 and 1 active) it says 0 for every image, after task 4 (all ten active) it says 9."""
    split = SplitConfig("class")
    assert [split.active_outputs(t) for t in range(5)] == [2, 4, 6, 8, 10]
    assert SplitConfig("task").active_outputs(2) is None and SplitConfig("domain").active_outputs(2) is None
    config = _config("class", guide="delta", methods=("ewc",))
    model, guide = new_split_posterior(config, split, config.base_prior(), seed=0, task=0)
    assert model.active_outputs == 2
    state = guide.state_dict()
    for site, shape in model.site_shapes.items():
        state[f"{site}_unconstrained"] = torch.zeros(shape)
    state["layers.1.bias_unconstrained"][[0, 9]] = torch.tensor([5.0, 10.0])
    guide.load_state_dict(state)
    tasks = split_tasks("class")
    labels = [0, 2, 4, 6, 9]  # task t's first digit; task 4's second
    tests = [Split(torch.zeros(3, 784), torch.full((3,), label)) for label in labels]
    assert accuracy_row(model, guide, tasks, tests, samples=2) == [1.0, 0.0, 0.0, 0.0, 0.0]
    model.active_outputs = split.active_outputs(4)
    assert accuracy_row(model, guide, tasks, tests, samples=2) == [0.0, 0.0, 0.0, 0.0, 1.0]
    with pytest.raises(ValueError, match="active_outputs must lie in 1..10, got 11"):
        model.active_outputs = 11
        model.output_rows


@pytest.mark.parametrize("scenario", SCENARIOS)
def test_untrained_output_rows_start_fresh_under_the_base_prior(scenario):
    """Task t starts from q_{t-1} except the output rows [2t, 10) (heads or digits no task has
    trained yet), which keep the fresh guide's values; under transfer their prior is N(0, sigma^2).
    The domain scenario's one shared head is carried over whole."""
    split = SplitConfig(scenario)
    assert [split.untrained_rows(t) for t in (1, 3, 5)] == (
        [None] * 3 if scenario == "domain" else [slice(2, 10), slice(6, 10), None])
    config = _config(scenario, methods=("transfer",))
    model, guide = new_split_posterior(config, split, config.base_prior(), seed=0, task=2)
    fresh = {k: v.clone() for k, v in guide.state_dict().items()}
    previous = {k: v + 1.0 for k, v in fresh.items()}  # q_{t-1}: every value different from the fresh guide's
    start_from_state(model, guide, previous, split.untrained_rows(2))
    started = guide.state_dict()
    prior = next_prior(config, model, guide, split.untrained_rows(2))
    for key, value in started.items():
        if "layers.1." in key and scenario != "domain":  # the output layer
            torch.testing.assert_close(value[:4], previous[key][:4], msg=key)
            torch.testing.assert_close(value[4:], fresh[key][4:], msg=key)
        else:
            torch.testing.assert_close(value, previous[key], msg=key)
    for site in model.output_sites:
        if scenario == "domain":
            assert prior.scale(site).shape == model.site_shapes[site]  # every row: q's (the one shared head)
        else:
            assert (prior.loc(site)[4:] == 0).all() and (prior.scale(site)[4:] == config.base_prior_std).all(), site
            assert (prior.scale(site)[:4] != config.base_prior_std).any(), site


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
        R = np.array(results["methods"][method]["per_seed"][0]["accuracy_matrix"])
        t = int(np.argmin(np.diag(R)))  # the lowest accuracy on the task just trained, and where
        row = next(line for line in table.splitlines() if line.startswith(f"| {method} | "))
        assert row.endswith(f"| {100 * R[t, t]:.1f} (seed 0, task {t}) |"), row
    capsys.readouterr()
    assert report_main([str(out)]) == 0
    assert capsys.readouterr().out == table
    # beside the published numbers: ours for every method, then Hsu et al.'s released logs for the class scenario
    assert report_main([str(out), "--published", "--figure", str(tmp_path / "both.png")]) == 0
    published = capsys.readouterr().out
    assert (tmp_path / "both.png").stat().st_size > 0
    acc = results["methods"]["transfer"]["summary"]["average_accuracy"]
    assert f"| class | transfer | {100 * acc['mean']:.2f} ± {100 * acc['std']:.2f} | 1/1 | " in published
    published_rows = [row for row in PUBLISHED_SPLIT_MNIST if row[0] == "class"]
    assert published_rows and published.count("| class |") == len(SPLIT_METHODS) + len(published_rows)
    assert "| class | SI (c 600) | 19.79 ± 0.22 | — | — | Hsu et al.'s released log, GT-RIPL/Continual-Learning-Benchmark@851b474 " in published
    assert "VCL" not in published and "Table 2" not in published  # the task and domain scenarios' rows stay out
    assert report_main([str(out), str(tmp_path)]) == 2 and "results.json does not exist" in capsys.readouterr().err
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
        (["--joint", "last"], "--joint last is only valid with --sequence split"),
        (["--sequence", "split", "--scenario", "domain", "--joint", "first"], "unknown joint 'first'; allowed: every, last"),
        (["--sequence", "split", "--scenario", "class", "--guide", "iaf"], "got guide 'iaf'"),
        (["--sequence", "split", "--scenario", "task", "--methods", "scratch,transfer"], "got scratch"),
        (["--sequence", "split", "--scenario", "task", "--head", "shared"], "--head not used by --sequence split"),
        (["--sequence", "split", "--scenario", "task", "--guide", "lowrank"], "got guide 'lowrank'"),
        (["--preset", "vcl"], "--preset vcl is a preset of --sequence split"),
        (["--mean-init", "mle"], "--mean-init mle is only valid with --sequence split"),
        (["--sequence", "split", "--scenario", "task", "--mean-init", "zeros"], "unknown mean init 'zeros'; allowed: fan-in, truncnorm, normal, mle"),
        (["--sequence", "split", "--scenario", "task", "--pixels", "raw"], "unknown pixel scaling 'raw'; allowed: blundell, unit, standardize"),
        (["--sequence", "split", "--scenario", "task", "--val-fraction", "1"], "val-fraction must be a number in [0, 1), got 1.0"),
        (["--sequence", "split", "--scenario", "task", "--start", "middle"], "unknown start 'middle'; allowed: previous, fresh"),
        (["--sequence", "split", "--scenario", "domain", "--preset", "vcl", "--guide", "delta"], "mean init 'mle' sets the means of the guides normal, meanfield; got guide 'delta'"),
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


def _loc(guide, site: str) -> torch.Tensor:
    return guide.state_dict()[f"locs.{site}_unconstrained"]


def test_vcl_protocol_starts_task_0_at_a_max_likelihood_net_and_new_heads_truncated_normal(single_torch_thread):
    """--preset vcl's settings: all training images in [0, 1] (no validation split), task 0's means
    from a max-likelihood net that fits its task, new heads' means N(0, 0.1^2) cut at 0.2."""
    preset = SPLIT_PRESETS["vcl"]
    split = SplitConfig("task", fit=preset.fit, **preset.protocol)
    assert (split.mean_init, split.pixels, split.val_fraction, split.start) == ("mle", "unit", 0.0, "previous")
    train, _ = load_split_task(split_tasks("task")[0], pixels="unit", val_fraction=0.0)
    held_out, _ = load_split_task(split_tasks("task")[0])
    assert len(train) == 12665 and len(held_out) < len(train) and 0.99 < float(train.x.max()) <= 1.0  # MNIST's 5,923 zeros + 6,742 ones
    small = {"hidden": (16,), "epochs": 30, "num_particles": 2, "eval_samples": 4, "limit_train": 200}
    config = _config("task", **{**preset.overrides, "methods": ("transfer",), "seeds": (0,), **small})
    tasks, trains, tests, _ = _split_data_for(config, split)
    means = max_likelihood_means(config, split, trains[0], 0, 0, seed=0)
    net_logits = torch.relu(trains[0].x @ means["layers.0.weight"].T + means["layers.0.bias"]) @ means["layers.1.weight"][:2].T + means["layers.1.bias"][:2]
    assert (net_logits.argmax(-1) == trains[0].y).float().mean() > 0.95  # the net fits task 0 (0 vs 1)
    untouched = means["layers.1.weight"][2:]  # the other heads' rows get no gradient: their truncated-normal start
    assert untouched.abs().max() <= 0.2 and 0.05 < float(untouched.std()) < 0.12
    outcome = first_task_unit(config, split, seed=0, key="k")
    assert outcome.record["status"] == "ok" and outcome.record["row"][0] > 0.95
    assert max(outcome.record["baseline"]) < 0.9  # the baseline is the random start, not the max-likelihood net
    after = chain_unit(config, split, "transfer", 0, 1, "k1", outcome.state)
    assert after.record["status"] == "ok" and after.record["row"][0] > 0.9


def units_grid():
    from pyro_bbt.pruning import KAPPA_GRID
    return KAPPA_GRID


def _split_data_for(config, split):
    from pyro_bbt.split_sequence import _split_data
    return _split_data(config, split, seed=0)


@pytest.mark.parametrize("scenario", SCENARIOS)
def test_fresh_start_keeps_the_learnt_rows_and_nothing_else(scenario, single_torch_thread):
    """--start fresh (Swaroop et al.): q_t starts by the mean initialisation and init_scale, except
    the output rows of the tasks already learnt, which are q_{t-1}'s (in the domain scenario the
    shared head is no task's own: everything starts fresh)."""
    split = SplitConfig(scenario, fit="fixed", mean_init="truncnorm", start="fresh")
    config = _config(scenario, methods=("transfer",), min_steps=1, epochs=1)
    model, guide = new_split_posterior(config, split, config.base_prior(), seed=3, task=0)
    previous = {k: v + 5.0 for k, v in guide_state(guide).items()}  # far from any fresh start
    outcome = chain_unit(config, split, "transfer", 0, 2, "k", {"guide": previous, "prior": _prior_state(config, split)})
    assert outcome.record["status"] == "ok"
    fitted = outcome.state["guide"]
    for key, value in fitted.items():
        if "layers.1." in key and scenario != "domain":
            # heads/digits of tasks 0 and 1: kept (two Adam steps move a value by at most ~2 x 3e-2)
            torch.testing.assert_close(value[:4], previous[key][:4], atol=0.1, rtol=0, msg=key)
            assert (value[4:] - previous[key][4:]).abs().min() > 1.0, key
        else:
            assert (value - previous[key]).abs().min() > 1.0, key  # the shared layers start fresh
    locs = [v for k, v in fitted.items() if k.startswith("locs.layers.0")]
    assert all(v.abs().max() < 0.5 for v in locs)  # a truncated-normal start, one short fit away


def _prior_state(config, split):
    from pyro_bbt.checkpoint import prior_state
    model, guide = new_split_posterior(config, split, config.base_prior(), seed=0, task=0)
    return prior_state(next_prior(config, model, guide, split.untrained_rows(1)))


def test_protocol_is_recorded_in_config_and_results(tmp_path):
    out = tmp_path / "s"
    assert main(["--sequence", "split", "--scenario", "domain", *TINY_ARGS, "--methods", "transfer", "--mean-init", "truncnorm",
                 "--pixels", "unit", "--val-fraction", "0", "--start", "fresh", "--out", str(out)]) == 0
    protocol = {"mean_init": "truncnorm", "pixels": "unit", "val_fraction": 0.0, "start": "fresh"}
    assert json.loads((out / "results.json").read_text())["protocol"] == protocol
    assert {k: json.loads((out / "config.json").read_text())[k] for k in protocol} == protocol


def test_report_regimes_compares_runs_that_differ_in_one_setting(tmp_path, capsys):
    runs = []
    for name, extra in (("sigma-small", ["--init-scale", "0.01"]), ("sigma-wide", ["--init-scale", "0.1"])):
        runs.append(tmp_path / name)
        assert main(["--sequence", "split", "--scenario", "task", *TINY_ARGS, "--methods", "transfer", *extra, "--out", str(runs[-1])]) == 0
    capsys.readouterr()
    assert report_main([*map(str, runs), "--regimes", "--figure", str(tmp_path / "regimes.png")]) == 0
    out = capsys.readouterr().out
    assert (tmp_path / "regimes.png").stat().st_size > 0
    for run, sigma in zip(runs, ("0.01", "0.1")):
        results = json.loads((run / "results.json").read_text())
        acc = results["methods"]["transfer"]["summary"]["average_accuracy"]
        counts = "; ".join(f"{n:.0f}" for (n,) in results["methods"]["transfer"]["active_units_mean"])
        row = next(line for line in out.splitlines() if line.startswith(f"| {run.name} |"))
        assert row.startswith(f"| {run.name} | init_scale={sigma} | transfer | {100 * acc['mean']:.2f} ± 0.00 | ") and f"| {counts} |" in row, row
    other = tmp_path / "domain"
    assert main(["--sequence", "split", "--scenario", "domain", *TINY_ARGS, "--methods", "transfer", "--out", str(other)]) == 0
    capsys.readouterr()
    assert report_main([str(runs[0]), str(other), "--regimes"]) == 2
    assert "--regimes compares runs of one scenario; got domain, task" in capsys.readouterr().err


def test_report_regimes_draws_networks_of_different_depth_each_line_its_own_colour(tmp_path, capsys, monkeypatch):
    """A one-hidden-layer run beside a two-layer one (VCL at 784-200 against 784-256-256): the
    figure draws each run's units on its own layers, and no two lines share a colour, also past
    matplotlib's ten-colour cycle."""
    from matplotlib.axes import Axes

    from pyro_bbt.plots import regime_colours

    at = TINY_ARGS.index("--hidden")
    args = ["--sequence", "split", "--scenario", "task", *TINY_ARGS[:at], *TINY_ARGS[at + 2:], "--methods", "transfer"]
    runs = [tmp_path / "one-layer", tmp_path / "two-layers"]
    for hidden, out in zip(("16", "16,8"), runs):
        assert main([*args, "--hidden", hidden, "--out", str(out)]) == 0
    drawn: list[tuple[int, tuple]] = []   # (the panel's column: 0 accuracy, 1 + l hidden layer l + 1; the line's colour)
    plot, errorbar = Axes.plot, Axes.errorbar
    column = lambda axes: axes.get_subplotspec().colspan.start  # noqa: E731
    monkeypatch.setattr(Axes, "plot", lambda self, *a, **k: drawn.append((column(self), k["color"])) or plot(self, *a, **k))
    monkeypatch.setattr(Axes, "errorbar", lambda self, *a, **k: drawn.append((-1, k["color"])) or errorbar(self, *a, **k))
    capsys.readouterr()
    assert report_main([*map(str, runs), "--regimes", "--figure", str(tmp_path / "depth.png")]) == 0
    assert (tmp_path / "depth.png").stat().st_size > 0
    accuracy = [c for panel, c in drawn if panel == -1]
    layer_2 = [c for panel, c in drawn if panel == 2]
    assert len(accuracy) == 2 and len(set(accuracy)) == 2
    assert layer_2 == [accuracy[1]]   # only the two-layer run has a second hidden layer
    for n in (1, 10, 11, 20, 25):
        assert len(set(regime_colours(n))) == n


def test_report_merges_runs_of_one_configuration_made_for_different_seeds(tmp_path, capsys):
    """--seeds 0 and --seeds 1 run apart give the same table as --seeds 0,1 in one run."""
    at = TINY_ARGS.index("--seeds")
    args = ["--sequence", "split", "--scenario", "domain", *TINY_ARGS[:at], *TINY_ARGS[at + 2:], "--methods", "transfer"]
    both, apart = tmp_path / "both", [tmp_path / "s0", tmp_path / "s1"]
    assert main([*args, "--seeds", "0,1", "--out", str(both)]) == 0
    for seed, out in enumerate(apart):
        assert main([*args, "--seeds", str(seed), "--out", str(out)]) == 0
    capsys.readouterr()
    assert report_main([str(both), "--published"]) == 0
    expected = capsys.readouterr().out
    assert report_main([*map(str, apart), "--published"]) == 0
    assert capsys.readouterr().out == expected and "| 2/2 |" in expected
    # then the merged scenario in full (BWT, FWT, forgetting, the verdicts), both seeds in one row
    assert "**Split MNIST, domain scenario** (5 tasks, fit: fixed, seeds 0, 1;" in expected
    assert next(line for line in expected.splitlines() if line.startswith("| transfer | ") and "± 0.00 |" not in line)
    assert report_main([str(apart[0]), str(both), "--regimes"]) == 2
    assert "share seeds [0, 0, 1]: only runs of different seeds merge" in capsys.readouterr().err


def test_ewc_patience_stops_every_task_net_on_its_validation_split():
    """With ``ewc_patience`` each task's EWC net stops early on its own task's validation split
    (at most ``max_epochs_a`` epochs) and the record says how, task by task; its row is the best
    epoch's accuracy, so it differs from the fixed budget's. Without a validation split the CLI
    refuses in one line."""
    split = SplitConfig("domain", fit="fixed", val_fraction=0.2)
    patient = run_sequence(_config("domain", methods=("ewc",), ewc_patience=1, max_epochs_a=6), "split", log=lambda m: None, split=split)
    fits = patient["methods"]["ewc"]["per_seed"][0]["fits"]
    assert [f["task"] for f in fits] == [0, 1, 2, 3, 4]
    for fit in fits:
        stop = fit["early_stopping"]
        assert 1 <= stop["best_epoch"] <= stop["epochs"] <= 6 and 0.0 <= stop["best_val_accuracy"] <= 1.0
        if stop["stopped_by"] == "patience":  # patience 1: one epoch without a better one
            assert stop["epochs"] == stop["best_epoch"] + 1
        else:
            assert stop["stopped_by"] == "cap" and stop["epochs"] == 6
        assert fit["steps"] == stop["epochs"] * math.ceil(160 / 128)  # 200 images, a fifth held out
    row = next(line for line in split_sequence_table(patient).splitlines() if line.startswith("| ewc |"))  # its fits have no verdict
    assert "| — (deterministic) |" in row
    assert "this repo, early stopping (deterministic net) |" in split_comparison_table([patient])
    fixed = run_sequence(_config("domain", methods=("ewc",)), "split", log=lambda m: None, split=split)
    assert fixed["methods"]["ewc"]["per_seed"][0]["fits"] == []
    assert fixed["methods"]["ewc"]["per_seed"][0]["accuracy_matrix"] != patient["methods"]["ewc"]["per_seed"][0]["accuracy_matrix"]
    with pytest.raises(ValueError, match="ewc-patience 1 stops EWC's nets on each task's validation split, but val-fraction is 0"):
        run_sequence(_config("domain", methods=("ewc",), ewc_patience=1), "split", log=lambda m: None, split=SplitConfig("domain", val_fraction=0.0))


def test_the_cli_refuses_ewc_patience_without_a_validation_split(tmp_path, capsys):
    out = tmp_path / "run"
    code = main(["--sequence", "split", "--scenario", "domain", "--methods", "ewc", "--ewc-patience", "2", "--val-fraction", "0",
                 *TINY_ARGS, "--out", str(out)])
    assert code == 2 and not out.exists()
    assert "ewc-patience 2 stops EWC's nets on each task's validation split, but val-fraction is 0" in capsys.readouterr().err


def test_a_regime_label_names_the_kl_weight_even_of_runs_stored_before_it():
    """A run stored before ``kl_beta`` existed has none in its configuration: it ran at 1."""
    from pyro_bbt.split_report import regime_label

    old = {"fit": "rule", "protocol": {}, "config": {"init_scale": 0.05}}
    tempered = {"fit": "rule", "protocol": {}, "config": {"init_scale": 0.05, "kl_beta": 0.1}}
    assert regime_label(old, [tempered]) == "kl_beta=1" and regime_label(tempered, [old]) == "kl_beta=0.1"


def test_a_regime_label_names_the_verdict_a_run_stored_before_it_ran_with():
    """A run stored before the ELBO test, the overrule and the continuation existed ran with the
    two-point test, rate drops and no continuation: the label says so beside a run with them."""
    from pyro_bbt.split_report import regime_label

    old = {"fit": "rule", "protocol": {}, "config": {"init_scale": 0.05}}
    confirmed = {"fit": "rule", "protocol": {}, "config": {"init_scale": 0.05, "elbo_test": "means", "overrule": "restart", "continuation_epochs": 20}}
    assert regime_label(old, [confirmed]) == "elbo_test=two-point, overrule=drop, continuation_epochs=0"
    assert regime_label(confirmed, [old]) == "elbo_test=means, overrule=restart, continuation_epochs=20"
    assert regime_label(confirmed, [confirmed]) == "—"


def test_the_split_paper_preset_fits_as_the_a_to_b_paper_preset_and_paper_v1_as_before(capsys):
    """``--sequence split --preset paper`` fits every posterior by the A -> B paper-v5 preset's rule
    and verdict (``CONVERGED_FITS``: continuation, restarts, EWC stopped early); ``paper-v1`` is
    the split preset the published split tables used, otherwise the same protocol. A preset of
    the other experiment is refused in one line."""
    from pyro_bbt.config import CONVERGED_FITS, PRESETS
    from pyro_bbt.transfer import build_parser, config_from_args

    def parsed(*argv: str) -> ExperimentConfig:
        return config_from_args(build_parser().parse_args(["--sequence", "split", "--scenario", "task", *argv]))

    paper, v1, a_to_b = parsed("--preset", "paper"), parsed("--preset", "paper-v1"), ExperimentConfig(**PRESETS["paper-v5"])
    assert paper.continuation_epochs == 20 and paper.ewc_patience == 3 and paper.max_epochs_a == 3000 and paper.elbo_test == "means"
    for name in CONVERGED_FITS:
        assert getattr(paper, name) == getattr(a_to_b, name), name
        assert getattr(v1, name) == getattr(ExperimentConfig, name), name
    assert {k: v for k, v in paper.to_dict().items() if k not in CONVERGED_FITS} == {k: v for k, v in v1.to_dict().items() if k not in CONVERGED_FITS}
    assert main(["--sequence", "split", "--scenario", "task", "--preset", "paper-v2", "--out", "unused"]) == 2
    assert "--preset paper-v2 is a preset of the A -> B experiment; --sequence split's are paper, paper-v1, quick, vcl, vcl-swaroop" in capsys.readouterr().err
    assert main(["--preset", "vcl", "--out", "unused"]) == 2
    assert "--preset vcl is a preset of --sequence split" in capsys.readouterr().err


def test_report_merges_runs_whose_caps_differ_only_when_every_fit_ended_below_its_cap(single_torch_thread):
    """Two seeds of joint fitted by the rule in runs capped at 3,000 and 12,000 epochs: merged, the
    larger cap kept and named in a warning, when every fit converged below its run's cap; refused,
    naming the fit, when one stopped at its cap (it might have gone on under the other run's)."""
    joint = run_sequence(_config("domain", methods=("joint",)), "split", log=lambda m: None, split=SplitConfig("domain", fit="fixed", joint="last"))

    def by_rule(seed: int, cap: int, epochs: int, converged: bool) -> dict:
        run = copy.deepcopy(joint)
        run["fit"], run["config"] = "rule", {**run["config"], "seeds": [seed], "max_epochs_a": cap}
        entry = run["methods"]["joint"]["per_seed"][0]
        entry["seed"] = seed
        entry["fits"][0] |= {"epochs": epochs, "convergence": {"converged": converged, "epochs": epochs, "max_epochs": cap}}
        return run

    (merged,) = merge_split_runs([by_rule(0, 3000, 296, True), by_rule(1, 12000, 4863, True)])
    assert merged["config"]["max_epochs_a"] == 12000 and [e["seed"] for e in merged["methods"]["joint"]["per_seed"]] == [0, 1]
    assert merged["warnings"][-1] == "domain scenario: runs with max_epochs_a 3000, 12000 merged; every fit ended below its run's cap"
    with pytest.raises(ValueError, match="differ in max_epochs_a, and the fit joint, seed 0, task 4 did not end below its run's cap"):
        merge_split_runs([by_rule(0, 3000, 3000, False), by_rule(1, 12000, 4863, True)])
    with pytest.raises(ValueError, match="only runs of one configuration merge"):
        merge_split_runs([by_rule(0, 3000, 296, True), {**by_rule(1, 12000, 4863, True), "fit": "fixed"}])


def test_report_merges_split_runs_whose_checkpoint_interval_alone_differs(single_torch_thread):
    """How often a run checkpoints does not change what it computes: such runs merge without the
    caps' condition, and without a warning."""
    ewc = run_sequence(_config("domain", methods=("ewc",)), "split", log=lambda m: None, split=SplitConfig("domain", fit="fixed"))
    other = copy.deepcopy(ewc)
    other["config"] = {**other["config"], "seeds": [1], "checkpoint_seconds": 60.0}
    other["methods"]["ewc"]["per_seed"][0]["seed"] = 1
    (merged,) = merge_split_runs([ewc, other])
    assert [e["seed"] for e in merged["methods"]["ewc"]["per_seed"]] == [0, 1] and merged["warnings"] == ewc.get("warnings", [])
