"""The import graph keeps its shape: no cycles among optdemo's modules, gradio only in optdemo/web/,
and the engine never imports the tools.

Every import statement counts, the ones inside functions too (an import moved into a function
still makes a cycle, only a hidden one); imports under ``if TYPE_CHECKING:`` do not, since they
never run.
"""

from __future__ import annotations

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
HEAVY_UI = ("gradio", "gradio_client")

# No cycle is tolerated (gpu_offload <-> speed was broken by moving the policy choice to speed).
KNOWN_CYCLES: set[frozenset[str]] = set()


def _module_name(path: Path) -> str:
    parts = path.relative_to(ROOT).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _sources() -> dict[str, Path]:
    files = [*ROOT.glob("optdemo/**/*.py"), *ROOT.glob("tools/*.py"), ROOT / "app.py"]
    return {_module_name(path): path for path in files}


def _is_type_checking(node: ast.If) -> bool:
    test = node.test
    return (isinstance(test, ast.Name) and test.id == "TYPE_CHECKING") or (
        isinstance(test, ast.Attribute) and test.attr == "TYPE_CHECKING"
    )


def _imported(tree: ast.AST, known: set[str]) -> set[str]:
    """Every module ``tree`` imports at run time; ``from pkg import mod`` counts as ``pkg.mod``."""
    found: set[str] = set()
    todo = [tree]
    while todo:
        node = todo.pop()
        if isinstance(node, ast.If) and _is_type_checking(node):
            todo.extend(node.orelse)
            continue
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            submodules = {f"{node.module}.{alias.name}" for alias in node.names}
            found.update({node.module} | (submodules & known))
        todo.extend(ast.iter_child_nodes(node))
    return found


def _graph() -> dict[str, set[str]]:
    sources = _sources()
    known = set(sources)
    return {name: _imported(ast.parse(path.read_text()), known) for name, path in sources.items()}


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


def test_graph_sees_the_known_imports() -> None:
    graph = _graph()
    assert "optdemo.plan.planner" in graph["optdemo.runtime.loader"]
    assert "optdemo.weights.convert" in graph["optdemo.runtime.loader"]  # `from optdemo import convert`
    assert "optdemo.core.construction" in graph["optdemo.models.synthetic"]
    assert "optdemo.web" in graph["app"]  # imported inside main(): still counted


def test_finds_a_cycle_hidden_in_a_function() -> None:
    graph = {"optdemo.a": {"optdemo.b"}, "optdemo.b": {"optdemo.c"}, "optdemo.c": {"optdemo.a"}}
    assert _cycles(graph) == [frozenset({"optdemo.a", "optdemo.b", "optdemo.c"})]


def test_no_import_cycle_among_optdemo_modules() -> None:
    cycles = [sorted(c) for c in _cycles(_graph()) if c not in KNOWN_CYCLES]
    assert cycles == []


def test_gradio_only_in_the_ui_package() -> None:
    offenders = {
        name: sorted(m for m in imported if m.split(".")[0] in HEAVY_UI)
        for name, imported in _graph().items()
        if name.startswith("optdemo") and not name.startswith("optdemo.web")
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
