"""The house by role, kept: no import cycles, small modules, no test hooks, the bench kept out of the appliance,
the configuration a leaf. Imports inside functions count (they run); imports under ``if TYPE_CHECKING:`` do not."""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

from tests.harness import ROOT

PACKAGE = ROOT / "edgevl"
MAX_LINES = 400


def _module_name(path: Path) -> str:
    parts = path.relative_to(ROOT).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


MODULES = {_module_name(p): p for p in PACKAGE.rglob("*.py")}


def _is_type_checking(node: ast.If) -> bool:
    test = node.test
    return (isinstance(test, ast.Name) and test.id == "TYPE_CHECKING") or (
        isinstance(test, ast.Attribute) and test.attr == "TYPE_CHECKING")


def _imports(path: Path) -> set[str]:
    """The edgevl modules ``path`` imports, wherever the import statement is (but under TYPE_CHECKING)."""
    found: set[str] = set()

    def visit(node: ast.AST) -> None:
        if isinstance(node, ast.If) and _is_type_checking(node):
            for child in node.orelse:
                visit(child)
            return
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            for alias in node.names:
                full = f"{node.module}.{alias.name}"
                found.add(full if full in MODULES else node.module)
        for child in ast.iter_child_nodes(node):
            visit(child)

    visit(ast.parse(path.read_text()))
    return {m for m in found if m in MODULES}


GRAPH = {name: _imports(path) for name, path in MODULES.items()}


def _closure(start: str) -> set[str]:
    seen, todo = set(), [start]
    while todo:
        module = todo.pop()
        if module not in seen:
            seen.add(module)
            todo.extend(GRAPH[module])
    return seen


def test_no_import_cycles() -> None:
    cycles = []
    for module in GRAPH:
        for imported in GRAPH[module]:
            if module in _closure(imported):
                cycles.append(f"{module} -> {imported} -> … -> {module}")
    assert not cycles, "\n".join(cycles)


def test_the_graph_sees_function_level_imports() -> None:
    assert "edgevl.engine.engine" in GRAPH["edgevl.worker.child"], "imported inside serve()"
    assert "edgevl.http.metrics" not in GRAPH["edgevl.daemon.status"], "only under TYPE_CHECKING"


def test_no_module_is_over_400_lines() -> None:
    sizes = {name: len(path.read_text().splitlines()) for name, path in MODULES.items()}
    assert {name: n for name, n in sizes.items() if n > MAX_LINES} == {}


def test_no_test_hooks_in_the_package() -> None:
    hooked = [name for name, path in MODULES.items() if "EDGEVL_TEST_" in path.read_text()]
    assert hooked == []


def test_neither_the_daemon_nor_its_worker_imports_the_bench_or_the_evaluation() -> None:
    for entry in ("edgevl.daemon.loop", "edgevl.worker.child"):
        assert not {m for m in _closure(entry) if m.startswith(("edgevl.bench", "edgevl.evaluation"))}, entry
    tools = ("edgevl.bench", "edgevl.evaluation", "torch", "matplotlib", "tomlkit", "tqdm")
    loaded = subprocess.run(
        [sys.executable, "-c", "import sys, edgevl.daemon.loop, edgevl.worker.child, edgevl.cli; "
                               f"print(sorted(m for m in sys.modules if m.startswith({tools!r})))"],
        capture_output=True, text=True, check=True, cwd=ROOT)
    assert loaded.stdout.strip() == "[]", "nor torch or the tools' libraries, in the daemon"


def test_the_configuration_is_a_leaf() -> None:
    assert GRAPH["edgevl.config"] <= {"edgevl.errors"}
    assert GRAPH["edgevl.errors"] == set()
