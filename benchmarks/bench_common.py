"""What the benchmark scripts (``bench.py``, ``converge.py``) share: which peers this environment
can run, the CLI's positive integers, the machine's load average, and bayesian-torch's network. Imported by its name: the
scripts' folder is first on ``sys.path`` when they run (``python benchmarks/NAME.py``) and in the
tests (``conftest.load_benchmark``)."""

from __future__ import annotations

import argparse
import importlib.util
import math
import os
from collections.abc import Mapping, Sequence
from typing import Protocol

from torch import nn

__all__ = ["INSTALL_HINT", "Needs", "missing_package", "select_available", "name_list", "positive_int", "load_average", "bayes_torch_net"]

INSTALL_HINT = 'pip install -e ".[bench]"'


class Needs(Protocol):
    """A configuration or row that may need an optional package: ``module`` to import (``None``:
    nothing) and the pip ``package`` that provides it (``None``: the module's name)."""

    module: str | None
    package: str | None


def missing_package(item: Needs) -> str | None:
    """The pip package that ``item`` needs and this environment cannot import (``None``: runnable)."""
    if item.module is None:
        return None
    try:
        found = importlib.util.find_spec(item.module) is not None
    except (ImportError, ValueError):  # a missing parent package of a dotted name
        found = False
    return None if found else (item.package or item.module)


def select_available(names: Sequence[str] | None, items: Mapping[str, Needs]) -> tuple[list[str], list[str]]:
    """The names to run and one line per name skipped: ``names=None`` selects every item,
    skipping those whose package is missing; naming such an item raises ``ValueError`` naming its
    package."""
    selected, skipped, refused = [], [], []
    for name in list(items) if names is None else names:
        package = missing_package(items[name])
        if package is None:
            selected.append(name)
        elif names is None:
            skipped.append(f"{name}: skipped, package {package} is not installed ({INSTALL_HINT})")
        else:
            refused.append(f"{name} needs package {package}")
    if refused:
        raise ValueError(f"not installed: {'; '.join(refused)} ({INSTALL_HINT})")
    return selected, skipped


def name_list(text: str, allowed: Sequence[str], kind: str) -> list[str]:
    """``argparse`` type: comma-separated names of ``allowed`` (duplicates dropped, order kept);
    else one line naming the unknown ones (``kind``: "rows", "configs") and the allowed ones."""
    names = list(dict.fromkeys(n.strip() for n in text.split(",") if n.strip()))
    unknown = [n for n in names if n not in allowed]
    if not names or unknown:
        raise argparse.ArgumentTypeError(f"unknown or empty {kind} {', '.join(unknown) or repr(text)}; allowed: {', '.join(allowed)}")
    return names


def positive_int(text: str) -> int:
    """``argparse`` type: an integer >= 1."""
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {text!r}")
    return value


def load_average() -> float | None:
    """The 1-minute load average (``None`` where the platform has none)."""
    try:
        return os.getloadavg()[0]
    except (AttributeError, OSError):
        return None


def bayes_torch_net(sizes: Sequence[int], prior_std: float, init_std: float, layer: str = "LinearReparameterization") -> nn.Sequential:
    """bayesian-torch's ``layer`` layers (``"LinearReparameterization"`` or ``"LinearFlipout"``) of
    ``sizes`` with ReLUs between: the prior ``N(0, prior_std^2)`` (the library's ``prior_variance`` is the prior's *standard
    deviation*: it fills ``prior_weight_sigma``), the means from the library's own initialisation
    (``N(0, 0.1^2)``), every width ``sigma = log(1 + exp(rho))`` starting near ``init_std``
    (``posterior_rho_init = log(expm1(init_std))``, the library adding ``N(0, 0.1^2)`` to ``rho``).
    Each layer draws one weight matrix per call and returns its output only
    (``dnn_to_bnn_flag``)."""
    from bayesian_torch import layers

    modules: list[nn.Module] = []
    for index, (d_in, d_out) in enumerate(zip(sizes[:-1], sizes[1:])):
        module = getattr(layers, layer)(d_in, d_out, prior_mean=0.0, prior_variance=prior_std, posterior_rho_init=math.log(math.expm1(init_std)))
        module.dnn_to_bnn_flag = True
        modules += [module] if index == len(sizes) - 2 else [module, nn.ReLU()]
    return nn.Sequential(*modules)
