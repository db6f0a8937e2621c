"""The side studies (guides, schedules, convergence, ablation, tradeoff) on the study engine: their
results file is the same bytes after a kill and ``--resume``, and in worker processes; their rows
are the fits they claim; a resume of another configuration is refused in one line."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import pytest
import torch

from conftest import kill_when
from pyro_bbt.studies import PRESETS, StudyConfig, compare_guides, main, study_description
from pyro_bbt.tradeoff import TRADEOFF_PRESETS, tradeoff_key

TINY = dict(epochs=1, seeds=(0,), hidden=(8,), eval_samples=2, limit_train=200, limit_eval=100, min_steps=5, max_epochs=2)
TIMING = {"seconds", "fit_seconds", "seconds_per_epoch", "wall"}

# The trade-off study's grid and experiment, as small: both heads, one seed and fraction, 18 units.
TINY_TRADEOFF = dict(heads=("shared", "multihead"), seeds=(0,), fractions=(0.1,), taus=(1.0, 30.0), lambdas=(0.0, 1e4),
                     experiment=dict(hidden=(8,), epochs_a=1, max_epochs_a=None, epochs=1, min_steps=3, limit_train=200, limit_eval=100,
                                     eval_samples=2))

# The CLI with the quick presets shrunk to TINY and TINY_TRADEOFF (the studies' overrides for quick still apply).
CLI = f"""import sys
import pyro_bbt.studies as studies
import pyro_bbt.tradeoff as tradeoff
if __name__ == "__main__":
    studies.PRESETS["quick"] = {TINY!r}
    tradeoff.TRADEOFF_PRESETS["quick"] = {TINY_TRADEOFF!r}
    sys.exit(studies.main(sys.argv[1:]))
"""


def timing_keys(value) -> set[str]:
    """The wall-clock keys anywhere in a JSON value."""
    if isinstance(value, dict):
        return (TIMING & set(value)) | set().union(*(timing_keys(v) for v in value.values()))
    if isinstance(value, list):
        return set().union(*(timing_keys(v) for v in value))
    return set()


@pytest.fixture
def tiny_quick(monkeypatch):
    monkeypatch.setitem(PRESETS, "quick", TINY)
    monkeypatch.setitem(TRADEOFF_PRESETS, "quick", TINY_TRADEOFF)


def _run_whole_and_killed(tmp_path: Path, study: str, ready: Callable[[Path], bool]) -> tuple[Path, Path, dict[str, bytes]]:
    """``study`` run uninterrupted in this process into ``whole``, and by the CLI in a subprocess
    into ``killed``, SIGKILLed once ``ready(killed)`` holds; returns both folders and the unit
    files the killed run kept."""
    script = tmp_path / "cli.py"
    script.write_text(CLI)
    whole, killed = tmp_path / "whole", tmp_path / "killed"
    assert main([study, "--out", str(whole)]) == 0
    process = subprocess.Popen([sys.executable, str(script), study, "--out", str(killed)], env={**os.environ, "OMP_NUM_THREADS": "1"},
                               stdout=subprocess.DEVNULL)
    kill_when(process, lambda: ready(killed))
    return whole, killed, {path.name: path.read_bytes() for path in (killed / "units").glob("*.json")}


def test_a_killed_guides_study_resumes_to_the_same_file(tmp_path, tiny_quick, capsys):
    """The CLI killed (SIGKILL) once its first unit is kept (the seed's meanfield fit, whose
    posterior the lowrank and flow units start from), then rerun with --resume, reads that unit
    and its posterior back and writes the uninterrupted run's guides.json, byte for byte."""
    whole, killed, kept = _run_whole_and_killed(tmp_path, "guides", lambda out: any((out / "units").glob("*.json")))
    assert kept and not (killed / "guides.json").exists(), "the run finished before it could be killed"
    assert "meanfield-s0.json" in kept and (killed / "stages" / "meanfield-s0.pt").exists()
    resumed = subprocess.run([sys.executable, str(tmp_path / "cli.py"), "guides", "--resume", "--out", str(killed)], timeout=300,
                             env={**os.environ, "OMP_NUM_THREADS": "1"}, capture_output=True, text=True)
    assert resumed.returncode == 0, resumed.stderr
    assert "guide meanfield seed 0" not in resumed.stdout  # read back, not fitted again
    assert (killed / "guides.json").read_bytes() == (whole / "guides.json").read_bytes()
    assert all((killed / "units" / name).read_bytes() == data for name, data in kept.items())
    saved = json.loads((whole / "guides.json").read_text())
    assert [r["guide"] for r in saved["rows"]] == ["normal", "meanfield", "lowrank", "planar", "iaf", "delta"]
    assert timing_keys(saved) == set() and saved["recipe"]["warm_start"] == "meanfield"
    timing = json.loads((killed / "timing.json").read_text())["rows"]
    assert list(timing) == [f"{r['guide']}-s0" for r in saved["rows"]]
    assert timing["planar-s0"]["started_from_fit_seconds"] == timing["meanfield-s0"]["fit_seconds"]
    assert len(timing["delta-s0"]["epoch_seconds"]) == len(saved["rows"][-1]["history"])
    for name in ("guides.md", "guides.png", "config.json"):
        assert (killed / name).stat().st_size > 0


def test_the_ablation_gives_the_same_file_in_worker_processes(tmp_path, tiny_quick, capsys):
    """``--workers 2`` (the engine's ProcessExecutor; q_A's stage travels to the variants' workers)
    writes the serial run's ablation.json, byte for byte."""
    serial, parallel = tmp_path / "serial", tmp_path / "parallel"
    assert main(["ablation", "--out", str(serial)]) == 0
    assert main(["ablation", "--workers", "2", "--out", str(parallel)]) == 0
    assert (parallel / "ablation.json").read_bytes() == (serial / "ablation.json").read_bytes()
    saved = json.loads((serial / "ablation.json").read_text())
    assert len(saved["rows"]) == 8 and timing_keys(saved) == set()
    assert saved["recipe"]["experiment"]["fit_b"] == "rule" and saved["config"]["seeds"] == [0]
    assert sorted(p.name for p in (serial / "stages").iterdir()) == ["A-bayesian-s0.pt"]
    timing = json.loads((parallel / "timing.json").read_text())
    assert timing["workers"] == 2 and all(t["seconds"] > 0 for t in timing["rows"].values())
    assert sorted(timing["rows"]) == sorted(p.stem for p in (parallel / "units").iterdir() if p.stem != "A-bayesian-s0")
    assert "transfer-fresh-tau1-lr1e-05-s0" in timing["rows"]


def test_a_warm_guides_row_is_the_fit_it_claims(tmp_path, single_torch_thread):
    """The guides study's planar row (a unit that needs the meanfield unit's posterior, kept in
    the store) equals fitting meanfield and then planar from its posterior by hand; a rerun on
    the store fits nothing and gives the same rows."""
    from pyro_bbt.data import Task, load_task
    from pyro_bbt.evaluation import evaluate
    from pyro_bbt.guides import posterior_loc_scale
    from pyro_bbt.runstore import RunStore
    from pyro_bbt.uncertainty_study import UncertaintyConfig, fit_guide

    config = StudyConfig(**TINY)
    store = RunStore(tmp_path, study_description("guides", config))
    logged: list[str] = []
    (row,) = compare_guides(config, guides=("planar",), log=logged.append, store=store)
    assert len(logged) == 2 and sorted(p.name for p in (tmp_path / "units").iterdir()) == ["meanfield-s0.json", "planar-s0.json"]

    recipe = UncertaintyConfig(hidden=(8,), max_epochs=2, min_epochs=2, eval_samples=2, limit_train=200, limit_eval=100)
    data = load_task(Task(digits=(0, 1, 2, 3, 4), seed=0, name="A"), limit_train=200, limit_eval=100)
    model, q, meanfield, _ = fit_guide(recipe, "meanfield", data.train, 0)
    start = posterior_loc_scale(q, model)
    model, q, convergence, history = fit_guide(recipe, "planar", data.train, 0, start=start)
    metrics = evaluate(model, q, data.test.x, data.test.y, num_samples=2)
    assert {k: row[k] for k in ("accuracy", "nll", "ece")} == {k: metrics.to_dict()[k] for k in ("accuracy", "nll", "ece")}
    assert [e["elbo"] for e in row["history"]] == [e["elbo"] for e in history] and row["convergence"] == convergence
    assert row["started_from"]["epochs"] == meanfield["epochs"] and row["converged"] is (convergence["converged"] and meanfield["converged"])

    again = compare_guides(config, guides=("planar",), log=logged.append, store=store)
    assert len(logged) == 2 and again == [row]


def test_a_resume_of_another_configuration_is_refused_in_one_line(tmp_path, tiny_quick, capsys):
    def refused(argv: list[str], needle: str) -> None:
        assert main(argv) == 2
        err = capsys.readouterr().err.strip()
        assert needle in err and err.count("\n") == 0, err

    out = tmp_path / "run"
    out.mkdir()
    other = study_description("schedules", StudyConfig(**TINY | {"seeds": (0, 1), "max_epochs": 2}))
    (out / "config.json").write_text(json.dumps({"preset": "quick", **other}))
    refused(["schedules", "--resume", "--out", str(out)], f"--resume: the run in {out} has another configuration (config: seeds)")
    chosen = study_description("convergence", StudyConfig(**TINY | {"epochs": 3, "max_epochs": 3}), variants=("old",))
    (out / "config.json").write_text(json.dumps({"preset": "quick", **chosen}))
    assert main(["convergence", "--resume", "--variants", "old", "--out", str(out)]) == 0  # the same run: it runs what is left
    assert [r["key"] for r in json.loads((out / "convergence.json").read_text())["rows"]] == ["old"]
    capsys.readouterr()
    refused(["convergence", "--resume", "--out", str(out)], f"--resume: the run in {out} has another configuration (recipe)")
    refused(["convergence", "--out", str(out)], f"{out / 'convergence.json'} exists; pass --overwrite")
    refused(["schedules", "--out", str(out)], f"{out} holds a run of the convergence study (config.json, units); give the schedules study another --out")


def test_a_killed_tradeoff_study_resumes_to_the_same_file(tmp_path, tiny_quick, capsys):
    """The tradeoff CLI killed (SIGKILL) once the shared head's scratch point is kept (after that
    head's q_A and EWC net, which its finetune, transfer and EWC points start from), then rerun
    with --resume, reads those stages and points back and writes the uninterrupted run's
    tradeoff.json and tradeoff.md, byte for byte; the points' seconds are in timing.json."""
    whole, killed, kept = _run_whole_and_killed(tmp_path, "tradeoff", lambda out: (out / "units" / "shared-scratch-f0.1-s0.json").exists())
    assert "shared-scratch-f0.1-s0.json" in kept and len(kept) < 18, "the run finished before it could be killed"
    assert {"shared-A-bayesian-s0.pt", "shared-A-ewc-s0.pt"} <= {p.name for p in (killed / "stages").iterdir()}
    resumed = subprocess.run([sys.executable, str(tmp_path / "cli.py"), "tradeoff", "--resume", "--out", str(killed)], timeout=300,
                             env={**os.environ, "OMP_NUM_THREADS": "1"}, capture_output=True, text=True)
    assert resumed.returncode == 0, resumed.stderr
    lines = resumed.stdout.splitlines()
    assert len(lines) == 18 - len(kept) + 1 and lines[-1].startswith("done in")  # one line per unit run: the kept ones are read back
    assert not any(line.startswith(("shared-A-", "shared seed 0 fraction 0.1                scratch")) for line in lines)
    for name in ("tradeoff.json", "tradeoff.md"):
        assert (killed / name).read_bytes() == (whole / name).read_bytes(), name
    assert all((killed / "units" / name).read_bytes() == data for name, data in kept.items())
    saved = json.loads((whole / "tradeoff.json").read_text())
    assert timing_keys(saved) == set() and saved["config"]["reuse"] == {} and saved["config"]["taus"] == [1.0, 30.0]
    keys = [tradeoff_key(r["head"], r["method"], r["knob"], r["fraction"], r["seed"]) for r in saved["rows"]]
    assert keys[:3] == ["shared-scratch-f0.1-s0", "shared-finetune-f0.1-s0", "shared-joint-f0.1-s0"] and len(keys) == 14
    timing = json.loads((killed / "timing.json").read_text())["rows"]
    assert list(timing) == keys and all(t["seconds"] > 0 for t in timing.values())
    assert (killed / "tradeoff.png").stat().st_size > 0


def test_a_tradeoff_point_is_the_fit_it_claims(tmp_path, single_torch_thread, monkeypatch):
    """The trade-off's transfer (tau 10) and EWC (lambda 100) rows, on the multi-head, equal
    fitting q_A and EWC's net on A, then B from them, by hand (the study's loop before it ran on
    the engine; q_A's prior for B as ``python -m pyro_bbt.transfer --tau 10`` builds it, B's fresh
    head at the base prior); a rerun on the store fits nothing and gives the same rows."""
    from dataclasses import replace

    from pyro_bbt.ewc import EWCPenalty
    from pyro_bbt.experiment import ExperimentConfig
    from pyro_bbt.model import BayesianMLP
    from pyro_bbt.runstore import RunStore
    from pyro_bbt.tradeoff import TradeoffConfig, tradeoff, tradeoff_description
    from pyro_bbt.units import fit_task_a, fit_task_a_ewc, head_view, load_task_pair, run_bayesian_b, run_ewc_b, steps_for

    experiment = ExperimentConfig(**TINY_TRADEOFF["experiment"])
    config = TradeoffConfig(heads=("multihead",), fractions=(0.1,), seeds=(0,), taus=(10.0,), lambdas=(100.0,), experiment=experiment)
    store = RunStore(tmp_path, tradeoff_description(config))
    logged: list[str] = []
    priors = {}  # the prior each Bayesian point on B was fitted under (the real fit runs)
    real = run_bayesian_b

    def recording(cfg, method, tasks, stage, *rest):
        priors[method] = None if stage is None else stage.prior_from_a
        return real(cfg, method, tasks, stage, *rest)

    monkeypatch.setattr("pyro_bbt.tradeoff.run_bayesian_b", recording)
    rows = tradeoff(config, log=logged.append, store=store)
    assert [(r["method"], r["knob"]) for r in rows] == [("scratch", None), ("finetune", None), ("joint", None), ("transfer", 10.0), ("ewc", 100.0)]
    assert len(logged) == 7 and logged[0].startswith("multihead-A-bayesian-s0: q_A 1 epochs")

    base = replace(experiment, head="multihead", tau=1.0)
    full, tasks = load_task_pair(base, 1.0, 0), load_task_pair(base, 0.1, 0)
    stage_a = fit_task_a(base, full, 0)
    stage_ewc = fit_task_a_ewc(base, full, steps_for(len(full.a.train), base.epochs_a, base.batch_size), 0)
    steps = steps_for(len(tasks.b.train), base.epochs, base.batch_size, base.min_steps)
    stage_cli = fit_task_a(replace(base, tau=10.0), full, 0)
    assert all(torch.equal(priors["transfer"].loc(s), stage_cli.prior_from_a.loc(s))
               and torch.allclose(priors["transfer"].scale(s), stage_cli.prior_from_a.scale(s)) for s in stage_cli.prior_from_a.sites)
    # tau widens q_A's transferred widths; B's head rows, which have seen no data, keep the base prior N(0, 1)
    layout = BayesianMLP(base.sizes, base.base_prior(), base.num_heads)
    fresh, own = layout.head_rows(base.b_head), layout.head_rows(0)
    for site in layout.output_sites:
        assert torch.all(priors["transfer"].scale(site)[fresh] == base.prior_scale) and torch.all(priors["transfer"].loc(site)[fresh] == 0.0)
        assert torch.allclose(priors["transfer"].scale(site)[own], 10.0 * stage_a.prior_from_a.scale(site)[own])
    assert torch.allclose(priors["transfer"].scale("layers.0.weight"), 10.0 * stage_a.prior_from_a.scale("layers.0.weight"))
    transfer = run_bayesian_b(replace(base, tau=10.0), "transfer", tasks, stage_cli, steps, 0)
    ewc = run_ewc_b(base, tasks, replace(stage_ewc, penalty=EWCPenalty(head_view(base, stage_ewc.net, 0), stage_ewc.penalty.fisher, 100.0)), steps, 0)
    for row, outcome in zip(rows[3:], (transfer, ewc)):
        assert (row["steps"], row["b_test_accuracy"], row["a_test_after_accuracy"]) == (steps, outcome["b_test"].accuracy, outcome["a_test_after"].accuracy)
        assert (row["q_a_epochs"], row["q_a_converged"]) == (stage_a.convergence["epochs"], stage_a.convergence["converged"])

    again = tradeoff(config, log=logged.append, store=store)
    assert len(logged) == 7 and again == rows


def test_a_tradeoff_resume_may_raise_the_cap_of_bs_fits_and_a_checkpoint_of_a_lower_cap_runs_on(tmp_path, tiny_quick, capsys):
    """``--max-epochs-b`` may rise on ``--resume`` (a fit's epochs before its cap do not depend on
    it): the finished points are read back, config.json says the new cap, and a checkpoint made
    under the lower cap is this run's; a cap that falls is another configuration, refused."""
    from pyro_bbt.runstore import RunStore
    from pyro_bbt.tradeoff import TRADEOFF_CAP_FIELDS

    out = tmp_path / "run"
    argv = ["tradeoff", "--heads", "shared", "--taus", "30", "--lambdas", "0", "--out", str(out)]
    assert main([*argv, "--max-epochs-b", "5"]) == 0
    kept = {path.name: path.read_bytes() for path in (out / "units").glob("*.json")}
    described = json.loads((out / "config.json").read_text())
    capsys.readouterr()
    assert main([*argv, "--resume", "--max-epochs-b", "9"]) == 0
    captured = capsys.readouterr()
    assert "--resume: a cap rises (max_epochs_b 5 -> 9)" in captured.err
    assert len(captured.out.splitlines()) == 1 and captured.out.startswith("done in")  # nothing refitted
    assert json.loads((out / "config.json").read_text())["config"]["experiment"]["max_epochs_b"] == 9
    assert all((out / "units" / name).read_bytes() == data for name, data in kept.items())
    assert main([*argv, "--resume", "--max-epochs-b", "4"]) == 2
    assert "config.experiment.max_epochs_b: 9 -> 4" in capsys.readouterr().err
    # a unit's checkpoint made under cap 5 is read by the store of cap 9, not by one of cap 4
    described.pop("preset")
    RunStore(tmp_path / "store", described).save_checkpoint("shared-transfer-tau30-f0.1-s0", {"epoch": 3})
    raised = json.loads(json.dumps(described))
    raised["config"]["experiment"]["max_epochs_b"] = 9
    assert RunStore(tmp_path / "store", raised, raisable_fields=TRADEOFF_CAP_FIELDS).checkpoint("shared-transfer-tau30-f0.1-s0") == {"epoch": 3}
    raised["config"]["experiment"]["max_epochs_b"] = 4
    with pytest.raises(ValueError, match=r"made by another configuration \(config.experiment.max_epochs_b: 5 -> 4\)"):
        RunStore(tmp_path / "store", raised, raisable_fields=TRADEOFF_CAP_FIELDS).checkpoint("shared-transfer-tau30-f0.1-s0")


def test_a_tradeoff_resume_may_change_the_grid_and_fits_only_the_new_points(tmp_path, tiny_quick, monkeypatch, capsys):
    """``--taus``, ``--lambdas``, ``--heads``, ``--seeds`` and ``--fractions`` set the trade-off's grid, and may
    change on ``--resume``: the points the run has are read back (their files untouched), only
    the new ones are fitted, and tradeoff.json holds the grid asked for; a resume that changes
    anything else (here the experiment) is still refused in one line."""
    out = tmp_path / "run"
    assert main(["tradeoff", "--heads", "shared", "--taus", "30", "--lambdas", "0", "--out", str(out)]) == 0
    first = json.loads((out / "tradeoff.json").read_text())
    assert [(r["method"], r["knob"]) for r in first["rows"]] == [("scratch", None), ("finetune", None), ("joint", None), ("transfer", 30.0), ("ewc", 0.0)]
    kept = {path.name: path.read_bytes() for path in (out / "units").glob("*.json")}
    capsys.readouterr()
    assert main(["tradeoff", "--resume", "--heads", "shared", "--taus", "1,30", "--lambdas", "0", "--out", str(out)]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert len(lines) == 2 and "transfer tau 1:" in lines[0] and lines[1].startswith("done in"), lines  # only the new point is fitted
    assert json.loads((out / "config.json").read_text())["config"]["taus"] == [1.0, 30.0]  # config.json says the grid asked for
    assert all((out / "units" / name).read_bytes() == data for name, data in kept.items())
    grown = json.loads((out / "tradeoff.json").read_text())
    assert grown["config"]["taus"] == [1.0, 30.0] and len(grown["rows"]) == 6
    assert [r for r in grown["rows"] if r["knob"] == 30.0] == [r for r in first["rows"] if r["knob"] == 30.0]
    # shrunk back: nothing to fit, the rows of the smaller grid
    assert main(["tradeoff", "--resume", "--heads", "shared", "--taus", "1", "--lambdas", "0", "--out", str(out)]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert len(lines) == 1 and lines[0].startswith("done in")
    assert [r["knob"] for r in json.loads((out / "tradeoff.json").read_text())["rows"] if r["method"] == "transfer"] == [1.0]
    # grown along B's fraction: only the new fraction's points are fitted
    assert main(["tradeoff", "--resume", "--heads", "shared", "--fractions", "0.1,0.05", "--taus", "1", "--lambdas", "0", "--out", str(out)]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert len(lines) == 6 and all("fraction 0.05" in line for line in lines[:5]) and lines[5].startswith("done in"), lines
    rows = json.loads((out / "tradeoff.json").read_text())["rows"]
    assert sorted({r["fraction"] for r in rows}) == [0.05, 0.1] and sum(r["fraction"] == 0.05 for r in rows) == 5

    # a run stored before a setting existed (here "compile") resumes: the absent setting reads as its neutral value
    for path in (out / "config.json", *(out / "units").glob("*.json")):
        data = json.loads(path.read_text())
        described = data["config"] if path.name == "config.json" else data["config"]["config"]
        assert described["experiment"].pop("compile") is False
        path.write_text(json.dumps(data))
    assert main(["tradeoff", "--resume", "--heads", "shared", "--fractions", "0.1,0.05", "--taus", "1", "--lambdas", "0", "--out", str(out)]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert len(lines) == 1 and lines[0].startswith("done in"), lines  # nothing refitted
    assert json.loads((out / "tradeoff.json").read_text())["rows"] == rows

    def refused(argv: list[str], needle: str) -> None:
        assert main(argv) == 2
        err = capsys.readouterr().err.strip()
        assert needle in err and err.count("\n") == 0, err

    refused(["tradeoff", "--resume", "--heads", "shared", "--taus", "1", "--max-epochs-b", "9999", "--out", str(out)],
            "config.experiment.max_epochs_b: None -> 9999")  # no cap (the fixed budget's) to raise
    refused(["tradeoff", "--max-epochs-b", "0", "--out", str(tmp_path / "other")], "max-epochs-b must be none or an integer >= epochs-a")
    refused(["guides", "--max-epochs-b", "9999", "--out", str(tmp_path / "other")], "--max-epochs-b applies to the tradeoff study only")
    monkeypatch.setitem(TRADEOFF_PRESETS, "quick", TINY_TRADEOFF | {"experiment": TINY_TRADEOFF["experiment"] | {"eval_samples": 3}})
    refused(["tradeoff", "--resume", "--heads", "shared", "--taus", "1", "--out", str(out)],
            f"--resume: the run in {out} has another configuration (config.experiment.eval_samples: 2 -> 3)")
    refused(["tradeoff", "--taus", "0,1", "--out", str(tmp_path / "other")], "--taus must be > 0")
    refused(["tradeoff", "--fractions", "0.1,1.5", "--out", str(tmp_path / "other")], "--fractions must each be in (0, 1]")
    refused(["tradeoff", "--fractions", "0", "--out", str(tmp_path / "other")], "got 0")
    refused(["guides", "--taus", "1", "--out", str(tmp_path / "other")], "--taus apply to the tradeoff study only")
    for flag, value in (("--taus", "x"), ("--taus", "inf"), ("--seeds", "-1"), ("--heads", "both")):
        with pytest.raises(SystemExit):
            main(["tradeoff", flag, value, "--out", str(tmp_path / "other")])
        assert value in capsys.readouterr().err
