"""``--executor ray``: the units of a run as Ray tasks, on this machine or on a Ray cluster.

Ray is optional (the extra ``ray``: ``pip install -e ".[ray]"``); this module imports it only
when a :class:`RayExecutor` is made, and raises
:class:`~pyro_bbt.executors.ExecutorUnavailableError` naming that command when it cannot.

What :class:`RayExecutor` does, precisely:

* **Ray's lifetime.** With ``address=None`` it starts a local Ray with ``workers * threads``
  CPUs (``ray.init(num_cpus=..., include_dashboard=False)``; GPUs as Ray detects them) and
  shuts it down in :meth:`~RayExecutor.close`. With an ``address`` (``HOST:PORT`` of a
  cluster's head, as ``ray start --head`` prints it, or ``auto``) it connects to that cluster
  and disconnects in :meth:`~RayExecutor.close`; the cluster runs on. An address whose port
  takes no TCP connection within 10 s is refused before Ray is asked (:func:`check_reachable`;
  ``ray.init`` itself retries for minutes). If Ray is already
  initialised in this process (by the caller), that Ray is used as it is and left running
  (an ``address`` is then refused).
* **Concurrency and resources.** At most ``workers`` tasks are in flight. Each asks Ray for
  ``num_cpus=threads`` and ``num_gpus=gpus_per_unit`` and sets torch's intra-op threads to
  ``threads`` before its job, so results match the other executors' with the same ``threads``
  (on the same kind of CPU). A cluster with fewer CPUs than ``threads``, or fewer GPUs than
  ``gpus_per_unit``, is refused at once rather than left waiting.
* **Data.** A job's arguments and its result travel through Ray's object store: the driver
  alone writes the run directory, so the nodes need no shared filesystem (each needs the same
  installed ``pyro_bbt``, and decompresses MNIST from it on first use).
  :meth:`~RayExecutor.share` puts a value in the object store once (``ray.put``) and returns
  its ``ObjectRef``: the driver passes task-A stages to the units that need them that way, and
  Ray hands the value to each task (a ref among a job's ``args`` is resolved; one nested inside
  another argument is not).
* **Per-epoch checkpoints are forwarded.** The callable :meth:`~RayExecutor.forwarder` returns
  puts ``(key, data)`` on a Ray queue (:class:`ray.util.queue.Queue`, an actor holding 0 CPUs)
  and waits until the queue holds it; the driver drains the queue into its handler while it
  waits for results, and once more before it hands back a finished job's result, so the
  handler sees every message of a job before its result, as with the other executors. So
  ``--resume`` continues an interrupted unit from its last epoch under Ray too.
* **Failures.** A job that raises becomes a result with the traceback as ``error``, as with
  the other executors, and is never retried (``retry_exceptions=False``: it would raise again).
  A task whose worker process dies (killed, out of memory, ``os._exit``) or whose node dies
  is retried by Ray up to ``max_retries`` times (default :data:`DEFAULT_MAX_RETRIES`), on any
  node that has the CPUs and GPUs it asks for: the retry runs the job again from its start,
  with the arguments it was submitted with (the checkpoint it began from, not the last one it
  forwarded), and gives the same result, since a job is a pure function of its arguments. A
  task that still cannot finish after that (or at once with ``max_retries=0``), or whose
  result cannot be serialised, becomes a result whose ``error`` names the job and Ray's error
  (``Ray task for KEY failed: WorkerCrashedError: ...``), and the other jobs go on. The
  driver records such a unit as failed without saving it, so a resume runs it again, from its
  last forwarded checkpoint.
* **The driver's node.** The checkpoint queue's actor is placed on the driver's node, so
  losing any other node loses no message; the values :meth:`~RayExecutor.share` puts live
  there too (``ray.put`` stores them where it is called).
"""

from __future__ import annotations

import logging
import math
import os
import socket
from collections.abc import Callable, Mapping
from typing import Any

import torch

from .executors import ExecutorUnavailableError, Job, JobResult, check_positive_int, run_job

__all__ = ["RayExecutor", "import_ray", "check_reachable", "check_retries", "RAY_INSTALL_HINT", "DEFAULT_MAX_RETRIES"]

RAY_INSTALL_HINT = 'pip install -e ".[ray]"'
# Times Ray runs a task again after its worker process or node died (a killed node is a
# cluster's common failure); Ray's own default for tasks too. A job that raises is not retried.
DEFAULT_MAX_RETRIES = 3
POLL_SECONDS = 0.2  # how often the driver drains the checkpoint queue while tasks run


def import_ray():
    """The ``ray`` module; :class:`~pyro_bbt.executors.ExecutorUnavailableError` naming the
    install command if it cannot be imported."""
    try:
        import ray
    except ImportError as error:
        raise ExecutorUnavailableError(
            f"the ray executor needs Ray, which cannot be imported here ({error}); install it with: {RAY_INSTALL_HINT}"
        ) from None
    return ray


CONNECT_TIMEOUT_S = 10.0  # how long check_reachable waits for the head's port to accept a connection


def check_reachable(address: str, timeout: float = CONNECT_TIMEOUT_S) -> None:
    """Refuse, within ``timeout`` seconds, a Ray ``address`` whose port takes no connection
    (``ray.init`` would retry for minutes): :class:`ExecutorUnavailableError` naming it.
    ``HOST:PORT`` and ``ray://HOST:PORT`` are checked (``HOST`` alone: port 6379, Ray's
    default); ``auto`` and ``local`` are Ray's to resolve. A malformed address is a ``ValueError``."""
    if address in ("auto", "local"):
        return
    target = address.removeprefix("ray://")
    host, _, port_text = target.rpartition(":") if ":" in target else (target, "", "6379")
    if not host or not port_text.isdigit() or not 0 < int(port_text) < 65536:
        raise ValueError(f"the Ray address must be HOST:PORT (or ray://HOST:PORT, or auto), got {address!r}")
    try:
        socket.create_connection((host.strip("[]"), int(port_text)), timeout=timeout).close()
    except OSError as error:
        raise ExecutorUnavailableError(f"cannot reach the Ray cluster at {address!r} within {timeout:g} s ({error}); "
                                       "start its head there with `ray start --head` or fix --ray-address") from None


AUTH_HINT = ("if the cluster uses token authentication (Ray 2.60's `ray start --head` turns it on with RAY_AUTH_MODE=token, or by "
             "itself when ~/.ray/auth_token exists), set RAY_AUTH_MODE=token in this shell, with the head's token in ~/.ray/auth_token "
             "or RAY_AUTH_TOKEN (or start the cluster with RAY_AUTH_MODE=disabled)")


def connect_hint(environ: Mapping[str, str]) -> str:
    """What to add to a failed connection's message: the token-authentication hint unless the
    driver's environment ``environ`` already asks for token authentication."""
    return "" if environ.get("RAY_AUTH_MODE", "").strip().lower() == "token" else f"; {AUTH_HINT}"


def _run_in_worker(key: str, fn: Callable[..., Any], threads: int, *args: Any) -> JobResult:
    """The body of every Ray task: ``fn(*args)`` with ``threads`` torch threads, as a
    :class:`JobResult` (an exception in ``fn`` becomes its ``error``)."""
    torch.set_num_threads(threads)
    return run_job(Job(key, fn, args))


class _QueueForwarder:
    """The forwarder of :class:`RayExecutor`: in a task, puts ``(key, data)`` on the executor's
    Ray queue and returns once the queue holds it."""

    def __init__(self, queue: Any) -> None:
        self.queue = queue

    def __call__(self, key: str, data: Any) -> None:
        self.queue.put((key, data))


def check_retries(max_retries: int) -> int:
    """``max_retries`` if it is an integer >= 0 (not a bool); else a ``ValueError`` naming it."""
    if not isinstance(max_retries, int) or isinstance(max_retries, bool) or max_retries < 0:
        raise ValueError(f"Ray task retries must be an integer >= 0, got {max_retries!r}")
    return max_retries


def _check_gpus(gpus_per_unit: float) -> float:
    """``gpus_per_unit`` if Ray can ask for it: a number >= 0, whole when above 1."""
    if isinstance(gpus_per_unit, bool) or not isinstance(gpus_per_unit, (int, float)) or not math.isfinite(gpus_per_unit) \
            or gpus_per_unit < 0 or (gpus_per_unit > 1 and gpus_per_unit != int(gpus_per_unit)):
        raise ValueError(f"GPUs per unit must be 0, a fraction in (0, 1] or a whole number, got {gpus_per_unit!r}")
    return float(gpus_per_unit)


class RayExecutor:
    """Runs jobs as Ray tasks, at most ``workers`` at a time, each with ``threads`` torch
    threads, ``threads`` CPUs and ``gpus_per_unit`` GPUs of Ray's, run again up to
    ``max_retries`` times when its worker process or node dies; see the module's docstring for
    Ray's lifetime, the data path, forwarding and failures."""

    def __init__(self, workers: int = 1, threads: int = 1, *, address: str | None = None, gpus_per_unit: float = 0.0,
                 max_retries: int = DEFAULT_MAX_RETRIES) -> None:
        self.workers = check_positive_int("workers", workers)
        self.threads = check_positive_int("threads per unit", threads)
        self.gpus_per_unit = _check_gpus(gpus_per_unit)
        self.max_retries = check_retries(max_retries)
        if address is not None and (not isinstance(address, str) or not address.strip()):
            raise ValueError(f"the Ray address must be HOST:PORT or auto, got {address!r}")
        self.address = address
        self._ray = ray = import_ray()
        self._running: dict[Any, str] = {}  # ObjectRef of a task in flight -> its job's key
        self._queue: Any = None
        self._handler: Callable[[str, Any], None] | None = None
        self._owns_ray = not ray.is_initialized()
        if not self._owns_ray and address is not None:
            raise ValueError(f"Ray is already initialised in this process; cannot connect to {address!r} too (pass no address to use it)")
        if self._owns_ray:
            if address is not None:
                check_reachable(address)
            try:
                if address is None:
                    ray.init(num_cpus=self.workers * self.threads, include_dashboard=False, logging_level=logging.WARNING)
                else:
                    ray.init(address=address, logging_level=logging.WARNING)
            except (ConnectionError, RuntimeError, ValueError) as error:
                self._owns_ray = ray.is_initialized()
                self.close()
                where = "start a local Ray" if address is None else f"connect to the Ray cluster at {address!r}"
                hint = "" if address is None else connect_hint(os.environ)
                raise ExecutorUnavailableError(f"cannot {where}: {type(error).__name__}: {error}{hint}") from None
        try:
            self._check_resources()
        except ExecutorUnavailableError:
            self.close()
            raise
        self._remote = ray.remote(max_retries=self.max_retries, retry_exceptions=False)(_run_in_worker)

    def _check_resources(self) -> None:
        """Refuse a Ray whose whole cluster cannot give one task its CPUs and GPUs (its tasks
        would wait for ever)."""
        resources = self._ray.cluster_resources()
        cpus, gpus = resources.get("CPU", 0.0), resources.get("GPU", 0.0)
        if cpus < self.threads:
            raise ExecutorUnavailableError(f"the Ray cluster has {cpus:g} CPUs, fewer than the {self.threads} threads per unit each task asks for")
        if gpus < self.gpus_per_unit:
            raise ExecutorUnavailableError(f"the Ray cluster has {gpus:g} GPUs, fewer than the {self.gpus_per_unit:g} GPUs per unit each task asks for")

    def free_slots(self) -> int:
        return self.workers - self.busy()

    def busy(self) -> int:
        return len(self._running)

    def submit(self, job: Job) -> None:
        if self.busy() >= self.workers:
            raise RuntimeError("every worker is busy")
        ref = self._remote.options(num_cpus=self.threads, num_gpus=self.gpus_per_unit).remote(job.key, job.fn, self.threads, *job.args)
        self._running[ref] = job.key

    def share(self, value: Any) -> Any:
        """``ray.put(value)``: the ``ObjectRef`` to pass in ``value``'s place as a job's
        argument; the value stays in the object store while the ref is held."""
        return self._ray.put(value)

    def forwarder(self, handler: Callable[[str, Any], None]) -> Callable[[str, Any], None]:
        self._handler = handler
        if self._queue is None:
            from ray.util.queue import Queue
            from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

            on_this_node = NodeAffinitySchedulingStrategy(self._ray.get_runtime_context().get_node_id(), soft=False)
            self._queue = Queue(actor_options={"num_cpus": 0, "scheduling_strategy": on_this_node})
        return _QueueForwarder(self._queue)

    def _drain(self) -> None:
        """Hand every message on the queue to the handler, in the order they were put."""
        if self._queue is None:
            return
        waiting = self._queue.qsize()
        if waiting:
            for key, data in self._queue.get_nowait_batch(waiting):
                if self._handler is not None:
                    self._handler(key, data)

    def next_result(self) -> JobResult:
        if not self._running:
            raise RuntimeError("no job submitted")
        timeout = None if self._queue is None else POLL_SECONDS
        while True:
            ready, _ = self._ray.wait(list(self._running), num_returns=1, timeout=timeout)
            self._drain()  # a finished job's messages are all on the queue before its result
            if ready:
                ref = ready[0]
                key = self._running.pop(ref)
                try:
                    return self._ray.get(ref)
                except self._ray.exceptions.RayError as error:
                    first_line = next((line for line in str(error).splitlines() if line.strip()), "")
                    return JobResult(key, None, f"Ray task for {key} failed: {type(error).__name__}: {first_line.strip()}")

    def close(self) -> None:
        """Cancel the tasks still in flight, stop the queue, and shut Ray down (or disconnect
        from the cluster) if this executor started it."""
        ray = self._ray
        for ref in self._running:
            try:
                ray.cancel(ref, force=True)
            except Exception:  # noqa: BLE001 -- finished meanwhile, or Ray is already gone
                pass
        self._running = {}
        if self._queue is not None:
            try:
                self._queue.shutdown(force=True)
            except Exception:  # noqa: BLE001 -- Ray is already gone
                pass
            self._queue = None
        if self._owns_ray and ray.is_initialized():
            ray.shutdown()
        self._owns_ray = False

    def __enter__(self) -> "RayExecutor":
        return self

    def __exit__(self, *exc) -> None:
        self.close()
