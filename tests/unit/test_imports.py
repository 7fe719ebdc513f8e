"""The package's import graph: no cycle (deferred imports included), and the layering the maintainers rely on.

Walks the ``import`` statements of every module (not ``if TYPE_CHECKING:`` blocks, which never run), then
imports every module (a module no test imports, such as a script's, would otherwise break unseen).
"""

from __future__ import annotations

import ast
import importlib
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parents[2] / "hf_stability"


def _module_name(path: Path) -> str:
    parts = list(path.relative_to(PACKAGE.parent).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


MODULES = {_module_name(path): path for path in sorted(PACKAGE.rglob("*.py"))}


def _statements(tree: ast.AST):
    """Every statement, skipping the bodies of ``if TYPE_CHECKING:``."""
    for node in ast.iter_child_nodes(tree):
        if isinstance(node, ast.If) and "TYPE_CHECKING" in ast.unparse(node.test):
            yield from (s for n in node.orelse for s in [n, *_statements(n)])
            continue
        yield node
        yield from _statements(node)


def imported_modules(name: str) -> set[str]:
    """The hf_stability modules ``name`` imports, at module level or inside a function."""
    found = set()
    for node in _statements(ast.parse(MODULES[name].read_text())):
        if isinstance(node, ast.Import):
            found |= {alias.name for alias in node.names}
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            found |= {f"{node.module}.{alias.name}" if f"{node.module}.{alias.name}" in MODULES else node.module
                      for alias in node.names}
    return {module for module in found if module in MODULES and module != name}


GRAPH = {name: imported_modules(name) for name in MODULES}


def test_no_import_cycle():
    cycles, done = [], set()

    def visit(name: str, path: list[str]) -> None:
        if name in path:
            cycles.append(" -> ".join([*path[path.index(name):], name]))
            return
        if name in done:
            return
        for imported in sorted(GRAPH[name]):
            visit(imported, [*path, name])
        done.add(name)

    for name in sorted(GRAPH):
        visit(name, [])
    assert not cycles, "import cycles:\n" + "\n".join(cycles)


def test_the_spike_detector_does_not_import_the_config():
    # The detector is a leaf: it validates its numbers with `settings`, not the Trainer-facing config.
    assert "hf_stability.config" not in GRAPH["hf_stability.spike"]


@pytest.mark.parametrize("name", sorted(MODULES))
def test_each_module_imports(name):
    importlib.import_module(name)
