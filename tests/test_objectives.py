"""Tests for pyro_bbt.objectives (KL-weighted ELBO estimators) and the training loop in pyro_bbt.inference."""

import math

import pyro
import pyro.distributions as dist
import pytest
import torch
from pyro import poutine
from pyro.infer import Trace_ELBO
from torch.distributions import kl_divergence

from conftest import fresh_model_and_guide, synthetic_batch
from pyro_bbt.data import Split
from pyro_bbt.guides import GUIDES, GuideConfig, make_guide
from pyro_bbt.inference import TrainConfig, TrainHistory, train
from pyro_bbt.model import BayesianMLP
from pyro_bbt.objectives import (
    KLScale,
    LocalReparameterizationELBO,
    WeightSamplingELBO,
    make_estimator,
)
from pyro_bbt.priors import GaussianPrior, PerSitePrior, ScaleMixturePrior

pytestmark = pytest.mark.usefixtures("single_torch_thread")

NUM_DATA = 50


def _fixed_guide(name, model, x, y, **config):
    """A guide with its parameters created (and from then on fixed)."""
    guide = make_guide(name, model, GuideConfig(num_flows=2, **config))
    with poutine.block():
        guide(x, y, NUM_DATA)
    return guide


def _hand_terms(model, guide, x, y, seed):
    """From one guide trace drawn under ``seed``: ``(log_lik, KL_mc)`` with
    ``log_lik = (N/B) sum_n log p(y_n | x_n, w)`` and ``KL_mc = sum log q(w) - sum log p(w)``
    over every guide sample site (auxiliary ones included) and every weight site of the model."""
    pyro.set_rng_seed(seed)
    guide_trace = poutine.trace(guide).get_trace(x, y, NUM_DATA)
    model_trace = poutine.trace(poutine.replay(model, trace=guide_trace)).get_trace(x, y, NUM_DATA)
    obs = model_trace.nodes["obs"]
    log_lik = (obs["fn"].log_prob(y) * (NUM_DATA / x.shape[0])).sum()
    log_q = sum(
        site["fn"].log_prob(site["value"]).sum()
        for site in guide_trace.nodes.values()
        if site["type"] == "sample"
    )
    log_p = sum(model_trace.nodes[name]["fn"].log_prob(model_trace.nodes[name]["value"]).sum() for name in model.site_shapes)
    latent = {n for n, s in model_trace.nodes.items() if s["type"] == "sample" and not s["is_observed"] and n != "data"}
    assert latent == set(model.site_shapes)
    return log_lik.detach(), (log_q - log_p).detach()


# ----------------------------------------------------------------------------- the KL weight scales the whole KL


@pytest.mark.parametrize("guide_name", GUIDES)
def test_kl_weight_multiplies_the_whole_monte_carlo_kl(guide_name):
    pyro.clear_param_store()
    pyro.set_rng_seed(0)
    model = BayesianMLP((3, 2), GaussianPrior(0.7))
    x, y = synthetic_batch(batch=4, features=3, classes=2)
    guide = _fixed_guide(guide_name, model, x, y, init_scale=0.3)
    log_lik, kl_mc = _hand_terms(model, guide, x, y, seed=11)
    assert kl_mc != 0

    estimator = WeightSamplingELBO(1, closed_form_kl=False)
    pyro.set_rng_seed(11)
    loss = estimator(model, guide, x, y, NUM_DATA, 0.3)
    expected = -(log_lik - 0.3 * kl_mc)
    torch.testing.assert_close(loss.detach(), expected, rtol=1e-5, atol=1e-4)
    assert estimator.last.log_lik == pytest.approx(float(log_lik), rel=1e-5)
    assert estimator.last.weighted_kl == pytest.approx(0.3 * float(kl_mc), rel=1e-4, abs=1e-4)

    # The same weighting with Pyro's own ELBO under the KLScale handler.
    pyro.set_rng_seed(11)
    with KLScale(0.3):
        pyro_loss = Trace_ELBO().differentiable_loss(model, guide, x, y, NUM_DATA)
    torch.testing.assert_close(pyro_loss.detach(), expected, rtol=1e-5, atol=1e-4)


def test_kl_weight_scales_the_entropy_of_autonormal_auxiliary_sites():
    # AutoNormal samples an auxiliary "_unconstrained" site and puts a Delta at the weight site:
    # its entropy lives on the auxiliary site and must be weighted like the prior term.
    pyro.clear_param_store()
    pyro.set_rng_seed(1)
    model = BayesianMLP((3, 2))
    x, y = synthetic_batch(batch=4, features=3, classes=2, seed=1)
    guide = _fixed_guide("normal", model, x, y, init_scale=0.2)
    log_lik, kl_mc = _hand_terms(model, guide, x, y, seed=5)

    def loss(weight):
        pyro.set_rng_seed(5)
        return WeightSamplingELBO(1, closed_form_kl=False)(model, guide, x, y, NUM_DATA, weight).detach()

    base = loss(0.0)
    assert torch.equal(base, -log_lik)
    slopes = [(loss(w) - base) / w for w in (0.25, 0.5, 1.0)]
    for slope in slopes:
        torch.testing.assert_close(slope, kl_mc, rtol=1e-4, atol=1e-3)
    # With entropy unscaled the slope would be -sum log p(w) instead: make sure it is not.
    pyro.set_rng_seed(5)
    gt = poutine.trace(guide).get_trace(x, y, NUM_DATA)
    entropy_term = sum(s["fn"].log_prob(s["value"]).sum() for n, s in gt.nodes.items() if n.endswith("_unconstrained"))
    entropy_term = entropy_term.detach()
    assert abs(float(entropy_term)) > 1.0
    assert not torch.allclose(slopes[0], kl_mc - entropy_term, rtol=1e-3)


@pytest.mark.parametrize("num_particles", [1, 3])
def test_closed_form_kl_of_meanfield_is_weighted_gaussian_kl(num_particles):
    pyro.clear_param_store()
    pyro.set_rng_seed(2)
    sigma = 0.5
    model = BayesianMLP((3, 4, 2), GaussianPrior(sigma))
    x, y = synthetic_batch(batch=5, features=3, classes=2, seed=2)
    guide = _fixed_guide("meanfield", model, x, y, init_scale=0.3)
    store = pyro.get_param_store()
    kl = 0.0
    for name in model.site_shapes:
        loc = store[f"AutoMeanFieldNormal.locs.{name}"].detach()
        scale = store[f"AutoMeanFieldNormal.scales.{name}"].detach()
        kl = kl + kl_divergence(torch.distributions.Normal(loc, scale), torch.distributions.Normal(0.0, sigma)).sum()

    estimator = WeightSamplingELBO(num_particles, closed_form_kl=True)
    pyro.set_rng_seed(3)
    loss = estimator(model, guide, x, y, NUM_DATA, 0.3)
    assert estimator.last.weighted_kl == pytest.approx(0.3 * float(kl), rel=1e-5)
    assert float(loss.detach()) == pytest.approx(estimator.last.weighted_kl - estimator.last.log_lik, rel=1e-6)
    assert estimator.last.logits.shape == ((5, 2) if num_particles == 1 else (num_particles, 5, 2))
    lik = dist.Categorical(logits=estimator.last.logits).log_prob(y).sum() * (NUM_DATA / 5) / num_particles
    assert estimator.last.log_lik == pytest.approx(float(lik), rel=1e-5)

    # The local-reparameterisation estimator uses the same closed-form KL.
    local = LocalReparameterizationELBO(num_particles)
    local(model, guide, x, y, NUM_DATA, 0.3)
    assert local.last.weighted_kl == pytest.approx(0.3 * float(kl), rel=1e-5)
    local(model, guide, x, y, NUM_DATA, 0.0)
    assert local.last.weighted_kl == 0.0


def test_closed_form_kl_against_a_per_site_prior():
    pyro.clear_param_store()
    pyro.set_rng_seed(4)
    model = BayesianMLP((3, 4, 2))
    g = torch.Generator().manual_seed(4)
    locs = {n: torch.randn(s, generator=g) for n, s in model.site_shapes.items()}
    scales = {n: torch.rand(s, generator=g) + 0.1 for n, s in model.site_shapes.items()}
    model.set_prior(PerSitePrior(locs, scales))
    x, y = synthetic_batch(batch=5, features=3, classes=2, seed=4)
    guide = _fixed_guide("meanfield", model, x, y, init_scale=0.2)
    kl = sum(
        kl_divergence(torch.distributions.Normal(*guide.get_loc_scale(n)), torch.distributions.Normal(locs[n], scales[n])).sum()
        for n in model.site_shapes
    ).item()
    for estimator in (WeightSamplingELBO(1, closed_form_kl=True), LocalReparameterizationELBO(1)):
        estimator(model, guide, x, y, NUM_DATA, 0.7)
        assert estimator.last.weighted_kl == pytest.approx(0.7 * kl, rel=1e-5)


def test_scale_mixture_prior_falls_back_to_monte_carlo_kl():
    # No closed form exists against the scale mixture: every estimator must then estimate the
    # same KL(q || p) by Monte Carlo. The trace path is checked by hand; the others in expectation.
    pyro.clear_param_store()
    pyro.set_rng_seed(5)
    model = BayesianMLP((3, 2), ScaleMixturePrior(0.5, 1.0, math.exp(-2)))
    x, y = synthetic_batch(batch=4, features=3, classes=2, seed=5)
    guide = _fixed_guide("meanfield", model, x, y, init_scale=0.2)
    pyro.set_rng_seed(6)
    mc = WeightSamplingELBO(1, closed_form_kl=False)(model, guide, x, y, NUM_DATA, 0.4)
    log_lik, kl_mc = _hand_terms(model, guide, x, y, seed=6)
    torch.testing.assert_close(mc.detach(), -(log_lik - 0.4 * kl_mc), rtol=1e-5, atol=1e-4)

    # Reference: 4000 vectorised draws of 0.4 * (log q(w) - log p(w)), w ~ q.
    pyro.set_rng_seed(7)
    with torch.no_grad(), pyro.plate("particles", 4000, dim=-2):
        guide_trace = poutine.trace(guide).get_trace(x, y, NUM_DATA)
        model_trace = poutine.trace(poutine.replay(model, trace=guide_trace)).get_trace(x, y, NUM_DATA)
        reference = 0.4 * sum(
            guide_trace.nodes[n]["fn"].log_prob(guide_trace.nodes[n]["value"])
            - model_trace.nodes[n]["fn"].log_prob(model_trace.nodes[n]["value"])
            for n in model.site_shapes
        ).reshape(-1).double()
    assert reference.shape == (4000,) and reference.std() > 0

    draws = 200
    estimates = {}
    estimators = {"closed_form_path": WeightSamplingELBO(1, closed_form_kl=True), "local": LocalReparameterizationELBO(1)}
    with torch.no_grad():
        for key, estimator in estimators.items():
            values = []
            for _ in range(draws):
                estimator(model, guide, x, y, NUM_DATA, 0.4)
                values.append(estimator.last.weighted_kl)
            estimates[key] = torch.tensor(values, dtype=torch.float64)
    for key, values in estimates.items():
        assert values.std() > 0, f"{key}: the KL against a mixture prior cannot be deterministic"
        std_err = math.sqrt(float(reference.var() / 4000 + values.var() / draws))
        assert abs(float(values.mean() - reference.mean())) < 4 * std_err, key


def test_kl_scale_leaves_observations_alone():
    pyro.set_rng_seed(7)
    model = BayesianMLP((3, 2))
    x, y = synthetic_batch(batch=4, features=3, classes=2)
    with KLScale(0.25):
        trace = poutine.trace(model).get_trace(x, y, 40)
    assert trace.nodes["obs"]["scale"] == pytest.approx(10.0)
    for name in model.site_shapes:
        assert trace.nodes[name]["scale"] == pytest.approx(0.25)


@pytest.mark.parametrize("bad", [-0.1, float("nan"), float("inf")])
def test_kl_scale_rejects_bad_weights(bad):
    with pytest.raises(ValueError, match="KL weight"):
        KLScale(bad)


# ----------------------------------------------------------------------------- estimators


@pytest.mark.parametrize("guide_name", ["meanfield", "normal", "lowrank"])
@pytest.mark.parametrize("num_particles", [1, 4])
def test_weight_sampling_elbo_is_trace_elbo(guide_name, num_particles):
    pyro.clear_param_store()
    pyro.set_rng_seed(8)
    model = BayesianMLP((6, 5, 3))
    x, y = synthetic_batch(batch=7, features=6, classes=3, seed=8)
    guide = _fixed_guide(guide_name, model, x, y, init_scale=0.1)
    params = [p for p in guide.parameters()]

    pyro.set_rng_seed(9)
    ours = WeightSamplingELBO(num_particles, closed_form_kl=False)(model, guide, x, y, NUM_DATA)
    ours.backward()
    ours_grads = [p.grad.clone() for p in params]
    for p in params:
        p.grad = None

    pyro.set_rng_seed(9)
    if num_particles == 1:
        elbo = Trace_ELBO()
    else:
        elbo = Trace_ELBO(num_particles=num_particles, vectorize_particles=True, max_plate_nesting=1)
    theirs = elbo.differentiable_loss(model, guide, x, y, NUM_DATA)
    theirs.backward()
    torch.testing.assert_close(ours, theirs, rtol=1e-5, atol=1e-3)
    for mine, p in zip(ours_grads, params):
        torch.testing.assert_close(mine, p.grad, rtol=1e-4, atol=1e-3)


def test_local_reparameterization_agrees_in_expectation_with_weight_sampling():
    pyro.clear_param_store()
    pyro.set_rng_seed(10)
    model = BayesianMLP((4, 6, 3))
    x, y = synthetic_batch(batch=6, features=4, classes=3, seed=10)
    guide = _fixed_guide("meanfield", model, x, y, init_scale=0.4)
    draws = 2000
    scale = NUM_DATA / x.shape[0]

    per_draw = {}
    estimators = {
        "trace": WeightSamplingELBO(draws, closed_form_kl=False),  # exactly Trace_ELBO (tested above)
        "weights": WeightSamplingELBO(draws, closed_form_kl=True),
        "local": LocalReparameterizationELBO(draws),
    }
    for key, estimator in estimators.items():
        with torch.no_grad():
            loss = estimator(model, guide, x, y, NUM_DATA, 1.0)
        logits = estimator.last.logits
        assert logits.shape == (draws, 6, 3)
        lik = dist.Categorical(logits=logits).log_prob(y).sum(-1) * scale  # (draws,)
        # The estimator's value is the average over its draws.
        assert estimator.last.log_lik == pytest.approx(float(lik.mean()), rel=1e-4)
        assert float(loss) == pytest.approx(estimator.last.weighted_kl - estimator.last.log_lik, rel=1e-5)
        per_draw[key] = lik.double()
    # Same closed-form KL for both Gaussian-KL estimators.
    assert estimators["weights"].last.weighted_kl == pytest.approx(estimators["local"].last.weighted_kl, rel=1e-5)
    reference = per_draw.pop("trace")
    for key, lik in per_draw.items():
        std_err = math.sqrt(float(reference.var() / draws + lik.var() / draws))
        assert std_err > 0
        assert abs(float(lik.mean() - reference.mean())) < 4 * std_err, key
    # The local estimator really is another estimator (independent noise per example).
    assert not torch.allclose(per_draw["weights"], per_draw["local"])


def test_local_estimator_rejects_non_meanfield_guides():
    pyro.clear_param_store()
    model = BayesianMLP((3, 2))
    x, y = synthetic_batch(batch=4, features=3, classes=2)
    guide = _fixed_guide("normal", model, x, y)
    with pytest.raises(ValueError, match="meanfield"):
        LocalReparameterizationELBO()(model, guide, x, y, NUM_DATA, 1.0)
    with pytest.raises(ValueError, match="meanfield"):
        make_estimator("local", guide)


def test_make_estimator():
    pyro.clear_param_store()
    model = BayesianMLP((3, 2))
    x, y = synthetic_batch(batch=4, features=3, classes=2)
    meanfield = _fixed_guide("meanfield", model, x, y)
    normal = make_guide("normal", model)
    est = make_estimator("weights", meanfield, 3)
    assert isinstance(est, WeightSamplingELBO) and est.closed_form_kl and est.num_particles == 3
    est = make_estimator("weights", normal)
    assert isinstance(est, WeightSamplingELBO) and not est.closed_form_kl
    est = make_estimator("local", meanfield, 2)
    assert isinstance(est, LocalReparameterizationELBO) and est.num_particles == 2
    with pytest.raises(ValueError) as info:
        make_estimator("sampling", meanfield)
    assert "'sampling'" in str(info.value) and "weights" in str(info.value) and "local" in str(info.value)
    for bad in (0, -1, 1.5):
        with pytest.raises(ValueError, match="num_particles"):
            WeightSamplingELBO(bad)


# ----------------------------------------------------------------------------- the training loop


@pytest.mark.parametrize(
    "field, value",
    [
        ("epochs", 0),
        ("epochs", True),
        ("epochs", 2.0),
        ("steps", 0),
        ("steps", -3),
        ("steps", 2.5),
        ("steps", True),
        ("batch_size", 0),
        ("batch_size", False),
        ("num_particles", 0),
        ("num_particles", 1.5),
        ("lr", 0.0),
        ("lr", -1e-3),
        ("lr", float("nan")),
        ("lr", float("inf")),
        ("lr", "0.01"),
        ("eval_samples", -1),
        ("eval_samples", 0.5),
        ("eval_samples", True),
        ("warmup_epochs", 0.0),
        ("warmup_epochs", -2),
        ("warmup_epochs", float("nan")),
        ("progress", 1),
        ("validate", "yes"),
    ],
)
def test_train_config_rejects_bad_values_naming_the_field(field, value):
    with pytest.raises(ValueError, match=field):
        TrainConfig(**{field: value})


def test_train_config_rejects_unknown_names():
    with pytest.raises(ValueError, match="estimator 'fast'"):
        TrainConfig(estimator="fast")
    with pytest.raises(ValueError, match="schedule 'linear'"):
        TrainConfig(kl_schedule="linear")
    TrainConfig(estimator="auto", kl_schedule="warmup", steps=3, eval_samples=0)  # valid


def _train_data(n=40, seed=0):
    x, y = synthetic_batch(batch=n, features=6, classes=3, seed=seed)
    return Split(x, y)


def _config(**kwargs):
    base = dict(batch_size=8, lr=1e-2, progress=False, eval_samples=0, estimator="weights")
    base.update(kwargs)
    return TrainConfig(**base)


@pytest.mark.parametrize("steps", [5, 7])
def test_train_does_exactly_the_requested_steps(steps):
    pyro.clear_param_store()
    model = BayesianMLP((6, 5, 3))
    guide = make_guide("meanfield", model)
    calls = []
    # Count the guide's runs on training minibatches (every minibatch here has 8 examples); the
    # plain path traces the guide once per step (the fast path reads its parameters instead).
    guide.register_forward_pre_hook(lambda module, args: calls.append(args[0].shape[0]) if args else None)

    data = _train_data(40)  # 5 minibatches of 8 per epoch
    history = train(model, guide, data, _config(steps=steps, fast=False))
    assert calls.count(8) == steps
    assert history.epochs[-1].steps == steps
    assert len(history.epochs) == math.ceil(steps / 5)
    assert [e.epoch for e in history.epochs] == list(range(1, len(history.epochs) + 1))


def _param_snapshot():
    store = pyro.get_param_store()
    return {name: store[name].detach().clone() for name in store.keys()}


@pytest.mark.parametrize("guide_name, estimator", [("meanfield", "local"), ("normal", "weights")])
def test_train_is_reproducible(guide_name, estimator):
    data = _train_data(40)
    val = _train_data(16, seed=1)

    def run(seed):
        pyro.clear_param_store()
        model = BayesianMLP((6, 5, 3))
        guide = make_guide(guide_name, model, GuideConfig(init_scale=0.05))
        config = _config(epochs=2, estimator=estimator, num_particles=2, seed=seed, eval_samples=4)
        history = train(model, guide, data, config, val_split=val)
        records = [{k: v for k, v in r.items() if k != "seconds"} for r in history.to_records()]
        return records, _param_snapshot()

    records_a, params_a = run(seed=3)
    records_b, params_b = run(seed=3)
    assert records_a == records_b
    assert params_a.keys() == params_b.keys() and len(params_a) > 0
    for name in params_a:
        assert torch.equal(params_a[name], params_b[name]), name
    assert len(records_a) == 2 and records_a[-1]["steps"] == 10
    assert all(r["val_accuracy"] is not None for r in records_a)
    for r in records_a:
        assert r["elbo"] == pytest.approx(r["expected_log_lik"] - r["weighted_kl"])
    records_c, params_c = run(seed=4)
    assert records_c != records_a
    assert any(not torch.equal(params_a[n], params_c[n]) for n in params_a)


def test_train_with_no_kl_has_zero_weighted_kl_and_blundell_a_positive_one():
    data = _train_data(40)
    for schedule in ("none", "blundell"):
        pyro.clear_param_store()
        model = BayesianMLP((6, 5, 3))
        guide = make_guide("meanfield", model)
        history = train(model, guide, data, _config(epochs=1, kl_schedule=schedule))
        assert isinstance(history, TrainHistory)
        (epoch,) = history.epochs
        if schedule == "none":
            assert epoch.weighted_kl == 0.0
            assert epoch.elbo == epoch.expected_log_lik
        else:
            assert epoch.weighted_kl > 0
        assert epoch.val_accuracy is None
        assert 0.0 <= epoch.train_accuracy <= 1.0


def test_gaussian_kl_is_torch_normal_kl_to_the_last_bit():
    from pyro_bbt.objectives import gaussian_kl

    g = torch.Generator().manual_seed(0)
    loc_q, loc_p = torch.randn(7, 5, generator=g), torch.randn(7, 5, generator=g)
    scale_q, scale_p = torch.rand(7, 5, generator=g) + 0.01, torch.rand(7, 5, generator=g) + 0.01
    expected = kl_divergence(dist.Normal(loc_q, scale_q), dist.Normal(loc_p, scale_p))
    assert torch.equal(gaussian_kl(loc_q, scale_q, loc_p, scale_p), expected)


@pytest.mark.parametrize("guide_name", GUIDES)
def test_guide_parameters_are_what_svi_would_optimise(guide_name):
    from pyro_bbt.guides import guide_parameters, initialize_guide

    model, guide = fresh_model_and_guide((6, 5, 3), guide_name, seed=None, num_flows=2, iaf_flows=1)
    with pytest.raises(ValueError, match="initialize_guide"):
        guide_parameters(guide)
    initialize_guide(guide, 6)
    x, y = synthetic_batch(batch=4, features=6, classes=3)
    with poutine.trace(param_only=True) as capture:
        make_estimator("weights", guide, 2)(model, guide, x, y, 4, 1.0)
    captured = {id(site["value"].unconstrained()) for site in capture.trace.nodes.values()}
    ours = guide_parameters(guide)
    assert len(ours) == len(captured) > 0 and {id(p) for p in ours} == captured


@pytest.mark.parametrize("guide_name, estimator", [("meanfield", "local"), ("normal", "weights")])
def test_train_takes_the_steps_of_pyro_svi_with_adam(guide_name, estimator):
    """``train``'s loop (one torch Adam, validation off, the scales at their own learning rate)
    against Pyro's ``SVI`` with ``pyro.optim.Adam`` given per-parameter learning rates, on the
    same seeds and minibatches, minibatch ``i`` of ``M = 5`` with the KL weight ``M pi_i``: the
    same parameters after 10 steps."""
    from pyro.infer import SVI

    from pyro_bbt.guides import initialize_guide, is_scale_parameter
    from pyro_bbt.kl_schedules import kl_weight

    data = _train_data(40)
    config = _config(epochs=2, estimator=estimator, kl_schedule="blundell", scale_lr=3e-2)

    def fresh():
        return fresh_model_and_guide((6, 5, 3), guide_name, seed=None, init_scale=0.05)

    model, guide = fresh()
    train(model, guide, data, config)
    ours = {name: p.detach().clone() for name, p in guide.named_parameters()}

    model, guide = fresh()
    pyro.set_rng_seed(config.seed)
    order = torch.Generator().manual_seed(config.seed)
    initialize_guide(guide, 6)
    initial = {name: p.detach().clone() for name, p in guide.named_parameters()}
    loss = make_estimator(estimator, guide, config.num_particles)
    def per_parameter(module_name, param_name):
        return {"lr": config.scale_lr if is_scale_parameter(param_name) else config.lr}

    svi = SVI(model, guide, pyro.optim.Adam(per_parameter), loss=loss, loss_and_grads=loss.loss_and_grads)
    for epoch in range(2):
        for index, (x, y) in enumerate(data.batches(config.batch_size, shuffle=True, generator=order), start=1):
            svi.step(x, y, num_data=40, kl_weight=5 * kl_weight("blundell", index, 5, epoch, config.warmup_epochs))
    reference = {name: p.detach() for name, p in guide.named_parameters()}

    assert ours.keys() == reference.keys() and len(ours) > 0
    assert all(not torch.equal(ours[name], initial[name]) for name in ours)  # training moved every parameter
    for name in ours:
        torch.testing.assert_close(ours[name], reference[name], rtol=1e-5, atol=1e-6, msg=name)


def test_train_with_uniform_kl_weights_is_pyro_svi_with_trace_elbo():
    """The objective itself: with the ``uniform`` schedule every step of ``train`` is a step of
    Pyro's own ``SVI(model, guide, Adam, Trace_ELBO())`` (no KL weighting at all), whose loss is
    the unbiased minibatch estimate of the full-data negative ELBO."""
    from pyro.infer import SVI, Trace_ELBO

    from pyro_bbt.guides import initialize_guide

    data = _train_data(40)
    config = _config(epochs=2, estimator="weights", kl_schedule="uniform")

    def fresh():
        return fresh_model_and_guide((6, 5, 3), "normal", seed=None, init_scale=0.05)

    model, guide = fresh()
    history = train(model, guide, data, config)
    ours = {name: p.detach().clone() for name, p in guide.named_parameters()}

    model, guide = fresh()
    pyro.set_rng_seed(config.seed)
    order = torch.Generator().manual_seed(config.seed)
    initialize_guide(guide, 6)
    svi = SVI(model, guide, pyro.optim.Adam({"lr": config.lr}), loss=Trace_ELBO())
    losses = [svi.step(x, y, num_data=40) for _ in range(2) for x, y in data.batches(config.batch_size, shuffle=True, generator=order)]
    assert len(losses) == 10
    for name, param in guide.named_parameters():
        torch.testing.assert_close(ours[name], param.detach(), rtol=1e-5, atol=1e-6, msg=name)
    # an epoch's ELBO diagnostic is the mean of the steps' full-data estimates
    assert history.epochs[0].elbo == pytest.approx(-sum(losses[:5]) / 5, rel=1e-5)
