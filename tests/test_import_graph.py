"""The package's modules import one another without cycles, counting imports inside functions:
a lazy import hides a cycle from Python, not from the reader who has to change either module."""

from __future__ import annotations

import ast
from pathlib import Path

PACKAGE = Path(__file__).resolve().parents[1] / "src" / "dlmspec_vllm"


def module_name(path: Path) -> str:
    parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def import_graph() -> dict[str, set[str]]:
    modules = {module_name(path): path for path in PACKAGE.rglob("*.py")}
    graph: dict[str, set[str]] = {name: set() for name in modules}
    for name, path in modules.items():
        package = name if path.name == "__init__.py" else name.rpartition(".")[0]
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Import):
                imported = [alias.name for alias in node.names]
            elif isinstance(node, ast.ImportFrom):
                base = node.module or ""
                if node.level:
                    anchor = package.split(".")[: len(package.split(".")) - node.level + 1]
                    base = ".".join([*anchor, base] if base else anchor)
                imported = [base, *(f"{base}.{alias.name}" for alias in node.names)]
            else:
                continue
            graph[name] |= {other for other in imported if other in modules and other != name}
    return graph


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components of more than one module (Tarjan)."""
    order: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    found: list[list[str]] = []

    def visit(node: str) -> None:
        order[node] = low[node] = len(order)
        stack.append(node)
        for other in graph[node]:
            if other not in order:
                visit(other)
                low[node] = min(low[node], low[other])
            elif other in stack:
                low[node] = min(low[node], order[other])
        if low[node] == order[node]:
            component = []
            while True:
                member = stack.pop()
                component.append(member)
                if member == node:
                    break
            if len(component) > 1:
                found.append(sorted(component))

    for node in sorted(graph):
        if node not in order:
            visit(node)
    return found


def test_the_package_has_no_import_cycle():
    assert cycles(import_graph()) == []


def test_the_check_finds_a_cycle_when_there_is_one():
    graph = import_graph()
    graph["dlmspec_vllm.drafters.checkpoint"].add("dlmspec_vllm.drafters.loading")
    pair = {"dlmspec_vllm.drafters.checkpoint", "dlmspec_vllm.drafters.loading"}
    assert any(pair <= set(cycle) for cycle in cycles(graph))


def test_lazy_and_relative_imports_count():
    graph = import_graph()
    # lattice.prune imports the Triton kernel inside a function.
    assert "dlmspec_vllm.kernels.prune" in graph["dlmspec_vllm.lattice.prune"]
    assert "dlmspec_vllm.lattice.types" in graph["dlmspec_vllm.kernels.prune"]


def test_the_package_imports_nothing_from_the_harness():
    """The product wheel carries no harness: an import of it would fail where it is installed."""
    harness = [
        path.relative_to(PACKAGE.parent)
        for path in PACKAGE.rglob("*.py")
        for node in ast.walk(ast.parse(path.read_text()))
        if isinstance(node, ast.Import | ast.ImportFrom)
        and any(
            name == "dlmspec_harness" or name.startswith("dlmspec_harness.")
            for name in (
                [alias.name for alias in node.names]
                if isinstance(node, ast.Import)
                else [node.module or ""]
            )
        )
    ]
    assert harness == []
