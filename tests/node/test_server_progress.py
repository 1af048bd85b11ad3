"""The server's progress.json: rewritten when a read of the chain applied blocks, durably."""

from __future__ import annotations

import asyncio
import json
from pathlib import Path

import pytest
import torch

from fl.data import Split
from node.daemon import NodeLog
from node.genesis import Genesis
from node.identity import Identity
from node.server import Server
from tests.chain.blocks import commit
from tests.chain.test_records import registration


@pytest.fixture
def server(genesis: Genesis, identities: dict[str, Identity], tmp_path: Path) -> Server:
    test = Split(x=torch.zeros(10, 1, 28, 28), y=torch.zeros(10, dtype=torch.int64))
    return Server(genesis, identities["server"], run_dir=tmp_path, test=test, log=NodeLog("server"))


def read_from_miners(server: Server, reads: list[tuple[list[str], bool]]) -> None:
    """Stand in for the miners: read i registers ``reads[i][0]``, then fails if ``reads[i][1]``."""
    queue = list(reads)

    async def read_from(address: str) -> None:
        clients, fails = queue.pop(0)
        for cid in clients:
            commit(server.state, [(cid, registration(cid))])
        if fails:
            raise ValueError("bad block")

    server.follower._read_from = read_from  # type: ignore[method-assign]


def progress(server: Server) -> dict | None:
    path = server.run_dir / "progress.json"
    return json.loads(path.read_text()) if path.exists() else None


def test_a_read_that_applies_blocks_rewrites_progress_once(server: Server) -> None:
    # Prepare: two blocks in one read, then a read with nothing new
    read_from_miners(server, [(["client-000", "client-001"], False), ([], False)])
    # Execute
    asyncio.run(server.follower.catch_up())
    first = progress(server)
    (server.run_dir / "progress.json").unlink()
    asyncio.run(server.follower.catch_up())
    # Assert: written after the first read, with both blocks; not rewritten after the second
    assert first is not None
    assert (first["phase"], first["registered"], first["clients"], first["blocks"]) == (
        "registering",
        2,
        3,
        2,
    )
    assert (first["round"], first["accuracy"]) == (0, None)
    assert progress(server) is None


def test_blocks_applied_before_a_miner_failed_are_reported(server: Server) -> None:
    # Prepare: the first miner serves one good block, then a bad one; the next has nothing new
    read_from_miners(server, [(["client-000"], True), ([], False)])
    # Execute
    assert asyncio.run(server.follower.catch_up()) is True
    # Assert
    report = progress(server)
    assert report is not None and (report["registered"], report["blocks"]) == (1, 1)


def test_progress_is_written_only_when_it_changed(server: Server) -> None:
    # Prepare
    server.write_progress()
    (server.run_dir / "progress.json").unlink()
    # Execute: nothing changed, then the last registration closes registrations
    server.write_progress()
    unchanged = progress(server)
    commit(server.state, [(cid, registration(cid)) for cid in server.state.clients])
    server.write_progress()
    # Assert
    assert unchanged is None
    report = progress(server)
    assert report is not None and report["phase"] == "selecting"
