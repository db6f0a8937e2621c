"""Tests for pyro_bbt.checkpoint (save / load of a fitted model) and TrainHistory files."""

import csv
import json
import math
import os

import pyro
import pytest
import torch

from conftest import synthetic_batch
from pyro_bbt.checkpoint import FORMAT_VERSION, load_checkpoint, save_checkpoint
from pyro_bbt.data import Split
from pyro_bbt.evaluation import evaluate, evaluate_posterior_mean, predictive_log_probs
from pyro_bbt.guides import GUIDES, GuideConfig, make_guide, posterior_loc_scale
from pyro_bbt.inference import EpochDiagnostics, TrainConfig, TrainHistory, train
from pyro_bbt.model import BayesianMLP
from pyro_bbt.objectives import WeightSamplingELBO
from pyro_bbt.priors import GaussianPrior, PerSitePrior, ScaleMixturePrior

pytestmark = pytest.mark.usefixtures("single_torch_thread")

SIZES = (20, 16, 3)
GUIDE_CONFIG = GuideConfig(init_scale=0.05, num_flows=2, rank=3)


def _data(n=48, seed=0):
    x, y = synthetic_batch(batch=n, features=SIZES[0], classes=SIZES[-1], seed=seed)
    return Split(x, y)


def _fit(name, prior=None, steps=4, seed=0):
    """A freshly trained (few steps: parameters moved off their initial values) model and guide."""
    pyro.clear_param_store()
    model = BayesianMLP(SIZES, prior)
    guide = make_guide(name, model, GUIDE_CONFIG)
    config = TrainConfig(steps=steps, batch_size=16, lr=0.05, progress=False, eval_samples=0, estimator="weights", seed=seed)
    train(model, guide, _data(), config)
    return model, guide


def _predictions(model, guide, x, y, mean=True):
    """Everything a checkpoint must reproduce exactly."""
    out = {}
    pyro.set_rng_seed(123)
    out["evaluate"] = evaluate(model, guide, x, y, num_samples=5)
    pyro.set_rng_seed(123)
    out["loss"] = float(WeightSamplingELBO(2, closed_form_kl=False)(model, guide, x, y, 100, 0.5).detach())
    if mean:
        means = {k: loc for k, (loc, _) in posterior_loc_scale(guide, model).items()}
        out["mean_log_probs"] = predictive_log_probs(model, means, x)
        out["posterior_mean"] = evaluate_posterior_mean(model, guide, x, y)
    return out


def _assert_same(a, b):
    assert a.keys() == b.keys()
    for key in a:
        if isinstance(a[key], torch.Tensor):
            assert torch.equal(a[key], b[key]), key
        else:
            assert a[key] == b[key], key


@pytest.mark.parametrize("name", GUIDES)
def test_round_trip_gives_identical_predictions(name, tmp_path):
    model, guide = _fit(name)
    x, y = synthetic_batch(batch=25, features=SIZES[0], seed=7)
    flows = name in ("planar", "iaf")  # their posterior mean is moment-matched from random draws
    before = _predictions(model, guide, x, y, mean=not flows)
    state_before = {k: v.detach().clone() for k, v in guide.state_dict().items()}
    path = tmp_path / "model.pt"
    save_checkpoint(path, model, guide, name, GUIDE_CONFIG, config={"lr": 0.05, "note": "test"})

    pyro.clear_param_store()
    loaded_model, loaded_guide, payload = load_checkpoint(path)
    assert loaded_model.sizes == SIZES
    assert payload["guide_name"] == name and payload["config"] == {"lr": 0.05, "note": "test"}
    state_after = loaded_guide.state_dict()
    assert state_before.keys() == state_after.keys()
    for key in state_before:
        assert torch.equal(state_before[key], state_after[key]), key
    _assert_same(before, _predictions(loaded_model, loaded_guide, x, y, mean=not flows))


def test_round_trip_with_a_per_site_prior(tmp_path):
    g = torch.Generator().manual_seed(1)
    shapes = BayesianMLP(SIZES).site_shapes
    first = [s for s in shapes if s.startswith("layers.0.")]
    locs = {s: 0.1 * torch.randn(shapes[s], generator=g) for s in first}
    scales = {s: 0.05 + torch.rand(shapes[s], generator=g) for s in first}
    prior = PerSitePrior(locs, scales, fallback=GaussianPrior(0.3, layer_scales={"layers.1": 0.7}))
    model, guide = _fit("meanfield", prior)
    x, y = synthetic_batch(batch=25, features=SIZES[0], seed=8)
    before = _predictions(model, guide, x, y)
    path = tmp_path / "persite.pt"
    save_checkpoint(path, model, guide, "meanfield", GUIDE_CONFIG)

    pyro.clear_param_store()
    loaded_model, loaded_guide, _ = load_checkpoint(path, expected_sizes=SIZES)
    loaded_prior = loaded_model.prior
    assert isinstance(loaded_prior, PerSitePrior)
    assert set(loaded_prior.sites) == set(first)
    for s in first:
        assert torch.equal(loaded_prior.loc(s), locs[s]) and torch.equal(loaded_prior.scale(s), scales[s])
    assert isinstance(loaded_prior.fallback, GaussianPrior)
    assert loaded_prior.fallback.describe() == prior.fallback.describe()
    _assert_same(before, _predictions(loaded_model, loaded_guide, x, y))


def test_round_trip_with_a_scale_mixture_prior(tmp_path):
    prior = ScaleMixturePrior(0.25, 1.5, math.exp(-4))
    model, guide = _fit("meanfield", prior)
    x, y = synthetic_batch(batch=25, features=SIZES[0], seed=9)
    before = _predictions(model, guide, x, y)
    save_checkpoint(tmp_path / "mix.pt", model, guide, "meanfield", GUIDE_CONFIG)
    pyro.clear_param_store()
    loaded_model, loaded_guide, _ = load_checkpoint(tmp_path / "mix.pt")
    assert loaded_model.prior.describe() == prior.describe()
    _assert_same(before, _predictions(loaded_model, loaded_guide, x, y))


def test_loading_overwrites_a_same_named_guide_in_memory(tmp_path):
    model, guide = _fit("meanfield", steps=3)
    x, y = synthetic_batch(batch=25, features=SIZES[0], seed=10)
    before = _predictions(model, guide, x, y)
    save_checkpoint(tmp_path / "a.pt", model, guide, "meanfield", GUIDE_CONFIG)
    # Keep training the in-memory guide (same param-store names), then load without clearing.
    train(model, guide, _data(seed=3), TrainConfig(steps=3, batch_size=16, lr=0.05, progress=False, eval_samples=0, seed=5))
    moved = _predictions(model, guide, x, y)
    assert not torch.equal(moved["mean_log_probs"], before["mean_log_probs"])
    loaded_model, loaded_guide, _ = load_checkpoint(tmp_path / "a.pt")
    _assert_same(before, _predictions(loaded_model, loaded_guide, x, y))


def test_checkpoint_is_plain_tensors_and_containers(tmp_path):
    model, guide = _fit("meanfield", steps=1)
    path = tmp_path / "sub" / "dir" / "m.pt"  # parent folders are created
    save_checkpoint(path, model, guide, "meanfield", GUIDE_CONFIG, config={"epochs": 3})
    payload = torch.load(path, weights_only=True)
    assert payload["format_version"] == FORMAT_VERSION
    assert payload["sizes"] == list(SIZES)
    assert payload["guide_name"] == "meanfield"
    assert payload["guide_config"]["num_flows"] == 2
    assert payload["prior"]["description"]["type"] == "gaussian"
    assert payload["config"] == {"epochs": 3}
    assert all(isinstance(v, torch.Tensor) for v in payload["guide_state"].values())
    # The write is atomic: no temporary file is left behind.
    assert os.listdir(path.parent) == ["m.pt"]


def test_expected_sizes_mismatch_names_both_shapes(tmp_path):
    model, guide = _fit("meanfield", steps=1)
    path = tmp_path / "m.pt"
    save_checkpoint(path, model, guide, "meanfield", GUIDE_CONFIG)
    with pytest.raises(ValueError) as info:
        load_checkpoint(path, expected_sizes=(20, 8, 3))
    assert "(20, 16, 3)" in str(info.value) and "(20, 8, 3)" in str(info.value)
    load_checkpoint(path, expected_sizes=[20, 16, 3])  # a list of the right sizes is fine


def _saved_payload(tmp_path):
    model, guide = _fit("meanfield", steps=1)
    path = tmp_path / "good.pt"
    save_checkpoint(path, model, guide, "meanfield", GUIDE_CONFIG)
    return torch.load(path, weights_only=True)


@pytest.mark.parametrize(
    "corrupt, text",
    [
        (lambda p: {**p, "format_version": FORMAT_VERSION + 1}, "version"),
        (lambda p: {k: v for k, v in p.items() if k != "format_version"}, "version"),
        (lambda p: [p], "version"),
        (lambda p: {k: v for k, v in p.items() if k != "guide_state"}, "guide_state"),
        (lambda p: {**p, "guide_state": {k: v[..., :1] for k, v in p["guide_state"].items()}}, "guide parameters"),
        (lambda p: {**p, "guide_state": {}}, "guide parameters"),
        (lambda p: {**p, "sizes": [20, 8, 3]}, "guide parameters"),
    ],
)
def test_corrupted_or_other_version_payload_raises(tmp_path, corrupt, text):
    payload = _saved_payload(tmp_path)
    path = tmp_path / "bad.pt"
    torch.save(corrupt(payload), path)
    with pytest.raises(ValueError, match=text):
        load_checkpoint(path)


def test_loading_while_a_same_named_guide_of_other_sizes_is_in_memory(tmp_path):
    model, guide = _fit("meanfield", steps=1)
    path = tmp_path / "m.pt"
    save_checkpoint(path, model, guide, "meanfield", GUIDE_CONFIG)
    x, y = synthetic_batch(batch=10, features=SIZES[0], seed=2)
    before = _predictions(model, guide, x, y)
    pyro.clear_param_store()
    other = BayesianMLP((20, 8, 3))
    other_guide = make_guide("meanfield", other, GUIDE_CONFIG)
    other_guide(*synthetic_batch(batch=2, features=20), 2)  # creates its parameters in the store
    loaded_model, loaded_guide, _ = load_checkpoint(path)
    _assert_same(before, _predictions(loaded_model, loaded_guide, x, y))


def test_unreadable_file_raises_value_error(tmp_path):
    model, guide = _fit("meanfield", steps=1)
    good = tmp_path / "good.pt"
    save_checkpoint(good, model, guide, "meanfield", GUIDE_CONFIG)
    data = good.read_bytes()
    truncated = tmp_path / "truncated.pt"
    truncated.write_bytes(data[: len(data) // 2])
    garbage = tmp_path / "garbage.pt"
    garbage.write_bytes(b"not a checkpoint at all" * 10)
    for path in (truncated, garbage):
        with pytest.raises(ValueError, match="checkpoint"):
            load_checkpoint(path)
    with pytest.raises(FileNotFoundError):
        load_checkpoint(tmp_path / "missing.pt")


# ----------------------------------------------------------------------------- TrainHistory files


def _parse_csv_row(row):
    out = {"median_scale": {}}
    for key, text in row.items():
        if key == "verdict_converged":
            out[key] = None if text == "" else text == "True"
        elif key.startswith("median_scale/"):
            out["median_scale"][key.split("/", 1)[1]] = float(text)
        elif text == "":
            out[key] = None
        elif key in ("epoch", "steps"):
            out[key] = int(text)
        elif key == "phase":
            out[key] = text
        else:
            out[key] = float(text)
    return out


def _as_csv(records):
    """What the CSV keeps of each record: the verdict's ``converged`` alone."""
    return [{k: v for k, v in r.items() if k != "verdict"} | {"verdict_converged": None if r["verdict"] is None else r["verdict"]["converged"]}
            for r in records]


def test_train_history_csv_and_json_round_trip(tmp_path):
    history = TrainHistory(
        [
            EpochDiagnostics(1, 5, -123.456789012345, -100.1, 23.356789012345, 0.4, None, 0.012, {"layers.0.weight": 0.25}),
            EpochDiagnostics(2, 10, -90.0, -85.5, 4.5, 2 / 3, 0.8125, 1e-7, {"layers.0.weight": 1 / 3}, phase="continuation"),
        ]
    )
    history.to_json(tmp_path / "h.json")
    assert json.loads((tmp_path / "h.json").read_text()) == history.to_records()
    history.to_csv(tmp_path / "h.csv")
    with open(tmp_path / "h.csv", newline="") as f:
        rows = [_parse_csv_row(r) for r in csv.DictReader(f)]
    assert rows == _as_csv(history.to_records())
    assert rows[0]["val_accuracy"] is None and rows[1]["train_accuracy"] == 2 / 3


def test_trained_history_round_trips(tmp_path):
    pyro.clear_param_store()
    model = BayesianMLP(SIZES)
    guide = make_guide("meanfield", model)
    config = TrainConfig(epochs=2, batch_size=16, lr=0.01, progress=False, eval_samples=2)
    history = train(model, guide, _data(), config, val_split=_data(16, seed=1))
    history.to_json(tmp_path / "h.json")
    history.to_csv(tmp_path / "h.csv")
    records = history.to_records()
    assert len(records) == 2 and records[-1]["steps"] == 6
    assert json.loads((tmp_path / "h.json").read_text()) == records
    with open(tmp_path / "h.csv", newline="") as f:
        assert [_parse_csv_row(r) for r in csv.DictReader(f)] == _as_csv(records)


def test_checkpoint_records_keep_earlier_epochs_and_follow_the_last():
    """A checkpoint's records equal ``dataclasses.asdict`` of every epoch after each of the
    changes train() makes (the last epoch's verdict set, an epoch added) and after the epochs
    are replaced (a resume); earlier epochs' dicts are converted once and reused."""
    from dataclasses import asdict

    def epoch(n: int) -> EpochDiagnostics:
        return EpochDiagnostics(epoch=n, steps=10 * n, elbo=-float(n), expected_log_lik=-1.0, weighted_kl=float(n), train_accuracy=0.5,
                                val_accuracy=None, seconds=0.1, median_scale={"layers.0.weight": 0.5}, phase="fit")

    history = TrainHistory([epoch(1), epoch(2)])
    first = history.checkpoint_records()
    assert first == [asdict(e) for e in history.epochs]
    history.epochs[-1].verdict = {"converged": False, "reasons": ["x"], "gain": {"nats": 1.0}}
    history.epochs.append(epoch(3))
    second = history.checkpoint_records()
    assert second == [asdict(e) for e in history.epochs] and second[1]["verdict"]["reasons"] == ["x"]
    assert second[0] is first[0]  # converted once
    second[1]["verdict"]["reasons"].append("y")
    assert history.epochs[1].verdict["reasons"] == ["x"]  # copies, not the live records
    history.epochs = [epoch(7)]
    assert history.checkpoint_records() == [asdict(history.epochs[0])] and history.to_records() == [asdict(history.epochs[0])]


def test_checkpoint_seconds_spaces_the_checkpoints_and_not_the_fit():
    """``checkpoint_seconds``: 0 saves after every epoch; a long interval after the first only.
    The fit is the same either way, and resuming from the one checkpoint it left ends where the
    uninterrupted fit does. A negative or infinite interval is refused, naming it."""
    def fit(seconds: float, resume=None):
        pyro.clear_param_store()
        model = BayesianMLP(SIZES)
        guide = make_guide("meanfield", model)
        states: list = []
        config = TrainConfig(epochs=4, batch_size=16, lr=0.01, progress=False, eval_samples=0, checkpoint_seconds=seconds)
        history = train(model, guide, _data(), config, on_checkpoint=states.append, resume=resume)
        return [e.elbo for e in history.epochs], states, {k: v.clone() for k, v in guide.state_dict().items()}

    every, every_states, every_params = fit(0.0)
    sparse, sparse_states, sparse_params = fit(3600.0)
    assert [s.epoch for s in every_states] == [1, 2, 3, 4] and [s.epoch for s in sparse_states] == [1]
    assert every == sparse and all(torch.equal(every_params[k], sparse_params[k]) for k in every_params)
    resumed, _, resumed_params = fit(3600.0, resume=sparse_states[0])
    assert resumed == every and all(torch.equal(every_params[k], resumed_params[k]) for k in every_params)
    for bad in (-1.0, float("inf"), True):
        with pytest.raises(ValueError, match="checkpoint_seconds must be a finite number of seconds >= 0"):
            TrainConfig(checkpoint_seconds=bad)
