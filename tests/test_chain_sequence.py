"""The rotation and permutation chains as units on the study engine (pyro_bbt.chain_sequence):
the same numbers as fitting the chain by hand, a kill + --resume and another executor leave
results.json byte-identical."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from conftest import kill_when, transfer_cli
from pyro_bbt.chain_sequence import SEQUENCE_LENGTH, sequence_tasks
from pyro_bbt.data import load_task
from pyro_bbt.experiment import ExperimentConfig
from pyro_bbt.fitting import fit_posterior, guide_state, prior_from_posterior
from pyro_bbt.transfer import build_parser, config_from_args, main
from pyro_bbt.units import bayesian_metrics, steps_for

# One seed, both methods, 60 training images in minibatches of 30 for 12 steps (6 epochs, each
# checkpointed): a unit lasts long enough to be killed after the first one, the run a few seconds.
TINY_ARGS = ["--sequence", "rotations", "--methods", "transfer,finetune", "--hidden", "8", "--epochs", "1", "--min-steps", "12",
             "--batch-size", "30", "--seeds", "0", "--limit-train", "60", "--limit-eval", "40", "--eval-samples", "2", "--quiet"]


_cli = transfer_cli


@pytest.fixture(scope="module")
def serial_run(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("chains") / "serial"
    assert main([*TINY_ARGS, "--out", str(out)]) == 0
    return out


def _by_hand(config: ExperimentConfig, method: str, seed: int) -> dict:
    """The chain fitted directly, task after task: what the serial loop before the engine computed."""
    data = [load_task(t, limit_train=config.limit_train, limit_eval=config.limit_eval) for t in sequence_tasks("rotations", config.task_a, seed)]
    prior, state, baseline, rows, fits = config.base_prior(), None, None, [], []
    for task in data:
        model, guide = config.new_posterior(prior, seed)
        if baseline is None:
            baseline = [bayesian_metrics(model, guide, d.test, config.eval_samples, 0).accuracy for d in data]
        if state is not None:
            guide.load_state_dict(state)
        steps = steps_for(len(task.train), config.epochs, config.batch_size, config.min_steps)
        fit = fit_posterior(model, guide, task.train, config.recipe_b(steps), seed)
        fits.append({"steps": fit.steps, "epochs": fit.epochs, "convergence": fit.convergence})
        rows.append([bayesian_metrics(model, guide, d.test, config.eval_samples, 0).accuracy for d in data])
        state = guide_state(guide)
        if method == "transfer":
            prior = prior_from_posterior(guide, model, config.base_prior(), config.base_prior_std, config.tau)
    return json.loads(json.dumps({"accuracy_matrix": rows, "random_init_accuracy": baseline, "fits": fits}))  # as results.json holds it


def test_engine_run_gives_the_numbers_of_the_chain_fitted_by_hand(serial_run, single_torch_thread):
    results = json.loads((serial_run / "results.json").read_text())
    assert results["sequence"] == "rotations" and results["domains"] == ["rot0", "rot15", "rot30", "rot45"]
    assert json.loads((serial_run / "config.json").read_text())["sequence"] == "rotations"
    assert sorted(p.name for p in (serial_run / "units").iterdir()) == sorted(
        f"rotations-{m}-t{t}-s0.json" for m in ("transfer", "finetune") for t in range(SEQUENCE_LENGTH))
    timing = json.loads((serial_run / "timing.json").read_text())
    assert "methods/transfer/per_seed/0/fits/3" in timing and "wall_clock" in timing
    config = config_from_args(build_parser().parse_args(TINY_ARGS))  # the quick preset's, with TINY_ARGS
    for method in ("transfer", "finetune"):
        (entry,) = results["methods"][method]["per_seed"]
        expected = _by_hand(config, method, 0)
        assert entry["accuracy_matrix"] == expected["accuracy_matrix"], method
        assert entry["random_init_accuracy"] == expected["random_init_accuracy"]
        assert [{k: f[k] for k in ("steps", "epochs", "convergence")} for f in entry["fits"]] == expected["fits"]
        assert [f["task"] for f in entry["fits"]] == [0, 1, 2, 3] and entry["fits"][0]["steps"] == 12
        assert entry["summary"]["average_accuracy"] == pytest.approx(np.mean(expected["accuracy_matrix"][-1]))
        assert results["methods"][method]["accuracy_matrix_mean"] == entry["accuracy_matrix"]
    # the two methods share task 0's computation (base prior, fresh guide), so its row too
    assert results["methods"]["transfer"]["per_seed"][0]["accuracy_matrix"][0] == results["methods"]["finetune"]["per_seed"][0]["accuracy_matrix"][0]


def test_killed_run_resumes_to_byte_identical_results(serial_run, tmp_path):
    """SIGKILL once the first unit is stored (its successors still to come), then --resume: the
    stored units are read back, the rest run, and results.json is the uninterrupted run's."""
    out = tmp_path / "killed"
    process = _cli(*TINY_ARGS, "--out", str(out))
    kill_when(process, (out / "units" / "rotations-transfer-t0-s0.json").exists, timeout=120)
    assert not (out / "results.json").exists(), "the run finished before it could be killed"
    kept = sorted(p.name for p in (out / "units").iterdir())
    assert "rotations-transfer-t0-s0.json" in kept and "rotations-finetune-t3-s0.json" not in kept, kept
    assert main([*TINY_ARGS, "--out", str(out), "--resume"]) == 0
    assert (out / "results.json").read_bytes() == (serial_run / "results.json").read_bytes()


def test_process_executor_gives_byte_identical_results(serial_run, tmp_path):
    out = tmp_path / "processes"
    assert main([*TINY_ARGS, "--executor", "processes", "--workers", "2", "--out", str(out)]) == 0
    assert (out / "results.json").read_bytes() == (serial_run / "results.json").read_bytes()


def test_resume_refuses_another_sequence(serial_run, capsys):
    other = [a if a != "rotations" else "permutations" for a in TINY_ARGS]
    assert main([*other, "--out", str(serial_run), "--resume"]) == 2
    err = capsys.readouterr().err.strip()
    assert "another configuration" in err and "sequence: 'rotations' -> 'permutations'" in err and len(err.splitlines()) == 1


def test_a_non_finite_loss_stops_the_chain_and_exits_1(tmp_path, capsys):
    out = tmp_path / "diverged"
    assert main([*TINY_ARGS, "--methods", "finetune", "--lr", "1e30", "--scale-lr", "1e30", "--init-scale", "10", "--out", str(out)]) == 1
    assert "a task failed (NaN/inf, or an error) for finetune" in capsys.readouterr().err
    (entry,) = json.loads((out / "results.json").read_text())["methods"]["finetune"]["per_seed"]
    assert entry["error"].startswith("task 0: ") and "summary" not in entry and entry["fits"] == []
    assert np.isnan(entry["accuracy_matrix"]).all() and len(entry["random_init_accuracy"]) == SEQUENCE_LENGTH
