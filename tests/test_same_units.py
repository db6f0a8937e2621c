"""benchmarks/same_units.py: a rerun compared with a published run, stage by stage and unit by unit."""

from __future__ import annotations

import json

import pytest

from conftest import load_benchmark


def _run(accuracy: float, epochs: int, with_extra_unit: bool = False) -> dict:
    unit = {"method": "transfer", "fraction": 0.01, "seed": 0, "steps": 90, "status": "ok",
            "b_test": {"accuracy": accuracy, "nll": 0.5}, "a_test_after": {"accuracy": 0.98},
            "accuracy_matrix": [[0.99, 0.2], [0.98, accuracy]], "curve": [{"step": 9, "b_test_accuracy": 0.3}],
            "convergence": {"converged": True, "epochs": epochs, "elbo_trace": [-900.0, -800.5]}}
    units = [unit]
    if with_extra_unit:
        units.append({**unit, "method": "scratch"})
    stage = {"seed": 0, "kind": "bayesian", "steps": 2800, "a_test": {"accuracy": 0.99},
             "convergence": {"converged": True, "epochs": 200, "elbo_trace": [-7000.0]}}
    return {"task_a": [stage], "units": units}


def test_identical_runs_pass_and_every_difference_is_named(tmp_path, capsys):
    same_units = load_benchmark("same_units")
    published = tmp_path / "published"
    published.mkdir()
    (published / "results.json").write_text(json.dumps(_run(0.8, 103)))
    (tmp_path / "same.json").write_text(json.dumps(_run(0.8, 103)))
    assert same_units.main([str(tmp_path / "same.json"), str(published)]) == 0
    assert "2 items compared (1 task-A stages, 1 B units): identical; Bayesian fits converged in the rerun: 2 of 2" in capsys.readouterr().out

    (tmp_path / "other.json").write_text(json.dumps(_run(0.8000001, 104, with_extra_unit=True)))
    assert same_units.main([str(tmp_path / "other.json"), str(published)]) == 1
    out = capsys.readouterr().out
    assert "transfer at 0.01 of B, seed 0: b_test.accuracy 0.8000001 (rerun) != 0.8 (published)" in out
    assert "transfer at 0.01 of B, seed 0: accuracy_matrix[1][1] 0.8000001 (rerun) != 0.8 (published)" in out
    assert "transfer at 0.01 of B, seed 0: convergence.epochs 104 (rerun) != 103 (published)" in out
    assert "scratch at 0.01 of B, seed 0: not in the published run" in out
    assert "3 items compared (1 task-A stages, 2 B units): 2 differ (4 values)" in out
    # a relative tolerance forgives the accuracy, not the epochs
    compared, lines = same_units.differences(_run(0.8000001, 104), _run(0.8, 103), rel_tol=1e-5)
    assert compared == 2 and lines == [("transfer at 0.01 of B, seed 0", "convergence.epochs 104 (rerun) != 103 (published)")]


def test_a_file_that_is_not_a_runs_results_is_refused_by_name(tmp_path, capsys):
    same_units = load_benchmark("same_units")
    (tmp_path / "notes.json").write_text("not json")
    (tmp_path / "other.json").write_text(json.dumps({"units": []}))
    with pytest.raises(SystemExit) as exit_info:
        same_units.main([str(tmp_path / "notes.json"), str(tmp_path / "other.json")])
    assert exit_info.value.code == 2
    assert f"{tmp_path / 'notes.json'}: not JSON" in capsys.readouterr().err
    (tmp_path / "good.json").write_text(json.dumps(_run(0.8, 103)))
    with pytest.raises(SystemExit):
        same_units.main([str(tmp_path / "good.json"), str(tmp_path / "other.json")])
    assert "not an A -> B run's results.json (it needs 'task_a' and 'units')" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        same_units.main([str(tmp_path / "good.json"), str(tmp_path / "missing")])
    assert "missing: no results.json there" in capsys.readouterr().err
