"""The committed proto/*_pb2*.py are exactly what `python -m proto.generate` writes."""

from __future__ import annotations

from proto.generate import PROTO_DIR, generate, generated_names

REGENERATE = "run `.venv/bin/python -m proto.generate` and commit the result"


def test_committed_code_matches_the_protos(tmp_path):
    # Prepare
    names = generated_names()
    # Execute
    generate(tmp_path)
    # Assert
    missing = [name for name in names if not (PROTO_DIR / name).exists()]
    differ = [
        name
        for name in names
        if name not in missing
        and (tmp_path / "proto" / name).read_bytes() != (PROTO_DIR / name).read_bytes()
    ]
    assert not missing and not differ, (
        f"generated code is stale (missing {missing}, differing {differ}): {REGENERATE}"
    )


def test_no_leftover_generated_modules():
    # Prepare
    expected = set(generated_names())
    # Execute
    present = {p.name for p in PROTO_DIR.iterdir() if "_pb2" in p.name and p.suffix != ".pyc"}
    # Assert
    assert present == expected, f"generated files without a .proto: {present - expected}"


def test_generated_modules_import_from_the_package():
    # Execute
    from proto import llbcfl_pb2, llbcfl_pb2_grpc

    # Assert: the grpc module found its messages through `from proto import ...`
    assert llbcfl_pb2.DESCRIPTOR.package == "llbcfl.v1"
    for service in ("Node", "Miner", "Server"):
        assert hasattr(llbcfl_pb2_grpc, f"{service}Stub")
        assert hasattr(llbcfl_pb2_grpc, f"add_{service}Servicer_to_server")
