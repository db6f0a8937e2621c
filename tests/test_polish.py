"""The verdict's own steps before an overrule (VerdictConfig.polish_steps): where the verdict
rejects a fit at the rule's stop, the fit takes the line search's best full-data step a few times
and is judged again; the steps are exactly the line search's, the record says what they gained,
and a fit resumed across them is bit-identical."""

from __future__ import annotations

import io

import pytest
import torch

from conftest import fresh_model_and_guide, six_feature_split, stopped_at
from pyro_bbt.experiment import ExperimentConfig
from pyro_bbt.fixed_noise import fixed_noise_elbo
from pyro_bbt.guides import start_from_posterior
from pyro_bbt.inference import POLISH_SEED_OFFSET, POLISHED_JUDGEMENT_SEED_OFFSET, TrainConfig, TrainState, train
from pyro_bbt.priors import GaussianPrior
from pyro_bbt.transfer import build_parser, config_from_args
from pyro_bbt.verdict import VerdictConfig, judge_by, line_search_gain

SIZES = (6, 8, 3)


def _config(polish: int, overrules: int = 0, stop_at: int = 6, tol: float = 0.002) -> TrainConfig:
    """The rule stops at ``stop_at`` (its criteria always hold); after so few epochs the verdict
    rejects the fit at ``tol``."""
    return stopped_at(stop_at, 200, VerdictConfig(tol_per_datum=tol, max_overrules=overrules, overrule="restart", polish_steps=polish))


def _fit(config: TrainConfig, **kwargs):
    model, guide = fresh_model_and_guide(SIZES, prior=GaussianPrior(1.0))
    records = train(model, guide, six_feature_split(), config, **kwargs).to_records()
    return model, guide, records


def test_the_steps_are_the_line_search_s_and_the_fit_is_judged_again(single_torch_thread):
    """Stopped at epoch 6 and rejected, the fit takes up to 3 of the verdict's steps: the same
    posterior as the line search's best steps taken by hand from the unpolished fit (same seeds),
    a higher fixed-noise ELBO, and the record is the judgement of the polished posterior."""
    split = six_feature_split()
    _, plain_guide, plain = _fit(_config(polish=0))
    model, guide, records = _fit(_config(polish=3))
    assert len(plain) == len(records) == 6
    rejected, polished = plain[-1]["verdict"], records[-1]["verdict"]
    assert rejected["converged"] is False and "polish" not in rejected
    record = polished["polish"]
    assert record["before"] == {key: rejected[key] for key in ("converged", "gain_upper_per_datum", "reasons")}
    steps = record["steps"]
    assert 2 <= steps <= 3 and len(record["gains"]) == steps
    half = 0.001 * len(split)  # half the tolerance, in nats
    assert steps == 3 or max(record["gains"][-2:]) < half  # the steps end after two in a row that gain less
    assert all(max(pair) >= half for pair in zip(record["gains"][:-2], record["gains"][1:-1]))  # ... and not before
    assert record["gains"][0] > 0
    verdict = _config(polish=3).verdict
    before_elbo = fixed_noise_elbo(model, plain_guide, split, num_draws=64, seed=7)
    for index in range(steps):  # by hand, from the unpolished fit
        step = line_search_gain(model, plain_guide, split, seed=verdict.seed + POLISH_SEED_OFFSET + 1000 * 6 + index, keep_posterior=True)
        assert step.nats == pytest.approx(record["gains"][index], rel=1e-9, abs=1e-12)
        if step.nats > 0:
            start_from_posterior(plain_guide, step.posterior)
    for (name, a), (_, b) in zip(guide.named_parameters(), plain_guide.named_parameters()):
        assert torch.allclose(a, b, rtol=0, atol=1e-12), name
    assert fixed_noise_elbo(model, guide, split, num_draws=64, seed=7) > before_elbo
    again = judge_by(model, guide, split, verdict, verdict.seed + POLISHED_JUDGEMENT_SEED_OFFSET + 6)
    assert again["gain_upper_per_datum"] == pytest.approx(polished["gain_upper_per_datum"], rel=1e-9)
    assert again["converged"] == polished["converged"]


def test_a_fit_resumed_across_the_steps_is_bit_identical(single_torch_thread):
    """With one overrule left after the steps, the fit goes on (restarted) from the polished
    posterior and is judged and polished again at its next stop; resumed from the checkpoint
    before the first steps (epoch 6, judged at the top of the next epoch) or before the second
    (epoch 7), it ends as the uninterrupted fit does."""
    config = _config(polish=2, overrules=1, tol=1e-6)
    states = {}
    model, guide = fresh_model_and_guide(SIZES, prior=GaussianPrior(1.0))
    identities, moved = [], []
    before = {}

    def watch(diagnostics) -> None:  # the epochs after the steps move the guide's own parameters (those Adam holds)
        identities.append({name: id(p) for name, p in guide.named_parameters()})
        moved.append(any(not torch.equal(p, before[name]) for name, p in guide.named_parameters()) if before else True)
        before.update({name: p.detach().clone() for name, p in guide.named_parameters()})

    records = train(model, guide, six_feature_split(), config, on_epoch=watch,
                    on_checkpoint=lambda state: states.__setitem__(state.epoch, state)).to_records()
    assert all(ids == identities[0] for ids in identities) and identities[0] == {name: id(p) for name, p in guide.named_parameters()}
    assert all(moved)
    assert "polish" in records[5]["verdict"] and len(records) == 7 and "polish" in records[-1]["verdict"]
    for epoch in (6, 7):
        buffer = io.BytesIO()
        torch.save(states[epoch].to_dict(), buffer)
        buffer.seek(0)
        _, resumed_guide, resumed = _fit(config, resume=TrainState.from_dict(torch.load(buffer, weights_only=True)))
        assert [{k: v for k, v in r.items() if k != "seconds"} for r in resumed] == [{k: v for k, v in r.items() if k != "seconds"} for r in records]
        for (name, a), (_, b) in zip(guide.named_parameters(), resumed_guide.named_parameters()):
            assert torch.equal(a, b), (epoch, name)


def test_polish_steps_are_checked_and_reach_b_s_recipe_from_the_cli_not_q_a_s():
    with pytest.raises(ValueError, match="polish_steps must be an integer >= 0, got -1"):
        VerdictConfig(polish_steps=-1)
    with pytest.raises(ValueError, match="polish-steps-b must be an integer >= 0, got 2.5"):
        ExperimentConfig(polish_steps_b=2.5)
    with pytest.raises(ValueError, match="polish-steps-b acts where the verdict rejects B's fits by the rule .*with fit-b 'fixed'"):
        ExperimentConfig(polish_steps_b=3)
    config = config_from_args(build_parser().parse_args(["--fit-b", "rule", "--polish-steps-b", "30"]))
    assert config.polish_steps_b == 30 and config.recipe_b_converged(300).verdict.polish_steps == 30
    assert config.recipe_a().verdict.polish_steps == 0
    assert "polish_steps_b" not in ExperimentConfig().to_dict()  # runs stored before it existed still resume


def test_one_vectorised_pass_of_d_draws_is_distributed_as_the_mean_of_d_estimates(single_torch_thread):
    """``elbo_gradient(draws=4)`` (the fast polishing step's mean gradient): over many seeds its
    mean matches that of single-draw estimates and its variance is about a quarter of theirs;
    chunked finely (batch_size 2: chunks of no example would be wrong) it is the same draws."""
    from pyro_bbt.elbo_gradient import elbo_gradient

    split = six_feature_split()
    model, guide = fresh_model_and_guide(SIZES, prior=GaussianPrior(1.0))
    train(model, guide, split, stopped_at(3, 200, None))  # a posterior off its initialisation

    def sample(draws: int, count: int) -> torch.Tensor:
        return torch.stack([elbo_gradient(model, guide, split, seed=s, draws=draws).grads["layers.0.weight"][0].flatten() for s in range(count)])
    single, batched = sample(1, 400), sample(4, 400)
    se = (single.var(0) / 400 + batched.var(0) / 400).sqrt()
    assert ((single.mean(0) - batched.mean(0)).abs() <= 4 * se + 1e-9).float().mean() >= 0.95
    ratio = float(batched.var(0).sum() / single.var(0).sum())
    assert 0.15 < ratio < 0.4, ratio  # 1/4
    fine = elbo_gradient(model, guide, split, seed=3, draws=4, batch_size=2)  # chunks of one example (2 // 4 rounds to 0)
    assert fine.grads["layers.0.weight"][0].numel() == single.shape[1] and bool(fine.grads["layers.0.weight"][0].isfinite().all())
    with pytest.raises(ValueError, match="draws must be an integer >= 1"):
        elbo_gradient(model, guide, split, draws=0)


def test_the_whitening_stops_at_its_residual_and_gives_the_direction_within_it(single_torch_thread):
    """``whitened_direction(tol=...)``: 1e-3 gives the 200-iteration direction to within about
    1e-3 in every layer; a loose tolerance (0.5) stops early and is measurably off."""
    from pyro_bbt.elbo_gradient import elbo_gradients, natural_direction, whitened_direction

    split = six_feature_split()
    model, guide = fresh_model_and_guide((6, 16, 16, 3), prior=GaussianPrior(0.3))
    train(model, guide, split, stopped_at(4, 200, None))
    gradients = elbo_gradients(model, guide, split, 4, 64, 0)
    posterior, natural = gradients[0].posterior, natural_direction(gradients)
    exact = whitened_direction(model, posterior, natural, split, iterations=200)

    def error(direction) -> float:
        return max(float((direction[k][0] - exact[k][0]).norm() / exact[k][0].norm()) for k in exact if k.endswith("weight"))
    assert error(whitened_direction(model, posterior, natural, split, tol=1e-3)) < 1e-2
    assert error(whitened_direction(model, posterior, natural, split, tol=0.5)) > error(whitened_direction(model, posterior, natural, split, tol=1e-6))


def test_a_fast_polished_fit_takes_the_steps_and_records_them(single_torch_thread):
    """``fast_polish``: the rejected fit still takes the verdict's steps, which still raise the
    fixed-noise ELBO, and the record is as without it (steps, gains, the judgement after);
    the field reaches B's recipe from the CLI only with polishing steps, and a stored run's
    configuration without it still resumes."""
    from dataclasses import replace

    split = six_feature_split()
    plain_model, plain_guide, plain = _fit(_config(polish=0))
    config = _config(polish=3)
    fast = replace(config, verdict=replace(config.verdict, fast_polish=True))
    model, guide, records = _fit(fast)
    record = records[-1]["verdict"]["polish"]
    assert record["steps"] >= 2 and record["gains"][0] > 0 and set(records[-1]["verdict"]) == set(_fit(config)[2][-1]["verdict"])
    assert fixed_noise_elbo(model, guide, split, num_draws=64, seed=7) > fixed_noise_elbo(plain_model, plain_guide, split, num_draws=64, seed=7)
    with pytest.raises(ValueError, match="fast_polish must be true or false"):
        VerdictConfig(fast_polish=1)
    with pytest.raises(ValueError, match="fast-polish .* needs polish-steps-b >= 1"):
        ExperimentConfig(fit_b="rule", fast_polish=True)
    args = ["--fit-b", "rule", "--polish-steps-b", "30", "--fast-polish"]
    config = config_from_args(build_parser().parse_args(args))
    assert config.recipe_b_converged(300).verdict.fast_polish is True and config.recipe_a().verdict.fast_polish is False
    assert "fast_polish" not in ExperimentConfig().to_dict()
