"""The typed log events: one line for each view a miner enters (not each resend), each
lost and recovered peer link (not each retry), and each record the server could not get
to a quorum of miners; a follower's lines carry the height and view of its chain."""

from __future__ import annotations

import asyncio
import json
import socket
from collections.abc import Callable
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import grpc
import torch
from click.testing import CliRunner

import node.peers
from chain.records import Registration, encode_operation, timestamp_of
from cli import main
from commands.bundle import bundle_processes
from commands.launcher import node_commands
from consensus.ledger import (
    COMMIT_TAG,
    GENESIS_HASH,
    Block,
    CommitCertificate,
    Request,
    encode_batch,
    vote_bytes,
)
from fl.config import RunConfig
from fl.data import Split
from node.daemon import NodeLog, signed_record
from node.follower import ChainFollower
from node.genesis import Genesis
from node.identity import Identity, pbft_signer
from node.miner import Miner
from node.peers import PeerLink
from node.server import Server
from node.serving import ChannelPool
from proto import llbcfl_pb2 as pb
from proto import llbcfl_pb2_grpc as pb_grpc

CONFIG = RunConfig(clients=3, frac=0.67, rounds=2, model="mlp", val_size=20, test_size=20)
HONEST = (50, 50) + (0,) * 9


def json_lines(path: Path) -> list[dict[str, Any]]:
    return [json.loads(line) for line in path.read_text().splitlines()] if path.exists() else []


def events(path: Path) -> list[str]:
    return [line["event"] for line in json_lines(path) if "event" in line]


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def registration_request(identity: Identity) -> Request:
    record = Registration(identity.node_id, HONEST)
    envelope = signed_record(identity, record)
    return Request(
        identity.node_id, timestamp_of(record), encode_operation(record), envelope.signature
    )


async def until(condition: Callable[[], bool], *, seconds: float = 20.0) -> None:
    """Wait for ``condition`` (polled, bounded)."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + seconds
    while not condition():
        assert loop.time() < deadline, "condition not met in time"
        await asyncio.sleep(0.05)  # polling a background task's progress, bounded


# Peer links ------------------------------------------------------------------------


class Sink(pb_grpc.MinerServicer):
    """A peer's Miner service that takes every PBFT item and keeps the stream open."""

    async def Deliver(self, request_iterator: Any, context: Any) -> pb.Ack:
        async for _ in request_iterator:
            pass
        return pb.Ack()


async def start_peer(port: int) -> grpc.aio.Server:
    server = grpc.aio.server()
    pb_grpc.add_MinerServicer_to_server(Sink(), server)
    server.add_insecure_port(f"127.0.0.1:{port}")
    await server.start()
    return server


def test_a_peer_link_logs_each_loss_and_recovery_once_not_each_retry(
    identities: dict[str, Identity], tmp_path: Path, monkeypatch: Any
) -> None:
    # Prepare: a link to a peer that is down; count its connection attempts
    port = free_port()
    attempts = [0]
    real_channel = node.peers.channel

    def counting_channel(address: str) -> grpc.aio.Channel:
        attempts[0] += 1
        return real_channel(address)

    monkeypatch.setattr(node.peers, "channel", counting_channel)
    log_file = tmp_path / "log"
    log = NodeLog("peer-link-test", log_file, role="miner", log_format="json")
    link = PeerLink(f"127.0.0.1:{port}", identities["miner-0"], log, name="miner-1")
    seen: list[list[str]] = []

    async def main() -> None:
        link.start()
        try:
            # Execute: down for three attempts, up, down again for two, up again
            await until(lambda: attempts[0] >= 3)
            seen.append(events(log_file))
            peer = await start_peer(port)
            await until(lambda: link.up is True)
            before = attempts[0]
            await peer.stop(None)
            await until(lambda: attempts[0] >= before + 2)
            seen.append(events(log_file))
            assert link.up is False and link.connected is False
            peer = await start_peer(port)
            await until(lambda: link.up is True)
            await peer.stop(None)
        finally:
            await link.stop()

    asyncio.run(main())
    # Assert: one line per change of state, whatever the number of attempts
    assert seen[0] == ["peer-lost"]
    assert seen[1] == ["peer-lost", "peer-recovered", "peer-lost"]
    lines = [line for line in json_lines(log_file) if "event" in line]
    assert [line["event"] for line in lines[:4]] == [
        "peer-lost",
        "peer-recovered",
        "peer-lost",
        "peer-recovered",
    ]
    assert lines[0]["msg"].startswith(f"link to miner-1 (127.0.0.1:{port}) down: ")
    assert lines[1]["msg"] == f"link to miner-1 (127.0.0.1:{port}) up again"
    assert all(line["node"] == "peer-link-test" and line["role"] == "miner" for line in lines)


def test_a_link_that_comes_up_at_once_logs_peer_up(
    identities: dict[str, Identity], tmp_path: Path
) -> None:
    # Prepare: the peer is up before the link starts
    port = free_port()
    log_file = tmp_path / "log"
    log = NodeLog("peer-up-test", log_file, log_format="json")
    link = PeerLink(f"127.0.0.1:{port}", identities["miner-0"], log)

    async def main() -> None:
        peer = await start_peer(port)
        link.start()
        try:
            # Execute
            await until(lambda: link.up is True)
        finally:
            await link.stop()
            await peer.stop(None)

    asyncio.run(main())
    # Assert
    assert events(log_file) == ["peer-up"]


# A miner's view changes --------------------------------------------------------------


def test_a_miner_logs_each_view_it_enters_once_with_its_view_and_height(
    genesis: Genesis, identities: dict[str, Identity], tmp_path: Path
) -> None:
    # Prepare: miner-1 (a backup in view 0) holds a request no primary orders
    small = Genesis(
        protocol=genesis.protocol, selection=genesis.selection, run=CONFIG, nodes=genesis.nodes
    )
    log_file = tmp_path / "log"
    log = NodeLog("miner-1-view-test", log_file, role="miner", log_format="json")
    miner = Miner(
        small,
        identities["miner-1"],
        db_path=tmp_path / "chain.db",
        run_dir=tmp_path,
        validation=Split(x=torch.zeros(20, 1, 28, 28), y=torch.zeros(20, dtype=torch.int64)),
        log=log,
    )
    try:
        miner.replica.propose(registration_request(identities["client-000"]))

        def tick_until_view(view: int) -> None:
            for _ in range(10_000):
                if miner.replica.view >= view:
                    return
                miner.replica.tick()
                miner.drain()
            raise AssertionError(f"view {view} not reached")

        # Execute: its timer runs out (view 1); then it waits there, resending its
        # VIEW-CHANGE (alone, it never gathers the 2f+1 that would move it on)
        tick_until_view(1)
        for _ in range(500):
            miner.replica.tick()
            miner.drain()
    finally:
        miner.store.close()
    # Assert: one line for the view entered, carrying the new view and the height
    changes = [line for line in json_lines(log_file) if line.get("event") == "view-change"]
    assert miner.replica.view == 1
    assert [line["view"] for line in changes] == [1]
    assert changes[0]["msg"] == "view change: view 0 -> 1 (primary miner-1)"
    assert changes[0]["height"] == 0 and changes[0]["level"] == "warning"
    assert (log.view, log.height) == (miner.replica.view, miner.state.height)


# Followers -----------------------------------------------------------------------------


def certified(block: Block, identities: dict[str, Identity], *, view: int) -> Block:
    signatures = [
        (
            i,
            pbft_signer(identities[f"miner-{i}"])(
                vote_bytes(
                    COMMIT_TAG, view=view, height=block.height, digest=block.digest, sender=i
                )
            ),
        )
        for i in range(3)
    ]
    return block.with_certificate(
        CommitCertificate(
            view=view, height=block.height, digest=block.digest, signatures=signatures
        )
    )


def test_a_follower_sets_the_height_and_view_of_the_blocks_it_applies(
    genesis: Genesis, identities: dict[str, Identity], tmp_path: Path
) -> None:
    # Prepare: block 1, committed in view 2
    log_file = tmp_path / "log"
    log = NodeLog("follower-fields-test", log_file, role="server", log_format="json")
    follower = ChainFollower(genesis, log)
    block = Block.propose(
        height=1,
        previous_hash=GENESIS_HASH,
        view=0,
        proposer=0,
        payload=encode_batch([registration_request(identities["client-000"])]),
    )
    # Execute
    applied = follower.accept(certified(block, identities, view=2).encode())
    log.info("after block 1")
    # Assert
    assert applied and follower.state.height == 1
    (line,) = json_lines(log_file)
    assert (line["height"], line["view"]) == (1, 2)


def test_a_record_short_of_a_quorum_of_miners_logs_no_quorum(
    genesis: Genesis, identities: dict[str, Identity], tmp_path: Path
) -> None:
    # Prepare: a server cut from every miner (closed loopback ports)
    log_file = tmp_path / "log"
    log = NodeLog("no-quorum-test", log_file, role="server", log_format="json")
    members = genesis.membership
    miners = [SimpleNamespace(address=f"127.0.0.1:{free_port()}") for _ in members.miners]
    server = SimpleNamespace(
        identity=identities["server"],
        membership=SimpleNamespace(miners=miners),
        log=log,
        channels=ChannelPool(),
    )
    # Execute
    asyncio.run(Server.submit(server, Registration("client-000", HONEST)))  # type: ignore[arg-type]
    # Assert: one line for the record, after one per miner it did not reach
    lines = json_lines(log_file)
    assert events(log_file) == ["no-quorum"]
    assert lines[-1]["event"] == "no-quorum" and lines[-1]["level"] == "warning"
    assert lines[-1]["msg"].startswith(f"chain-register reached 0 of {len(miners)} miners")
    assert sum(line["msg"].startswith("submit to") for line in lines) == len(miners)


# Passing --log-format on ---------------------------------------------------------------


def test_network_up_and_a_bundle_start_every_node_with_the_log_format(
    genesis: Genesis, tmp_path: Path
) -> None:
    # Prepare: a network with host bundles
    out = tmp_path / "net"
    init = ["network", "init", "--out", str(out), "--clients", "3", "--bundles"]
    assert CliRunner().invoke(main, init).exit_code == 0
    (bundle,) = (out / "hosts").iterdir()
    # Execute
    launched = node_commands(genesis, tmp_path, client_procs=2, data_dir=None, log_format="json")
    bundled = bundle_processes(bundle, state_dir=tmp_path / "state", log_format="json")
    plain = bundle_processes(bundle, state_dir=tmp_path / "state")
    # Assert: every node process is told; text, the default, is not spelled out
    for proc in [*launched, *bundled]:
        assert proc.command[proc.command.index("--log-format") + 1] == "json"
    assert len(launched) == 1 + 4 + 2 and len(bundled) == 1 + 4 + 1
    assert not any("--log-format" in proc.command for proc in plain)
