"""The verdict's continuation (VerdictConfig.continuation_epochs): a pass counts only when the fit,
continued at fixed fractions of its first rates, raises its fixed-noise ELBO by at most the
tolerance; the continuation's epochs are in the history, its state survives a checkpoint, and the
cap ends a fit in the middle of one unconverged."""

from __future__ import annotations

import io
from dataclasses import asdict, replace
from pathlib import Path

import pytest
import torch

from conftest import fresh_model_and_guide, six_feature_split, stopped_at
from pyro_bbt.convergence import continuation_text
from pyro_bbt.elbo_gradient import read_posterior
from pyro_bbt.experiment import LATER_FIELDS, ExperimentConfig
from pyro_bbt.fixed_noise import ADDED_DRAWS_STDERR_FRACTION, _round_seed, continuation_gain
from pyro_bbt.inference import TrainConfig, TrainState, train
from pyro_bbt.priors import GaussianPrior
from pyro_bbt.runstore import RunStore, config_differences
from pyro_bbt.transfer import build_parser, config_from_args
from pyro_bbt.verdict import VerdictConfig

SIZES = (6, 8, 3)


_data = six_feature_split


def _config(stop_at: int, cap: int, tol: float, average: bool = False) -> TrainConfig:
    """The rule stops at ``stop_at`` (its criteria always hold), the verdict's line search judges
    there, and a pass is continued for as many epochs as the fit has had (fraction 1)."""
    verdict = VerdictConfig(tol_per_datum=tol, continuation_epochs=4, continuation_fraction=1.0, max_overrules=0, continuation_average=average)
    return stopped_at(stop_at, cap, verdict)


def _fit(config: TrainConfig, **kwargs):
    model, guide = fresh_model_and_guide(SIZES, prior=GaussianPrior(1.0))
    records = train(model, guide, _data(), config, **kwargs).to_records()
    return model, guide, records


def test_a_pass_is_continued_at_fixed_fractions_of_the_first_rates_and_scored_with_common_noise(single_torch_thread):
    """Stopped at epoch 20, the line search passes (tol 0.05); 20 more epochs at 0.3 then 0.1
    times the first rates raise the ELBO by less than the tolerance: converged, and the record
    says by how much, measured again here with the same draws."""
    config = _config(stop_at=20, cap=200, tol=0.05)
    model, guide, records = _fit(config)
    assert len(records) == 40
    assert [r["phase"] for r in records] == ["fit"] * 20 + ["continuation"] * 20
    assert [r["lr_scale"] for r in records[20:]] == [0.3] * 10 + [0.1] * 10
    assert records[19]["verdict"]["converged"] is True and "continuation" not in records[19]["verdict"]
    last = records[-1]["verdict"]
    gain = last["continuation"]
    assert last["converged"] is True and last["gain_upper_per_datum"] <= 0.05
    assert (gain["epochs"], gain["factors"], gain["start_epoch"], gain["num_data"]) == (20, [0.3, 0.1], 20, 200)
    assert 0 < gain["upper_per_datum"] <= 0.05 and gain["stderr"] > 0
    assert gain["upper_per_datum"] == pytest.approx((gain["nats"] + 2 * gain["stderr"]) / 200)
    assert continuation_text(last) == f"{gain['per_datum']:+.2g} ± {gain['stderr'] / 200:.1g} /example over 20 epochs (floor {last['floor']['per_datum']:+.2g})"
    assert continuation_text(records[19]["verdict"]) == "—"
    # the end kept (the ELBO rose): the guide's posterior is the end's, and the evaluator agrees
    assert gain["kept"] == "end" and gain["nats"] > 0
    start = _fit(_config(stop_at=20, cap=20, tol=0.05))[1]
    again = continuation_gain(model, read_posterior(start), read_posterior(guide), _data(), num_draws=8,
                              seed=config.verdict.seed + 2 * 1_000_003 + 20, batch_size=config.verdict.batch_size)
    assert again.nats == pytest.approx(gain["nats"], rel=1e-9) and again.end_elbo == pytest.approx(gain["end_elbo"], rel=1e-9)


def test_a_continuation_that_still_gains_overrules_a_pass_and_the_cap_ends_the_next_one_unconverged(single_torch_thread):
    """Stopped at epoch 10, the line search passes at tol 0.04 (a step gains less than that), but
    10 more epochs at fixed rates gain more: not converged. The next continuation (20 epochs,
    fraction 1 of 20) starts at once and the cap of 30 ends it halfway: not converged, saying so."""
    _, _, records = _fit(_config(stop_at=10, cap=30, tol=0.04))
    assert len(records) == 30 and [r["phase"] for r in records] == ["fit"] * 10 + ["continuation"] * 20
    assert records[9]["verdict"]["converged"] is True and records[9]["verdict"]["gain_upper_per_datum"] <= 0.04
    rejected = records[19]["verdict"]
    assert rejected["converged"] is False and rejected["continuation"]["upper_per_datum"] > 0.04
    assert "10 more epochs at 0.3, 0.1 x the first rates still raised the fixed-noise ELBO" in rejected["reasons"][0]
    assert [r["lr_scale"] for r in records[20:]] == [0.3] * 10  # the second continuation: 20 epochs, cut at its half
    last = records[-1]["verdict"]
    assert last["converged"] is False
    assert last["reasons"] == ["the fit reached its cap of 30 epochs 10 epochs into the 20-epoch continuation that confirms a pass"]


def test_the_continuation_after_one_that_gained_confirms_the_same_pass(single_torch_thread):
    """The fit above with room to go on: the second continuation (epochs 20-40) gains less than
    the tolerance, so the pass at epoch 10 is confirmed at epoch 40, although the record at epoch
    20 (the second continuation's start) is the first continuation's rejection."""
    _, guide, records = _fit(_config(stop_at=10, cap=200, tol=0.04))
    assert len(records) == 40 and [r["phase"] for r in records] == ["fit"] * 10 + ["continuation"] * 30
    assert records[19]["verdict"]["converged"] is False
    last = records[-1]["verdict"]
    gain = last["continuation"]
    assert (gain["start_epoch"], gain["epochs"]) == (20, 20) and gain["upper_per_datum"] <= 0.04
    assert last["converged"] is True and last["reasons"] == records[9]["verdict"]["reasons"]
    assert last["gain_upper_per_datum"] == records[9]["verdict"]["gain_upper_per_datum"]


def _checked(checks: int, **kwargs) -> TrainConfig:
    config = _config(**kwargs)
    return replace(config, verdict=replace(config.verdict, continuation_checks=checks))


def _strip(records):
    return [{k: v for k, v in r.items() if k != "seconds"} for r in records]


def test_a_continuation_that_has_certainly_gained_is_rejected_on_the_way_and_the_next_starts_there(single_torch_thread):
    """The fit of the test above, its continuations scored on the way in their part at the last
    rate (the first continuation, epochs 11-20, at 0.1 from epoch 16: once, after 9 of its 10
    epochs, every ``max(ceil(5 / 4), 4) = 4``): it is rejected at epoch 19, where the lower bound
    of its gain already exceeds the tolerance; the next continuation starts there, as long as the
    fit so far (19, rounded up to 20 epochs), passes, and confirms the pass of epoch 10 at epoch 39
    instead of 40. The rejection's numbers are the evaluator's, measured again here; a rejection
    needs the *lower* bound above the tolerance."""
    tol = 0.04
    model, guide, records = _fit(_checked(3, stop_at=10, cap=200, tol=tol))
    plain = _fit(_config(stop_at=10, cap=200, tol=tol))[2]
    assert len(plain) == 40 and len(records) == 39
    assert VerdictConfig(continuation_epochs=4, continuation_checks=3).check_epochs(10) == (9,)
    judged = {i + 1: r["verdict"] for i, r in enumerate(records) if r["verdict"] is not None}
    assert sorted(judged) == [10, 19, 39]
    rejection = judged[19]
    gain = rejection["continuation"]
    assert rejection["converged"] is False and gain["rejected_on_the_way"] is True
    assert (gain["start_epoch"], gain["epochs"], gain["planned_epochs"], gain["kept"]) == (10, 9, 10, "end")
    assert (gain["nats"] - 2 * gain["stderr"]) / gain["num_data"] > tol
    assert "9 of the continuation's 10 epochs already raised the fixed-noise ELBO" in rejection["reasons"][0]
    # the rejected continuation ran at 0.3 for 5 epochs and at 0.1 for 4; the next one: 20 epochs
    # from epoch 19, at 0.3 then 0.1, and it confirms the pass of epoch 10
    assert [r["lr_scale"] for r in records[10:]] == [0.3] * 5 + [0.1] * 4 + [0.3] * 10 + [0.1] * 10
    last = judged[39]
    assert last["converged"] is True and (last["continuation"]["start_epoch"], last["continuation"]["epochs"]) == (19, 20)
    assert "rejected_on_the_way" not in last["continuation"] and last["reasons"] == judged[10]["reasons"]
    # the evaluator agrees: the posterior at epoch 19 against the one at epoch 10, with the continuation's draws
    start = _fit(_config(stop_at=10, cap=10, tol=tol))[1]
    at_19 = _fit(_checked(3, stop_at=10, cap=19, tol=tol))[1]
    again = continuation_gain(model, read_posterior(start), read_posterior(at_19), _data(), num_draws=8,
                              seed=0 + 2 * 1_000_003 + 10, batch_size=VerdictConfig().batch_size)
    assert again.nats == pytest.approx(gain["nats"], rel=1e-9) and again.stderr == pytest.approx(gain["stderr"], rel=1e-9)


def test_checks_that_reject_nothing_leave_the_fit_as_it_was(single_torch_thread):
    """Where no check finds a certain gain above the tolerance (tol 0.05: the fit of the first
    test), scoring on the way changes nothing: the same records and the same posterior as
    without checks (the evaluator draws from its own generator)."""
    _, guide, records = _fit(_checked(3, stop_at=20, cap=200, tol=0.05))
    _, plain_guide, plain = _fit(_config(stop_at=20, cap=200, tol=0.05))
    assert _strip(records) == _strip(plain) and len(records) == 40
    for (name, a), (_, b) in zip(guide.named_parameters(), plain_guide.named_parameters()):
        assert torch.equal(a, b), name


def test_a_fit_resumed_at_a_check_is_bit_identical(single_torch_thread):
    """Interrupted after epoch 19 (the rejection is judged at the top of the next epoch, so the
    checkpoint holds the continuation that is about to be rejected), or before or after it,
    resumed: the same records and posterior as the uninterrupted fit."""
    config = _checked(3, stop_at=10, cap=200, tol=0.04)
    states = {}
    _, guide, records = _fit(config, on_checkpoint=lambda state: states.__setitem__(state.epoch, state))
    for epoch in (15, 19, 25):
        buffer = io.BytesIO()
        torch.save(states[epoch].to_dict(), buffer)
        buffer.seek(0)
        _, resumed_guide, resumed = _fit(config, resume=TrainState.from_dict(torch.load(buffer, weights_only=True)))
        assert _strip(resumed) == _strip(records), epoch
        for (name, a), (_, b) in zip(guide.named_parameters(), resumed_guide.named_parameters()):
            assert torch.equal(a, b), (epoch, name)


def test_continuation_checks_are_checked_and_reach_the_verdict_from_the_cli():
    assert VerdictConfig(continuation_epochs=4).check_epochs(10) == ()
    checked = VerdictConfig(continuation_epochs=4, continuation_checks=3)
    assert [checked.check_epochs(n) for n in (10, 40, 400, 4)] == [(9,), (25, 30, 35), (250, 300, 350), ()]
    assert VerdictConfig(continuation_epochs=4, continuation_checks=1, continuation_rates=(1.0,)).check_epochs(40) == (20,)
    with pytest.raises(ValueError, match="continuation_checks must be an integer >= 0, got -1"):
        VerdictConfig(continuation_epochs=4, continuation_checks=-1)
    with pytest.raises(ValueError, match="continuation_checks needs continuation_epochs >= 1"):
        VerdictConfig(continuation_checks=2)
    with pytest.raises(ValueError, match="continuation_checks cannot be combined with continuation_average"):
        VerdictConfig(continuation_epochs=4, continuation_checks=2, continuation_average=True)
    with pytest.raises(ValueError, match="continuation-checks must be an integer >= 0, got 1.5"):
        ExperimentConfig(continuation_epochs=4, continuation_checks=1.5)
    with pytest.raises(ValueError, match="continuation-checks needs continuation-epochs >= 1"):
        ExperimentConfig(continuation_checks=2)
    config = config_from_args(build_parser().parse_args(["--continuation-epochs", "10", "--continuation-checks", "3"]))
    assert config.continuation_checks == 3 and config.recipe_a().verdict.continuation_checks == 3
    assert config.recipe_b_converged(300).verdict.continuation_checks == 3
    assert "continuation_checks" not in ExperimentConfig(continuation_epochs=10).to_dict()


def test_a_fit_resumed_inside_a_continuation_is_bit_identical(single_torch_thread):
    config = _config(stop_at=10, cap=30, tol=0.04)
    states = {}
    _, guide, records = _fit(config, on_checkpoint=lambda state: states.__setitem__(state.epoch, state))
    state = states[15]
    assert state.continuation is not None and state.continuation["start_epoch"] == 10 and state.continuation["epochs"] == 10
    buffer = io.BytesIO()  # through a checkpoint file, loaded as untrusted
    torch.save(state.to_dict(), buffer)
    buffer.seek(0)
    restored = TrainState.from_dict(torch.load(buffer, weights_only=True))
    _, resumed_guide, resumed = _fit(config, resume=restored)

    def strip(rs):
        return [{k: v for k, v in r.items() if k != "seconds"} for r in rs]

    assert strip(resumed) == strip(records)
    for (name, a), (_, b) in zip(guide.named_parameters(), resumed_guide.named_parameters()):
        assert torch.equal(a, b), name


def _fit_recording_states(config: TrainConfig, **kwargs):
    """:func:`_fit`, with the guide's parameters after every epoch."""
    model, guide = fresh_model_and_guide(SIZES, prior=GaussianPrior(1.0))
    states = []
    records = train(model, guide, _data(), config, on_epoch=lambda _: states.append({k: v.detach().clone() for k, v in guide.state_dict().items()}),
                    **kwargs).to_records()
    return model, guide, records, states


def test_an_averaged_continuation_ends_at_the_mean_of_its_epochs_at_the_last_rate(single_torch_thread):
    """With continuation_average the continuation after the pass at epoch 10 (epochs 11-20, at 0.3
    then 0.1 times the first rates) is scored, and kept, as the average of the guide's parameters
    after epochs 16-20 (the fixed-noise evaluator agrees), not as the last iterate (on this small,
    still-rising fit the average trails it)."""
    config = _config(stop_at=10, cap=200, tol=0.04, average=True)
    model, guide, records, states = _fit_recording_states(config)
    first = records[19]["verdict"]["continuation"]
    assert (first["start_epoch"], first["epochs"], first["averaged_epochs"]) == (10, 10, 5)
    tail = {k: sum(state[k] for state in states[15:20]) / 5 for k in states[0]}
    start = {k: v for k, v in states[9].items()}
    model2, guide2 = fresh_model_and_guide(SIZES, prior=GaussianPrior(1.0), initialize=True)
    seed = config.verdict.seed + 2 * 1_000_003 + 10
    guide2.load_state_dict(start)
    at_start = read_posterior(guide2)
    guide2.load_state_dict(tail)
    averaged = continuation_gain(model2, at_start, read_posterior(guide2), _data(), num_draws=8, seed=seed, batch_size=config.verdict.batch_size)
    assert averaged.nats == pytest.approx(first["nats"], rel=1e-6)
    guide2.load_state_dict(states[19])
    last = continuation_gain(model2, at_start, read_posterior(guide2), _data(), num_draws=8, seed=seed, batch_size=config.verdict.batch_size)
    assert averaged.nats != pytest.approx(last.nats, rel=1e-3)
    final = records[-1]["verdict"]
    if final["converged"] and final["continuation"]["kept"] == "end":  # the guide returned is the last continuation's average
        end, length = len(records), final["continuation"]["epochs"]
        half = length // 2
        mean = {k: sum(state[k] for state in states[end - half:end]) / half for k in states[0]}
        for name, value in guide.state_dict().items():
            assert torch.allclose(value, mean[name], rtol=0, atol=1e-6), name
    else:
        assert final["continuation"]["averaged_epochs"] > 0


def test_a_pass_reports_the_floor_its_last_iterate_carries_and_returns_that_iterate(single_torch_thread):
    """Without continuation_average the passing continuation (epochs 21-40) is kept as its last
    iterate, and its record adds ``floor``: what the average of its epochs at the last rate (31-40)
    would add, scored from the kept posterior with the continuation's draws and a seed of its own.
    The guide returned is the last iterate, not that average; an averaged continuation, whose end
    is the average, reports no floor."""
    config = _config(stop_at=20, cap=200, tol=0.05)
    model, guide, records, states = _fit_recording_states(config)
    final = records[-1]["verdict"]
    assert final["converged"] is True and final["continuation"]["kept"] == "end" and len(records) == 40
    floor = final["floor"]
    assert (floor["averaged_epochs"], floor["draws"]) == (10, 8) and floor["stderr"] > 0
    assert not any("floor" in (r["verdict"] or {}) for r in records[:-1])
    for name, value in guide.state_dict().items():
        assert torch.equal(value, states[-1][name]), name
    mean = {k: sum(state[k] for state in states[30:40]) / 10 for k in states[0]}
    model2, guide2 = fresh_model_and_guide(SIZES, prior=GaussianPrior(1.0), initialize=True)
    guide2.load_state_dict(states[-1])
    kept = read_posterior(guide2)
    guide2.load_state_dict(mean)
    again = continuation_gain(model2, kept, read_posterior(guide2), _data(), num_draws=8, seed=config.verdict.seed + 2 * 1_000_003 + 20 + 1,
                              batch_size=config.verdict.batch_size)
    assert again.nats == pytest.approx(floor["nats"], rel=1e-6) and floor["per_datum"] == pytest.approx(floor["nats"] / 200)
    averaged = _fit(_config(stop_at=20, cap=200, tol=0.05, average=True))[2]
    assert all("floor" not in (r["verdict"] or {}) for r in averaged)


def test_a_fit_resumed_while_it_averages_is_bit_identical(single_torch_thread):
    config = _config(stop_at=10, cap=30, tol=0.04, average=True)
    states = {}
    _, guide, records, _ = _fit_recording_states(config, on_checkpoint=lambda state: states.__setitem__(state.epoch, state))
    assert states[17].continuation["average_count"] == 2 and "average_sum" not in states[15].continuation
    buffer = io.BytesIO()
    torch.save(states[17].to_dict(), buffer)
    buffer.seek(0)
    restored = TrainState.from_dict(torch.load(buffer, weights_only=True))
    _, resumed_guide, resumed, _ = _fit_recording_states(config, resume=restored)
    assert [{k: v for k, v in r.items() if k != "seconds"} for r in resumed] == [{k: v for k, v in r.items() if k != "seconds"} for r in records]
    for (name, a), (_, b) in zip(guide.named_parameters(), resumed_guide.named_parameters()):
        assert torch.equal(a, b), name


def test_continuation_settings_are_checked_and_reach_the_fit_from_the_experiment():
    assert VerdictConfig(continuation_epochs=5, continuation_fraction=0.5).continuation_length(31) == 16  # ceil(15.5) to a multiple of 2
    assert VerdictConfig(continuation_epochs=5).continuation_length(100) == 6
    assert VerdictConfig(continuation_epochs=3, continuation_rates=(0.2, 0.1, 0.05)).continuation_length(1) == 3
    with pytest.raises(ValueError, match="continuation_epochs must be an integer >= 0, got -1"):
        VerdictConfig(continuation_epochs=-1)
    with pytest.raises(ValueError, match="continuation_fraction needs continuation_epochs >= 1"):
        VerdictConfig(continuation_fraction=1.0)
    with pytest.raises(ValueError, match=r"continuation_rates must be a non-empty sequence of numbers > 0 .*got \(0.3, 0\)"):
        VerdictConfig(continuation_epochs=2, continuation_rates=(0.3, 0))
    with pytest.raises(ValueError, match="continuation_draws must be an integer >= 2, got 1"):
        VerdictConfig(continuation_draws=1)
    with pytest.raises(ValueError, match="continuation-fraction 1.0 needs continuation-epochs >= 1"):
        ExperimentConfig(continuation_fraction=1.0)
    verdict = ExperimentConfig(continuation_epochs=20, continuation_fraction=1.0).recipe_a().verdict
    assert (verdict.continuation_epochs, verdict.continuation_fraction) == (20, 1.0)
    config = config_from_args(build_parser().parse_args(["--continuation-epochs", "10", "--continuation-fraction", "0.5"]))
    assert (config.continuation_epochs, config.continuation_fraction) == (10, 0.5)
    assert config.recipe_b_converged(300).verdict.continuation_length(40) == 20
    assert config.recipe_a().verdict.continuation_average is False
    averaged = config_from_args(build_parser().parse_args(["--continuation-epochs", "10", "--continuation-average"]))
    assert averaged.continuation_average is True and averaged.recipe_a().verdict.continuation_average is True
    with pytest.raises(ValueError, match="continuation_average must be true or false, got 1"):
        VerdictConfig(continuation_epochs=2, continuation_average=1)
    with pytest.raises(ValueError, match="continuation_average needs continuation_epochs >= 1"):
        VerdictConfig(continuation_average=True)
    with pytest.raises(ValueError, match="continuation-average needs continuation-epochs >= 1"):
        ExperimentConfig(continuation_average=True)
    one_rate = config_from_args(build_parser().parse_args(["--continuation-epochs", "10", "--continuation-rates", "1"]))
    assert one_rate.continuation_rates == (1.0,) and one_rate.recipe_a().verdict.continuation_rates == (1.0,)
    assert one_rate.recipe_a().verdict.continuation_length(7) == 10
    with pytest.raises(ValueError, match=r"continuation-rates must be one or more numbers > 0 .*got \(0.3, -1\)"):
        ExperimentConfig(continuation_epochs=5, continuation_rates=(0.3, -1))


def test_runs_stored_before_the_continuation_still_match_their_configuration():
    """A config without a continuation is written without its fields, as every run stored before
    they existed was: same config.json, same store hash, --resume accepts it; one with a
    continuation names it as the difference."""
    plain = ExperimentConfig()
    later = ("continuation_epochs", "continuation_fraction", "continuation_average", "continuation_rates", "ewc_patience", "continuation_base", "kl_beta",
             "batch_size_b", "continuation_checks", "polish_steps_b", "continuation_max_draws", "rescore_max_draws", "checkpoint_seconds", "continuation_particles_b", "fast_polish", "compile", "precondition_b")
    assert set(later) == set(LATER_FIELDS) and not set(later) & set(plain.to_dict())
    assert ExperimentConfig(**plain.to_dict()) == plain
    stored = {k: v for k, v in asdict(plain).items() if k not in later}  # an old run's config.json
    assert config_differences(stored, plain.to_dict()) == []
    assert RunStore(Path("unused"), stored).hash == RunStore(Path("unused"), plain.to_dict()).hash
    continued = ExperimentConfig(continuation_epochs=20)
    assert config_differences(stored, continued.to_dict()) == ["continuation_epochs: None -> 20"]
    assert ExperimentConfig(**continued.to_dict()) == continued
    averaged = ExperimentConfig(continuation_epochs=20, continuation_average=True, continuation_rates=[1])  # as JSON gives it back
    assert averaged.to_dict()["continuation_rates"] == (1.0,) and ExperimentConfig(**averaged.to_dict()) == averaged


def test_a_continuation_base_sets_the_continuation_rates_whatever_the_fit_started_at(single_torch_thread):
    """With ``continuation_base`` the continuation runs at its factors times the base rates
    (locations, widths), read off the optimiser's checkpointed state, for two fits started at
    different rates: the confirmation no longer depends on the recipe. The record and a rejection
    name the base."""
    base = (3e-2, 9e-2)
    seen = {}
    for lr in (5e-2, 3e-2):
        config = _config(stop_at=10, cap=30, tol=0.04)
        config = replace(config, lr=lr, scale_lr=3 * lr, verdict=replace(config.verdict, continuation_base=base))
        rates = {}
        _, _, records = _fit(config, on_checkpoint=lambda state: rates.__setitem__(state.epoch, [g["lr"] for g in state.optim_state["param_groups"]]))
        assert [r["phase"] for r in records[:20]] == ["fit"] * 10 + ["continuation"] * 10
        assert rates[10] == pytest.approx([lr, 3 * lr])  # the fit's own rates until its pass (epoch 10)
        assert rates[15] == pytest.approx([0.3 * base[0], 0.3 * base[1]]) and rates[20] == pytest.approx([0.1 * base[0], 0.1 * base[1]])
        gain = records[19]["verdict"]["continuation"]
        assert gain["base"] == list(base) and gain["factors"] == [0.3, 0.1]
        seen[lr] = records[19]["verdict"]
    rejected = [v for v in seen.values() if not v["converged"]]
    assert rejected and all("x the rates 0.03 (locations), 0.09 (widths) still raised" in v["reasons"][0] for v in rejected)
    with pytest.raises(ValueError, match=r"continuation_base must be two numbers > 0 .*got \(0.01, 0\)"):
        VerdictConfig(continuation_epochs=2, continuation_base=(0.01, 0))


def test_the_continuation_base_is_a_later_field_and_a_cli_flag():
    """Absent from a configuration's record at None (runs stored before it keep their hash), set
    by the paper preset to its own first rates, and refused in one line when malformed."""
    assert "continuation_base" not in ExperimentConfig().to_dict()
    paper = config_from_args(build_parser().parse_args(["--preset", "paper"]))
    assert paper.continuation_base == (1e-2, 3e-2) == (paper.lr_a, paper.scale_lr)
    assert paper.recipe_a().verdict.continuation_base == (1e-2, 3e-2)
    assert ExperimentConfig(**paper.to_dict()) == paper
    off = config_from_args(build_parser().parse_args(["--preset", "paper", "--continuation-base", "none"]))
    assert off.continuation_base is None
    with pytest.raises(ValueError, match=r"continuation-base must be none or two numbers > 0 .*got \(1.0, 2.0, 3.0\)"):
        config_from_args(build_parser().parse_args(["--preset", "paper", "--continuation-base", "1,2,3"]))


def _start_and_widened():
    """A fitted posterior and the same with every width doubled: the ELBO falls, and the paired
    difference is noisy (the draws at the wide end scatter)."""
    model, guide, _ = _fit(_config(stop_at=10, cap=10, tol=0.05))
    start = read_posterior(guide)
    return model, start, {name: (loc, 2 * scale) for name, (loc, scale) in start.items()}


def test_added_draws_pool_with_the_first_until_the_score_can_decide(single_torch_thread):
    """continuation_gain(max_draws=D): undecided at 8 draws (the ELBO fell, so the lower bound is
    below any tolerance, and two standard errors exceed half of it), draws are added, doubling,
    pooled with the first 8 (common noise for start and end), until the standard error is a
    quarter of the tolerance in nats or D is spent; without max_draws the score is the old one."""
    model, start, end = _start_and_widened()
    data = _data()
    plain = continuation_gain(model, start, end, data, num_draws=8, seed=5)
    assert plain.nats < 0 and plain.draws is None and "draws" not in plain.to_dict()
    off = continuation_gain(model, start, end, data, num_draws=8, seed=5, max_draws=0, tol_per_datum=0.01)
    assert off == plain
    tol = 2 * plain.stderr / len(data)  # two standard errors at 8 draws = the whole tolerance: undecided
    added = continuation_gain(model, start, end, data, num_draws=8, seed=5, max_draws=256, tol_per_datum=tol)
    assert added.draws in (16, 32, 64, 128, 256) and added.to_dict()["draws"] == added.draws
    assert added.stderr <= ADDED_DRAWS_STDERR_FRACTION * tol * len(data) or added.draws == 256
    assert added.stderr < plain.stderr
    # the pooled score is the mean over the rounds: the first 8 draws, then 8 of the second round's own noise
    sixteen = continuation_gain(model, start, end, data, num_draws=8, seed=5, max_draws=16, tol_per_datum=tol / 100)
    second = continuation_gain(model, start, end, data, num_draws=8, seed=_round_seed(5, 1))
    assert sixteen.draws == 16 and sixteen.nats == pytest.approx((plain.nats + second.nats) / 2, rel=1e-12)
    assert sixteen.start_elbo == pytest.approx((plain.start_elbo + second.start_elbo) / 2, rel=1e-12)
    # capped: the cap is the number of draws whatever the noise
    assert continuation_gain(model, start, end, data, num_draws=8, seed=5, max_draws=24, tol_per_datum=tol / 100).draws == 24


def test_added_draws_stop_at_once_where_the_first_score_decides(single_torch_thread):
    """A continuation that certainly gained more than the tolerance (its lower bound above it) is
    rejected on its first 8 draws, and one scored precisely enough for a wide tolerance is decided
    there too: no draws are added to either."""
    model, start, end = _start_and_widened()
    data = _data()
    worse_to_better = continuation_gain(model, end, start, data, num_draws=8, seed=5)  # the ELBO rose by about 58 nats
    tol_below = (worse_to_better.nats - 2 * worse_to_better.stderr) / len(data) / 2
    rejected = continuation_gain(model, end, start, data, num_draws=8, seed=5, max_draws=256, tol_per_datum=tol_below)
    assert rejected.draws == 8 and rejected.nats == worse_to_better.nats
    wide = 8 * worse_to_better.stderr / len(data) + worse_to_better.per_datum  # stderr <= a quarter of it already
    assert continuation_gain(model, end, start, data, num_draws=8, seed=5, max_draws=256, tol_per_datum=wide).draws == 8
    with pytest.raises(ValueError, match="tol_per_datum must be a finite number > 0, got None"):
        continuation_gain(model, end, start, data, num_draws=8, seed=5, max_draws=256)


def test_added_draws_are_checked_reach_the_verdict_from_the_cli_and_are_recorded(single_torch_thread):
    with pytest.raises(ValueError, match="continuation_max_draws must be an integer >= 0, got -8"):
        VerdictConfig(continuation_epochs=4, continuation_max_draws=-8)
    with pytest.raises(ValueError, match=r"continuation_max_draws must be 0 \(off\) or at least continuation_draws \(8\), got 4"):
        VerdictConfig(continuation_epochs=4, continuation_max_draws=4)
    with pytest.raises(ValueError, match="continuation_max_draws needs continuation_epochs >= 1"):
        VerdictConfig(continuation_max_draws=64)
    with pytest.raises(ValueError, match=r"rescore_max_draws must be 0 \(off\) or at least 8 \(the draws of the best step's own score\), got 2"):
        VerdictConfig(rescore_max_draws=2)
    with pytest.raises(ValueError, match="continuation-max-draws must be an integer >= 0, got 'many'"):
        ExperimentConfig(continuation_epochs=4, continuation_max_draws="many")
    with pytest.raises(ValueError, match="continuation-max-draws needs continuation-epochs >= 1"):
        ExperimentConfig(continuation_max_draws=64)
    with pytest.raises(ValueError, match=r"rescore-max-draws must be 0 \(off\) or at least 8 \(the draws its score starts from\), got 3"):
        ExperimentConfig(rescore_max_draws=3)
    config = config_from_args(build_parser().parse_args(["--continuation-epochs", "10", "--continuation-max-draws", "256", "--rescore-max-draws", "64"]))
    assert (config.continuation_max_draws, config.rescore_max_draws) == (256, 64)
    for verdict in (config.recipe_a().verdict, config.recipe_b_converged(300).verdict):
        assert (verdict.continuation_max_draws, verdict.rescore_max_draws) == (256, 64)
    assert not {"continuation_max_draws", "rescore_max_draws"} & set(ExperimentConfig(continuation_epochs=10).to_dict())
    # in a fit: the line search's best step is scored again, and the continuation's record says how many draws scored it
    verdict = VerdictConfig(tol_per_datum=0.05, continuation_epochs=4, continuation_fraction=1.0, max_overrules=0, continuation_max_draws=64,
                            rescore_max_draws=32)
    _, _, records = _fit(stopped_at(20, 200, verdict))
    judged = [r["verdict"] for r in records if r.get("verdict")]
    gains = [v["continuation"] for v in judged if "continuation" in v]
    assert gains and all(g["draws"] in (8, 16, 32, 64) for g in gains)
    assert all(g["stderr"] <= ADDED_DRAWS_STDERR_FRACTION * 0.05 * 200 or g["draws"] == 64
               or (g["nats"] - 2 * g["stderr"]) / 200 > 0.05 for g in gains)
    assert judged[0]["gain"]["rescored"]["draws"] in (0, 8, 16, 32)
    last = next(v for v in reversed(judged) if "continuation" in v)
    floor = f" (floor {last['floor']['per_datum']:+.2g})" if "floor" in last else ""
    assert continuation_text(last).endswith(f" over {last['continuation']['epochs']} epochs, {last['continuation']['draws']} draws{floor}")
    # off: no trace of either in the records
    _, _, plain = _fit(stopped_at(20, 200, replace(verdict, continuation_max_draws=0, rescore_max_draws=0)))
    assert all("draws" not in r["verdict"].get("continuation", {}) and "rescored" not in (r["verdict"]["gain"] or {})
               for r in plain if r.get("verdict"))


def test_continuation_particles_draw_more_weights_in_the_continuation_only(single_torch_thread):
    """With ``continuation_particles = 4`` the fit up to the pass is the one-draw fit, bit for bit;
    the continuation's epochs then take other steps (four draws each), and its record and text
    say so. A fit resumed inside such a continuation is bit-identical."""
    base = _config(stop_at=10, cap=30, tol=0.04)
    _, _, one = _fit(base)
    four_config = replace(base, verdict=replace(base.verdict, continuation_particles=4))
    states = {}
    _, guide, four = _fit(four_config, on_checkpoint=lambda state: states.__setitem__(state.epoch, state))
    assert _strip(four[:10]) == _strip(one[:10])  # the fit itself is untouched
    assert four[10]["phase"] == "continuation" and four[10]["elbo"] != one[10]["elbo"]
    gains = [r["verdict"]["continuation"] for r in four if r.get("verdict") and "continuation" in r["verdict"]]
    assert gains and all(g["particles"] == 4 for g in gains)
    assert all("particles" not in r["verdict"].get("continuation", {}) for r in one if r.get("verdict"))
    # unset, the continuation draws what the fit draws: with two draws per step it is the fit set to two explicitly
    _, _, two_default = _fit(replace(base, num_particles=2))
    _, _, two_explicit = _fit(replace(base, num_particles=2, verdict=replace(base.verdict, continuation_particles=2)))
    assert [r["elbo"] for r in two_default] == [r["elbo"] for r in two_explicit] and two_default[10]["elbo"] != one[10]["elbo"]
    assert continuation_text({"continuation": gains[-1]}).endswith(", 4 draws/step")
    restored = TrainState.from_dict(states[15].to_dict())
    _, resumed_guide, resumed = _fit(four_config, resume=restored)
    assert _strip(resumed) == _strip(four)
    for (name, a), (_, b) in zip(guide.named_parameters(), resumed_guide.named_parameters()):
        assert torch.equal(a, b), name


def test_continuation_particles_b_are_checked_b_only_and_reach_b_fits_from_the_cli():
    with pytest.raises(ValueError, match="continuation_particles must be an integer >= 1, got 0"):
        VerdictConfig(continuation_epochs=4, continuation_particles=0)
    with pytest.raises(ValueError, match="continuation_particles needs continuation_epochs >= 1"):
        VerdictConfig(continuation_particles=4)
    with pytest.raises(ValueError, match="continuation-particles-b must be an integer >= 1, got 1.5"):
        ExperimentConfig(fit_b="rule", continuation_epochs=4, continuation_particles_b=1.5)
    with pytest.raises(ValueError, match="continuation-particles-b 4 .*needs --fit-b rule and --continuation-epochs >= 1 .*got fit-b 'fixed'"):
        ExperimentConfig(continuation_epochs=4, continuation_particles_b=4)
    with pytest.raises(ValueError, match="continuation-particles-b 1 .*needs --fit-b rule"):
        ExperimentConfig(continuation_particles_b=1)
    config = config_from_args(build_parser().parse_args(["--fit-b", "rule", "--continuation-epochs", "10", "--continuation-particles-b", "4"]))
    assert config.continuation_particles_b == 4 and config.recipe_b_converged(300).verdict.continuation_particles == 4
    assert config.recipe_a().verdict.continuation_particles is None  # q_A draws its own: its stage does not depend on the flag
    assert "continuation_particles_b" not in ExperimentConfig().to_dict()
    unset = config_from_args(build_parser().parse_args(["--fit-b", "rule", "--continuation-epochs", "10", "--num-particles", "3"]))
    assert unset.continuation_particles_b is None and unset.recipe_b_converged(300).verdict.continuation_particles is None  # the fit's own 3
