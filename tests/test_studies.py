"""Side studies on tiny data: they run, and their tables and figures hold what they claim."""

from __future__ import annotations

import math
from dataclasses import replace

import pytest


from pyro_bbt.guides import GUIDES
from pyro_bbt.kl_schedules import KL_SCHEDULES
from pyro_bbt.studies import (
    ABLATION_VARIANTS,
    StudyConfig,
    build_parser,
    main,
    ablation,
    ablation_table,
    compare_guides,
    compare_schedules,
    guides_table,
    plot_guides,
    plot_schedules,
)

TINY = StudyConfig(epochs=1, seeds=(0,), hidden=(8,), eval_samples=2, limit_train=200, limit_eval=100, min_steps=5, max_epochs=2)


def test_guides_study_fits_every_guide_by_the_recipe_and_judges_it(tmp_path):
    rows = compare_guides(TINY, log=lambda m: None)
    assert [r["guide"] for r in rows] == list(GUIDES)
    for row in rows:
        assert 0.0 <= row["accuracy"] <= 1.0 and row["nll"] > 0 and row["seconds_per_epoch"] > 0
        # q_A's recipe: minibatches of 2048 (one step per epoch on 200 images), stopped by the cap here
        assert [e["steps"] for e in row["history"]] == [1, 2] and row["epochs"] == 2 and row["converged"] is False
        assert row["convergence"]["max_epochs"] == 2
    ratios = {r["guide"]: r["convergence"]["uninformed_scale_ratio"] for r in rows}
    assert ratios["delta"] is None and 0.0 < ratios["meanfield"] < 1.0  # a point mass has no width; sigma starts at 0.01
    plot_guides(rows, tmp_path / "guides.png")
    assert (tmp_path / "guides.png").stat().st_size > 0
    assert "| 2 | 0/1 | 1 |" in guides_table(rows)
    # lowrank and the flows start at the meanfield row's fit, the others afresh
    meanfield = next(r for r in rows if r["guide"] == "meanfield")
    start = {"guide": "meanfield", "epochs": meanfield["epochs"], "converged": False, "fit_seconds": meanfield["fit_seconds"]}
    assert {r["guide"]: r["started_from"] for r in rows} == {g: (start if g in ("lowrank", "planar", "iaf") else None) for g in GUIDES}
    # without a meanfield row, the same meanfield fit is made for the flows: the same planar row
    alone = compare_guides(TINY, guides=("planar",), log=lambda m: None)
    planar = next(r for r in rows if r["guide"] == "planar")
    assert [e["elbo"] for e in alone[0]["history"]] == [e["elbo"] for e in planar["history"]] and alone[0]["accuracy"] == planar["accuracy"]


def test_schedules_study_none_has_zero_kl(tmp_path):
    rows = compare_schedules(TINY, log=lambda m: None)
    assert [r["kl_schedule"] for r in rows] == list(KL_SCHEDULES)
    by_name = {r["kl_schedule"]: r for r in rows}
    assert by_name["none"]["history"][-1]["weighted_kl"] == 0.0
    assert by_name["blundell"]["history"][-1]["weighted_kl"] > 0.0
    # one minibatch per epoch: Blundell's weight M pi_1 = 1 and uniform's 1 give the same first step
    assert by_name["blundell"]["history"][0]["elbo"] == pytest.approx(by_name["uniform"]["history"][0]["elbo"])
    plot_schedules(rows, tmp_path / "comparing_beta.png")
    assert (tmp_path / "comparing_beta.png").stat().st_size > 0


def test_ablation_runs_every_variant_with_one_budget():
    rows = ablation(TINY, log=lambda m: None)
    assert [r["variant"] for r in rows] == [v[0] for v in ABLATION_VARIANTS]
    assert len({r["steps"] for r in rows}) == 1
    assert len({r["a_test_before_accuracy"] for r in rows}) == 1  # task A fitted once, shared
    table = ablation_table(rows)
    assert table.count("\n") == len(ABLATION_VARIANTS) + 2
    for name, *_ in ABLATION_VARIANTS:
        assert name in table


def test_ablation_is_the_paper_v1_configuration_so_it_can_reuse_the_paper_runs_q_a():
    from pyro_bbt.experiment import PRESETS, ExperimentConfig
    from pyro_bbt.runstore import config_differences
    from pyro_bbt.studies import PRESETS as STUDY_PRESETS
    from pyro_bbt.studies import STUDY_OVERRIDES, ablation_base

    base = ablation_base(StudyConfig(**STUDY_PRESETS["paper"] | STUDY_OVERRIDES[("ablation", "paper")]))
    assert config_differences(ExperimentConfig(**PRESETS["paper-v1"]).to_dict(), base.to_dict()) == []
    assert (base.a_batch_size, base.max_epochs_a, base.lr_a, base.scale_lr, base.kl_schedule) == (2048, 300, 1e-2, 3e-2, "uniform")


def test_ablation_reads_q_a_from_a_finished_run(tmp_path):
    from pyro_bbt.transfer import main as transfer_main

    run_dir = tmp_path / "run"
    cli = ["--preset", "paper-v1", "--hidden", "8", "--max-epochs-a", "2", "--epochs-a", "2", "--epochs", "1", "--min-steps", "5",
           "--limit-train", "200", "--limit-eval", "100", "--eval-samples", "2", "--seeds", "0", "--quiet", "--out", str(run_dir)]
    config = replace(TINY, epochs=1)
    assert transfer_main(cli) == 0
    saved = sorted((p.relative_to(run_dir), p.stat().st_mtime_ns) for p in run_dir.rglob("*"))
    reused = ablation(config, log=lambda m: None, reuse=run_dir)
    fitted = ablation(config, log=lambda m: None)
    assert sorted((p.relative_to(run_dir), p.stat().st_mtime_ns) for p in run_dir.rglob("*")) == saved
    assert [r["b_test_accuracy"] for r in reused] == [r["b_test_accuracy"] for r in fitted]  # the same q_A, read or refitted
    assert main(["ablation", "--preset", "quick", "--reuse", str(run_dir), "--out", str(tmp_path / "s")]) == 2


def test_guides_table_is_mean_and_sample_std_per_guide():
    from pyro_bbt.studies import guides_table

    rows = [
        {"guide": "meanfield", "seed": 0, "accuracy": 0.9, "nll": 0.3, "ece": 0.01, "seconds_per_epoch": 4.0},
        {"guide": "meanfield", "seed": 1, "accuracy": 0.8, "nll": 0.5, "ece": 0.03, "seconds_per_epoch": 6.0},
        {"guide": "delta", "seed": 0, "accuracy": 0.7, "nll": 0.9, "ece": 0.05, "seconds_per_epoch": 2.0},
    ]
    lines = guides_table(rows).strip().splitlines()
    assert lines[2] == "| meanfield | 0.8500 ± 0.0707 | 0.4000 ± 0.1414 | 0.0200 ± 0.0141 | 5.0 ± 1.4 | 2 |"
    assert lines[3] == "| delta | 0.7000 ± 0.0000 | 0.9000 ± 0.0000 | 0.0500 ± 0.0000 | 2.0 ± 0.0 | 1 |"


def test_convergence_study_records_what_the_table_and_figure_show(tmp_path):
    from pyro_bbt.convergence import StoppingRule
    from pyro_bbt.studies import CONVERGENCE_VARIANTS, compare_convergence, convergence_table, plot_convergence

    config = StudyConfig(epochs=3, seeds=(0,), hidden=(8,), eval_samples=2, limit_train=200, limit_eval=100)
    by_key = {v.key: v for v in CONVERGENCE_VARIANTS}
    variants = [by_key["old"], by_key["uniform-scale-lr"]]
    never = StoppingRule(max_epochs=3, min_epochs=2, window=1, rel_tol=1e-12, scale_tol=1e-12)
    rows = compare_convergence(config, never, variants=variants, log=lambda m: None)
    assert [r["variant"] for r in rows] == [v.name for v in variants]
    for row in rows:
        assert len(row["history"]) == len(row["uninformed_scale_ratio"]) == len(row["wall"]) == 3
        assert row["wall"] == sorted(row["wall"]) and row["rule_epoch"] is None
    # A scale lr of 3e-2 moves sigma further from its 0.01 start than lr 1e-3 in the same 3 epochs.
    old, new = (r["history"][-1]["median_scale"]["layers.0.weight"] for r in rows)
    assert abs(math.log(new / 0.01)) > abs(math.log(old / 0.01))
    loose = StoppingRule(max_epochs=10, min_epochs=2, window=1, rel_tol=10.0, scale_tol=10.0)
    (dropping,) = compare_convergence(replace(config, epochs=6), loose, variants=[by_key["one-drop"]], log=lambda m: None)
    assert [e["lr_scale"] for e in dropping["history"]] == [1.0, 1.0, 0.1, 0.1] and dropping["rule_epoch"] == 4
    # The batch variants: their own minibatch size (200 images in minibatches of 64: 4 steps an
    # epoch), their own drop factor, three drops, and the study's cap over their own.
    batch = replace(by_key["batch-1024"], batch_size=64)
    (batched,) = compare_convergence(replace(config, max_epochs=9), loose, variants=[batch], log=lambda m: None)
    assert [e["steps"] for e in batched["history"]] == [4 * (i + 1) for i in range(8)] and batched["rule_epoch"] == 8
    assert [e["lr_scale"] for e in batched["history"]] == pytest.approx([1.0, 1.0, 0.3, 0.3, 0.09, 0.09, 0.027, 0.027])
    rows += [dropping, batched]
    # Checkpoints in seconds: a mark after the longest fit is never reached and left out; a 0 s
    # mark is before any epoch ended.
    beyond = math.ceil(max(r["wall"][-1] for r in rows)) + 1
    table = convergence_table(rows, checkpoints=(0.0, beyond))
    assert "ELBO after 0 s" in table and f"ELBO after {beyond} s" not in table and "| — |" in table
    assert f"({batched['history'][-1]['epoch']}, " in table and table.count("\n") == 2 + len(rows)
    plot_convergence(rows, tmp_path / "convergence.png")
    assert (tmp_path / "convergence.png").stat().st_size > 0


def test_studies_cli_rejects_unknown_variants_and_variants_elsewhere(tmp_path, capsys):
    with pytest.raises(SystemExit) as exit_info:
        build_parser().parse_args(["convergence", "--variants", "batch-1024,nope"])
    assert exit_info.value.code == 2 and "unknown variant nope; allowed: old," in capsys.readouterr().err
    assert main(["guides", "--variants", "old", "--out", str(tmp_path)]) == 2
    assert "--variants applies to the convergence study only" in capsys.readouterr().err
    assert main(["guides", "--predictors", "meanfield", "--out", str(tmp_path)]) == 2
    assert "--predictors and --warm-start apply to the uncertainty study only" in capsys.readouterr().err
    assert main(["guides", "--warm-start", "fresh", "--out", str(tmp_path)]) == 2
    assert "--predictors and --warm-start apply to the uncertainty study only" in capsys.readouterr().err
    assert main(["tradeoff", "--workers", "0", "--out", str(tmp_path)]) == 2
    assert "--workers must be an integer >= 1, got 0" in capsys.readouterr().err
    assert main(["guides", "--preset", "converged", "--out", str(tmp_path / "guides")]) == 2
    assert "--preset converged is the tradeoff study's only; the guides study's are paper, quick" in capsys.readouterr().err
    assert not (tmp_path / "guides").exists()
    with pytest.raises(SystemExit) as exit_info:
        build_parser().parse_args(["uncertainty", "--warm-start", "map"])
    assert exit_info.value.code == 2 and "invalid choice: 'map' (choose from meanfield, fresh)" in capsys.readouterr().err.replace("'meanfield', 'fresh'", "meanfield, fresh")
    assert build_parser().parse_args(["uncertainty", "--warm-start", "fresh"]).warm_start == "fresh"
    with pytest.raises(SystemExit) as exit_info:
        build_parser().parse_args(["uncertainty", "--predictors", "meanfield,bayes"])
    assert exit_info.value.code == 2 and "unknown predictor bayes; allowed: normal, meanfield" in capsys.readouterr().err
    assert build_parser().parse_args(["uncertainty", "--predictors", "delta,ensemble"]).predictors == ("delta", "ensemble")


def test_uncertainty_resume_refuses_what_it_cannot_continue_with_one_line(tmp_path, capsys):
    """--resume (the uncertainty study runs through the engine's store) needs a run of the same
    configuration in --out; an unfinished run there needs --resume or --overwrite."""
    import json

    from pyro_bbt.uncertainty_study import UNCERTAINTY_PRESETS, UncertaintyConfig, config_to_dict

    def refused(argv: list[str], needle: str) -> None:
        assert main(argv) == 2
        err = capsys.readouterr().err.strip()
        assert needle in err and err.count("\n") == 0, err

    out = tmp_path / "run"
    refused(["tradeoff", "--resume", "--out", str(out)], f"--resume: {out} holds no run to resume (no config.json)")
    refused(["uncertainty", "--resume", "--overwrite", "--out", str(out)], "--overwrite and --resume contradict each other")
    refused(["uncertainty", "--resume", "--out", str(out)], f"--resume: {out} holds no run to resume (no config.json)")
    out.mkdir()
    (out / "config.json").write_text("{not json")
    refused(["uncertainty", "--resume", "--out", str(out)], "config.json is damaged (JSONDecodeError")
    config = json.loads(json.dumps(config_to_dict(UncertaintyConfig(**UNCERTAINTY_PRESETS["quick"]))))
    (out / "config.json").write_text(json.dumps({"preset": "quick", "study": "uncertainty", "config": {**config, "seeds": [7]}, "reused": {}}))
    refused(["uncertainty", "--resume", "--out", str(out)], f"--resume: the run in {out} has another configuration (config: seeds)")
    (out / "units").mkdir()
    refused(["uncertainty", "--out", str(out)], f"{out} holds an unfinished run (units); pass --resume to continue it or --overwrite")
    assert (out / "units").is_dir()  # nothing removed without --overwrite
    # another study's run there is never removed: its store would mix with this one's
    for flags in ([], ["--resume"], ["--overwrite"]):
        refused(["guides", *flags, "--out", str(out)], f"{out} holds a run of the uncertainty study (config.json, units); give the guides study another --out")
    assert (out / "units").is_dir()


def test_tradeoff_study_shares_q_a_and_budget_across_knobs(tmp_path):
    from pyro_bbt.experiment import ExperimentConfig
    from pyro_bbt.tradeoff import TradeoffConfig, plot_tradeoff, tradeoff, tradeoff_table

    experiment = ExperimentConfig(hidden=(8,), epochs_a=1, max_epochs_a=None, epochs=1, min_steps=3, limit_train=200, limit_eval=100, eval_samples=2)
    config = TradeoffConfig(heads=("shared", "multihead"), fractions=(0.1,), seeds=(0,), taus=(1.0, 30.0), lambdas=(0.0, 1e4), experiment=experiment)
    rows = tradeoff(config, log=lambda m: None)
    assert len(rows) == 2 * (3 + 2 + 2)
    for head in ("shared", "multihead"):
        group = [r for r in rows if r["head"] == head]
        assert len({r["steps"] for r in group}) == 1 and len({r["q_a_epochs"] for r in group}) == 1
        assert [(r["method"], r["knob"]) for r in group] == [("scratch", None), ("finetune", None), ("joint", None),
                                                             ("transfer", 1.0), ("transfer", 30.0), ("ewc", 0.0), ("ewc", 1e4)]
        for r in group:
            assert 0.0 <= r["b_test_accuracy"] <= 1.0 and 0.0 <= r["a_test_after_accuracy"] <= 1.0
    table = tradeoff_table(rows)
    assert "| shared | 0.1 | transfer | τ = 30 |" in table and "| multihead | 0.1 | ewc | λ = 10000 |" in table
    plot_tradeoff(rows, tmp_path / "tradeoff.png")
    assert (tmp_path / "tradeoff.png").stat().st_size > 0


def test_tradeoff_reuses_the_q_a_of_a_finished_run_without_writing_there(tmp_path):
    import json

    import pytest

    from pyro_bbt.experiment import ExperimentConfig
    from pyro_bbt.tradeoff import TradeoffConfig, tradeoff
    from pyro_bbt.transfer import main as transfer_main

    args = dict(hidden=(8,), epochs_a=1, max_epochs_a=None, epochs=1, min_steps=3, limit_train=200, limit_eval=100, eval_samples=2,
                fractions=(0.1,), seeds=(0,), fit_b="rule")  # the paper-v1 preset's (the tradeoff study's paper experiment)
    run_dir = tmp_path / "run"
    cli = ["--preset", "paper-v1", "--hidden", "8", "--epochs-a", "1", "--max-epochs-a", "none", "--epochs", "1", "--min-steps", "3", "--limit-train", "200",
           "--limit-eval", "100", "--eval-samples", "2", "--fractions", "0.1", "--seeds", "0", "--quiet", "--out", str(run_dir)]
    assert transfer_main(cli) == 0
    before = sorted((p.relative_to(run_dir), p.stat().st_mtime_ns) for p in run_dir.rglob("*"))
    saved_a = json.loads((run_dir / "results.json").read_text())["task_a"]

    experiment = ExperimentConfig(**args)
    config = TradeoffConfig(heads=("shared",), fractions=(0.1,), seeds=(0,), taus=(1.0,), lambdas=(10.0,), experiment=experiment,
                            reuse={"shared": run_dir})
    rows = tradeoff(config, log=lambda m: None)
    assert {r["q_a_epochs"] for r in rows} == {saved_a[0]["convergence"]["epochs"]}
    assert sorted((p.relative_to(run_dir), p.stat().st_mtime_ns) for p in run_dir.rglob("*")) == before

    other = TradeoffConfig(heads=("shared",), fractions=(0.1,), seeds=(0,), taus=(1.0,), lambdas=(10.0,),
                           experiment=ExperimentConfig(**args | {"lr": 0.05}), reuse={"shared": run_dir})
    with pytest.raises(ValueError, match=r"made by another configuration \(lr: 0\.001 -> 0\.05\)"):
        tradeoff(other, log=lambda m: None)


def test_a_converged_tradeoff_records_every_fit_and_reads_the_baselines_of_the_reused_run(tmp_path, capsys):
    """With ``fit_b="rule"`` every point is fitted by the verdict (EWC by early stopping) and its
    row says whether it converged; the baselines left out are the reused run's own units, and the
    study's transfer point at tau 1 is that run's transfer fit, recomputed to the same accuracy.
    A baseline the reused run lacks is refused before anything is fitted."""
    import json

    import pytest

    from pyro_bbt.config import PRESETS
    from pyro_bbt.experiment import ExperimentConfig
    from pyro_bbt.tradeoff import TradeoffConfig, tradeoff, tradeoff_table
    from pyro_bbt.transfer import main as transfer_main

    run_dir = tmp_path / "run"
    cli = ["--preset", "paper", "--hidden", "8", "--epochs-a", "1", "--max-epochs-a", "3", "--max-epochs-b", "3", "--limit-train", "200", "--limit-eval", "100",
           "--eval-samples", "2", "--fractions", "0.1", "--seeds", "0", "--quiet", "--out", str(run_dir)]
    assert transfer_main(cli) == 0
    experiment = ExperimentConfig(**PRESETS["paper"] | dict(hidden=(8,), epochs_a=1, max_epochs_a=3, max_epochs_b=3, limit_train=200, limit_eval=100,
                                                             eval_samples=2, fractions=(0.1,), seeds=(0,)))
    config = TradeoffConfig(heads=(experiment.head,), fractions=(0.1,), seeds=(0,), taus=(1.0, 10.0), lambdas=(10.0,), experiment=experiment,
                            reuse={experiment.head: run_dir}, baselines=())
    rows = tradeoff(config, log=lambda m: None)
    assert [(r["method"], r["knob"]) for r in rows] == [("scratch", None), ("finetune", None), ("joint", None), ("transfer", 1.0),
                                                        ("transfer", 10.0), ("ewc", 10.0)]
    unit = {m: json.loads((run_dir / "units" / f"{m}-f0.1-s0.json").read_text())["record"] for m in ("scratch", "finetune", "joint", "transfer")}
    for r in rows[:3]:
        assert r["from"] == str(run_dir) and r["b_test_accuracy"] == unit[r["method"]]["b_test"]["accuracy"]
        assert r["converged"] is unit[r["method"]]["convergence"]["converged"] and r["epochs"] == unit[r["method"]]["convergence"]["epochs"]
    assert rows[3]["b_test_accuracy"] == unit["transfer"]["b_test"]["accuracy"] and rows[3]["epochs"] == unit["transfer"]["convergence"]["epochs"]
    for r in rows[3:5]:  # a cap of 3 epochs: the verdict cannot pass
        assert r["converged"] is False and r["epochs"] == 3
    assert rows[5]["stopped_by"] in ("patience", "cap") and rows[5]["converged"] is (rows[5]["stopped_by"] == "patience")
    table = tradeoff_table(rows)
    assert f"| {experiment.head} | 0.1 | scratch (reused) | — |" in table and "| transfer | τ = 10 |" in table
    assert next(line for line in table.splitlines() if "τ = 10" in line).endswith("| 1 | 0/1 |")
    assert (f"* NOT converged: {experiment.head}, B fraction 0.1, transfer τ = 10: seed 0: B {rows[4]['b_test_accuracy']:.3f}, "
            f"A {rows[4]['a_test_after_accuracy']:.3f}, 3 epochs (no fit of this point converged).") in table

    wider = TradeoffConfig(heads=(experiment.head,), fractions=(0.1, 0.01), seeds=(0,), taus=(1.0,), lambdas=(10.0,), experiment=experiment,
                           reuse={experiment.head: run_dir}, baselines=("joint",))
    with pytest.raises(ValueError, match=r"no finished scratch unit at fraction 0\.01, seed 0 \(none\)"):
        tradeoff(wider, log=lambda m: None)
    with pytest.raises(ValueError, match=r"baselines 'ewc' unknown; allowed: scratch, finetune, joint"):
        TradeoffConfig(baselines=("ewc",))


def test_fit_status_says_why_a_point_did_not_converge():
    """A point's row: the verdict's ``reasons`` where its fit did not converge (none where it
    did), EWC's early stopping converged only when its patience stopped it, a fixed budget None."""
    from pyro_bbt.tradeoff import fit_status

    judged = {"converged": False, "epochs": 2540, "verdict": {"converged": False, "reasons": ["the continuation gained 0.02 > 0.01 nats per example"]}}
    assert fit_status({"convergence": judged}) == {"converged": False, "epochs": 2540, "reasons": ["the continuation gained 0.02 > 0.01 nats per example"]}
    assert fit_status({"convergence": judged | {"converged": True}}) == {"converged": True, "epochs": 2540}
    assert fit_status({"convergence": {"converged": False, "epochs": 3, "verdict": None}}) == {"converged": False, "epochs": 3}
    assert fit_status({"early_stopping": {"stopped_by": "cap", "epochs": 6}}) == {"converged": False, "epochs": 6, "stopped_by": "cap"}
    assert fit_status({"early_stopping": {"stopped_by": "patience", "epochs": 4}})["converged"] is True
    assert fit_status({}) == {"converged": None}
    gain = {"nats": 258.9, "stderr": 5.5, "per_datum": 0.0094, "upper_per_datum": 0.0098, "epochs": 148, "start_epoch": 148, "kept": "end", "draws": 8}
    passed = {"converged": True, "epochs": 296, "verdict": {"converged": True, "reasons": [], "continuation": gain}}
    assert fit_status({"convergence": passed}) == {"converged": True, "epochs": 296, "continuation": {
        "start_epoch": 148, "epochs": 148, "nats": 258.9, "stderr": 5.5, "per_datum": 0.0094, "upper_per_datum": 0.0098}}


def test_the_tradeoff_table_and_figure_name_every_fit_that_did_not_converge(tmp_path):
    """A point's mean is over all its fits; each fit the verdict did not pass is listed below the
    table by seed, with the point's mean over its converged fits alone, and drawn hollow."""
    from pyro_bbt.tradeoff import plot_tradeoff, tradeoff_table

    def row(seed, knob, b, a, converged):
        return {"head": "multihead", "fraction": 0.01, "method": "transfer", "knob": knob, "seed": seed, "b_test_accuracy": b,
                "a_test_after_accuracy": a, "converged": converged, "epochs": 100 + seed}

    rows = [row(0, 1.0, 0.8, 0.98, True), row(1, 1.0, 0.82, 0.99, True),
            row(0, 3.0, 0.7, 0.55, True), row(1, 3.0, 0.65, 0.53, True), row(2, 3.0, 0.6, 0.37, False)]
    table = tradeoff_table(rows)
    assert "| multihead | 0.01 | transfer | τ = 3 | 0.650 ± 0.050 | 0.483 ± 0.099 | 3 | 2/3 |" in table
    assert table.count("NOT converged") == 1
    assert ("* NOT converged: multihead, B fraction 0.01, transfer τ = 3: seed 2: B 0.600, A 0.370, 102 epochs "
            "(over the 2 converged fits alone B 0.675 ± 0.035, A 0.540 ± 0.014).") in table
    assert "NOT converged" not in tradeoff_table(rows[:4])
    plot_tradeoff(rows, tmp_path / "tradeoff.png")
    assert (tmp_path / "tradeoff.png").stat().st_size > 0


def test_merging_a_refit_into_a_tradeoff_study_replaces_its_fits_and_refuses_another_configuration(tmp_path, capsys):
    """``python -m pyro_bbt.tradeoff merge BASE NEWER``: each fit NEWER holds (head, fraction,
    method, knob, seed) replaces BASE's in place, the others are kept, a new point is added after
    them, and the replaced fits whose accuracies changed are named. Two configurations that differ
    in a setting of the experiment are refused with one line naming it, and nothing is written; the
    epoch caps may differ, and a row fitted under other caps than the merged configuration's names
    its own."""
    import json

    from pyro_bbt.config import LATER_FIELDS
    from pyro_bbt.tradeoff import main, merge_tradeoff

    def row(head, method, knob, seed, b, a):
        return {"head": head, "fraction": 0.1, "method": method, "knob": knob, "seed": seed, "b_test_accuracy": b,
                "a_test_after_accuracy": a, "converged": True, "epochs": 100}

    experiment = {"prior_scale": 0.3, "lr": 0.001}
    config = {"heads": ["shared", "multihead"], "fractions": [0.1], "seeds": [0, 1], "taus": [1.0, 3.0], "lambdas": [10.0],
              "experiment": experiment, "reuse": {"multihead": "runs/grid"}, "baselines": []}
    base = {"study": "tradeoff", "preset": "converged", "config": config,
            "rows": [row("shared", "transfer", 3.0, 0, 0.94, 0.50), row("multihead", "transfer", 1.0, 0, 0.93, 0.95),
                     row("multihead", "transfer", 3.0, 0, 0.94, 0.49), row("multihead", "transfer", 3.0, 1, 0.94, 0.56)]}
    # the refit: fitted its own q_A (no --reuse), one head, a tau more, and a setting added since (LATER_FIELDS: neutral)
    newer = {"study": "tradeoff", "preset": "converged",
             "config": config | {"heads": ["multihead"], "taus": [1.0, 3.0, 10.0], "reuse": {},
                                 "experiment": experiment | {"compile": LATER_FIELDS["compile"]}},
             "rows": [row("multihead", "transfer", 1.0, 0, 0.93, 0.95), row("multihead", "transfer", 3.0, 0, 0.942, 0.55),
                      row("multihead", "transfer", 3.0, 1, 0.941, 0.70), row("multihead", "transfer", 10.0, 0, 0.93, 0.40)]}
    merged, changed = merge_tradeoff(base, newer)
    assert [(r["head"], r["knob"], r["seed"], r["a_test_after_accuracy"]) for r in merged["rows"]] == [
        ("shared", 3.0, 0, 0.50), ("multihead", 1.0, 0, 0.95), ("multihead", 3.0, 0, 0.55), ("multihead", 3.0, 1, 0.70), ("multihead", 10.0, 0, 0.40)]
    assert changed == [("multihead", 0.1, "transfer", 3.0, 0), ("multihead", 0.1, "transfer", 3.0, 1)]
    assert merged["config"]["taus"] == [1.0, 3.0, 10.0] and merged["config"]["heads"] == ["shared", "multihead"]
    assert merged["config"]["reuse"] == {"multihead": "runs/grid"} and base["rows"][2]["a_test_after_accuracy"] == 0.49  # inputs untouched
    # a withdrawn point loses base's fits (newer's are kept); one that base lacks is refused
    kept, _ = merge_tradeoff(base, newer, withdrawn=[("shared", "transfer", 3), ("multihead", "transfer", 1.0)])
    assert [(r["head"], r["knob"], r["seed"]) for r in kept["rows"]] == [("multihead", 1.0, 0), ("multihead", 3.0, 0), ("multihead", 3.0, 1), ("multihead", 10.0, 0)]
    assert kept["withdrawn"] == [{"head": "shared", "method": "transfer", "knob": 3.0}, {"head": "multihead", "method": "transfer", "knob": 1.0}]
    with pytest.raises(ValueError, match=r"no such point to withdraw: shared:transfer:10; base's points: shared:transfer:3, multihead:transfer:1, multihead:transfer:3$"):
        merge_tradeoff(base, newer, withdrawn=[("shared", "transfer", 10.0)])
    with pytest.raises(ValueError, match=r"newer is not a trade-off study's results \(tradeoff.json\): study 'list'"):
        merge_tradeoff(base, [])

    paths = {name: tmp_path / f"{name}.json" for name in ("base", "newer", "other")}
    other = newer | {"config": newer["config"] | {"experiment": experiment | {"prior_scale": 1.0}}}
    for name, results in (("base", base), ("newer", newer), ("other", other)):
        paths[name].write_text(json.dumps(results))
    out = tmp_path / "merged"
    assert main(["merge", str(paths["base"]), str(paths["newer"]), "--out", str(out)]) == 0
    assert "2 replaced with other accuracies" in capsys.readouterr().out
    written = json.loads((out / "tradeoff.json").read_text())
    assert written["rows"] == merged["rows"] and written["merged_from"] == [str(paths["base"]), str(paths["newer"])]
    assert "| multihead | 0.1 | transfer | τ = 3 | 0.942 ± 0.001 | 0.625 ± 0.106 | 2 | 2/2 |" in (out / "tradeoff.md").read_text()
    assert (out / "tradeoff.png").stat().st_size > 0

    refused = tmp_path / "refused"
    assert main(["merge", str(paths["base"]), str(paths["other"]), "--out", str(refused)]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "config.experiment.prior_scale: 0.3 -> 1.0" in err
    assert not refused.exists()
    assert main(["merge", str(paths["base"]), str(paths["newer"]), "--out", str(out)]) == 2  # no --overwrite
    assert "exists; pass --overwrite" in capsys.readouterr().err
    with pytest.raises(SystemExit) as exit_:
        main(["merge", str(paths["base"]), str(paths["newer"]), "--out", str(refused), "--withdraw", "multihead:transfer"])
    assert exit_.value.code == 2 and "a point is HEAD:METHOD:KNOB" in capsys.readouterr().err and not refused.exists()
    # several refits, merged in order; a withdrawn point keeps the fits a refit has of it
    last = tmp_path / "last.json"
    last.write_text(json.dumps(newer | {"rows": [row("multihead", "transfer", 10.0, 1, 0.92, 0.45)]}))
    assert main(["merge", str(paths["base"]), str(paths["newer"]), str(last), "--out", str(refused), "--withdraw", "shared:transfer:3"]) == 0
    written = json.loads((refused / "tradeoff.json").read_text())
    assert [(r["head"], r["knob"], r["seed"]) for r in written["rows"]] == [
        ("multihead", 1.0, 0), ("multihead", 3.0, 0), ("multihead", 3.0, 1), ("multihead", 10.0, 0), ("multihead", 10.0, 1)]
    assert written["merged_from"] == [str(paths["base"]), str(paths["newer"]), str(last)]
    assert "| shared |" not in (refused / "tradeoff.md").read_text() and "2 replaced with other accuracies" in capsys.readouterr().out
    # a point refitted under a higher cap: the caps may differ, and its row records its own
    capped = newer | {"rows": [row("multihead", "transfer", 10.0, 0, 0.93, 0.40) | {"converged": False, "epochs": 2000}]}
    raised = newer | {"config": newer["config"] | {"experiment": experiment | {"max_epochs_b": 4000}},
                      "rows": [row("multihead", "transfer", 10.0, 0, 0.94, 0.38) | {"epochs": 2600}]}
    refits, _ = merge_tradeoff(capped | {"config": capped["config"] | {"experiment": experiment | {"max_epochs_b": 2000}}}, raised)
    assert refits["config"]["experiment"]["max_epochs_b"] == 2000
    assert refits["rows"] == [raised["rows"][0] | {"caps": {"max_epochs_a": None, "max_epochs_b": 4000}}]
    same, _ = merge_tradeoff(raised, raised)
    assert "caps" not in same["rows"][0]
