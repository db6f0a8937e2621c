"""Tests for pyro_bbt.guides: every guide learns, and posterior_loc_scale reports its posterior."""

import math

import pyro
import pyro.distributions as dist
import pytest
import torch
from pyro.infer import Trace_ELBO

from conftest import fresh_model_and_guide, synthetic_batch
from pyro_bbt.evaluation import evaluate, sample_posterior
from pyro_bbt.guides import (
    GUIDES,
    AutoMeanFieldNormal,
    GuideConfig,
    has_closed_form_kl,
    make_guide,
    posterior_loc_scale,
    start_from_posterior,
)
from pyro_bbt.inference import TrainConfig, train
from pyro_bbt.model import BayesianMLP
from pyro_bbt.priors import GaussianPrior, ScaleMixturePrior

pytestmark = pytest.mark.usefixtures("single_torch_thread")

TRAIN_STEPS = {"planar": 120, "iaf": 120}  # the flows are slower per step; 150 for the others


@pytest.mark.parametrize("name", GUIDES)
def test_guide_learns_mnist_and_reports_its_posterior(name, mnist3):
    train_split, test_split = mnist3
    pyro.clear_param_store()
    pyro.set_rng_seed(0)
    prior = GaussianPrior(0.5, layer_scales={"layers.1": 0.2})
    model = BayesianMLP((784, 32, 3), prior)
    guide = make_guide(name, model, GuideConfig(num_flows=2, rank=4))
    config = TrainConfig(
        steps=TRAIN_STEPS.get(name, 150), batch_size=64, lr=1e-2, progress=False, eval_samples=0, estimator="weights"
    )
    history = train(model, guide, train_split, config)
    assert history.epochs[-1].steps == config.steps
    assert history.epochs[-1].train_accuracy > 0.6

    metrics = evaluate(model, guide, test_split.x, test_split.y, num_samples=20)
    assert metrics.accuracy > 0.6, f"{name}: test accuracy {metrics.accuracy:.3f} is near chance (1/3)"
    assert math.isfinite(metrics.nll) and metrics.nll < math.log(3)

    post = posterior_loc_scale(guide, model)
    assert list(post) == list(model.site_shapes)
    for site, shape in model.site_shapes.items():
        loc, scale = post[site]
        assert loc.shape == shape and scale.shape == shape, site
        assert torch.isfinite(loc).all() and torch.isfinite(scale).all(), site
        assert (scale > 0).all(), site
        assert not loc.requires_grad and not scale.requires_grad

    store = pyro.get_param_store()
    if name in ("meanfield", "normal"):
        prefix = "AutoMeanFieldNormal" if name == "meanfield" else "AutoNormal"
        for site in model.site_shapes:
            assert torch.equal(post[site][0], store[f"{prefix}.locs.{site}"].detach())
            assert torch.equal(post[site][1], store[f"{prefix}.scales.{site}"].detach())
    if name == "meanfield":
        for site in model.site_shapes:
            loc, scale = guide.get_loc_scale(site)
            assert torch.equal(post[site][0], loc.detach()) and torch.equal(post[site][1], scale.detach())
    if name == "delta":
        for site in model.site_shapes:
            assert torch.equal(post[site][0], store[f"AutoDelta.{site}"].detach())
            expected = 0.2 if site.startswith("layers.1.") else 0.5
            assert torch.allclose(post[site][1], torch.full(model.site_shapes[site], expected))
    if name == "lowrank":
        posterior = guide.get_posterior()
        marginal_std = posterior.variance.sqrt().detach()
        packed_loc = torch.cat([post[s][0].reshape(-1) for s in model.site_shapes])
        packed_scale = torch.cat([post[s][1].reshape(-1) for s in model.site_shapes])
        torch.testing.assert_close(packed_loc, posterior.loc.detach())
        torch.testing.assert_close(packed_scale, marginal_std)
    if name in ("planar", "iaf"):
        # Moment matching from 256 draws agrees with the mean of 2000 fresh draws.
        draws = sample_posterior(model, guide, 2000, test_split.x[:1])
        sites = model.output_sites if name == "iaf" else tuple(model.site_shapes)
        for site in sites:
            mean = draws[site].squeeze(1).mean(0)
            loc, scale = post[site]
            bound = 6 * scale * math.sqrt(1 / 256 + 1 / 2000) + 1e-6
            assert ((loc - mean).abs() <= bound).all(), site


def test_unknown_guide_name_lists_the_allowed_names():
    model = BayesianMLP((4, 2))
    with pytest.raises(ValueError) as info:
        make_guide("gaussian", model)
    message = str(info.value)
    assert "'gaussian'" in message
    for name in GUIDES:
        assert name in message


@pytest.mark.parametrize(
    "kwargs, field",
    [
        ({"init_scale": 0.0}, "init_scale"),
        ({"init_scale": -0.1}, "init_scale"),
        ({"init_scale": float("nan")}, "init_scale"),
        ({"rank": 0}, "rank"),
        ({"num_flows": 1.5}, "num_flows"),
        ({"iaf_hidden_factor": 0}, "iaf_hidden_factor"),
        ({"moment_samples": 0}, "moment_samples"),
    ],
)
def test_guide_config_validation(kwargs, field):
    with pytest.raises(ValueError, match=field):
        GuideConfig(**kwargs)


def test_posterior_loc_scale_needs_a_run_guide():
    pyro.clear_param_store()
    model = BayesianMLP((4, 3, 2))
    guide = make_guide("meanfield", model)
    with pytest.raises(ValueError, match="not been run"):
        posterior_loc_scale(guide, model)


def test_meanfield_initialisation_is_fan_in_uniform_with_init_scale():
    model, guide = fresh_model_and_guide((50, 20, 3), init_scale=0.03, initialize=True)
    post = posterior_loc_scale(guide, model)
    for site, (loc, scale) in post.items():
        assert torch.allclose(scale, torch.full_like(scale, 0.03))
        if site.endswith("bias"):
            assert torch.all(loc == 0)
        else:
            bound = 1 / math.sqrt(loc.shape[-1])
            assert loc.abs().max() <= bound
            assert loc.abs().max() > 0.5 * bound  # spread over the interval, not collapsed
    assert has_closed_form_kl(guide)
    assert isinstance(guide, AutoMeanFieldNormal)
    for name in GUIDES:
        if name != "meanfield":
            assert not has_closed_form_kl(make_guide(name, model))


def test_meanfield_rejects_constrained_sites():
    def model():
        pyro.sample("rate", dist.LogNormal(0.0, 1.0))

    pyro.clear_param_store()
    guide = AutoMeanFieldNormal(model)
    with pytest.raises(ValueError, match="rate"):
        guide()


@pytest.mark.parametrize("name", GUIDES)
def test_every_guide_works_with_the_scale_mixture_prior(name):
    # Regression: torch reports a MixtureSameFamily's support as MixtureSameFamilyConstraint, which
    # has no bijection, so every autoguide used to fail to set up on this prior.
    model, guide = fresh_model_and_guide((5, 4, 2), name, prior=ScaleMixturePrior(0.5, 1.0, math.exp(-6)), num_flows=2)
    x, y = synthetic_batch(batch=6, features=5, classes=2)
    loss = Trace_ELBO().differentiable_loss(model, guide, x, y, 60)
    assert torch.isfinite(loss)
    post = posterior_loc_scale(guide, model)
    assert set(post) == set(model.site_shapes)


def test_fast_estimators_reach_the_accuracy_band_of_pyro_trace_elbo(mnist3):
    """The same guide, data, steps and seed, trained with each fast estimator and with Pyro's own
    ``Trace_ELBO`` (KL weighted 1/M by ``KLScale``): every run lands in the same accuracy band."""
    from pyro.infer import SVI

    from pyro_bbt.objectives import KLScale

    train_split, test_split = mnist3
    steps, batch_size, lr = 150, 64, 1e-2
    num_batches = math.ceil(len(train_split) / batch_size)

    accuracy = {}
    for estimator, particles in (("local", 1), ("weights", 1), ("weights", 4)):
        model, guide = fresh_model_and_guide((784, 32, 3))
        config = TrainConfig(steps=steps, batch_size=batch_size, lr=lr, num_particles=particles, estimator=estimator,
                             kl_schedule="uniform", progress=False, eval_samples=0)
        train(model, guide, train_split, config)
        accuracy[f"{estimator}-{particles}"] = evaluate(model, guide, test_split.x, test_split.y, num_samples=20).accuracy

    model, guide = fresh_model_and_guide((784, 32, 3), initialize=True)
    svi = SVI(model, guide, pyro.optim.Adam({"lr": lr}), Trace_ELBO())
    order = torch.Generator().manual_seed(0)
    done = 0
    while done < steps:
        for x, y in train_split.batches(batch_size, shuffle=True, generator=order):
            if done == steps:
                break
            with KLScale(1.0 / num_batches):
                svi.step(x, y, len(train_split))
            done += 1
    accuracy["pyro-trace-elbo"] = evaluate(model, guide, test_split.x, test_split.y, num_samples=20).accuracy

    assert min(accuracy.values()) > 0.85, accuracy
    assert max(accuracy.values()) - min(accuracy.values()) < 0.06, accuracy


@pytest.mark.parametrize("name", ["normal", "meanfield", "lowrank", "planar", "iaf"])
def test_start_from_posterior_sets_locations_and_widths(name):
    """A fitted mean-field posterior becomes the start of another guide: exactly for the Gaussian
    guides (lowrank with F = 0) and the flows' base Normal; every IAF starts as the identity, so the iaf guide's
    samples have exactly the posterior's moments (up to Monte Carlo error); a planar flow only
    adds its small random start."""
    sizes = (6, 5, 3)
    model, source = fresh_model_and_guide(sizes, "meanfield", initialize=True)
    generator = torch.Generator().manual_seed(1)
    posterior = {site: (loc + torch.randn(loc.shape, generator=generator), scale * (1 + torch.rand(scale.shape, generator=generator)))
                 for site, (loc, scale) in posterior_loc_scale(source, model).items()}
    _, guide = fresh_model_and_guide(sizes, name, initialize=True, num_flows=2)
    assert start_from_posterior(guide, posterior) is guide
    parts = list(guide) if name == "iaf" else [guide]
    for part in parts:
        if hasattr(part, "scale"):  # lowrank's diagonal, the flows' base Normal: the posterior, packed in the guide's site order
            sites = [site for site, _ in part.prototype_trace.iter_stochastic_nodes()]
            assert torch.equal(part.loc.detach(), torch.cat([posterior[site][0].reshape(-1) for site in sites]))
            assert torch.allclose(part.scale.detach(), torch.cat([posterior[site][1].reshape(-1) for site in sites]), rtol=1e-5)
    moments = posterior_loc_scale(guide, model, num_samples=40000)
    for site, (loc, scale) in posterior.items():
        if name == "planar":  # 2 planar flows in 38 dimensions move a draw by about |u| <= 2 / sqrt(38) per coordinate
            assert (moments[site][0] - loc).abs().max() < 0.7
        else:
            tolerance = 0.0 if name in ("normal", "meanfield", "lowrank") else 5 * float(scale.max()) / math.sqrt(40000)
            assert (moments[site][0] - loc).abs().max() <= tolerance + 1e-6, site
            assert torch.allclose(moments[site][1], scale, rtol=0.03 if name == "iaf" else 1e-5), site
    if name == "lowrank":  # F = 0: no correlation left
        assert not guide.cov_factor.detach().any()
    # a site missing from the posterior is named
    with pytest.raises(ValueError, match="site 'layers.1.bias' of the guide is not in the posterior"):
        start_from_posterior(fresh_model_and_guide(sizes, name, initialize=True, num_flows=2)[1],
                             {k: v for k, v in posterior.items() if k != "layers.1.bias"})
