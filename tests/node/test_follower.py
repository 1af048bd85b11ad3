"""The chain follower of the server and clients: what it says when it is cut from the miners."""

from __future__ import annotations

import asyncio
import socket
from dataclasses import replace
from pathlib import Path

from node.daemon import NodeLog
from node.follower import ChainFollower
from node.genesis import Genesis


def closed_port() -> int:
    """A loopback port nothing listens on (bound, then released)."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def test_a_follower_cut_from_every_miner_says_so_once(genesis: Genesis, tmp_path: Path) -> None:
    # Prepare: every miner's address is a closed loopback port
    nodes = [
        replace(n, address=f"127.0.0.1:{closed_port()}") if n.role == "miner" else n
        for n in genesis.nodes
    ]
    cut = Genesis(
        protocol=genesis.protocol, selection=genesis.selection, run=genesis.run, nodes=nodes
    )
    log_file = tmp_path / "log"
    follower = ChainFollower(cut, NodeLog("follower-test", log_file))

    async def main() -> None:
        stop = asyncio.Event()
        task = asyncio.create_task(follower.follow(stop))
        # Execute: follow until two passes over the miners failed (bounded)
        for _ in range(400):
            if follower._cursor >= 2 * len(follower.miners):
                break
            await asyncio.sleep(0.05)  # polling the follower's progress, bounded
        stop.set()
        await task

    asyncio.run(main())
    # Assert: one warning for the whole outage, naming the miners' count
    lines = [line for line in log_file.read_text().splitlines() if "cannot reach" in line]
    assert len(lines) == 1 and "any of the 4 miners" in lines[0]


def test_the_server_submits_a_record_again_until_it_is_on_the_chain(monkeypatch) -> None:
    # Prepare: a record that reaches no miner twice (the server cut from them)
    import node.server
    from node.server import Server

    monkeypatch.setattr(node.server, "RESUBMIT_SECONDS", 0.05)
    sent: list[str] = []

    class Cut:
        async def submit(self, record: str) -> None:
            sent.append(record)

    def committed() -> bool:
        return len(sent) >= 3  # the third copy gets through

    # Execute
    asyncio.run(Server.submit_until(Cut(), "selection of round 2", committed, asyncio.Event()))
    # Assert: submitted again while not committed, and not once more after
    assert sent == ["selection of round 2"] * 3


def test_a_miner_a_block_behind_is_asked_again_soon(
    genesis: Genesis, identities: dict, tmp_path: Path
) -> None:
    # Prepare: every miner refuses a record twice as out of turn (a block behind),
    # then takes it; the server's resubmission would come only after 10 s
    import grpc

    from chain.records import RoundSummary
    from node.server import BEHIND_WAIT_SECONDS, Server
    from node.serving import ChannelPool, add_servicer
    from proto import llbcfl_pb2 as pb
    from proto import llbcfl_pb2_grpc as pb_grpc

    calls: list[int] = []

    class Behind(pb_grpc.MinerServicer):
        async def Submit(self, request: pb.Envelope, context: object) -> pb.SubmitReceipt:
            calls.append(1)
            if len(calls) <= 2:
                await context.abort(grpc.StatusCode.FAILED_PRECONDITION, "round 1 not open")
            return pb.SubmitReceipt()

    async def main() -> float:
        server = grpc.aio.server()
        add_servicer(server, "Miner", Behind())
        port = server.add_insecure_port("127.0.0.1:0")
        await server.start()
        try:
            nodes = [
                replace(n, address=f"127.0.0.1:{port}")
                if n.node_id == "miner-0"
                else replace(n, address=f"127.0.0.1:{closed_port()}")
                if n.role == "miner"
                else n
                for n in genesis.nodes
            ]
            net = Genesis(
                protocol=genesis.protocol, selection=genesis.selection, run=genesis.run, nodes=nodes
            )
            fl = type("S", (), {})()
            fl.identity, fl.membership = identities["server"], net.membership
            fl.log = NodeLog("server", tmp_path / "log")
            fl.channels = ChannelPool()
            loop = asyncio.get_running_loop()
            start = loop.time()
            await Server.submit(fl, RoundSummary(1, b"\x01" * 32, 0.5, 0.5))
            return loop.time() - start
        finally:
            await server.stop(None)

    # Execute
    took = asyncio.run(main())
    # Assert: three calls to miner-0, the last one taken, well before a resubmission
    assert len(calls) == 3
    assert took < 10 * BEHIND_WAIT_SECONDS + 5


def test_a_follower_skips_a_miner_that_hangs_for_the_next(
    genesis: Genesis, tmp_path: Path, monkeypatch
) -> None:
    # Prepare: miner 0 accepts the call and never answers (a stopped process);
    # miner 1 answers at once (nothing new)
    import grpc

    import node.follower
    from proto import llbcfl_pb2_grpc as pb_grpc

    monkeypatch.setattr(node.follower, "STALL_SECONDS", 0.5)

    class Hung(pb_grpc.MinerServicer):
        async def FetchBlocks(self, request, context):
            await asyncio.sleep(60)
            yield  # pragma: no cover - never reached

    class Idle(pb_grpc.MinerServicer):
        async def FetchBlocks(self, request, context):
            return
            yield  # pragma: no cover - an empty stream

    async def main() -> tuple[bool, float, int]:
        servers, addresses = [], []
        for servicer in (Hung(), Idle()):
            server = grpc.aio.server()
            pb_grpc.add_MinerServicer_to_server(servicer, server)
            addresses.append(f"127.0.0.1:{server.add_insecure_port('127.0.0.1:0')}")
            await server.start()
            servers.append(server)
        miners = iter(addresses)
        nodes = [
            replace(n, address=next(miners, n.address)) if n.role == "miner" else n
            for n in genesis.nodes
        ]
        net = Genesis(
            protocol=genesis.protocol, selection=genesis.selection, run=genesis.run, nodes=nodes
        )
        follower = ChainFollower(net, NodeLog("follower-test", tmp_path / "log"))
        try:
            # Execute
            started = asyncio.get_running_loop().time()
            answered = await follower.catch_up()
            return answered, asyncio.get_running_loop().time() - started, follower._cursor
        finally:
            await follower.close()
            for server in servers:
                await server.stop(None)

    answered, took, cursor = asyncio.run(main())
    # Assert: miner 1 answered, well before the call's own 10 s deadline
    assert answered and cursor == 1
    assert took < 5, took
