"""Tests for pyro_bbt.model (BayesianMLP, batched_linear, local reparameterisation) and pyro_bbt.priors."""

import math

import pyro
import pyro.distributions as dist
import pytest
import torch
import torch.nn.functional as F
from pyro import poutine
from pyro.infer import Trace_ELBO

from conftest import synthetic_batch
from pyro_bbt.guides import make_guide
from pyro_bbt.model import BayesianMLP, batched_linear
from pyro_bbt.priors import GaussianPrior, PerSitePrior, ScaleMixturePrior, prior_loc_scale

pytestmark = pytest.mark.usefixtures("single_torch_thread")

SIZES = (20, 16, 3)


def _all_near(tensor, value):
    return torch.allclose(tensor, torch.full_like(tensor, value))


def _trace(model, *args, **kwargs):
    return poutine.trace(model).get_trace(*args, **kwargs)


# ----------------------------------------------------------------------------- shapes


def test_logits_shape_without_particle_dim():
    pyro.set_rng_seed(0)
    model = BayesianMLP(SIZES)
    x, y = synthetic_batch(batch=8)
    trace = _trace(model, x, y, 100)
    logits = trace.nodes["_RETURN"]["value"]
    assert logits.shape == (8, 3)
    assert model.logits(x).shape == (8, 3)
    assert trace.nodes["layers.0.weight"]["value"].shape == (16, 20)
    assert trace.nodes["layers.1.bias"]["value"].shape == (3,)
    # The observation site sees the minibatch scaled up to the full data set.
    assert trace.nodes["obs"]["scale"] == pytest.approx(100 / 8)
    assert model.num_classes == 3
    assert model.output_sites == ("layers.1.weight", "layers.1.bias")
    assert dict(model.site_shapes) == {
        "layers.0.weight": torch.Size((16, 20)),
        "layers.0.bias": torch.Size((16,)),
        "layers.1.weight": torch.Size((3, 16)),
        "layers.1.bias": torch.Size((3,)),
    }


def test_logits_shape_under_particle_plate():
    pyro.set_rng_seed(0)
    model = BayesianMLP(SIZES)
    x, y = synthetic_batch(batch=8)
    with pyro.plate("particles", 5, dim=-2):
        trace = _trace(model, x, y, 100)
    logits = trace.nodes["_RETURN"]["value"]
    assert logits.shape == (5, 8, 3)
    assert trace.nodes["layers.0.weight"]["value"].shape == (5, 1, 16, 20)
    trace.compute_log_prob()
    assert trace.nodes["obs"]["log_prob"].shape == (5, 8)
    # Each particle's logits are the deterministic forward pass with that particle's weights.
    for p in range(5):
        weights = {name: trace.nodes[name]["value"][p, 0] for name in model.site_shapes}
        with poutine.condition(data=weights):
            expected = model.logits(x)
        torch.testing.assert_close(logits[p], expected, rtol=1e-5, atol=1e-5)
    # The particles really are different samples.
    assert not torch.allclose(logits[0], logits[1])


@pytest.mark.parametrize("guide_name", ["meanfield", "normal"])
def test_vectorized_trace_elbo_runs(guide_name):
    pyro.clear_param_store()
    pyro.set_rng_seed(0)
    model = BayesianMLP(SIZES)
    guide = make_guide(guide_name, model)
    x, y = synthetic_batch(batch=8)
    elbo = Trace_ELBO(num_particles=4, vectorize_particles=True, max_plate_nesting=1)
    loss = elbo.differentiable_loss(model, guide, x, y, 100)
    assert loss.shape == ()
    assert torch.isfinite(loss)
    loss.backward()
    params = list(guide.parameters())
    assert params and all(p.grad is not None and torch.isfinite(p.grad).all() for p in params)
    assert any(p.grad.abs().sum() > 0 for p in params)
    # SVI's non-differentiable entry point works too.
    assert math.isfinite(elbo.loss(model, guide, x, y, 100))


# ----------------------------------------------------------------------------- batched_linear


def test_batched_linear_matches_loop_of_f_linear():
    g = torch.Generator().manual_seed(1)
    x = torch.randn(6, 5, generator=g)
    weight = torch.randn(4, 3, 5, generator=g)
    bias = torch.randn(4, 3, generator=g)
    out = batched_linear(x, weight, bias)
    assert out.shape == (4, 6, 3)
    expected = torch.stack([F.linear(x, weight[s], bias[s]) for s in range(4)])
    torch.testing.assert_close(out, expected, rtol=1e-5, atol=1e-6)

    # Per-sample inputs (S, B, in).
    xs = torch.randn(4, 6, 5, generator=g)
    expected = torch.stack([F.linear(xs[s], weight[s], bias[s]) for s in range(4)])
    torch.testing.assert_close(batched_linear(xs, weight, bias), expected, rtol=1e-5, atol=1e-6)

    # Several leading sample dims (as under a particle plate at dim -2) are flattened.
    w4 = weight.reshape(2, 2, 3, 5)
    b4 = bias.reshape(2, 2, 3)
    expected = torch.stack([F.linear(x, weight[s], bias[s]) for s in range(4)])
    torch.testing.assert_close(batched_linear(x, w4, b4), expected, rtol=1e-5, atol=1e-6)

    # No sample dims: plain F.linear.
    torch.testing.assert_close(batched_linear(x, weight[0], bias[0]), F.linear(x, weight[0], bias[0]))
    assert batched_linear(x, weight[0], bias[0]).shape == (6, 3)


# ----------------------------------------------------------------------------- local reparameterisation


def _random_posterior(model, generator, scale=0.0):
    return {
        name: (torch.randn(shape, generator=generator), torch.full(shape, float(scale)))
        for name, shape in model.site_shapes.items()
    }


def test_local_reparameterized_logits_with_zero_scale_equal_deterministic_forward():
    model = BayesianMLP(SIZES)
    g = torch.Generator().manual_seed(2)
    posterior = _random_posterior(model, g, scale=0.0)
    x, _ = synthetic_batch(batch=8)
    with poutine.condition(data={name: loc for name, (loc, _) in posterior.items()}):
        expected = model.logits(x)
    out = model.local_reparameterized_logits(x, posterior)
    assert out.shape == (8, 3)
    torch.testing.assert_close(out, expected, rtol=1e-5, atol=1e-5)
    out3 = model.local_reparameterized_logits(x, posterior, num_particles=3)
    assert out3.shape == (3, 8, 3)
    for p in range(3):
        torch.testing.assert_close(out3[p], expected, rtol=1e-5, atol=1e-5)


def test_local_reparameterized_logits_have_the_exact_gaussian_moments():
    # One layer: logits_c = x . W_c + b_c exactly Gaussian with mean x mu_W^T + mu_b and
    # variance x^2 (sigma_W^2)^T + sigma_b^2.
    pyro.set_rng_seed(3)
    model = BayesianMLP((4, 2))
    g = torch.Generator().manual_seed(3)
    posterior = {
        name: (torch.randn(shape, generator=g), 0.1 + torch.rand(shape, generator=g))
        for name, shape in model.site_shapes.items()
    }
    x = torch.randn(3, 4, generator=g)
    samples = model.local_reparameterized_logits(x, posterior, num_particles=20000)
    assert samples.shape == (20000, 3, 2)
    (w_loc, w_scale), (b_loc, b_scale) = posterior["layers.0.weight"], posterior["layers.0.bias"]
    mean = F.linear(x, w_loc, b_loc)
    var = F.linear(x * x, w_scale**2, b_scale**2)
    std_err = (var / 20000).sqrt()
    assert ((samples.mean(0) - mean).abs() < 5 * std_err).all()
    torch.testing.assert_close(samples.var(0), var, rtol=0.06, atol=0.0)


# ----------------------------------------------------------------------------- priors in the model


def test_set_prior_changes_the_prior_of_every_sample_site():
    pyro.set_rng_seed(4)
    model = BayesianMLP(SIZES)
    x, y = synthetic_batch(batch=8)
    trace = _trace(model, x, y)
    assert torch.all(trace.nodes["layers.0.weight"]["fn"].base_dist.scale == 1.0)

    model.set_prior(GaussianPrior(0.1))
    assert isinstance(model.prior, GaussianPrior) and model.prior.scale == 0.1
    trace = _trace(model, x, y)
    for name in model.site_shapes:
        fn = trace.nodes[name]["fn"]
        assert _all_near(fn.base_dist.scale, 0.1)
        assert fn.event_shape == model.site_shapes[name]
    # Samples come from the new, narrower prior.
    assert trace.nodes["layers.0.weight"]["value"].std() < 0.2

    locs = {name: torch.full(shape, 3.0) for name, shape in model.site_shapes.items()}
    scales = {name: torch.full(shape, 1e-3) for name, shape in model.site_shapes.items()}
    model.set_prior(PerSitePrior(locs, scales))
    trace = _trace(model, x, y)
    trace.compute_log_prob()
    for name in model.site_shapes:
        assert torch.all(trace.nodes[name]["fn"].base_dist.loc == 3.0)
        assert (trace.nodes[name]["value"] - 3.0).abs().max() < 0.01
        expected = dist.Normal(3.0, 1e-3).log_prob(trace.nodes[name]["value"]).sum()
        torch.testing.assert_close(trace.nodes[name]["log_prob_sum"], expected, rtol=1e-5, atol=1e-3)


@pytest.mark.parametrize("sizes", [(), (5,), (5, 0, 3), (3, -1), (0, 2)])
def test_bad_sizes_raise(sizes):
    with pytest.raises(ValueError, match="sizes"):
        BayesianMLP(sizes)


# ----------------------------------------------------------------------------- priors


def test_gaussian_prior_layer_scale_override():
    prior = GaussianPrior(1.0, layer_scales={"layers.1": 0.1})
    shape = torch.Size((3, 4))
    d0 = prior.site_distribution("layers.0.weight", shape)
    d1w = prior.site_distribution("layers.1.weight", shape)
    d1b = prior.site_distribution("layers.1.bias", torch.Size((3,)))
    d10 = prior.site_distribution("layers.10.weight", shape)  # "layers.1" is no prefix of layer 10
    assert d0.event_shape == shape and d0.batch_shape == ()
    assert torch.all(d0.base_dist.scale == 1.0)
    assert _all_near(d1w.base_dist.scale, 0.1)
    assert _all_near(d1b.base_dist.scale, 0.1)
    assert torch.all(d10.base_dist.scale == 1.0)
    w = torch.linspace(-1, 1, 12).reshape(shape)
    torch.testing.assert_close(d1w.log_prob(w), torch.distributions.Normal(0.0, 0.1).log_prob(w).sum())
    loc, scale = prior_loc_scale(prior, "layers.1.weight", shape)
    assert torch.all(loc == 0) and _all_near(scale, 0.1) and scale.shape == shape
    assert prior.describe() == {"type": "gaussian", "scale": 1.0, "layer_scales": {"layers.1": 0.1}}


def test_scale_mixture_log_prob_matches_hand_formula():
    pi, s1, s2 = 0.3, 1.5, math.exp(-3)
    prior = ScaleMixturePrior(pi, s1, s2)
    values = [-3.0, -0.5, -0.01, 0.0, 0.02, 0.4, 2.5]
    w = torch.tensor(values)
    d = prior.site_distribution("layers.0.bias", torch.Size((len(values),)))
    assert d.event_shape == (len(values),)

    def normal_pdf(v, s):
        return math.exp(-0.5 * (v / s) ** 2) / (s * math.sqrt(2 * math.pi))

    expected = sum(math.log(pi * normal_pdf(v, s1) + (1 - pi) * normal_pdf(v, s2)) for v in values)
    assert float(d.log_prob(w)) == pytest.approx(expected, rel=1e-5)
    # A 2-D site sums over all its weights.
    w2 = w[:6].reshape(2, 3)
    d2 = prior.site_distribution("layers.0.weight", torch.Size((2, 3)))
    expected2 = sum(math.log(pi * normal_pdf(v, s1) + (1 - pi) * normal_pdf(v, s2)) for v in values[:6])
    assert float(d2.log_prob(w2)) == pytest.approx(expected2, rel=1e-5)
    assert prior.stddev == pytest.approx(math.sqrt(pi * s1**2 + (1 - pi) * s2**2))
    assert prior_loc_scale(prior, "layers.0.weight", torch.Size((2, 3))) is None


def test_per_site_prior_uses_its_tensors_and_the_fallback():
    g = torch.Generator().manual_seed(5)
    loc = torch.randn(4, 3, generator=g)
    scale = torch.rand(4, 3, generator=g) + 0.1
    prior = PerSitePrior({"layers.0.weight": loc}, {"layers.0.weight": scale}, fallback=GaussianPrior(2.0))
    d = prior.site_distribution("layers.0.weight", torch.Size((4, 3)))
    assert torch.equal(d.base_dist.loc, loc) and torch.equal(d.base_dist.scale, scale)
    w = torch.randn(4, 3, generator=g)
    torch.testing.assert_close(d.log_prob(w), torch.distributions.Normal(loc, scale).log_prob(w).sum())
    fb = prior.site_distribution("layers.0.bias", torch.Size((4,)))
    assert torch.all(fb.base_dist.loc == 0) and torch.all(fb.base_dist.scale == 2.0)
    l, s = prior_loc_scale(prior, "layers.0.weight", torch.Size((4, 3)))
    assert torch.equal(l, loc) and torch.equal(s, scale)
    l, s = prior_loc_scale(prior, "layers.0.bias", torch.Size((4,)))
    assert torch.all(s == 2.0)
    # The prior's tensors are copies, not views of the caller's.
    loc += 1.0
    assert not torch.equal(prior.loc("layers.0.weight"), loc)
    # Without a fallback another site is an error.
    no_fallback = PerSitePrior({"layers.0.weight": loc}, {"layers.0.weight": scale})
    with pytest.raises(KeyError, match="layers.0.bias"):
        no_fallback.site_distribution("layers.0.bias", torch.Size((4,)))
    # The model asking for another shape at a known site is an error naming both shapes.
    with pytest.raises(ValueError, match=r"\(4, 3\).*\(3, 4\)"):
        prior.site_distribution("layers.0.weight", torch.Size((3, 4)))


def test_per_site_prior_rejects_bad_tensors():
    ok = torch.ones(2, 3)
    with pytest.raises(ValueError, match="shape"):
        PerSitePrior({"a": torch.zeros(2, 3)}, {"a": torch.ones(3, 2)})
    for bad_scale in (torch.zeros(2, 3), -ok, torch.full((2, 3), float("nan")), torch.full((2, 3), float("inf"))):
        with pytest.raises(ValueError, match="scale"):
            PerSitePrior({"a": torch.zeros(2, 3)}, {"a": bad_scale})
    with pytest.raises(ValueError, match="loc"):
        PerSitePrior({"a": torch.full((2, 3), float("nan"))}, {"a": ok})
    with pytest.raises(ValueError, match="same sites"):
        PerSitePrior({"a": ok}, {"b": ok})


@pytest.mark.parametrize(
    "make, text",
    [
        (lambda: GaussianPrior(0.0), "0.0"),
        (lambda: GaussianPrior(-1.5), "-1.5"),
        (lambda: GaussianPrior(float("nan")), "nan"),
        (lambda: GaussianPrior(float("inf")), "inf"),
        (lambda: GaussianPrior(1.0, {"layers.0": -2.0}), "-2.0"),
        (lambda: ScaleMixturePrior(pi=1.5), "1.5"),
        (lambda: ScaleMixturePrior(pi=0.0), "0.0"),
        (lambda: ScaleMixturePrior(pi=1.0), "1.0"),
        (lambda: ScaleMixturePrior(sigma1=0.0), "0.0"),
        (lambda: ScaleMixturePrior(sigma2=-0.25), "-0.25"),
    ],
)
def test_invalid_prior_arguments_raise_naming_the_value(make, text):
    with pytest.raises(ValueError) as info:
        make()
    assert text in str(info.value)
