"""Uncertainty: the entropy decomposition, AUROC with ties, and shifted sets that are what they claim."""

from __future__ import annotations

import itertools
import math
import os
import runpy
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from conftest import fresh_model_and_guide, kill_when, one_torch_thread
from pyro_bbt.data import Task, load_task
from pyro_bbt.ewc import MLP
from pyro_bbt.uncertainty import (
    IN_DISTRIBUTION,
    UNSEEN,
    auroc,
    bayesian_log_probs,
    decompose,
    network_log_probs,
    reliability,
    score,
    shift_suite,
)


def _log(p) -> torch.Tensor:
    return torch.tensor(p, dtype=torch.float64).log()


def test_decomposition_on_hand_built_probabilities():
    # Two confident networks that disagree: nothing aleatoric, all of log 2 epistemic.
    total, aleatoric, epistemic = decompose(_log([[[1.0, 0.0]], [[0.0, 1.0]]]))
    assert total.item() == pytest.approx(math.log(2)) and aleatoric.item() == 0.0 and epistemic.item() == pytest.approx(math.log(2))
    # Two networks that agree on (0.7, 0.3): all aleatoric, nothing epistemic.
    h = -(0.7 * math.log(0.7) + 0.3 * math.log(0.3))
    total, aleatoric, epistemic = decompose(_log([[[0.7, 0.3]], [[0.7, 0.3]]]))
    assert (total.item(), aleatoric.item()) == pytest.approx((h, h)) and epistemic.item() == pytest.approx(0.0, abs=1e-12)
    # (0.9, 0.1) and (0.5, 0.5): mean (0.7, 0.3); aleatoric is the mean of the two entropies.
    total, aleatoric, epistemic = decompose(_log([[[0.9, 0.1]], [[0.5, 0.5]]]))
    h1 = -(0.9 * math.log(0.9) + 0.1 * math.log(0.1))
    assert total.item() == pytest.approx(h) and aleatoric.item() == pytest.approx((h1 + math.log(2)) / 2)
    assert epistemic.item() == pytest.approx(h - (h1 + math.log(2)) / 2)


def test_total_is_aleatoric_plus_epistemic_and_epistemic_is_not_negative():
    log_probs = torch.log_softmax(torch.randn(7, 50, 5, generator=torch.Generator().manual_seed(0)) * 3, dim=-1)
    total, aleatoric, epistemic = decompose(log_probs)
    torch.testing.assert_close(total, aleatoric + epistemic)
    assert (epistemic >= -1e-6).all() and (total <= math.log(5) + 1e-6).all()
    # One sample (a deterministic net): no epistemic part at all.
    total, aleatoric, epistemic = decompose(log_probs[0])
    assert torch.equal(total, aleatoric) and torch.equal(epistemic, torch.zeros(50))


def test_auroc_against_a_hand_computed_example_with_ties():
    negatives, positives = torch.tensor([0.1, 0.4, 0.35, 0.8]), torch.tensor([0.4, 0.9])
    # pairs (pos, neg): 0.4 beats 0.1 and 0.35, ties 0.4, loses to 0.8 (2.5); 0.9 beats all four (4)
    assert auroc(negatives, positives) == pytest.approx(6.5 / 8)
    brute = sum((p > n) + 0.5 * (p == n) for p, n in itertools.product(positives.tolist(), negatives.tolist())) / 8
    assert auroc(negatives, positives) == pytest.approx(brute)
    assert auroc(torch.zeros(3), torch.ones(2)) == 1.0 and auroc(torch.ones(3), torch.zeros(2)) == 0.0
    assert auroc(torch.ones(4), torch.ones(6)) == 0.5
    with pytest.raises(ValueError, match="both sets"):
        auroc(torch.tensor([]), torch.ones(2))


def test_random_scores_give_an_auroc_near_one_half_and_it_matches_brute_force():
    gen = torch.Generator().manual_seed(1)
    negatives, positives = torch.randint(0, 5, (40,), generator=gen).float(), torch.randint(0, 5, (30,), generator=gen).float()
    brute = sum((p > n) + 0.5 * (p == n) for p, n in itertools.product(positives.tolist(), negatives.tolist())) / (40 * 30)
    assert auroc(negatives, positives) == pytest.approx(brute)


def test_scores_and_reliability_on_hand_built_predictions():
    log_probs = _log([[[0.9, 0.1], [0.6, 0.4], [0.2, 0.8]]])
    labels = torch.tensor([0, 1, 1])
    scores = score(log_probs, labels, num_bins=10)
    assert scores.accuracy == pytest.approx(2 / 3) and scores.confidence == pytest.approx((0.9 + 0.6 + 0.8) / 3)
    assert scores.nll == pytest.approx(-(math.log(0.9) + math.log(0.4) + math.log(0.8)) / 3)
    # bins of width 0.1: 0.9 alone (right), 0.6 alone (wrong), 0.8 alone (right)
    assert scores.ece == pytest.approx((abs(1 - 0.9) + abs(0 - 0.6) + abs(1 - 0.8)) / 3)
    rows = reliability(log_probs[0].exp(), labels, num_bins=10)
    assert [(r["bin"], r["accuracy"], r["count"]) for r in rows] == [(5, 0.0, 1), (7, 1.0, 1), (8, 1.0, 1)]
    unlabelled = score(log_probs, None)
    assert unlabelled.accuracy is None and unlabelled.ece is None and unlabelled.entropy == pytest.approx(scores.entropy)


def test_shifted_sets_are_what_they_claim():
    task_a, task_b = Task(digits=(0, 1, 2, 3, 4)), Task(digits=(5, 6, 7, 8, 9))
    suite = shift_suite(task_a, task_b, rotations=(90.0,), noise_stds=(0.5,), limit=300)
    assert list(suite) == [IN_DISTRIBUTION, "rotate 90", "noise 0.5", UNSEEN]
    clean, _ = suite[IN_DISTRIBUTION]
    rotated, labelled = suite["rotate 90"]
    assert labelled and torch.equal(rotated.y, clean.y)
    # a quarter turn counter-clockwise: torch.rot90 from the row axis towards the column axis
    expected = torch.rot90(clean.x.view(-1, 28, 28), 1, dims=(-2, -1)).reshape(-1, 784)
    torch.testing.assert_close(rotated.x, expected, atol=1e-5, rtol=0)
    noisy, _ = suite["noise 0.5"]
    assert (noisy.x - clean.x).std().item() == pytest.approx(0.5, rel=0.02) and (noisy.x - clean.x).mean().abs() < 0.01
    unseen, labelled = suite[UNSEEN]
    full_b = load_task(task_b).test
    assert not labelled and torch.equal(unseen.x, full_b.x[:300])


def test_predictors_give_per_sample_log_probabilities():
    torch.manual_seed(0)
    x = torch.randn(20, 6)
    nets = [MLP((6, 8, 3)) for _ in range(3)]
    ensemble = network_log_probs(nets, x)
    assert ensemble.shape == (3, 20, 3) and torch.allclose(ensemble.exp().sum(-1), torch.ones(3, 20))
    assert decompose(ensemble)[2].mean() > 0  # different initialisations disagree
    assert decompose(network_log_probs(nets[:1], x))[2].abs().max() == 0
    model, guide = fresh_model_and_guide((6, 8, 3), "meanfield", initialize=True)
    first, again = bayesian_log_probs(model, guide, x, 5, seed=3), bayesian_log_probs(model, guide, x, 5, seed=3)
    assert first.shape == (5, 20, 3) and torch.equal(first, again)
    assert not torch.equal(first, bayesian_log_probs(model, guide, x, 5, seed=4))
    with pytest.raises(ValueError, match="at least one net"):
        network_log_probs([], x)


def test_the_study_scores_guides_and_baselines_on_every_set(tmp_path, single_torch_thread):
    from pyro_bbt.uncertainty_study import (
        UncertaintyConfig,
        config_to_dict,
        plot_reliability,
        plot_shift,
        plot_uncertainty,
        uncertainty_study,
        uncertainty_table,
    )

    config = UncertaintyConfig(predictors=("meanfield", "delta", "deterministic", "ensemble"), seeds=(0, 1), hidden=(16,), max_epochs=3,
                               min_epochs=2, ensemble_size=3, net_epochs=1, eval_samples=4, limit_train=300, limit_eval=100,
                               rotations=(45.0, 90.0), noise_stds=(0.5,), experiment=dict(batch_size_a=100))
    rows = uncertainty_study(config, log=lambda m: None)
    assert [(r["predictor"], r["seed"]) for r in rows] == [(p, s) for s in (0, 1) for p in config.predictors]
    for row in rows:
        assert list(row["sets"]) == [IN_DISTRIBUTION, "rotate 45", "rotate 90", "noise 0.5", UNSEEN]
        assert row["sets"][UNSEEN]["accuracy"] is None and 0 <= row["sets"]["rotate 90"]["accuracy"] <= 1
        assert 0.0 <= row["auroc_entropy"] <= 1.0 and sum(row["histograms"]["entropy"][UNSEEN]) == 100
        for name in (IN_DISTRIBUTION, "rotate 45"):
            assert sum(b["count"] for b in row["reliability"][name]) == 100
        a = row["sets"][IN_DISTRIBUTION]
        assert a["entropy"] == pytest.approx(a["aleatoric"] + a["mutual_information"], abs=1e-5)
    by = {(r["predictor"], r["seed"]): r for r in rows}
    # the guides' fits are judged by the rule (3 epochs of 3 steps: not converged); the nets are not fitted by it
    assert by[("meanfield", 0)]["convergence"]["epochs"] == 3 and by[("ensemble", 0)]["convergence"] is None
    # one net has no epistemic part; three nets of different seeds disagree
    assert by[("deterministic", 0)]["sets"][UNSEEN]["mutual_information"] == 0.0
    assert by[("ensemble", 0)]["sets"][UNSEEN]["mutual_information"] > 0.0
    # a fit learnt A when its accuracy on A's test digits reaches learnt_accuracy (0.9)
    assert all(r["learnt"] == (r["sets"][IN_DISTRIBUTION]["accuracy"] >= 0.9) for r in rows)
    learnt = sum(by[("meanfield", s)]["learnt"] for s in (0, 1))
    table = uncertainty_table(rows)
    assert table.count("\n") == 2 + 4 and "| ensemble |" in table and f"| 0/2 | {learnt}/2 | 2 |" in table
    for plot, name in ((plot_uncertainty, "u.png"), (plot_reliability, "r.png"), (plot_shift, "s.png")):
        plot(rows, tmp_path / name)
        assert (tmp_path / name).stat().st_size > 0
    assert config_to_dict(config)["fitting"]["batch_size_a"] == 100


def test_the_study_gives_the_same_rows_in_worker_processes(single_torch_thread):
    from pyro_bbt.uncertainty_study import UncertaintyConfig, guide_rows, plan_units, uncertainty_study

    config = UncertaintyConfig(predictors=("delta", "ensemble", "meanfield"), seeds=(0, 1), hidden=(8,), max_epochs=2, min_epochs=2,
                               ensemble_size=2, net_epochs=1, eval_samples=2, limit_train=100, limit_eval=50, rotations=(90.0,),
                               noise_stds=(0.5,), experiment=dict(batch_size_a=50))
    # the costlier guide first, then the nets; one unit per guide and seed
    assert plan_units(config) == [("meanfield", 0), ("meanfield", 1), ("delta", 0), ("delta", 1), ("nets", 0), ("nets", 1)]
    timing = ("fit_seconds", "seconds_per_epoch")

    def without_timing(rows):
        return [{k: v for k, v in r.items() if k not in timing} for r in rows]

    serial = uncertainty_study(config, log=lambda m: None)
    parallel = uncertainty_study(config, log=lambda m: None, workers=2)
    assert [(r["predictor"], r["seed"]) for r in serial] == [(p, s) for s in (0, 1) for p in config.predictors]
    assert without_timing(parallel) == without_timing(serial)
    assert [(r["guide"], r["epochs"], r["converged"]) for r in guide_rows(serial)] == [("delta", 2, False), ("meanfield", 2, False)] * 2
    with pytest.raises(ValueError, match="workers must be an integer >= 1, got 0"):
        uncertainty_study(config, workers=0)


def test_the_study_config_rejects_bad_values():
    from pyro_bbt.uncertainty_study import UncertaintyConfig

    with pytest.raises(ValueError, match="unknown predictor bayes; allowed: normal, meanfield"):
        UncertaintyConfig(predictors=("bayes",))
    with pytest.raises(ValueError, match="ensemble-size must be an integer >= 1, got 0"):
        UncertaintyConfig(ensemble_size=0)
    with pytest.raises(ValueError, match="unknown warm-start 'map'; allowed: meanfield, fresh"):
        UncertaintyConfig(warm_start="map")
    with pytest.raises(ValueError, match="flow-lr must be a finite number > 0, got 0"):
        UncertaintyConfig(flow_lr=0)
    with pytest.raises(ValueError, match=r"learnt-accuracy must lie in \[0, 1\], got 1.5"):
        UncertaintyConfig(learnt_accuracy=1.5)


def test_richer_guides_start_from_the_same_seeds_fitted_meanfield(single_torch_thread):
    from dataclasses import replace

    from pyro_bbt.uncertainty_study import UncertaintyConfig, guide_rows, plan_units, uncertainty_study, uncertainty_table

    config = UncertaintyConfig(predictors=("meanfield", "lowrank", "planar", "iaf", "delta"), seeds=(0,), hidden=(8,), max_epochs=3,
                               min_epochs=2, eval_samples=2, limit_train=100, limit_eval=50, rotations=(90.0,), noise_stds=(0.5,),
                               experiment=dict(batch_size_a=50), learnt_accuracy=0.0)
    # they have no unit of their own: the seed's meanfield unit fits them after it, first in the queue
    assert config.warm_guides == ("lowrank", "planar", "iaf")
    assert plan_units(config) == [("meanfield", 0), ("delta", 0)]
    assert plan_units(replace(config, predictors=("iaf", "delta"))) == [("meanfield", 0), ("delta", 0)]
    assert plan_units(replace(config, warm_start="fresh")) == [("iaf", 0), ("planar", 0), ("lowrank", 0), ("meanfield", 0), ("delta", 0)]
    rows = uncertainty_study(config, log=lambda m: None)
    by = {r["predictor"]: r for r in rows}
    assert list(by) == ["meanfield", "lowrank", "planar", "iaf", "delta"] and all(r["learnt"] for r in rows)
    for richer in ("lowrank", "planar", "iaf"):
        assert by[richer]["started_from"] == {"guide": "meanfield", "epochs": by["meanfield"]["convergence"]["epochs"],
                                              "converged": by["meanfield"]["convergence"]["converged"],
                                              "fit_seconds": by["meanfield"]["fit_seconds"]}
        assert by[richer]["convergence"]["epochs"] >= 2
        # it goes on at the rates the meanfield fit ended with: the rule allows it no further drops
        assert by[richer]["convergence"]["rule"]["lr_drops"] == 0 and by["meanfield"]["convergence"]["rule"]["lr_drops"] == 3
    assert by["meanfield"]["started_from"] is None and by["delta"]["started_from"] is None
    # a fit started from an unconverged posterior is not counted converged, even when its own phase met the rule:
    # with any gain and drift accepted, meanfield still needs its three drops (more epochs than the cap of 3), planar none
    lenient = replace(config, predictors=("meanfield", "planar"), experiment=dict(batch_size_a=50, window=1, rel_tol=1e9, scale_tol=1e9))
    meanfield, planar = uncertainty_study(lenient, log=lambda m: None)
    assert meanfield["convergence"]["converged"] is False and planar["convergence"]["converged"] is True
    assert planar["started_from"]["converged"] is False
    assert [(g["guide"], g["converged"]) for g in guide_rows([meanfield, planar])] == [("meanfield", False), ("planar", False)]
    assert "| planar |" in uncertainty_table([meanfield, planar]).splitlines()[-1] and "| 0/1 | 1/1 | 1 |" in uncertainty_table([meanfield, planar])
    # without the meanfield row asked for, its fit still starts the others, and only their rows come back
    alone = uncertainty_study(replace(config, predictors=("planar",)), log=lambda m: None)
    assert [r["predictor"] for r in alone] == ["planar"] and alone[0]["started_from"]["guide"] == "meanfield"
    assert alone[0]["sets"] == by["planar"]["sets"]  # the same meanfield fit, the same planar fit


def _children(pid: int) -> list[int]:
    """The processes whose parent is ``pid`` (from /proc)."""
    out = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                fields = (entry / "stat").read_text().rsplit(")", 1)[1].split()
            except OSError:
                continue
            if int(fields[1]) == pid:
                out.append(int(entry.name))
    return out


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    try:
        with open(f"/proc/{pid}/stat") as stat:  # a zombie (ended, not yet reaped by init) counts as ended
            return stat.read().split(")")[-1].split()[0] != "Z"
    except OSError:
        return False


def test_a_killed_study_leaves_no_worker_fitting_on(tmp_path):
    """The study's worker processes (``--workers``: the engine's ProcessExecutor) end with the
    driver: a driver killed (SIGKILL, nothing to clean up) while its workers are busy leaves no
    worker behind."""
    script = tmp_path / "driver.py"
    script.write_text(
        "import time\n"
        "from pyro_bbt.executors import Job, ProcessExecutor\n"
        "if __name__ == '__main__':\n"
        "    executor = ProcessExecutor(workers=2)\n"
        "    for k in range(2):\n"
        "        executor.submit(Job(f'sleep{k}', time.sleep, (120,)))\n"
        "    time.sleep(1)\n"
        "    print('busy', flush=True)\n"
        "    executor.next_result()\n"
    )
    driver = subprocess.Popen([sys.executable, str(script)], stdout=subprocess.PIPE, text=True, cwd=tmp_path)
    assert driver.stdout.readline().strip() == "busy"
    workers = _children(driver.pid)
    assert len(workers) >= 2
    os.kill(driver.pid, signal.SIGKILL)
    driver.wait()
    deadline = time.monotonic() + 20
    while any(_alive(pid) for pid in workers) and time.monotonic() < deadline:
        time.sleep(0.2)
    assert not any(_alive(pid) for pid in workers)


RESUMABLE = """import json, sys
from pathlib import Path
from pyro_bbt.runstore import RunStore
from pyro_bbt.uncertainty_study import UncertaintyConfig, config_to_dict, uncertainty_study, without_timing
config = UncertaintyConfig(predictors=("delta", "deterministic"), seeds=(0, 1), hidden=(8,), max_epochs=2, min_epochs=2, net_epochs=1,
                           eval_samples=2, limit_train=100, limit_eval=50, rotations=(90.0,), noise_stds=(0.5,), experiment=dict(batch_size_a=50))
out = Path(sys.argv[1])
rows = uncertainty_study(config, log=lambda m: None, store=RunStore(out, {"config": json.loads(json.dumps(config_to_dict(config)))}))
(out / "rows.json").write_text(json.dumps([without_timing(r) for r in rows], sort_keys=True))
"""


def test_a_study_killed_mid_run_resumes_to_the_same_rows(tmp_path):
    """Through the engine and its store: a run killed (SIGKILL) once a unit is kept, then run
    again on the same store, reads the kept units back and gives the uninterrupted run's rows,
    byte for byte (the wall-clock fields apart)."""
    script = tmp_path / "study.py"
    script.write_text(RESUMABLE)
    whole, killed = tmp_path / "whole", tmp_path / "killed"
    with pytest.MonkeyPatch.context() as patch, one_torch_thread():  # the uninterrupted run in this process (one thread, as the subprocesses): a process start saved
        patch.setattr(sys, "argv", [str(script), str(whole)])
        runpy.run_path(str(script))
    process = subprocess.Popen([sys.executable, str(script), str(killed)], env={**os.environ, "OMP_NUM_THREADS": "1"})
    kill_when(process, lambda: any((killed / "units").glob("*.json")))
    kept = {path.name: path.read_bytes() for path in (killed / "units").glob("*.json")}
    assert kept and not (killed / "rows.json").exists(), "the run finished before it could be killed"
    subprocess.run([sys.executable, str(script), str(killed)], check=True, timeout=300, env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert (killed / "rows.json").read_bytes() == (whole / "rows.json").read_bytes()
    assert all((killed / "units" / name).read_bytes() == data for name, data in kept.items())  # read back, not run again
