"""The package's layout, read from its source with :mod:`ast` (nothing of it is imported): no
module imports a private name (one starting with an underscore) from another module of the
package, the module-level imports between its modules form no cycle, and no module but
:mod:`pyro_bbt.pyro_internals` reads a Pyro-private attribute."""

from __future__ import annotations

import ast
from collections.abc import Iterator
from pathlib import Path

PACKAGE_DIR = Path(__file__).resolve().parent.parent / "pyro_bbt"
PACKAGE = PACKAGE_DIR.name


def module_name(path: Path) -> str:
    """``pyro_bbt/x.py`` -> ``pyro_bbt.x``; a package's ``__init__.py`` -> the package's name."""
    parts = (PACKAGE,) + path.relative_to(PACKAGE_DIR).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def package_modules() -> dict[str, tuple[Path, ast.Module]]:
    """Every module of the package, by dotted name: its path and its parsed source."""
    return {module_name(path): (path, ast.parse(path.read_text(encoding="utf-8"), filename=str(path)))
            for path in sorted(PACKAGE_DIR.rglob("*.py"))}


def imported_module(node: ast.ImportFrom, importer: str, path: Path) -> str | None:
    """The dotted name of the module ``from ... import`` reads, or ``None`` if it is outside the package."""
    if node.level == 0:
        target = node.module or ""
    else:
        here = importer.split(".") if path.name == "__init__.py" else importer.split(".")[:-1]
        base = here[: len(here) - (node.level - 1)]
        target = ".".join(base + ([node.module] if node.module else []))
    return target if target == PACKAGE or target.startswith(PACKAGE + ".") else None


def is_private(name: str) -> bool:
    return name.startswith("_") and not (name.startswith("__") and name.endswith("__"))


def private_imports(modules: dict[str, tuple[Path, ast.Module]]) -> list[str]:
    """``module: name`` for every private name a module imports from another module of the
    package, at any depth (inside functions, classes, ``if`` blocks, ...)."""
    found = []
    for importer, (path, tree) in modules.items():
        for node in ast.walk(tree):
            if not isinstance(node, ast.ImportFrom):
                continue
            source = imported_module(node, importer, path)
            if source is None or source == importer:
                continue
            found += [f"{importer}: {alias.name} (from {source}, line {node.lineno})" for alias in node.names if is_private(alias.name)]
    return found


def is_type_checking(test: ast.expr) -> bool:
    return (isinstance(test, ast.Name) and test.id == "TYPE_CHECKING") or (
        isinstance(test, ast.Attribute) and test.attr == "TYPE_CHECKING")


def module_level_imports(statements: list[ast.stmt]) -> Iterator[ast.Import | ast.ImportFrom]:
    """The imports that run when the module is imported: top-level statements and the blocks
    (``if``, ``try``, ``with``, class bodies) that run with them; not function bodies, nor
    ``if TYPE_CHECKING:`` bodies."""
    for node in statements:
        if isinstance(node, (ast.Import, ast.ImportFrom)):
            yield node
        elif isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
            continue
        elif isinstance(node, ast.If):
            if not is_type_checking(node.test):
                yield from module_level_imports(node.body)
            yield from module_level_imports(node.orelse)
        elif isinstance(node, ast.ClassDef):
            yield from module_level_imports(node.body)
        else:
            for field in ("body", "orelse", "finalbody"):
                yield from module_level_imports(getattr(node, field, []) or [])
            for handler in getattr(node, "handlers", []) or []:
                yield from module_level_imports(handler.body)
            for case in getattr(node, "cases", []) or []:  # match statements
                yield from module_level_imports(case.body)


def import_graph(modules: dict[str, tuple[Path, ast.Module]]) -> dict[str, set[str]]:
    """Module -> the package's modules it imports at module level."""
    graph: dict[str, set[str]] = {name: set() for name in modules}
    for importer, (path, tree) in modules.items():
        for node in module_level_imports(tree.body):
            if isinstance(node, ast.Import):
                targets = {alias.name for alias in node.names}
            else:
                source = imported_module(node, importer, path)
                if source is None:
                    continue
                submodules = {f"{source}.{alias.name}" for alias in node.names if f"{source}.{alias.name}" in modules}
                # ``from . import x`` with x a submodule reads x, not the package's own names.
                targets = submodules if len(submodules) == len(node.names) else submodules | {source}
            graph[importer] |= {t for t in targets if t in modules and t != importer}
    return graph


def find_cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """The cycles a depth-first search meets (each closed by a back edge), as module paths
    ``[a, b, ..., a]``."""
    cycles: list[list[str]] = []
    state: dict[str, str] = {}  # "open" while on the current path, "done" after
    path: list[str] = []

    def visit(node: str) -> None:
        state[node] = "open"
        path.append(node)
        for nxt in sorted(graph[node]):
            if state.get(nxt) == "open":
                cycles.append(path[path.index(nxt):] + [nxt])
            elif nxt not in state:
                visit(nxt)
        path.pop()
        state[node] = "done"

    for node in sorted(graph):
        if node not in state:
            visit(node)
    return cycles


PYRO_INTERNALS = f"{PACKAGE}.pyro_internals"

PYRO_PRIVATE_ATTRIBUTES = frozenset({
    "_event_dims", "_get_loc_and_scale", "_parameters",  # AutoNormal's sites; nn.Module's table behind a PyroParam
    "_unpack_latent", "_loc_scale", "_init_loc", "_unconstrained_shapes",  # AutoContinuous's packed latent vector
    "_create_plates", "_pyro_name", "_pyro_get_fullname",  # any AutoGuide / PyroModule
})
"""Pyro-private attributes (and ``nn.Module._parameters``) that only :mod:`pyro_bbt.pyro_internals`
may read. Not here: ``_setup_prototype``, which the package's guides override and call through
``super()`` (Pyro's documented way to extend an ``AutoGuide``); a ``def _loc_scale`` override is a
definition, not a read, and is not flagged."""

_ATTRIBUTE_FUNCTIONS = frozenset({"getattr", "hasattr", "setattr", "delattr"})


def pyro_private_reads(modules: dict[str, tuple[Path, ast.Module]]) -> list[tuple[str, str, int]]:
    """``(module, attribute, line)`` for every use of a :data:`PYRO_PRIVATE_ATTRIBUTES` name
    outside :mod:`pyro_bbt.pyro_internals`: as an attribute (``x._event_dims``, any depth) or as
    the name given to ``getattr`` / ``hasattr`` / ``setattr`` / ``delattr``; by module, then line."""
    found = set()
    for name, (_, tree) in modules.items():
        if name == PYRO_INTERNALS:
            continue
        for node in ast.walk(tree):
            if isinstance(node, ast.Attribute) and node.attr in PYRO_PRIVATE_ATTRIBUTES:
                found.add((name, node.attr, node.lineno))
            elif (isinstance(node, ast.Call) and isinstance(node.func, ast.Name) and node.func.id in _ATTRIBUTE_FUNCTIONS
                  and len(node.args) >= 2 and isinstance(node.args[1], ast.Constant) and node.args[1].value in PYRO_PRIVATE_ATTRIBUTES):
                found.add((name, node.args[1].value, node.lineno))
    return sorted(found, key=lambda read: (read[0], read[2], read[1]))


def unexpected_pyro_private_reads(modules) -> list[str]:
    """The reads outside the adapter, as ``module: .attribute (line n)``."""
    return [f"{module}: .{attribute} (line {line})" for module, attribute, line in pyro_private_reads(modules) if module != PYRO_INTERNALS]


def test_no_module_imports_a_private_name_from_another_module():
    found = private_imports(package_modules())
    assert not found, "private names imported from another module of the package (make them public where defined):\n" + "\n".join(found)


def test_module_level_imports_have_no_cycle():
    modules = package_modules()
    graph = import_graph(modules)
    assert sum(map(len, graph.values())) > len(modules) // 2, "the import graph is implausibly sparse: the test reads nothing"
    cycles = find_cycles(graph)
    assert not cycles, "import cycles between the package's modules:\n" + "\n".join(" -> ".join(c) for c in cycles)


def test_the_checks_see_violations():
    """Both checks fail on a made-up package with a private import and a cycle."""
    modules = {
        f"{PACKAGE}.a": (PACKAGE_DIR / "a.py", ast.parse("from .b import B\n\ndef f():\n    from .b import _helper\n")),
        f"{PACKAGE}.b": (PACKAGE_DIR / "b.py", ast.parse(f"from typing import TYPE_CHECKING\nimport {PACKAGE}.c\nif TYPE_CHECKING:\n    from .a import A\n")),
        f"{PACKAGE}.c": (PACKAGE_DIR / "c.py", ast.parse(f"try:\n    from {PACKAGE}.a import _x, __version__\nexcept ImportError:\n    pass\n")),
        f"{PACKAGE}.fake": (PACKAGE_DIR / "fake.py", ast.parse("def g():\n    from . import a\n")),
    }
    assert private_imports(modules) == [f"{PACKAGE}.a: _helper (from {PACKAGE}.b, line 4)", f"{PACKAGE}.c: _x (from {PACKAGE}.a, line 2)"]
    assert find_cycles(import_graph(modules)) == [[f"{PACKAGE}.a", f"{PACKAGE}.b", f"{PACKAGE}.c", f"{PACKAGE}.a"]]
    del modules[f"{PACKAGE}.c"]
    assert find_cycles(import_graph(modules)) == []  # b's import of a is for type checking only


def test_only_pyro_internals_reads_pyro_private_attributes():
    modules = package_modules()
    assert PYRO_INTERNALS in modules
    adapter_strings = {node.value for node in ast.walk(modules[PYRO_INTERNALS][1]) if isinstance(node, ast.Constant) and isinstance(node.value, str)}
    assert PYRO_PRIVATE_ATTRIBUTES <= adapter_strings, f"the adapter reads none of {sorted(PYRO_PRIVATE_ATTRIBUTES - adapter_strings)}: the list is stale"
    unexpected = unexpected_pyro_private_reads(modules)
    assert not unexpected, ("Pyro-private attributes read outside pyro_bbt/pyro_internals.py (add or use a function there):\n"
                            + "\n".join(unexpected))


def test_the_pyro_private_check_sees_violations():
    """A made-up package: reads of Pyro-private attributes are flagged wherever they are, except
    in pyro_internals; the documented ``_setup_prototype`` extension and a ``_loc_scale`` override
    are not."""
    source = (
        "class G(AutoNormal):\n"
        "    def _setup_prototype(self, *args):\n"
        "        super()._setup_prototype(*args)\n"
        "    def _loc_scale(self):\n"
        "        return self.locs, self.scales._private_thing\n"
        "    def forward(self):\n"
        "        return self._get_loc_and_scale('w'), self._event_dims['w']\n"
        "def f(guide, m):\n"
        "    p = m.locs._parameters['w_unconstrained']\n"
        "    return guide._pyro_name + '.', getattr(guide, '_unpack_latent')(p), hasattr(guide, 'event_dims')\n"
    )
    modules = {
        f"{PACKAGE}.a": (PACKAGE_DIR / "a.py", ast.parse(source)),
        f"{PACKAGE}.b": (PACKAGE_DIR / "b.py", ast.parse("def g(module):\n    return [module._pyro_get_fullname('w') for _ in ()]\n")),
        PYRO_INTERNALS: (PACKAGE_DIR / "pyro_internals.py", ast.parse(source)),
    }
    assert pyro_private_reads(modules) == [
        (f"{PACKAGE}.a", "_event_dims", 7),
        (f"{PACKAGE}.a", "_get_loc_and_scale", 7),
        (f"{PACKAGE}.a", "_parameters", 9),
        (f"{PACKAGE}.a", "_pyro_name", 10),
        (f"{PACKAGE}.a", "_unpack_latent", 10),
        (f"{PACKAGE}.b", "_pyro_get_fullname", 2),
    ]
    assert unexpected_pyro_private_reads(modules) == [
        f"{PACKAGE}.a: ._event_dims (line 7)", f"{PACKAGE}.a: ._get_loc_and_scale (line 7)", f"{PACKAGE}.a: ._parameters (line 9)",
        f"{PACKAGE}.a: ._pyro_name (line 10)", f"{PACKAGE}.a: ._unpack_latent (line 10)", f"{PACKAGE}.b: ._pyro_get_fullname (line 2)"]
