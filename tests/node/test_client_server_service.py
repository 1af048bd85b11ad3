"""Client.StartRound and Server.DownloadModel on real grpc.aio servers: refusals."""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable
from dataclasses import replace
from pathlib import Path
from typing import Any

import grpc
import pytest
import torch

from chain.records import Registration, RoundVerdicts
from fl.config import RunConfig
from fl.data import Split
from fl.rounds import Federation
from node.client import ClientHost
from node.client_service import ClientServicer
from node.daemon import NodeLog
from node.genesis import Genesis
from node.identity import Identity
from node.privacy_ledger import PrivacyLedger
from node.server import Server
from node.server_service import ServerServicer
from node.serving import add_servicer
from node.tensors import MODEL_REQUEST_KIND
from proto import llbcfl_pb2 as pb
from proto import llbcfl_pb2_grpc as pb_grpc
from tests.chain.blocks import commit

CONFIG = RunConfig(clients=3, frac=0.67, rounds=2, model="mlp", train_size=300)
CLIENT_IDS = ("client-000", "client-001", "client-002")


@pytest.fixture
def small_genesis(genesis: Genesis) -> Genesis:
    return Genesis(
        protocol=genesis.protocol, selection=genesis.selection, run=CONFIG, nodes=genesis.nodes
    )


def serve(add: Callable[[Any], None], body: Callable[[Any], Awaitable[None]]) -> None:
    async def main() -> None:
        server = grpc.aio.server()
        add(server)
        port = server.add_insecure_port("127.0.0.1:0")
        await server.start()
        try:
            async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as ch:
                await body(ch)
        finally:
            await server.stop(None)

    asyncio.run(main())


def notice_envelope(identity: Identity) -> pb.Envelope:
    notice = pb.RoundNotice(round=1, model_digest=b"\x01" * 32, deadline_ms=1000)
    return identity.sign("start-round", notice.SerializeToString())


@pytest.fixture
def host(small_genesis: Genesis, identities: dict[str, Identity], tmp_path: Path) -> ClientHost:
    train = Split(x=torch.zeros(300, 1, 28, 28), y=torch.arange(300) % 10)

    async def build() -> ClientHost:  # the host's lock wants a running loop on 3.9
        return ClientHost(
            small_genesis,
            [identities["client-000"]],
            federation=Federation.create(CONFIG, train),
            ledger=PrivacyLedger(tmp_path / "ledger.json"),
            log=NodeLog("clients"),
        )

    return asyncio.run(build())


@pytest.mark.parametrize(
    ("signer", "forge", "code"),
    [
        ("client-001", False, grpc.StatusCode.PERMISSION_DENIED),
        ("server", True, grpc.StatusCode.UNAUTHENTICATED),
    ],
)
def test_start_round_not_from_the_server_is_refused(
    host: ClientHost, identities: dict[str, Identity], signer: str, forge: bool, code: Any
) -> None:
    # Prepare
    envelope = notice_envelope(identities[signer])
    if forge:
        envelope.signature = bytes(64)

    async def body(ch: Any) -> None:
        with pytest.raises(grpc.aio.AioRpcError) as info:
            await pb_grpc.ClientStub(ch).StartRound(envelope)
        assert info.value.code() == code

    # Execute
    serve(lambda s: add_servicer(s, "Client", ClientServicer(host, "client-000")), body)
    # Assert: nothing started, nothing entered in the ledger
    assert host.in_flight["client-000"] == set()
    assert not (host.ledger.path).exists()


@pytest.fixture
def fl_server(small_genesis: Genesis, identities: dict[str, Identity], tmp_path: Path) -> Server:
    test = Split(x=torch.zeros(10, 1, 28, 28), y=torch.zeros(10, dtype=torch.int64))
    s = Server(
        small_genesis, identities["server"], run_dir=tmp_path, test=test, log=NodeLog("server")
    )
    registrations = [
        (
            c.node_id,
            Registration(c.node_id, (50, 50, 0, 0, 0, 0, 0, 0, 0, 0, 0)),
        )
        for c in small_genesis.membership.clients
    ]
    commit(s.state, registrations)  # a block: its digest seeds round 1's selection
    selection = s.state.expected_selection(1)
    s.state.apply_record("server", selection)
    weights = s.models.weights(1, s.state, s.blobs.update_of)
    s.current = (1, weights, b"")
    return s


def model_request(identity: Identity, *, round: int = 1, client_id: str | None = None):
    request = pb.ModelRequest(round=round, client_id=client_id or identity.node_id)
    return identity.sign(MODEL_REQUEST_KIND, request.SerializeToString())


def download_refusal(server: Server, envelope: pb.Envelope) -> grpc.StatusCode:
    codes = []

    async def body(ch: Any) -> None:
        try:
            async for _ in pb_grpc.ServerStub(ch).DownloadModel(envelope):
                pass
        except grpc.aio.AioRpcError as exc:
            codes.append(exc.code())

    serve(lambda s: add_servicer(s, "Server", ServerServicer(server)), body)
    return codes[0] if codes else grpc.StatusCode.OK


def test_model_goes_only_to_selected_clients(
    fl_server: Server, identities: dict[str, Identity]
) -> None:
    selected = fl_server.state.selections[1].selected
    outsider = next(c for c in ("client-000", "client-001", "client-002") if c not in selected)
    ok = download_refusal(fl_server, model_request(identities[selected[0]]))
    refused = download_refusal(fl_server, model_request(identities[outsider]))
    assert ok == grpc.StatusCode.OK
    assert refused == grpc.StatusCode.PERMISSION_DENIED


def test_model_of_another_round_is_refused(
    fl_server: Server, identities: dict[str, Identity]
) -> None:
    selected = fl_server.state.selections[1].selected
    code = download_refusal(fl_server, model_request(identities[selected[0]], round=2))
    assert code == grpc.StatusCode.FAILED_PRECONDITION


def test_model_request_must_be_signed_by_the_client_it_names(
    fl_server: Server, identities: dict[str, Identity]
) -> None:
    selected = fl_server.state.selections[1].selected
    outsider = next(c for c in ("client-000", "client-001", "client-002") if c not in selected)
    # An unselected client asking in a selected client's name
    impostor = model_request(identities[outsider], client_id=selected[0])
    assert download_refusal(fl_server, impostor) == grpc.StatusCode.PERMISSION_DENIED
    # A forged signature (payload changed after signing)
    forged = model_request(identities[selected[0]])
    forged.payload = pb.ModelRequest(round=1, client_id=outsider).SerializeToString()
    assert download_refusal(fl_server, forged) == grpc.StatusCode.UNAUTHENTICATED
    # A miner is not a client; an unsigned (empty) envelope is nobody
    miner = model_request(identities["miner-0"], client_id=selected[0])
    assert download_refusal(fl_server, miner) == grpc.StatusCode.PERMISSION_DENIED
    assert download_refusal(fl_server, pb.Envelope()) == grpc.StatusCode.UNAUTHENTICATED
    # A signed envelope of another kind is not a model request
    other = identities[selected[0]].sign("update", b"")
    assert download_refusal(fl_server, other) == grpc.StatusCode.UNAUTHENTICATED


def test_malformed_model_request_is_refused(
    fl_server: Server, identities: dict[str, Identity]
) -> None:
    selected = fl_server.state.selections[1].selected
    garbage = identities[selected[0]].sign(MODEL_REQUEST_KIND, b"\xff\xff\xff")
    assert download_refusal(fl_server, garbage) == grpc.StatusCode.INVALID_ARGUMENT


def test_daemons_serve_the_grpc_health_service() -> None:
    from grpc_health.v1 import health_pb2, health_pb2_grpc

    from node.serving import add_health

    replies = []

    async def body(ch: Any) -> None:
        stub = health_pb2_grpc.HealthStub(ch)
        replies.append(await stub.Check(health_pb2.HealthCheckRequest(service="")))

    serve(add_health, body)
    assert replies[0].status == health_pb2.HealthCheckResponse.SERVING


# The server's start-round notices --------------------------------------------


class StubClient(pb_grpc.ClientServicer):
    """A client that takes the notice at once, or (``hang``) never answers it."""

    def __init__(self, *, hang: bool) -> None:
        self.hang = hang
        self.calls = 0
        self.arrived = asyncio.Event()
        self.abandoned = asyncio.Event()
        self.release = asyncio.Event()

    async def StartRound(self, request: pb.Envelope, context: Any) -> pb.StartRoundReply:
        self.calls += 1
        self.arrived.set()
        if self.hang:
            try:
                await self.release.wait()
            except asyncio.CancelledError:
                self.abandoned.set()  # the server cancelled the call
                raise
        return pb.StartRoundReply(accepted=True)


async def server_with_clients(
    genesis: Genesis, identities: dict[str, Identity], tmp_path: Path, *, notify_timeout_ms: int
) -> tuple[Server, dict[str, StubClient], list[Any]]:
    """A server whose round-1 selection names two stub clients: one silent, one answering."""
    stubs = {"client-000": StubClient(hang=True), "client-001": StubClient(hang=False)}
    servers, addresses = [], {}
    for cid, stub in stubs.items():
        grpc_server = grpc.aio.server()
        add_servicer(grpc_server, "Client", stub)
        addresses[cid] = f"127.0.0.1:{grpc_server.add_insecure_port('127.0.0.1:0')}"
        await grpc_server.start()
        servers.append(grpc_server)
    nodes = tuple(replace(n, address=addresses.get(n.node_id, n.address)) for n in genesis.nodes)
    protocol = replace(genesis.protocol, notify_timeout_ms=notify_timeout_ms)
    network = Genesis(protocol=protocol, selection=genesis.selection, run=CONFIG, nodes=nodes)
    test = Split(x=torch.zeros(10, 1, 28, 28), y=torch.zeros(10, dtype=torch.int64))
    server = Server(network, identities["server"], run_dir=tmp_path, test=test, log=NodeLog("s"))
    return server, stubs, servers


async def stop_all(stubs: dict[str, StubClient], servers: list[Any]) -> None:
    for stub in stubs.values():
        stub.release.set()
    for grpc_server in servers:
        await grpc_server.stop(None)


def test_a_client_that_never_answers_holds_the_notices_only_up_to_the_timeout(
    small_genesis: Genesis, identities: dict[str, Identity], tmp_path: Path
) -> None:
    outcome = {}

    async def main() -> None:
        # Prepare: client-000 never answers its notice, client-001 does
        server, stubs, servers = await server_with_clients(
            small_genesis, identities, tmp_path, notify_timeout_ms=300
        )
        try:
            # Execute
            await server.notify(1, ("client-000", "client-001"), b"\x01" * 32)
            # Assert (below): notify returned although client-000 is still holding its call
            outcome.update(
                answered=stubs["client-001"].calls,
                silent_called=stubs["client-000"].arrived.is_set(),
                silent_released=stubs["client-000"].release.is_set(),
            )
        finally:
            await stop_all(stubs, servers)

    asyncio.run(main())
    assert outcome == {"answered": 1, "silent_called": True, "silent_released": False}


def test_the_round_driver_moves_on_when_the_verdicts_commit(
    small_genesis: Genesis, identities: dict[str, Identity], tmp_path: Path
) -> None:
    outcome = {}

    async def main() -> None:
        # Prepare: a notice timeout far beyond the test; client-000 never answers
        server, stubs, servers = await server_with_clients(
            small_genesis, identities, tmp_path, notify_timeout_ms=600_000
        )
        state = server.state
        commit(state, [(c, Registration(c, (50, 50) + (0,) * 9)) for c in CLIENT_IDS])
        selection = replace(state.expected_selection(1), selected=("client-000", "client-001"))
        state.apply_record("server", selection)
        try:
            # Execute: notify and wait; the miners' verdicts commit while client-000 hangs
            driver = asyncio.create_task(
                server.notify_until_verdicts(1, selection.selected, b"\x01" * 32, asyncio.Event())
            )
            await stubs["client-000"].arrived.wait()
            verdicts = RoundVerdicts(1, (), selection.selected, (), ())
            state.apply_record("miner-0", verdicts)
            await driver
            # Assert (below): the driver returned and dropped the unanswered notice
            await asyncio.wait_for(stubs["client-000"].abandoned.wait(), 30)
            outcome.update(
                answered=stubs["client-001"].calls,
                released=stubs["client-000"].release.is_set(),
            )
        finally:
            await stop_all(stubs, servers)

    asyncio.run(main())
    assert outcome == {"answered": 1, "released": False}
