"""Save and load a fitted model: network sizes, prior, guide and config.

The file is a ``torch.save`` of plain containers and tensors only, so it loads with
``torch.load(..., weights_only=True)`` (no pickled code is ever executed). It is written to a
temporary file and renamed, so a crash never leaves half a checkpoint behind.
"""

from __future__ import annotations

import os
import pickle
from dataclasses import asdict

import pyro
import torch

from .files import atomic_torch_save
from .guides import GuideConfig, initialize_guide, make_guide
from .model import BayesianMLP
from .priors import PerSitePrior, Prior, build_prior
from .pyro_internals import param_store_name

__all__ = ["FORMAT_VERSION", "save_checkpoint", "load_checkpoint", "prior_state", "prior_from_state"]

FORMAT_VERSION = 1
_PAYLOAD_KEYS = ("sizes", "prior", "guide_name", "guide_config", "guide_state")


def prior_state(prior: Prior) -> dict:
    """A ``weights_only``-loadable description of ``prior`` (its config and tensors)."""
    state: dict = {"description": prior.describe()}
    if isinstance(prior, PerSitePrior):
        state["locs"] = {site: prior.loc(site).detach().cpu() for site in prior.sites}
        state["scales"] = {site: prior.scale(site).detach().cpu() for site in prior.sites}
    return state


def prior_from_state(state: dict) -> Prior:
    description = state["description"]
    if description["type"] == "per_site":
        fallback = None if description["fallback"] is None else build_prior(description["fallback"])
        return PerSitePrior(state["locs"], state["scales"], fallback)
    return build_prior(description)


def save_checkpoint(
    path: str | os.PathLike,
    model: BayesianMLP,
    guide,
    guide_name: str,
    guide_config: GuideConfig,
    config: dict | None = None,
) -> None:
    """Write model sizes, prior, guide parameters and a JSON-like ``config`` to ``path``."""
    payload = {
        "format_version": FORMAT_VERSION,
        "sizes": list(model.sizes),
        "num_heads": model.num_heads,
        "prior": prior_state(model.prior),
        "guide_name": guide_name,
        "guide_config": asdict(guide_config),
        "guide_state": {k: v.detach().cpu() for k, v in guide.state_dict().items()},
        "config": config or {},
    }
    atomic_torch_save(payload, path)


def load_checkpoint(
    path: str | os.PathLike, expected_sizes: tuple[int, ...] | None = None
) -> tuple[BayesianMLP, object, dict]:
    """Rebuild ``(model, guide, payload)`` from a checkpoint.

    Pyro keeps parameters in a global store by name: entries of a same-named guide already in
    memory are dropped first, and the loaded values take their place.

    :raises ValueError: for a file that is not a readable checkpoint, another format version, a
        payload missing an entry, or when ``expected_sizes`` differs from the checkpoint's network.
    """
    try:
        payload = torch.load(path, map_location="cpu", weights_only=True)
    except (RuntimeError, pickle.UnpicklingError, EOFError) as error:  # truncated or not a torch.save file
        raise ValueError(f"{path}: not a readable checkpoint file: {error}") from error
    version = payload.get("format_version") if isinstance(payload, dict) else None
    if version != FORMAT_VERSION:
        raise ValueError(f"{path}: checkpoint format version {version!r}, this code reads version {FORMAT_VERSION}")
    missing = [key for key in _PAYLOAD_KEYS if key not in payload]
    if missing:
        raise ValueError(f"{path}: checkpoint lacks {', '.join(missing)}")
    sizes = tuple(payload["sizes"])
    if expected_sizes is not None and tuple(expected_sizes) != sizes:
        raise ValueError(f"{path}: checkpoint is for a network of sizes {sizes}, expected {tuple(expected_sizes)}")
    model = BayesianMLP(sizes, prior_from_state(payload["prior"]), num_heads=payload.get("num_heads", 1))
    guide = make_guide(payload["guide_name"], model, GuideConfig(**payload["guide_config"]))
    store = pyro.get_param_store()
    for name in [n for n in store.keys() if n.startswith(param_store_name(guide) + ".")]:
        del store[name]
    initialize_guide(guide, sizes[0])
    try:
        guide.load_state_dict(payload["guide_state"])
    except RuntimeError as error:
        raise ValueError(f"{path}: guide parameters do not fit a {payload['guide_name']!r} guide of sizes {sizes}: {error}") from error
    return model, guide, payload
