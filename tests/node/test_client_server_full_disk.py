"""A client host and the server on a full disk: read-only, nothing half-done, recovery.

The full disk is injected into the durable write (its fsync raises ENOSPC,
as the kernel would on a full disk).
"""

from __future__ import annotations

import asyncio
import errno
import json
from pathlib import Path
from typing import Any

import grpc
import pytest
import torch

import node.durable
import node.server
from fl.data import Split
from fl.rounds import ClientState
from node.client import RoundAnswer
from node.daemon import NodeLog
from node.genesis import Genesis
from node.identity import Identity
from node.server import Server, Stopped
from tests.node.client_host_harness import make_host, notice
from tests.node.test_client_host import send

REAL_FSYNC = node.durable.os.fsync


def no_space(*_args: Any) -> None:
    raise OSError(errno.ENOSPC, "No space left on device")


def error_lines(log_file: Path) -> list[str]:
    return [line for line in log_file.read_text().splitlines() if "ERROR" in line]


def test_a_client_that_cannot_reserve_trains_nothing_and_refuses_rounds_until_there_is_room(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Prepare: a host whose ledger holds its registration; trainings are counted
    trained: list[int] = []
    participate = ClientState.participate

    def counted(self: ClientState, *args: Any, **kwargs: Any) -> Any:
        trained.append(kwargs["round"])
        return participate(self, *args, **kwargs)

    monkeypatch.setattr(ClientState, "participate", counted)
    ledger = tmp_path / "ledger.json"

    async def run() -> tuple[Any, ...]:
        host = await make_host(ledger)
        before = ledger.read_bytes()
        monkeypatch.setattr(node.durable.os, "fsync", no_space)
        # Execute: round 1 is accepted, but its reservation meets the full disk
        first = await send(host, "client-000", notice(1))
        read_only = host.disk.read_only
        refused = await send(host, "client-000", notice(2))
        after = ledger.read_bytes()
        # Execute: room again
        monkeypatch.setattr(node.durable.os, "fsync", REAL_FSYNC)
        probed = await asyncio.to_thread(host.disk.probe)
        again = await send(host, "client-000", notice(2))
        return host, before, after, first, read_only, refused, probed, again

    host, before, after, first, read_only, refused, probed, again = asyncio.run(run())
    # Assert: nothing reserved, nothing trained or sent; the ledger as it was
    assert isinstance(first[0], RoundAnswer) and first[0].accepted
    assert read_only and after == before
    assert refused == [grpc.StatusCode.RESOURCE_EXHAUSTED]
    # Assert: writable again, and the next round reserved, trained and sent
    assert probed and not host.disk.read_only
    assert isinstance(again[0], RoundAnswer) and again[0].accepted
    assert trained == [2] and host.uploads == [("client-000", 2)]
    assert host.ledger.rounds(host.data["client-000"], host.network) == {2}


@pytest.fixture
def server(genesis: Genesis, identities: dict[str, Identity], tmp_path: Path) -> Server:
    test = Split(x=torch.zeros(10, 1, 28, 28), y=torch.zeros(10, dtype=torch.int64))
    log = NodeLog(f"server-{tmp_path.name}", tmp_path / "server.log")
    return Server(genesis, identities["server"], run_dir=tmp_path / "run", test=test, log=log)


def test_the_server_waits_read_only_at_a_write_and_goes_on_once_it_fits(
    server: Server, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Prepare: the disk has room again at the third attempt; probes follow at once
    monkeypatch.setattr(node.server, "PROBE_SECONDS", 0)
    attempts: list[bool] = []  # whether the server was read-only at each attempt

    def write() -> None:
        attempts.append(server.disk.read_only)
        if len(attempts) < 3:
            no_space()
        node.durable.write_json_durably(tmp_path / "run" / "metrics.json", {"rounds": 3})

    # Execute
    asyncio.run(server.persist("writing metrics.json", write, asyncio.Event()))
    # Assert: read-only from the first failure to the success, one error line
    assert attempts == [False, True, True]
    assert not server.disk.read_only
    assert json.loads((tmp_path / "run" / "metrics.json").read_text()) == {"rounds": 3}
    assert len(error_lines(tmp_path / "server.log")) == 1


def test_a_server_stopped_while_it_waits_for_room_stops(
    server: Server, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Prepare: a disk that stays full; the stop arrives while the server waits
    stop = asyncio.Event()

    def full() -> None:
        stop.set()
        no_space()

    # Execute / Assert
    with pytest.raises(Stopped):
        asyncio.run(server.persist("writing the checkpoint of round 1", full, stop))
    assert server.disk.read_only


def test_progress_is_written_again_quietly_once_there_is_room(
    server: Server, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Prepare
    progress = tmp_path / "run" / "progress.json"
    monkeypatch.setattr(node.durable.os, "fsync", no_space)
    # Execute: three attempts on the full disk (the chain moves on meanwhile)
    for _ in range(3):
        server.progress = None
        server.write_progress()
    full = (server.disk.read_only, progress.exists())
    monkeypatch.undo()
    server.write_progress()
    # Assert: one error line for the three, no file until there is room, then written
    assert full == (True, False)
    assert len(error_lines(tmp_path / "server.log")) == 1
    assert not server.disk.read_only
    assert json.loads(progress.read_text()) == server.progress
