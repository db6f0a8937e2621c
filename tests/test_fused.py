"""The fast path (pyro_bbt.fused) computes what the plain path computes, to float rounding."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from conftest import fresh_model_and_guide, synthetic_batch
from pyro_bbt.data import Split
from pyro_bbt.fused import gaussian_kl_sum, mean_field_loc_scale, softplus, supports_fast_path
from pyro_bbt.inference import TrainConfig, train
from pyro_bbt.objectives import gaussian_kl, mean_field_posterior
from pyro_bbt.priors import GaussianPrior, PerSitePrior


def test_softplus_matches_torch_to_a_few_ulp_over_its_whole_range_and_its_gradient_is_the_sigmoid():
    # the widths live near softplus^-1(0.01) = -4.6; the tails take the exact branches
    x = torch.cat([torch.linspace(-30.0, 30.0, 20001), torch.tensor([-16.0, -15.999, 20.0, 20.001, 0.0, -88.0, 88.0])])
    ours, theirs = softplus(x), F.softplus(x)
    assert torch.all(ours > 0) and torch.isfinite(ours).all()
    torch.testing.assert_close(ours, theirs, rtol=4 * torch.finfo(torch.float32).eps, atol=0.0)
    # within [-16, 20]: the rounding correction, not log(1 + y) (which loses 1e-2 relative at x = -16)
    inside = torch.linspace(-16.0, 20.0, 5001)
    naive = torch.log(1.0 + torch.exp(inside))
    assert (softplus(inside) - F.softplus(inside)).abs().div(F.softplus(inside)).max() < 1e-6 < (naive - F.softplus(inside)).abs().div(F.softplus(inside)).max()
    leaf = x.clone().requires_grad_()
    softplus(leaf).sum().backward()
    torch.testing.assert_close(leaf.grad, torch.sigmoid(x))


@pytest.mark.parametrize("prior", ["scalar", "per-site", "scalar-nonzero"])
def test_gaussian_kl_sum_and_its_gradient_match_autograd(prior):
    generator = torch.Generator().manual_seed(0)
    loc = torch.randn(7, 5, generator=generator, dtype=torch.float64)
    scale = torch.rand(7, 5, generator=generator, dtype=torch.float64) + 0.05
    if prior == "scalar":
        p_loc, p_scale = torch.zeros((), dtype=torch.float64).expand(7, 5), torch.full((), 1.0, dtype=torch.float64).expand(7, 5)
    elif prior == "scalar-nonzero":
        p_loc, p_scale = torch.full((), 0.3, dtype=torch.float64).expand(7, 5), torch.full((), 0.5, dtype=torch.float64).expand(7, 5)
    else:
        p_loc = torch.randn(7, 5, generator=generator, dtype=torch.float64)
        p_scale = torch.rand(7, 5, generator=generator, dtype=torch.float64) + 0.1
    grads = []
    for kl_of in (lambda m, s: gaussian_kl_sum(m, s, p_loc, p_scale), lambda m, s: gaussian_kl(m, s, p_loc, p_scale).sum()):
        m, s = loc.clone().requires_grad_(), scale.clone().requires_grad_()
        value = kl_of(m, s)
        (2.5 * value).backward()
        grads.append((value.detach(), m.grad, s.grad))
    for ours, reference in zip(*grads):
        torch.testing.assert_close(ours, reference, rtol=1e-12, atol=1e-12)
    with pytest.raises(ValueError, match="holds the prior fixed"):
        gaussian_kl_sum(loc, scale, p_loc.clone().requires_grad_(), p_scale)


def test_the_posterior_read_off_the_parameters_is_the_traced_one():
    x, y = synthetic_batch(batch=4, features=6, classes=3)
    model, guide = fresh_model_and_guide((6, 5, 3), "meanfield", initialize=True, init_scale=0.05)
    assert supports_fast_path(guide)
    traced, read = mean_field_posterior(guide, x, y, 4), mean_field_loc_scale(guide)
    assert list(read) == list(traced) == list(model.site_shapes)
    for name in traced:
        torch.testing.assert_close(read[name][0], traced[name][0], rtol=0, atol=0)
        torch.testing.assert_close(read[name][1], traced[name][1], rtol=4 * torch.finfo(torch.float32).eps, atol=0)
        assert read[name][0].requires_grad and read[name][1].requires_grad


@pytest.mark.parametrize("estimator,prior", [("local", "gaussian"), ("weights", "gaussian"), ("local", "per-site")])
def test_the_fast_path_takes_the_plain_paths_steps(estimator, prior):
    x, y = synthetic_batch(batch=40, features=6, classes=3, seed=1)
    data = Split(x, y)
    fits = []
    for fast in (True, False):
        model, guide = fresh_model_and_guide((6, 5, 3), "meanfield", seed=None, init_scale=0.05)
        if prior == "per-site":  # a transferred prior: per-weight locations and widths
            generator = torch.Generator().manual_seed(3)
            shapes = model.site_shapes
            model.prior = PerSitePrior({s: torch.randn(shape, generator=generator) for s, shape in shapes.items()},
                                       {s: torch.rand(shape, generator=generator) + 0.2 for s, shape in shapes.items()}, fallback=GaussianPrior(1.0))
        config = TrainConfig(epochs=3, batch_size=8, lr=1e-2, scale_lr=3e-2, estimator=estimator, progress=False, eval_samples=0, fast=fast)
        history = train(model, guide, data, config)
        fits.append(({n: p.detach().clone() for n, p in guide.named_parameters()}, [e.elbo for e in history.epochs]))
    (fast_params, fast_elbos), (plain_params, plain_elbos) = fits
    assert fast_elbos == pytest.approx(plain_elbos, rel=1e-5)
    for name in plain_params:
        torch.testing.assert_close(fast_params[name], plain_params[name], rtol=1e-4, atol=1e-5, msg=name)


def test_train_config_checks_fast():
    with pytest.raises(ValueError, match="fast must be True or False, got 'yes'"):
        TrainConfig(fast="yes")


@pytest.mark.parametrize("prior", ["gaussian", "transferred", "active-outputs"])
def test_the_compiled_step_takes_the_fast_paths_steps(prior):
    """The local estimator's step as one function for torch.compile (pyro_bbt.fused.local_elbo_terms),
    traced by dynamo and run by its ``eager`` backend (inductor's C++ compilation of the same
    graph takes minutes on two cores; ``python benchmarks/bench.py`` runs it and reports the
    accuracy beside the default's). Head 1 of a two-head net; ``transferred``: a per-weight
    prior on the hidden layer beside the scalar fallback on the output layer; the Blundell
    weights change the KL's weight every step (a tensor input: no recompilation);
    ``active-outputs``: only the head's first two outputs in the softmax (the class scenario's
    digits seen so far)."""
    import pyro

    from pyro_bbt.guides import GuideConfig, make_guide
    from pyro_bbt.inference import initialize_guide
    from pyro_bbt.model import BayesianMLP
    from pyro_bbt.objectives import CompiledMeanFieldOps, FastMeanFieldOps, make_estimator

    x, y = synthetic_batch(batch=40, features=6, classes=3, seed=2)
    if prior == "active-outputs":
        y = y % 2
    fits = []
    for ops in (CompiledMeanFieldOps("eager"), FastMeanFieldOps()):
        pyro.clear_param_store()
        pyro.set_rng_seed(0)
        model = BayesianMLP((6, 5, 3), num_heads=2)
        model.head = 1
        if prior == "active-outputs":
            model.active_outputs = 2
        if prior == "transferred":
            generator = torch.Generator().manual_seed(3)
            hidden = {s: shape for s, shape in model.site_shapes.items() if s.startswith("layers.0")}
            model.prior = PerSitePrior({s: torch.randn(shape, generator=generator) for s, shape in hidden.items()},
                                       {s: torch.rand(shape, generator=generator) + 0.2 for s, shape in hidden.items()}, fallback=GaussianPrior(0.7))
        guide = make_guide("meanfield", model, GuideConfig(init_scale=0.05))
        initialize_guide(guide, 6)
        estimator = make_estimator("local", guide, ops=ops)
        optimizer = torch.optim.Adam(guide.parameters(), lr=1e-2)
        losses = []
        for step, weight in enumerate((0.5, 0.25, 0.125, 1.0)):
            optimizer.zero_grad()
            losses.append(estimator.loss_and_grads(model, guide, x[10 * step:10 * step + 10], y[10 * step:10 * step + 10], num_data=40,
                                                   kl_weight=weight))
            optimizer.step()
        fits.append(({n: p.detach().clone() for n, p in guide.named_parameters()}, losses, estimator.last))
    (compiled_params, compiled_losses, compiled_last), (eager_params, eager_losses, eager_last) = fits
    assert compiled_losses == pytest.approx(eager_losses, rel=1e-5)
    assert compiled_last.log_lik == pytest.approx(eager_last.log_lik, rel=1e-5)
    assert compiled_last.weighted_kl == pytest.approx(eager_last.weighted_kl, rel=1e-5)
    torch.testing.assert_close(compiled_last.logits, eager_last.logits)
    assert compiled_last.logits.shape == (10, 2 if prior == "active-outputs" else 3)
    for name in eager_params:
        torch.testing.assert_close(compiled_params[name], eager_params[name], rtol=1e-4, atol=1e-5, msg=name)


def test_train_config_checks_compile():
    with pytest.raises(ValueError, match="compile must be True or False, got 1"):
        TrainConfig(compile=1)


def test_mean_field_ops_is_the_one_seam_for_fast_and_compile():
    """TrainConfig's fast and compile become one object (objectives.mean_field_ops) that the
    estimators hold; nothing else carries the flags."""
    from pyro_bbt.objectives import (CompiledMeanFieldOps, FastMeanFieldOps, LocalReparameterizationELBO, MeanFieldOps, WeightSamplingELBO,
                                     make_estimator, mean_field_ops)

    plain, fast, compiled, eager = (mean_field_ops(fast=False, compile=True), mean_field_ops(), mean_field_ops(compile=True),
                                    mean_field_ops(compile="eager"))
    assert type(plain) is MeanFieldOps and type(fast) is FastMeanFieldOps and type(compiled) is CompiledMeanFieldOps
    assert compiled.backend == "inductor" and eager.backend == "eager" and repr(eager) == "CompiledMeanFieldOps('eager')"
    assert plain.adam_kernel == {"foreach": True} and fast.adam_kernel == compiled.adam_kernel == {"fused": True}
    _, guide = fresh_model_and_guide((6, 5, 3), "meanfield")
    assert type(make_estimator("local", guide).ops) is MeanFieldOps  # the plain path unless asked
    for name, kind in (("local", LocalReparameterizationELBO), ("weights", WeightSamplingELBO)):
        estimator = make_estimator(name, guide, 2, ops=fast)
        assert isinstance(estimator, kind) and estimator.ops is fast and estimator.num_particles == 2
    with pytest.raises(ValueError, match="ops must be a MeanFieldOps"):
        make_estimator("local", guide, ops=True)
    with pytest.raises(ValueError, match="backend must name"):
        CompiledMeanFieldOps("")


@pytest.mark.parametrize("fields,expected", [({}, "FastMeanFieldOps()"), ({"fast": False}, "MeanFieldOps()"),
                                             ({"validate": True}, "MeanFieldOps()"), ({"fast": False, "compile": True}, "MeanFieldOps()"),
                                             ({"compile": True}, "CompiledMeanFieldOps('inductor')")])
def test_train_turns_fast_and_compile_into_the_seam(monkeypatch, fields, expected):
    """``validate=True`` implies the plain path; ``compile`` is a form of the fast path; the
    optimiser's kernel comes from the same object."""
    import pyro_bbt.inference as inference

    seen = {}

    def recording_make_estimator(name, guide, num_particles=1, ops=None):
        seen["ops"] = repr(ops)
        runnable = FastMeanFieldOps() if isinstance(ops, CompiledMeanFieldOps) else ops  # inductor's build takes minutes
        return make_estimator(name, guide, num_particles, ops=runnable)

    def recording_adam(groups, **kwargs):
        seen["kernel"] = {k: kwargs[k] for k in ("fused", "foreach") if k in kwargs}
        return real_adam(groups, **kwargs)

    from pyro_bbt.objectives import CompiledMeanFieldOps, FastMeanFieldOps, make_estimator
    real_adam = torch.optim.Adam
    monkeypatch.setattr(inference, "make_estimator", recording_make_estimator)
    monkeypatch.setattr(inference.torch.optim, "Adam", recording_adam)
    x, y = synthetic_batch(batch=8, features=6, classes=3)
    model, guide = fresh_model_and_guide((6, 5, 3), "meanfield")
    train(model, guide, Split(x, y), TrainConfig(steps=1, batch_size=8, progress=False, eval_samples=0, verdict=None, **fields))
    assert seen["ops"] == expected
    assert seen["kernel"] == ({"foreach": True} if expected == "MeanFieldOps()" else {"fused": True})


def test_the_fast_ops_fall_back_to_the_plain_computation():
    """A guide not yet set up is traced (which sets it up); a prior being learned gets its
    gradient through autograd's KL (gaussian_kl_sum holds the prior fixed)."""
    from pyro_bbt.objectives import FastMeanFieldOps, MeanFieldOps

    x, y = synthetic_batch(batch=4, features=6, classes=3)
    model, guide = fresh_model_and_guide((6, 5, 3), "meanfield", init_scale=0.05)
    assert guide.prototype_trace is None
    posterior = FastMeanFieldOps().posterior(guide, x, y, 4)
    assert guide.prototype_trace is not None and list(posterior) == list(model.site_shapes)
    prior_scale = torch.tensor(0.7, requires_grad=True)
    grads = []
    for ops in (FastMeanFieldOps(), MeanFieldOps()):
        kl = sum(ops.gaussian_site_kl(loc.detach(), scale.detach(), torch.zeros(()), prior_scale) for loc, scale in posterior.values())
        grads.append(torch.autograd.grad(kl, prior_scale)[0])
    assert torch.equal(grads[0], grads[1])


def test_the_compiled_step_and_the_eager_path_share_their_arithmetic():
    """The softplus traced by torch.compile equals the eager one to the last bit, and the
    compiled step's function (run uncompiled here) gives the eager forward's logits to the last
    bit for the same noise, and its KL to float rounding (the eager path's KL has its backward
    written out)."""
    import pyro_bbt.fused as fused
    from pyro_bbt.objectives import FastMeanFieldOps

    values = torch.cat([torch.linspace(-30.0, 30.0, 20001), torch.tensor([-16.0, -15.999, 20.0, 20.001, 0.0, -88.0, 88.0])])
    assert torch.equal(fused._softplus_branch_free(values), softplus(values))
    inside = torch.linspace(-16.0, 20.0, 5001)
    assert torch.equal(fused._softplus_branch_free(inside), softplus(inside))

    x, y = synthetic_batch(batch=10, features=6, classes=3, seed=4)
    model, guide = fresh_model_and_guide((6, 5, 4, 3), "meanfield", initialize=True, init_scale=0.05)
    params = fused.mean_field_loc_rho(guide)
    locs, rhos = [loc for loc, _ in params.values()], [rho for _, rho in params.values()]
    prior_locs, prior_scales = [torch.zeros(()) for _ in locs], [torch.ones(()) for _ in locs]
    torch.manual_seed(11)
    eps = [torch.randn(x.shape[0], layer.out_features) for layer in model.layers]
    _, _, weighted_kl, logits = fused.local_elbo_terms(locs, rhos, prior_locs, prior_scales, x, y, eps, None, x.new_tensor(1.0), x.new_tensor(1.0))
    posterior = FastMeanFieldOps().posterior(guide, x, y, 10)
    torch.manual_seed(11)
    assert torch.equal(logits, model.local_reparameterized_logits(x, posterior))
    torch.testing.assert_close(weighted_kl, FastMeanFieldOps().kl(model, posterior), rtol=1e-6, atol=0)


def test_the_compile_flag_reaches_every_bayesian_fit_of_a_run():
    """``--compile`` (``ExperimentConfig.compile``) sets ``TrainConfig.compile`` for q_A's recipe,
    B's fixed budget and B's converged recipe alike, and so the compiled seam; off by default and
    then absent from the record (a stored run still resumes); a value that is not a bool is refused
    in one line."""
    from pyro_bbt.config import ExperimentConfig
    from pyro_bbt.objectives import CompiledMeanFieldOps, FastMeanFieldOps, mean_field_ops
    from pyro_bbt.transfer import build_parser, config_from_args

    on = config_from_args(build_parser().parse_args(["--compile", "--fit-b", "rule"]))
    off = config_from_args(build_parser().parse_args(["--fit-b", "rule"]))
    for config, kind in ((on, CompiledMeanFieldOps), (off, FastMeanFieldOps)):
        for recipe in (config.recipe_a(), config.recipe_b(50), config.recipe_b_converged(300)):
            train_config = recipe.train_config(seed=0)
            assert type(mean_field_ops(fast=train_config.fast, compile=train_config.compile)) is kind
    assert on.to_dict()["compile"] is True and "compile" not in off.to_dict()
    assert ExperimentConfig(**on.to_dict()) == on
    with pytest.raises(ValueError, match="compile must be true or false, got 'yes'"):
        ExperimentConfig(compile="yes")


def test_the_epoch_cost_bench_refuses_bad_arguments_in_one_line(capsys):
    from conftest import load_benchmark

    bench = load_benchmark("epoch_cost")
    assert bench.parse_args(["--rows", "b-0.01,a"]).rows == ("b-0.01", "a")
    for argv, message in ((["--rows", "b-0.5"], "--rows 'b-0.5': unknown b-0.5; allowed: b-0.01, b-0.1, a, a-512, a-8192, a-full"),
                          (["--epochs", "0"], "--epochs must be at least 1"), (["--rounds", "0"], "--rounds must be at least 1"),
                          (["--a-images", "0"], "--a-images must be at least 1")):
        with pytest.raises(SystemExit) as exit_info:
            bench.parse_args(argv)
        assert exit_info.value.code == 2 and message in capsys.readouterr().err


def test_the_compiled_step_keeps_a_graph_for_every_minibatch_shape_a_grid_meets():
    """A worker running a grid's units meets more minibatch shapes than torch's default of 8
    graphs per function (past it, dynamo runs the function eagerly without a word): twelve
    shapes, under the ``eager`` backend, each get a graph of their own."""
    from torch._dynamo.utils import counters

    from pyro_bbt.fused import RECOMPILE_LIMIT, compiled_local_elbo_terms

    step = compiled_local_elbo_terms("eager")
    assert torch._dynamo.config.recompile_limit >= RECOMPILE_LIMIT > 12
    generator = torch.Generator().manual_seed(0)
    locs = [torch.randn(5, 6, generator=generator), torch.zeros(5), torch.randn(3, 5, generator=generator), torch.zeros(3)]
    rhos = [torch.full_like(t, -3.0) for t in locs]
    before = counters["stats"]["unique_graphs"]
    for batch in range(101, 113):  # sizes no other test compiles
        x, y = torch.rand(batch, 6, generator=generator), torch.randint(0, 3, (batch,), generator=generator)
        eps = [torch.randn(batch, 5, generator=generator), torch.randn(batch, 3, generator=generator)]
        loss, *_ = step(locs, rhos, [torch.tensor(0.0)] * 4, [torch.tensor(1.0)] * 4, x, y, eps, None, torch.tensor(1.0), torch.tensor(1.0))
        assert torch.isfinite(loss)
    assert counters["stats"]["unique_graphs"] - before == 12
