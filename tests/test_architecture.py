"""The import graph keeps its shape: optdemo's subpackages import one way only, no module cycle,
gradio only in optdemo.web, the engine never imports the tools, and the size limits hold.

Every import statement counts: the ones inside functions (an import moved into a function still
makes an edge, only a hidden one) and the ones under ``if TYPE_CHECKING:`` (a type-only import
still ties two modules together).
"""

from __future__ import annotations

import ast
import importlib
import inspect
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
HEAVY_UI = ("gradio", "gradio_client")

# Which subpackage may import which (besides itself). The layers, top to bottom:
#   web -> app -> {runtime, remote} -> plan -> weights -> {models, system} -> core
# "top" is optdemo's own top-level modules (the package and its command line).
ALLOWED: dict[str, set[str]] = {
    "core": set(),
    "system": {"core"},
    "models": {"core"},
    "weights": {"core", "models", "system"},
    "plan": {"core", "models", "system", "weights"},
    "runtime": {"core", "models", "system", "weights", "plan"},
    "remote": {"core"},
    "app": {"core", "models", "system", "weights", "plan", "runtime", "remote"},
    "web": {"core", "plan", "app", "runtime", "remote", "system"},
    "top": {"core", "models", "system", "weights", "plan", "runtime", "app"},
}
# The web layer renders what the app hands it: from these packages it may import data types
# (classes) to name them, never a function to call.
WEB_TYPES_ONLY = {"runtime", "remote", "system"}


def _module_name(path: Path) -> str:
    parts = path.relative_to(ROOT).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _sources() -> dict[str, Path]:
    files = [*ROOT.glob("optdemo/**/*.py"), *ROOT.glob("tools/*.py"), ROOT / "app.py"]
    return {_module_name(path): path for path in files}


def _imports(tree: ast.AST, known: set[str]) -> list[tuple[str, tuple[str, ...]]]:
    """(module, names) for every import in ``tree``; ``from pkg import mod`` counts as ``pkg.mod``."""
    found: list[tuple[str, tuple[str, ...]]] = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found += [(alias.name, ()) for alias in node.names]
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names = tuple(alias.name for alias in node.names)
            submodules = [f"{node.module}.{name}" for name in names if f"{node.module}.{name}" in known]
            found += [(node.module, names), *((module, ()) for module in submodules)]
    return found


def _graph() -> dict[str, set[str]]:
    sources = _sources()
    known = set(sources)
    return {
        name: {module for module, _ in _imports(ast.parse(path.read_text()), known)}
        for name, path in sources.items()
    }


def _package(module: str) -> str:
    """The layer a module of optdemo belongs to: its subpackage, or "top"."""
    parts = module.split(".")
    if len(parts) >= 2 and (ROOT / "optdemo" / parts[1]).is_dir():
        return parts[1]
    return "top"


def _cycles(graph: dict[str, set[str]]) -> list[frozenset[str]]:
    """Strongly connected components of more than one module among optdemo's (Tarjan)."""
    nodes = [n for n in graph if n.startswith("optdemo")]
    edges = {n: {m for m in graph[n] if m in graph and m.startswith("optdemo")} for n in nodes}
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    found: list[frozenset[str]] = []

    def visit(node: str) -> None:
        index[node] = low[node] = len(index)
        stack.append(node)
        for other in edges[node]:
            if other not in index:
                visit(other)
                low[node] = min(low[node], low[other])
            elif other in stack:
                low[node] = min(low[node], index[other])
        if low[node] == index[node]:
            component = {stack.pop()}
            while node not in component:
                component.add(stack.pop())
            if len(component) > 1 or node in edges[node]:
                found.append(frozenset(component))

    for node in nodes:
        if node not in index:
            visit(node)
    return found


def _layer_violations(graph: dict[str, set[str]]) -> list[str]:
    return sorted(
        f"{name} -> {other}"
        for name, imported in graph.items()
        if name.startswith("optdemo")
        for other in imported
        if other.startswith("optdemo.")
        and _package(other) != _package(name)
        and _package(other) not in ALLOWED[_package(name)]
    )


def test_graph_sees_the_known_imports() -> None:
    graph = _graph()
    assert "optdemo.plan.planner" in graph["optdemo.runtime.loader"]
    assert (
        "optdemo.weights.convert" in graph["optdemo.runtime.loader"]
    )  # `from optdemo.weights import convert`
    assert "optdemo.core.construction" in graph["optdemo.models.synthetic"]
    assert "optdemo.web.blocks" in graph["app"]  # imported inside main(): still counted


def test_type_checking_imports_count() -> None:
    tree = ast.parse(
        "from typing import TYPE_CHECKING\nif TYPE_CHECKING:\n    from optdemo.web import blocks\n"
    )
    assert ("optdemo.web", ("blocks",)) in _imports(tree, set())


def test_finds_a_cycle_hidden_in_a_function() -> None:
    graph = {"optdemo.a": {"optdemo.b"}, "optdemo.b": {"optdemo.c"}, "optdemo.c": {"optdemo.a"}}
    assert _cycles(graph) == [frozenset({"optdemo.a", "optdemo.b", "optdemo.c"})]


def test_finds_an_edge_against_the_layers() -> None:
    graph = {"optdemo.plan.speed": {"optdemo.runtime.tiers.disk_map", "optdemo.core.errors"}}
    assert _layer_violations(graph) == ["optdemo.plan.speed -> optdemo.runtime.tiers.disk_map"]


def test_every_subpackage_has_a_row_and_the_top_stays_small() -> None:
    packages = {path.name for path in (ROOT / "optdemo").iterdir() if (path / "__init__.py").exists()}
    assert packages == set(ALLOWED) - {"top"}
    assert len(packages) >= 5
    top_modules = [path.name for path in (ROOT / "optdemo").glob("*.py")]
    assert len(top_modules) <= 3, top_modules


def test_the_layers_import_one_way() -> None:
    assert _layer_violations(_graph()) == []


def test_no_import_cycle_among_optdemo_modules() -> None:
    assert [sorted(c) for c in _cycles(_graph())] == []


def test_no_cycle_between_subpackages() -> None:
    graph = _graph()
    packages: dict[str, set[str]] = {}
    for name, imported in graph.items():
        if name.startswith("optdemo"):
            edges = {_package(m) for m in imported if m.startswith("optdemo.")} - {_package(name)}
            packages.setdefault(f"optdemo.{_package(name)}", set()).update(f"optdemo.{p}" for p in edges)
    assert _cycles(packages) == []


def test_the_web_layer_calls_no_function_of_the_runtime_or_the_system() -> None:
    """Names the web layer imports from runtime, remote or system are classes it renders, never
    functions it calls; it imports nothing from models or weights at all."""
    sources = _sources()
    known = set(sources)
    offenders = []
    for name, path in sources.items():
        if _package(name) != "web":
            continue
        for module, names in _imports(ast.parse(path.read_text()), known):
            if module.startswith("optdemo.") and _package(module) in WEB_TYPES_ONLY:
                imported = importlib.import_module(module)
                offenders += [
                    f"{name}: {module}.{n}" for n in names if not inspect.isclass(getattr(imported, n, None))
                ]
    assert offenders == []


def test_gradio_only_in_the_web_package() -> None:
    offenders = {
        name: sorted(m for m in imported if m.split(".")[0] in HEAVY_UI)
        for name, imported in _graph().items()
        if name.startswith("optdemo") and _package(name) != "web"
    }
    assert {name: mods for name, mods in offenders.items() if mods} == {}


def test_the_engine_never_imports_the_tools() -> None:
    graph = _graph()
    assert graph["tools.loadtest"] & {"optdemo.app.settings"}  # the scan sees tools' own imports
    assert {
        name: sorted(m for m in imported if m.split(".")[0] == "tools")
        for name, imported in graph.items()
        if name.startswith("optdemo") and any(m.split(".")[0] == "tools" for m in imported)
    } == {}


MAX_FILE_LINES = 450
MAX_FUNCTION_LINES = 80


def test_no_file_and_no_function_too_long_to_read() -> None:
    long_files, long_functions = [], []
    for name, path in _sources().items():
        if not name.startswith("optdemo"):
            continue
        text = path.read_text()
        if text.count("\n") > MAX_FILE_LINES:
            long_files.append(f"{name}: {text.count(chr(10))} lines")
        for node in ast.walk(ast.parse(text)):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                length = node.end_lineno - node.lineno + 1
                if length > MAX_FUNCTION_LINES:
                    long_functions.append(f"{name}.{node.name}: {length} lines")
    assert (long_files, long_functions) == ([], [])
