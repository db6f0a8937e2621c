"""``TrainConfig.precondition="prior-scale"`` (``--precondition-b``): Adam's step on each location
scaled by ``f_i = sigma_p,i / max_j sigma_p,j``. Checked on a real fit: under a transferred prior
one step moves each location by exactly ``f_i`` times Adam's own step (the widths as before);
under a prior of one width the fit is bit-identical to the plain one; a prior with no single
width is refused by name; the experiment's field reaches every fit on B and only those."""

from __future__ import annotations

import json

import pytest
import torch

from conftest import fresh_model_and_guide, six_feature_split
from pyro_bbt.config import B_ONLY_FIELDS, LATER_FIELDS
from pyro_bbt.experiment import ExperimentConfig
from pyro_bbt.fitting import prior_from_posterior
from pyro_bbt.inference import TrainConfig, location_step_factors, train
from pyro_bbt.priors import GaussianPrior, ScaleMixturePrior
from pyro_bbt.pyro_internals import unconstrained_loc_scale_parameters
from pyro_bbt.transfer import build_parser, config_from_args

SIZES = (6, 8, 3)


def _steps(steps: int, precondition: str, lr: float = 1e-2) -> TrainConfig:
    return TrainConfig(steps=steps, lr=lr, scale_lr=3 * lr, batch_size=200, kl_schedule="uniform", progress=False, eval_samples=0,
                       verdict=None, precondition=precondition)


def _parameters(model, guide) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    return {name: tuple(p.detach().clone() for p in unconstrained_loc_scale_parameters(guide, name)) for name in model.site_shapes}


def _transferred():
    """q_A fitted 300 steps on the six-feature task under N(0, 1), then its posterior as the
    prior (what ``transfer`` fits B under), the guide still at q_A."""
    split = six_feature_split()
    model, guide = fresh_model_and_guide(SIZES, prior=GaussianPrior(1.0))
    train(model, guide, split, _steps(300, "none", lr=3e-2))
    model.set_prior(prior_from_posterior(guide, model, GaussianPrior(1.0), 1.0))
    return model, guide, split


def test_one_preconditioned_step_is_adams_step_times_the_prior_width_over_the_widest(single_torch_thread):
    """From q_A under its own posterior as the prior, one step with and one without the
    preconditioner (same seed, so the same gradient): every location moves by exactly
    ``f_i`` times the plain step, every width by the same step; the factors are the prior's
    widths over the widest and are far from 1 somewhere (so the check can fail)."""
    model, guide, split = _transferred()
    state = {key: value.clone() for key, value in guide.state_dict().items()}
    start = _parameters(model, guide)
    moved = {}
    for precondition in ("none", "prior-scale"):
        guide.load_state_dict(state)
        train(model, guide, split, _steps(1, precondition))
        moved[precondition] = _parameters(model, guide)
    factors = dict(zip(model.site_shapes, (factor for _, factor in location_step_factors(model, guide))))
    widest = max(float(model.prior.scale(name).max()) for name in model.site_shapes)
    for name in model.site_shapes:
        assert torch.allclose(factors[name], model.prior.scale(name) / widest)
        plain = moved["none"][name][0] - start[name][0]
        assert plain.abs().min() > 0  # Adam's first step moves every coordinate
        assert torch.allclose(moved["prior-scale"][name][0] - start[name][0], factors[name] * plain, rtol=1e-4, atol=1e-8)
        assert torch.equal(moved["prior-scale"][name][1], moved["none"][name][1])  # the widths' steps are not scaled
    everything = torch.cat([factor.flatten() for factor in factors.values()])
    assert everything.max() == pytest.approx(1.0) and everything.min() < 0.5


def test_under_a_prior_of_one_width_the_preconditioned_fit_is_the_plain_fit(single_torch_thread):
    """Every factor is 1 under N(0, 0.5^2): 20 steps with the preconditioner are bit-identical
    to 20 without."""
    split = six_feature_split()
    ends = []
    for precondition in ("none", "prior-scale"):
        model, guide = fresh_model_and_guide(SIZES, prior=GaussianPrior(0.5))
        train(model, guide, split, _steps(20, precondition))
        ends.append(_parameters(model, guide))
        if precondition == "prior-scale":
            assert all(torch.equal(factor, torch.ones_like(factor)) for _, factor in location_step_factors(model, guide))
    for name in ends[0]:
        assert all(torch.equal(a, b) for a, b in zip(ends[0][name], ends[1][name]))


def test_a_prior_with_no_single_width_is_refused_by_name():
    model, guide = fresh_model_and_guide(SIZES, prior=ScaleMixturePrior(), initialize=True)
    with pytest.raises(ValueError, match=r"needs a Gaussian prior at every site; site 'layers.0.weight' has ScaleMixturePrior"):
        location_step_factors(model, guide)
    with pytest.raises(ValueError, match=r"precondition must be one of none, prior-scale, got 'sigma'"):
        TrainConfig(precondition="sigma")


def test_the_experiment_field_reaches_every_fit_on_b_and_only_those():
    """``--precondition-b prior-scale`` sets B's recipes (the rule's and the fixed budget's), not
    q_A's; it is a B-only field (a run may take its q_A from one without it) and, at "none",
    absent from config.json like every later field; bad values and families are refused."""
    config = config_from_args(build_parser().parse_args(["--preset", "paper", "--precondition-b", "prior-scale"]))
    assert config.precondition_b == "prior-scale"
    assert config.recipe_b_converged(300).train_config(0).precondition == "prior-scale"
    assert config.recipe_b(10).train_config(0).precondition == "prior-scale"
    assert config.recipe_a().train_config(0).precondition == "none"
    assert "precondition_b" in B_ONLY_FIELDS and LATER_FIELDS["precondition_b"] == "none"
    assert "precondition_b" not in ExperimentConfig().to_dict() and config.to_dict()["precondition_b"] == "prior-scale"
    with pytest.raises(ValueError, match=r"precondition-b must be one of none, prior-scale, got 'sigma2'"):
        ExperimentConfig(precondition_b="sigma2")
    with pytest.raises(ValueError, match=r"guide 'lowrank' is not one \(allowed: normal, meanfield\)"):
        ExperimentConfig(precondition_b="prior-scale", guide="lowrank")
    with pytest.raises(ValueError, match=r"prior 'mixture' is not one \(allowed: gaussian\)"):
        ExperimentConfig(precondition_b="prior-scale", prior="mixture")


def test_the_bench_pairs_the_same_units_and_refuses_runs_that_differ_in_more(tmp_path, capsys, single_torch_thread):
    """``benchmarks/b_recipes.py`` on real quick runs (a few hundred images, 16 hidden units),
    fitted without and with the preconditioner: one row per unit with both runs' numbers as their
    results.json records them, a summary per fraction, the differing field named; ``--methods``
    pairs scratch of one run with transfer of the other. A pair that also differs in the data
    (``--limit-train``), or in nothing B reads, is refused."""
    from conftest import load_benchmark
    from pyro_bbt.transfer import main as transfer_main

    bench = load_benchmark("b_recipes")
    common = ["--preset", "quick", "--limit-train", "400", "--limit-eval", "200", "--hidden", "16",
              "--fractions", "0.1", "--head", "multihead", "--epochs-a", "2"]
    runs = {name: tmp_path / name for name in ("plain", "pc", "other")}
    assert transfer_main(common + ["--methods", "transfer,scratch", "--out", str(runs["plain"])]) == 0
    assert transfer_main(common + ["--methods", "transfer", "--precondition-b", "prior-scale", "--out", str(runs["pc"])]) == 0
    assert transfer_main(common[:3] + ["300"] + common[4:] + ["--methods", "transfer", "--precondition-b", "prior-scale", "--out", str(runs["other"])]) == 0
    capsys.readouterr()
    assert bench.main(["--first", str(runs["plain"]), "--second", str(runs["pc"]), "--stages", str(runs["pc"])]) == 0
    out = capsys.readouterr().out
    assert "precondition_b: 'none' -> 'prior-scale'" in out and "1 units paired" in out
    units = {name: {u["method"]: u for u in json.loads((runs[name] / "results.json").read_text())["units"]} for name in ("plain", "pc")}
    plain, pc = units["plain"]["transfer"], units["pc"]["transfer"]
    row = next(line for line in out.splitlines() if line.startswith("| multihead | transfer | 0.1 | 0 | "))
    assert f"{plain['b_test']['accuracy']:.4f} → {pc['b_test']['accuracy']:.4f}" in row
    assert f"{plain['a_test_after']['accuracy']:.4f} → {pc['a_test_after']['accuracy']:.4f}" in row
    assert f"{pc['b_test']['accuracy'] - plain['b_test']['accuracy']:+.3f}" in out
    timing = {name: json.loads((runs[name] / "timing.json").read_text()) for name in ("plain", "pc")}
    index = [u["method"] for u in json.loads((runs["plain"] / "results.json").read_text())["units"]].index("transfer")
    assert f"| {timing['plain'][f'units/{index}']:.0f} → {timing['pc']['units/0']:.0f} |" in row  # each unit's whole time
    assert "| A-bayesian-s0 | layers.0.weight | " in out
    assert bench.main(["--methods", "scratch", "transfer", "--first", str(runs["plain"]), "--second", str(runs["pc"])]) == 0
    out_methods = capsys.readouterr().out
    row = next(line for line in out_methods.splitlines() if line.startswith("| multihead | scratch → transfer | 0.1 | 0 | "))
    assert f"{units['plain']['scratch']['b_test']['accuracy']:.4f} → {pc['b_test']['accuracy']:.4f}" in row
    assert "(not the same objective)" in out_methods
    with pytest.raises(SystemExit, match="differ in more than B's fields: limit_train"):
        bench.main(["--first", str(runs["plain"]), "--second", str(runs["other"])])
    with pytest.raises(SystemExit, match="fit B by the same recipe: nothing to compare"):
        bench.main(["--first", str(runs["pc"]), "--second", str(runs["pc"])])
    assert bench.main(["--first", str(runs["plain"]), str(runs["plain"]), "--second", str(runs["pc"])]) == 2
    assert "are held by more than one first run" in capsys.readouterr().err
    other_q_a = tmp_path / "other-q-a"  # the preconditioned run as if its q_A had been fitted otherwise
    other_q_a.mkdir()
    for name in ("results.json", "timing.json"):
        (other_q_a / name).write_bytes((runs["pc"] / name).read_bytes())
    results = json.loads((other_q_a / "results.json").read_text())
    results["task_a"][0]["a_test"]["accuracy"] += 0.01
    (other_q_a / "results.json").write_text(json.dumps(results))
    assert bench.same_record({"a": 1, "v": [{"c": 2}]}, {"a": 1, "v": [{"c": 2, "floor": 3}]})  # a field added later
    assert not bench.same_record({"a": 1, "v": [{"c": 2}]}, {"a": 1, "v": [{"c": 2.5}]}) and not bench.same_record([1], [1, 2])
    with pytest.raises(SystemExit, match="fitted seed 0's units on different q_A"):
        bench.main(["--first", str(runs["plain"]), "--second", str(other_q_a)])
