"""benchmarks/fit_phases.py: a run's B fits split into Adam's epochs and the verdict's work."""

from __future__ import annotations

import json

import pytest

from conftest import load_benchmark
from pyro_bbt.transfer import main as transfer_main


def test_phase_rows_sum_each_units_epochs_by_phase_from_results_and_timing(tmp_path, capsys):
    fit_phases = load_benchmark("fit_phases")
    run_dir = tmp_path / "run"
    cli = ["--preset", "paper", "--hidden", "8", "--epochs-a", "1", "--max-epochs-a", "6", "--max-epochs-b", "6", "--limit-train", "200",
           "--limit-eval", "100", "--eval-samples", "2", "--fractions", "0.1", "--seeds", "0", "--methods", "scratch,transfer,ewc",
           "--quiet", "--out", str(run_dir)]
    assert transfer_main(cli) == 0
    rows = fit_phases.phase_rows([run_dir])
    results = json.loads((run_dir / "results.json").read_text())
    timing = json.loads((run_dir / "timing.json").read_text())
    assert sorted(r["method"] for r in rows) == ["scratch", "transfer"]  # EWC's nets have no phases
    for row in rows:
        index, unit = next((i, u) for i, u in enumerate(results["units"]) if u["method"] == row["method"])
        phases = [e["phase"] for e in unit["history"]]
        seconds = [timing[f"units/{index}/history/{j}"] for j in range(len(phases))]
        assert row["seeds"] == 1 and row["unit_seconds"] == timing[f"units/{index}"]
        assert row["fit_epochs"] == phases.count("fit") and row["continuation_epochs"] == phases.count("continuation")
        assert row["fit_seconds"] == pytest.approx(sum(t for p, t in zip(phases, seconds) if p == "fit"))
        assert row["fit_seconds"] + row["continuation_seconds"] <= row["unit_seconds"]
        if row["continuation_epochs"] == 0:
            assert row["verdict_seconds_est"] == 0.0
    table = fit_phases.phase_table(rows)
    assert "| run | scratch | 0.1 | 1 |" in table and table.rstrip().splitlines()[-1].startswith("All these units:")
    with pytest.raises(SystemExit) as exit_info:
        fit_phases.main(["--runs", str(tmp_path)])
    assert exit_info.value.code == 2 and f"no results.json and timing.json in {tmp_path}" in capsys.readouterr().err
