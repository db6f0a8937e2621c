"""The plan, the executors, and identical results whatever the executor (``--executor``).

The Ray tests are skipped where Ray is not installed (``pip install -e ".[ray]"``); they share
one local Ray, started by the module-scoped fixture ``ray_session``."""

from __future__ import annotations

import json
import operator
import os
import shutil
import socket
import sys
import time
from dataclasses import replace
from pathlib import Path

import pytest
import torch

from pyro_bbt.executors import ExecutorUnavailableError, Job, ProcessExecutor, SerialExecutor, make_executor
from pyro_bbt.engine import UnitOutcome, run_units
from pyro_bbt.experiment import ExperimentConfig, grid_units, run_experiment
from pyro_bbt.plan import build_plan
from pyro_bbt.ray_executor import RayExecutor, check_reachable
from pyro_bbt.runstore import RunStore
from pyro_bbt.transfer import main

# One seed, two fractions, every method, a few steps: seconds per run.
TINY = [
    "--limit-train", "200", "--limit-eval", "100", "--hidden", "8", "--epochs", "1", "--epochs-a", "2", "--max-epochs-a", "none",
    "--batch-size", "32", "--min-steps", "8", "--fractions", "0.2,1", "--seeds", "0", "--eval-samples", "4", "--quiet",
]
TINY_CONFIG = dict(hidden=(8,), epochs=1, epochs_a=2, max_epochs_a=None, batch_size=32, min_steps=8, fractions=(1.0,), seeds=(0,),
                   eval_samples=4, limit_train=200, limit_eval=100)


@pytest.fixture(scope="module")
def serial_run(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("serial") / "run"
    assert main([*TINY, "--out", str(out)]) == 0
    return out


@pytest.fixture(scope="module")
def processes_run(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("processes") / "run"
    assert main([*TINY, "--out", str(out), "--executor", "processes", "--workers", "2"]) == 0
    return out


def test_plan_lists_stages_before_the_units_that_need_them():
    plan = build_plan(ExperimentConfig(**{**TINY_CONFIG, "fractions": (0.2, 1.0)}))
    assert [s.key for s in plan.stages] == ["A-bayesian-s0", "A-ewc-s0"]
    assert len(plan.units) == 2 * 5 and len(plan) == 12
    needs = {u.method: u.needs for u in plan.units if u.fraction == 0.2}
    assert needs == {"scratch": None, "transfer": "A-bayesian-s0", "finetune": "A-bayesian-s0", "ewc": "A-ewc-s0", "joint": None}
    order = [item.key for item in plan.order]
    assert all(order.index(u.needs) < order.index(u.key) for u in plan.units if u.needs)
    joint, scratch = (next(u for u in plan.units if u.method == m and u.fraction == 1.0) for m in ("joint", "scratch"))
    assert joint.steps > scratch.steps  # A's budget and B's


def test_serial_and_processes_give_byte_identical_results(serial_run, processes_run):
    assert (processes_run / "results.json").read_bytes() == (serial_run / "results.json").read_bytes()
    results = json.loads((serial_run / "results.json").read_text())
    assert results["schema_version"] == 3 and results["threads_per_unit"] == 1
    assert {u["method"] for u in results["units"]} == {"scratch", "transfer", "finetune", "ewc", "joint"}
    assert all(u["status"] == "ok" for u in results["units"])
    assert '"seconds"' not in (serial_run / "results.json").read_text()
    timing = json.loads((processes_run / "timing.json").read_text())
    assert timing["workers"] == 2 and all(timing[f"units/{i}"] >= 0 for i in range(len(results["units"])))


def test_resume_under_the_other_executor_gives_the_same_bytes(serial_run, processes_run, tmp_path):
    """Half the units and a stage written by worker processes, the rest by the serial executor."""
    out = tmp_path / "partial"
    shutil.copytree(processes_run, out)
    (out / "results.json").unlink()
    for path in sorted((out / "units").glob("*.json"))[::2]:
        path.unlink()
    (out / "stages" / "A-bayesian-s0.pt").unlink()
    assert main([*TINY, "--out", str(out), "--resume"]) == 0
    assert (out / "results.json").read_bytes() == (serial_run / "results.json").read_bytes()


def test_serial_executor_sets_the_threads_around_each_job_only():
    before = torch.get_num_threads()
    executor = SerialExecutor(threads=before + 1)
    executor.submit(Job("threads", torch.get_num_threads))
    assert executor.next_result().value == before + 1 and torch.get_num_threads() == before


class _CountingExecutor(SerialExecutor):
    """Wraps every shared value, and counts them."""

    def __init__(self) -> None:
        super().__init__()
        self.shared: list = []

    def share(self, value):
        self.shared.append(value)
        return ("handle", value)


STAGE_STATE = {"w": torch.ones(2)}


def _stage_stub(config, spec, saved, checkpoint, on_checkpoint) -> UnitOutcome:
    return UnitOutcome({"status": "ok"}, STAGE_STATE)


def _unit_stub(config, spec, stage, checkpoint, on_checkpoint) -> UnitOutcome:
    return UnitOutcome({"status": "ok", "stage": stage})


def test_the_driver_shares_a_stage_once_for_all_the_units_that_need_it():
    """The grid's units on the engine (training stubbed): q_A's state goes through
    ``executor.share`` once, and every unit that needs it receives that handle."""
    config = ExperimentConfig(**{**TINY_CONFIG, "fractions": (0.2, 1.0), "methods": ("scratch", "transfer", "finetune")})
    units = [replace(u, fn=_stage_stub if u.kept == "state" else _unit_stub) for u in grid_units(config, build_plan(config))]
    executor = _CountingExecutor()
    out = run_units(units, executor)
    assert executor.shared == [STAGE_STATE]
    needing = [u.key for u in units if u.needs == ("A-bayesian-s0",)]
    assert len(needing) == 4 and all(out[key].record["stage"] == ("handle", STAGE_STATE) for key in needing)
    assert out["scratch-f1-s0"].record["stage"] is None


class _KillingExecutor(ProcessExecutor):
    """Runs ``os._exit(9)`` in a worker in place of the job ``victim``."""

    def __init__(self, victim: str, **kwargs) -> None:
        super().__init__(**kwargs)
        self.victim = victim

    def submit(self, job: Job) -> None:
        super().submit(Job(job.key, os._exit, (9,)) if job.key == self.victim else job)


def test_killed_workers_fail_their_job_alone_and_the_grid_completes(tmp_path):
    """A worker killed while it fits q_A fails that stage and the units that need it (recorded,
    not saved, so a resume runs them again); the rest of the grid completes. Then, on the same
    pool: a job that kills its worker or raises fails alone, workers run with ``threads``, and a
    job's forwarded message reaches the driver's handler."""
    config = ExperimentConfig(**{**TINY_CONFIG, "methods": ("scratch", "transfer")})
    store = RunStore(tmp_path, config.to_dict())
    with _KillingExecutor("A-bayesian-s0", workers=2, threads=2) as executor:
        results = run_experiment(config, log=lambda m: None, store=store, executor=executor)
        messages = []
        forward = executor.forwarder(lambda key, data: messages.append((key, data)))
        done = {}
        jobs = (Job("raises", int, ("x",)), Job("threads", torch.get_num_threads), Job("sum", sum, ([1, 2],)),
                Job("reports", operator.call, (forward, "epoch", {"w": torch.ones(2)})), Job("dies", os._exit, (7,)))
        for job in jobs:
            executor.submit(job)  # one at a time: the surviving worker runs them all, no new one starts
            done[job.key] = executor.next_result()
    status = {u["method"]: u for u in results["units"]}
    assert status["scratch"]["status"] == "ok"
    assert status["transfer"]["status"] == "failed"
    assert status["transfer"]["error"] == "task A failed: worker process died (exit code 9) while running A-bayesian-s0"
    assert results["task_a"] == []
    assert store.record("scratch-f1-s0") is not None and store.record("transfer-f1-s0") is None
    assert store.stage("A-bayesian-s0") is None
    assert done["dies"].error == "worker process died (exit code 7) while running dies"
    assert "ValueError" in done["raises"].error and "'x'" in done["raises"].error
    assert done["threads"].value == 2 and done["sum"].value == 3 and done["sum"].ok
    assert done["reports"].ok and len(messages) == 1 and messages[0][0] == "epoch" and messages[0][1]["w"].equal(torch.ones(2))


@pytest.mark.parametrize(
    "args, needle",
    [
        (["--executor", "threads"], "unknown --executor 'threads'; allowed: serial, processes, ray"),
        (["--workers", "0"], "--workers"),
        (["--threads-per-unit", "two"], "--threads-per-unit"),
        (["--workers", "2"], "--workers 2 needs --executor processes or ray"),
        (["--ray-address", "head:6379"], "--ray-address needs --executor ray (got --executor serial)"),
        (["--executor", "processes", "--gpus-per-unit", "0.5"], "--gpus-per-unit needs --executor ray"),
        (["--executor", "ray", "--gpus-per-unit", "1.5"], "--gpus-per-unit: expected a fraction in (0, 1] or a whole number of GPUs, got '1.5'"),
        (["--executor", "ray", "--gpus-per-unit", "0.5"], "--gpus-per-unit 0.5 needs --device cuda (got --device cpu)"),
        (["--executor", "processes", "--ray-retries", "1"], "--ray-retries needs --executor ray (got --executor processes)"),
        (["--executor", "ray", "--ray-retries", "-1"], "--ray-retries: expected an integer >= 0, got '-1'"),
        (["--executor", "ray", "--ray-retries", "many"], "--ray-retries: expected an integer >= 0, got 'many'"),
    ],
)
def test_cli_rejects_bad_executor_settings_with_one_line(tmp_path, capsys, args, needle):
    try:
        code = main([*TINY, *args, "--out", str(tmp_path / "x")])
    except SystemExit as exit_:  # argparse's own errors
        code = exit_.code
    assert code == 2
    lines = capsys.readouterr().err.strip().splitlines()
    assert len(lines) == 1 and needle in lines[0]
    assert not (tmp_path / "x").exists()


def test_make_executor_refuses_ray_settings_for_another_executor():
    with pytest.raises(ValueError, match="settings of the ray executor, not of 'processes'"):
        make_executor("processes", 2, ray_address="head:6379")
    with pytest.raises(ValueError, match="settings of the ray executor, not of 'serial'"):
        make_executor("serial", ray_retries=0)


def test_cli_without_ray_says_how_to_install_it_and_writes_nothing(tmp_path, capsys, monkeypatch):
    """``import ray`` fails (as where the extra is not installed): one line naming the fix, exit 2."""
    monkeypatch.setitem(sys.modules, "ray", None)  # makes `import ray` raise ImportError
    out = tmp_path / "x"
    assert main([*TINY, "--executor", "ray", "--workers", "2", "--out", str(out)]) == 2
    lines = capsys.readouterr().err.strip().splitlines()
    assert len(lines) == 1 and "--executor ray" in lines[0] and 'pip install -e ".[ray]"' in lines[0]
    assert not out.exists()


def _closed_port() -> int:
    """A local port nothing listens on (bound, then released)."""
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def test_an_unreachable_ray_address_is_refused_at_once_and_a_listening_one_passes():
    port = _closed_port()
    start = time.perf_counter()
    with pytest.raises(ExecutorUnavailableError, match=f"cannot reach the Ray cluster at '127.0.0.1:{port}' within 10 s"):
        check_reachable(f"127.0.0.1:{port}")
    with pytest.raises(ExecutorUnavailableError, match=f"'ray://127.0.0.1:{port}'"):
        check_reachable(f"ray://127.0.0.1:{port}")
    assert time.perf_counter() - start < 5  # refused, not retried for minutes
    with socket.socket() as server:
        server.bind(("127.0.0.1", 0))
        server.listen()
        check_reachable(f"127.0.0.1:{server.getsockname()[1]}")  # a head's port that accepts: no error
    check_reachable("auto")  # Ray resolves it
    for bad in ("head:port", "head:0", ":6379", "head:70000"):
        with pytest.raises(ValueError, match=f"the Ray address must be HOST:PORT .*got '{bad}'"):
            check_reachable(bad)


def test_cli_with_an_unreachable_ray_address_exits_2_with_one_line_and_writes_nothing(tmp_path, capsys):
    out = tmp_path / "x"
    port = _closed_port()
    assert main([*TINY, "--executor", "ray", "--workers", "2", "--ray-address", f"127.0.0.1:{port}", "--out", str(out)]) == 2
    lines = capsys.readouterr().err.strip().splitlines()
    assert len(lines) == 1 and f"cannot reach the Ray cluster at '127.0.0.1:{port}'" in lines[0]
    assert not out.exists()


# --------------------------------------------------------------------------- Ray


@pytest.fixture(scope="module")
def ray_session():
    """One local Ray of 2 CPUs for the module, started and at the end shut down by a
    ``RayExecutor(workers=2, threads=1)``; the executors the tests make meanwhile (the CLI's too)
    find it running, use it, and leave it running."""
    pytest.importorskip("ray")
    with RayExecutor(workers=2, threads=1) as executor:
        assert executor._owns_ray
        yield executor


@pytest.fixture(scope="module")
def ray_run(tmp_path_factory, ray_session) -> Path:
    out = tmp_path_factory.mktemp("ray") / "run"
    assert main([*TINY, "--out", str(out), "--executor", "ray", "--workers", "2"]) == 0
    return out


def test_serial_and_ray_give_byte_identical_results(serial_run, ray_run):
    assert (ray_run / "results.json").read_bytes() == (serial_run / "results.json").read_bytes()
    timing = json.loads((ray_run / "timing.json").read_text())
    assert timing["workers"] == 2


def test_a_run_begun_under_ray_resumes_under_serial_to_the_same_bytes(serial_run, ray_run, tmp_path):
    """Half the units and a stage written by Ray tasks, the rest by the serial executor."""
    out = tmp_path / "partial"
    shutil.copytree(ray_run, out)
    (out / "results.json").unlink()
    for path in sorted((out / "units").glob("*.json"))[1::2]:
        path.unlink()
    (out / "stages" / "A-ewc-s0.pt").unlink()
    assert main([*TINY, "--out", str(out), "--resume"]) == 0
    assert (out / "results.json").read_bytes() == (serial_run / "results.json").read_bytes()


class _KillingRayExecutor(RayExecutor):
    """Runs ``os._exit(9)`` in a Ray worker in place of the job ``victim``."""

    def __init__(self, victim: str, **kwargs) -> None:
        super().__init__(**kwargs)
        self.victim = victim

    def submit(self, job: Job) -> None:
        super().submit(Job(job.key, os._exit, (9,)) if job.key == self.victim else job)


class _ListingStore(RunStore):
    """A run store that also lists the keys of the checkpoints it is asked to save."""

    def __init__(self, *args, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.checkpointed: list[str] = []

    def save_checkpoint(self, key: str, data: dict) -> None:
        self.checkpointed.append(key)
        super().save_checkpoint(key, data)


def test_ray_task_whose_worker_dies_fails_alone_and_the_grid_completes(ray_session, tmp_path):
    """With no retries (``max_retries=0``, ``--ray-retries 0``), as with worker processes: a Ray
    worker killed while it fits q_A fails that stage and the units that need it (recorded, not
    saved), the rest completes and its per-epoch checkpoints reach the driver's store before its
    record (which clears them). Then: a job that kills its worker or raises fails alone, tasks
    run with ``threads``, a shared value reaches the job, and a job's forwarded message reaches
    the driver's handler before its result."""
    config = ExperimentConfig(**{**TINY_CONFIG, "methods": ("scratch", "transfer")})
    store = _ListingStore(tmp_path, config.to_dict())
    with _KillingRayExecutor("A-bayesian-s0", workers=2, threads=1, max_retries=0) as executor:
        results = run_experiment(config, log=lambda m: None, store=store, executor=executor)
        done = {}
        with RayExecutor(workers=1, threads=2) as two_threads:  # on the same Ray, before a worker dies again
            two_threads.submit(Job("threads", torch.get_num_threads))
            done["threads"] = two_threads.next_result()
        messages = []
        forward = executor.forwarder(lambda key, data: messages.append((key, data)))
        jobs = (Job("raises", int, ("x",)), Job("sum", sum, (executor.share([1, 2]),)),
                Job("reports", operator.call, (forward, "epoch", {"w": torch.ones(2)})), Job("dies", os._exit, (7,)))
        for job in jobs:
            executor.submit(job)
            done[job.key] = executor.next_result()
    status = {u["method"]: u for u in results["units"]}
    assert status["scratch"]["status"] == "ok"
    assert status["transfer"]["status"] == "failed"
    assert status["transfer"]["error"].startswith("task A failed: Ray task for A-bayesian-s0 failed: WorkerCrashedError: ")
    assert results["task_a"] == []
    assert store.record("scratch-f1-s0") is not None and store.record("transfer-f1-s0") is None
    assert store.stage("A-bayesian-s0") is None
    assert "scratch-f1-s0" in store.checkpointed and store.checkpoint("scratch-f1-s0") is None
    assert done["dies"].error.startswith("Ray task for dies failed: WorkerCrashedError: ")
    assert "ValueError" in done["raises"].error and "'x'" in done["raises"].error
    assert done["threads"].value == 2 and done["sum"].value == 3 and done["sum"].ok
    assert done["reports"].ok and len(messages) == 1 and messages[0][0] == "epoch" and messages[0][1]["w"].equal(torch.ones(2))


def _exit_the_first_time(marker: str, value: int) -> int:
    """``value``, after killing the worker process the first time it is called (when the file
    ``marker`` does not exist yet; it creates it)."""
    if not os.path.exists(marker):
        Path(marker).touch()
        os._exit(9)
    return value


def _count_and_raise(counter: str) -> None:
    """Append a line to the file ``counter`` (one per call), then raise."""
    with open(counter, "a") as file:
        file.write("called\n")
    raise RuntimeError("raised on purpose")


@pytest.fixture
def test_functions_by_value():
    """Ray's workers cannot import this test module: send its functions by value."""
    import ray.cloudpickle

    module = sys.modules[__name__]
    ray.cloudpickle.register_pickle_by_value(module)
    yield
    ray.cloudpickle.unregister_pickle_by_value(module)


def test_ray_retries_a_task_whose_worker_dies_but_not_one_that_raises(ray_session, tmp_path, test_functions_by_value):
    """With retries (the default: 3), a job whose worker process dies the first time runs again
    and its result comes back; with none it fails; a job that raises is run once, whatever the
    retries."""
    from pyro_bbt.ray_executor import DEFAULT_MAX_RETRIES

    with make_executor("ray") as default:  # on the module's Ray
        assert default.max_retries == DEFAULT_MAX_RETRIES == 3
    done = {}
    for retries in (1, 0):
        with RayExecutor(workers=1, threads=1, max_retries=retries) as executor:
            executor.submit(Job(f"dies once, {retries} retries", _exit_the_first_time, (str(tmp_path / f"ran-{retries}"), 7)))
            done[retries] = executor.next_result()
            executor.submit(Job("raises", _count_and_raise, (str(tmp_path / f"calls-{retries}"),)))
            done[f"raises-{retries}"] = executor.next_result()
    assert done[1].ok and done[1].value == 7
    assert done[0].error.startswith("Ray task for dies once, 0 retries failed: WorkerCrashedError: ")
    for retries in (1, 0):
        assert "RuntimeError: raised on purpose" in done[f"raises-{retries}"].error
        assert (tmp_path / f"calls-{retries}").read_text() == "called\n"
    with pytest.raises(ValueError, match="Ray task retries must be an integer >= 0, got -1"):
        RayExecutor(max_retries=-1)


def test_ray_refuses_a_cluster_that_cannot_run_a_unit(ray_session):
    """The module's Ray has 2 CPUs and no GPU: a task asking for more would wait for ever."""
    with pytest.raises(ExecutorUnavailableError, match="has 2 CPUs, fewer than the 3 threads per unit"):
        RayExecutor(workers=1, threads=3)
    with pytest.raises(ExecutorUnavailableError, match="has 0 GPUs, fewer than the 0.5 GPUs per unit"):
        RayExecutor(workers=2, gpus_per_unit=0.5)
    with pytest.raises(ValueError, match="already initialised in this process"):
        RayExecutor(address="head:6379")
    with pytest.raises(ValueError, match="GPUs per unit must be 0, a fraction in"):
        RayExecutor(gpus_per_unit=1.5)


def test_a_failed_connection_names_token_authentication_unless_the_driver_asks_for_it():
    from pyro_bbt.ray_executor import AUTH_HINT, connect_hint
    assert connect_hint({}) == f"; {AUTH_HINT}" and "RAY_AUTH_MODE=token" in AUTH_HINT and "~/.ray/auth_token" in AUTH_HINT
    assert connect_hint({"RAY_AUTH_MODE": "disabled"}) == f"; {AUTH_HINT}"
    assert connect_hint({"RAY_AUTH_MODE": "token"}) == "" and connect_hint({"RAY_AUTH_MODE": " TOKEN "}) == ""
