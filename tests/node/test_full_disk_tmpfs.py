"""A full disk for real: a 4 MiB tmpfs, filled to the last page, then emptied again.

Mounting needs root; without it (or without ``mount``) these tests skip and
say why. Every mount is unmounted in a ``finally``.
"""

from __future__ import annotations

import asyncio
import logging
import os
import shutil
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest

from chain.models import initial_spec
from consensus.messages import Blocks
from consensus.store import BlockStore, is_full
from node.daemon import NodeLog
from node.errors import DiskFull
from node.full_disk import DiskGuard
from node.genesis import Genesis
from node.identity import Identity, pbft_signer
from node.miner_service import MinerHandler
from node.offchain import BlobStore
from tests.node.test_full_disk import CONFIG, received_update
from tests.node.test_miner_full_disk import (
    error_lines,
    make_miner,
    queued,
    registration_blocks,
    small_genesis,  # noqa: F401 (a fixture)
)


@pytest.fixture
def tiny_disk(tmp_path: Path) -> Iterator[Path]:
    """A 4 MiB tmpfs mounted at tmp_path/disk for the test."""
    if os.geteuid() != 0:
        pytest.skip("mounting a tmpfs needs root")
    if shutil.which("mount") is None or shutil.which("umount") is None:
        pytest.skip("no mount/umount command")
    disk = tmp_path / "disk"
    disk.mkdir()
    mounted = subprocess.run(
        ["mount", "-t", "tmpfs", "-o", "size=4m", "tmpfs", str(disk)],
        capture_output=True,
        text=True,
    )
    if mounted.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs: {mounted.stderr.strip()}")
    try:
        yield disk
    finally:
        if subprocess.run(["umount", str(disk)], capture_output=True).returncode != 0:
            subprocess.run(["umount", "-l", str(disk)], check=True)  # detach it all the same
            raise AssertionError(f"{disk} was still busy: the test left a file open there")


def fill(disk: Path) -> Path:
    """Write a file until the disk has no page left; return it."""
    filler = disk / "filler"
    fd = os.open(filler, os.O_WRONLY | os.O_CREAT, 0o600)
    try:
        for size in (1 << 20, 4096, 1):
            while True:
                try:
                    os.write(fd, b"\xff" * size)
                except OSError:
                    break
    finally:
        os.close(fd)
    return filler


def transfer_of(identities: dict[str, Identity], blocks: list) -> Blocks:
    message = Blocks(blocks=blocks, new_view=None, sender=0)
    message.signature = pbft_signer(identities["miner-0"])(message.signed)
    return message


def test_an_update_on_a_full_tmpfs_leaves_no_file_and_is_stored_once_there_is_room(
    tiny_disk: Path, tmp_path: Path, genesis: Genesis, identities: dict[str, Identity]
) -> None:
    # Prepare: a blob store on the tmpfs, the tmpfs full
    disk = DiskGuard(NodeLog(f"blobs-{tmp_path.name}", tmp_path / "log"), tiny_disk / "blobs")
    blobs = BlobStore(
        tiny_disk,
        membership=genesis.membership,
        spec=initial_spec(CONFIG),
        max_bytes=64 << 20,
        disk=disk,
    )
    update = received_update(genesis, identities["client-000"])
    filler = fill(tiny_disk)
    # Execute
    with pytest.raises(DiskFull):
        blobs.put(update)
    probed_full = disk.probe()
    # Assert: read-only, no blob and no temporary file, and the probe left nothing
    assert disk.read_only and not probed_full
    assert list((tiny_disk / "blobs").iterdir()) == []
    assert not blobs.has(update.digest, update.sender.node_id)
    # Execute: room again
    filler.unlink()
    assert disk.probe()
    blobs.put(update)
    # Assert: stored whole (a fresh store reads it back through every check)
    again = BlobStore(
        tiny_disk, membership=genesis.membership, spec=initial_spec(CONFIG), max_bytes=64 << 20
    )
    assert again.get(update.digest, update.sender.node_id) is not None


def test_a_miner_whose_chain_fills_the_tmpfs_turns_read_only_and_catches_up_after(
    tiny_disk: Path,
    tmp_path: Path,
    small_genesis: Genesis,  # noqa: F811 (the fixture imported above)
    identities: dict[str, Identity],
) -> None:
    # Prepare: a miner with its chain and blobs on the tmpfs (its log elsewhere),
    # holding block 1; then the tmpfs full
    blocks = registration_blocks(identities)
    miner, log_file = make_miner(small_genesis, identities, tiny_disk, [], log_dir=tmp_path)
    handler = MinerHandler(miner)
    try:
        asyncio.run(handler.deliver(transfer_of(identities, blocks[:1])))
        assert miner.store.height() == 1
        filler = fill(tiny_disk)
        # Execute: a peer's transfer of blocks 1 to 3
        asyncio.run(handler.deliver(transfer_of(identities, blocks)))
        # Assert: SQLite found the disk full; the miner holds what its store holds
        assert miner.disk.read_only and miner.status().read_only
        assert len(error_lines(log_file)) == 1 and "storing block 2" in error_lines(log_file)[0]
        assert (miner.store.height(), miner.replica.height, miner.state.height) == (1, 1, 1)
        assert [b.height for b in handler.blocks_from(1)] == [1]
        assert queued(miner) == [0, 0, 0]
        # Execute: still full, then room again, then the transfer again
        probed_full = asyncio.run(handler.probe_disk())
        filler.unlink()
        probed_room = asyncio.run(handler.probe_disk())
        asyncio.run(handler.deliver(transfer_of(identities, blocks)))
        # Assert
        assert (probed_full, probed_room) == (False, True)
        assert (miner.store.height(), miner.replica.height, miner.state.height) == (3, 3, 3)
    finally:
        handler.close()
        miner.store.close()
    # Assert: the chain on the tmpfs reopens whole and verified
    reopened = BlockStore(tiny_disk / "chain.db", verify=miner.verify_pbft, n=4)
    assert (reopened.height(), reopened.verdict.ok, reopened.set_aside) == (3, True, None)
    reopened.close()


def test_opening_a_chain_on_a_full_tmpfs_fails_without_setting_it_aside(
    tiny_disk: Path,
    tmp_path: Path,
    identities: dict[str, Identity],
    small_genesis: Genesis,  # noqa: F811
) -> None:
    # Prepare: a closed chain of three blocks, then the tmpfs full
    blocks = registration_blocks(identities)
    miner, _ = make_miner(small_genesis, identities, tiny_disk, blocks, log_dir=tmp_path)
    miner.store.close()
    filler = fill(tiny_disk)
    # Execute
    with pytest.raises(Exception) as info:
        BlockStore(tiny_disk / "chain.db", verify=miner.verify_pbft, n=4)
    # Assert: SQLite's full-disk error, and nothing renamed to chain.db.corrupt-*
    assert is_full(info.value), info.value
    assert not list(tiny_disk.glob("chain.db.corrupt-*"))
    filler.unlink()
    store = BlockStore(tiny_disk / "chain.db", verify=miner.verify_pbft, n=4)
    assert (store.height(), store.set_aside) == (3, None)
    store.close()


def test_log_lines_on_a_full_tmpfs_are_dropped_without_tracebacks(
    tiny_disk: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    # Prepare: a node log on the tmpfs, which then fills
    log_file = tiny_disk / "log"
    name = f"log-{tmp_path.name}"
    log = NodeLog(name, log_file)
    log.info("before")
    filler = fill(tiny_disk)
    try:
        # Execute
        for i in range(200):
            log.warning(f"line {i} " + "x" * 100)
        filler.unlink()
        log.info("after")
    finally:
        for handler in logging.getLogger(f"llbcfl.{name}").handlers:
            handler.close()
    # Assert: nothing raised, no traceback printed, and the log says lines were lost
    assert capsys.readouterr().err == ""
    text = log_file.read_text()
    assert "log line(s) lost: the disk was full" in text
    assert text.splitlines()[0].endswith("before") and text.splitlines()[-1].endswith("after")
