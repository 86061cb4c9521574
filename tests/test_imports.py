"""The project's imports run one way (DESIGN: entry points -> engines -> config -> datasets,
models -> utils -> olmbalance) and form no circle. Every import statement counts, including
those inside functions (a lazy import is still a dependency); imports under
``if TYPE_CHECKING:`` are type hints only and do not."""
from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
# Lower layers never import higher ones; a layer may import itself and anything below.
LAYERS = {"olmbalance": 0, "utils": 1, "models": 2, "datasets": 2, "config": 3, "engines": 4}
# Packages of one layer that must not import each other (models and datasets are independent).
SIBLINGS_APART = {("models", "datasets"), ("datasets", "models")}
PROJECT_TOP = set(LAYERS) | {"main", "main_trans"}


def module_name(path: Path) -> str:
    parts = list(path.relative_to(ROOT).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts = parts[:-1]
    return ".".join(parts)


def is_type_checking(node: ast.If) -> bool:
    test = node.test
    return (isinstance(test, ast.Name) and test.id == "TYPE_CHECKING") or (
        isinstance(test, ast.Attribute) and test.attr == "TYPE_CHECKING")


def imported_modules(path: Path, known: set[str]) -> set[str]:
    """The project modules ``path`` imports (``from a import b`` counts ``a.b`` when it is a module)."""
    tree = ast.parse(path.read_text(), filename=str(path))
    found: set[str] = set()
    own = module_name(path) if path.is_relative_to(ROOT) else path.stem
    package = own.rsplit(".", 1)[0] if path.name != "__init__.py" else own

    def visit(node):
        for child in ast.iter_child_nodes(node):
            if isinstance(child, ast.If) and is_type_checking(child):
                for extra in child.orelse:
                    visit(extra)
                continue
            if isinstance(child, ast.Import):
                found.update(alias.name for alias in child.names)
            elif isinstance(child, ast.ImportFrom):
                base = child.module or ""
                if child.level:
                    anchor = package.split(".")[: len(package.split(".")) - child.level + 1]
                    base = ".".join(anchor + ([base] if base else []))
                for alias in child.names:  # a submodule by name, else a name defined in base
                    found.add(f"{base}.{alias.name}" if f"{base}.{alias.name}" in known else base)
            visit(child)

    visit(tree)
    return {name for name in found if name.split(".")[0] in PROJECT_TOP}


def project_graph() -> dict[str, set[str]]:
    files = [p for top in LAYERS for p in ((ROOT / top).rglob("*.py") if (ROOT / top).is_dir() else [ROOT / f"{top}.py"])]
    files += [ROOT / "main.py", ROOT / "main_trans.py"]
    known = {module_name(p) for p in files}
    graph = {}
    for path in files:
        targets = set()
        for name in imported_modules(path, known):
            # "from pkg import x" where x is a name: the dependency is pkg (its __init__) or pkg.module
            while name and name not in known:
                name = name.rpartition(".")[0]
            if name:
                targets.add(name)
        graph[module_name(path)] = targets - {module_name(path)}
    return graph


def layer(module: str) -> int | None:
    return LAYERS.get(module.split(".")[0])


def upward_imports(graph: dict[str, set[str]]) -> list[str]:
    problems = []
    for source, targets in graph.items():
        if layer(source) is None:
            continue  # entry points may import anything
        for target in targets:
            top_s, top_t = source.split(".")[0], target.split(".")[0]
            if layer(target) is None or layer(target) > layer(source) or (top_s, top_t) in SIBLINGS_APART:
                problems.append(f"{source} -> {target}")
    return sorted(problems)


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components with more than one module (Tarjan)."""
    index, low, stack, on_stack, found = {}, {}, [], set(), []
    counter = [0]

    def strongconnect(node):
        index[node] = low[node] = counter[0]
        counter[0] += 1
        stack.append(node)
        on_stack.add(node)
        for target in graph.get(node, ()):
            if target not in index:
                strongconnect(target)
                low[node] = min(low[node], low[target])
            elif target in on_stack:
                low[node] = min(low[node], index[target])
        if low[node] == index[node]:
            component = []
            while True:
                member = stack.pop()
                on_stack.discard(member)
                component.append(member)
                if member == node:
                    break
            if len(component) > 1:
                found.append(sorted(component))

    for node in list(graph):
        if node not in index:
            strongconnect(node)
    return found


def test_no_module_imports_upward():
    assert upward_imports(project_graph()) == []


def test_no_import_circle():
    assert cycles(project_graph()) == []


def test_the_walker_sees_lazy_imports_circles_and_upward_imports(tmp_path):
    # The checks themselves: a function-level import upward and a two-module circle are found.
    graph = {"utils.a": {"engines.b"}, "engines.b": {"utils.a"}, "olmbalance.x": {"config"}}
    assert upward_imports(graph) == ["olmbalance.x -> config", "utils.a -> engines.b"]
    assert cycles(graph) == [["engines.b", "utils.a"]]
    source = tmp_path / "mod.py"
    source.write_text("from typing import TYPE_CHECKING\nif TYPE_CHECKING:\n    import config\n"
                      "def f():\n    import engines.trainer\n")
    assert imported_modules(source, {"engines.trainer"}) == {"engines.trainer"}


@pytest.mark.parametrize("module", ["olmbalance"])
def test_the_methods_package_imports_only_torch(module):
    # Installable alone: nothing but torch and the standard library.
    import sys

    allowed = set(sys.stdlib_module_names) | {"torch", module}
    for path in (ROOT / module).rglob("*.py"):
        tree = ast.parse(path.read_text())
        for node in ast.walk(tree):
            names = ([a.name for a in node.names] if isinstance(node, ast.Import)
                     else [node.module or ""] if isinstance(node, ast.ImportFrom) and not node.level else [])
            for name in names:
                assert name.split(".")[0] in allowed, f"{path.relative_to(ROOT)} imports {name}"
