"""benchmarks/averaging.py (outside the package): a real fit on tiny data (200 images, 784-8-5,
two epochs to the verdict, four more), scored as its last iterate and as the average of the
iterates over (k/2, k] at every power of two k."""

import json
from dataclasses import replace

import pytest

from conftest import load_benchmark
from pyro_bbt.guides import posterior_loc_scale
from pyro_bbt.objectives import closed_form_kl

averaging = load_benchmark("averaging")

TINY = ["--problem", "small", "--limit-train", "200", "--hidden", "8", "--max-epochs", "2", "--epochs", "4", "--eval-draws", "2"]


def test_the_tail_average_is_scored_at_every_power_of_two(tmp_path, single_torch_thread):
    out = tmp_path / "averaging.json"
    assert averaging.main([*TINY, "--factor", "0.3", "--out", str(out)]) == 0
    record = json.loads(out.read_text())
    assert record["args"]["factor"] == 0.3 and record["args"]["hidden"] == [8] and record["args"]["limit_train"] == 200
    assert record["pass"]["epochs"] == 2 and record["pass"]["converged"] is False  # two epochs of 200 images
    points = record["points"]
    assert [p["epoch"] for p in points] == [1, 2, 4] and [p["avg_n"] for p in points] == [1, 1, 2]
    assert points[0]["avg_elbo"] == pytest.approx(points[0]["last_elbo"], rel=1e-12)  # an average of one iterate is that iterate
    assert points[2]["avg_elbo"] != pytest.approx(points[2]["last_elbo"], rel=1e-9)
    assert all(p["seconds"] > record["pass"]["seconds"] for p in points)
    for accuracy in [record["pass"]["test_accuracy"]] + [p[key] for p in points for key in ("last_test_accuracy", "avg_test_accuracy")]:
        assert 0.0 <= accuracy <= 1.0
    assert points[0]["avg_test_accuracy"] == points[0]["last_test_accuracy"]  # the same posterior, the same seeded draws
    assert record["args"]["experiment"] == {}
    for breakdown in [record["pass"]["kl_breakdown"]] + [p["avg_kl_breakdown"] for p in points]:
        assert set(breakdown["sites"]) == {"layers.0.weight", "layers.0.bias", "layers.1.weight", "layers.1.bias"}
        assert breakdown["total"] == pytest.approx(sum(breakdown["sites"].values()))
        assert 0 < breakdown["blank"] < breakdown["sites"]["layers.0.weight"]  # widths start at 0.01: blank weights are far from the prior
        [layer] = breakdown["units_near_prior"]
        assert layer["units"] == 8 and layer["0.001"] <= layer["0.01"] <= layer["0.1"] <= 8
    # the closed form agrees with the evaluator's KL (converge.py's Evaluator), which is computed apart
    assert record["pass"]["kl_breakdown"]["total"] == pytest.approx(record["pass"]["kl"], rel=1e-4)


@pytest.mark.parametrize("flags, message", [(["--factor", "0"], "--factor must be > 0, got 0.0"), (["--epochs", "0"], "--epochs must be >= 1, got 0"),
                                            (["--limit-train", "0"], "argument --limit-train:")])
def test_bad_settings_are_refused_before_any_fit(tmp_path, capsys, flags, message):
    out = tmp_path / "averaging.json"
    with pytest.raises(SystemExit) as exit_info:
        averaging.main([*TINY, *flags, "--out", str(out)])
    assert exit_info.value.code == 2 and message in capsys.readouterr().err and not out.exists()


def test_experiment_overrides_reach_the_fit(tmp_path, single_torch_thread):
    """``--experiment prior_scale=0.3``: the fit's prior is N(0, 0.3^2), so the KL breakdown is taken
    against it (a blank weight at its start, sigma 0.01, is nearer a prior of 0.3 than of 1)."""
    records = {}
    for name, flags in (("base", []), ("tight", ["--experiment", "prior_scale=0.3"])):
        out = tmp_path / f"{name}.json"
        assert averaging.main([*TINY, "--epochs", "1", *flags, "--out", str(out)]) == 0
        records[name] = json.loads(out.read_text())
    assert records["tight"]["args"]["experiment"] == {"prior_scale": 0.3}
    assert records["tight"]["pass"]["kl_breakdown"]["blank"] < records["base"]["pass"]["kl_breakdown"]["blank"]


def test_a_bad_experiment_override_is_refused(tmp_path, capsys):
    out = tmp_path / "averaging.json"
    with pytest.raises(SystemExit) as exit_info:
        averaging.main([*TINY, "--experiment", "no_such_field=1", "--out", str(out)])
    assert exit_info.value.code == 2 and "no_such_field=1" in capsys.readouterr().err and not out.exists()


def test_transfer_fits_q_a_first_and_starts_b_at_it_under_its_prior(tmp_path, single_torch_thread):
    """``--transfer`` on the ``b-10`` problem (resized: 200 images, 784-8-5): q_A is fitted on task
    A's first 200 images to its cap, and B's fit starts at q_A under the prior q_A, so its first
    KL to that prior is zero where a fresh start's is not."""
    out = tmp_path / "transfer.json"
    flags = [*TINY, "--problem", "b-10", "--epochs", "1"]
    assert averaging.main([*flags, "--transfer", "--out", str(out)]) == 0
    record = json.loads(out.read_text())
    assert record["args"]["transfer"] is True and record["args"]["q_a"] == {"epochs": 2, "converged": False}
    assert record["pass"]["epochs"] == 2 and 0.0 <= record["pass"]["test_accuracy"] <= 1.0
    fresh = tmp_path / "fresh.json"
    assert averaging.main([*flags, "--out", str(fresh)]) == 0
    assert json.loads(fresh.read_text())["args"]["q_a"] is None
    model, guide, _ = averaging.transferred_posterior(replace(averaging.PROBLEMS["b-10"], limit_train=200, hidden=(8,)), "paper", (), 0, 2)
    assert float(closed_form_kl(model, posterior_loc_scale(guide, model))) == pytest.approx(0.0, abs=1e-3)


def test_transfer_needs_a_problem_of_task_b(tmp_path, capsys):
    out = tmp_path / "averaging.json"
    with pytest.raises(SystemExit) as exit_info:
        averaging.main([*TINY, "--transfer", "--out", str(out)])
    assert exit_info.value.code == 2 and "--transfer needs a problem of task B (b-10), got --problem small" in capsys.readouterr().err and not out.exists()
