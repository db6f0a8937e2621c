"""benchmarks/rescaling.py: the ReLU rescaling symmetry of a mean-field network leaves its
output's distribution exactly as it was and lowers the KL by what it reports."""

from __future__ import annotations

import pytest
import torch

from conftest import fresh_model_and_guide, load_benchmark, six_feature_split
from pyro_bbt.guides import posterior_loc_scale
from pyro_bbt.model import local_reparameterized_forward
from pyro_bbt.objectives import closed_form_kl
from pyro_bbt.priors import GaussianPrior


def _perturbed(sizes, seed: int = 0):
    """A 6-8-7-3 mean-field posterior with means and widths far from their start, so that each
    unit has an optimum of its own."""
    model, guide = fresh_model_and_guide(sizes, prior=GaussianPrior(1.0), initialize=True)
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in guide.named_parameters():
            p.add_(torch.randn(p.shape, generator=generator, dtype=p.dtype) * (0.7 if name.startswith("locs") else 1.5))
    return model, guide


def _logits(model, guide, x, eps):
    post = posterior_loc_scale(guide, model)
    layers = [(*post[f"layers.{i}.weight"], *post[f"layers.{i}.bias"]) for i in range(len(model.layers))]
    return local_reparameterized_forward(x, layers, eps)


def test_rescaling_keeps_every_output_draw_and_lowers_the_kl_by_what_it_reports():
    rescaling = load_benchmark("rescaling")
    sizes = (6, 8, 7, 3)
    model, guide = _perturbed(sizes)
    x = six_feature_split(50).x
    eps = [torch.randn(50, width, generator=torch.Generator().manual_seed(i)) for i, width in enumerate(sizes[1:])]
    before_logits = _logits(model, guide, x, eps)
    before_kl = float(closed_form_kl(model, posterior_loc_scale(guide, model)))
    removed = rescaling.rescale(guide, len(model.layers), sweeps=4)
    after_kl = float(closed_form_kl(model, posterior_loc_scale(guide, model)))
    # the same noise gives the same logits: the likelihood cannot tell the two posteriors apart
    assert torch.allclose(_logits(model, guide, x, eps), before_logits, rtol=1e-4, atol=1e-4)
    assert removed > 1.0 and before_kl - after_kl == pytest.approx(removed, rel=1e-3)
    # each sweep is an exact descent: a further one removes little more (the layers share the units
    # between them, so the sweeps converge rather than finish), and another scale of one unit costs KL
    further = rescaling.rescale(guide, len(model.layers), sweeps=1)
    assert 0 <= further < 0.01 * removed
    after_kl -= further
    for factor in (0.9, 1.1):
        model2, guide2 = fresh_model_and_guide(sizes, prior=GaussianPrior(1.0), initialize=True)
        guide2.load_state_dict(guide.state_dict())
        with torch.no_grad():
            p2 = dict(guide2.named_parameters())
            p2["locs.layers.0.weight_unconstrained"][2] *= factor
            p2["locs.layers.0.bias_unconstrained"][2] *= factor
            p2["locs.layers.1.weight_unconstrained"][:, 2] /= factor
        assert float(closed_form_kl(model2, posterior_loc_scale(guide2, model2))) > after_kl
