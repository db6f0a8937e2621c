"""Tests for the benchmark CLI (benchmarks/bench.py, outside the package): output schema only, no timing assertions."""

import json
import math
import os
import subprocess
import sys

import pytest
import torch
import torch.nn.functional as F

from conftest import load_benchmark
from pyro_bbt.guides import initialize_guide, posterior_loc_scale

bench = load_benchmark("bench")

CHEAP = ["torch-deterministic", "meanfield-local-1"]
PEERS = [name for name, config in bench.CONFIGS.items() if config.kind == bench.PEER]
RESULT_KEYS = {
    "name",
    "description",
    "epoch_seconds",
    "epochs",
    "train_size",
    "test_size",
    "steps_per_epoch",
    "median_epoch_seconds",
    "median_step_ms",
    "ratio_to_deterministic",
    "ratio_to_bbb16",
    "ratio_to_lrt",
    "ratio_to_bayes_torch_reparam",
    "ratio_to_fastest_peer",
    "round",
    "rounds",
    "round_medians",
    "round_cpu_medians",
    "predict_seconds",
    "compile_seconds",
    "predict_ratio_to_bayes_torch_reparam",
    "test_accuracy",
    "epoch_cpu_seconds",
    "median_epoch_cpu_seconds",
    "cpu_ratio_to_deterministic",
    "cpu_ratio_to_bbb16",
    "peak_rss_mib",
    "peak_rss_source",
    "rss_before_training_mib",
    "num_threads",
    "load_average",
}


def _positive_finite(value) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value) and value > 0


@pytest.fixture(scope="module")
def report(tmp_path_factory):
    out = tmp_path_factory.mktemp("bench") / "bench.json"
    argv = ["--train-size", "256", "--test-size", "300", "--epochs", "1", "--rounds", "2", "--configs", ",".join(CHEAP), "--threads", "1",
            "--out", str(out)]
    assert bench.main(argv) == 0
    return json.loads(out.read_text())


def test_report_top_level_and_meta(report):
    assert set(report) == {"meta", "results", "targets"}
    meta = report["meta"]
    assert meta["train_size"] == 256 and meta["test_size"] == 300
    assert meta["epochs"] == 1 and meta["rounds"] == 2
    assert meta["batch_size"] == 128
    assert meta["task_digits"] == [0, 1, 2, 3, 4]
    assert meta["num_threads"] == 1
    assert meta["complete"] is True


def test_results_schema_and_ratios(report):
    results = report["results"]
    assert [r["name"] for r in results] == CHEAP
    medians = {}
    for r in results:
        assert set(r) == RESULT_KEYS
        # two interleaved rounds of one epoch each
        assert r["epochs"] == 1 and r["rounds"] == 2 and r["round"] == 2
        assert len(r["epoch_seconds"]) == len(r["epoch_cpu_seconds"]) == len(r["round_medians"]) == 2
        assert all(_positive_finite(s) for s in r["epoch_seconds"] + r["epoch_cpu_seconds"])
        for key in (
            "median_epoch_seconds",
            "median_step_ms",
            "peak_rss_mib",
            "ratio_to_deterministic",
            "median_epoch_cpu_seconds",
            "cpu_ratio_to_deterministic",
        ):
            assert _positive_finite(r[key]), (r["name"], key, r[key])
        assert r["steps_per_epoch"] == 2  # 256 images / batch 128
        assert r["train_size"] == 256
        assert r["ratio_to_bbb16"] is None and r["cpu_ratio_to_bbb16"] is None  # torch-bbb-16 was not run
        assert r["ratio_to_fastest_peer"] is None  # no peer was run
        assert 0.0 <= r["test_accuracy"] <= 1.0
        assert r["median_epoch_seconds"] == pytest.approx(sum(r["epoch_seconds"]) / 2)  # the median of two rounds
        assert r["ratio_to_bayes_torch_reparam"] is None and r["predict_ratio_to_bayes_torch_reparam"] is None  # the peer was not run
        assert _positive_finite(r["predict_seconds"])
        assert r["compile_seconds"] is None  # none of the cheap configurations compiles
        assert r["median_step_ms"] == pytest.approx(1000 * r["median_epoch_seconds"] / r["steps_per_epoch"])
        assert r["peak_rss_mib"] >= r["rss_before_training_mib"] > 0
        medians[r["name"]] = (r["median_epoch_seconds"], r["median_epoch_cpu_seconds"])
    wall_ref, cpu_ref = medians["torch-deterministic"]
    for r in results:
        assert r["ratio_to_deterministic"] == pytest.approx(medians[r["name"]][0] / wall_ref)
        assert r["cpu_ratio_to_deterministic"] == pytest.approx(medians[r["name"]][1] / cpu_ref)
    assert results[0]["ratio_to_deterministic"] == pytest.approx(1.0)


def test_targets_schema(report):
    targets = {t["name"]: t for t in report["targets"]}
    assert set(targets) == {t.name for t in bench.TARGETS}
    for t in targets.values():
        assert {"config", "metric", "threshold", "unit", "description", "value", "met"} <= set(t)
    local = next(r for r in report["results"] if r["name"] == "meanfield-local-1")
    assert targets["local_vs_deterministic"]["value"] == pytest.approx(local["ratio_to_deterministic"])
    assert targets["local_vs_deterministic"]["met"] == (local["ratio_to_deterministic"] <= 2.5)
    assert targets["local_vs_bayes_torch"]["value"] is None and targets["local_vs_bayes_torch"]["met"] is None
    assert targets["default_peak_memory"]["value"] == pytest.approx(local["peak_rss_mib"])
    assert targets["weights16_vs_bbb16"]["value"] is None and targets["weights16_vs_bbb16"]["met"] is None


def test_summarize_ratios_with_both_references():
    raw = [
        {"name": "torch-deterministic", "epoch_seconds": [3.0, 1.0, 2.0], "epoch_cpu_seconds": [2, 2, 2], "steps_per_epoch": 10},
        {"name": "torch-bbb-16", "epoch_seconds": [8.0, 9.0, 10.0], "epoch_cpu_seconds": [16, 18, 20], "steps_per_epoch": 10},
        {"name": "meanfield-weights-16", "epoch_seconds": [12.0, 9.0, 100.0], "epoch_cpu_seconds": [20, 30, 40], "steps_per_epoch": 10},
    ]
    results = {r["name"]: r for r in bench.summarize(raw)}
    assert results["meanfield-weights-16"]["median_epoch_seconds"] == 12.0
    assert results["meanfield-weights-16"]["ratio_to_deterministic"] == pytest.approx(6.0)
    assert results["meanfield-weights-16"]["ratio_to_bbb16"] == pytest.approx(12.0 / 9.0)
    assert results["torch-bbb-16"]["ratio_to_bbb16"] == pytest.approx(1.0)
    assert results["meanfield-weights-16"]["cpu_ratio_to_deterministic"] == pytest.approx(15.0)
    assert results["meanfield-weights-16"]["cpu_ratio_to_bbb16"] == pytest.approx(30.0 / 18.0)
    targets = {t["name"]: t for t in bench.evaluate_targets(list(results.values()))}
    assert targets["weights16_vs_bbb16"]["met"] is False
    assert targets["local_vs_deterministic"]["met"] is None


def test_predictive_accuracy_averages_the_softmax_of_the_requested_samples():
    split = bench.Split(torch.zeros(5, 2), torch.tensor([0, 0, 1, 1, 1]))
    asked = []

    def sample_logits(x, num_samples):
        asked.append(num_samples)
        # one sample says class 0 firmly, the other two class 1 mildly: the mean of the softmax picks 0
        return torch.tensor([[9.0, 0.0], [0.0, 1.0], [0.0, 1.0]])[:, None, :].expand(3, x.shape[0], 2)

    assert bench.predictive_accuracy(sample_logits, split, num_samples=3, batch_size=2) == pytest.approx(2 / 5)
    assert asked == [3, 3, 3]


def test_rounds_are_merged_by_the_median_of_each_rounds_median():
    def raw(name, seconds, round_index, rss):
        return {"name": name, "epoch_seconds": seconds, "epoch_cpu_seconds": seconds, "steps_per_epoch": 10, "round": round_index,
                "peak_rss_mib": rss, "test_accuracy": 0.5 + round_index / 10, "predict_seconds": rss / 100}

    rounds = [raw("torch-deterministic", [1.0, 3.0, 2.0], 1, 100.0), raw("bayes-torch-reparam", [4.0, 4.0, 5.0], 1, 300.0),
              raw("meanfield-local-1", [2.0, 30.0, 3.0], 1, 200.0),
              raw("torch-deterministic", [1.0, 1.0, 1.0], 2, 110.0), raw("bayes-torch-reparam", [4.0, 6.0, 6.0], 2, 290.0),
              raw("meanfield-local-1", [2.0, 2.0, 2.0], 2, 150.0),
              raw("torch-deterministic", [9.0, 9.0, 9.0], 3, 105.0), raw("bayes-torch-reparam", [5.0, 5.0, 5.0], 3, 310.0),
              raw("meanfield-local-1", [4.0, 4.0, 4.0], 3, 120.0)]
    results = {r["name"]: r for r in bench.summarize(rounds)}
    local = results["meanfield-local-1"]
    # round medians 3, 2, 4 -> 3; a disturbed round (the 9 s deterministic one) counts once
    assert local["round_medians"] == [3.0, 2.0, 4.0] and local["median_epoch_seconds"] == 3.0
    assert results["torch-deterministic"]["median_epoch_seconds"] == 2.0
    assert local["ratio_to_bayes_torch_reparam"] == pytest.approx(3.0 / 5.0)
    assert local["predict_seconds"] == 1.5 and local["predict_ratio_to_bayes_torch_reparam"] == pytest.approx(1.5 / 3.0)  # medians of rounds
    assert local["epochs"] == 3 and local["rounds"] == 3 and local["peak_rss_mib"] == 200.0 and local["test_accuracy"] == pytest.approx(0.8)
    targets = {t["name"]: t for t in bench.evaluate_targets(list(results.values()))}
    assert targets["local_vs_bayes_torch"]["met"] is True and targets["local_vs_deterministic"]["met"] is True


@pytest.mark.parametrize(
    "argv",
    [["--configs", "nope"], ["--configs", ""], ["--epochs", "0"], ["--test-size", "0"], ["--threads", "x"], ["--bogus"]],
)
def test_bad_flags_exit_2(argv, capsys):
    with pytest.raises(SystemExit) as info:
        bench.main(argv)
    assert info.value.code == 2


def test_runs_as_a_script_from_any_directory(tmp_path):
    """``python benchmarks/bench.py`` as a user runs it, outside the package and from another
    folder: it imports the installed pyro_bbt, and its spawned child finds the script's functions."""
    out = tmp_path / "bench.json"
    command = [sys.executable, bench.__file__, "--configs", "torch-deterministic", "--train-size", "256", "--test-size", "100",
               "--epochs", "1", "--rounds", "1", "--threads", "1", "--out", out.name]
    result = subprocess.run(command, cwd=tmp_path, capture_output=True, text=True, timeout=300,
                            env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert result.returncode == 0, result.stderr
    assert [r["name"] for r in json.loads(out.read_text())["results"]] == ["torch-deterministic"]
    assert f"wrote {out.name}" in result.stdout


def test_profile_names_the_training_functions(capsys, tmp_path):
    out = tmp_path / "not-written.json"
    argv = ["--profile", "meanfield-local-1", "--train-size", "256", "--epochs", "1", "--threads", "1", "--out", str(out)]
    assert bench.main(argv) == 0
    text = capsys.readouterr().out
    assert text.startswith("meanfield-local-1: 1 epoch(s), 2 steps")
    assert "function calls" in text and "tottime" in text  # a pstats table follows
    assert not out.exists()  # profiling is not a timing run: no JSON report


def test_compare_prints_speed_ups_of_two_reports(report, tmp_path, capsys):
    slower = json.loads(json.dumps(report))
    for result in slower["results"]:
        result["median_epoch_seconds"] *= 2
    (tmp_path / "before.json").write_text(json.dumps(slower))
    (tmp_path / "after.json").write_text(json.dumps(report))
    assert bench.main(["--compare", str(tmp_path / "before.json"), str(tmp_path / "after.json")]) == 0
    lines = capsys.readouterr().out.strip().splitlines()
    assert len(lines) == 2 + len(report["results"])
    for line, result in zip(lines[2:], report["results"]):
        assert line.startswith(f"| {result['name']} | ") and "| 2.00x |" in line


def test_compare_refuses_a_file_that_is_not_a_report(tmp_path, capsys, report):
    (tmp_path / "after.json").write_text(json.dumps(report))
    (tmp_path / "other.json").write_text(json.dumps({"rows": []}))
    for bad in (tmp_path / "missing.json", tmp_path / "other.json"):
        with pytest.raises(SystemExit) as exit_info:
            bench.main(["--compare", str(bad), str(tmp_path / "after.json")])
        assert exit_info.value.code == 2
        assert str(bad) in capsys.readouterr().err


def test_every_configuration_outside_pyro_bbt_has_a_trainer():
    assert set(bench.TRAINERS) == {name for name, config in bench.CONFIGS.items() if config.kind != "pyro"}


def _require(name: str) -> None:
    package = bench.missing_package(bench.CONFIGS[name])
    if package is not None:
        pytest.skip(f"{package} is not installed")


@pytest.mark.parametrize("name", PEERS)
def test_peer_trains_an_epoch_and_records_its_test_accuracy(name, single_torch_thread):
    _require(name)
    result = bench.run_config(name, 1, train_size=256, test_size=200)  # raises FloatingPointError on a non-finite loss
    assert result["steps_per_epoch"] == 2 and result["test_size"] == 200 and len(result["epoch_seconds"]) == 1
    assert all(_positive_finite(s) for s in result["epoch_seconds"] + result["epoch_cpu_seconds"])
    assert 0.0 <= result["test_accuracy"] <= 1.0 and _positive_finite(result["predict_seconds"])
    split, _ = bench._load_splits(256)
    x, y = next(split.batches(bench.BATCH_SIZE, shuffle=False))
    assert math.isfinite(bench.TRAINERS[name](len(split)).step(x, y))


@pytest.mark.parametrize(
    "name, build",
    [
        ("bayes-torch-reparam", lambda: bench.bayes_torch_mlp("LinearReparameterization")),
        ("bayes-torch-flipout", lambda: bench.bayes_torch_mlp("LinearFlipout")),
        ("blitz", bench.blitz_mlp),
    ],
)
def test_peer_layers_start_at_the_references_posterior_scale(name, build, single_torch_thread):
    _require(name)
    torch.manual_seed(0)
    net = build()
    # both libraries: sigma = log1p(exp(rho)), rho ~ N(softplus^{-1}(0.01), 0.1) per element
    rho_names = {"rho_weight", "rho_bias", "weight_rho", "bias_rho"}  # bayesian-torch's, blitz's
    sigma = torch.cat([F.softplus(p.detach()).flatten() for n, p in net.named_parameters() if n.split(".")[-1] in rho_names])
    assert sigma.numel() == 784 * 400 + 400 + 400 * 400 + 400 + 400 * 5 + 5
    assert sigma.median().item() == pytest.approx(bench.INIT_SCALE, rel=0.01)
    assert 0.005 < sigma.min().item() and sigma.max().item() < 0.02


def test_autonormal_svi_starts_at_the_references_posterior_scale_and_zero_means():
    model, guide, _ = bench.autonormal_svi()
    initialize_guide(guide, bench.SIZES[0])
    for loc, scale in posterior_loc_scale(guide, model).values():
        assert torch.allclose(scale, torch.full_like(scale, bench.INIT_SCALE))
        assert not loc.any()  # AutoNormal's default init_to_feasible: every mean starts at 0


def test_bayes_torch_kl_is_the_closed_form_sum_over_weights():
    _require("bayes-torch-reparam")
    net = bench.bayes_torch_mlp("LinearReparameterization")
    posterior = [
        (layer.mu_weight, F.softplus(layer.rho_weight), layer.mu_bias, F.softplus(layer.rho_bias))
        for layer in net if hasattr(layer, "mu_weight")
    ]
    expected = bench.MeanFieldMLP.kl_to_standard_normal(posterior)
    assert bench.bayes_torch_kl(net).item() == pytest.approx(expected.item(), rel=1e-4)


FAKE_PEER = bench.BenchConfig("fake-peer", bench.PEER, "a peer that is not installed",
                              module="pyro_bbt_no_such_module", package="no-such-package")


def test_a_peer_whose_package_is_missing_is_skipped_unless_named():
    configs = {"torch-deterministic": bench.CONFIGS["torch-deterministic"], "fake-peer": FAKE_PEER}
    assert bench.missing_package(FAKE_PEER) == "no-such-package"
    assert bench.missing_package(bench.CONFIGS["torch-deterministic"]) is None
    selected, skipped = bench.select_configs(None, configs)
    assert selected == ["torch-deterministic"]
    assert skipped == ['fake-peer: skipped, package no-such-package is not installed (pip install -e ".[bench]")']
    with pytest.raises(ValueError, match="fake-peer needs package no-such-package"):
        bench.select_configs(["torch-deterministic", "fake-peer"], configs)


def test_cli_naming_a_missing_peer_exits_2_and_names_the_package(monkeypatch, capsys, tmp_path):
    monkeypatch.setitem(bench.CONFIGS, FAKE_PEER.name, FAKE_PEER)  # a real config whose module does not exist
    args = bench._resolve_defaults(bench.build_parser().parse_args([]))
    assert "fake-peer" not in args.configs and any("no-such-package" in line for line in args.skipped)
    for argv in (["--configs", "fake-peer"], ["--profile", "fake-peer"]):
        with pytest.raises(SystemExit) as info:
            bench.main([*argv, "--out", str(tmp_path / "bench.json")])
        assert info.value.code == 2
        assert "no-such-package" in capsys.readouterr().err
    assert not (tmp_path / "bench.json").exists()


def test_summarize_and_table_report_accuracy_and_the_fastest_peer():
    def raw(name, seconds, accuracy):
        return {"name": name, "epoch_seconds": [seconds], "epoch_cpu_seconds": [seconds], "steps_per_epoch": 10,
                "test_accuracy": accuracy, "peak_rss_mib": 500.0}

    results = bench.summarize([raw("torch-deterministic", 1.0, 0.99), raw("blitz", 4.0, 0.2),
                               raw("pyro-autonormal-svi", 8.0, 0.5), raw("meanfield-local-1", 2.0, 0.97)])
    ratios = {r["name"]: r["ratio_to_fastest_peer"] for r in results}
    assert ratios == pytest.approx({"torch-deterministic": 0.25, "blitz": 1.0, "pyro-autonormal-svi": 2.0,
                                    "meanfield-local-1": 0.5})
    header, rule, *rows = bench.markdown_table(results).splitlines()
    columns = [c.strip() for c in header.strip("|").split("|")]
    assert "test accuracy" in columns and "x fastest peer" in columns
    assert len(rule.strip("|").split("|")) == len(columns)
    for row, r in zip(rows, results):
        cells = [c.strip() for c in row.strip("|").split("|")]
        assert len(cells) == len(columns)
        assert cells[columns.index("test accuracy")] == f"{r['test_accuracy']:.3f}"
        assert cells[columns.index("x fastest peer")] == f"{r['ratio_to_fastest_peer']:.2f}x"
    no_peer = bench.summarize([raw("torch-deterministic", 1.0, 0.99)])
    assert no_peer[0]["ratio_to_fastest_peer"] is None
    assert "| n/a |" in bench.markdown_table(no_peer)
