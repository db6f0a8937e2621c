"""Reproducible, resumable, fail-safe runs of ``python -m pyro_bbt.transfer``."""

from __future__ import annotations

import json
import random
import signal
import time
import uuid
from pathlib import Path

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from conftest import kill_when, one_torch_thread, transfer_cli
from pyro_bbt.runstore import RunStore
from pyro_bbt.transfer import main

# Two seeds and two fractions of a small network: long enough to be killed in the middle of a
# unit, short enough for the suite.
TINY = [
    "--limit-train", "256", "--limit-eval", "120", "--hidden", "16", "--epochs", "2", "--epochs-a", "2",
    "--batch-size", "32", "--min-steps", "16", "--fractions", "0.2,1", "--seeds", "0,1", "--eval-samples", "4",
    "--methods", "scratch,transfer,ewc", "--quiet",
]


_cli = transfer_cli


def _run_here(argv: list[str]) -> None:
    """``python -m pyro_bbt.transfer ARGV`` in this process, on one torch thread as the
    subprocesses run (``transfer_cli``): a process start saved, and the runs that the tests
    start in subprocesses must give its bytes."""
    with one_torch_thread():
        assert main(argv) == 0


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("runs") / "whole"
    _run_here([*TINY, "--out", str(out)])
    return out


def test_same_seed_and_config_give_identical_results(uninterrupted, tmp_path):
    process = _cli(*TINY, "--out", str(tmp_path / "again"))
    _, err = process.communicate(timeout=300)
    assert process.returncode == 0, err
    assert (tmp_path / "again" / "results.json").read_bytes() == (uninterrupted / "results.json").read_bytes()


def test_sigkill_at_a_random_moment_then_resume_gives_the_same_results(uninterrupted, tmp_path):
    # Wait until the run is inside its units (a checkpoint or a finished unit exists), then kill
    # it after a random extra delay; a run that finished first is started again with a shorter one.
    for attempt, longest_delay in enumerate((2.0, 0.5, 0.0)):
        out = tmp_path / f"killed{attempt}"
        process = _cli(*TINY, "--out", str(out))
        deadline = time.monotonic() + 240
        while time.monotonic() < deadline and process.poll() is None:
            if any((out / d).exists() and any((out / d).iterdir()) for d in ("checkpoints", "units")):
                break
            time.sleep(0.05)
        time.sleep(random.uniform(0.0, longest_delay))
        process.send_signal(signal.SIGKILL)
        process.wait()
        if not (out / "results.json").exists():
            break
    assert not (out / "results.json").exists(), "the run finished before it could be killed, three times"
    resumed = _cli(*TINY, "--out", str(out), "--resume")
    _, err = resumed.communicate(timeout=300)
    assert resumed.returncode == 0, err
    assert json.loads((out / "results.json").read_text()) == json.loads((uninterrupted / "results.json").read_text())


def test_damaged_files_are_moved_aside_and_recomputed_on_resume(uninterrupted, tmp_path, capsys):
    """A truncated unit record, a truncated task-A stage and a record of another configuration:
    --resume warns once per file, moves it aside, redoes its work, and gets the same results."""
    import shutil

    out = tmp_path / "damaged"
    shutil.copytree(uninterrupted, out)
    (out / "results.json").unlink()
    unit, stage = out / "units" / "transfer-f1-s0.json", out / "stages" / "A-bayesian-s1.pt"
    unit.write_bytes(unit.read_bytes()[:100])
    stage.write_bytes(stage.read_bytes()[:1000])
    foreign = out / "units" / "scratch-f0.2-s1.json"
    payload = json.loads(foreign.read_text())
    payload["config_hash"], payload["config"]["hidden"] = "0" * 16, [99]
    foreign.write_text(json.dumps(payload))
    capsys.readouterr()
    assert main([*TINY, "--out", str(out), "--resume"]) == 0
    warnings = [line for line in capsys.readouterr().err.splitlines() if line.startswith("warning: ") and "moved to" in line]
    assert len(warnings) == 3, warnings
    for path, reason in ((unit, "unreadable (JSONDecodeError"), (stage, "unreadable ("), (foreign, "made by another configuration (hidden: [99] -> [16])")):
        (line,) = [w for w in warnings if w.startswith(f"warning: {path}: ")]
        assert reason in line and f"moved to {path.name}.damaged" in line
        assert path.with_name(path.name + ".damaged").exists() and path.exists()  # set aside, and written again
    assert json.loads((out / "results.json").read_text()) == json.loads((uninterrupted / "results.json").read_text())


def test_a_store_without_on_damaged_refuses_a_damaged_file_naming_it(tmp_path):
    store = RunStore(tmp_path, {"hidden": [16]})
    store.save_record("scratch-f1-s0", {"accuracy": 0.5})
    path = tmp_path / "units" / "scratch-f1-s0.json"
    path.write_text(path.read_text()[:20])
    with pytest.raises(ValueError, match=r"scratch-f1-s0\.json: unreadable \(JSONDecodeError"):
        store.record("scratch-f1-s0")
    assert path.exists() and not path.with_name(path.name + ".damaged").exists()


def test_resume_refuses_another_configuration(uninterrupted, capsys):
    code = main([*TINY, "--hidden", "8", "--out", str(uninterrupted), "--resume"])
    assert code == 2
    err = capsys.readouterr().err.strip()
    assert "hidden: [16] -> [8]" in err and len(err.splitlines()) == 1


def test_checkpoint_of_another_configuration_is_refused_naming_the_difference(tmp_path):
    saved = RunStore(tmp_path, {"hidden": [16], "task_b": [5, 6, 7, 8, 9]})
    saved.save_checkpoint("scratch-f1-s0", {"weights": torch.zeros(2)})
    assert torch.equal(saved.checkpoint("scratch-f1-s0")["weights"], torch.zeros(2))
    other = RunStore(tmp_path, {"hidden": [32], "task_b": [5, 6, 7, 8, 9]})
    with pytest.raises(ValueError, match=r"hidden: \[16\] -> \[32\]"):
        other.checkpoint("scratch-f1-s0")
    with pytest.raises(ValueError, match="holds unit"):
        path = tmp_path / "checkpoints" / "scratch-f1-s0.pt"
        path.rename(tmp_path / "checkpoints" / "finetune-f1-s0.pt")
        saved.checkpoint("finetune-f1-s0")


def test_checkpoints_are_plain_tensors_loadable_with_weights_only(uninterrupted):
    stages = sorted((uninterrupted / "stages").glob("*.pt"))
    assert stages
    for path in stages:
        payload = torch.load(path, weights_only=True)
        assert payload["format_version"] == 1 and payload["key"] == path.stem


def test_nan_unit_fails_alone_and_the_run_exits_nonzero(tmp_path, capsys):
    out = tmp_path / "nan"
    code = main(["--limit-train", "64", "--limit-eval", "40", "--hidden", "8", "--epochs", "1", "--epochs-a", "1",
                 "--min-steps", "4", "--fractions", "0.2", "--seeds", "0", "--eval-samples", "2", "--methods", "scratch,ewc",
                 "--lr", "1e30", "--quiet", "--out", str(out)])
    assert code == 1
    results = json.loads((out / "results.json").read_text())
    status = {u["method"]: u for u in results["units"]}
    assert status["scratch"]["status"] == "failed"
    assert "step" in status["scratch"]["error"] and "learning rate" in status["scratch"]["error"]
    assert status["ewc"]["status"] in ("ok", "failed")  # a deterministic net may survive; it is recorded either way
    assert "failed" in capsys.readouterr().err


OPTIONS = {
    "--methods": st.sampled_from(["scratch", "transfer", "ewc", "joint", "finetune,scratch", "nope", ""]),
    "--guide": st.sampled_from(["meanfield", "delta", "normal", "gp"]),
    "--estimator": st.sampled_from(["auto", "weights", "local", "exact"]),
    "--kl-schedule": st.sampled_from(["blundell", "uniform", "warmup", "none", "cosine"]),
    "--head": st.sampled_from(["shared", "multihead", "triple"]),
    "--q-init": st.sampled_from(["from-posterior", "fresh", "zeros"]),
    "--fractions": st.sampled_from(["0.1", "0.5,1", "0", "1.5", "1e-9", "x"]),
    "--seeds": st.sampled_from(["0", "1", "-1", "a"]),
    "--prior-scale": st.sampled_from(["1", "0.1", "0", "-1", "nan", "inf"]),
    "--tau": st.sampled_from(["1", "5", "0.5", "nan"]),
    "--lr": st.sampled_from(["1e-3", "0", "-1", "inf"]),
    "--epochs": st.sampled_from(["1", "0", "-2", "x"]),
    "--num-particles": st.sampled_from(["1", "2", "0"]),
    "--task-b": st.sampled_from(["5,6,7,8,9", "4,5,6,7,8", "5,6", "10,11,12,13,14", "5,5,6,7,8"]),
    "--device": st.sampled_from(["cpu", "cuda:7", "toaster"]),
}


@settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(chosen=st.dictionaries(st.sampled_from(sorted(OPTIONS)), st.none(), max_size=4).flatmap(
    lambda keys: st.fixed_dictionaries({k: OPTIONS[k] for k in keys})))
def test_any_cli_arguments_succeed_or_exit_2_with_one_line(tmp_path, capsys, chosen):
    out = tmp_path / uuid.uuid4().hex  # tmp_path is shared by all examples of one test
    args = ["--limit-train", "40", "--limit-eval", "20", "--hidden", "4", "--epochs-a", "1", "--min-steps", "1",
            "--eval-samples", "1", "--seeds", "0", "--fractions", "0.1", "--methods", "scratch", "--quiet", "--out", str(out)]
    for flag, value in chosen.items():
        args += [flag, value]
    try:
        code = main(args)
    except SystemExit as exit_:  # argparse's own errors
        code = exit_.code
    err = capsys.readouterr().err
    assert code in (0, 1, 2), err
    if code == 2:
        assert len(err.strip().splitlines()) == 1 and "Traceback" not in err
        assert not out.exists()
    else:
        assert (out / "results.json").exists()


# The split sequence as units (pyro_bbt.engine): one seed, each task fitted by the rule on a few
# images, so that a unit lasts several epochs and the run can be killed inside one.
SPLIT_TINY = [
    "--sequence", "split", "--scenario", "task", "--preset", "quick", "--limit-train", "200", "--limit-eval", "60", "--hidden", "8",
    "--seeds", "0", "--fit", "rule", "--epochs-a", "3", "--max-epochs-a", "6", "--batch-size-a", "50", "--eval-samples", "4",
    "--methods", "transfer,ewc,joint", "--joint", "last", "--quiet",
]


@pytest.fixture(scope="module")
def split_uninterrupted(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("runs") / "split"
    _run_here([*SPLIT_TINY, "--out", str(out)])
    return out


def test_split_sequence_killed_mid_chain_resumes_to_the_same_results(split_uninterrupted, tmp_path):
    """SIGKILL once a chain unit has finished (its successors still to come), then --resume: the
    finished units are read back, the rest run, and results.json is byte-identical to the
    uninterrupted run's. (That the engine's executors give the same results is tested on the
    grid, tests/test_executors.py, and on the engine's own units.)"""
    out = tmp_path / "killed"
    process = _cli(*SPLIT_TINY, "--out", str(out))
    kill_when(process, (out / "units" / "split-transfer-t1-s0.json").exists)
    assert not (out / "results.json").exists(), "the run finished before it could be killed"
    kept = sorted(p.name for p in (out / "units").iterdir())
    assert "split-first-s0.json" in kept and "split-transfer-t4-s0.json" not in kept, kept
    resumed = _cli(*SPLIT_TINY, "--out", str(out), "--resume")
    _, err = resumed.communicate(timeout=300)
    assert resumed.returncode == 0, err
    assert (out / "results.json").read_bytes() == (split_uninterrupted / "results.json").read_bytes()


def test_split_resume_refuses_another_scenario_and_a_damaged_config(split_uninterrupted, tmp_path, capsys):
    other = [a if a != "task" else "domain" for a in SPLIT_TINY]
    assert main([*other, "--out", str(split_uninterrupted), "--resume"]) == 2
    err = capsys.readouterr().err.strip()
    assert "another configuration" in err and "scenario: 'task' -> 'domain'" in err and len(err.splitlines()) == 1
    damaged = tmp_path / "damaged"
    damaged.mkdir()
    (damaged / "config.json").write_text('{"hidden": [8')
    assert main([*SPLIT_TINY, "--out", str(damaged), "--resume"]) == 2
    err = capsys.readouterr().err.strip()
    assert f"{damaged / 'config.json'} is damaged (JSONDecodeError" in err and len(err.splitlines()) == 1
    assert sorted(p.name for p in damaged.iterdir()) == ["config.json"]


def _interrupt_under_cap_4_and_resume_with_12(cli: list[str], key: str, whole: Path, out: Path, monkeypatch, capsys) -> None:
    """``cli`` run with ``--max-epochs-a 4`` into ``out``, interrupted once the fit ``key`` has
    checkpointed its third epoch; a resume with a lower cap (3) is refused in one line, one with
    12 says the cap rises and ends with ``whole``'s results (a run capped at 12 from the start)."""
    saved_checkpoint = RunStore.save_checkpoint

    def interrupted(self, name, data):
        saved_checkpoint(self, name, data)
        if name == key and data["train_state"]["epoch"] >= 3:
            raise KeyboardInterrupt

    monkeypatch.setattr(RunStore, "save_checkpoint", interrupted)
    with pytest.raises(KeyboardInterrupt):
        main([*cli, "--max-epochs-a", "4", "--out", str(out)])
    monkeypatch.setattr(RunStore, "save_checkpoint", saved_checkpoint)
    assert (out / "checkpoints" / f"{key}.pt").exists() and not (out / "results.json").exists()
    capsys.readouterr()
    assert main([*cli, "--max-epochs-a", "3", "--out", str(out), "--resume"]) == 2
    assert "another configuration (max_epochs_a: 4 -> 3)" in capsys.readouterr().err
    assert main([*cli, "--max-epochs-a", "12", "--out", str(out), "--resume"]) == 0
    assert "a cap rises (max_epochs_a: 4 -> 12)" in capsys.readouterr().err
    assert json.loads((out / "config.json").read_text())["max_epochs_a"] == 12
    assert json.loads((out / "results.json").read_text()) == json.loads((whole / "results.json").read_text())


def test_split_resume_raises_a_cap_and_the_fit_in_progress_runs_to_it(tmp_path, monkeypatch, capsys):
    """The split sequence's first fit interrupted at its third epoch under a cap of 4, resumed
    with a cap of 12: the results equal a run capped at 12 from the start (a fit's epochs before
    its cap do not depend on it). A lowered cap is still refused."""
    one = [a if a != "transfer,ewc,joint" else "transfer" for a in SPLIT_TINY if a not in ("--joint", "last")]
    capped = [a for i, a in enumerate(one) if a != "--max-epochs-a" and (i == 0 or one[i - 1] != "--max-epochs-a")]
    whole = tmp_path / "whole"
    assert main([*capped, "--max-epochs-a", "12", "--out", str(whole)]) == 0
    epochs = json.loads((whole / "results.json").read_text())["methods"]["transfer"]["per_seed"][0]["fits"][0]["convergence"]["epochs"]
    assert epochs > 4, f"the first fit stopped after {epochs} epochs: the lower cap would not have mattered"

    _interrupt_under_cap_4_and_resume_with_12(capped, "split-first-s0", whole, tmp_path / "raised", monkeypatch, capsys)


def test_resume_grows_the_grid_reusing_stored_stages_and_units(uninterrupted, tmp_path, capsys):
    """A run of part of the grid, resumed with the whole grid, ends with the uninterrupted run's
    results; the task-A stage and the unit it held are read back, not fitted again."""
    out = tmp_path / "grown"
    part = {"--fractions": "1", "--seeds": "0", "--methods": "scratch,transfer"}
    small = [part[TINY[i - 1]] if i and TINY[i - 1] in part else arg for i, arg in enumerate(TINY)]
    assert main([*small, "--out", str(out)]) == 0
    kept = [out / "stages" / "A-bayesian-s0.pt", out / "units" / "transfer-f1-s0.json"]
    before = {path: (path.stat().st_mtime_ns, path.read_bytes()) for path in kept}
    assert json.loads((out / "config.json").read_text())["fractions"] == [1.0]
    capsys.readouterr()
    assert main([*TINY, "--out", str(out), "--resume"]) == 0
    err = capsys.readouterr().err
    assert "the grid changes (fractions: [1.0] -> [0.2, 1.0]; methods: ['scratch', 'transfer'] -> ['scratch', 'transfer', 'ewc']; seeds: [0] -> [0, 1])" in err
    assert {path: (path.stat().st_mtime_ns, path.read_bytes()) for path in kept} == before
    assert json.loads((out / "config.json").read_text())["seeds"] == [0, 1]
    assert json.loads((out / "results.json").read_text()) == json.loads((uninterrupted / "results.json").read_text())


def test_resume_that_changes_the_grid_and_another_setting_is_refused(uninterrupted, tmp_path, capsys):
    import shutil

    out = tmp_path / "both"
    shutil.copytree(uninterrupted, out)
    saved = (out / "config.json").read_bytes()
    code = main([*TINY, "--seeds", "0", "--lr", "0.05", "--out", str(out), "--resume"])
    assert code == 2
    err = capsys.readouterr().err.strip()
    assert "another configuration" in err and "lr: 0.001 -> 0.05" in err and len(err.splitlines()) == 1
    assert (out / "config.json").read_bytes() == saved


def test_a_store_with_grid_fields_reads_a_file_that_differs_only_along_them(tmp_path):
    saved = RunStore(tmp_path, {"hidden": [16], "seeds": [0]}, grid_fields=("seeds",))
    saved.save_record("scratch-f1-s0", {"accuracy": 0.5})
    grown = RunStore(tmp_path, {"hidden": [16], "seeds": [0, 1]}, grid_fields=("seeds",))
    assert grown.record("scratch-f1-s0") == {"accuracy": 0.5}
    with pytest.raises(ValueError, match=r"made by another configuration \(seeds: \[0\] -> \[0, 1\]\)"):
        RunStore(tmp_path, {"hidden": [16], "seeds": [0, 1]}).record("scratch-f1-s0")
    with pytest.raises(ValueError, match=r"made by another configuration \(hidden: \[16\] -> \[32\]\)$"):  # what blocks it, alone
        RunStore(tmp_path, {"hidden": [32], "seeds": [0, 1]}, grid_fields=("seeds",)).record("scratch-f1-s0")


def test_a_run_directory_in_the_grids_layout_resumes_without_fitting_a_stage_again(tmp_path, monkeypatch, single_torch_thread):
    """The layout of every A -> B run directory, which the grid keeps on the study engine: a
    task-A stage as its state alone (``stages/KEY.pt``, no record under ``units/``), a B unit as
    its record (``units/KEY.json``). Written here for part of the grid as the driver before the
    engine wrote them (``RunStore.save_stage`` of ``run_stage``'s state, ``RunStore.save_record``
    of ``run_unit``'s record), it resumes: no stage is fitted again nor its file rewritten, each
    stage's ``task_a`` entry is rebuilt from its saved state, only the missing units run, no
    record of a stage appears, and the results are an uninterrupted run's."""
    import pyro_bbt.units as units_module
    from pyro_bbt.experiment import ExperimentConfig, run_experiment
    from pyro_bbt.plan import build_plan
    from pyro_bbt.transfer import split_timing
    from pyro_bbt.units import run_stage, run_unit

    config = ExperimentConfig(hidden=(8,), epochs=1, epochs_a=2, max_epochs_a=None, batch_size=32, min_steps=8, fractions=(0.2, 1.0),
                              seeds=(0,), eval_samples=4, limit_train=200, limit_eval=100, methods=("scratch", "transfer", "finetune", "ewc"))
    fresh: list[str] = []
    whole = run_experiment(config, log=fresh.append, warn=lambda m: None)
    assert fresh[0].startswith("seed 0: task A fitted in ")
    plan = build_plan(config)
    store = RunStore(tmp_path, config.to_dict())
    states = {}
    for spec in plan.stages:
        states[spec.key] = run_stage(config, spec).state
        store.save_stage(spec.key, states[spec.key])
    for spec in plan.units[::2]:
        store.save_record(spec.key, run_unit(config, spec, states.get(spec.needs)))
    files = sorted([*(tmp_path / "stages").iterdir(), *(tmp_path / "units").iterdir()])
    assert [p.name for p in files[:2]] == ["A-bayesian-s0.pt", "A-ewc-s0.pt"] and len(files) == 2 + len(plan.units[::2])
    before = {path: (path.stat().st_mtime_ns, path.read_bytes()) for path in files}
    fitted, fishers = [], []
    fit_posterior, fisher_diagonal = units_module.fit_posterior, units_module.fisher_diagonal

    def counting_fit(*args, key: str, **kwargs):
        fitted.append(key)
        return fit_posterior(*args, key=key, **kwargs)

    def counting_fisher(*args, **kwargs):
        fishers.append(1)
        return fisher_diagonal(*args, **kwargs)

    monkeypatch.setattr(units_module, "fit_posterior", counting_fit)
    monkeypatch.setattr(units_module, "fisher_diagonal", counting_fisher)
    lines: list[str] = []
    resumed = run_experiment(config, log=lines.append, warn=lambda m: None, store=RunStore(tmp_path, config.to_dict()))
    assert sorted(fitted) == sorted(u.key for u in plan.units[1::2] if u.method != "ewc") and fishers == []
    assert {path: (path.stat().st_mtime_ns, path.read_bytes()) for path in files} == before
    assert sorted(p.name for p in (tmp_path / "units").iterdir()) == sorted(f"{u.key}.json" for u in plan.units)
    assert sorted(p.name for p in (tmp_path / "stages").iterdir()) == ["A-bayesian-s0.pt", "A-ewc-s0.pt"]
    assert lines[0].startswith("seed 0: task A taken from the run's store, ") and lines[1].startswith("seed 0: deterministic task A net for EWC")
    assert len(resumed["task_a"]) == 2 and split_timing(resumed)[0] == split_timing(whole)[0]


CAPPED = [
    "--limit-train", "256", "--limit-eval", "120", "--hidden", "16", "--epochs", "2", "--epochs-a", "3", "--batch-size", "32",
    "--min-steps", "16", "--fractions", "1", "--seeds", "0", "--eval-samples", "4", "--methods", "transfer", "--quiet",
]


def test_resume_raises_a_cap_and_the_fit_in_progress_runs_to_it(tmp_path, monkeypatch, capsys):
    """q_A interrupted at its third epoch under a cap of 4 epochs, resumed with a cap of 12: the
    results equal a run made with the cap of 12 from the start (the epochs before a cap do not
    depend on it). A lowered cap is refused."""
    whole = tmp_path / "whole"
    assert main([*CAPPED, "--max-epochs-a", "12", "--out", str(whole)]) == 0
    epochs = json.loads((whole / "results.json").read_text())["task_a"][0]["convergence"]["epochs"]
    assert epochs > 4, f"q_A stopped after {epochs} epochs: the lower cap would not have mattered"

    _interrupt_under_cap_4_and_resume_with_12(CAPPED, "A-bayesian-s0", whole, tmp_path / "raised", monkeypatch, capsys)


def test_stages_from_another_run_that_differs_in_b_s_fields_only(uninterrupted, tmp_path, capsys):
    """A run that fits B by another recipe (the rule, 2 epochs at most, the verdict's steps, q_B
    started fresh, the preconditioned step) on the q_A of a finished run: the stage file is copied byte for byte and read, not fitted again (the
    same task_a entry). A run that differs in anything else is refused in one line, naming the
    field, with nothing written; so are --resume and a run with no stage for the seeds asked."""
    out = tmp_path / "b-recipe"
    one = {"--seeds": "0", "--methods": "transfer", "--fractions": "1"}
    small = [one[TINY[i - 1]] if i and TINY[i - 1] in one else arg for i, arg in enumerate(TINY)]
    b_recipe = ["--fit-b", "rule", "--max-epochs-b", "2", "--polish-steps-b", "2", "--q-init", "fresh", "--precondition-b", "prior-scale"]
    assert main([*small, *b_recipe, "--stages-from", str(uninterrupted), "--out", str(out)]) == 0
    stage = "stages/A-bayesian-s0.pt"
    assert (out / stage).read_bytes() == (uninterrupted / stage).read_bytes()
    ours, theirs = (json.loads((run / "results.json").read_text())["task_a"] for run in (out, uninterrupted))
    assert ours == [entry for entry in theirs if entry["seed"] == 0 and entry["kind"] == "bayesian"]
    capsys.readouterr()
    refused = [
        ([*small, *b_recipe, "--hidden", "8", "--stages-from", str(uninterrupted), "--out", str(tmp_path / "other")], "hidden: [16] -> [8]"),
        ([*small, "--stages-from", str(uninterrupted), "--out", str(out), "--resume"], "--resume continues one with its own stages"),
        ([*small, "--stages-from", str(tmp_path / "nowhere"), "--out", str(tmp_path / "none")], "no task-A stage for --seeds 0"),
    ]
    for argv, message in refused:
        assert main(argv) == 2
        err = capsys.readouterr().err.strip()
        assert message in err and len(err.splitlines()) == 1, err
    assert not (tmp_path / "other").exists() and not (tmp_path / "none").exists()


VERDICT = ["--limit-train", "200", "--limit-eval", "60", "--hidden", "8", "--seeds", "0", "--fractions", "0.5", "--epochs-a", "2",
           "--max-epochs-a", "4", "--batch-size-a", "50", "--fit-b", "rule", "--max-epochs-b", "12", "--window", "2", "--methods", "scratch",
           "--eval-samples", "2", "--epochs", "1", "--min-steps", "3", "--verdict-tol", "10", "--continuation-epochs", "4",
           "--continuation-fraction", "1", "--init-scale", "1", "--quiet"]


def test_resume_raises_the_verdicts_draws_and_the_record_names_the_rise(tmp_path, monkeypatch, capsys):
    """A B fit with a verdict, interrupted at its third epoch without added draws, resumed with
    --continuation-max-draws 16 (and interrupted and resumed once more): accepted, said on
    stderr, and the unit's record names the rise and its epoch, in every checkpoint since and in
    results.json, where a fit that began with 16 draws has no such entry. Lowered draws are refused."""
    saved_checkpoint = RunStore.save_checkpoint
    stop_at = {"epoch": 3}

    def interrupted(self, key, data):
        saved_checkpoint(self, key, data)
        if key == "scratch-f0.5-s0" and data["train_state"]["epoch"] >= stop_at["epoch"]:
            raise KeyboardInterrupt

    out = tmp_path / "run"
    monkeypatch.setattr(RunStore, "save_checkpoint", interrupted)
    with pytest.raises(KeyboardInterrupt):
        main([*VERDICT, "--out", str(out)])
    stop_at["epoch"] = 6
    capsys.readouterr()
    with pytest.raises(KeyboardInterrupt):
        main([*VERDICT, "--continuation-max-draws", "16", "--out", str(out), "--resume"])
    assert "the verdict's draws rise (continuation_max_draws: None -> 16)" in capsys.readouterr().err
    rise = [{"epoch": 3, "fields": {"continuation_max_draws": [0, 16]}}]
    checkpoint = torch.load(out / "checkpoints" / "scratch-f0.5-s0.pt", weights_only=True)["data"]
    assert checkpoint["train_state"]["epoch"] == 6 and checkpoint["raised_on_resume"] == rise
    monkeypatch.setattr(RunStore, "save_checkpoint", saved_checkpoint)
    assert main([*VERDICT, "--out", str(out), "--resume"]) == 2
    assert "another configuration (continuation_max_draws: 16 -> None)" in capsys.readouterr().err
    assert main([*VERDICT, "--continuation-max-draws", "16", "--checkpoint-seconds", "30", "--out", str(out), "--resume"]) == 0
    assert "the checkpoint interval changes (checkpoint_seconds: None -> 30.0)" in capsys.readouterr().err
    assert main([*VERDICT, "--checkpoint-seconds", "-1", "--out", str(tmp_path / "bad")]) == 2
    err = capsys.readouterr().err
    assert "checkpoint-seconds must be a finite number of seconds >= 0 (0: a checkpoint after every epoch), got -1.0" in err and len(err.strip().splitlines()) == 1
    assert not (tmp_path / "bad").exists()
    unit = json.loads((out / "results.json").read_text())["units"][0]
    assert unit["method"] == "scratch" and unit["raised_on_resume"] == rise
    assert json.loads((out / "config.json").read_text())["continuation_max_draws"] == 16
    fresh = tmp_path / "fresh"
    assert main([*VERDICT, "--continuation-max-draws", "16", "--out", str(fresh)]) == 0
    assert "raised_on_resume" not in json.loads((fresh / "results.json").read_text())["units"][0]


def test_a_b_fit_before_its_cap_does_not_depend_on_the_cap(tmp_path):
    """The learning curve's epochs are spread up to the cap, and each point draws weights: from a
    fork of the generators, so a fit under a cap of 12 epochs is the first 12 epochs of the same
    fit under a cap of 40 (what --resume's raised caps rely on), though their curves differ."""
    tight = [arg if prev != "--verdict-tol" else "0.0001" for prev, arg in zip(["", *VERDICT], VERDICT)]
    units = []
    for cap in ("12", "40"):
        args = [arg if prev != "--max-epochs-b" else cap for prev, arg in zip(["", *tight], tight)]
        assert main([*args, "--out", str(tmp_path / cap)]) == 0
        units.append(json.loads((tmp_path / cap / "results.json").read_text())["units"][0])
    short, long = units
    assert len(short["history"]) == 12 and len(long["history"]) > 12
    assert [e["elbo"] for e in short["history"]] == [e["elbo"] for e in long["history"][:12]]
    assert [p["epoch"] for p in short["curve"]] == [1, 2, 5, 12] and [p["epoch"] for p in long["curve"] if p["epoch"] <= 12] == [1, 2, 4, 9]


def test_split_resume_raises_a_cap_and_a_fit_that_stopped_at_the_old_one_runs_on(tmp_path, monkeypatch, capsys):
    """The split sequence run to the end under a cap of 4 (its first fit stops there unconverged,
    its checkpoint kept), then resumed with a cap of 12: the first fit continues from that
    checkpoint (its first new epoch is past 4), the chain after it is fitted again, and the
    results equal a run capped at 12 from the start."""
    one = [a if a != "transfer,ewc,joint" else "transfer" for a in SPLIT_TINY if a not in ("--joint", "last")]
    capped = [a for i, a in enumerate(one) if a != "--max-epochs-a" and (i == 0 or one[i - 1] != "--max-epochs-a")]
    whole, out = tmp_path / "whole", tmp_path / "raised"
    assert main([*capped, "--max-epochs-a", "12", "--out", str(whole)]) == 0
    assert main([*capped, "--max-epochs-a", "4", "--out", str(out)]) == 0
    first = json.loads((out / "results.json").read_text())["methods"]["transfer"]["per_seed"][0]["fits"][0]
    assert first["epochs"] == 4 and not first["convergence"]["converged"]
    assert (out / "checkpoints" / "split-first-s0.pt").exists()

    saved_checkpoint, epochs = RunStore.save_checkpoint, []

    def watched(self, name, data):
        if name == "split-first-s0":
            epochs.append(data["train_state"]["epoch"])
        saved_checkpoint(self, name, data)

    monkeypatch.setattr(RunStore, "save_checkpoint", watched)
    capsys.readouterr()
    assert main([*capped, "--max-epochs-a", "12", "--out", str(out), "--resume"]) == 0
    assert "a cap rises (max_epochs_a: 4 -> 12)" in capsys.readouterr().err
    assert epochs and min(epochs) > 4, epochs
    assert json.loads((out / "results.json").read_text()) == json.loads((whole / "results.json").read_text())
