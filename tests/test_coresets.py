"""VCL's coresets (pyro_bbt/coresets.py, ``--coreset``): selection, removal from training, and
the prediction of each task by a copy of the posterior fitted on them."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from pyro_bbt.coresets import kcenter_indices, select_coreset
from pyro_bbt.data import Split
from pyro_bbt.experiment import ExperimentConfig
from pyro_bbt.split_sequence import SplitConfig, _split_data
from pyro_bbt.transfer import main

TINY = ["--sequence", "split", "--hidden", "8", "--epochs", "1", "--min-steps", "3", "--seeds", "0", "--limit-train", "120",
        "--limit-eval", "60", "--eval-samples", "2", "--fit", "fixed", "--quiet"]


def test_kcenter_is_greedy_farthest_point_from_the_first_row():
    # points on a line at 0, 1, 10, 4, 6: from 0 the farthest is 10, then 4 or 6 (min distances 4 and 4: the first, 4), then 6 or 1
    x = torch.tensor([[0.0], [1.0], [10.0], [4.0], [6.0]])
    assert kcenter_indices(x, 3) == [0, 2, 3]
    assert kcenter_indices(x, 5)[:4] == [0, 2, 3, 4]
    assert sorted(kcenter_indices(x, 5)) == [0, 1, 2, 3, 4]


def test_a_coreset_is_set_aside_from_the_split_in_order_and_random_ones_follow_the_seed():
    split = Split(torch.arange(50, dtype=torch.float32).reshape(50, 1).repeat(1, 3), torch.arange(50) % 2)
    for method in ("random", "kcenter"):
        coreset, rest = select_coreset(split, method, 7, seed=3)
        assert len(coreset) == 7 and len(rest) == 43
        picked, kept = set(coreset.x[:, 0].tolist()), rest.x[:, 0].tolist()
        assert picked.isdisjoint(kept) and picked | set(kept) == set(range(50)) and kept == sorted(kept)
        assert torch.equal(coreset.y, coreset.x[:, 0].long() % 2)
    a, b, c = (select_coreset(split, "random", 7, seed)[0].x[:, 0].tolist() for seed in (3, 3, 4))
    assert a == b != c
    assert select_coreset(split, "kcenter", 2, seed=0)[0].x[:, 0].tolist() == [0.0, 49.0]
    with pytest.raises(ValueError, match="coreset size must be an integer >= 1, got 0"):
        select_coreset(split, "random", 0, seed=0)
    with pytest.raises(ValueError, match="a coreset of 50 points leaves no training data"):
        select_coreset(split, "kcenter", 50, seed=0)
    with pytest.raises(ValueError, match="unknown coreset 'nope'"):
        select_coreset(split, "nope", 5, seed=0)


def test_every_method_trains_on_the_rest_and_a_run_without_coreset_keeps_its_description():
    config = ExperimentConfig(hidden=(8,), limit_train=120, limit_eval=60, seeds=(0,))
    plain, with_coreset = SplitConfig("task"), SplitConfig("task", coreset="random", coreset_size=10)
    assert "coreset" not in plain.to_dict() and with_coreset.to_dict()["coreset"] == "random" and with_coreset.to_dict()["coreset_size"] == 10
    _, trains, _, none = _split_data(config, plain, 0)
    _, rests, _, coresets = _split_data(config, with_coreset, 0)
    assert none is None and len(coresets) == 5
    for train, rest, coreset in zip(trains, rests, coresets):
        assert len(rest) == len(train) - 10 and len(coreset) == 10
        rows = {tuple(r.tolist()) for r in train.x}
        assert all(tuple(r.tolist()) in rows for r in torch.cat([rest.x, coreset.x]))
    with pytest.raises(ValueError, match="coreset size must be an integer >= 1"):
        SplitConfig("task", coreset="random", coreset_size=0)
    with pytest.raises(ValueError, match="unknown coreset 'all'; allowed: none, random, kcenter"):
        SplitConfig("task", coreset="all")


@pytest.mark.parametrize("scenario, copies", [("task", lambda t: [[i] for i in range(t + 1)]), ("domain", lambda t: [list(range(t + 1))])])
def test_seen_tasks_are_predicted_by_copies_fitted_on_the_coresets(tmp_path, scenario, copies, single_torch_thread):
    """After task t the rows of tasks <= t come from the copies (one per head, or one on all the
    coresets seen), the unseen tasks' from the posterior itself; the propagated posterior is the
    one fitted without them, so its own rows are kept beside."""
    out = tmp_path / scenario
    assert main([*TINY, "--scenario", scenario, "--methods", "transfer", "--coreset", "kcenter", "--coreset-size", "10", "--out", str(out)]) == 0
    results = json.loads((out / "results.json").read_text())
    assert results["protocol"]["coreset"] == "kcenter" and results["protocol"]["coreset_size"] == 10
    entry = results["methods"]["transfer"]["per_seed"][0]
    R, R0 = np.array(entry["accuracy_matrix"]), np.array(entry["accuracy_matrix_without_coreset"])
    for t, fit in enumerate(entry["fits"]):
        assert [c["tasks"] for c in fit["coreset_fits"]] == copies(t)
        assert all(c["examples"] == 10 * len(c["tasks"]) and c["steps"] >= 3 for c in fit["coreset_fits"])
        assert np.array_equal(R[t, t + 1:], R0[t, t + 1:])
    assert not np.array_equal(R, R0)
    assert ((R >= 0) & (R <= 1)).all()
    summary = results["methods"]["transfer"]
    assert summary["summary_without_coreset"]["average_accuracy"]["mean"] == pytest.approx(R0[-1].mean())
    assert summary["summary"]["average_accuracy"]["mean"] == pytest.approx(R[-1].mean())
    table = (out / "split_mnist.md").read_text()
    assert "Coreset: kcenter, 10 points per task" in table and f"transfer ACC {100 * R0[-1].mean():.2f} ± 0.00" in table


@pytest.mark.parametrize("args, needle", [
    (["--coreset", "random"], "--coreset random is only valid with --sequence split"),
    (["--sequence", "split", "--scenario", "task", "--coreset", "every"], "unknown coreset 'every'; allowed: none, random, kcenter"),
    (["--sequence", "split", "--scenario", "task", "--coreset", "random", "--coreset-size", "0"], "coreset size must be an integer >= 1, got 0"),
    (["--sequence", "split", "--scenario", "task", "--coreset", "random", "--coreset-size", "50", "--limit-train", "50"],
     "--coreset-size 50 leaves no training data from tasks cut to --limit-train 50"),
    (["--sequence", "split", "--scenario", "domain", "--preset", "paper", "--coreset", "kcenter", "--coreset-size", "100000"],
     "--coreset-size 100000 leaves no training data from the smallest task ("),
])
def test_cli_refuses_a_bad_coreset_with_one_line_and_writes_nothing(tmp_path, capsys, args, needle):
    out = tmp_path / "run"
    assert main([*args, "--out", str(out)]) == 2
    err = capsys.readouterr().err.strip()
    assert needle in err and err.count("\n") == 0
    assert not out.exists()
