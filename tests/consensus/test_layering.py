"""The pure packages stay pure (see the README's layout).

consensus/ never imports crypto, transport, node code, clocks or the global
random module; fl/ never imports node code, transport or crypto, nor reads a
clock (the simulator gets its clock injected); chain/ (the replicated
application) imports only fl/ and consensus/ of the project's packages, and
nothing imports upward (fl/ never imports chain/, chain/ never commands/).
fl/ may read the operating system's CSPRNG (``os.urandom``): secret DP noise is the one sanctioned
unseeded draw.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
FORBIDDEN = {
    "consensus": {
        "nacl",
        "grpc",
        "node",
        "proto",
        "socket",
        "time",
        "random",
        "commands",
        "chain",
        "fl",
    },
    "fl": {"nacl", "grpc", "node", "proto", "socket", "time", "commands", "chain"},
    "chain": {"nacl", "grpc", "node", "proto", "socket", "time", "random", "commands"},
    "node": {"commands"},
}
# The simulator owns the seeded generator; the store is the one I/O module.
ALLOWED = {("consensus", "sim.py"): {"random"}}
MODULES = [
    (pkg, str(p.relative_to(ROOT / pkg)))
    for pkg in FORBIDDEN
    for p in sorted((ROOT / pkg).rglob("*.py"))
]


@pytest.mark.parametrize(("package", "module"), MODULES, ids=[f"{p}/{m}" for p, m in MODULES])
def test_module_imports_nothing_impure(package: str, module: str) -> None:
    tree = ast.parse((ROOT / package / module).read_text())
    imported = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            imported.update(alias.name.split(".")[0] for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module:
            imported.add(node.module.split(".")[0])
    allowed = ALLOWED.get((package, module), set())
    assert not (imported & (FORBIDDEN[package] - allowed))
