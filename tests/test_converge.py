"""Tests for the convergence bench (benchmarks/converge.py, outside the package): real fits on tiny
data (200 images, 784-8-5, two epochs), the IVON -> mean-field mapping, the common evaluator, and
the CLI's errors. No timing assertions."""

import argparse
import json
import math
import time
from dataclasses import replace

import pyro
import pytest
import torch
from pyro.infer.autoguide import AutoNormal

from conftest import load_benchmark
from pyro_bbt.data import Task, load_task
from pyro_bbt.experiment import PRESETS, ExperimentConfig
from pyro_bbt.ewc import MLP
from pyro_bbt.guides import initialize_guide, make_guide, posterior_loc_scale, start_from_posterior
from pyro_bbt.model import BayesianMLP
from pyro_bbt.objectives import closed_form_kl
from pyro_bbt.priors import GaussianPrior

converge = load_benchmark("converge")

TINY = ["--problem", "small", "--limit-train", "200", "--hidden", "8", "--max-epochs", "2", "--judge-every", "1", "--time-cap", "30",
        "--eval-draws", "2", "--threads", "1"]
BAYESIAN_KEYS = {"name", "seed", "round", "seconds", "converged", "gain_upper_per_datum", "verdict_reasons", "stopped_by", "judgements",
                 "judge_seconds", "epochs", "steps", "elbo", "elbo_per_datum", "kl", "train_nll_per_datum", "test_accuracy", "trace",
                 "load_average", "continued", "remaining_gain_per_datum", "start_seconds", "continuations"}
MLP_KEYS = {"name", "seed", "round", "seconds", "converged", "stopped_by", "epochs", "best_epoch", "steps", "val_accuracy", "test_accuracy",
            "trace", "load_average"}
FAKE_ROW = converge.Row("fake-peer", "a row whose package is missing", converge.run_mlp, module="pyro_bbt_no_such_module",
                        package="no-such-package")


@pytest.fixture(scope="module")
def report(tmp_path_factory):
    folder = tmp_path_factory.mktemp("converge")
    threads = torch.get_num_threads()
    assert converge.main([*TINY, "--rounds", "2", "--continue", "1@3e-3,1@1e-3", "--out", str(folder / "converge.json"), "--figure", str(folder / "converge.png")]) == 0
    assert torch.get_num_threads() == threads  # the bench's one thread does not leak into the caller
    assert (folder / "converge.png").stat().st_size > 0
    return json.loads((folder / "converge.json").read_text())


def test_every_row_runs_and_returns_its_fields(report):
    assert [r["name"] for r in report["raw"]] == list(converge.ROWS) * 2  # interleaved: every row once per round
    assert [r["seed"] for r in report["raw"]] == [0] * len(converge.ROWS) + [1] * len(converge.ROWS)
    for record in report["raw"]:
        assert set(record) == (MLP_KEYS if record["name"] == "mlp" else BAYESIAN_KEYS), record["name"]
        assert record["seconds"] > 0 and 1 <= record["epochs"] <= 2 and record["steps"] >= record["epochs"]
        assert len(record["trace"]) == record["epochs"]
        assert [p["epoch"] for p in record["trace"]] == list(range(1, record["epochs"] + 1))
        assert all(a["seconds"] <= b["seconds"] <= record["seconds"] for a, b in zip(record["trace"], record["trace"][1:]))
        assert 0.0 <= record["test_accuracy"] <= 1.0
        if record["name"] == "mlp":
            assert record["converged"] is None and 0.0 <= record["val_accuracy"] <= 1.0
            continue
        assert record["converged"] is False and record["stopped_by"] == "epoch cap"  # two epochs of 200 images: nobody converges
        assert record["judgements"] >= 1 and record["verdict_reasons"]
        assert all(math.isfinite(record[key]) for key in ("elbo", "kl", "train_nll_per_datum"))
        assert record["elbo_per_datum"] == pytest.approx(record["elbo"] / 200)
        assert record["train_nll_per_datum"] == pytest.approx(-(record["elbo"] + record["kl"]) / 200)
        assert all(math.isfinite(p["elbo"]) for p in record["trace"])
        # fitted on, off the clock, stage by stage, each stage scored by the common evaluator (pyro-svi's AutoNormal copied into a meanfield guide)
        assert [(c["epochs"], c["lr"]) for c in record["continued"]] == [(1, 3e-3), (2, 1e-3)]
        assert all(math.isfinite(c["elbo"]) for c in record["continued"]) and record["continued"][0]["elbo"] != record["elbo"]
        assert record["remaining_gain_per_datum"] == pytest.approx((max(c["elbo"] for c in record["continued"]) - record["elbo"]) / 200)
        if record["name"] == "recipe-mle":  # the deterministic net's early stopping first, on the clock
            assert record["judge_seconds"] is None and 0 < record["start_seconds"] < record["trace"][0]["seconds"]
            continue
        assert record["start_seconds"] is None
        if record["name"] in ("recipe", "recipe-avg"):
            assert record["judge_seconds"] is None and record["steps"] == 2 * 7  # minibatches of 32 (a tenth of 200, at least 32)
        else:
            assert record["judgements"] == 2 and 0 < record["judge_seconds"] < record["seconds"]  # judged after each epoch


def test_meta_and_summary(report):
    meta = report["meta"]
    assert meta["complete"] is True and meta["rounds"] == 2 and meta["num_threads"] == 1
    assert meta["sizes"] == [784, 8, 5] and meta["train_size"] == 200 and meta["prior_std"] == 1.0 and meta["guide"] == "meanfield"
    assert meta["evaluator"]["num_draws"] == 2 and meta["verdict"]["tol_per_datum"] == 0.01
    summary = {s["name"]: s for s in report["summary"]}
    assert list(summary) == list(converge.ROWS)
    for name, s in summary.items():
        assert s["rounds"] == 2 and s["median_seconds"] == pytest.approx(sum(s["seconds"]) / 2)
        assert s["ratio_to_recipe"] == pytest.approx(s["median_seconds"] / summary["recipe"]["median_seconds"])
        assert s["ratio_to_mlp"] == pytest.approx(s["median_seconds"] / summary["mlp"]["median_seconds"])
    assert summary["recipe"]["ratio_to_recipe"] == pytest.approx(1.0) and summary["recipe"]["target_met"] is None
    assert summary["mlp"]["converged_rounds"] is None and summary["mlp"]["median_elbo"] is None
    gaps = [s["elbo_gap_per_datum_to_best"] for s in report["summary"] if s["median_elbo"] is not None]
    assert min(gaps) == 0.0 and all(g >= 0 for g in gaps)
    assert summary["ivon"]["target_met"] is False and summary["pyro-svi"]["target_met"] is False  # never converged
    table = converge.markdown_table(report["summary"])
    assert table.count("\n") == 1 + len(summary) and "not converged by cap" in table


def test_ivon_mapping_is_exact_at_initialisation():
    pyro.clear_param_store()
    torch.manual_seed(0)
    num_data, prior_std, init_std = 200, 1.0, 0.01
    net = MLP((6, 4, 3))
    optimizer = converge.ivon_optimizer(net, num_data, prior_std, init_std, converge.IVONSettings())
    group = optimizer.param_groups[0]
    assert group["ess"] == num_data and group["weight_decay"] == pytest.approx(1 / (num_data * prior_std**2))  # the prior N(0, 1), not 1e-4
    expected = 1 / math.sqrt(group["ess"] * (group["hess_init"] + group["weight_decay"]))
    assert expected == pytest.approx(init_std, rel=1e-12)
    posterior = converge.ivon_posterior(optimizer, net)
    assert list(posterior) == [name for name, _ in net.named_parameters()] == list(BayesianMLP((6, 4, 3)).site_shapes)
    model = BayesianMLP((6, 4, 3))
    guide = initialize_guide(make_guide("meanfield", model), 6)
    start_from_posterior(guide, posterior)
    read = posterior_loc_scale(guide, model)
    for name, parameter in net.named_parameters():
        loc, scale = read[name]
        assert torch.equal(loc, parameter.detach())
        assert torch.allclose(scale, torch.full_like(scale, expected), rtol=1e-6) and torch.allclose(scale, torch.full_like(scale, init_std), rtol=1e-6)


def test_ivon_posterior_is_the_width_ivon_samples_with():
    """The formula checked against the package itself: the spread of the weights that
    ``sampled_params`` draws is the width :func:`ivon_posterior` reads, after training moved it."""
    torch.manual_seed(0)
    net = MLP((4, 3))
    optimizer = converge.ivon_optimizer(net, 50, 1.0, 0.1, converge.IVONSettings(lr=0.05, beta2=0.9))
    x, y = torch.randn(50, 4), torch.randint(0, 3, (50,))
    for _ in range(20):
        with optimizer.sampled_params(train=True):
            optimizer.zero_grad()
            torch.nn.functional.cross_entropy(net(x), y).backward()
        optimizer.step()
    posterior = converge.ivon_posterior(optimizer, net)
    assert not torch.allclose(posterior["layers.0.weight"][1], torch.full((3, 4), 0.1))  # the Hessian moved the widths
    draws = {name: [] for name in posterior}
    for _ in range(4000):
        with optimizer.sampled_params():
            for name, parameter in net.named_parameters():
                draws[name].append(parameter.detach().clone())
    for name, (loc, scale) in posterior.items():
        samples = torch.stack(draws[name])
        assert torch.allclose(samples.mean(0), loc, atol=4 * float(scale.max()) / math.sqrt(4000))
        assert torch.allclose(samples.std(0), scale, rtol=0.08)
        assert torch.equal(dict(net.named_parameters())[name].detach(), loc)  # between steps the parameters hold the means


def test_bayes_torch_posterior_is_the_librarys_own_and_its_kl_the_librarys():
    """The bayes-torch row's reading of bayesian-torch's layers: the sites of BayesianMLP, the
    means the layers hold, the widths ``log(1 + exp(rho))`` the layers sample with (checked on
    their draws), starting near ``init_scale``, and our closed-form KL equal to the library's
    own ``kl_loss`` (its per-tensor means times the tensors' sizes) under the prior N(0, 0.5^2)."""
    pytest.importorskip("bayesian_torch")
    torch.manual_seed(0)
    sizes, prior_std, init_std = (6, 4, 3), 0.5, 0.01
    net = converge.bayes_torch_net(sizes, prior_std, init_std)
    posterior = converge.bayes_torch_posterior(net)
    model = BayesianMLP(sizes, GaussianPrior(prior_std))
    assert list(posterior) == list(model.site_shapes)
    assert all(loc.shape == model.site_shapes[name] for name, (loc, _) in posterior.items())
    layers = [m for m in net if not isinstance(m, torch.nn.ReLU)]
    assert torch.equal(posterior["layers.1.weight"][0], layers[1].mu_weight.detach())
    widths = torch.cat([scale.reshape(-1) for _, scale in posterior.values()])
    # rho = log(expm1(0.01)) + N(0, 0.1^2), and sigma ~ exp(rho) there: within exp(+-0.5) (5 standard deviations), about 0.01 in the median
    assert 0.01 * math.exp(-0.5) < float(widths.min()) and float(widths.max()) < 0.01 * math.exp(0.5)
    assert float(widths.median()) == pytest.approx(init_std, rel=0.1)
    library_kl = sum(float(layer.kl_div(mu, torch.nn.functional.softplus(rho), prior_mu, prior_sigma)) * mu.numel()
                     for layer in layers for mu, rho, prior_mu, prior_sigma in (
                         (layer.mu_weight, layer.rho_weight, layer.prior_weight_mu, layer.prior_weight_sigma),
                         (layer.mu_bias, layer.rho_bias, layer.prior_bias_mu, layer.prior_bias_sigma)))
    assert float(layers[0].prior_weight_sigma[0, 0]) == prior_std  # "prior_variance" is the standard deviation
    assert float(closed_form_kl(model, posterior)) == pytest.approx(library_kl, rel=1e-5)
    loc, scale = posterior["layers.0.weight"]
    with torch.no_grad():  # the layer samples weights with exactly these widths: input e_i reads weight column i plus the bias
        outputs = torch.stack([layers[0](torch.eye(6)) for _ in range(4000)])
    spread = outputs.std(0).T  # (4, 6): sqrt(sigma_w^2 + sigma_b^2)
    bias_scale = posterior["layers.0.bias"][1]
    assert torch.allclose(spread, (scale**2 + bias_scale[:, None] ** 2).sqrt(), rtol=0.08)
    assert torch.allclose(outputs.mean(0).T, loc + layers[0].mu_bias.detach()[:, None], atol=4 * float(spread.max()) / math.sqrt(4000))


def test_common_evaluator_gives_the_same_elbo_whichever_row_produced_the_posterior(mnist3):
    """One posterior, as the recipe's and IVON's ``meanfield`` guide holds it and as plain
    Pyro's ``AutoNormal`` does: the evaluator scores it the same."""
    train = mnist3[0].subset(100)
    sizes = (784, 8, 3)
    pyro.clear_param_store()
    torch.manual_seed(0)
    net = MLP(sizes)
    optimizer = converge.ivon_optimizer(net, len(train), 1.0, 0.05, converge.IVONSettings())
    posterior = converge.ivon_posterior(optimizer, net)
    model = BayesianMLP(sizes)
    meanfield = initialize_guide(make_guide("meanfield", model), 784)
    start_from_posterior(meanfield, posterior)
    autonormal = initialize_guide(AutoNormal(model, init_scale=0.5), 784)
    start_from_posterior(autonormal, posterior)
    evaluator = converge.Evaluator(num_draws=4, seed=3)
    first, second = evaluator.score(model, meanfield, train), evaluator.score(model, autonormal, train)
    assert first.elbo == pytest.approx(second.elbo, rel=1e-9) and first.kl == pytest.approx(second.kl, rel=1e-9)
    assert first == evaluator.score(model, meanfield, train)  # fixed noise: the same numbers at every call
    assert converge.Evaluator(num_draws=4, seed=4).score(model, meanfield, train).elbo != first.elbo


def test_judged_rows_are_judged_every_k_epochs_and_stop_at_the_first_pass_or_a_divergence():
    config = converge.ConvergeConfig(converge.PROBLEMS["small"], max_epochs=10, judge_every=2)
    judged = []

    def judge(epoch):
        judged.append(epoch)
        return {"converged": epoch == 4, "gain_upper_per_datum": 0.001, "reasons": []}

    epochs = iter(range(1, 11))
    finished = converge.run_judged(lambda: (-100.0, 3 * next(epochs)), judge, config, start=time.perf_counter())
    assert judged == [2, 4] and finished.stopped_by == converge.JUDGED_PASS and finished.epochs == 4 and finished.steps == 12
    assert finished.judgements == 2 and finished.verdict["converged"] is True

    def never(epoch):
        judged.append(epoch)
        return {"converged": False, "gain_upper_per_datum": None, "reasons": ["not yet"]}

    judged.clear()
    finished = converge.run_judged(lambda: (-1.0, 1), never, replace(config, max_epochs=5), start=time.perf_counter())
    assert judged == [2, 4, 5] and finished.stopped_by == "epoch cap" and finished.epochs == 5  # judged once more at the cap

    def diverging():
        if len(judged) >= 3:
            raise FloatingPointError("loss is nan")
        return -1.0, 1

    judged.clear()
    finished = converge.run_judged(diverging, never, config, start=time.perf_counter())
    assert finished.stopped_by == "diverged in epoch 7 (loss is nan)" and finished.epochs == 6 and judged == [2, 4, 6]


class _ScriptedContinuer:
    """Continuations as long as the fit so far, each one's verdict the next of ``outcomes``."""

    def __init__(self, outcomes):
        self.outcomes, self.started, self.before = list(outcomes), [], []

    def start(self, epoch):
        self.started.append(epoch)
        return {"start_epoch": epoch, "epochs": epoch}

    def before_epoch(self, done, running):
        self.before.append((running["start_epoch"], done))

    def finish(self, running, epoch, pass_record):
        passed = self.outcomes.pop(0)
        return dict(pass_record) | {"converged": passed, "reasons": [] if passed else ["gained"],
                                    "continuation": {"start_epoch": running["start_epoch"], "end_epoch": epoch}}


def test_whole_verdict_confirms_a_pass_by_continuations_and_a_cap_inside_one_is_not_converged():
    """``--judge whole``: the line search's pass at epoch 2 starts a continuation of 2 epochs; it
    gains, so the next (4 epochs, from epoch 4) starts at once, confirming the same pass, and its
    pass stops the row at epoch 8. No line-search judgement happens inside a continuation."""
    config = converge.ConvergeConfig(converge.PROBLEMS["small"], max_epochs=20, judge_every=2)
    judged = []

    def judge(epoch):
        judged.append(epoch)
        return {"converged": True, "gain_upper_per_datum": 0.001, "reasons": [], "epoch": epoch}

    continuer = _ScriptedContinuer([False, True])
    finished = converge.run_judged(lambda: (-1.0, 1), judge, config, time.perf_counter(), continuer)
    assert judged == [2] and continuer.started == [2, 4] and finished.epochs == 8
    assert continuer.before == [(2, 0), (2, 1), (4, 0), (4, 1), (4, 2), (4, 3)]  # each continuation epoch told how far it is
    assert finished.stopped_by == converge.WHOLE_PASS and finished.verdict["converged"] is True
    assert finished.continuations == [{"start_epoch": 2, "end_epoch": 4}, {"start_epoch": 4, "end_epoch": 8}]

    continuer = _ScriptedContinuer([False])
    finished = converge.run_judged(lambda: (-1.0, 1), judge, replace(config, max_epochs=6), time.perf_counter(), continuer)
    assert finished.epochs == 6 and finished.stopped_by == "epoch cap" and finished.verdict["converged"] is False
    assert finished.verdict["reasons"] == ["the row reached its epoch cap 2 epochs into the 4-epoch continuation that confirms the pass of epoch 2"]
    assert converge.config_from_args(converge.build_parser().parse_args([])).judge == "whole"
    with pytest.raises(ValueError, match="judge must be one of whole, line-search, got 'all'"):
        replace(config, judge="all")


def test_own_step_continuation_scores_the_gain_keeps_the_better_end_and_runs_the_exact_checks():
    """:class:`OwnStepContinuation` on a real posterior (200 images, 784-8-5): from the prior
    itself (blank-pixel ratio 1) to a posterior with means scattered by N(0, 1), the fixed-noise
    ELBO falls, so the continuation passes and the start is written back; the other way round it
    gains far more than the tolerance, and the row is not converged, kept at the end."""
    data = converge.load_problem(replace(converge.PROBLEMS["small"], limit_train=200, hidden=(8,)))
    experiment = data.experiment
    model, guide = experiment.new_posterior(experiment.base_prior(), 0)
    initialize_guide(guide, 784)
    verdict = converge.verdict_config(experiment)
    rates = []
    continuer = converge.OwnStepContinuation(model, guide, data.train, verdict, rates.append, (0.3, 0.1))
    prior = {name: (torch.zeros_like(loc), torch.ones_like(scale)) for name, (loc, scale) in posterior_loc_scale(guide, model).items()}
    scattered = {name: (torch.randn(loc.shape, generator=torch.Generator().manual_seed(1)), scale) for name, (loc, scale) in prior.items()}
    pass_record = {"converged": True, "reasons": [], "gain_upper_per_datum": 0.0, "epoch": 3}

    start_from_posterior(guide, prior)
    running = continuer.start(3)
    assert running["epochs"] == verdict.continuation_length(3) == 20 and running["seed"] == verdict.seed + converge.CONTINUATION_SEED_OFFSET + 3
    for done in range(20):
        continuer.before_epoch(done, running)
    assert rates == [0.3] * 10 + [0.1] * 10  # the preset's continuation_rates, in equal parts
    assert replace(continuer, rates=(0.3, 0.2, 0.1)).start(3)["epochs"] == 21  # rounded up to a multiple of the parts
    start_from_posterior(guide, scattered)
    record = continuer.finish(running, 3 + running["epochs"], pass_record)
    gain = record["continuation"]
    assert gain["nats"] < 0 and gain["kept"] == "start" and record["converged"] is True and record["reasons"] == []
    assert record["uninformed_scale_ratio"] == pytest.approx(1.0)
    assert all(torch.equal(posterior_loc_scale(guide, model)[name][0], loc) for name, (loc, _) in prior.items())  # the start written back

    start_from_posterior(guide, scattered)
    running = continuer.start(3)
    start_from_posterior(guide, prior)
    record = continuer.finish(running, 23, pass_record)
    gain = record["continuation"]
    assert gain["epochs"] == 20 and gain["per_datum"] > verdict.tol_per_datum and gain["kept"] == "end" and record["converged"] is False
    assert gain["factors"] == [0.3, 0.1]
    assert len(record["reasons"]) == 1 and "20 more epochs of the row's own step at 0.3, 0.1 x its rate still raised the fixed-noise ELBO" in record["reasons"][0]
    assert pass_record["converged"] is True and "continuation" not in pass_record  # the pass's own record is not changed


def test_rate_setter_sets_the_rate_of_every_group_a_row_steps_with():
    """``pyro-svi``'s continuation rate reaches every per-parameter optimiser Pyro's ``Adam`` made
    (``optim_objs``, filled at the first step), and a torch optimiser's groups (``bayes-torch``, ``ivon``)."""
    first, second = torch.nn.Parameter(torch.zeros(2)), torch.nn.Parameter(torch.zeros(3))
    first.grad, second.grad = torch.ones(2), torch.ones(3)
    optim = pyro.optim.Adam({"lr": 1e-3})
    optim([first, second])
    converge.rate_setter(lambda: (g for opt in optim.optim_objs.values() for g in opt.param_groups), 1e-3)(0.3)
    assert [opt.param_groups[0]["lr"] for opt in optim.optim_objs.values()] == [pytest.approx(3e-4)] * 2
    adam = torch.optim.Adam([first], lr=1e-3)
    converge.rate_setter(lambda: adam.param_groups, 1e-3)(0.1)
    assert adam.param_groups[0]["lr"] == pytest.approx(1e-4)


def test_ivon_annealer_drops_the_rate_where_the_recipes_rule_would_and_at_most_lr_drops_times():
    """``--ivon-lr-drops``: after each epoch outside a continuation the recipe's stopping rule
    (here its "means" test over windows of 2) decides on the epochs since the last drop; a plateau
    drops IVON's rate by the factor, twice at most, a rising ELBO never."""
    rule = converge.StoppingRule(max_epochs=100, min_epochs=1, window=2, lr_drops=3, lr_factor=0.1, elbo_test="means")
    settings = converge.IVONSettings(lr_drops=2, lr_factor=0.5)
    rates: list[float] = []
    epochs: list[dict] = []
    anneal = converge.ivon_annealer(rule, settings, epochs, rates.append)
    for k in range(20):
        epochs.append({"elbo": -100.0 + 0.01 * (k % 2), "median_scale": {"layers.0.weight": 0.1}})  # flat but for a jitter
        anneal()
    assert rates == [0.5, 0.25]  # four epochs a phase (two windows), then the drops are spent
    assert [e["lr_scale"] for e in epochs[:9]] == [1.0] * 4 + [0.5] * 4 + [0.25]
    assert [k + 1 for k, e in enumerate(epochs) if e.get("dropped")] == [4, 8]
    rising: list[dict] = []
    anneal = converge.ivon_annealer(rule, settings, rising, rates.append)
    for k in range(20):
        rising.append({"elbo": -100.0 + 5.0 * k + 0.01 * (k % 2), "median_scale": {"layers.0.weight": 0.1}})
        anneal()
    assert rates == [0.5, 0.25] and {e["lr_scale"] for e in rising} == {1.0}
    # a continuation sets its own rates: run_judged anneals only outside one
    calls: list[int] = []
    config = converge.ConvergeConfig(converge.PROBLEMS["small"], max_epochs=6, judge_every=100)
    converge.run_judged(lambda: (0.0, 1), lambda epoch: {"converged": False}, config, time.perf_counter(), anneal=lambda: calls.append(1))
    assert len(calls) == 6


def test_experiment_overrides_change_the_recipe_the_rows_fit_by():
    args = converge.build_parser().parse_args(["--problem", "small", "--experiment", "window=10,verdict_tol=0.003,max_epochs_b=none"])
    config = converge.config_from_args(args)
    assert config.experiment == (("window", 10), ("verdict_tol", 0.003), ("max_epochs_b", None))
    experiment = ExperimentConfig(**PRESETS["paper-v5"] | dict(config.experiment))
    recipe = converge.recipe_for(experiment, 2_000)
    assert recipe.rule.window == 10 and recipe.verdict.tol_per_datum == 0.003
    # a tuple in parentheses keeps its commas
    args = converge.build_parser().parse_args(["--problem", "small", "--experiment", "scale_lr=0.1,continuation_rates=(0.1,0.03)"])
    assert converge.config_from_args(args).experiment == (("scale_lr", 0.1), ("continuation_rates", (0.1, 0.03)))


def test_the_recipe_is_the_presets_q_a_recipe():
    experiment = ExperimentConfig(**PRESETS["paper-v5"])  # the bench's default preset (N(0, 1))
    assert converge.config_from_args(converge.build_parser().parse_args(["--problem", "small"])).preset == "paper-v5"
    assert converge.recipe_for(experiment, 27_537) == experiment.recipe_a()  # task A: the preset's recipe itself
    small = converge.recipe_for(experiment, 2_000)
    assert small.batch_size == 200 and small.rule == experiment.recipe_a().rule
    capped = converge.recipe_for(experiment, 2_000, max_epochs=3)
    assert capped.rule.max_epochs == 3 and capped.rule.min_epochs == 3
    assert converge.recipe_for(experiment, 2_000, max_epochs=5000).rule.max_epochs == experiment.recipe_a().rule.max_epochs == 3000
    # --preset paper-v2: the recipe before the continuation, whose passes the bench continued on 2026-12-04
    config = converge.config_from_args(converge.build_parser().parse_args(["--problem", "small", "--preset", "paper-v2"]))
    older = ExperimentConfig(**PRESETS[config.preset])
    assert config.preset == "paper-v2" and older.recipe_a().verdict.continuation_epochs == 0 and older.recipe_a().rule.max_epochs == 300
    assert experiment.recipe_a().verdict.continuation_epochs == 20
    with pytest.raises(ValueError, match="unknown preset .quick2.; allowed: quick, paper, paper-v5, paper-v4, paper-v3, paper-v2, paper-v1"):
        converge.ConvergeConfig(config.problem, preset="quick2")


@pytest.mark.parametrize(
    "argv, message",
    [(["--rows", "nope"], "unknown or empty rows nope; allowed: recipe, recipe-mle, recipe-avg, ivon, pyro-svi, bayes-torch, mlp"),
     (["--rows", ","], "allowed: recipe, recipe-mle, recipe-avg, ivon, pyro-svi, bayes-torch, mlp"),
     (["--problem", "task-b"], "invalid choice: 'task-b' (choose from"),
     (["--hidden", "8,x"], "expected comma-separated positive widths"),
     (["--ivon-beta2", "1.5"], "IVON's beta2 must lie in [0, 1)"),
     (["--ivon-lr-drops", "-1"], "IVON's lr drops must be an integer >= 0, got -1"),
     (["--ivon-lr-factor", "1"], "IVON's lr factor must lie in (0, 1), got 1.0"),
     (["--continue", "300"], "continuation stage '300' is not EPOCHS@LR"),
     (["--peer-rates", "0.3,0"], "expected comma-separated factors > 0, e.g. 0.3,0.1, got '0.3,0'"),
     (["--continue", "0@1e-3"], "continuation stage '0@1e-3' needs EPOCHS >= 1 and LR > 0"),
     (["--experiment", "windw=10"], "--experiment item 'windw=10' is not KEY=VALUE with KEY a field of ExperimentConfig"),
     (["--experiment", "elbo_test=bogus"], "unknown elbo-test 'bogus'; allowed:")],
)
def test_bad_values_give_one_clear_error(argv, message, capsys, tmp_path):
    with pytest.raises(SystemExit) as info:
        converge.main([*argv, "--out", str(tmp_path / "c.json")])
    assert info.value.code == 2
    err = capsys.readouterr().err
    assert message in err and err.count("error:") == 1
    assert not (tmp_path / "c.json").exists()


def test_a_row_whose_package_is_missing_is_skipped_unless_named(monkeypatch, capsys, tmp_path):
    rows = {"mlp": converge.ROWS["mlp"], "fake-peer": FAKE_ROW}
    assert converge.select_rows(None, rows) == (["mlp"], ['fake-peer: skipped, package no-such-package is not installed (pip install -e ".[bench]")'])
    with pytest.raises(ValueError, match="fake-peer needs package no-such-package"):
        converge.select_rows(["mlp", "fake-peer"], rows)
    monkeypatch.setitem(converge.ROWS, FAKE_ROW.name, FAKE_ROW)
    with pytest.raises(SystemExit) as info:
        converge.main(["--rows", "fake-peer", "--out", str(tmp_path / "c.json")])
    assert info.value.code == 2 and "no-such-package" in capsys.readouterr().err


def test_the_averaged_row_needs_a_preset_with_continuations():
    """``recipe-avg`` is the recipe with ``continuation_average``: under a preset without
    continuations (paper-v2) there is nothing to average, and the row says so before fitting."""
    data = converge.ProblemData(ExperimentConfig(**PRESETS["paper-v2"]), None, None, None)
    with pytest.raises(ValueError, match="continuation-average needs continuation-epochs >= 1"):
        converge.run_recipe_averaged(data, None, 0)


def test_the_figure_goes_beside_the_results_by_default(tmp_path, single_torch_thread):
    """Without --figure the plot is --out with .png: a run never overwrites another's figure."""
    out = tmp_path / "a.json"
    assert converge.main([*TINY, "--rounds", "1", "--rows", "mlp", "--out", str(out)]) == 0
    assert out.exists() and (tmp_path / "a.png").stat().st_size > 0


def test_a_problem_of_other_digits_loads_that_task_on_its_fraction():
    """``Problem.digits`` and ``fraction`` (the ``b-10`` problem: scratch on 10 % of B): the splits
    are task B's, labelled 0-4 by position, the training split its stratified tenth; task A's
    problems are unchanged."""
    b = converge.load_problem(converge.PROBLEMS["b-10"])
    a = converge.load_problem(replace(converge.PROBLEMS["small"], limit_train=200, hidden=(8,)))
    full_b = load_task(Task(digits=(5, 6, 7, 8, 9)))
    assert b.experiment.hidden == (400, 400) and a.experiment.hidden == (8,)
    assert len(b.train) == pytest.approx(0.1 * len(full_b.train), abs=5) and len(a.train) == 200
    assert len(b.test) == len(full_b.test) and torch.equal(b.test.y, full_b.test.y)
    assert set(b.train.y.tolist()) == {0, 1, 2, 3, 4}
    resized = converge.problem_from_args(argparse.Namespace(problem="b-10", limit_train=50, hidden=8))
    assert (resized.digits, resized.fraction, resized.limit_train, resized.hidden) == ((5, 6, 7, 8, 9), 0.1, 50, (8,))
