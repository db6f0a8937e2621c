"""Every read of a Pyro-*private* attribute in this package, behind one small adapter.

Why this module exists: Pyro's autoguides keep what this package needs -- a site's ``(loc,
scale)`` in :class:`~pyro.infer.autoguide.AutoNormal`, its unconstrained event dimensions, the
raw ``nn.Parameter`` behind a constrained :class:`~pyro.nn.PyroParam`, the unpacking of an
:class:`~pyro.infer.autoguide.AutoContinuous` latent vector into sites, the name under which a
:class:`~pyro.nn.PyroModule` stores its parameters -- in attributes and methods whose names start
with an underscore, and offer no public API for them. Reading them from all over the package
would turn a Pyro upgrade into a hunt; here they are read in one place, each by a small typed
function, so that an upgrade that moves one of them fails with one line naming the function,
the guide type and the attribute (:class:`PyroInternalsError`), and is fixed here alone.

Written and tested against Pyro :data:`TESTED_PYRO_VERSION` (``tests/test_pyro_internals.py``
checks each function against Pyro's public behaviour -- ``median()``, ``quantiles()``,
``parameters()``, the guide's own samples -- and that the installed Pyro is that version, within
``pyproject.toml``'s range); ``tests/test_layout.py`` checks that no other module of the package
reads one of these attributes.

Not routed through here: the package's own autoguides (:mod:`pyro_bbt.guides`) extend Pyro's by
overriding ``_setup_prototype`` (Pyro's documented way to extend an ``AutoGuide``) and, for the
flows, ``_loc_scale`` (the hook ``AutoContinuous.median`` and ``quantiles`` call). A Pyro upgrade
must check those overrides too.
"""

from __future__ import annotations

from collections.abc import Callable

import pyro
import torch
from torch import nn

__all__ = [
    "TESTED_PYRO_VERSION",
    "PyroInternalsError",
    "event_dims",
    "loc_and_scale",
    "unconstrained_loc_scale_parameters",
    "unpack_latent",
    "continuous_loc_scale",
    "continuous_init_loc",
    "unconstrained_shapes",
    "create_plates",
    "param_store_name",
    "pyro_module_fullname",
]

TESTED_PYRO_VERSION = "1.9.2"
"""The Pyro release these functions were written and tested against."""

_MISSING = object()


class PyroInternalsError(AttributeError):
    """A Pyro-private attribute this package reads is not there: Pyro's internals changed (or the
    guide has not been set up yet). The message names the adapter function, the object's type and
    the attribute."""


def _fail(function: str, owner: object, attribute: str, detail: str = "") -> PyroInternalsError:
    setup = getattr(owner, "prototype_trace", _MISSING) is None
    hint = " (the guide has not been set up yet: run it once, or call pyro_bbt.guides.initialize_guide)" if setup else ""
    return PyroInternalsError(
        f"pyro_bbt.pyro_internals.{function}: {type(owner).__name__} has no {attribute}{detail}{hint}; "
        f"Pyro {pyro.__version__} is installed, this adapter was written against Pyro {TESTED_PYRO_VERSION}: "
        "if Pyro's internals moved, update pyro_bbt/pyro_internals.py"
    )


def _private(owner: object, attribute: str, function: str):
    """``owner.<attribute>``, or :class:`PyroInternalsError` naming ``function``, ``owner``'s type
    and ``attribute``. A method is returned bound, not called, so that an ``AttributeError`` raised
    *inside* it is not mistaken for a missing attribute."""
    value = getattr(owner, attribute, _MISSING)
    if value is _MISSING:
        raise _fail(function, owner, f"attribute {attribute!r}")
    return value


# --------------------------------------------------------------------------- AutoNormal family

def event_dims(guide) -> dict[str, int]:
    """Per site (in the guide's site order) the number of rightmost dimensions of its
    *unconstrained* value that form one event, of an initialised
    :class:`~pyro.infer.autoguide.AutoNormal` (or subclass): ``AutoNormal._event_dims``. For the
    weight sites of :class:`~pyro_bbt.model.BayesianMLP` it is the site's ``len(shape)``.
    The guide's own dict is returned: read it, do not change it."""
    return _private(guide, "_event_dims", "event_dims")


def loc_and_scale(guide, name: str) -> tuple[torch.Tensor, torch.Tensor]:
    """``(loc, scale)`` of site ``name`` of an initialised ``AutoNormal`` (or subclass), in the
    unconstrained space, as the guide uses them (the constrained ``PyroParam`` values, attached to
    the graph): ``AutoNormal._get_loc_and_scale(name)``. For a real-valued site ``loc`` is
    ``guide.median()[name]`` and ``scale`` the standard deviation of the guide's samples."""
    return _private(guide, "_get_loc_and_scale", "loc_and_scale")(name)


def unconstrained_loc_scale_parameters(guide, name: str) -> tuple[nn.Parameter, nn.Parameter]:
    """The raw ``nn.Parameter`` objects behind site ``name``'s ``(loc, scale)`` in an initialised
    ``AutoNormal`` (or subclass): ``(loc, rho)`` with ``scale = softplus(rho)`` under
    ``AutoNormal.scale_constraint = softplus_positive``. A :class:`~pyro.nn.PyroParam` ``w`` of a
    :class:`~pyro.nn.PyroModule` is stored as the parameter ``w_unconstrained`` in the module's
    ``nn.Module._parameters``; ``guide.locs`` / ``guide.scales`` hold one such module per dotted
    prefix of the site name. The returned objects are elements of ``guide.parameters()``."""
    module, _, leaf = name.rpartition(".")
    key = f"{leaf}_unconstrained"
    found = []
    for root_name in ("locs", "scales"):
        root = _private(guide, root_name, "unconstrained_loc_scale_parameters")
        holder = root.get_submodule(module) if module else root
        table = _private(holder, "_parameters", "unconstrained_loc_scale_parameters")
        parameter = table.get(key, _MISSING)
        if parameter is _MISSING:
            raise _fail("unconstrained_loc_scale_parameters", guide, f"parameter {key!r}", f" in guide.{root_name}" + (f".{module}" if module else "") + f" for site {name!r}")
        found.append(parameter)
    return found[0], found[1]


# --------------------------------------------------------------------------- AutoContinuous family

def unpack_latent(guide, vector: torch.Tensor) -> dict[str, torch.Tensor]:
    """Site name -> the slice of the packed unconstrained latent ``vector`` (shape ``(...,
    latent_dim)``) that belongs to it, reshaped to the site's unconstrained shape (batch
    dimensions in front), of an initialised :class:`~pyro.infer.autoguide.AutoContinuous`:
    ``AutoContinuous._unpack_latent``, in the guide's site order."""
    return {site["name"]: value for site, value in _private(guide, "_unpack_latent", "unpack_latent")(vector)}


def continuous_loc_scale(guide) -> tuple[torch.Tensor, torch.Tensor]:
    """``(loc, scale)`` of the packed latent vector of an initialised ``AutoContinuous`` with
    Gaussian marginals (e.g. ``AutoLowRankMultivariateNormal``: ``scale = sqrt(D + rowsum(F^2))``,
    the marginal standard deviations): ``AutoContinuous._loc_scale()``, what its ``median()`` and
    ``quantiles()`` use. Attached to the graph."""
    return _private(guide, "_loc_scale", "continuous_loc_scale")()


def continuous_init_loc(guide) -> torch.Tensor:
    """The initial packed latent vector of a set-up ``AutoContinuous``: every site's
    ``init_loc_fn`` value, mapped to the unconstrained space and flattened, concatenated in site
    order: ``AutoContinuous._init_loc()``. For a subclass's ``_setup_prototype``."""
    return _private(guide, "_init_loc", "continuous_init_loc")()


def unconstrained_shapes(guide) -> dict[str, torch.Size]:
    """Site name -> the shape of its unconstrained value, in site order, of a set-up
    ``AutoContinuous``: a copy of ``AutoContinuous._unconstrained_shapes``."""
    return dict(_private(guide, "_unconstrained_shapes", "unconstrained_shapes"))


# --------------------------------------------------------------------------- any AutoGuide / PyroModule

def create_plates(guide, *args, **kwargs) -> dict:
    """Plate name -> :class:`pyro.plate` for a guide's ``forward`` (the model's plates, plus
    those of its ``create_plates`` argument): ``AutoGuide._create_plates(*args, **kwargs)``. For a
    subclass's ``forward``."""
    return _private(guide, "_create_plates", "create_plates")(*args, **kwargs)


def param_store_name(module) -> str:
    """The name of a :class:`~pyro.nn.PyroModule` (e.g. an autoguide) in Pyro's param store: its
    parameters are stored there as ``f"{name}.{attribute path}"`` (``PyroModule._pyro_name``)."""
    return _private(module, "_pyro_name", "param_store_name")


def pyro_module_fullname(module, attribute: str) -> str:
    """The full name of ``module``'s attribute ``attribute`` as a sample site or param-store
    entry, e.g. ``"layers.0.weight"`` for the ``weight`` of the network's first layer:
    ``PyroModule._pyro_get_fullname(attribute)``. Defined only while the module runs (Pyro
    asserts it), e.g. inside a :class:`~pyro.nn.PyroSample`'s prior function."""
    method: Callable[[str], str] = _private(module, "_pyro_get_fullname", "pyro_module_fullname")
    return method(attribute)
