"""A full disk: read-only mode, one log line, probing, recovery (node.full_disk).

The full disk is injected: the durable write's fsync, or a stream's write,
raises ENOSPC as the kernel would. tests/node/test_full_disk_tmpfs.py does
the same on a real, full tmpfs.
"""

from __future__ import annotations

import errno
import io
import logging
from collections import OrderedDict
from pathlib import Path
from typing import Any

import pytest
import torch

import node.durable
from chain.digests import weights_digest
from chain.models import initial_spec, initial_weights
from fl.config import RunConfig
from node.daemon import NodeLog, QuietStreamHandler
from node.errors import DiskFull, status_of
from node.full_disk import DiskGuard
from node.genesis import Genesis
from node.identity import Identity
from node.offchain import BlobStore
from node.tensor_receiver import ReceivedTensors, receive_tensor_stream
from node.tensors import UPDATE_KIND, tensor_stream

CONFIG = RunConfig(clients=3, frac=0.67, rounds=2, model="mlp")


def no_space(*_args: Any) -> None:
    raise OSError(errno.ENOSPC, "No space left on device")


def log_for(tmp_path: Path) -> tuple[NodeLog, Path]:
    path = tmp_path / "node.log"
    return NodeLog(f"full-disk-{tmp_path.name}", path), path


def lines(path: Path) -> list[str]:
    return path.read_text().splitlines() if path.exists() else []


def received_update(genesis: Genesis, identity: Identity) -> ReceivedTensors:
    delta = OrderedDict((k, torch.full_like(v, 0.5)) for k, v in initial_weights(CONFIG).items())
    parts = tensor_stream(
        delta,
        identity=identity,
        kind=UPDATE_KIND,
        round=1,
        base_digest=weights_digest(initial_weights(CONFIG)),
        num_samples=100,
    )
    return receive_tensor_stream(
        parts,
        expected=initial_spec(CONFIG),
        membership=genesis.membership,
        kind=UPDATE_KIND,
        max_total_bytes=64 << 20,
    )


# DiskGuard ------------------------------------------------------------------------


def test_a_full_disk_turns_the_node_read_only_with_one_log_line(tmp_path: Path) -> None:
    # Prepare
    log, log_file = log_for(tmp_path)
    disk = DiskGuard(log, tmp_path / "data")
    # Execute: the write that fills the disk, then three more attempts
    with pytest.raises(DiskFull), disk.writing("storing an update"):
        no_space()
    refusals = []
    for _ in range(3):
        with pytest.raises(DiskFull) as info, disk.writing("storing another update"):
            raise AssertionError("a read-only node must not try to write")
        refusals.append(info.value)
    # Assert: read-only, one error line (no traceback), refusals that say "disk full"
    assert disk.read_only
    errors = [line for line in lines(log_file) if "ERROR" in line]
    assert len(errors) == 1 and len(lines(log_file)) == 1
    assert "disk full while storing an update" in errors[0] and "No space left" in errors[0]
    code, message = status_of(refusals[0])  # type: ignore[misc]
    assert code.name == "RESOURCE_EXHAUSTED" and message.startswith("disk full")


def test_other_write_errors_pass_through_and_leave_the_node_writable(tmp_path: Path) -> None:
    # Prepare
    log, log_file = log_for(tmp_path)
    disk = DiskGuard(log, tmp_path)
    # Execute
    with pytest.raises(PermissionError), disk.writing("storing an update"):
        raise PermissionError(errno.EACCES, "Permission denied")
    # Assert
    assert not disk.read_only and lines(log_file) == []


def test_the_probe_fails_quietly_while_full_and_ends_read_only_mode_once_there_is_room(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Prepare: read-only, and the disk still full
    log, log_file = log_for(tmp_path)
    disk = DiskGuard(log, tmp_path / "a", tmp_path / "b", probe_bytes=4096)
    with pytest.raises(DiskFull), disk.writing("storing block 7"):
        no_space()
    monkeypatch.setattr(node.durable.os, "fsync", no_space)
    # Execute
    still_full = [disk.probe() for _ in range(3)]
    monkeypatch.undo()
    room = disk.probe()
    # Assert: no probe file left behind, one line in and one line out
    assert still_full == [False, False, False] and room and not disk.read_only
    assert [p.name for p in (tmp_path / "a").iterdir()] == []
    assert [p.name for p in (tmp_path / "b").iterdir()] == []
    assert len(lines(log_file)) == 2 and "leaving read-only mode" in lines(log_file)[1]
    with disk.writing("storing block 7"):
        pass  # writable again


def test_retrying_the_failed_write_ends_read_only_mode_when_it_fits(tmp_path: Path) -> None:
    # Prepare
    log, log_file = log_for(tmp_path)
    disk = DiskGuard(log, tmp_path)
    attempts: list[int] = []

    def write() -> None:
        attempts.append(1)
        if len(attempts) < 3:
            no_space()

    # Execute
    results = [disk.retry("writing the checkpoint of round 2", write) for _ in range(3)]
    # Assert
    assert results == [False, False, True] and not disk.read_only
    assert len(lines(log_file)) == 2


# The blob store ----------------------------------------------------------------------


def test_an_update_that_meets_a_full_disk_is_not_stored_at_all(
    tmp_path: Path,
    genesis: Genesis,
    identities: dict[str, Identity],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    # Prepare
    log, _ = log_for(tmp_path)
    disk = DiskGuard(log, tmp_path / "blobs", probe_bytes=4096)
    blobs = BlobStore(
        tmp_path,
        membership=genesis.membership,
        spec=initial_spec(CONFIG),
        max_bytes=64 << 20,
        disk=disk,
    )
    update = received_update(genesis, identities["client-000"])
    monkeypatch.setattr(node.durable.os, "fsync", no_space)
    # Execute
    with pytest.raises(DiskFull):
        blobs.put(update)
    # Assert: nothing on disk (no temporary file either), nothing in memory, read-only
    assert list((tmp_path / "blobs").iterdir()) == []
    assert not blobs.has(update.digest, update.sender.node_id) and blobs.by_round == {}
    assert disk.read_only
    # Execute: a second attempt while read-only never reaches the disk
    monkeypatch.undo()
    with pytest.raises(DiskFull):
        blobs.put(update)
    assert list((tmp_path / "blobs").iterdir()) == []
    # Execute: room again
    assert disk.probe()
    blobs.put(update)
    # Assert: stored, and read back by a fresh store through the full checks
    again = BlobStore(
        tmp_path, membership=genesis.membership, spec=initial_spec(CONFIG), max_bytes=64 << 20
    )
    assert again.get(update.digest, update.sender.node_id) is not None


# The log ------------------------------------------------------------------------------


class FullStream(io.StringIO):
    """A stream on a disk that is full until ``room`` is set."""

    room = False

    def write(self, text: str) -> int:
        if not self.room:
            raise OSError(errno.ENOSPC, "No space left on device")
        return super().write(text)


def test_log_lines_a_full_disk_cannot_take_are_counted_not_traced(
    capsys: pytest.CaptureFixture[str],
) -> None:
    # Prepare
    stream = FullStream()
    handler = QuietStreamHandler(stream)
    logger = logging.getLogger("llbcfl.test-full-disk-log")
    logger.propagate = False
    logger.addHandler(handler)
    try:
        # Execute
        for i in range(5):
            logger.error("line %d", i)
        stream.room = True
        logger.error("after")
    finally:
        logger.removeHandler(handler)
    # Assert: no traceback printed anywhere; the lost lines are counted once
    assert capsys.readouterr().err == ""
    assert stream.getvalue().splitlines() == [
        "up to 5 log line(s) lost: the disk was full",
        "after",
    ]
