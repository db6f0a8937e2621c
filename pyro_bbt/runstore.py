"""The files of one run directory, for resuming an interrupted run.

    DIR/config.json                the run's configuration (written first)
    DIR/units/KEY.json             a finished unit of work (method, fraction, seed)
    DIR/stages/KEY.pt              a finished task-A stage (the posterior q_A, the EWC net)
    DIR/checkpoints/KEY.pt         the latest epoch of the unit in progress

Everything is written atomically (temporary file + rename), so a kill at any moment leaves
either the previous or the next complete file. ``.pt`` files hold only tensors and plain
containers and are read with ``torch.load(weights_only=True)``; each carries a format version,
the unit's key and the configuration that made it, and is refused, with the differing fields
named, when any of them does not match the run being resumed.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import torch

from .files import atomic_torch_save, atomic_write_json

__all__ = ["FORMAT_VERSION", "RunStore", "ReadOnlyStore", "config_hash", "config_differences"]

FORMAT_VERSION = 1


def config_hash(config: dict) -> str:
    return hashlib.sha256(json.dumps(config, sort_keys=True, default=list).encode()).hexdigest()[:16]


def _normalise(value):
    return json.loads(json.dumps(value, default=list))


def config_differences(saved: dict, current: dict) -> list[str]:
    """Human-readable ``field: saved -> current`` for every field that differs."""
    saved, current = _normalise(saved), _normalise(current)
    return [
        f"{key}: {saved.get(key)!r} -> {current.get(key)!r}"
        for key in sorted(set(saved) | set(current))
        if saved.get(key) != current.get(key)
    ]


class RunStore:
    """Finished units, task-A stages and per-epoch checkpoints of one run directory."""

    def __init__(self, root: Path, config: dict) -> None:
        self.root = Path(root)
        self.config = _normalise(config)
        self.hash = config_hash(self.config)

    def _path(self, kind: str, key: str, suffix: str) -> Path:
        return self.root / kind / f"{key}{suffix}"

    # finished units (JSON, as they appear in results.json)
    def record(self, key: str) -> dict | None:
        path = self._path("units", key, ".json")
        if not path.exists():
            return None
        payload = json.loads(path.read_text())
        self._check(path, payload, key)
        return payload["record"]

    def save_record(self, key: str, record: dict) -> None:
        atomic_write_json(self._path("units", key, ".json"), self._header(key) | {"record": record})
        self.clear_checkpoint(key)

    # tensors: finished stages and epoch checkpoints
    def _load_pt(self, path: Path, key: str) -> dict | None:
        if not path.exists():
            return None
        payload = torch.load(path, map_location="cpu", weights_only=True)
        self._check(path, payload, key)
        return payload["data"]

    def stage(self, key: str) -> dict | None:
        return self._load_pt(self._path("stages", key, ".pt"), key)

    def save_stage(self, key: str, data: dict) -> None:
        atomic_torch_save(self._header(key) | {"data": data}, self._path("stages", key, ".pt"))
        self.clear_checkpoint(key)

    def checkpoint(self, key: str) -> dict | None:
        return self._load_pt(self._path("checkpoints", key, ".pt"), key)

    def save_checkpoint(self, key: str, data: dict) -> None:
        atomic_torch_save(self._header(key) | {"data": data}, self._path("checkpoints", key, ".pt"))

    def clear_checkpoint(self, key: str) -> None:
        self._path("checkpoints", key, ".pt").unlink(missing_ok=True)

    def _header(self, key: str) -> dict:
        return {"format_version": FORMAT_VERSION, "key": key, "config_hash": self.hash, "config": self.config}

    def _check(self, path: Path, payload, key: str) -> None:
        if not isinstance(payload, dict) or payload.get("format_version") != FORMAT_VERSION:
            version = payload.get("format_version") if isinstance(payload, dict) else None
            raise ValueError(f"{path}: format version {version!r}, this code reads version {FORMAT_VERSION}")
        if payload.get("key") != key:
            raise ValueError(f"{path}: holds unit {payload.get('key')!r}, expected {key!r}")
        if payload.get("config_hash") != self.hash:
            differences = config_differences(payload.get("config", {}), self.config)
            raise ValueError(f"{path}: made by another configuration ({'; '.join(differences) or 'unknown differences'})")


class ReadOnlyStore(RunStore):
    """Another run's directory, read for its finished task-A stages (a study reusing the q_A of
    a finished ``python -m pyro_bbt.transfer`` run of the same configuration). Nothing is
    written into it, and its partial checkpoints are ignored."""

    def save_record(self, key: str, record: dict) -> None:
        pass

    def save_stage(self, key: str, data: dict) -> None:
        pass

    def checkpoint(self, key: str) -> dict | None:
        return None

    def save_checkpoint(self, key: str, data: dict) -> None:
        pass

    def clear_checkpoint(self, key: str) -> None:
        pass
