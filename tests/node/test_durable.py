"""node.durable: the one durable write, whole or not at all."""

from __future__ import annotations

import errno
import sqlite3
import stat

import pytest

import node.durable
from node.durable import is_disk_full, open_durably, write_durably, write_json_durably


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


@pytest.mark.parametrize(
    "exc",
    [
        OSError(errno.ENOSPC, "No space left on device"),
        OSError(errno.EDQUOT, "Disk quota exceeded"),
        sqlite3.OperationalError("database or disk is full"),
    ],
    ids=["ENOSPC", "EDQUOT", "SQLITE_FULL"],
)
def test_a_full_disk_or_quota_is_recognised_also_behind_another_error(exc):
    # Prepare: the error as raised, and wrapped as a caller might wrap it
    try:
        try:
            raise exc
        except Exception as inner:
            raise RuntimeError("while storing") from inner
    except RuntimeError as wrapped:
        outer = wrapped
    # Execute / Assert
    assert is_disk_full(exc)
    assert is_disk_full(outer)


def test_sqlites_own_full_disk_error_is_recognised(tmp_path):
    # Prepare: a database that may not grow by a page (SQLite's SQLITE_FULL, code 13)
    db = sqlite3.connect(tmp_path / "x.db", isolation_level=None)
    db.execute("CREATE TABLE t (x BLOB)")
    (pages,) = db.execute("PRAGMA page_count").fetchone()
    db.execute(f"PRAGMA max_page_count = {pages}")
    # Execute
    with pytest.raises(sqlite3.OperationalError) as info:
        db.execute("INSERT INTO t VALUES (?)", (b"x" * 10_000,))
    db.close()
    # Assert
    assert is_disk_full(info.value)


@pytest.mark.parametrize(
    "exc",
    [
        OSError(errno.EACCES, "Permission denied"),
        OSError(errno.EIO, "Input/output error"),
        sqlite3.OperationalError("database is locked"),
        ValueError("no space in this sentence"),
    ],
    ids=["EACCES", "EIO", "locked", "ValueError"],
)
def test_other_errors_are_not_a_full_disk(exc):
    assert not is_disk_full(exc)


def test_a_write_that_finds_the_disk_full_leaves_the_old_file_and_no_temporary(
    tmp_path, monkeypatch
):
    # Prepare: the old version on disk; the next write runs out of space at its fsync
    target = tmp_path / "ledger.json"
    write_durably(target, b"old")

    def no_space(fd):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(node.durable.os, "fsync", no_space)
    # Execute
    with pytest.raises(OSError) as info:
        write_durably(target, b"new")
    # Assert
    assert is_disk_full(info.value)
    assert target.read_bytes() == b"old"
    assert [p.name for p in tmp_path.iterdir()] == ["ledger.json"]
