"""Transfer operation, experiment protocol and the ``python -m pyro_bbt.transfer`` CLI."""

from __future__ import annotations

import json
from pathlib import Path
import math
import subprocess
import sys

import pyro
import pytest
import torch

from pyro_bbt.data import Task, load_task
from pyro_bbt.experiment import ExperimentConfig, run_experiment, summarize_units
from pyro_bbt.fitting import start_from_state
from pyro_bbt.guides import initialize_guide, make_guide, posterior_as_prior, posterior_loc_scale
from pyro_bbt.inference import TrainConfig, train
from pyro_bbt.model import BayesianMLP
from pyro_bbt.priors import GaussianPrior, PerSitePrior
from pyro_bbt.transfer import CSV_COLUMNS, build_parser, config_from_args, main

TINY = [
    "--limit-train", "300", "--limit-eval", "200", "--hidden", "16", "--epochs", "1", "--epochs-a", "1",
    "--min-steps", "3", "--fractions", "0.1", "--seeds", "0", "--eval-samples", "4", "--quiet",
]


@pytest.fixture(scope="module")
def task_a():
    data = load_task(Task(digits=(0, 1, 2)))
    return data.train.subset(300)


@pytest.fixture
def fitted(task_a):
    pyro.clear_param_store()
    pyro.set_rng_seed(0)
    model = BayesianMLP((784, 16, 3), GaussianPrior(1.0))
    guide = make_guide("meanfield", model)
    train(model, guide, task_a, TrainConfig(steps=5, progress=False, eval_samples=0))
    return model, guide


def test_posterior_as_prior_copies_loc_and_scale_exactly(fitted):
    model, guide = fitted
    posterior = posterior_loc_scale(guide, model)
    prior = posterior_as_prior(guide, model)
    assert isinstance(prior, PerSitePrior)
    assert set(prior.sites) == set(model.site_shapes)
    for site, (loc, scale) in posterior.items():
        assert torch.equal(prior.loc(site), loc)
        assert torch.equal(prior.scale(site), scale)
        assert torch.equal(guide.get_loc_scale(site)[0].detach(), loc)
    broadened = posterior_as_prior(guide, model, tau=3.0)
    site = "layers.0.weight"
    assert torch.allclose(broadened.scale(site), 3.0 * posterior[site][1])


@pytest.mark.parametrize("tau", [0.5, float("nan"), float("inf")])
def test_posterior_as_prior_rejects_bad_tau(fitted, tau):
    model, guide = fitted
    with pytest.raises(ValueError, match="tau"):
        posterior_as_prior(guide, model, tau=tau)


def test_transferred_prior_is_what_the_model_samples_from(fitted):
    model, guide = fitted
    prior = posterior_as_prior(guide, model)
    model_b = BayesianMLP(model.sizes, prior)
    trace = pyro.poutine.trace(model_b).get_trace(torch.zeros(2, 784), None, 2)
    site = trace.nodes["layers.1.weight"]["fn"].base_dist
    assert torch.equal(site.loc, prior.loc("layers.1.weight"))
    assert torch.equal(site.scale, prior.scale("layers.1.weight"))


def test_from_posterior_starts_q_b_at_q_a(fitted):
    model, guide = fitted
    state = {k: v.detach().clone() for k, v in guide.state_dict().items()}
    expected = posterior_loc_scale(guide, model)
    config = ExperimentConfig(hidden=(16,), task_a=(0, 1, 2), task_b=(3, 4, 5), fractions=(1.0,), seeds=(0,))
    model_b, guide_b = config.new_posterior(posterior_as_prior(guide, model), seed=1)
    fresh = posterior_loc_scale(guide_b, model_b)
    assert not torch.equal(fresh["layers.0.weight"][0], expected["layers.0.weight"][0])
    guide_b.load_state_dict(state)
    started = posterior_loc_scale(guide_b, model_b)
    for site in expected:
        assert torch.equal(started[site][0], expected[site][0])
        assert torch.equal(started[site][1], expected[site][1])


def test_initialize_guide_creates_parameters():
    pyro.clear_param_store()
    model = BayesianMLP((5, 4, 2))
    guide = make_guide("meanfield", model)
    assert guide.prototype_trace is None
    initialize_guide(guide, 5)
    assert set(posterior_loc_scale(guide, model)) == set(model.site_shapes)


@pytest.mark.parametrize(
    "kwargs, message",
    [
        ({"methods": ("scratch", "magic")}, "magic"),
        ({"guide": "gp"}, "gp"),
        ({"kl_schedule": "cosine"}, "cosine"),
        ({"head": "many"}, "many"),
        ({"q_init": "random"}, "random"),
        ({"task_a": (0, 1, 2, 3, 4), "task_b": (4, 5, 6, 7, 8)}, r"\[4\]"),
        ({"fractions": (0.0,)}, "fraction"),
        ({"tau": 0.5}, "tau"),
        ({"seeds": (-1,)}, "seeds"),
        ({"epochs": 0}, "epochs"),
        ({"prior": "cauchy"}, "cauchy"),
        ({"scale_lr": 0.0}, "scale-lr"),
        ({"mixture_pi": 1.5}, "mixture-pi"),
        ({"rel_tol": -1.0}, "rel-tol"),
        ({"elbo_test": "slope"}, "elbo-test 'slope'; allowed: means, two-point"),
        ({"overrule": "never"}, "overrule 'never'; allowed: drop, restart"),
        ({"max_overrules": -1}, "max-overrules"),
        ({"max_epochs_b": 2}, "max-epochs-b"),
    ],
)
def test_experiment_config_rejects_bad_values(kwargs, message):
    with pytest.raises(ValueError, match=message):
        ExperimentConfig(**kwargs)


def test_b_fits_take_the_rules_test_overrule_and_cap_from_the_config():
    config = ExperimentConfig(fit_b="rule", elbo_test="means", overrule="restart", max_overrules=7, max_epochs_b=900, confirm_verdict=True)
    recipe = config.recipe_b_converged(265)
    assert (recipe.rule.elbo_test, recipe.rule.max_epochs, recipe.cap) == ("means", 900, 900)
    assert (recipe.verdict.overrule, recipe.verdict.max_overrules, recipe.verdict.confirm) == ("restart", 7, True)
    assert config_from_args(build_parser().parse_args(["--confirm-verdict", "--overrule", "restart"])).confirm_verdict
    assert not config_from_args(build_parser().parse_args([])).confirm_verdict
    assert config.recipe_a().rule.max_epochs == config.max_epochs_a and config.recipe_a().rule.elbo_test == "means"
    assert ExperimentConfig(fit_b="rule").recipe_b_converged(265).cap == ExperimentConfig.max_epochs_a  # none: q_A's cap


def test_the_paper_preset_is_the_readme_grid_and_paper_v5_to_v1_are_as_before():
    """``--preset paper`` alone gives the configuration of the README's answer, as its published
    runs stored it (figs/ps03: multi-head; figs/ps03-shared: the default shared head); paper-v5 is
    the paper preset until 2026-12-07 (N(0, 1)), from which each earlier preset is some flags away."""
    def parsed(*argv: str) -> ExperimentConfig:
        return config_from_args(build_parser().parse_args(list(argv)))

    root = Path(__file__).resolve().parents[1]
    for head, run in (("multihead", "ps03"), ("shared", "ps03-shared")):
        stored = json.loads((root / "figs" / run / "config.json").read_text())
        assert stored.pop("preset") == "paper"
        assert json.loads(json.dumps(parsed("--preset", "paper", *(["--head", head] if head != "shared" else [])).to_dict())) == stored, run
    readme = ("--prior-scale", "0.3", "--polish-steps-b", "30", "--max-epochs-a", "12000", "--max-epochs-b", "20000",
              "--methods", "transfer,scratch,finetune,ewc,joint", "--fractions", "0.01,0.1,1")
    assert parsed("--preset", "paper-v5", *readme).to_dict() == parsed("--preset", "paper").to_dict()
    assert parsed("--preset", "paper", *readme).to_dict() == parsed("--preset", "paper").to_dict()  # the published commands' flags change nothing
    new = parsed("--preset", "paper")
    assert (new.prior_scale, new.polish_steps_b, new.max_epochs_a, new.max_epochs_b, new.fractions) == (0.3, 30, 12000, 20000, (0.01, 0.1, 1.0))

    paper, v4, v3, v2, v1 = (parsed("--preset", name) for name in ("paper-v5", "paper-v4", "paper-v3", "paper-v2", "paper-v1"))
    settings = ("elbo_test", "overrule", "max_overrules", "confirm_verdict", "max_epochs_b", "continuation_epochs", "continuation_fraction", "max_epochs_a",
                "ewc_patience", "continuation_base", "continuation_max_draws", "checkpoint_seconds")
    assert tuple(getattr(paper, name) for name in settings) == ("means", "restart", 60, True, 3000, 20, 1.0, 3000, 3, (1e-2, 3e-2), 256, 60.0)
    assert tuple(getattr(v4, name) for name in settings) == ("means", "restart", 60, True, 3000, 20, 1.0, 3000, 3, (1e-2, 3e-2), 0, 60.0)
    assert tuple(getattr(v3, name) for name in settings) == ("means", "restart", 60, True, 3000, 20, 1.0, 3000, None, None, 0, 60.0)
    assert tuple(getattr(v2, name) for name in settings) == ("means", "restart", 60, True, 3000, 0, 0.0, 300, None, None, 0, 0.0)
    assert tuple(getattr(v1, name) for name in settings) == tuple(getattr(ExperimentConfig, name) for name in settings) == \
        ("two-point", "drop", 3, False, None, 0, 0.0, 300, None, None, 0, 0.0)
    assert paper.recipe_a().train_config(0).checkpoint_seconds == 60.0 and paper.recipe_b_converged(2647).checkpoint_seconds == 60.0
    assert paper.recipe_b_converged(2647).verdict.continuation_max_draws == 256 and paper.recipe_a().verdict.rescore_max_draws == 0
    verdict = paper.recipe_b_converged(2647).verdict
    assert verdict.confirm and verdict.continuation_length(100) == 100 and paper.recipe_a().rule.elbo_test == "means"
    assert paper.recipe_a().verdict.continuation_length(5) == 20 and v2.recipe_a().verdict.continuation_epochs == 0
    # everything else is the same protocol
    assert {k: v for k, v in paper.to_dict().items() if k not in settings} == {k: v for k, v in v1.to_dict().items() if k not in settings}
    # each setting can be turned back from the command line
    assert parsed("--preset", "paper-v5", "--continuation-max-draws", "0").to_dict() == v4.to_dict()
    assert parsed("--preset", "paper-v4", "--ewc-patience", "none", "--continuation-base", "none").to_dict() == v3.to_dict()
    off = parsed("--preset", "paper-v3", "--continuation-epochs", "0", "--continuation-fraction", "0", "--max-epochs-a", "300", "--checkpoint-seconds", "0")
    assert off.to_dict() == v2.to_dict()
    off = parsed("--preset", "paper-v2", "--no-confirm-verdict", "--elbo-test", "two-point", "--overrule", "drop", "--max-overrules", "3", "--max-epochs-b", "none")
    assert off.to_dict() == v1.to_dict()


def test_cli_end_to_end_writes_files_with_schema(tmp_path):
    out = tmp_path / "run"
    assert main([*TINY, "--out", str(out)]) == 0
    for name in ("config.json", "results.json", "metrics.csv", "transfer_results.png", "forgetting.png", "final_accuracy.png"):
        assert (out / name).stat().st_size > 0, name
    results = json.loads((out / "results.json").read_text())
    config = json.loads((out / "config.json").read_text())
    assert config["hidden"] == [16] and config["fractions"] == [0.1]
    methods = {u["method"] for u in results["units"]}
    assert methods == {"scratch", "transfer", "finetune", "ewc", "joint"}
    for unit in results["units"]:
        assert unit["status"] == "ok"
        assert 0.0 <= unit["b_test"]["accuracy"] <= 1.0
        assert 0.0 <= unit["a_test_after"]["accuracy"] <= 1.0
        assert unit["b_test"]["nll"] > 0
        assert unit["curve"] and unit["curve"][-1]["step"] <= unit["steps"]
        if unit["method"] in ("transfer", "finetune", "ewc"):
            R = unit["accuracy_matrix"]
            assert unit["backward_transfer"] == pytest.approx(R[1][0] - R[0][0])
            assert R[1][1] == unit["b_test"]["accuracy"]
        else:
            assert unit["accuracy_matrix"] is None
    assert set(results["summary"]) == methods
    header, *rows = (out / "metrics.csv").read_text().strip().splitlines()
    assert tuple(header.split(",")) == CSV_COLUMNS
    assert len(rows) == len(results["units"])


def test_same_budget_data_and_seed_for_every_method(tmp_path):
    config = ExperimentConfig(
        hidden=(8,), epochs=1, epochs_a=1, min_steps=4, fractions=(0.05,), seeds=(0,), limit_train=200, limit_eval=100,
        eval_samples=2, methods=("scratch", "transfer", "finetune", "ewc"),
    )
    results = run_experiment(config, log=lambda m: None)
    steps = {u["method"]: u["steps"] for u in results["units"]}
    assert len(set(steps.values())) == 1 and steps["scratch"] >= 4
    summary = summarize_units(results["units"])
    assert summary["scratch"]["0.05"]["b_test_accuracy"]["n"] == 1


def _cli(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "pyro_bbt.transfer", *args], capture_output=True, text=True, timeout=120)


@pytest.mark.parametrize(
    "args, needle",
    [
        (["--methods", "scratch,magic"], "magic"),
        (["--guide", "gp"], "gp"),
        (["--kl-schedule", "cosine"], "cosine"),
        (["--head", "many"], "many"),
        (["--task-b", "4,5,6,7,8"], "share digits"),
        (["--fractions", "abc"], "abc"),
        (["--preset", "huge"], "huge"),
        (["--tau", "0.5"], "tau"),
        (["--elbo-test", "slope"], "elbo-test 'slope'"),
        (["--overrule", "never"], "overrule 'never'"),
    ],
)
def test_cli_bad_input_exits_2_with_one_line(tmp_path, capsys, args, needle):
    try:
        code = main([*args, "--out", str(tmp_path / "x")])
    except SystemExit as exit_:  # argparse's own errors
        code = exit_.code
    assert code == 2
    lines = capsys.readouterr().err.strip().splitlines()
    assert len(lines) == 1 and needle in lines[0]
    assert not (tmp_path / "x").exists()


def test_cli_process_exit_code_and_no_traceback(tmp_path):
    result = _cli("--guide", "gp", "--out", str(tmp_path / "x"))
    assert result.returncode == 2
    assert result.stderr.strip().count("\n") == 0 and "Traceback" not in result.stderr


def test_cli_refuses_existing_results_without_overwrite(tmp_path):
    out = tmp_path / "run"
    out.mkdir()
    (out / "results.json").write_text("{}")
    result = _cli("--out", str(out))
    assert result.returncode == 2 and "--overwrite" in result.stderr
    assert (out / "results.json").read_text() == "{}"


def test_multihead_prior_keeps_a_head_and_resets_b_head():
    from pyro_bbt.units import fit_task_a, load_task_pair

    config = ExperimentConfig(
        hidden=(8,), head="multihead", epochs_a=1, fractions=(1.0,), seeds=(0,), limit_train=200, limit_eval=50,
        eval_samples=2, prior_scale=0.5,
    )
    tasks = load_task_pair(config, 1.0, 0)
    stage = fit_task_a(config, tasks, seed=0)
    model_b, guide_b = config.new_posterior(stage.prior_from_a, seed=0)
    fresh = posterior_loc_scale(guide_b, model_b)
    start_from_state(model_b, guide_b, stage.guide_state, model_b.head_rows(config.b_head))
    started = posterior_loc_scale(guide_b, model_b)
    a_rows, b_rows = model_b.head_rows(0), model_b.head_rows(1)
    weight = "layers.1.weight"
    assert model_b.site_shapes[weight] == torch.Size((10, 8))
    assert torch.equal(stage.prior_from_a.loc(weight)[b_rows], torch.zeros(5, 8))
    assert torch.equal(stage.prior_from_a.scale(weight)[b_rows], torch.full((5, 8), 0.5))
    assert torch.equal(stage.prior_from_a.scale(weight)[a_rows], started[weight][1][a_rows])
    assert torch.equal(started[weight][0][b_rows], fresh[weight][0][b_rows])
    assert torch.equal(started["layers.0.weight"][0], stage.prior_from_a.loc("layers.0.weight"))


def test_sequence_mode_fills_the_accuracy_matrix(tmp_path):
    from pyro_bbt.continual import backward_transfer

    out = tmp_path / "seq"
    code = main(["--sequence", "rotations", "--methods", "transfer,finetune", "--limit-train", "120", "--limit-eval", "60",
                 "--hidden", "8", "--epochs", "1", "--min-steps", "3", "--eval-samples", "2", "--seeds", "0", "--quiet", "--out", str(out)])
    assert code == 0
    results = json.loads((out / "results.json").read_text())
    assert results["domains"] == ["rot0", "rot15", "rot30", "rot45"]
    for method in ("transfer", "finetune"):
        entry = results["methods"][method]["per_seed"][0]
        R = entry["accuracy_matrix"]
        assert len(R) == 4 and all(len(row) == 4 for row in R)
        assert entry["summary"]["backward_transfer"] == pytest.approx(backward_transfer(R))
    assert (out / "sequence.png").stat().st_size > 0


def test_sequence_mode_rejects_methods_it_cannot_chain(tmp_path, capsys):
    assert main(["--sequence", "rotations", "--methods", "ewc", "--out", str(tmp_path / "x")]) == 2
    assert "--sequence runs the methods" in capsys.readouterr().err


def test_report_tables_show_mean_and_std_per_method_and_fraction(tmp_path, capsys):
    from pyro_bbt.experiment import summarize_units
    from pyro_bbt.report import main as report_main

    def unit(method, seed, b, a):
        metrics = {"accuracy": b, "nll": 0.5, "ece": 0.01}
        return {"method": method, "fraction": 0.1, "seed": seed, "status": "ok", "b_test": metrics,
                "a_test_after": {"accuracy": a}, "backward_transfer": None}

    units = [unit("scratch", 0, 0.90, 0.30), unit("scratch", 1, 0.80, 0.40)]
    results = {"summary": summarize_units(units), "units": units,
               "task_a": [{"kind": "bayesian", "a_test": {"accuracy": 0.99}}]}
    (tmp_path / "results.json").write_text(json.dumps(results))
    assert report_main([str(tmp_path)]) == 0
    out = capsys.readouterr().out
    assert "| scratch | 0.8500 ± 0.0707 |" in out  # mean and sample std of 0.9 and 0.8
    assert "| scratch | 0.3500 ± 0.0707 |" in out
    assert "Task A test accuracy before B (bayesian net): 0.9900" in out
    assert report_main([str(tmp_path / "missing")]) == 2


def test_report_merges_runs_made_apart_for_different_methods(tmp_path, capsys):
    from pyro_bbt.experiment import summarize_units
    from pyro_bbt.report import main as report_main

    def unit(method, seed, b, a, judged):
        history = [{"epoch": e, "verdict": {"converged": ok, "gain_upper_per_datum": upper}} for e, (ok, upper) in enumerate(judged, 1)]
        return {"method": method, "fraction": 0.1, "seed": seed, "status": "ok", "b_test": {"accuracy": b, "nll": 0.5, "ece": 0.01},
                "a_test_after": {"accuracy": a}, "backward_transfer": None, "history": history,
                "convergence": {"converged": judged[-1][0]}}

    def write(name, methods, units, stages, lr=1e-3):
        config = {"methods": methods, "seeds": [0, 1], "lr": lr, "fit_b": "rule"}
        results = {"config": config, "summary": summarize_units(units), "units": units, "task_a": stages}
        (tmp_path / name).mkdir()
        (tmp_path / name / "results.json").write_text(json.dumps(results))
        return str(tmp_path / name)

    q_a = [{"kind": "bayesian", "seed": 0, "a_test": {"accuracy": 0.99}}, {"kind": "deterministic", "seed": 0, "a_test": {"accuracy": 0.98}}]
    scratch = write("scratch", ["scratch"], [unit("scratch", 0, 0.90, 0.30, [(False, 0.05), (True, 0.009)]),
                                             unit("scratch", 1, 0.80, 0.40, [(False, 0.07)])], [])
    transfer = write("transfer", ["transfer"], [unit("transfer", 0, 0.70, 0.95, [(True, 0.004)])], q_a)
    assert report_main([scratch, transfer]) == 0
    out = capsys.readouterr().out
    # scratch's seed 1 ended unconverged: its cell says so, and the line after the tables names it
    assert "| scratch | 0.8500 ± 0.0707 (1 of 2 not converged) |" in out and "| transfer | 0.7000 ± 0.0000 |" in out
    assert "Not converged (the verdict), counted in the cells marked above: scratch at 0.1, seed 1." in out
    assert "| transfer − scratch | 0.1 | -0.200 | +0.650 | 1 | 1 / 0 (1) |" in out  # paired on the seed both ran; one seed below: p = 1
    seed0 = write("seed0", ["transfer", "scratch"], [unit("scratch", 0, 0.90, 0.30, [(False, 0.05)]), unit("transfer", 0, 0.70, 0.95, [(True, 0.004)])], q_a)
    assert report_main([seed0]) == 0
    assert "| transfer − scratch | 0.1 | -0.200 | +0.650 | 1 (1 not converged) | 1 / 0 (1) |" in capsys.readouterr().out
    # --converged-only leaves scratch's unconverged seed 1 out of the tables and names it; the verdicts still list it
    assert report_main([scratch, transfer, "--converged-only"]) == 0
    out = capsys.readouterr().out
    assert "Left out of the tables and paired differences (--converged-only: the verdict did not call them converged): scratch at 0.1, seed 1 (B 0.8000, A after B 0.4000" in out
    assert "| scratch | 0.9000 ± 0.0000 |" in out and "not converged)" not in out.split("**Convergence**")[0]
    assert "s1 1 (0.07)" in out
    assert report_main([seed0, "--converged-only"]) == 0
    assert "| transfer − scratch |" not in capsys.readouterr().out  # the only pair's scratch is left out
    assert report_main([scratch, "--converged-only", "--learning-curves", str(tmp_path / "c.png")]) == 2
    assert "--converged-only selects the units of the tables" in capsys.readouterr().err
    assert "scratch 0.1: s0 2* (0.009), s1 1 (0.07); transfer 0.1: s0 1* (0.004)" in out
    other = write("other", ["finetune"], [unit("finetune", 0, 0.5, 0.2, [(True, 0.001)])], [], lr=1e-2)
    assert report_main([scratch, other]) == 2 and "differ in lr" in capsys.readouterr().err
    again = write("again", ["finetune"], [unit("finetune", 0, 0.5, 0.2, [(True, 0.001)])], [{**q_a[0], "a_test": {"accuracy": 0.5}}])
    assert report_main([transfer, again]) == 2 and "task-A stage bayesian of seed 0 differs" in capsys.readouterr().err
    assert report_main([scratch, scratch]) == 2 and "repeats the unit scratch at 0.1, seed 0" in capsys.readouterr().err
    (tmp_path / "other" / "results.json").write_text("{")
    assert report_main([scratch, other]) == 2 and "other/results.json is damaged" in capsys.readouterr().err


def test_report_merges_runs_of_other_caps_only_when_every_fit_converged_below_its_cap(tmp_path, capsys):
    """Runs made under different caps (and presets' names) merge, with a note naming the
    difference, when every Bayesian fit in them ended converged below its own run's cap; a fit
    that did not (unconverged, or stopped at its cap) refuses the merge. Deterministic fits
    (no convergence record) do not count."""
    from pyro_bbt.experiment import summarize_units
    from pyro_bbt.merging import merge_timing, merge_transfer_runs, select_fractions
    from pyro_bbt.report import main as report_main

    def unit(method, converged, epochs):
        return {"method": method, "fraction": 0.1, "seed": 0, "status": "ok", "b_test": {"accuracy": 0.9, "nll": 0.5, "ece": 0.01},
                "a_test_after": {"accuracy": 0.5}, "backward_transfer": None, "history": [],
                "convergence": None if converged is None else {"converged": converged, "epochs": epochs}}

    def write(name, methods, units, stages, caps):
        config = {"methods": methods, "seeds": [0], "lr": 1e-3, "fit_b": "rule", "preset": caps[2], "max_epochs_a": caps[0], "max_epochs_b": caps[1]}
        (tmp_path / name).mkdir()
        (tmp_path / name / "results.json").write_text(json.dumps({"config": config, "summary": summarize_units(units), "units": units, "task_a": stages}))
        return str(tmp_path / name)

    transfer = write("transfer", ["transfer"], [unit("transfer", True, 2304)], [], (12000, 8000, "paper-v3"))
    scratch = write("scratch", ["scratch", "ewc"], [unit("scratch", True, 6088), unit("ewc", None, 0)], [], (3000, 8000, "paper"))
    assert report_main([transfer, scratch]) == 0
    out = capsys.readouterr().out
    assert "merged runs differ in max_epochs_a, preset" in out and "every Bayesian fit in them ended converged below its cap" in out
    assert "| transfer − scratch | 0.1 |" in out
    capped = write("capped", ["scratch"], [unit("scratch", True, 3000)], [], (3000, 3000, "paper"))
    assert report_main([transfer, capped]) == 2
    assert "capped's unit scratch at 0.1, seed 0 did not end converged below its cap (3000 epochs)" in capsys.readouterr().err
    unconverged = write("unconverged", ["scratch"], [unit("scratch", False, 100)], [], (3000, 8000, "paper"))
    assert report_main([transfer, unconverged]) == 2 and "did not end converged below its cap" in capsys.readouterr().err
    # the verdict's draws are as loose as the caps; a rise on --resume is named
    raised = {**unit("scratch", True, 9387), "seed": 2, "raised_on_resume": [{"epoch": 9387, "fields": {"continuation_max_draws": [0, 256]}}]}
    stage = {"kind": "bayesian", "seed": 2, "a_test": {"accuracy": 0.99}, "convergence": None,  # only its rise matters here
             "raised_on_resume": [{"epoch": 953, "fields": {"rescore_max_draws": [0, 64]}}]}
    drawn = write("drawn", ["scratch"], [raised], [stage], (12000, 20000, "paper-v4"))
    config = json.loads((tmp_path / "drawn" / "results.json").read_text())
    config["config"]["continuation_max_draws"] = 256
    (tmp_path / "drawn" / "results.json").write_text(json.dumps(config))
    assert report_main([transfer, drawn]) == 0
    out = capsys.readouterr().out
    assert "merged runs differ in continuation_max_draws, max_epochs_b, preset" in out and "continuation_max_draws=0" in out
    assert ("Verdict's draws raised on --resume (judgements before keep their draws): q_A s2 at epoch 953 (rescore_max_draws 0 → 64); "
            "scratch 0.1 s2 at epoch 9387 (continuation_max_draws 0 → 256)") in out
    drawn_capped = write("drawn-capped", ["scratch"], [{**raised, "convergence": {"converged": False, "epochs": 20000}}], [], (12000, 20000, "paper-v4"))
    assert report_main([transfer, drawn_capped]) == 2 and "verdict's draws (continuation_max_draws, rescore_max_draws)" in capsys.readouterr().err
    same_caps = write("same", ["scratch"], [unit("scratch", False, 100)], [], (12000, 8000, "paper-v3"))
    assert report_main([transfer, same_caps]) == 0 and "merged runs differ" not in capsys.readouterr().out  # equal caps: no condition
    # q_A is held to its own run's cap: converged at 8,959 under 12,000 merges, stopped at the cap does not
    q_a = {"kind": "bayesian", "seed": 0, "a_test": {"accuracy": 0.99}, "convergence": {"converged": True, "epochs": 8959}}
    runs = [json.loads((tmp_path / name / "results.json").read_text()) for name in ("transfer", "scratch")]
    assert merge_transfer_runs([{**runs[0], "task_a": [q_a]}, runs[1]], ["transfer", "scratch"])["task_a"] == [q_a]
    stopped = {**q_a, "convergence": {"converged": False, "epochs": 12000}}
    with pytest.raises(ValueError, match="transfer's task-A stage of seed 0 did not end converged below its cap \\(12000 epochs\\)"):
        merge_transfer_runs([{**runs[0], "task_a": [stopped]}, runs[1]], ["transfer", "scratch"])
    # --fractions keeps the units at those fractions, before the merge's checks, and renumbers their timing
    mixed = write("mixed", ["finetune"], [{**unit("finetune", False, 2542), "fraction": 0.01}, unit("finetune", True, 2815)], [], (12000, 8000, "paper-v3"))
    assert report_main([mixed, scratch]) == 2 and "mixed's unit finetune at 0.01, seed 0 did not end converged" in capsys.readouterr().err
    assert report_main([mixed, scratch, "--fractions", "0.1"]) == 0 and "| finetune | 0.9000 ± 0.0000 |" in capsys.readouterr().out
    assert report_main([mixed, scratch, "--fractions", "0.5"]) == 2 and "no unit at fractions 0.5 (the run has 0.01, 0.1)" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        report_main([mixed, "--fractions", "ten"])
    assert "argument --fractions: must be fractions of B separated by commas, e.g. 0.01,0.1; got 'ten'" in capsys.readouterr().err
    picked, timing = select_fractions(json.loads((tmp_path / "mixed" / "results.json").read_text()),
                                      {"units/0/curve/0": 1.0, "units/1/curve/0": 2.0, "wall_clock": 5.0}, (0.1,))
    assert [u["fraction"] for u in picked["units"]] == [0.1] and timing == {"units/0/curve/0": 2.0, "wall_clock": 5.0}
    assert merge_timing([{"units/0/curve/0": 1.0, "units/1/history/2": 2.0, "wall_clock": 9.0}, {"units/0/curve/1": 3.0}], [2, 1]) == {
        "units/0/curve/0": 1.0, "units/1/history/2": 2.0, "units/2/curve/1": 3.0}


def test_report_plots_redraws_the_figures_of_a_cli_run(tmp_path):
    from pyro_bbt.report import main as report_main

    out = tmp_path / "run"
    assert main([*TINY, "--methods", "scratch,transfer", "--out", str(out)]) == 0
    for name in ("transfer_results.png", "forgetting.png", "final_accuracy.png"):
        (out / name).unlink()
    assert report_main([str(out), "--plots"]) == 0
    for name in ("transfer_results.png", "forgetting.png", "final_accuracy.png"):
        assert (out / name).stat().st_size > 0


def test_figures_use_the_sample_std_of_the_tables():
    import numpy as np

    from pyro_bbt.plots import sample_std

    assert sample_std([0.9, 0.8]) == pytest.approx(0.0707107, rel=1e-5)  # as the report's tables
    assert sample_std([0.9]) == 0.0
    np.testing.assert_allclose(sample_std([[1.0, 2.0], [3.0, 6.0]], axis=0), [np.sqrt(2), np.sqrt(8)])
    np.testing.assert_array_equal(sample_std([[1.0, 2.0]], axis=0), [0.0, 0.0])


def test_sign_test_counts_signs_drops_ties_and_matches_enumerating_every_sign_pattern():
    from itertools import product

    from pyro_bbt.report import mean_t_interval
    from pyro_bbt.stats import sign_test

    def enumerated(below, above):  # P(min count <= observed min) under fair coins, by counting all 2^n patterns
        n = below + above
        return sum(min(sum(signs), n - sum(signs)) <= min(below, above) for signs in product((0, 1), repeat=n)) / 2 ** n

    differences = [-0.004, -0.011, -0.002, 0.004, -0.009, 0.002, -0.013, -0.007, -0.005, -0.010]
    below, above, p = sign_test(differences)
    assert (below, above) == (8, 2) and p == pytest.approx(enumerated(8, 2)) and p == pytest.approx(112 / 1024)
    assert sign_test([-1.0] * 10)[2] == pytest.approx(2 / 1024)
    assert sign_test([-1.0, 0.0, 0.0, 1.0]) == (1, 1, 1.0)  # exact ties dropped; one of each sign: no evidence
    assert sign_test([]) == (0, 0, 1.0)
    for below, above in ((0, 7), (3, 4), (1, 8), (5, 0)):
        assert sign_test([-1.0] * below + [1.0] * above)[2] == pytest.approx(min(1.0, enumerated(below, above)))
    # eleven seeds use t_10 = 2.228, not the normal's 1.96: values 1..11 have mean 6 and std sqrt(11)
    assert mean_t_interval([float(v) for v in range(1, 12)]) == f"+6.000 [{6 - 2.228:+.3f}, {6 + 2.228:+.3f}]"


def test_cli_warns_that_the_flow_guides_train_their_flows_at_lr_a(tmp_path, capsys):
    args = [*TINY, "--methods", "scratch", "--max-epochs-a", "1"]
    assert main([*args, "--guide", "planar", "--out", str(tmp_path / "planar")]) == 0
    assert "warning: --guide planar: this experiment trains the flows' own parameters at the locations' learning rate (--lr-a, --lr)" in capsys.readouterr().err
    assert main([*args, "--guide", "normal", "--out", str(tmp_path / "normal")]) == 0
    assert "warning" not in capsys.readouterr().err


def test_fit_b_rule_fits_every_bayesian_b_unit_by_the_rule_and_draws_the_learning_curves(tmp_path, capsys):
    """--fit-b rule: each Bayesian B unit is fitted by the rule (its own epochs and steps, a curve
    point at its last epoch, a verdict recorded); EWC keeps the fixed budget; the report draws the
    learning curves against steps and fit seconds (from timing.json)."""
    import json

    from pyro_bbt.report import main as report_main

    out = tmp_path / "rule"
    args = ["--limit-train", "200", "--limit-eval", "60", "--hidden", "8", "--seeds", "0", "--fractions", "0.2", "--epochs-a", "2",
            "--max-epochs-a", "4", "--batch-size-a", "50", "--fit-b", "rule", "--methods", "scratch,transfer,ewc", "--eval-samples", "2",
            "--epochs", "1", "--min-steps", "3", "--quiet", "--out", str(out)]
    assert main(args) == 0
    results = json.loads((out / "results.json").read_text())
    timing = json.loads((out / "timing.json").read_text())
    assert results["config"]["fit_b"] == "rule"
    for index, unit in enumerate(results["units"]):
        if unit["method"] == "ewc":
            from pyro_bbt.plan import build_plan
            from pyro_bbt.transfer import build_parser, config_from_args

            (spec,) = [u for u in build_plan(config_from_args(build_parser().parse_args(args))).units if u.method == "ewc"]
            assert unit["convergence"] is None and unit["steps"] == spec.steps  # the fixed budget
            continue
        history, convergence = unit["history"], unit["convergence"]
        assert unit["steps"] == history[-1]["steps"] and 2 <= len(history) <= 4
        assert convergence["verdict"] is not None and history[-1]["verdict"] == convergence["verdict"]
        assert unit["curve"][-1]["epoch"] == len(history)
        assert f"units/{index}/curve/{len(unit['curve']) - 1}" in timing  # the fit seconds of the last point
    capsys.readouterr()
    png = tmp_path / "curves.png"
    assert report_main([str(out), "--learning-curves", str(png)]) == 0 and png.stat().st_size > 0
    assert report_main([str(out)]) == 0
    printed = capsys.readouterr().out
    assert "| transfer − scratch | 0.2 |" in printed and "q_B converged, fitted by the rule and the verdict" in printed
    (scratch_index,) = [i for i, u in enumerate(results["units"]) if u["method"] == "scratch"]
    scratch = results["units"][scratch_index]
    assert (f"| scratch | 0.2 | 1 | {scratch['convergence']['epochs']:,} | {timing[f'units/{scratch_index}']:,.0f} |") in printed  # the run's own seconds
    (stage,) = [s for s in results["task_a"] if s["kind"] == "bayesian"]
    assert f"| q_A | — | 1 | {stage['convergence']['epochs']:,} |" in printed and "Compute in all:" in printed


def test_cost_lines_give_medians_over_seeds_and_a_lower_bound_on_the_wall_time():
    """The fit-cost table: per method and fraction the median and range over seeds of epochs and
    seconds (timing.json's units/I), q_A from its epochs' times; the first run's q_A of a seed
    counts; --fractions drops units; the wall-time bound is max(total / workers, longest fit)."""
    from pyro_bbt.fit_report import cost_lines

    def unit(method, fraction, seed, epochs):
        return {"method": method, "fraction": fraction, "seed": seed, "status": "ok", "convergence": {"epochs": epochs}, "history": []}

    first = {"units": [unit("scratch", 0.1, 0, 10), unit("scratch", 0.1, 1, 30), unit("scratch", 0.1, 2, 20), unit("ewc", 0.01, 0, None)],
             "task_a": [{"kind": "bayesian", "seed": 0, "convergence": {"epochs": 4}}, {"kind": "deterministic", "seed": 0}]}
    first["units"][3]["convergence"] = None
    first["units"][3]["history"] = [{}, {}, {}]
    timing = {"units/0": 100.0, "units/1": 300.0, "units/2": 200.0, "units/3": 5.0, "task_a/0/history/0": 30.0, "task_a/0/history/1": 20.0}
    second = {"units": [unit("transfer", 0.1, 0, 7), {**unit("transfer", 0.1, 1, 9), "status": "failed"}],
              "task_a": [{"kind": "bayesian", "seed": 0, "convergence": {"epochs": 99}}]}
    text = cost_lines([(first, timing), (second, {"units/0": 1000.0, "task_a/0/history/0": 999.0})])
    assert "| q_A | — | 1 | 4 | 50 | 50 |" in text  # the first run's q_A of seed 0
    assert "| ewc | 0.01 | 1 | 3 | 5 | 5 |" in text  # epochs from the history where no verdict
    assert "| scratch | 0.1 | 3 | 20 (10–30) | 200 (100–300) | 600 |" in text
    assert "| transfer | 0.1 | 1 | 7 | 1,000 | 1,000 |" in text  # the failed unit left out
    assert text.index("| ewc | 0.01 |") < text.index("| scratch | 0.1 |")
    assert "Compute in all: 1,655 s (0.46 h). With 2 workers these fits take at least 1,000 s (0.28 h)" in text  # the longest fit bounds
    assert "With 1 worker these fits take at least 1,655 s" in cost_lines([(first, timing), (second, {"units/0": 1000.0})], workers=1)  # the compute bounds
    narrowed = cost_lines([(first, timing)], fractions=(0.01,))
    assert "| scratch |" not in narrowed and "| ewc | 0.01 |" in narrowed
    assert cost_lines([(first, {})]) == ""


def test_ewc_patience_stops_both_nets_by_their_validation_split_within_the_cap(tmp_path):
    """--ewc-patience: EWC's nets train by early stopping, at most --max-epochs-a epochs on A
    and (with no --max-epochs-b) on B; the records say how they stopped and the steps they ran.
    Without it (the default), the records and the configuration are as before."""
    out = tmp_path / "run"
    assert main([*TINY, "--methods", "ewc", "--max-epochs-a", "6", "--ewc-patience", "2", "--out", str(out)]) == 0
    results = json.loads((out / "results.json").read_text())
    assert results["config"]["ewc_patience"] == 2
    (unit,), (stage,) = results["units"], results["task_a"]
    for record, images in ((unit, 300), (stage, 300)):
        stopped = record["early_stopping"]
        assert 1 <= stopped["best_epoch"] <= stopped["epochs"] <= 6 and 0.0 <= stopped["best_val_accuracy"] <= 1.0
        assert stopped["stopped_by"] == ("cap" if stopped["epochs"] == 6 else "patience")
        assert stopped["stopped_by"] == "cap" or stopped["epochs"] == stopped["best_epoch"] + 2
        assert record["steps"] == stopped["epochs"] * math.ceil(images / 128)
    plain = tmp_path / "plain"
    assert main([*TINY, "--methods", "ewc", "--out", str(plain)]) == 0
    results = json.loads((plain / "results.json").read_text())
    assert "ewc_patience" not in results["config"] and "early_stopping" not in results["units"][0]
    assert main([*TINY, "--methods", "ewc", "--ewc-patience", "0", "--out", str(tmp_path / "bad")]) == 2


def test_batch_size_b_sets_the_minibatch_of_b_fits_by_the_rule():
    def parsed(*argv: str) -> ExperimentConfig:
        return config_from_args(build_parser().parse_args(list(argv)))

    paper = parsed("--preset", "paper")
    assert paper.batch_size_b is None and "batch_size_b" not in paper.to_dict()  # stored runs keep their hash
    assert paper.recipe_b_converged(265).batch_size == 32 and paper.recipe_b_converged(2647).batch_size == 265
    full = parsed("--preset", "paper", "--batch-size-b", "100000")
    assert full.recipe_b_converged(265).batch_size == 265 and full.recipe_b_converged(2647).batch_size == 2647
    assert parsed("--preset", "paper", "--batch-size-b", "64").recipe_b_converged(2647).batch_size == 64
    assert full.to_dict()["batch_size_b"] == 100000
    with pytest.raises(ValueError, match=r"batch-size-b must be None .* got 0"):
        ExperimentConfig(fit_b="rule", batch_size_b=0)
    with pytest.raises(ValueError, match=r"with fit-b 'fixed' B's fits use batch-size"):
        ExperimentConfig(batch_size_b=64)


def test_report_fit_costs_of_merged_runs_narrowed_by_fractions_read_each_units_own_time(tmp_path, capsys):
    """--fractions renumbers a run's units; the fit-cost table still reads each unit's seconds
    from its place in that run's timing.json, merged or not."""
    from pyro_bbt.experiment import summarize_units
    from pyro_bbt.report import main as report_main

    def unit(method, fraction, epochs):
        return {"method": method, "fraction": fraction, "seed": 0, "status": "ok", "b_test": {"accuracy": 0.9, "nll": 0.5, "ece": 0.01},
                "a_test_after": {"accuracy": 0.3}, "backward_transfer": None, "history": [], "convergence": {"converged": True, "epochs": epochs}}

    def write(name, method, seconds):
        units = [unit(method, 0.01, 11), unit(method, 0.1, 22)]
        (tmp_path / name).mkdir()
        config = {"methods": [method], "seeds": [0], "fit_b": "rule"}
        (tmp_path / name / "results.json").write_text(json.dumps({"config": config, "summary": summarize_units(units), "units": units, "task_a": []}))
        (tmp_path / name / "timing.json").write_text(json.dumps({"units/0": seconds[0], "units/1": seconds[1]}))
        return str(tmp_path / name)

    scratch, transfer = write("scratch", "scratch", (100.0, 900.0)), write("transfer", "transfer", (50.0, 70.0))
    for dirs in ([scratch, transfer], [scratch]):
        assert report_main([*dirs, "--fractions", "0.1"]) == 0
        printed = capsys.readouterr().out
        assert "| scratch | 0.1 | 1 | 22 | 900 | 900 |" in printed and "| 0.01 |" not in printed.split("**Fit cost**")[1]
    assert "| transfer | 0.1 | 1 | 22 | 70 | 70 |" in (report_main([scratch, transfer, "--fractions", "0.1"]), capsys.readouterr().out)[1]


def test_optima_lines_show_fits_that_end_predicting_worse_and_at_a_higher_elbo():
    """The optima table: a fit whose returned posterior trains 0.05 or more below its best
    stretch is listed with both stretches' accuracy and training ELBO per example, and the
    fixed-noise ELBO its kept continuations gained after the best stretch; a discarded
    continuation's epochs (its start kept) are not part of the trajectory; a fit that holds its
    accuracy is counted but not listed."""
    from pyro_bbt.fit_report import optima_lines

    def record(epoch, accuracy, elbo, verdict=None):
        return {"epoch": epoch, "train_accuracy": accuracy, "elbo": elbo, "phase": "fit", "verdict": verdict}

    def continuation(start, gained, kept):
        return {"converged": kept == "start", "gain": {"num_data": 10},
                "continuation": {"start_epoch": start, "start_elbo": -100.0, "end_elbo": -100.0 + gained, "kept": kept, "num_data": 10}}

    collapsing = [record(e, 0.9, -200.0) for e in range(1, 21)] + [record(e, 0.5, -80.0) for e in range(21, 41)]
    collapsing[39]["verdict"] = continuation(20, 30.0, "end")  # epochs 21..40 kept: +3 nats per example
    collapsing += [record(e, 0.99, -500.0) for e in range(41, 61)]
    collapsing[59]["verdict"] = continuation(40, -5.0, "start")  # epochs 41..60 discarded
    steady = [record(e, 0.9, -50.0) for e in range(1, 41)]
    results = {"task_a": [{"kind": "deterministic", "seed": 0}],
               "units": [{"method": "scratch", "fraction": 0.01, "seed": 1, "status": "ok", "b_test": {"accuracy": 0.7}, "history": collapsing},
                         {"method": "transfer", "fraction": 0.01, "seed": 1, "status": "ok", "b_test": {"accuracy": 0.8}, "history": steady}]}
    text = optima_lines(results)
    assert ("| scratch | 0.01 | 1 | 0.700 | 0.900 / -20.00 ± 0.00 (epochs 1–5) | 0.500 / -8.00 ± 0.00 (epochs 36–40) | higher | +3.00 (1 continuation) |"
            in text)
    assert "| transfer |" not in text
    assert "1 of 2 fits end 0.05 or more below their best training accuracy; 1 of them at a higher ELBO" in text
    assert "0 of 1 fits" in optima_lines({"units": [results["units"][1]]})
    assert optima_lines({"units": [{**results["units"][1], "history": steady[:5]}]}) == ""  # too short to judge


def test_convergence_lines_give_the_largest_unread_rows_kl_per_fit_group():
    """Where the verdicts recorded the unread-rows check, the convergence section gives its
    largest mean KL per group of fits (q_A, method and fraction); runs made before it say nothing."""
    from pyro_bbt.fit_report import convergence_lines

    def fit(kl, **keys):
        return {**keys, "status": "ok", "history": [{"epoch": 1, "verdict": None}, {"epoch": 2, "verdict": {"converged": True, "unread_rows_kl": kl}}]}

    results = {"config": {}, "task_a": [fit(0.0001, seed=0)],
               "units": [fit(0.002, method="finetune", fraction=0.1, seed=0), fit(0.03, method="finetune", fraction=0.1, seed=1)]}
    text = convergence_lines(results)
    assert "largest over seeds: q_A 0.0001; finetune 0.1 0.03" in text
    for entry in [*results["task_a"], *results["units"]]:
        del entry["history"][1]["verdict"]["unread_rows_kl"]
    assert "Unread-rows check" not in convergence_lines(results)
