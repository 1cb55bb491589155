"""Layers point one way: `worker` imports `app`, never the reverse, and the services import
each other without a cycle. Read from the source (every import statement, deferred ones
inside functions included), so an import that only runs on some code path counts too."""

from __future__ import annotations

import ast
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

ROOT = Path(__file__).parents[2]
PACKAGES = ("app", "worker", "engine", "models_store")
#: The command-line entry point composes every part of Lethe: `lethe worker` starts a worker.
ENTRY_POINTS = {"app.cli"}


def _module_name(path: Path) -> str:
    parts = list(path.relative_to(ROOT).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def _sources(package: str) -> Iterator[tuple[str, ast.Module]]:
    for path in sorted((ROOT / package).rglob("*.py")):
        yield _module_name(path), ast.parse(path.read_text(), str(path))


def _imported(module: str, tree: ast.Module) -> set[str]:
    """Every module name an import statement of `tree` names (absolute or relative)."""
    names: set[str] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            names.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = module.split(".")[: -node.level]
                base = ".".join([*anchor, base] if base else anchor)
            names.add(base)
            names.update(f"{base}.{alias.name}" for alias in node.names)
    return names


def _graph(packages: tuple[str, ...], within: str | None = None) -> dict[str, set[str]]:
    """Module → the modules of `within` (default: of `packages`) it imports."""
    graph: dict[str, set[str]] = {}
    known = {name for package in packages for name, _ in _sources(package)}
    for package in packages:
        for name, tree in _sources(package):
            if name in ENTRY_POINTS:
                continue
            targets = {m for m in _imported(name, tree) if m in known and m != name}
            if within is not None:
                targets = {m for m in targets if m.startswith(within)}
            graph[name] = targets
    return graph


def _cycle(graph: dict[str, set[str]]) -> list[str] | None:
    """One cycle of `graph` as a path, or None when it has none."""
    state: dict[str, int] = {}
    stack: list[str] = []

    def visit(node: str) -> list[str] | None:
        state[node] = 1
        stack.append(node)
        for nxt in sorted(graph.get(node, ())):
            if state.get(nxt) == 1:
                return [*stack[stack.index(nxt):], nxt]
            if nxt not in state and (found := visit(nxt)):
                return found
        stack.pop()
        state[node] = 2
        return None

    for node in sorted(graph):
        if node not in state and (found := visit(node)):
            return found
    return None


def test_the_packages_import_each_other_without_a_cycle() -> None:
    modules = _graph(PACKAGES)
    between: dict[str, set[str]] = {p: set() for p in PACKAGES}
    for module, targets in modules.items():
        top = module.split(".")[0]
        between[top] |= {t.split(".")[0] for t in targets} - {top}
    assert between["worker"] >= {"app"}  # the check would be meaningless without the edge
    assert "worker" not in between["app"], "app must not import worker (the worker imports app)"
    assert _cycle(between) is None, between


def test_the_services_import_each_other_without_a_cycle() -> None:
    services = _graph(("app",), within="app.services")
    services = {m: t for m, t in services.items() if m.startswith("app.services")}
    assert len(services) > 10 and services["app.services.jobs.publish"]
    assert _cycle(services) is None, _cycle(services)


def test_the_cycle_check_finds_a_cycle() -> None:
    assert _cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]
    assert _cycle({"a": {"b"}, "b": {"c"}, "c": set()}) is None


def test_the_api_side_loads_neither_the_worker_nor_torch() -> None:
    code = (
        "import sys\n"
        "import app.main, app.dispatch, app.queue, app.sweeper, app.services.jobs\n"
        "bad = [m for m in sys.modules if m.split('.')[0] in ('worker', 'torch', 'torchvision')]\n"
        "assert not bad, bad\n"
    )
    subprocess.run([sys.executable, "-c", code], check=True, cwd=ROOT)
