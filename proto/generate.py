"""Regenerate the Python code for ``proto/*.proto``: ``python -m proto.generate``.

protoc runs with the repository root as include path, so every generated
import reads ``from proto import llbcfl_pb2``: it works with the repository
root on ``sys.path`` and when the package is installed, without rewriting the
output. The generated ``*_pb2.py``, ``*_pb2.pyi`` and ``*_pb2_grpc.py`` are
committed; ``tests/node/test_proto_generated.py`` fails when they differ from
what this command writes.
"""

from __future__ import annotations

from importlib import resources
from pathlib import Path

PROTO_DIR = Path(__file__).resolve().parent
ROOT = PROTO_DIR.parent
SUFFIXES = ("_pb2.py", "_pb2.pyi", "_pb2_grpc.py")


def proto_files() -> list[Path]:
    return sorted(PROTO_DIR.glob("*.proto"))


def generated_names() -> list[str]:
    """File names (inside ``proto/``) that :func:`generate` writes."""
    return sorted(p.stem + suffix for p in proto_files() for suffix in SUFFIXES)


def generate(out_root: Path = ROOT) -> list[Path]:
    """Write the generated modules to ``out_root/proto/``; return their paths."""
    from grpc_tools import protoc

    well_known = resources.files("grpc_tools") / "_proto"
    (out_root / "proto").mkdir(parents=True, exist_ok=True)
    args = [
        "grpc_tools.protoc",
        f"--proto_path={ROOT}",
        f"--proto_path={well_known}",
        f"--python_out={out_root}",
        f"--pyi_out={out_root}",
        f"--grpc_python_out={out_root}",
        *(str(p) for p in proto_files()),
    ]
    status = protoc.main(args)
    if status != 0:
        raise RuntimeError(f"protoc failed with status {status}")
    return [out_root / "proto" / name for name in generated_names()]


def main() -> None:
    for path in generate():
        print(f"wrote {path.relative_to(ROOT)}")


if __name__ == "__main__":
    main()
