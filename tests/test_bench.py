"""Tests for the benchmark CLI (pyro_bbt.bench): output schema only, no timing assertions."""

import json
import math

import pytest

from pyro_bbt import bench

CHEAP = ["torch-deterministic", "meanfield-local-1"]
RESULT_KEYS = {
    "name",
    "description",
    "epoch_seconds",
    "epochs",
    "train_size",
    "steps_per_epoch",
    "median_epoch_seconds",
    "median_step_ms",
    "ratio_to_deterministic",
    "ratio_to_bbb16",
    "ratio_to_lrt",
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
    argv = ["--train-size", "256", "--epochs", "1", "--configs", ",".join(CHEAP), "--threads", "1", "--out", str(out)]
    assert bench.main(argv) == 0
    return json.loads(out.read_text())


def test_report_top_level_and_meta(report):
    assert set(report) == {"meta", "results", "targets"}
    meta = report["meta"]
    assert meta["train_size"] == 256
    assert meta["epochs"] == 1
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
        assert r["epochs"] == len(r["epoch_seconds"]) == 1
        assert len(r["epoch_cpu_seconds"]) == 1
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
        assert r["median_epoch_seconds"] == pytest.approx(r["epoch_seconds"][0])
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
    assert targets["local_vs_deterministic"]["met"] == (local["ratio_to_deterministic"] <= 1.5)
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


@pytest.mark.parametrize(
    "argv",
    [["--configs", "nope"], ["--configs", ""], ["--epochs", "0"], ["--threads", "x"], ["--bogus"]],
)
def test_bad_flags_exit_2(argv, capsys):
    with pytest.raises(SystemExit) as info:
        bench.main(argv)
    assert info.value.code == 2


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
