"""Executors: where the units of a run execute.

An executor runs :class:`Job` s (a picklable function and its arguments) and hands back their
:class:`JobResult` s one at a time; it never touches the run directory, which the driver
(:func:`~pyro_bbt.engine.run_units`) alone writes.

* :class:`SerialExecutor` runs each job in the driver's process, when asked for its result.
* :class:`ProcessExecutor` runs jobs in a local pool of ``workers`` processes (``spawn``
  context: a fresh interpreter, no state inherited). Jobs and results travel as plain pickles
  over a pipe per worker, so workers need no shared filesystem. A worker that dies (killed, out
  of memory, ``os._exit``) fails the job it was running, with its exit code in the error, and is
  replaced; the other jobs go on.
* :class:`~pyro_bbt.ray_executor.RayExecutor` (``make_executor("ray", ...)``) runs jobs as Ray
  tasks, on a local Ray it starts or on a cluster, and has Ray run a job again (a few times, by
  default) when its worker process or node dies; it lives in :mod:`pyro_bbt.ray_executor`,
  imported only when asked for, because Ray is an optional extra (``pip install -e ".[ray]"``).

A job may report to the driver while it runs through the callable :meth:`Executor.forwarder`
returns (the units send their per-epoch checkpoints that way): called in the job, it runs the
driver's handler in the driver's process (serial: directly; processes: the worker sends the
message over its pipe, ahead of the job's result; Ray: through a queue the driver drains).

A value that many jobs take as an argument (a task-A stage's state, needed by several B units)
goes through :meth:`Executor.share` once: the value itself for the local executors, a reference
into Ray's object store for Ray, passed as a job's argument in place of the value (the job
receives the value).

All run every job with ``threads`` intra-op torch threads (serial: set around each job and
restored after; processes: set once at each worker's start; Ray: set at each task's start),
because torch's float results depend on the number of threads: the same ``threads`` gives the
same numbers whatever the executor and number of workers (on the same kind of CPU). A job that
raises an ``Exception`` becomes a result with the exception's traceback as ``error``; it does
not stop the others.
"""

from __future__ import annotations

import multiprocessing
import os
import pickle
import threading
import traceback
from collections.abc import Callable
from dataclasses import dataclass, field
from multiprocessing.connection import Connection, wait
from typing import Any, Protocol

import torch

__all__ = [
    "EXECUTORS", "Job", "JobResult", "Executor", "ExecutorUnavailableError", "SerialExecutor", "ProcessExecutor", "make_executor",
    "run_job", "check_positive_int", "exit_with_driver",
]

EXECUTORS = ("serial", "processes", "ray")


class ExecutorUnavailableError(RuntimeError):
    """An executor cannot start here: its optional dependency is not installed, or the cluster
    it was pointed at cannot run its jobs. The message names the cause and the fix."""


@dataclass(frozen=True)
class Job:
    """``fn(*args)`` under the name ``key``; for :class:`ProcessExecutor` both must pickle."""

    key: str
    fn: Callable[..., Any]
    args: tuple = ()


@dataclass
class JobResult:
    """The value a job returned, or (``error`` not empty) why it has none."""

    key: str
    value: Any = None
    error: str = ""

    @property
    def ok(self) -> bool:
        return not self.error


class Executor(Protocol):
    """What the driver needs of an executor."""

    threads: int

    def free_slots(self) -> int:
        """How many more jobs may be submitted now."""

    def submit(self, job: Job) -> None:
        """Start ``job`` (at most :meth:`free_slots` at a time)."""

    def busy(self) -> int:
        """Jobs submitted whose result has not been handed back."""

    def next_result(self) -> JobResult:
        """Wait for a submitted job to finish and return its result."""

    def forwarder(self, handler: Callable[[str, Any], None]) -> Callable[[str, Any], None]:
        """A callable to hand to jobs: ``f(key, data)`` inside a job runs ``handler(key, data)``
        in the driver's process."""

    def share(self, value: Any) -> Any:
        """A handle of ``value`` to pass as a job's argument in its place, made once for every
        job that takes it; the job receives ``value``."""

    def close(self) -> None:
        """Stop the workers, if any."""


def check_positive_int(name: str, value: int) -> int:
    """``value`` if it is an integer >= 1 (not a bool); else a ``ValueError`` naming ``name``."""
    if not isinstance(value, int) or isinstance(value, bool) or value < 1:
        raise ValueError(f"{name} must be an integer >= 1, got {value!r}")
    return value


def run_job(job: Job) -> JobResult:
    """Run ``job`` here and now: its value as a :class:`JobResult`, or, if it raises an
    ``Exception``, a result with the traceback as ``error``."""
    try:
        return JobResult(job.key, job.fn(*job.args))
    except Exception:  # noqa: BLE001 -- any failure of one unit is recorded, the others go on
        return JobResult(job.key, None, traceback.format_exc(limit=-3).strip())


class SerialExecutor:
    """Runs one job at a time in this process, with ``threads`` torch threads."""

    def __init__(self, threads: int = 1) -> None:
        self.threads = check_positive_int("threads per unit", threads)
        self._job: Job | None = None

    def free_slots(self) -> int:
        return 0 if self._job is not None else 1

    def submit(self, job: Job) -> None:
        if self._job is not None:
            raise RuntimeError("SerialExecutor runs one job at a time")
        self._job = job

    def busy(self) -> int:
        return 0 if self._job is None else 1

    def next_result(self) -> JobResult:
        job, self._job = self._job, None
        if job is None:
            raise RuntimeError("no job submitted")
        before = torch.get_num_threads()
        torch.set_num_threads(self.threads)
        try:
            return run_job(job)
        finally:
            torch.set_num_threads(before)

    def forwarder(self, handler: Callable[[str, Any], None]) -> Callable[[str, Any], None]:
        return handler

    def share(self, value: Any) -> Any:
        """``value`` itself: jobs run in this process."""
        return value

    def close(self) -> None:
        self._job = None

    def __enter__(self) -> "SerialExecutor":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


_to_driver: Connection | None = None  # in a worker process: its pipe to the driver


class _ToDriver:
    """The forwarder of :class:`ProcessExecutor`: in a worker, sends ``(key, data)`` to the
    driver, whose handler takes it before the job's result."""

    def __call__(self, key: str, data: Any) -> None:
        if _to_driver is None:
            raise RuntimeError("a forwarder of ProcessExecutor is called outside its worker processes")
        _to_driver.send_bytes(pickle.dumps(("message", key, data)))


def exit_with_driver() -> None:
    """In a worker: end the process as soon as the driver's process ends (a killed driver must
    not leave workers training on, competing with the run that resumes it)."""
    parent = multiprocessing.parent_process()
    if parent is not None:
        wait([parent.sentinel])
        os._exit(1)


def _worker_main(conn: Connection, threads: int) -> None:
    """A worker's loop: receive a pickled :class:`Job`, run it, send back the pickled result;
    stop at ``None`` or when the driver's end closes."""
    global _to_driver
    _to_driver = conn
    torch.set_num_threads(threads)
    threading.Thread(target=exit_with_driver, daemon=True, name="pyro_bbt-watchdog").start()
    while True:
        try:
            data = conn.recv_bytes()
        except (EOFError, OSError):
            return
        job = pickle.loads(data)
        if job is None:
            return
        result = run_job(job)
        try:
            payload = pickle.dumps(("result", result))
        except Exception as error:  # noqa: BLE001 -- an unpicklable value is the job's failure
            payload = pickle.dumps(("result", JobResult(job.key, None, f"result could not be sent back: {type(error).__name__}: {error}")))
        conn.send_bytes(payload)


@dataclass(eq=False)
class _Worker:
    process: Any
    conn: Connection
    job: Job | None = field(default=None)


class ProcessExecutor:
    """Runs jobs in up to ``workers`` spawned processes, each with ``threads`` torch threads."""

    def __init__(self, workers: int = 1, threads: int = 1) -> None:
        self.workers = check_positive_int("workers", workers)
        self.threads = check_positive_int("threads per unit", threads)
        self._context = multiprocessing.get_context("spawn")
        self._pool: list[_Worker] = []
        self._handler: Callable[[str, Any], None] | None = None

    def forwarder(self, handler: Callable[[str, Any], None]) -> Callable[[str, Any], None]:
        self._handler = handler
        return _ToDriver()

    def share(self, value: Any) -> Any:
        """``value`` itself: it is pickled into every job that takes it."""
        return value

    def _start(self) -> _Worker:
        ours, theirs = self._context.Pipe(duplex=True)
        process = self._context.Process(target=_worker_main, args=(theirs, self.threads), daemon=True, name="pyro_bbt-worker")
        process.start()
        theirs.close()
        worker = _Worker(process, ours)
        self._pool.append(worker)
        return worker

    def free_slots(self) -> int:
        return self.workers - self.busy()

    def busy(self) -> int:
        return sum(w.job is not None for w in self._pool)

    def submit(self, job: Job) -> None:
        idle = [w for w in self._pool if w.job is None]
        if not idle and len(self._pool) >= self.workers:
            raise RuntimeError("every worker is busy")
        worker = idle[0] if idle else self._start()
        worker.job = job
        try:
            worker.conn.send_bytes(pickle.dumps(job))
        except (OSError, EOFError):  # died while idle; its death is reported by next_result
            pass

    def next_result(self) -> JobResult:
        running = [w for w in self._pool if w.job is not None]
        if not running:
            raise RuntimeError("no job submitted")
        while True:
            ready = wait([w.conn for w in running] + [w.process.sentinel for w in running])
            for worker in running:
                if worker.conn in ready or worker.conn.poll():
                    try:
                        message = pickle.loads(worker.conn.recv_bytes())
                    except (EOFError, OSError):
                        return self._died(worker)
                    if message[0] == "message":
                        if self._handler is not None:
                            self._handler(message[1], message[2])
                        break  # wait again
                    worker.job = None
                    return message[1]
                if worker.process.sentinel in ready:
                    return self._died(worker)

    def _died(self, worker: _Worker) -> JobResult:
        """The result of the job whose worker died; the worker is dropped (a new one starts on
        the next submit)."""
        worker.process.join(timeout=5)
        code = worker.process.exitcode
        job = worker.job
        worker.conn.close()
        self._pool.remove(worker)
        how = f"exit code {code}" if code is None or code >= 0 else f"killed by signal {-code}"
        return JobResult(job.key, None, f"worker process died ({how}) while running {job.key}")

    def close(self) -> None:
        """Ask every worker to stop, and terminate those still tearing down after a moment: they
        hold nothing that needs saving (results have all come back)."""
        for worker in self._pool:
            try:
                worker.conn.send_bytes(pickle.dumps(None))
            except (OSError, EOFError):
                pass
        for worker in self._pool:
            worker.process.join(timeout=0.2)
            if worker.process.is_alive():
                worker.process.terminate()
                worker.process.join(timeout=5)
            worker.conn.close()
        self._pool = []

    def __enter__(self) -> "ProcessExecutor":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def make_executor(name: str, workers: int = 1, threads: int = 1, *, ray_address: str | None = None,
                  gpus_per_unit: float = 0.0, ray_retries: int | None = None) -> Executor:
    """The executor called ``name`` (one of :data:`EXECUTORS`); ``ValueError`` naming the value
    and the choices otherwise. ``workers`` counts for ``processes`` and ``ray`` only;
    ``ray_address``, ``gpus_per_unit`` and ``ray_retries`` are
    :class:`~pyro_bbt.ray_executor.RayExecutor`'s ``address``, ``gpus_per_unit`` and
    ``max_retries`` (``None``: its default), and a ``ValueError`` if set for another executor.
    ``ray`` starts or connects to Ray at once, and raises :class:`ExecutorUnavailableError`
    when Ray is not installed or the cluster cannot run the units."""
    if name not in EXECUTORS:
        raise ValueError(f"unknown executor {name!r}; allowed: {', '.join(EXECUTORS)}")
    if name != "ray" and (ray_address is not None or gpus_per_unit or ray_retries is not None):
        raise ValueError(f"ray_address, gpus_per_unit and ray_retries are settings of the ray executor, not of {name!r}")
    if name == "serial":
        return SerialExecutor(threads)
    if name == "processes":
        return ProcessExecutor(workers, threads)
    from .ray_executor import DEFAULT_MAX_RETRIES, RayExecutor  # Ray is optional: imported only when asked for

    retries = DEFAULT_MAX_RETRIES if ray_retries is None else ray_retries
    return RayExecutor(workers, threads, address=ray_address, gpus_per_unit=gpus_per_unit, max_retries=retries)
