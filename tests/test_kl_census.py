"""benchmarks/kl_census.py: a running unit's KL split by hidden unit (incoming, bias, outgoing),
its continuation attributed to the quiet units, and the probes scored against the posterior;
benchmarks/particles.py: the same unit continued with one and with more weight draws per step."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from conftest import load_benchmark
from pyro_bbt.elbo_gradient import read_posterior
from pyro_bbt.fixed_noise import posterior_elbo
from pyro_bbt.runstore import RunStore
from pyro_bbt.transfer import main

ARGS = ["--limit-train", "200", "--limit-eval", "60", "--hidden", "8,6", "--seeds", "0", "--fractions", "0.5", "--epochs-a", "2",
        "--max-epochs-a", "4", "--batch-size-a", "50", "--fit-b", "rule", "--max-epochs-b", "30", "--window", "2", "--methods", "scratch",
        "--eval-samples", "2", "--epochs", "1", "--min-steps", "3", "--verdict-tol", "10", "--continuation-epochs", "4",
        "--continuation-fraction", "1", "--init-scale", "1", "--quiet"]


@pytest.fixture(scope="module")
def running_unit(tmp_path_factory) -> Path:
    """A run whose scratch unit's cap (30 epochs) ends it inside a continuation, its last checkpoint kept."""
    out = tmp_path_factory.mktemp("census") / "run"
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(RunStore, "clear_checkpoint", lambda self, key: None)  # the store would clear it
        threads = torch.get_num_threads()
        torch.set_num_threads(1)
        try:
            assert main([*ARGS, "--out", str(out)]) == 0
        finally:
            torch.set_num_threads(threads)
    return out


def test_the_census_splits_the_kl_by_unit_and_attributes_the_continuation(running_unit, tmp_path, capsys, single_torch_thread):
    out = running_unit
    bench = load_benchmark("kl_census")
    vd = load_benchmark("verdict_draws")
    model, guide, start, split, _tol, _epochs = vd.load_unit(out, "scratch-f0.5-s0")
    end = read_posterior(guide)
    parts = bench.unit_kl(model, end, 1.0)
    assert [p["in"].numel() for p in parts] == [8, 6]
    # every site's KL is charged once: each layer's incoming weights and biases, the last hidden layer's outgoing weights,
    # and the output biases of the unit's head
    rows = model.output_rows
    out_bias = float(bench.kl_to(*(t[rows] for t in end["layers.2.bias"]), 1.0).sum())
    charged = sum(float(p["in"].sum() + p["bias"].sum()) for p in parts) + float(parts[1]["out"].sum()) + out_bias
    assert charged == pytest.approx(bench.total_kl(model, end, 1.0), rel=1e-6)
    # the hybrid posterior: every unit from the start is the start's hidden layers, none is the end
    everything = [torch.ones(8, dtype=torch.bool), torch.ones(6, dtype=torch.bool)]
    nothing = [torch.zeros(8, dtype=torch.bool), torch.zeros(6, dtype=torch.bool)]
    hybrid = bench.with_units_from(end, start, everything)
    for name in ("layers.0.weight", "layers.0.bias", "layers.1.weight", "layers.1.bias"):
        assert torch.equal(hybrid[name][0], start[name][0]) and torch.equal(hybrid[name][1], start[name][1])
    assert torch.equal(hybrid["layers.2.weight"][0], start["layers.2.weight"][0])  # the outgoing weights of the last hidden layer
    assert torch.equal(hybrid["layers.2.bias"][0], end["layers.2.bias"][0])  # not a unit's parameter
    same = bench.with_units_from(end, start, nothing)
    assert posterior_elbo(model, same, split, num_draws=2) == posterior_elbo(model, end, split, num_draws=2)

    # two estimates that agree are all signal; two of opposite sign all "anti-signal"
    from pyro_bbt.elbo_gradient import elbo_gradient
    g = elbo_gradient(model, guide, split, seed=1)
    masks = [torch.arange(8) < 3, torch.arange(6) < 2]
    assert bench.signal_fraction(g, g, masks) == [{"quiet": pytest.approx(1.0), "other": pytest.approx(1.0)}] * 2
    flipped = type(g)(g.elbo, g.posterior, {k: (-a, -b) for k, (a, b) in g.grads.items()})
    assert bench.signal_fraction(g, flipped, masks)[0]["quiet"] == pytest.approx(-1.0)
    h = elbo_gradient(model, guide, split, seed=2)
    assert all(-1 <= v < 1 for row in bench.signal_fraction(g, h, masks) for v in row.values())

    assert bench.main([str(out), "scratch-f0.5-s0", "--quiet-below", "1e9", "--draws", "4", "--out", str(tmp_path / "c.json")]) == 0
    record = json.loads((tmp_path / "c.json").read_text())
    assert [(r["units"], r["quiet"]) for r in record["layers"]] == [(8, 8), (6, 6)]  # every unit is below 1e9 nats
    assert all(r["other_kl"] == {"in": 0.0, "bias": 0.0, "out": 0.0} for r in record["layers"])
    assert [set(row) for row in record["gradient_signal"]] == [{"quiet", "other"}] * 2
    cont = record["continuation"]
    assert cont["quiet_units_share"] + cont["rest"] == pytest.approx(record["elbo"] - cont["elbo_start"])
    widths = [p for p in record["probes"] if p["probe"].endswith("widths to the prior's")]
    assert len(widths) == 2 and all(p["kl_change"] <= 1e-9 for p in widths)  # for fixed means the KL is least at the prior's width
    assert {p["at"] for p in record["probes"]} == {"checkpoint", "continuation's start"} and len(record["probes"]) == 6
    capsys.readouterr()
    with pytest.raises(SystemExit) as stop:
        bench.main([str(out), "scratch-f0.5-s0", "--quiet-below", "0"])
    assert stop.value.code == 2 and "--quiet-below must be a positive number of nats, got 0.0" in capsys.readouterr().err
    assert bench.main([str(out), "magic-f0.5-s0"]) == 2 and "no unit 'magic-f0.5-s0'" in capsys.readouterr().err


def test_the_particles_bench_continues_the_unit_from_its_continuation_start_both_ways(running_unit, tmp_path, capsys, single_torch_thread):
    bench = load_benchmark("particles")
    out = tmp_path / "p.json"
    assert bench.main([str(running_unit), "scratch-f0.5-s0", "--particles", "1,2", "--epochs", "3", "--score-every", "2", "--draws", "4",
                       "--out", str(out)]) == 0
    record = json.loads(out.read_text())
    assert [arm["particles"] for arm in record["arms"]] == [1, 2]
    for arm in record["arms"]:
        assert [p["epoch"] for p in arm["points"]] == [0, 2, 3]  # every 2 epochs, and the last
        assert arm["points"][0]["seconds"] == 0.0 and arm["points"][1]["seconds"] < arm["points"][2]["seconds"]
    one, two = record["arms"]
    assert 0 <= record["start_test"]["accuracy"] <= 1 and all(0 <= arm["end_test"]["accuracy"] <= 1 for arm in record["arms"])
    assert one["end_test"] != two["end_test"] and record["start_test"]["nll"] > 0
    assert one["points"][0]["elbo"] == two["points"][0]["elbo"]  # one start, one evaluator: paired
    assert one["points"][-1]["elbo"] != two["points"][-1]["elbo"]  # and two different continuations
    capsys.readouterr()
    with pytest.raises(SystemExit) as stop:
        bench.main([str(running_unit), "scratch-f0.5-s0", "--particles", "1,0"])
    assert stop.value.code == 2 and "--particles must be a comma-separated list of integers >= 1, got '1,0'" in capsys.readouterr().err
    assert bench.main([str(running_unit), "magic-f0.5-s0"]) == 2 and "particles: no unit 'magic-f0.5-s0'" in capsys.readouterr().err
