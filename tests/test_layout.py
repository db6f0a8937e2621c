"""The package's layout, read from its source with :mod:`ast` (nothing of it is imported): no
module imports a private name (one starting with an underscore) from another module of the
package, and the module-level imports between its modules form no cycle."""

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
