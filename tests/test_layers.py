"""The package's imports run one way: cli -> stages -> library (engine, strategies, export, ...) -> base
(models, datasets, losses, checkpoints, errors), with no cycle. Read from the source, lazy imports included."""

from __future__ import annotations

import ast
from pathlib import Path

import kdtool

PACKAGE = Path(kdtool.__file__).resolve().parent
BASE = {"kdtool", "kdtool.errors", "kdtool.models", "kdtool.cifar_models", "kdtool.datasets", "kdtool.augment",
        "kdtool.losses", "kdtool.checkpoints", "kdtool.features"}


def module_name(path: Path) -> str:
    parts = ["kdtool", *path.relative_to(PACKAGE).with_suffix("").parts]
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def layer(module: str) -> int:
    if module in ("kdtool.cli", "kdtool.__main__"):
        return 3
    if module == "kdtool.stages" or module.startswith("kdtool.stages."):
        return 2
    return 0 if module in BASE else 1


def import_graph() -> dict[str, set[str]]:
    """module -> the kdtool modules it imports anywhere in its source (module level or inside functions)."""
    modules = {module_name(p): p for p in PACKAGE.rglob("*.py")}
    graph: dict[str, set[str]] = {}
    for name, path in modules.items():
        found: set[str] = set()
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Import):
                targets = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
                # `from kdtool.stages import distill` may name a submodule
                targets = [f"{node.module}.{a.name}" if f"{node.module}.{a.name}" in modules else node.module
                           for a in node.names]
            else:
                continue
            found |= {t for t in targets if t.split(".")[0] == "kdtool" and t in modules and t != name}
        graph[name] = found
    return graph


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    state: dict[str, int] = {}
    stack: list[str] = []

    def visit(node: str) -> list[str] | None:
        state[node] = 1
        stack.append(node)
        for nxt in sorted(graph.get(node, ())):
            if state.get(nxt) == 1:
                return stack[stack.index(nxt):] + [nxt]
            if nxt not in state and (cycle := visit(nxt)):
                return cycle
        stack.pop()
        state[node] = 2
        return None

    for node in sorted(graph):
        if node not in state and (cycle := visit(node)):
            return cycle
    return None


def test_the_graph_sees_the_imports_that_exist():
    graph = import_graph()
    assert "kdtool.stages.distill" in graph["kdtool.stages.pipeline"]
    assert "kdtool.engine" in graph["kdtool.stages.common"]
    assert "kdtool.strategies.base" in graph["kdtool.strategies.feature_mimicry"]


def test_the_package_has_no_import_cycle():
    assert find_cycle(import_graph()) is None, " -> ".join(find_cycle(import_graph()))


def test_find_cycle_finds_one():
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]
    assert find_cycle({"a": {"b"}, "b": set()}) is None


def test_imports_only_go_down_the_layers():
    upward = [f"{a} (layer {layer(a)}) imports {b} (layer {layer(b)})"
              for a, targets in import_graph().items() for b in targets if layer(b) > layer(a)]
    assert not upward, "\n".join(upward)


def test_every_subcommand_has_its_module_and_function():
    import importlib

    from kdtool.cli import STAGES

    for name, _doc in STAGES.values():
        module = importlib.import_module(f"kdtool.stages.{name}")
        assert callable(getattr(module, name)), f"kdtool.stages.{name} has no function {name}"
