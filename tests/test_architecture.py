"""The package's structure, as docs/architecture.md draws it: every module in one room, imports that follow the
rooms' one-way arrows, no import circle, and no `_private` name imported from another module.

Imports are read from the source (AST), all of them: those at the top of a module and those inside functions
(the lazy imports that keep start-up fast are dependencies all the same, and a circle through one of them is
still a circle). `from package import name` counts as an import of the submodule `package.name` when one
exists, else of the package.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
ROOTS = {"cmdtool": REPO / "src" / "cmdtool", "cmdtool_cli": REPO / "cli" / "cmdtool_cli"}

# room -> the modules in it (a dotted name covers the module or package and everything under it)
ROOMS = {
    "cli": ("cmdtool_cli",),
    "api": ("cmdtool.__init__",),
    "datasets": ("cmdtool.datasets",),
    "training": ("cmdtool.training",),
    "report": ("cmdtool.report",),
    "workflows": ("cmdtool.workflows",),
    "analyzers": ("cmdtool.analyzers",),
    "passes": ("cmdtool.passes",),
    "ingestion": ("cmdtool.ingestion",),
    "store": ("cmdtool.store",),
    "utils": ("cmdtool.utils",),
    "errors": ("cmdtool.errors",),
}
# room -> the rooms it may import (besides itself); the arrows of docs/architecture.md
ALLOWED = {
    "cli": {"api", "datasets", "training", "report", "workflows", "analyzers", "passes", "ingestion", "store",
            "utils", "errors"},
    "api": {"ingestion", "store", "errors"},
    "datasets": {"utils", "errors"},
    "training": {"analyzers", "store", "utils", "errors"},
    "report": {"analyzers", "store", "utils", "errors"},
    "workflows": {"analyzers", "passes", "ingestion", "store", "utils", "errors"},
    "analyzers": {"passes", "store", "utils", "errors"},
    "passes": {"store", "utils", "errors"},
    "ingestion": {"store", "utils", "errors"},
    "store": {"utils", "errors"},
    "utils": {"errors"},
    "errors": set(),
}


def _modules() -> dict[str, tuple[Path, str]]:
    """Dotted name -> (file, the package its relative imports start from). A package is named by its
    ``__init__`` module's package name (``cmdtool.store``); the top-level ``cmdtool/__init__.py`` is
    ``cmdtool.__init__`` so that its room is its own."""
    found = {}
    for top, root in ROOTS.items():
        for path in sorted(root.rglob("*.py")):
            parts = [top, *path.relative_to(root).with_suffix("").parts]
            if parts[-1] == "__init__":
                package = ".".join(parts[:-1])
                name = package if len(parts) > 2 else f"{top}.__init__"
            else:
                package, name = ".".join(parts[:-1]), ".".join(parts)
            found[name] = (path, package)
    return found


MODULES = _modules()


def _target(name: str) -> str | None:
    """The module an imported dotted name lands in (the top-level package's own file for ``cmdtool``)."""
    if name in MODULES:
        return name
    if name in ROOTS:
        return f"{name}.__init__"
    return None


def _imports(module: str) -> list[tuple[str, list[str], int]]:
    """(imported module, names taken from it, line) for every import of a package module in ``module``."""
    path, package = MODULES[module]
    out = []
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            for alias in node.names:
                target = _target(alias.name)
                if target:
                    out.append((target, [], node.lineno))
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")[:len(package.split(".")) - node.level + 1]
                source = ".".join(base + ([node.module] if node.module else []))
            else:
                source = node.module
            for alias in node.names:
                submodule = _target(f"{source}.{alias.name}")
                if submodule and submodule in MODULES and f"{source}.{alias.name}" in MODULES:
                    out.append((submodule, [], node.lineno))
                elif _target(source):
                    out.append((_target(source), [alias.name], node.lineno))
    return out


EDGES = {module: {target for target, _, _ in _imports(module) if target != module} for module in MODULES}


def room_of(module: str) -> list[str]:
    return [room for room, prefixes in ROOMS.items()
            if any(module == p or module.startswith(p + ".") for p in prefixes)]


def _circles() -> list[list[str]]:
    """The strongly connected components of the import graph with more than one module (Tarjan)."""
    index, low, stack, on_stack, found = {}, {}, [], set(), []

    def visit(v):
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in sorted(EDGES[v]):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                component.append(w)
                if w == v:
                    break
            if len(component) > 1:
                found.append(sorted(component))

    for v in sorted(EDGES):
        if v not in index:
            visit(v)
    return found


def test_the_scan_sees_the_package():
    """The scan finds the modules and the imports it is meant to check (a broken scan would pass every test)."""
    assert {"cmdtool.store.store", "cmdtool.analyzers.cmd.posthoc", "cmdtool_cli.app"} <= set(MODULES)
    assert "cmdtool.store.zarr_access" in EDGES["cmdtool.store.store"]
    assert "cmdtool.passes.dask_engine" in EDGES["cmdtool.passes.local"]   # an import inside a function
    assert "cmdtool.store" in EDGES["cmdtool.passes.dask_engine"]          # `from ..store import open_store`


def test_no_import_circles():
    assert _circles() == []


def test_the_circle_check_finds_a_circle(monkeypatch):
    monkeypatch.setitem(EDGES, "cmdtool.store.format", EDGES["cmdtool.store.format"] | {"cmdtool.store.store"})
    assert any("cmdtool.store.store" in c and "cmdtool.store.format" in c for c in _circles())


def test_no_private_names_imported_from_another_module():
    """A `_name` belongs to its module: no other module of cmdtool or cmdtool_cli imports it. A `_module`
    belongs to its package: only modules of that package import it."""
    found = []
    for module in MODULES:
        package = MODULES[module][1]
        for target, names, line in _imports(module):
            private = [n for n in names if n.startswith("_") and not n.startswith("__")]
            if private and target != module:
                found.append(f"{module}:{line} imports {', '.join(private)} from {target}")
            leaf = target.rsplit(".", 1)[-1]
            if leaf.startswith("_") and not leaf.startswith("__") and target.rsplit(".", 1)[0] != package:
                found.append(f"{module}:{line} imports the private module {target}")
    assert found == []


def test_every_module_is_in_exactly_one_room():
    assert {m: room_of(m) for m in MODULES if len(room_of(m)) != 1} == {}


@pytest.mark.parametrize("room", sorted(ROOMS))
def test_rooms_import_only_along_the_arrows(room):
    wrong = []
    for module in MODULES:
        if room_of(module) != [room]:
            continue
        for target, _, line in _imports(module):
            other = room_of(target)[0]
            if other != room and other not in ALLOWED[room]:
                wrong.append(f"{module}:{line} imports {target} ({other})")
    assert wrong == []


def test_the_allowed_imports_point_one_way():
    """The arrows form no circle between rooms either (so the table is a map with one way down)."""
    order, seen = [], set()

    def place(room, path=()):
        assert room not in path, f"rooms in a circle: {' -> '.join((*path, room))}"
        if room not in seen:
            for lower in sorted(ALLOWED[room]):
                place(lower, (*path, room))
            seen.add(room)
            order.append(room)

    for room in sorted(ROOMS):
        place(room)
    assert set(order) == set(ROOMS) == set(ALLOWED)


def test_the_function_ingest_is_not_hidden_by_a_subpackage():
    import cmdtool
    import cmdtool.ingestion.ingest  # noqa: F401  (importing a subpackage sets an attribute of cmdtool)

    assert callable(cmdtool.ingest) and cmdtool.ingest.__module__ == "cmdtool"


# tests/ mirrors the code (docs/architecture.md, "Where the tests are"): tests/<pkg>/... for src/cmdtool/<pkg>/...,
# tests/cli/ for cli/cmdtool_cli/, and the folders of the suites that cut across the packages
TESTS = REPO / "tests"
CROSS_CUTTING = {"failures", "end_to_end"}


def test_tests_mirror_the_packages():
    """Every folder of tests/ is a package of src/cmdtool at the same path, tests/cli, a cross-cutting suite or
    tests/data, and is a package itself (an ``__init__.py``: test modules are imported as ``tests.<path>``, so two
    folders may hold files of the same name); test modules at the top of tests/ are the suites of the whole code or
    of a top-level module of src/cmdtool (``tests/test_<module>.py``)."""
    wrong = []
    for folder in sorted(p for p in TESTS.rglob("*") if p.is_dir()):
        parts = folder.relative_to(TESTS).parts
        if parts[0] == "data" or "__pycache__" in parts or any(p.startswith(".") for p in parts):
            continue
        mirrored = (parts[0] in {"cli"} | CROSS_CUTTING and len(parts) == 1) or \
            (ROOTS["cmdtool"].joinpath(*parts) / "__init__.py").is_file()
        if not mirrored:
            wrong.append(f"tests/{'/'.join(parts)} mirrors no package of src/cmdtool")
        if not (folder / "__init__.py").is_file():
            wrong.append(f"tests/{'/'.join(parts)} has no __init__.py")
    top_modules = {p.stem for p in ROOTS["cmdtool"].glob("*.py")} - {"__init__"}
    for module in sorted(TESTS.glob("test_*.py")):
        if module.stem not in {"test_architecture"} | {f"test_{m}" for m in top_modules}:
            wrong.append(f"tests/{module.name} belongs in the folder of the package it tests")
    assert wrong == []
