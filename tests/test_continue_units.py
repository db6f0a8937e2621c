"""benchmarks/continue_units.py (outside the package): B units of a tiny A -> B grid (200 images,
784-8, at most 6 epochs a fit) refitted exactly as ``python -m pyro_bbt.transfer`` fits them, then
continued, their accuracies measured as last iterate and tail average at every power of two."""

import json

import pytest

from conftest import load_benchmark
from pyro_bbt.transfer import main as transfer_main

continue_units = load_benchmark("continue_units")

GRID = ["--preset", "paper", "--hidden", "8", "--epochs-a", "1", "--max-epochs-a", "6", "--max-epochs-b", "6", "--limit-train", "200",
        "--limit-eval", "100", "--eval-samples", "2", "--fractions", "0.1", "--seeds", "0", "--quiet"]


@pytest.fixture(scope="module")
def grid_run(tmp_path_factory):
    """The grid's own run of scratch and transfer: q_A stored in ``stages/``, the records in results.json."""
    run_dir = tmp_path_factory.mktemp("grid") / "run"
    assert transfer_main([*GRID, "--methods", "scratch,transfer", "--out", str(run_dir)]) == 0
    return run_dir


def test_the_refit_reproduces_the_grids_units_and_is_continued(tmp_path, grid_run, single_torch_thread, capsys):
    out = tmp_path / "continued.json"
    argv = ["--epochs", "4", "--eval-draws", "2", "--stages-from", str(grid_run), "--published", str(grid_run / "results.json"),
            "--out", str(out), "--", *GRID, "--methods", "scratch,transfer"]
    assert continue_units.main(argv) == 0
    record = json.loads(out.read_text())
    published = {u["method"]: u for u in json.loads((grid_run / "results.json").read_text())["units"]}
    assert [u["key"] for u in record["units"]] == ["scratch-f0.1-s0", "transfer-f0.1-s0"]
    for unit in record["units"]:
        grid = published[unit["method"]]
        # the same fit as the grid's: epochs, verdict and both accuracies, drawn as the grid draws them
        assert unit["pass"]["epochs"] == grid["convergence"]["epochs"] and unit["pass"]["converged"] == grid["convergence"]["converged"]
        assert unit["pass"]["b_test"] == grid["b_test"]["accuracy"] == unit["published_b_test"]
        assert unit["pass"]["a_test_after"] == grid["a_test_after"]["accuracy"]
        assert unit["q_a"] == (None if unit["method"] == "scratch" else {"source": str(grid_run), "epochs": 6, "converged": False})
        points = unit["points"]
        assert [p["epoch"] for p in points] == [1, 2, 4] and [p["avg_n"] for p in points] == [1, 1, 2]
        assert points[0]["avg_b_test"] == points[0]["last_b_test"] and points[0]["avg_elbo"] == pytest.approx(points[0]["last_elbo"], rel=1e-12)
        assert points[2]["avg_elbo"] != pytest.approx(points[2]["last_elbo"], rel=1e-9)  # an average of two iterates is neither
        for key in ("b_test", "a_test"):
            assert all(0.0 <= value <= 1.0 for value in [unit["pass"]["seeded"][f"pass_{key}"]] + [p[f"{w}_{key}"] for p in points for w in ("last", "avg")])
        assert unit["pass"]["seeded"]["pass_kl"] > 0
    assert "transfer-f0.1-s0: pass at 6 epochs" in capsys.readouterr().out
    # --table: a row per unit, and transfer - scratch per seed at the pass and at the last point
    assert continue_units.main(["--table", str(out)]) == 0
    table = capsys.readouterr().out
    scratch, transfer = record["units"]
    at_pass = transfer["pass"]["b_test"] - scratch["pass"]["b_test"]
    seeded = transfer["pass"]["seeded"]["pass_b_test"] - scratch["pass"]["seeded"]["pass_b_test"]
    last = transfer["points"][-1]["last_b_test"] - scratch["points"][-1]["last_b_test"]
    assert f"| shared | 0 | {at_pass:+.4f} | {seeded:+.4f} | {last:+.4f} |" in table and f"| shared | mean [95 % t interval] of 1 | {at_pass:+.4f} |" in table
    assert f"| shared | scratch-f0.1-s0 | 6 (not converged) | {scratch['pass']['b_test']:.4f}, " in table
    assert continue_units.main(["--table", str(tmp_path / "missing.json")]) == 2
    assert "--table takes this bench's JSON files" in capsys.readouterr().err


def test_q_a_is_fitted_where_no_stage_is_given_and_matches_the_stored_one(tmp_path, grid_run, single_torch_thread):
    out = tmp_path / "fitted.json"
    assert continue_units.main(["--epochs", "1", "--eval-draws", "2", "--out", str(out), "--", *GRID, "--methods", "transfer"]) == 0
    [unit] = json.loads(out.read_text())["units"]
    grid = next(u for u in json.loads((grid_run / "results.json").read_text())["units"] if u["method"] == "transfer")
    assert unit["q_a"]["source"] == "fitted" and unit["pass"]["b_test"] == grid["b_test"]["accuracy"]


@pytest.mark.parametrize("argv, message", [
    (["--", *GRID, "--methods", "ewc"], "--methods ewc: none of scratch, transfer, finetune"),
    (["--", *GRID, "--methods", "scratch", "--fit-b", "fixed", "--polish-steps-b", "0"], "must fit B by the rule with a verdict"),
    (["--", *GRID, "--methods", "scratch", "--fractions", "1.5"], "the grid's flags: fraction must be in (0, 1], got 1.5"),
    (["--", *GRID, "--methods", "scratch", "--sequence", "split"], "the grid's flags: --sequence split: only the A -> B grid's units"),
    (["--factor", "0"], "--factor must be > 0, got 0.0"),
    ([], "give the grid's flags after --"),
    (["--published", "notes.txt", "--", *GRID, "--methods", "scratch"], "not a results.json (Expecting value"),
])
def test_bad_settings_are_refused_before_any_fit(tmp_path, capsys, argv, message):
    out = tmp_path / "continued.json"
    (tmp_path / "notes.txt").write_text("not json")
    argv = [str(tmp_path / a) if a == "notes.txt" else a for a in argv]
    with pytest.raises(SystemExit) as exit_info:
        continue_units.main(["--out", str(out), *argv])
    assert exit_info.value.code == 2 and message in capsys.readouterr().err and not out.exists()


def test_a_stage_of_another_configuration_is_refused(tmp_path, grid_run, capsys):
    config = continue_units.config_from_args(continue_units.build_parser().parse_args([*GRID, "--prior-scale", "0.5"]))
    with pytest.raises(ValueError, match=r"made by another configuration \(.*prior_scale"):
        continue_units.stored_stage(grid_run, config, "A-bayesian-s0")
    assert continue_units.stored_stage(tmp_path, config, "A-bayesian-s0") is None
    out = tmp_path / "continued.json"
    with pytest.raises(SystemExit) as exit_info:  # the CLI says so in one line, before any fit, and writes nothing
        continue_units.main(["--stages-from", str(grid_run), "--out", str(out), "--", *GRID, "--prior-scale", "0.5", "--methods", "transfer"])
    err = capsys.readouterr().err.strip().splitlines()
    assert exit_info.value.code == 2 and f"--stages-from {grid_run}:" in err[-1] and "prior_scale" in err[-1] and not out.exists()
