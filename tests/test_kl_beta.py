"""A KL weight beta < 1 in the objective (``kl_beta``, tempered posteriors): training maximises
``E_q log p(D | w) - beta KL(q || p)``, and the rule, the verdict and its continuation judge that
objective, not the ELBO."""

from __future__ import annotations

import pytest

from conftest import fresh_model_and_guide, six_feature_split
from pyro_bbt.convergence import StoppingRule
from pyro_bbt.elbo_gradient import read_posterior
from pyro_bbt.experiment import ExperimentConfig
from pyro_bbt.fixed_noise import posterior_elbo
from pyro_bbt.inference import TrainConfig, train
from pyro_bbt.objectives import closed_form_kl
from pyro_bbt.priors import GaussianPrior
from pyro_bbt.transfer import build_parser, config_from_args
from pyro_bbt.verdict import VerdictConfig, judge

SIZES = (6, 8, 3)


_data = six_feature_split


def _fit(kl_beta: float):
    rule = StoppingRule(max_epochs=150, min_epochs=20, window=5, rel_tol=1e-3, scale_tol=0.02, lr_drops=2, lr_factor=0.3, elbo_test="means")
    config = TrainConfig(stopping=rule, lr=3e-2, scale_lr=9e-2, batch_size=25, kl_schedule="uniform", progress=False, eval_samples=0,
                         kl_beta=kl_beta, verdict=VerdictConfig(tol_per_datum=0.01, max_overrules=5), warn_unconverged=False)
    model, guide = fresh_model_and_guide(SIZES, prior=GaussianPrior(1.0))
    records = train(model, guide, _data(), config).to_records()
    return model, guide, records


def test_the_tempered_objective_weights_the_kl_by_beta():
    """``posterior_elbo(kl_beta=b)`` differs from the ELBO by exactly ``(1 - b) KL`` (closed form,
    Gaussian prior): the same draws, the KL weighted."""
    model, guide = fresh_model_and_guide(SIZES, prior=GaussianPrior(1.0), initialize=True)
    posterior = read_posterior(guide)
    split = _data()
    kl = float(closed_form_kl(model, {n: (l.double(), s.double()) for n, (l, s) in posterior.items()}))
    elbo = posterior_elbo(model, posterior, split, num_draws=4, seed=3)
    tempered = posterior_elbo(model, posterior, split, num_draws=4, seed=3, kl_beta=0.25)
    assert kl > 1.0 and tempered - elbo == pytest.approx(0.75 * kl, rel=1e-9)


def test_a_tempered_fit_is_less_pruned_and_judged_on_its_own_objective(single_torch_thread):
    """Fitted with beta = 0.2, the posterior keeps more KL from the prior than with beta = 1 (its
    widths are narrower) and the history's objective is the tempered one. Each fit is near the
    optimum of its own objective and far from the other's: a step gains little on its own, much
    on the other, so the verdict must judge the objective the fit maximised."""
    split = _data()
    model, tempered_guide, tempered = _fit(0.2)
    _, plain_guide, plain = _fit(1.0)
    kl_tempered = float(closed_form_kl(model, read_posterior(tempered_guide)))
    kl_plain = float(closed_form_kl(model, read_posterior(plain_guide)))
    assert kl_tempered > 2 * kl_plain
    assert tempered[-1]["weighted_kl"] == pytest.approx(0.2 * kl_tempered, rel=0.05)  # the uniform schedule: weighted KL = beta KL
    assert plain[-1]["weighted_kl"] == pytest.approx(kl_plain, rel=0.05)
    for guide, own, other in ((tempered_guide, 0.2, 1.0), (plain_guide, 1.0, 0.2)):
        on_own = judge(model, guide, split, tol_per_datum=0.01, seed=7, kl_beta=own)
        on_other = judge(model, guide, split, tol_per_datum=0.01, seed=7, kl_beta=other)
        assert on_own.gain.per_datum < 0.02 and not on_other.converged
        assert on_other.gain.per_datum > 2.5 * on_own.gain.per_datum


def test_kl_beta_is_a_later_field_and_a_cli_flag():
    assert "kl_beta" not in ExperimentConfig().to_dict()
    config = config_from_args(build_parser().parse_args(["--kl-beta", "0.1", "--tau", "3.1622776601683795"]))
    assert config.kl_beta == 0.1 and config.recipe_a().kl_beta == 0.1 and config.recipe_b(5).kl_beta == 0.1
    assert config.recipe_a().train_config(0).kl_beta == 0.1 and ExperimentConfig(**config.to_dict()) == config
    with pytest.raises(ValueError, match=r"kl-beta must be a finite number > 0 .*got -1.0"):
        config_from_args(build_parser().parse_args(["--kl-beta", "-1"]))
    with pytest.raises(ValueError, match=r"kl_beta must be a finite number > 0 .*got 0"):
        TrainConfig(kl_beta=0)
