"""Convergence: the scale learning rate, the stopping rule, the uninformed-weight check and the
warning when an unconverged posterior is transferred. Real training on tiny problems."""

from __future__ import annotations

import math

import pytest
import torch

from conftest import fresh_model_and_guide
from pyro_bbt.convergence import (
    StoppingRule,
    assess_convergence,
    check_posterior,
    elbo_test_text,
    median_scales,
    uninformed_inputs,
    uninformed_scale_ratio,
)
from pyro_bbt.data import Split
from pyro_bbt.experiment import ExperimentConfig, run_experiment, steps_for
from pyro_bbt.units import load_task_pair
from pyro_bbt.guides import GUIDES, guide_parameter_groups, guide_parameters, is_flow_parameter, is_scale_parameter
from pyro_bbt.inference import TrainConfig, train
from pyro_bbt.priors import GaussianPrior, ScaleMixturePrior
from pyro_bbt.fit_report import convergence_lines
from pyro_bbt.transfer import build_parser, config_from_args, main

SIZES = (12, 6, 3)


def _half_blank_data(n: int = 200, seed: int = 0) -> Split:
    """12 features, the last 6 zero in every row; labels from the first 6."""
    generator = torch.Generator().manual_seed(seed)
    x = torch.zeros(n, 12)
    x[:, :6] = torch.randn(n, 6, generator=generator)
    y = (x[:, :3] @ torch.tensor([1.0, -1.0, 0.5]) > 0).long() + (x[:, 3] > 1).long()
    return Split(x, y)


# ----------------------------------------------------------------------------- the scale learning rate


@pytest.mark.parametrize("guide_name", GUIDES)
def test_scale_groups_partition_the_guide_parameters(guide_name):
    _, guide = fresh_model_and_guide((784, 8, 5), guide_name, initialize=True)
    groups = guide_parameter_groups(guide, lr=1e-3, scale_lr=0.5)
    grouped = [p for g in groups for p in g["params"]]
    assert sorted(map(id, grouped)) == sorted(map(id, guide_parameters(guide)))
    names = {id(p): n for n, p in guide.named_parameters()}
    by_lr = {g["lr"]: [names[id(p)] for p in g["params"]] for g in groups}
    if guide_name == "delta":
        assert list(by_lr) == [1e-3]  # a point estimate has no widths
        return
    assert all(is_scale_parameter(n) for n in by_lr[0.5]) and not any(is_scale_parameter(n) for n in by_lr[1e-3])
    expected_width = {"lowrank": {"scale_unconstrained", "cov_factor"}, "planar": {"scale_unconstrained"}}
    if guide_name in expected_width:
        assert set(by_lr[0.5]) == expected_width[guide_name]
    # with a flow lr of their own, the flows' transforms form a third group; nothing else moves
    flow_groups = guide_parameter_groups(guide, lr=1e-3, scale_lr=0.5, flow_lr=2e-4)
    by_flow_lr = {g["lr"]: [names[id(p)] for p in g["params"]] for g in flow_groups}
    assert sorted(map(id, [p for g in flow_groups for p in g["params"]])) == sorted(map(id, guide_parameters(guide)))
    if guide_name in ("planar", "iaf"):
        assert by_flow_lr[2e-4] and all(is_flow_parameter(n) for n in by_flow_lr[2e-4])
        assert not any(is_flow_parameter(n) for n in by_flow_lr[1e-3] + by_flow_lr[0.5])
        assert set(by_flow_lr[0.5]) == set(by_lr[0.5])
    else:
        assert by_flow_lr == by_lr


@pytest.mark.parametrize("guide_name", ["normal", "meanfield", "lowrank", "planar", "iaf"])
def test_scale_lr_moves_the_scales_and_only_them(guide_name, single_torch_thread):
    """Adam's first step moves every parameter with a nonzero gradient by its group's lr
    (m/sqrt(v) = g/|g|): scales by scale_lr, the flows' transforms by flow_lr, everything else by lr."""
    data = _half_blank_data(64)
    model, guide = fresh_model_and_guide(SIZES, guide_name, initialize=True, num_flows=2)
    before = {n: p.detach().clone() for n, p in guide.named_parameters()}
    train(model, guide, data, TrainConfig(steps=1, batch_size=64, lr=1e-4, scale_lr=0.05, flow_lr=3e-3, kl_schedule="uniform",
                                          progress=False, eval_samples=0, estimator="weights"))
    flows = [name for name, _ in guide.named_parameters() if is_flow_parameter(name)]
    assert bool(flows) == (guide_name in ("planar", "iaf"))
    for name, value in guide.named_parameters():
        step = (value.detach() - before[name]).abs()
        moved = step[step > 0]
        assert moved.numel() > 0, name
        expected = 3e-3 if is_flow_parameter(name) else 0.05 if is_scale_parameter(name) else 1e-4
        assert torch.allclose(moved.max(), torch.tensor(expected), rtol=1e-3), (name, float(moved.max()))


def test_uninformed_weights_reach_the_prior_with_a_scale_lr(single_torch_thread):
    """Weights fed by always-zero inputs have the prior as exact posterior: with a scale lr of
    their own their fitted sigma reaches the prior's within 10 %; at the default lr 1e-3 the
    same budget leaves them near init_scale (the check can fail)."""
    data = _half_blank_data()
    assert uninformed_inputs(data.x).tolist() == [False] * 6 + [True] * 6
    prior = GaussianPrior(0.5)
    ratios = {}
    for scale_lr in (0.05, None):
        model, guide = fresh_model_and_guide(SIZES, prior=prior, init_scale=0.01)
        train(model, guide, data, TrainConfig(steps=400, batch_size=50, scale_lr=scale_lr, kl_schedule="uniform", progress=False, eval_samples=0))
        ratios[scale_lr] = uninformed_scale_ratio(guide, model, data.x)
        sigma = guide.get_loc_scale("layers.0.weight")[1].detach()[:, 6:]
        assert ratios[scale_lr] == pytest.approx(float((sigma / 0.5).median()))
    assert 0.9 <= ratios[0.05] <= 1.1
    assert ratios[None] < 0.1


def test_uninformed_scale_ratio_at_initialisation():
    data = _half_blank_data(20)
    model, guide = fresh_model_and_guide(SIZES, prior=GaussianPrior(0.5), init_scale=0.02, initialize=True)
    assert uninformed_scale_ratio(guide, model, data.x) == pytest.approx(0.04)
    mixture = ScaleMixturePrior(0.5, 1.0, math.exp(-6))
    model, guide = fresh_model_and_guide(SIZES, prior=mixture, init_scale=0.02, initialize=True)
    assert uninformed_scale_ratio(guide, model, data.x) == pytest.approx(0.02 / mixture.stddev)
    assert uninformed_scale_ratio(guide, model, torch.ones(3, 12)) is None  # no blank input
    assert set(median_scales(guide, model)) == {"layers.0.weight", "layers.1.weight"}
    model, guide = fresh_model_and_guide(SIZES, "delta", initialize=True)
    assert uninformed_scale_ratio(guide, model, data.x) is None  # a point mass has no width to check


# ----------------------------------------------------------------------------- the stopping rule


def _medians(values):
    return [{"layers.0.weight": v, "layers.1.weight": 0.1} for v in values]


def _records(elbos, medians):
    return [{"elbo": e, "median_scale": m} for e, m in zip(elbos, _medians(medians))]


def test_rule_stops_on_a_plateau_and_not_while_climbing():
    rule = StoppingRule(max_epochs=50, min_epochs=4, window=3, rel_tol=1e-3, scale_tol=0.01)
    flat = [-1000.0, -500.0, -400.0, -399.9, -399.8, -399.8]
    assert rule.criteria_hold(flat, _medians([0.2] * 6))
    assert rule.decide(_records(flat, [0.2] * 6)) == "stop"
    climbing = [-1000.0 + 10 * i for i in range(20)]  # +1 % per epoch at the end
    assert not rule.criteria_hold(climbing, _medians([0.2] * 20))
    assert rule.decide(_records(climbing, [0.2] * 20)) == "continue"
    assert not rule.criteria_hold(flat, _medians([0.2, 0.2, 0.2, 0.2, 0.2, 0.21]))  # a width still moving
    assert not rule.criteria_hold(flat[:3], _medians([0.2] * 3))  # too few epochs to judge
    assert StoppingRule(min_epochs=10, window=3, rel_tol=1e-3).decide(_records(flat, [0.2] * 6)) == "continue"
    assert rule.elbo_gain(flat) == pytest.approx((-399.8 + 400.0) / 399.8)  # over the 3-epoch window


@pytest.mark.parametrize("bad", [dict(max_epochs=0), dict(window=0), dict(rel_tol=0.0), dict(scale_tol=float("nan")), dict(min_epochs=9, max_epochs=5),
                                 dict(lr_drops=-1), dict(lr_factor=1.5)])
def test_rule_rejects_bad_settings(bad):
    with pytest.raises(ValueError):
        StoppingRule(**bad)


def test_train_stops_when_the_rule_holds_and_runs_on_while_the_elbo_climbs(single_torch_thread):
    data = _half_blank_data()
    loose = StoppingRule(max_epochs=200, min_epochs=4, window=2, rel_tol=5e-3, scale_tol=0.02)
    model, guide = fresh_model_and_guide(SIZES, prior=GaussianPrior(0.5))
    history = train(model, guide, data, TrainConfig(stopping=loose, batch_size=50, scale_lr=0.05, kl_schedule="uniform", progress=False, eval_samples=0,
                                                    verdict=None))  # the rule's mechanics alone
    epochs = len(history.epochs)
    assert 4 <= epochs < 200
    records = history.to_records()
    assert assess_convergence(records, loose).converged
    assert not assess_convergence(records[:-1], loose).converged  # it stopped at the first epoch the rule held
    report = check_posterior(guide, model, records, data.x, loose)
    assert report.converged and report.epochs == epochs and 0.8 < report.uninformed_scale_ratio < 1.2
    assert str(report).startswith(f"converged after {epochs} epochs: ELBO gain over the last 2 epochs ")

    # From a fresh start the ELBO climbs for many epochs: a tight rule lets all of them run.
    tight = StoppingRule(max_epochs=6, min_epochs=1, window=2, rel_tol=1e-3, scale_tol=0.02)
    model, guide = fresh_model_and_guide(SIZES, prior=GaussianPrior(0.5))
    history = train(model, guide, data, TrainConfig(stopping=tight, batch_size=50, scale_lr=0.05, kl_schedule="uniform", progress=False, eval_samples=0))
    assert len(history.epochs) == 6
    assert not assess_convergence(history.to_records(), tight).converged


def test_rule_lowers_the_learning_rates_before_it_stops(single_torch_thread):
    """With one drop the rule first divides the learning rates by 10 where it would have stopped,
    then stops when its criteria hold again over the epochs at the lower rate."""
    rule = StoppingRule(max_epochs=200, min_epochs=3, window=2, rel_tol=5e-3, scale_tol=0.02, lr_drops=1)
    records = [{"elbo": -100.0, "median_scale": {"w": 0.5}, "lr_scale": 1.0}] * 3
    assert rule.decide(records) == "drop"
    after = records + [{"elbo": -100.0, "median_scale": {"w": 0.5}, "lr_scale": 0.1}] * 2
    assert rule.decide(after) == "continue"  # two epochs at the new rate: too few to judge (window 2)
    assert rule.decide(after + [after[-1]]) == "stop"
    assert not assess_convergence(records, rule).converged  # a drop still pending is not convergence

    data = _half_blank_data()
    model, guide = fresh_model_and_guide(SIZES, prior=GaussianPrior(0.5))
    history = train(model, guide, data, TrainConfig(stopping=rule, batch_size=50, lr=0.02, scale_lr=0.05, kl_schedule="uniform",
                                                    progress=False, eval_samples=0))
    scales = [e.lr_scale for e in history.epochs]
    first = scales.index(0.1)
    assert set(scales[:first]) == {1.0} and set(scales[first:]) == {0.1} and len(scales) - first >= 3
    records = history.to_records()
    assert rule.decide(records[:first]) == "drop" and assess_convergence(records, rule).converged


def test_train_config_rejects_steps_with_a_rule():
    with pytest.raises(ValueError, match="either steps or stopping"):
        TrainConfig(steps=5, stopping=StoppingRule())
    with pytest.raises(ValueError, match="scale_lr"):
        TrainConfig(scale_lr=0.0)


# ----------------------------------------------------------------------------- the warning


def _tiny(**overrides) -> ExperimentConfig:
    base = dict(limit_train=300, limit_eval=200, hidden=(16,), epochs=1, epochs_a=1, max_epochs_a=None, min_steps=3,
                fractions=(0.1,), seeds=(0,), eval_samples=4, methods=("transfer",))
    return ExperimentConfig(**(base | overrides))


def test_unconverged_q_a_is_flagged_when_transferred(single_torch_thread):
    warned = []
    results = run_experiment(_tiny(), log=lambda m: None, warn=warned.append)
    assert len(warned) == 1 and "NOT converged" in warned[0] and results["warnings"] == [warned[0].removeprefix("warning: ")]
    assert results["task_a"][0]["convergence"]["converged"] is False
    assert results["units"][0]["prior_converged"] is False
    report = convergence_lines(results)
    assert "| 0 | 1 (fixed) | NO | — |" in report  # one epoch: no gain or drift to judge
    assert "WARNING: seed 0: q_A is NOT converged" in report and "transfer 0.1: 0/1" in report

    # The same fit without transfer warns nobody (scratch does not use q_A).
    warned.clear()
    results = run_experiment(_tiny(methods=("scratch",)), log=lambda m: None, warn=warned.append)
    assert warned == [] and results["warnings"] == []


def test_converged_q_a_is_not_flagged(single_torch_thread):
    warned = []
    config = _tiny(epochs_a=4, max_epochs_a=40, rel_tol=1.0, scale_tol=10.0, window=1, lr_drops=1, lr_factor=0.1, verdict_tol=None)
    results = run_experiment(config, log=lambda m: None, warn=warned.append)
    assert warned == [] and results["warnings"] == []
    stage = results["task_a"][0]["convergence"]
    # 4 epochs (the minimum) at lr_a, then the rule's one drop and 2 epochs (window 1) at lr_a / 10
    assert stage["converged"] is True and stage["epochs"] == 6 and len(stage["elbo_trace"]) == 6
    assert 0.0 < stage["uninformed_scale_ratio"] and set(stage["median_scale"]) == {"layers.0.weight", "layers.1.weight"}
    assert results["units"][0]["prior_converged"] is True
    assert results["units"][0]["convergence"]["epochs"] >= 1


def test_the_rule_drops_q_a_learning_rates_by_lr_factor_lr_drops_times(single_torch_thread):
    config = _tiny(epochs_a=4, max_epochs_a=40, rel_tol=1.0, scale_tol=10.0, window=1, lr_drops=2, lr_factor=0.5, verdict_tol=None)
    stage = run_experiment(config, log=lambda m: None)["task_a"][0]
    # 4 epochs (the minimum) at lr_a, then 2 epochs (window 1) after each of the two drops
    assert [r["lr_scale"] for r in stage["history"]] == [1.0] * 4 + [0.5] * 2 + [0.25] * 2
    assert stage["convergence"]["converged"] is True and stage["convergence"]["rule"]["lr_factor"] == 0.5


@pytest.mark.parametrize("batch_size_a, steps_per_epoch", [(50, 6), (None, 3)])
def test_q_a_is_fitted_in_minibatches_of_batch_size_a(batch_size_a, steps_per_epoch, single_torch_thread):
    # 300 training images of A; B's budget stays in minibatches of batch_size whatever batch_size_a
    config = _tiny(epochs_a=2, batch_size=100, batch_size_a=batch_size_a, methods=("scratch", "transfer"))
    results = run_experiment(config, log=lambda m: None)
    assert results["task_a"][0]["steps"] == 2 * steps_per_epoch
    assert [r["epoch"] for r in results["task_a"][0]["history"]] == [1, 2]
    assert {u["steps"] for u in results["units"]} == {steps_for(len(load_task_pair(config, 0.1, 0).b.train), 1, 100, 3)}


def test_cli_reads_batch_size_a_and_lr_factor_and_rejects_bad_ones(tmp_path, capsys):
    args = config_from_args(build_parser().parse_args(["--preset", "paper", "--batch-size-a", "none", "--lr-factor", "0.5"]))
    assert args.batch_size_a is None and args.a_batch_size == 128 and args.lr_factor == 0.5 and args.stopping_rule.lr_factor == 0.5
    assert config_from_args(build_parser().parse_args(["--preset", "paper"])).a_batch_size == 2048
    for flag, value, message in [("--lr-factor", "1.5", "lr-factor must lie in (0, 1), got 1.5"),
                                 ("--batch-size-a", "0", "batch-size-a must be None or an integer >= 1, got 0")]:
        assert main([flag, value, "--out", str(tmp_path / "run")]) == 2
        assert message in capsys.readouterr().err
        assert not (tmp_path / "run").exists()


def test_cli_says_on_stderr_that_q_a_is_not_converged(tmp_path, capsys, single_torch_thread):
    args = ["--limit-train", "300", "--limit-eval", "200", "--hidden", "16", "--epochs", "1", "--epochs-a", "1", "--max-epochs-a", "none",
            "--min-steps", "3", "--fractions", "0.1", "--seeds", "0", "--eval-samples", "4", "--quiet", "--methods", "transfer"]
    assert main(args + ["--out", str(tmp_path / "run")]) == 0
    err = capsys.readouterr().err
    assert "warning: seed 0: q_A is NOT converged after 1 epochs" in err


def test_cli_rejects_a_cap_below_the_minimum(tmp_path, capsys):
    assert main(["--epochs-a", "5", "--max-epochs-a", "3", "--out", str(tmp_path / "run")]) == 2
    err = capsys.readouterr().err
    assert "max-epochs-a must be none or an integer >= epochs-a (5), got 3" in err
    assert not (tmp_path / "run").exists()


def test_scale_mixture_prior_from_the_config(single_torch_thread):
    config = _tiny(prior="mixture", methods=("scratch", "transfer"))
    prior = config.base_prior()
    assert isinstance(prior, ScaleMixturePrior) and (prior.pi, prior.sigma1, prior.sigma2) == (0.5, 1.0, math.exp(-6))
    assert config.base_prior_std == pytest.approx(math.sqrt(0.5 + 0.5 * math.exp(-12)))
    results = run_experiment(config, log=lambda m: None, warn=lambda m: None)
    assert [u["status"] for u in results["units"]] == ["ok", "ok"]
    assert results["config"]["prior"] == "mixture"


# ----------------------------------------------------------------------------- the verdict in train


def test_slow_steps_that_the_rule_passes_are_not_converged_and_train_warns(single_torch_thread):
    """lr 1e-6, or one full-batch step per epoch at a small rate: nothing moves between epochs, so
    the rule's per-epoch criteria hold at once; the verdict does not pass them, train warns, and
    the report says not converged (the old rule alone says converged)."""
    from pyro_bbt.inference import UnconvergedFitWarning

    data = _half_blank_data()
    loose = StoppingRule(max_epochs=40, min_epochs=3, window=2, lr_drops=0)
    for config in (TrainConfig(epochs=20, lr=1e-6, batch_size=50, kl_schedule="uniform", progress=False, eval_samples=0),
                   TrainConfig(epochs=20, lr=1e-3, scale_lr=5e-4, batch_size=10_000, kl_schedule="uniform", progress=False, eval_samples=0)):
        model, guide = fresh_model_and_guide(SIZES, prior=GaussianPrior(1.0))
        with pytest.warns(UnconvergedFitWarning, match="NOT converged after 20 epochs"):
            records = train(model, guide, data, config).to_records()
        assert loose.decide(records) == "stop"  # the old rule is fooled
        report = assess_convergence(records, loose)
        assert report.rule_holds and not report.converged
        assert any("blank-pixel" in reason for reason in report.verdict["reasons"])
        assert [r["verdict"] is not None for r in records] == [False] * 19 + [True]


def test_the_verdict_overrules_an_early_stop_with_further_drops(single_torch_thread):
    """A rule with no drops and loose criteria would stop after 3 epochs; the verdict says no, so
    the rates are lowered (x lr_factor) and the rule waits again, up to max_overrules times: each
    judgement is recorded on its epoch, and the report's verdict is the last one."""
    from pyro_bbt.verdict import VerdictConfig

    data = _half_blank_data()
    rule = StoppingRule(max_epochs=60, min_epochs=3, window=2, rel_tol=10.0, scale_tol=10.0, lr_drops=0, lr_factor=0.5)
    model, guide = fresh_model_and_guide(SIZES, prior=GaussianPrior(1.0))
    config = TrainConfig(stopping=rule, lr=1e-3, batch_size=50, kl_schedule="uniform", progress=False, eval_samples=0,
                         verdict=VerdictConfig(max_overrules=2), warn_unconverged=False)
    records = train(model, guide, data, config).to_records()
    judged = [r for r in records if r["verdict"] is not None]
    # judged at each stop (the rule needs window + 1 epochs at a rate): two overrules, then it stops
    assert [r["epoch"] for r in judged] == [3, 6, 9] and len(records) == 9
    assert [r["lr_scale"] for r in records] == [1.0] * 3 + [0.5] * 3 + [0.25] * 3
    assert not any(r["verdict"]["converged"] for r in judged)
    report = assess_convergence(records, rule)
    assert report.rule_holds and not report.converged and report.verdict == judged[-1]["verdict"]


def test_the_means_test_tells_a_slow_rise_of_a_large_elbo_from_noise():
    """A KL-dominated ELBO near -7,000 that still rises 10 nats an epoch under scatter: the
    two-point test calls it stopped (50 nats over 5 epochs is 0.7 %), the window means do not; a
    flat trace with the same scatter is stopped by both."""
    noise = [3.0, -2.0, 1.0, -4.0, 2.0, 0.0, -1.0, 4.0, -3.0, 1.0]
    rising = [-7000.0 + 10 * t + e for t, e in enumerate(noise)]
    flat = [-7000.0 + e for e in noise]
    two_point, means = StoppingRule(window=5), StoppingRule(window=5, elbo_test="means")
    assert two_point.elbo_stopped(rising) and two_point.elbo_stopped(flat)
    assert means.elbo_stopped(rising) is False and means.elbo_stopped(flat) is True
    gain, stderr = means.mean_gain(rising)
    assert gain == pytest.approx(50.0 + (sum(noise[5:]) - sum(noise[:5])) / 5) and 0 < stderr < 25  # the within-window rise counts as scatter
    assert means.elbo_stopped(rising[:9]) is None  # 2 windows needed
    assert means.criteria_hold(flat, _medians([0.2] * 10)) and not means.criteria_hold(rising, _medians([0.2] * 10))
    with pytest.raises(ValueError, match="unknown elbo_test 'bogus'; allowed: means, two-point, schedule"):
        StoppingRule(elbo_test="bogus")

    # results.json and the report carry the statistic the rule's own test judged, not the two-point gain
    records = [{"elbo": e, "median_scale": {"w": 0.2}, "lr_scale": 1.0} for e in rising]
    for rule, expected in ((means, f"{gain:+.3g} ± {stderr:.2g} nats (means)"), (two_point, f"{two_point.elbo_gain(rising):.1e} (two-point)")):
        report = assess_convergence(records, rule)
        assert elbo_test_text(report.to_dict()) == expected and expected in str(report)
    assert assess_convergence(records, means).elbo_mean_gain == pytest.approx([gain, stderr])
    assert assess_convergence(records, two_point).elbo_mean_gain is None
    assert elbo_test_text(assess_convergence(records[:9], means).to_dict()) == "n/a"  # 2 windows needed


def test_a_schedule_drops_the_rates_every_window_epochs_whatever_the_fit_does():
    """``elbo_test="schedule"``: the rates fall after every ``window`` epochs at them and the rule
    stops after the last rate's, on a rising ELBO and moving widths alike; in ``train`` the rates
    follow it (the verdict, off here, would judge the stop)."""
    rule = StoppingRule(max_epochs=50, min_epochs=1, window=3, lr_drops=2, lr_factor=0.5, elbo_test="schedule")
    history, actions = [], []
    scale = 1.0
    for epoch in range(12):
        history.append({"elbo": -1000.0 + 100 * epoch, "median_scale": {"w": 0.01 * 1.5 ** epoch}, "lr_scale": scale})
        action = rule.decide(history)
        actions.append(action)
        if action == "stop":
            break
        if action == "drop":
            scale *= rule.lr_factor
    assert actions == ["continue", "continue", "drop", "continue", "continue", "drop", "continue", "continue", "stop"]
    assert StoppingRule(window=3, elbo_test="means").decide(history[:3]) == "continue"  # a test that looks at the ELBO would not drop there
    assert elbo_test_text(assess_convergence(history, rule).to_dict()) == "none (schedule)"
    from pyro_bbt.fitting import new_posterior

    generator = torch.Generator().manual_seed(0)
    split = Split(torch.rand(40, 6, generator=generator), torch.randint(0, 2, (40,), generator=generator))
    model, guide = new_posterior((6, 4, 2), GaussianPrior(1.0), "meanfield", init_scale=0.01, seed=0)
    fitted = train(model, guide, split, TrainConfig(stopping=StoppingRule(max_epochs=50, min_epochs=1, window=2, lr_drops=1, lr_factor=0.1,
                                                                         elbo_test="schedule"), batch_size=20, verdict=None, seed=0))
    assert [e.lr_scale for e in fitted.epochs] == pytest.approx([1.0, 1.0, 0.1, 0.1])


def test_a_restart_renews_the_rules_drops():
    rule = StoppingRule(max_epochs=100, min_epochs=2, window=1, rel_tol=1.0, scale_tol=1.0, lr_drops=1)
    flat = {"elbo": -1.0, "median_scale": {"w": 0.5}}
    dropped = [{**flat, "lr_scale": 1.0}] * 2 + [{**flat, "lr_scale": 0.3}] * 2
    assert rule.decide(dropped) == "stop"  # its one drop taken
    restarted = dropped + [{**flat, "lr_scale": 1.0}] * 2
    assert rule.decide(restarted) == "drop"  # back at the first rates: the drop is due again


def test_the_verdict_overrules_by_a_restart_at_the_first_rates(single_torch_thread):
    """``overrule="restart"``: a fit the verdict rejects goes back to the first rates and the
    rule's drops start over (here one drop by 0.5 before each stop)."""
    from pyro_bbt.verdict import VerdictConfig

    data = _half_blank_data()
    rule = StoppingRule(max_epochs=60, min_epochs=3, window=2, rel_tol=10.0, scale_tol=10.0, lr_drops=1, lr_factor=0.5)
    model, guide = fresh_model_and_guide(SIZES, prior=GaussianPrior(1.0))
    config = TrainConfig(stopping=rule, lr=1e-3, batch_size=50, kl_schedule="uniform", progress=False, eval_samples=0,
                         verdict=VerdictConfig(max_overrules=1, overrule="restart"), warn_unconverged=False)
    records = train(model, guide, data, config).to_records()
    assert [r["lr_scale"] for r in records] == [1.0] * 3 + [0.5] * 3 + [1.0] * 3 + [0.5] * 3
    assert [r["epoch"] for r in records if r["verdict"] is not None] == [6, 12]
    with pytest.raises(ValueError, match="unknown overrule 'later'; allowed: drop, restart"):
        VerdictConfig(overrule="later")


def test_train_config_converged_is_the_recipe_that_fits_to_convergence():
    config = TrainConfig.converged(batch_size=256)
    assert config.stopping == StoppingRule(max_epochs=3000, lr_drops=3, lr_factor=0.3)
    assert (config.lr, config.scale_lr, config.batch_size, config.kl_schedule) == (1e-2, 3e-2, 256, "uniform")
    assert config.verdict is not None and config.verdict.tol_per_datum > 0
    # a pass counts once the fit, continued as long again, no longer raises its ELBO
    assert (config.verdict.continuation_epochs, config.verdict.continuation_fraction) == (20, 1.0)
    assert config.verdict.continuation_length(150) == 150
    # scored with draws added where 8 cannot decide (on small data they cannot)
    assert (config.verdict.continuation_draws, config.verdict.continuation_max_draws, config.verdict.rescore_max_draws) == (8, 256, 0)
    with pytest.raises(ValueError, match="verdict must be None or a VerdictConfig, got 0.02"):
        TrainConfig(verdict=0.02)


def test_cli_slow_q_a_is_reported_not_converged(tmp_path, capsys):
    """The issue's slow-step q_A: one full-batch step per epoch at lr 1e-3 for 40 epochs. The old
    rule called it converged; now results.json does not, and the CLI says so."""
    import json

    out = tmp_path / "slow"
    args = ["--limit-train", "400", "--limit-eval", "100", "--hidden", "16", "--seeds", "0", "--methods", "transfer", "--fractions", "0.1",
            "--epochs-a", "40", "--max-epochs-a", "none", "--batch-size-a", "100000", "--lr-drops", "0", "--lr-a", "1e-3",
            "--scale-lr", "5e-4", "--init-scale", "0.05", "--epochs", "1", "--min-steps", "2", "--eval-samples", "2", "--quiet", "--out", str(out)]
    assert main(args) == 0
    stage = json.loads((out / "results.json").read_text())["task_a"][0]["convergence"]
    assert stage["converged"] is False and stage["verdict"]["converged"] is False
    assert "q_A is NOT converged" in capsys.readouterr().err
