"""The package's layout, read from the source with ``ast``: no import cycle between modules (imports inside
functions count too; only ``if TYPE_CHECKING:`` blocks are left out), and the low layers import nothing
above them."""

from __future__ import annotations

import ast
from collections import deque
from pathlib import Path

import pytest

SOURCE = Path(__file__).resolve().parents[1] / "src"
PACKAGE = "llmprune"
HEAVY = {"torch", "transformers", "safetensors", "huggingface_hub", "accelerate", "numpy", "datasets"}


def module_files(root: Path = SOURCE) -> dict[str, Path]:
    """Every module of the package by dotted name (a package by its own name, for its ``__init__``)."""
    modules = {}
    for path in sorted((root / PACKAGE).rglob("*.py")):
        parts = path.relative_to(root).with_suffix("").parts
        modules[".".join(parts[:-1] if parts[-1] == "__init__" else parts)] = path
    return modules


def _is_type_checking(test: ast.expr) -> bool:
    return (isinstance(test, ast.Name) and test.id == "TYPE_CHECKING") or (
        isinstance(test, ast.Attribute) and test.attr == "TYPE_CHECKING"
    )


def _imports(node: ast.AST, module_level_only: bool = False):
    """The import statements under ``node``, skipping ``if TYPE_CHECKING:`` bodies (and, with
    ``module_level_only``, function bodies)."""
    for child in ast.iter_child_nodes(node):
        if isinstance(child, (ast.Import, ast.ImportFrom)):
            yield child
        elif isinstance(child, ast.If) and _is_type_checking(child.test):
            for other in child.orelse:
                yield from _imports(ast.Module(body=[other], type_ignores=[]), module_level_only)
        elif module_level_only and isinstance(child, (ast.FunctionDef, ast.AsyncFunctionDef, ast.Lambda)):
            continue
        else:
            yield from _imports(child, module_level_only)


def imported(module: str, path: Path, modules: dict[str, Path], module_level_only: bool = False) -> set[str]:
    """The package's modules that ``module`` imports: ``from a.b import c`` is an edge to ``a.b.c`` when
    that is a module, else to ``a.b``; ``import a.b`` to ``a.b``; relative imports resolved."""
    package = module if path.name == "__init__.py" else module.rpartition(".")[0]
    edges = set()
    for node in _imports(ast.parse(path.read_text(encoding="utf-8")), module_level_only):
        if isinstance(node, ast.Import):
            edges.update(alias.name for alias in node.names if alias.name in modules)
            continue
        base = node.module or ""
        if node.level:
            parts = package.split(".")[: len(package.split(".")) - node.level + 1]
            base = ".".join([*parts, base] if base else parts)
        for alias in node.names:
            target = f"{base}.{alias.name}"
            if target in modules:
                edges.add(target)
            elif base in modules:
                edges.add(base)
    edges.discard(module)
    return edges


def import_graph(root: Path = SOURCE) -> dict[str, set[str]]:
    modules = module_files(root)
    return {module: imported(module, path, modules) for module, path in modules.items()}


def strongly_connected(graph: dict[str, set[str]]) -> list[list[str]]:
    """Tarjan's components with more than one module (iterative: no recursion limit)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    components = []
    for start in sorted(graph):
        if start in index:
            continue
        work = [(start, iter(sorted(graph[start])))]
        index[start] = low[start] = len(index)
        stack.append(start)
        on_stack.add(start)
        while work:
            node, successors = work[-1]
            advanced = False
            for successor in successors:
                if successor not in index:
                    index[successor] = low[successor] = len(index)
                    stack.append(successor)
                    on_stack.add(successor)
                    work.append((successor, iter(sorted(graph[successor]))))
                    advanced = True
                    break
                if successor in on_stack:
                    low[node] = min(low[node], index[successor])
            if advanced:
                continue
            work.pop()
            if work:
                low[work[-1][0]] = min(low[work[-1][0]], low[node])
            if low[node] == index[node]:
                component = []
                while True:
                    member = stack.pop()
                    on_stack.discard(member)
                    component.append(member)
                    if member == node:
                        break
                if len(component) > 1:
                    components.append(sorted(component))
    return components


def shortest_cycle(graph: dict[str, set[str]], members: list[str]) -> list[str]:
    """A shortest cycle through the first of ``members`` (within them), as a path ending where it began."""
    inside, start = set(members), members[0]
    previous: dict[str, str] = {}
    queue = deque([start])
    while queue:
        node = queue.popleft()
        for successor in sorted(graph[node] & inside):
            if successor == start:
                path = [node]
                while path[-1] != start:
                    path.append(previous[path[-1]])
                return [*reversed(path), start]
            if successor not in previous:
                previous[successor] = node
                queue.append(successor)
    raise AssertionError(f"no cycle through {start}")


def describe_cycles(graph: dict[str, set[str]]) -> list[str]:
    """One line per group of modules that import each other: a shortest cycle, and the rest of the group."""
    lines = []
    for members in strongly_connected(graph):
        cycle = shortest_cycle(graph, members)
        rest = sorted(set(members) - set(cycle))
        lines.append(" → ".join(cycle) + (f" (and through {', '.join(rest)})" if rest else ""))
    return lines


def test_there_is_no_import_cycle_between_modules():
    cycles = describe_cycles(import_graph())
    assert not cycles, "import cycles:\n" + "\n".join(cycles)


def test_the_cycle_finder_names_a_cycle_through_function_level_imports(tmp_path):
    package = tmp_path / PACKAGE
    (package / "sub").mkdir(parents=True)
    (package / "__init__.py").write_text("__version__ = '0'\n")
    (package / "sub" / "__init__.py").write_text("")
    (package / "a.py").write_text("from llmprune.sub import b\n")
    (package / "sub" / "b.py").write_text("def f():\n    from ..c import g\n")
    (package / "c.py").write_text("import llmprune.a\n")
    (package / "d.py").write_text(
        "from typing import TYPE_CHECKING\nif TYPE_CHECKING:\n    from llmprune import e\n"
    )
    (package / "e.py").write_text("from llmprune import __version__\nfrom llmprune import d\n")
    graph = import_graph(tmp_path)
    assert graph["llmprune.e"] == {"llmprune", "llmprune.d"}  # __version__: an edge to llmprune/__init__
    assert graph["llmprune.d"] == set()  # only for the type checker
    assert describe_cycles(graph) == ["llmprune.a → llmprune.sub.b → llmprune.c → llmprune.a"]


def test_storage_is_the_bottom_layer():
    """storage imports nothing from llmprune but errors, and nothing heavy when it is imported."""
    modules = module_files()
    path = modules[f"{PACKAGE}.storage"]
    assert imported(f"{PACKAGE}.storage", path, modules) <= {f"{PACKAGE}.errors"}
    tree = ast.parse(path.read_text(encoding="utf-8"))
    top = set()
    for node in _imports(tree, module_level_only=True):
        names = [alias.name for alias in node.names] if isinstance(node, ast.Import) else [node.module or ""]
        top.update(name.split(".")[0] for name in names)
    assert not top & HEAVY, f"storage imports {sorted(top & HEAVY)} at module level"


@pytest.mark.parametrize("low", ["models", "storage", "errors"])
def test_low_layers_import_nothing_that_builds_on_them(low):
    above = ("export", "pipeline", "sweeps", "training", "api", "cli", "inference", "evaluation")
    graph = import_graph()
    upward = {
        (module, target)
        for module, targets in graph.items()
        if module == f"{PACKAGE}.{low}" or module.startswith(f"{PACKAGE}.{low}.")
        for target in targets
        if target.split(".")[1] in above
    }
    assert not upward, f"{low} imports from above it: {sorted(upward)}"
