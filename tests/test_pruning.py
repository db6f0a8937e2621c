"""Active-unit census (pyro_bbt.pruning): per-unit KL to the base prior, blank pixels left out,
and the ablation check on the same posterior draws."""

from __future__ import annotations

import pytest
import torch

from pyro_bbt.data import Split
from pyro_bbt.fitting import FitRecipe, fit_posterior, new_posterior
from pyro_bbt.priors import GaussianPrior
from pyro_bbt.pruning import KAPPA_GRID, unit_census, unit_kl


def _state_at_prior(guide, base_std: float) -> dict:
    """Every weight and bias exactly N(0, base_std^2)."""
    state = guide.state_dict()
    for key in state:
        if key.startswith("locs."):
            state[key] = torch.zeros_like(state[key])
        else:  # softplus^-1(base_std)
            state[key] = torch.full_like(state[key], float(torch.log(torch.expm1(torch.tensor(base_std)))))
    return state


def test_units_at_the_base_prior_are_inactive_and_blank_pixels_do_not_count():
    model, guide = new_posterior((6, 4, 3, 2), GaussianPrior(0.5), "meanfield", init_scale=0.1, seed=0)
    state = _state_at_prior(guide, 0.5)
    state["locs.layers.0.weight_unconstrained"][1, 2] = 3.0  # unit 1 of layer 0 reads pixel 2, which is informative
    state["locs.layers.0.weight_unconstrained"][2, 5] = 3.0  # unit 2 reads pixel 5 alone, blank in every image
    state["locs.layers.1.bias_unconstrained"][0] = 3.0  # unit 0 of layer 1: its bias has moved
    guide.load_state_dict(state)
    x = torch.rand(20, 6)
    x[:, 5] = 0.0
    k0, k1 = unit_kl(guide, model, 0.5, x)
    assert torch.allclose(k0[[0, 2, 3]], torch.zeros(3), atol=1e-5) and torch.allclose(k1[1:], torch.zeros(2), atol=1e-5)
    # KL(N(3, .25) || N(0, .25)) = 0.5 * 3^2 / 0.25 = 18 nats, shared by 5 informative inputs + the bias; the bias among 4 + 1
    assert k0[1] == pytest.approx(18.0 / 6, rel=1e-4) and k1[0] == pytest.approx(18.0 / 5, rel=1e-4)
    census = unit_census(guide, model, 0.5, x, [(None, x, torch.zeros(20, dtype=torch.long))], kappa=0.05, num_samples=8)
    assert census.active == [1, 1] and census.widths == [4, 3] and census.active_units == [[1], [0]] and not census.kappa_searched


def test_the_threshold_found_by_ablation_keeps_the_units_a_fitted_posterior_uses(single_torch_thread):
    """A tiny network fitted on a task needing few units: the search finds the largest threshold
    whose ablation changes the log-likelihood by less than delta, which keeps a few units; removing
    every unit does not leave the log-likelihood as it was."""
    generator = torch.Generator().manual_seed(0)
    x = torch.randn(400, 5, generator=generator)
    y = (x[:, 0] > 0).long()
    model, guide = new_posterior((5, 16, 2), GaussianPrior(1.0), "meanfield", init_scale=0.05, seed=0)
    fit_posterior(model, guide, Split(x, y), FitRecipe(lr=3e-2, batch_size=400, steps=400, scale_lr=1e-1, estimator="local"), seed=0)
    data = [(None, x, y)]
    census = unit_census(guide, model, 1.0, x, data, num_samples=64)
    assert census.kappa_searched and census.kappa in KAPPA_GRID and census.ablation_change > -census.delta == -0.01
    assert 1 <= census.active[0] <= 4  # over-pruning: a few units carry the one direction that matters
    following = KAPPA_GRID[KAPPA_GRID.index(census.kappa) + 1]  # the next threshold removes a unit that matters
    assert unit_census(guide, model, 1.0, x, data, kappa=following, num_samples=64).ablation_change <= -0.01
    everything = unit_census(guide, model, 1.0, x, data, kappa=1e6, num_samples=64)  # every unit judged inactive
    assert everything.active == [0] and everything.ablation_change < -0.1
    with pytest.raises(ValueError, match="kappa must be a finite number > 0 or None, got 0"):
        unit_census(guide, model, 1.0, x, data, kappa=0)


def test_the_a_to_b_experiment_records_the_active_units_of_q_a_and_of_every_bayesian_b_fit(tmp_path, single_torch_thread):
    """q_A's census is taken on A; scratch's on B alone; transfer's, finetune's and joint's on A
    and B (each through its head); EWC's nets have none. The census in results.json is the one
    :func:`census_after` gives for the same posterior."""
    import json

    from pyro_bbt.transfer import build_parser, config_from_args, main
    from pyro_bbt.units import load_task_pair

    out = tmp_path / "run"
    args = ["--limit-train", "200", "--limit-eval", "60", "--hidden", "8", "--seeds", "0", "--fractions", "0.25", "--epochs-a", "2",
            "--epochs", "1", "--min-steps", "3", "--methods", "scratch,transfer,finetune,joint,ewc", "--eval-samples", "2", "--quiet"]
    assert main([*args, "--out", str(out)]) == 0
    tasks = load_task_pair(config_from_args(build_parser().parse_args(args)), 0.25, 0)
    a_images, b_images = len(tasks.a.train), len(tasks.b.train)
    assert 0 < b_images <= 1000 and 0 < a_images <= 1000
    results = json.loads((out / "results.json").read_text())
    (stage,) = [s for s in results["task_a"] if s["kind"] == "bayesian"]
    assert stage["census"]["ablation_examples"] == a_images
    assert stage["census"]["widths"] == [8] and 0 <= stage["census"]["active"][0] <= 8
    by_method = {u["method"]: u for u in results["units"]}
    assert by_method["ewc"]["census"] is None
    assert by_method["scratch"]["census"]["ablation_examples"] == b_images
    for method in ("transfer", "finetune", "joint"):
        census = by_method[method]["census"]
        assert census["ablation_examples"] == a_images + b_images and census["widths"] == [8]
        assert len(census["active_units"][0]) == census["active"][0] and census["ablation_change"] > -census["delta"]
    from pyro_bbt.fit_report import census_lines
    from pyro_bbt.report import main as report_main

    lines = census_lines(results)
    assert f"| q_A (on A) | 0 | {stage['census']['active'][0]}/8 |" in lines
    assert "| scratch 0.25 (on B) | 0 |" in lines and "| transfer 0.25 (on A and B) | 0 |" in lines and "| ewc" not in lines
    assert report_main([str(out)]) == 0
    for unit in results["units"]:
        unit["census"] = None
    for stage in results["task_a"]:
        stage.pop("census", None)  # a run made before the census was recorded
    assert census_lines(results) == ""
