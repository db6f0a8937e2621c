"""benchmarks/schedule_replay.py: finished runs' unit times replayed through the engine's dispatch."""

from __future__ import annotations

import json

import pytest

from conftest import load_benchmark


def test_the_replay_runs_the_engines_own_order_and_the_oracle_order_reaches_the_bound():
    replay = load_benchmark("schedule_replay")
    Timed = replay.Timed
    # the plan's order puts two independent 50 s units before a 1 s stage that a 100 s unit needs
    order = [Timed("b1", 50.0, None, 0), Timed("b2", 50.0, None, 0), Timed("A", 1.0, None, 0), Timed("long", 100.0, "A", 0)]
    assert replay.replay(order, 1) == pytest.approx(201.0)
    assert replay.replay(order, 2) == pytest.approx(151.0)  # b1, b2 to 50, then A, then long from 51 to 151
    chains = replay.chain_lengths(order, lambda u: u.seconds)
    assert chains == {"b1": 50.0, "b2": 50.0, "A": 101.0, "long": 100.0}
    oracle = replay.by_priority(order, chains)
    assert [u.key for u in oracle] == ["A", "long", "b1", "b2"]
    assert replay.replay(oracle, 2) == pytest.approx(101.0)  # the bound: max(201 / 2, 101)
    assert [u.key for u in replay.by_priority(order, replay.chain_lengths(order, lambda u: 1.0))] == ["A", "b1", "b2", "long"]


def test_a_run_is_read_as_stages_then_units_per_seed_with_stage_seconds_from_its_epochs(tmp_path, capsys):
    replay = load_benchmark("schedule_replay")
    run = tmp_path / "run"
    run.mkdir()
    results = {"task_a": [{"seed": 0, "kind": "bayesian"}, {"seed": 0, "kind": "deterministic"}],
               "units": [{"method": "scratch", "fraction": 0.01, "seed": 0}, {"method": "transfer", "fraction": 0.01, "seed": 0},
                         {"method": "ewc", "fraction": 0.01, "seed": 0}]}
    timing = {"task_a/0/history/0": 2.0, "task_a/0/history/1": 3.0, "units/0": 7.0, "units/1": 11.0, "units/2": 13.0, "wall_clock": 1.0}
    (run / "results.json").write_text(json.dumps(results))
    (run / "timing.json").write_text(json.dumps(timing))
    order = replay.load_run(run, ewc_stage_seconds=4.0)
    assert [(u.key, u.seconds, u.needs) for u in order] == [
        ("A-bayesian-s0", 5.0, None), ("A-ewc-s0", 4.0, None), ("scratch-f0.01-s0", 7.0, None),
        ("transfer-f0.01-s0", 11.0, "A-bayesian-s0"), ("ewc-f0.01-s0", 13.0, "A-ewc-s0")]
    out = tmp_path / "replay.json"
    assert replay.main(["--runs", str(run), "--workers", "1,2", "--ewc-stage-seconds", "4", "--out", str(out)]) == 0
    rows = json.loads(out.read_text())["rows"]
    assert [r["workers"] for r in rows] == [1, 2] and rows[0]["makespan"]["plan"] == pytest.approx(40.0)
    assert all(r["makespan"]["critical path (oracle)"] >= r["lower_bound"] - 1e-9 for r in rows)
    assert "W=2" in capsys.readouterr().out
    # a smaller grid: only the units at the fractions asked for, every stage kept
    results["units"].append({"method": "scratch", "fraction": 0.1, "seed": 0})
    timing["units/3"] = 17.0
    (run / "results.json").write_text(json.dumps(results))
    (run / "timing.json").write_text(json.dumps(timing))
    assert [u.key for u in replay.load_run(run, 4.0)][-1] == "scratch-f0.1-s0"
    assert replay.load_run(run, 4.0, fractions=(0.01,)) == order
    assert [(u.key, u.seconds) for u in replay.load_run(run, 4.0, fractions=(0.1,))] == [("A-bayesian-s0", 5.0), ("A-ewc-s0", 4.0), ("scratch-f0.1-s0", 17.0)]
    assert replay.main(["--runs", str(run), "--workers", "1", "--fractions", "0.1", "--ewc-stage-seconds", "4", "--out", str(out)]) == 0
    assert json.loads(out.read_text())["rows"][0]["makespan"]["plan"] == pytest.approx(26.0)
    capsys.readouterr()
    for argv, message in ((["--runs", str(run), "--fractions", "1"], "holds no B unit at fractions 1; it has 0.01, 0.1"),
                          (["--runs", str(run), "--fractions", "x"], "--fractions must be numbers, comma-separated, got 'x'"),
                          (["--runs", str(tmp_path)], f"{tmp_path} is not a finished run: it needs results.json and timing.json"),
                          (["--runs", str(run), "--workers", "0,2"], "--workers must be integers >= 1, comma-separated, got '0,2'")):
        with pytest.raises(SystemExit) as exit_info:
            replay.main(argv)
        assert exit_info.value.code == 2 and message in capsys.readouterr().err
