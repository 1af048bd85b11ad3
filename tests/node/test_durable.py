"""node.durable: the one durable write, whole or not at all."""

from __future__ import annotations

import stat

import pytest

from node.durable import open_durably, write_durably, write_json_durably


def test_write_durably_replaces_the_file_with_the_given_mode(tmp_path):
    # Prepare
    target = tmp_path / "sub" / "file.bin"
    write_durably(target, b"old")
    # Execute
    write_durably(target, b"new", mode=0o644)
    # Assert: new content and mode, no temporary file left
    assert target.read_bytes() == b"new"
    assert stat.S_IMODE(target.stat().st_mode) == 0o644
    assert [p.name for p in target.parent.iterdir()] == ["file.bin"]


def test_an_error_while_streaming_leaves_the_old_file_and_no_temporary(tmp_path):
    # Prepare
    target = tmp_path / "download.gz"
    target.write_bytes(b"old")
    # Execute
    with pytest.raises(ValueError), open_durably(target) as handle:
        handle.write(b"part of the new")
        raise ValueError("checksum mismatch")
    # Assert
    assert target.read_bytes() == b"old"
    assert [p.name for p in tmp_path.iterdir()] == ["download.gz"]


def test_a_document_that_is_not_json_writes_nothing(tmp_path):
    # Execute
    with pytest.raises(TypeError):
        write_json_durably(tmp_path / "m.json", {"x": object()})
    # Assert
    assert list(tmp_path.iterdir()) == []
