"""A two-node Ray cluster on this machine loses its second node mid-run: the unit that ran there
is retried on the head (Ray's task retries, ``--ray-retries``) and ``results.json`` is
byte-identical to a serial run's.

Marked ``ray_cluster``: ``pytest`` leaves it out (pyproject's ``addopts`` deselects the marker) and
CI runs it as its own step, ``pytest -m ray_cluster tests/test_ray_cluster.py`` (``.ci/run``), in
its own process. Skipped where Ray is not installed (``pip install -e ".[ray]"``)."""

from __future__ import annotations

import shutil
import tempfile
import threading

import pytest

from pyro_bbt.runstore import RunStore
from pyro_bbt.transfer import main

pytestmark = pytest.mark.ray_cluster

EPOCHS = 40  # of q_A and of each B unit: a second or two per unit, so the kill lands mid-unit
# One seed, one fraction: the stage A-bayesian-s0 and scratch start at once (one per node),
# transfer follows the stage.
TINY_GRID = [
    "--limit-train", "200", "--limit-eval", "100", "--hidden", "8", "--epochs", str(EPOCHS), "--epochs-a", str(EPOCHS),
    "--max-epochs-a", "none", "--batch-size", "32", "--min-steps", "8", "--fractions", "1", "--seeds", "0", "--eval-samples", "4",
    "--methods", "scratch,transfer", "--quiet",
]
# The head's GCS declares a node dead after 3 failed health checks a second apart (Ray's
# defaults: 5, 3 s apart), so that the killed node's task is retried within seconds.
FAST_NODE_DEATH = {"health_check_period_ms": 1000, "health_check_failure_threshold": 3}


@pytest.fixture
def two_node_cluster(monkeypatch):
    """A Ray head and a second node on this machine, one CPU each (so two units in flight run
    one per node): ``(cluster, second_node)``. Its session files and the address file that
    ``ray.init()`` would find live in a temporary folder of their own (``RAY_TMPDIR``), so that
    no other Ray on this machine sees it; every process of it is stopped at the end."""
    ray_cluster_utils = pytest.importorskip("ray.cluster_utils")
    temp_dir = tempfile.mkdtemp(prefix="ray-", dir="/tmp")  # short: Ray's socket paths must fit 107 characters
    monkeypatch.setenv("RAY_TMPDIR", temp_dir)
    cluster = ray_cluster_utils.Cluster(initialize_head=True, head_node_args={"num_cpus": 1, "_system_config": FAST_NODE_DEATH})
    try:
        second_node = cluster.add_node(num_cpus=1)
        yield cluster, second_node
    finally:
        cluster.shutdown()
        shutil.rmtree(temp_dir, ignore_errors=True)


class _EpochLog:
    """Wraps :meth:`RunStore.save_checkpoint` to list the ``(key, epoch)`` of every checkpoint
    the driver saves, and sets ``two_early`` once two units are in their first half at once."""

    def __init__(self) -> None:
        self.saved: list[tuple[str, int]] = []
        self.latest: dict[str, int] = {}
        self.two_early = threading.Event()

    def wrap(self, save_checkpoint):
        def save(store: RunStore, key: str, data: dict) -> None:
            epoch = data["train_state"]["epoch"]
            self.saved.append((key, epoch))
            self.latest[key] = epoch
            if sum(latest <= EPOCHS // 2 for latest in self.latest.values()) >= 2:
                self.two_early.set()
            save_checkpoint(store, key, data)
        return save

    def restarted(self) -> list[str]:
        """The units whose checkpoints began again at an epoch they had passed: retried."""
        last: dict[str, int] = {}
        again = []
        for key, epoch in self.saved:
            if epoch <= last.get(key, 0):
                again.append(key)
            last[key] = epoch
        return again


def test_a_node_killed_mid_run_loses_nothing(two_node_cluster, tmp_path, monkeypatch):
    """``--executor ray --ray-address`` on the two-node cluster with ``--workers 2``: once both
    nodes run a unit (two units in flight, each in its first half), the second node is killed
    (every process of it, SIGKILL). Its unit is retried on the head, the run exits 0, and its
    ``results.json`` is byte-identical to a serial run of the same grid."""
    cluster, second_node = two_node_cluster
    serial, on_cluster = tmp_path / "serial", tmp_path / "cluster"
    assert main([*TINY_GRID, "--out", str(serial)]) == 0
    epochs = _EpochLog()
    monkeypatch.setattr(RunStore, "save_checkpoint", epochs.wrap(RunStore.save_checkpoint))
    killed_at: dict[str, int] = {}
    run_over = threading.Event()

    def kill_second_node_once_both_run() -> None:
        if epochs.two_early.wait(timeout=300) and not run_over.is_set():
            killed_at.update(epochs.latest)
            cluster.remove_node(second_node, allow_graceful=False)

    killer = threading.Thread(target=kill_second_node_once_both_run, daemon=True)
    killer.start()
    code = main([*TINY_GRID, "--out", str(on_cluster), "--executor", "ray", "--ray-address", cluster.address, "--workers", "2"])
    run_over.set()
    epochs.two_early.set()  # wakes the killer if it still waits
    killer.join()
    assert killed_at, "two units never ran at once in their first half: the second node was not killed mid-unit"
    assert second_node not in cluster.worker_nodes
    assert epochs.restarted(), f"no unit began again after the kill (epochs at the kill: {killed_at})"
    assert code == 0
    assert (on_cluster / "results.json").read_bytes() == (serial / "results.json").read_bytes()
