"""pyro_bbt.pyro_internals, the one module that reads Pyro-private attributes: each function
against Pyro's public behaviour (``median()``, ``quantiles()``, ``parameters()``, the param
store, the guide's own samples), on small real guides; the installed Pyro is the version the
adapter was written against (and within pyproject's range); a missing internal fails with one
line naming the function, the guide type and the attribute."""

from __future__ import annotations

import importlib.metadata
import tomllib
from pathlib import Path

import pyro
import pytest
import torch
import torch.nn.functional as F
from packaging.requirements import Requirement
from packaging.version import Version
from pyro.infer.autoguide import AutoContinuous, AutoNormal

from conftest import fresh_model_and_guide, synthetic_batch
from pyro_bbt import model as model_module
from pyro_bbt import pyro_internals
from pyro_bbt.guides import AutoFlowNormal, AutoMeanFieldNormal, initialize_guide, start_from_posterior
from pyro_bbt.model import BayesianMLP
from pyro_bbt.priors import GaussianPrior
from pyro_bbt.pyro_internals import (
    TESTED_PYRO_VERSION,
    PyroInternalsError,
    continuous_init_loc,
    continuous_loc_scale,
    create_plates,
    event_dims,
    loc_and_scale,
    param_store_name,
    pyro_module_fullname,
    unconstrained_loc_scale_parameters,
    unconstrained_shapes,
    unpack_latent,
)

SIZES = (4, 3, 2)
NORMAL_FAMILY = ("meanfield", "normal")  # AutoNormal and our subclass of it
CONTINUOUS = ("lowrank", "planar")  # AutoContinuous: Pyro's low-rank guide and our flow guide
PYPROJECT = Path(__file__).resolve().parent.parent / "pyproject.toml"


def small(guide: str, **config):
    """``(model, guide)`` of 4-3-2 weights under a unit Gaussian prior, initialised."""
    config = {"num_flows": 2, "rank": 2} | config
    return fresh_model_and_guide(SIZES, guide, prior=GaussianPrior(1.0), initialize=True, **config)


def random_posterior(model: BayesianMLP, seed: int = 1) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    """Per site a random ``(loc, scale)``, so that no check passes on the guides' uniform start."""
    generator = torch.Generator().manual_seed(seed)
    return {name: (torch.randn(shape, generator=generator), 0.05 + torch.rand(shape, generator=generator))
            for name, shape in model.site_shapes.items()}


# --------------------------------------------------------------------------- the pinned version

def test_the_installed_pyro_is_the_tested_version_and_within_pyprojects_range():
    assert pyro.__version__ == importlib.metadata.version("pyro-ppl") == TESTED_PYRO_VERSION, (
        f"Pyro {pyro.__version__} is installed; pyro_bbt/pyro_internals.py was written against {TESTED_PYRO_VERSION}: "
        "rerun these tests, fix the adapter if one fails, then update TESTED_PYRO_VERSION")
    dependencies = [Requirement(d) for d in tomllib.loads(PYPROJECT.read_text(encoding="utf-8"))["project"]["dependencies"]]
    (pyro_requirement,) = [r for r in dependencies if r.name == "pyro-ppl"]
    assert Version(TESTED_PYRO_VERSION) in pyro_requirement.specifier, f"{TESTED_PYRO_VERSION} is outside pyproject's {pyro_requirement}"


# --------------------------------------------------------------------------- AutoNormal family

@pytest.mark.parametrize("name", NORMAL_FAMILY)
def test_event_dims_are_the_site_events_in_site_order(name):
    model, guide = small(name)
    dims = event_dims(guide)
    assert list(dims) == [n for n, _ in guide.prototype_trace.iter_stochastic_nodes()] == list(model.site_shapes)
    assert dims == {site: len(shape) for site, shape in model.site_shapes.items()}
    # the event dimensions of the Normal the guide samples (at the site, or at its auxiliary site)
    trace = pyro.poutine.trace(guide).get_trace(*synthetic_batch(2, SIZES[0], SIZES[-1]), 2)
    suffix = "" if name == "meanfield" else "_unconstrained"
    assert {site: trace.nodes[site + suffix]["fn"].event_dim for site in dims} == dims


@pytest.mark.parametrize("name", NORMAL_FAMILY)
def test_loc_and_scale_are_the_median_and_the_width_of_the_guides_samples(name):
    model, guide = small(name)
    posterior = random_posterior(model)
    start_from_posterior(guide, posterior)
    median = guide.median()
    lows, mids, highs = {}, {}, {}
    for site, values in guide.quantiles([0.15865525393145707, 0.5, 0.8413447460685429]).items():  # loc - scale, loc, loc + scale
        lows[site], mids[site], highs[site] = values
    for site, (want_loc, want_scale) in posterior.items():
        loc, scale = loc_and_scale(guide, site)
        assert loc.requires_grad and scale.requires_grad  # the values the guide uses, on the graph
        torch.testing.assert_close(loc, want_loc)
        torch.testing.assert_close(scale, want_scale)
        assert torch.equal(loc.detach(), median[site])
        torch.testing.assert_close(mids[site], loc.detach())
        torch.testing.assert_close(highs[site] - loc.detach(), scale.detach(), rtol=1e-4, atol=1e-5)
        torch.testing.assert_close(loc.detach() - lows[site], scale.detach(), rtol=1e-4, atol=1e-5)
    # the guide's own draws have that mean and width
    pyro.set_rng_seed(0)
    x, y = synthetic_batch(1, SIZES[0], SIZES[-1])
    with torch.no_grad():
        draws = [guide(x, y, 1) for _ in range(4000)]
    for site in posterior:
        stacked = torch.stack([d[site] for d in draws])
        loc, scale = (t.detach() for t in loc_and_scale(guide, site))
        assert ((stacked.mean(0) - loc).abs() < 5 * scale / 4000 ** 0.5).all()
        torch.testing.assert_close(stacked.std(0), scale, rtol=0.1, atol=0.0)


@pytest.mark.parametrize("name", NORMAL_FAMILY)
def test_unconstrained_loc_scale_parameters_are_the_guides_own_parameters(name):
    model, guide = small(name)
    start_from_posterior(guide, random_posterior(model))
    named = {id(p): n for n, p in guide.named_parameters()}
    seen = []
    for site in model.site_shapes:
        loc_p, rho_p = unconstrained_loc_scale_parameters(guide, site)
        assert isinstance(loc_p, torch.nn.Parameter) and isinstance(rho_p, torch.nn.Parameter)
        assert named[id(loc_p)] == f"locs.{site}_unconstrained" and named[id(rho_p)] == f"scales.{site}_unconstrained"
        loc, scale = loc_and_scale(guide, site)
        assert torch.equal(loc_p.detach(), loc.detach())
        torch.testing.assert_close(F.softplus(rho_p.detach()), scale.detach())
        # gradients of what the guide uses land on these very tensors
        guide.zero_grad(set_to_none=True)
        (loc.sum() + scale.sum()).backward()
        torch.testing.assert_close(loc_p.grad, torch.ones_like(loc_p))
        torch.testing.assert_close(rho_p.grad, torch.sigmoid(rho_p.detach()))
        seen += [loc_p, rho_p]
    assert sorted(map(id, seen)) == sorted(map(id, guide.parameters())), "the sites' parameters are not all of the guide's"


# --------------------------------------------------------------------------- AutoContinuous family

@pytest.mark.parametrize("name", CONTINUOUS)
def test_unconstrained_shapes_and_unpack_latent_follow_the_site_order(name):
    model, guide = small(name)
    assert isinstance(guide, AutoContinuous)
    shapes = unconstrained_shapes(guide)
    assert shapes == dict(model.site_shapes) and list(shapes) == list(model.site_shapes)
    shapes.clear()
    assert unconstrained_shapes(guide) == dict(model.site_shapes), "unconstrained_shapes returned the guide's own dict"
    vector = torch.arange(float(guide.latent_dim))
    parts = unpack_latent(guide, vector)
    assert {site: part.shape for site, part in parts.items()} == dict(model.site_shapes)
    assert torch.equal(torch.cat([part.reshape(-1) for part in parts.values()]), vector)
    batched = unpack_latent(guide, torch.stack([vector, -vector]))
    assert {site: part.shape for site, part in batched.items()} == {site: (2,) + shape for site, shape in model.site_shapes.items()}
    # a draw of the guide: the packed latent it samples, unpacked, is the value at every site
    pyro.set_rng_seed(0)
    trace = pyro.poutine.trace(guide).get_trace(*synthetic_batch(2, SIZES[0], SIZES[-1]), 2)
    latent = trace.nodes[f"_{param_store_name(guide)}_latent"]["value"]
    for site, value in unpack_latent(guide, latent).items():
        assert torch.equal(value, trace.nodes[site]["value"])


@pytest.mark.parametrize("name", CONTINUOUS)
def test_continuous_init_loc_is_the_prototype_traces_values(name):
    model, guide = small(name)
    values = torch.cat([site["value"].detach().reshape(-1) for _, site in guide.prototype_trace.iter_stochastic_nodes()])
    assert torch.equal(continuous_init_loc(guide), values)
    assert torch.equal(guide.loc.detach(), values)  # how both guides start


def test_continuous_loc_scale_is_the_low_rank_guides_marginals():
    model, guide = small("lowrank")
    generator = torch.Generator().manual_seed(3)
    with torch.no_grad():
        guide.loc.copy_(torch.randn(guide.latent_dim, generator=generator))
        guide.cov_factor.copy_(torch.randn(guide.cov_factor.shape, generator=generator))
    loc, scale = continuous_loc_scale(guide)
    assert loc is guide.loc and scale.requires_grad
    posterior = guide.get_posterior()
    torch.testing.assert_close(loc.detach(), posterior.mean.detach())
    torch.testing.assert_close(scale.detach(), posterior.variance.detach().sqrt())
    median = guide.median()
    for site, part in unpack_latent(guide, loc.detach()).items():
        assert torch.equal(part, median[site])


def test_the_flow_guide_has_no_closed_form_marginals():
    _, guide = small("planar")
    with pytest.raises(NotImplementedError, match="moment matching"):
        continuous_loc_scale(guide)


# --------------------------------------------------------------------------- any AutoGuide / PyroModule

@pytest.mark.parametrize("name", ("meanfield", "normal", "lowrank", "planar", "iaf", "delta"))
def test_param_store_name_prefixes_every_parameter_the_guide_puts_in_the_param_store(name):
    _, guide = small(name)
    prefix = param_store_name(guide)
    assert prefix == type(guide).__name__
    keys = list(pyro.get_param_store().keys())
    assert keys and all(key.startswith(prefix + ".") for key in keys), keys
    assert len(keys) == len(list(guide.parameters()))


def test_pyro_module_fullname_names_the_models_sample_sites(monkeypatch):
    """BayesianLinear's priors are looked up by pyro_module_fullname (valid only while the
    network runs): the names it gives are the sample sites of the model's trace."""
    model = BayesianMLP(SIZES, GaussianPrior(1.0))
    asked, named = [], []
    real = GaussianPrior.site_distribution
    monkeypatch.setattr(GaussianPrior, "site_distribution", lambda self, name, shape: asked.append((name, shape)) or real(self, name, shape))
    monkeypatch.setattr(model_module, "pyro_module_fullname", lambda module, attribute: named.append((type(module).__name__, attribute, pyro_module_fullname(module, attribute))) or named[-1][-1])
    trace = pyro.poutine.trace(model).get_trace(*synthetic_batch(2, SIZES[0], SIZES[-1]), 2)
    assert asked == list(model.site_shapes.items())
    assert named == [("BayesianLinear", site.rpartition(".")[2], site) for site in model.site_shapes]
    for name, shape in asked:
        assert trace.nodes[name]["type"] == "sample" and trace.nodes[name]["value"].shape == shape
    assert param_store_name(model) == ""  # the network is the root module: its names carry no prefix


def test_create_plates_returns_the_guides_plates():
    pyro.clear_param_store()
    model = BayesianMLP(SIZES, GaussianPrior(1.0))
    x, y = synthetic_batch(5, SIZES[0], SIZES[-1])
    plain = initialize_guide(AutoMeanFieldNormal(model), SIZES[0])
    assert create_plates(plain, x, y, 5) == {}  # no weight site sits in a plate
    with_data = AutoMeanFieldNormal(model, create_plates=lambda x, y, n: pyro.plate("data", n))
    initialize_guide(with_data, SIZES[0])
    plates = create_plates(with_data, x, y, 5)
    assert list(plates) == ["data"] and plates["data"].size == 5 and plates is with_data.plates


# --------------------------------------------------------------------------- a moved internal

def _normal_guide():
    return small("meanfield")[1]


def _continuous_guide():
    return small("lowrank")[1]


MOVED = [  # (function, its call, the guide, the attribute Pyro keeps, whether on the guide's class or the instance)
    ("event_dims", lambda g: event_dims(g), _normal_guide, "_event_dims", False),
    ("loc_and_scale", lambda g: loc_and_scale(g, "layers.0.weight"), _normal_guide, "_get_loc_and_scale", True),
    ("unconstrained_loc_scale_parameters", lambda g: unconstrained_loc_scale_parameters(g, "layers.0.weight"), _normal_guide, "locs", False),
    ("unpack_latent", lambda g: unpack_latent(g, g.loc), _continuous_guide, "_unpack_latent", True),
    ("continuous_loc_scale", lambda g: continuous_loc_scale(g), _continuous_guide, "_loc_scale", True),
    ("continuous_init_loc", lambda g: continuous_init_loc(g), _continuous_guide, "_init_loc", True),
    ("unconstrained_shapes", lambda g: unconstrained_shapes(g), _continuous_guide, "_unconstrained_shapes", False),
    ("create_plates", lambda g: create_plates(g), _normal_guide, "_create_plates", True),
    ("param_store_name", lambda g: param_store_name(g), _normal_guide, "_pyro_name", False),
]


@pytest.mark.parametrize("function, call, make, attribute, on_class", MOVED, ids=[m[0] for m in MOVED])
def test_a_missing_internal_fails_with_one_line_naming_function_guide_and_attribute(monkeypatch, function, call, make, attribute, on_class):
    """As if a Pyro upgrade had renamed the attribute: removed from the instance, or (until the
    test ends) from every class of the guide's MRO that defines it."""
    assert function in pyro_internals.__all__
    guide = make()
    assert hasattr(guide, attribute)
    if on_class:
        for owner in type(guide).__mro__:
            if attribute in vars(owner):
                monkeypatch.delattr(owner, attribute)
    else:  # this guide is thrown away: nothing to restore
        delattr(guide, attribute)
    assert not hasattr(guide, attribute)
    with pytest.raises(PyroInternalsError) as caught:
        call(guide)
    message = str(caught.value)
    assert "\n" not in message
    assert f"pyro_internals.{function}:" in message and type(guide).__name__ in message and repr(attribute) in message
    assert TESTED_PYRO_VERSION in message and "has not been set up" not in message
    assert isinstance(caught.value, AttributeError)


def test_a_missing_parameter_and_a_guide_not_set_up_are_named():
    _, guide = small("meanfield")
    del guide.scales.get_submodule("layers.1")._parameters["bias_unconstrained"]  # as if Pyro stored it elsewhere
    with pytest.raises(PyroInternalsError, match=r"unconstrained_loc_scale_parameters: AutoMeanFieldNormal has no parameter 'bias_unconstrained' in guide.scales.layers.1 for site 'layers.1.bias'"):
        unconstrained_loc_scale_parameters(guide, "layers.1.bias")
    _, fresh = fresh_model_and_guide(SIZES, "meanfield", prior=GaussianPrior(1.0))
    with pytest.raises(PyroInternalsError, match=r"event_dims: AutoMeanFieldNormal has no attribute '_event_dims' \(the guide has not been set up yet"):
        event_dims(fresh)


def test_an_attribute_error_inside_a_pyro_method_is_not_reported_as_a_moved_internal():
    _, guide = small("meanfield")
    with pytest.raises(AttributeError) as caught:
        loc_and_scale(guide, "layers.0.nonexistent")
    assert not isinstance(caught.value, PyroInternalsError)


def test_our_flow_guide_is_an_autocontinuous():
    """The flow guide's ``_setup_prototype`` and ``_loc_scale`` override Pyro's hooks (not routed
    through the adapter): it must stay an ``AutoContinuous`` for them to be called."""
    assert issubclass(AutoFlowNormal, AutoContinuous) and issubclass(AutoMeanFieldNormal, AutoNormal)
