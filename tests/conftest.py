"""Shared fixtures for the model / guide / objective / evaluation / checkpoint tests."""

import contextlib
import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable

import pyro
import pytest
import torch

from pyro_bbt.data import Split, Task, load_task
from pyro_bbt.guides import GuideConfig, initialize_guide, make_guide
from pyro_bbt.model import BayesianMLP


if os.environ.get("PYTEST_XDIST_WORKER"):  # pytest -n 2: one worker per core, one torch thread each
    torch.set_num_threads(1)


@contextlib.contextmanager
def one_torch_thread():
    """One intra-op torch thread inside, the caller's number restored after (also where a
    module-scoped fixture runs what the subprocesses run with ``OMP_NUM_THREADS=1``)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(threads)


@pytest.fixture
def single_torch_thread():
    """Run a test with one intra-op thread. The networks here are tiny: a second thread brings
    nothing, and on a busy 2-core machine the thread pool's spinning slows training ~8x."""
    with one_torch_thread():
        yield


@pytest.fixture(scope="session")
def mnist3():
    """A few hundred images of a 3-class MNIST task: ``(train, test)`` splits of 300 each."""
    data = load_task(Task(digits=(0, 1, 2)))
    return data.train.subset(300), data.test.subset(300)


def synthetic_batch(batch: int = 8, features: int = 20, classes: int = 3, seed: int = 0):
    """``(x, y)``: standard-normal inputs and uniform labels from a seeded generator."""
    generator = torch.Generator().manual_seed(seed)
    x = torch.randn(batch, features, generator=generator)
    y = torch.randint(0, classes, (batch,), generator=generator)
    return x, y


def fresh_model_and_guide(sizes, guide: str = "meanfield", *, prior=None, seed: int | None = 0, initialize: bool = False, **guide_config):
    """A new ``(model, guide)`` on an empty param store, after seeding Pyro with ``seed`` (``None``:
    leave the random state alone); ``initialize`` creates the guide's parameters at once."""
    pyro.clear_param_store()
    if seed is not None:
        pyro.set_rng_seed(seed)
    model = BayesianMLP(sizes, prior)
    made = make_guide(guide, model, GuideConfig(**guide_config))
    if initialize:
        initialize_guide(made, sizes[0])
    return model, made


def load_benchmark(name: str = "bench"):
    """The script ``benchmarks/<name>.py``, which lives outside the package, imported as the
    top-level module ``name``. Its folder goes first on ``sys.path``, as when the script runs as
    ``python benchmarks/<name>.py``, so that the child processes the bench spawns (they import
    the function they run by its module's name) find it too."""
    import importlib
    from pathlib import Path

    folder = Path(__file__).resolve().parents[1] / "benchmarks"
    if str(folder) not in sys.path:
        sys.path.insert(0, str(folder))
    module = importlib.import_module(name)
    assert Path(module.__file__).resolve() == folder / f"{name}.py", f"{name} imported from {module.__file__}, not {folder}"
    return module


def stopped_at(stop_at: int, cap: int, verdict):
    """A ``TrainConfig`` on :func:`six_feature_split` whose stopping rule stops at epoch
    ``stop_at`` (its criteria always hold; at most ``cap`` epochs), judged by ``verdict``."""
    from pyro_bbt.convergence import StoppingRule
    from pyro_bbt.inference import TrainConfig

    rule = StoppingRule(max_epochs=cap, min_epochs=stop_at, window=1, rel_tol=100.0, scale_tol=100.0, lr_drops=0)
    return TrainConfig(stopping=rule, lr=3e-2, scale_lr=9e-2, batch_size=50, kl_schedule="uniform", progress=False, eval_samples=0,
                       verdict=verdict, warn_unconverged=False)


def six_feature_split(n: int = 200, seed: int = 0) -> Split:
    """``n`` examples of 6 informative standard-normal features (no blank input, so the
    blank-pixel check does not apply) and 3 classes from a fixed rule of the first four."""
    generator = torch.Generator().manual_seed(seed)
    x = torch.randn(n, 6, generator=generator)
    y = (x[:, :3] @ torch.tensor([1.0, -1.0, 0.5]) > 0).long() + (x[:, 3] > 1).long()
    return Split(x, y)


def kill_when(process: subprocess.Popen, ready: Callable[[], bool], timeout: float = 240.0) -> None:
    """SIGKILL ``process`` as soon as ``ready()`` holds (polled every 10 ms), or when it has
    ended or ``timeout`` seconds have passed; wait for it to die."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline and process.poll() is None and not ready():
        time.sleep(0.01)
    process.send_signal(signal.SIGKILL)
    process.wait()


def transfer_cli(*args: str) -> subprocess.Popen:
    """``python -m pyro_bbt.transfer ARGS`` started in a subprocess (one OpenMP thread), its
    output captured as text: a run a test can kill."""
    env = dict(os.environ, OMP_NUM_THREADS="1")
    return subprocess.Popen([sys.executable, "-m", "pyro_bbt.transfer", *args], env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
