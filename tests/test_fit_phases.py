"""benchmarks/fit_phases.py: a run's B fits split into Adam's epochs and the verdict's work."""

from __future__ import annotations

import json

import pytest
import torch

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
    # --stages: the q_A stage's epochs split into Adam's and the verdict's seconds, and the floors its rule and verdict set
    stage_file = next((run_dir / "stages").glob("*A-bayesian-s0.pt"))
    stage = fit_phases.stage_row(stage_file)
    saved = torch.load(stage_file, weights_only=True)["data"]
    history = saved["history"]
    assert stage["epochs"] == len(history) == stage["fit_epochs"] + stage["continuation_epochs"]
    assert stage["fit_epochs"] == [e["phase"] for e in history].count("fit")
    assert stage["seconds"] == pytest.approx(sum(e["seconds"] for e in history))
    assert stage["adam_seconds"] + stage["verdict_seconds"] == pytest.approx(stage["seconds"])
    assert stage["judged_epochs"] == sum(e["verdict"] is not None for e in history) >= 1
    assert stage["verdict_seconds"] >= stage["one_pass_verdict_seconds"] >= 0.0
    # the paper preset's rule: 4 rates (3 drops) of 2 x 5 epochs under the window-means test, a continuation as long as the fit
    # (at least 20 epochs): 40 + 40; an optimiser at the optimum from the start still owes the shortest continuation
    assert stage["rule_floor_epochs"] == 80 and stage["oracle_floor_epochs"] == 20
    assert stage["rule_floor_seconds"] == pytest.approx(80 * stage["epoch_seconds"] + stage["one_pass_verdict_seconds"])
    assert fit_phases.rule_floor_epochs(dict(saved["convergence"]["rule"], elbo_test="two-point")) == 6 + 3 * 6
    assert fit_phases.rule_floor_epochs(dict(saved["convergence"]["rule"], lr_drops=0, min_epochs=12)) == 12
    assert f"| run/{stage_file.stem} | {stage['fit_epochs']} + {stage['continuation_epochs']} |" in fit_phases.stage_table([stage])
    # --judgement-cost: the same posterior judged by a plain and a fast line search, seeded alike
    cost = fit_phases.judgement_cost(stage_file, 2)
    assert len(cost["pairs"]) == 2 and all(p[arm]["seconds"] > 0 and p[arm]["nats"] >= 0 and p[arm]["stderr"] >= 0
                                           for p in cost["pairs"] for arm in ("plain", "fast"))
    assert cost["median_seconds"]["plain"] == pytest.approx(sorted(p["plain"]["seconds"] for p in cost["pairs"])[0] / 2
                                                            + sorted(p["plain"]["seconds"] for p in cost["pairs"])[1] / 2)
    with pytest.raises(SystemExit) as exit_info:
        fit_phases.main(["--stages", str(tmp_path / "missing.pt")])
    assert exit_info.value.code == 2 and "no stage file" in capsys.readouterr().err
    not_a_stage = tmp_path / "not-a-stage.pt"
    torch.save({"key": "A-bayesian-s0", "config": {}, "data": {}}, not_a_stage)
    for flag in ("--stages", "--judgement-cost"):
        with pytest.raises(SystemExit) as exit_info:
            fit_phases.main([flag, str(not_a_stage)])
        assert exit_info.value.code == 2 and "not a q_A stage of a fit by the rule and the verdict" in capsys.readouterr().err
    # benchmarks/trajectory.py: the same stage's history in segments (fit phase, each continuation), each with its tail's means
    trajectory = load_benchmark("trajectory")
    rows = trajectory.segments(history, tail=1.0)
    fit = [e for e in history if e["phase"] == "fit"]
    assert rows[0]["segment"] == "fit" and rows[0]["epochs"] == [fit[0]["epoch"], fit[-1]["epoch"]]
    assert rows[0]["kl"] == pytest.approx(sum(e["weighted_kl"] for e in fit) / len(fit))
    assert rows[0]["elbo"] == pytest.approx(sum(e["elbo"] for e in fit) / len(fit))
    recorded = [e["verdict"]["continuation"] for e in history if e["verdict"] and e["verdict"].get("continuation")]
    assert [r["nats"] for r in rows[1:] if not r.get("running")] == [c["nats"] for c in recorded]
    assert sum(r["epochs"][1] - r["epochs"][0] + 1 for r in rows) == len(history)  # the segments cover every epoch once
    assert trajectory.main([str(stage_file), "--out", str(tmp_path / "t.json"), "--figure", str(tmp_path / "t.png")]) == 0
    assert json.loads((tmp_path / "t.json").read_text())["segments"] == trajectory.segments(history) and (tmp_path / "t.png").stat().st_size > 0
    assert capsys.readouterr().out.startswith("fit ")
    with pytest.raises(SystemExit) as exit_info:
        trajectory.main([str(not_a_stage)])
    assert exit_info.value.code == 2 and "holds no per-epoch history" in capsys.readouterr().err
    with pytest.raises(ValueError, match="tail must be in"):
        trajectory.segments(history, tail=0.0)
    # --time-to-verdict reads q_A only from a run of the README grid's configuration: this tiny run's is refused in one line
    with pytest.raises(SystemExit) as exit_info:
        fit_phases.main(["--time-to-verdict", "--method", "finetune", "--max-epochs-b", "5", "--stages-from", str(run_dir)])
    err = capsys.readouterr().err.strip().splitlines()
    assert exit_info.value.code == 2 and "made by another configuration (" in err[-1] and "hidden" in err[-1]


def test_the_fast_polish_summary_takes_medians_per_setting_and_their_ratios(capsys):
    """``fast_polish_summary``: per setting, the median of each fit's line-search seconds over its
    line searches and of its polishing seconds, and off / on ratios of those medians; ``--rounds``
    without ``--fast-polish both`` is refused."""
    fit_phases = load_benchmark("fit_phases")

    def fit(flag: bool, searches: int, search_seconds: float, polishing: float) -> dict:
        return {"fast_polish": flag, "wall_seconds": polishing + 10, "line_searches": searches,
                "parts_seconds": {fit_phases.SEARCHES: search_seconds, fit_phases.POLISHING: polishing}}
    fits = [fit(False, 10, 12.0, 11.0), fit(True, 12, 6.0, 5.0), fit(False, 20, 20.0, 19.0), fit(True, 10, 6.0, 5.5), fit(False, 10, 14.0, 13.0)]
    summary = fit_phases.fast_polish_summary(fits)
    assert summary["off"]["fits"] == 3 and summary["on"]["fits"] == 2
    assert summary["off"]["seconds_per_line_search"] == pytest.approx(1.2)  # median of 1.2, 1.0, 1.4
    assert summary["on"]["seconds_per_line_search"] == pytest.approx((0.5 + 0.6) / 2)
    assert summary["ratio_seconds_per_line_search"] == pytest.approx(1.2 / 0.55)
    assert summary["ratio_polishing_seconds"] == pytest.approx(13.0 / 5.25)
    with pytest.raises(SystemExit):
        fit_phases.main(["--profile", "--rounds", "2"])
    assert "--rounds must be >= 1 and applies to --fast-polish both and --judgement-cost only" in capsys.readouterr().err


def test_the_time_to_verdict_summary_pairs_each_seed_s_fits(capsys):
    """``verdict_summary``: per seed the wall ratio off / on and the ELBO difference on - off per
    example, their medians, and whether every fit converged; the mode's arguments are checked."""
    fit_phases = load_benchmark("fit_phases")

    def fit(seed: int, flag: bool, wall: float, elbo: float, converged: bool = True) -> dict:
        return {"seed": seed, "fast_polish": flag, "wall_seconds": wall, "elbo": elbo, "num_train": 100, "converged": converged}
    fits = [fit(0, False, 10.0, -50.0), fit(0, True, 5.0, -49.0), fit(1, False, 9.0, -40.0), fit(1, True, 6.0, -41.0, converged=False),
            fit(2, False, 8.0, -30.0)]  # seed 2 has no pair: left out of the ratios
    summary = fit_phases.verdict_summary(fits)
    assert [r["seed"] for r in summary["per_seed"]] == [0, 1]
    assert summary["median_wall_ratio"] == pytest.approx((2.0 + 1.5) / 2)
    assert summary["median_elbo_difference_per_datum"] == pytest.approx((0.01 - 0.01) / 2)
    assert summary["all_converged"] is False
    for argv, message in ((["--time-to-verdict", "--method", "finetune"], "needs --stages-from RUN"),
                          (["--time-to-verdict", "--method", "joint"], "fits scratch, finetune or transfer"),
                          (["--profile", "--method", "transfer"], "--profile fits scratch or joint"),
                          (["--profile", "--time-to-verdict"], "give one of --runs")):
        with pytest.raises(SystemExit):
            fit_phases.main(argv)
        assert message in capsys.readouterr().err
