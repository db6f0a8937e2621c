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

A file that cannot be used (truncated or otherwise unreadable, another format version, another
unit's, another configuration's) raises ``ValueError`` naming it and why; with ``on_damaged``
(what ``python -m pyro_bbt.transfer --resume`` passes) it is instead moved aside to
``NAME.damaged`` (never deleted), ``on_damaged`` is called once with a line naming both files and
the reason, and the store answers as if the file were absent, so its work is done again.
"""

from __future__ import annotations

import hashlib
import json
import pickle
import zipfile
from collections.abc import Callable, Collection, Mapping
from pathlib import Path

import torch

from .files import atomic_torch_save, atomic_write_json

__all__ = ["FORMAT_VERSION", "RunStore", "ReadOnlyStore", "config_hash", "config_differences", "differing_fields", "disallowed_differences", "raised_fields"]

FORMAT_VERSION = 1


def config_hash(config: dict) -> str:
    return hashlib.sha256(json.dumps(config, sort_keys=True, default=list).encode()).hexdigest()[:16]


def _normalise(value):
    return json.loads(json.dumps(value, default=list))


def config_differences(saved: dict, current: dict) -> list[str]:
    """Human-readable ``field: saved -> current`` for every field that differs."""
    saved, current = _normalise(saved), _normalise(current)
    return [f"{key}: {saved.get(key)!r} -> {current.get(key)!r}" for key in differing_fields(saved, current)]


def disallowed_differences(saved: dict, current: dict, grid_fields: Collection[str] = (),
                           raisable_fields: Collection[str] | Mapping[str, object] = (), neutral_fields: Mapping[str, object] | None = None) -> list[str]:
    """The ``field: saved -> current`` differences that make ``saved`` another configuration than
    ``current``: every differing field but those of ``grid_fields``, and those of
    ``raisable_fields`` (integer caps) where the saved value is an integer no larger than the
    current one. A mapping ``raisable_fields`` gives each field's value where a configuration
    omits it (a field added after the configuration was saved). A dotted name in ``grid_fields``
    or ``raisable_fields`` (``"config.taus"``, ``"config.experiment.max_epochs_b"``) names a field
    of a nested configuration: the two ``config`` objects are compared field by field, and a
    difference is named by its dotted path. ``neutral_fields``
    (settings added after configurations were saved, each with the value those had, e.g.
    :data:`~pyro_bbt.config.LATER_FIELDS`): at any depth a field absent on one side reads as that
    value, and nested configurations are compared field by field, so a configuration saved
    before a setting existed matches one that holds it at its neutral value."""
    neutral = _normalise(dict(neutral_fields or {}))
    return _disallowed(_normalise(saved), _normalise(current), frozenset(grid_fields), raisable_fields, "", neutral)


def _disallowed(saved: dict, current: dict, grid_fields: frozenset[str], raisable_fields: Collection[str] | Mapping[str, object],
                prefix: str, neutral: Mapping[str, object] | None = None) -> list[str]:
    neutral = neutral or {}
    absent = {**neutral, **(raisable_fields if isinstance(raisable_fields, Mapping) else {})}
    out = []
    for key in differing_fields(saved, current):
        old, new = saved.get(key, absent.get(key)), current.get(key, absent.get(key))
        name = prefix + key
        if name in grid_fields or old == new:
            continue
        if isinstance(old, dict) and isinstance(new, dict) and (neutral or any(g.startswith(name + ".") for g in (*grid_fields, *raisable_fields))):
            out += _disallowed(old, new, grid_fields, [f for f in raisable_fields if f.startswith(name + ".")], name + ".", neutral)
            continue
        if name in raisable_fields and all(isinstance(v, int) and not isinstance(v, bool) for v in (old, new)) and old <= new:
            continue
        out.append(f"{name}: {old!r} -> {new!r}")
    return out


def raised_fields(saved: dict, current: dict, fields: Mapping[str, object]) -> dict[str, list]:
    """``{field: [saved, current]}`` for the fields of ``fields`` (each with its value where a
    configuration omits it) whose value differs between the two configurations."""
    saved, current = _normalise(saved), _normalise(current)
    values = {key: [saved.get(key, absent), current.get(key, absent)] for key, absent in fields.items()}
    return {key: pair for key, pair in values.items() if pair[0] != pair[1]}


def differing_fields(saved: dict, current: dict) -> list[str]:
    """The fields, sorted, whose values differ between two configurations (absent counts as None)."""
    saved, current = _normalise(saved), _normalise(current)
    return sorted(key for key in set(saved) | set(current) if saved.get(key) != current.get(key))


# what a truncated or corrupted file raises while it is read
_UNREADABLE = (ValueError, KeyError, RuntimeError, EOFError, OSError, UnicodeDecodeError, pickle.UnpicklingError, zipfile.BadZipFile)


class RunStore:
    """Finished units, task-A stages and per-epoch checkpoints of one run directory."""

    def __init__(self, root: Path, config: dict, on_damaged: Callable[[str], None] | None = None, grid_fields: Collection[str] = (),
                 raisable_fields: Collection[str] | Mapping[str, object] = (), stage_free_fields: Collection[str] = (),
                 recorded_fields: Mapping[str, object] | None = None, neutral_fields: Mapping[str, object] | None = None) -> None:
        """``grid_fields``: fields a stored file may differ in and still be this run's (the axes of
        a grid whose units do not depend on each other, so the run can grow along them);
        ``raisable_fields``: integer caps a stored file may have had lower (a fit's epochs before
        its cap do not depend on it); ``stage_free_fields``: fields a stored *stage* may differ in
        besides (fields that only the units read). See :func:`disallowed_differences`.
        ``recorded_fields`` (raisable fields, each with its value where a configuration omits it):
        a checkpoint made with another value of one of them comes back with the rise appended
        to its ``raised_on_resume`` list, ``{"epoch", "fields": {field: [saved, current]}}``
        (``epoch`` its ``train_state``'s, where it has one), for the unit to carry into its record.
        ``neutral_fields``: settings a stored file may lack where this run holds them at the value
        it had then (:func:`disallowed_differences`)."""
        self.root = Path(root)
        self.config = _normalise(config)
        self.hash = config_hash(self.config)
        self.on_damaged = on_damaged
        self.grid_fields = frozenset(grid_fields)
        self.raisable_fields = dict(raisable_fields) if isinstance(raisable_fields, Mapping) else dict.fromkeys(raisable_fields)
        self.stage_free_fields = frozenset(stage_free_fields)
        self.recorded_fields = dict(recorded_fields or {})
        self.neutral_fields = dict(neutral_fields or {})

    def _path(self, kind: str, key: str, suffix: str) -> Path:
        return self.root / kind / f"{key}{suffix}"

    def _read(self, path: Path, key: str, field: str | None, load: Callable[[Path], object], free: frozenset[str] = frozenset()) -> dict | None:
        """``payload[field]`` of the file at ``path`` (the whole payload where ``field`` is
        ``None``, which must hold ``data``), checked; ``None`` if there is none (or it was
        damaged and moved aside, with ``on_damaged``)."""
        if not path.exists():
            return None
        try:
            payload = load(path)
            self._check(path, payload, key, free)
            value = payload[field or "data"]
            return payload if field is None else value
        except _UNREADABLE as error:
            message, prefix = str(error), f"{path}: "
            reason = message[len(prefix):] if message.startswith(prefix) else f"unreadable ({type(error).__name__}: {message})"
            if self.on_damaged is None:
                raise ValueError(f"{path}: {reason}") from None
            aside = _aside(path)
            path.rename(aside)
            self.on_damaged(f"{path}: {reason}; moved to {aside.name}, its work is done again")
            return None

    # finished units (JSON, as they appear in results.json)
    def record(self, key: str) -> dict | None:
        return self._read(self._path("units", key, ".json"), key, "record", lambda path: json.loads(path.read_text()))

    def save_record(self, key: str, record: dict, keep_checkpoint: bool = False) -> None:
        """Keep ``key``'s finished ``record`` and drop its checkpoint, unless ``keep_checkpoint``
        (a fit that stopped at its cap unconverged: a resume that raises the cap continues it)."""
        atomic_write_json(self._path("units", key, ".json"), self._header(key) | {"record": record})
        if not keep_checkpoint:
            self.clear_checkpoint(key)

    # tensors: finished stages and epoch checkpoints
    def _load_pt(self, path: Path, key: str, free: frozenset[str] = frozenset()) -> dict | None:
        return self._read(path, key, "data", lambda p: torch.load(p, map_location="cpu", weights_only=True), free)

    def stage(self, key: str) -> dict | None:
        return self._load_pt(self._path("stages", key, ".pt"), key, self.stage_free_fields)

    def save_stage(self, key: str, data: dict, keep_checkpoint: bool = False) -> None:
        atomic_torch_save(self._header(key) | {"data": data}, self._path("stages", key, ".pt"))
        if not keep_checkpoint:
            self.clear_checkpoint(key)

    def checkpoint(self, key: str) -> dict | None:
        payload = self._read(self._path("checkpoints", key, ".pt"), key, None,
                             lambda p: torch.load(p, map_location="cpu", weights_only=True))
        if payload is None:
            return None
        data = payload["data"]
        raised = raised_fields(payload.get("config", {}), self.config, self.recorded_fields)
        if raised:
            train_state = data.get("train_state") if isinstance(data, dict) else None
            epoch = train_state.get("epoch") if isinstance(train_state, dict) else None
            data = {**data, "raised_on_resume": [*data.get("raised_on_resume", []), {"epoch": epoch, "fields": raised}]}
        return data

    def save_checkpoint(self, key: str, data: dict) -> None:
        atomic_torch_save(self._header(key) | {"data": data}, self._path("checkpoints", key, ".pt"))

    def clear_checkpoint(self, key: str) -> None:
        self._path("checkpoints", key, ".pt").unlink(missing_ok=True)

    def _header(self, key: str) -> dict:
        return {"format_version": FORMAT_VERSION, "key": key, "config_hash": self.hash, "config": self.config}

    def _check(self, path: Path, payload, key: str, free: frozenset[str] = frozenset()) -> None:
        if not isinstance(payload, dict) or payload.get("format_version") != FORMAT_VERSION:
            version = payload.get("format_version") if isinstance(payload, dict) else None
            raise ValueError(f"{path}: format version {version!r}, this code reads version {FORMAT_VERSION}")
        if payload.get("key") != key:
            raise ValueError(f"{path}: holds unit {payload.get('key')!r}, expected {key!r}")
        if payload.get("config_hash") != self.hash:
            saved = payload.get("config", {})
            saved = saved if isinstance(saved, dict) else {}
            blocking = disallowed_differences(saved, self.config, self.grid_fields | free, self.raisable_fields, self.neutral_fields)
            if differing_fields(saved, self.config) and not blocking:
                return
            raise ValueError(f"{path}: made by another configuration ({'; '.join(blocking) or 'unknown differences'})")


def _aside(path: Path) -> Path:
    """``NAME.damaged``, or ``NAME.damaged-2``, ... if that exists already."""
    aside = path.with_name(path.name + ".damaged")
    count = 1
    while aside.exists():
        count += 1
        aside = path.with_name(f"{path.name}.damaged-{count}")
    return aside


class ReadOnlyStore(RunStore):
    """Another run's directory, read for its finished task-A stages (a study reusing the q_A of
    a finished ``python -m pyro_bbt.transfer`` run of the same configuration). Nothing is
    written into it, nor moved (a file it cannot use is an error), and its partial checkpoints
    are ignored."""

    def __init__(self, root: Path, config: dict, **differences) -> None:
        """``differences``: what a file may differ in from ``config``, as for :class:`RunStore`
        (``grid_fields``, ``raisable_fields``, ``stage_free_fields``)."""
        super().__init__(root, config, on_damaged=None, **differences)

    def save_record(self, key: str, record: dict, keep_checkpoint: bool = False) -> None:
        pass

    def save_stage(self, key: str, data: dict, keep_checkpoint: bool = False) -> None:
        pass

    def checkpoint(self, key: str) -> dict | None:
        return None

    def save_checkpoint(self, key: str, data: dict) -> None:
        pass

    def clear_checkpoint(self, key: str) -> None:
        pass
