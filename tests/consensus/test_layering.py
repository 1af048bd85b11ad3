"""consensus/ is pure: it never imports crypto, transport or node code (see the README's layout)."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parents[2] / "consensus"
FORBIDDEN = {"nacl", "grpc", "node", "proto", "socket", "time", "random"}
# The simulator owns the seeded generator; the store is the one I/O module.
ALLOWED = {"sim.py": {"random"}}


@pytest.mark.parametrize("module", sorted(p.name for p in PACKAGE.glob("*.py")))
def test_module_imports_nothing_impure(module: str) -> None:
    tree = ast.parse((PACKAGE / module).read_text())
    imported = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            imported.update(alias.name.split(".")[0] for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module:
            imported.add(node.module.split(".")[0])
    assert not (imported & (FORBIDDEN - ALLOWED.get(module, set())))
