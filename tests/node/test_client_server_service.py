"""Server.Attend and Server.DownloadModel on real grpc.aio servers, and the client's
check of a start-round notice: who gets notices, and the refusals."""

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
from node.client import ClientHost, RoundAnswer
from node.client_service import attend_request, start_round
from node.daemon import NodeLog
from node.errors import status_of
from node.genesis import Genesis
from node.identity import Identity
from node.offchain import wall_clock_ms as wall_clock
from node.privacy_ledger import PrivacyLedger
from node.server import Server
from node.server_service import ATTEND_FRESH_MS, ServerServicer
from node.serving import ChannelPool, add_servicer
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

    async def check() -> Any:
        try:
            await start_round(host, "client-000", envelope)
        except Exception as exc:  # the refusal, as the node would report it
            return status_of(exc)
        return None

    # Execute
    refusal = asyncio.run(check())
    assert refusal is not None and refusal[0] == code
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


# The server's start-round notices: clients attend (dial out) -------------------


def attending(server: Server, request: pb.AttendRequest, body: Callable[[Any], Awaitable[None]]):
    """Run ``body(calls)`` against a real Attend stream of ``server``."""

    async def main(ch: Any) -> None:
        await body(pb_grpc.ServerStub(ch).Attend(request))

    serve(lambda s: add_servicer(s, "Server", ServerServicer(server)), main)


def attendance(identity: Identity, server: Server, *, time_ms: int, **fields: Any) -> pb.Envelope:
    entry = pb.Attendance(
        client_id=identity.node_id, genesis_digest=server.genesis.digest, time_ms=time_ms
    )
    for name, value in fields.items():
        setattr(entry, name, value)
    return identity.sign("attend", entry.SerializeToString())


class FakeHost:
    """What ``attend_request`` reads of a ClientHost."""

    def __init__(self, network: bytes, identities: list[Identity]) -> None:
        self.network = network
        self.identities = {i.node_id: i for i in identities}


def test_an_attending_client_gets_the_notices_of_the_rounds_that_select_it(
    fl_server: Server, identities: dict[str, Identity]
) -> None:
    # Prepare: one process hosting all three clients, one stream
    selected = fl_server.state.selections[1].selected
    host = FakeHost(fl_server.genesis.digest, [identities[c] for c in CLIENT_IDS])
    got: list[pb.RoundCall] = []

    async def body(calls: Any) -> None:
        # Execute: the notice of round 1 goes out once the stream is attached
        async def notify_when_attached() -> None:
            while len(fl_server.attending) < len(CLIENT_IDS):
                await asyncio.sleep(0.01)  # polling the server's state, not a race
            fl_server.notify(1, selected, b"\x01" * 32)

        notifier = asyncio.create_task(notify_when_attached())
        async for call in calls:
            got.append(call)
            if len(got) == len(selected):
                break
        await notifier

    attending(fl_server, attend_request(host, wall_clock()), body)

    # Assert: one call per selected client, each the server's signed notice of round 1
    assert sorted(c.client_id for c in got) == sorted(selected)
    for call in got:
        assert call.notice.kind == "start-round"
        assert call.notice.signer == identities["server"].public_key
        assert pb.RoundNotice.FromString(call.notice.payload).round == 1
    # The stream is gone: nobody is left attending
    assert fl_server.attending == {}


def test_a_client_that_connects_during_the_round_gets_its_notice_then(
    fl_server: Server, identities: dict[str, Identity]
) -> None:
    # Prepare: the notice went out while nobody was connected
    selected = fl_server.state.selections[1].selected
    fl_server.notify(1, selected, b"\x01" * 32)
    host = FakeHost(fl_server.genesis.digest, [identities[selected[0]]])
    got: list[pb.RoundCall] = []

    async def body(calls: Any) -> None:
        async for call in calls:
            got.append(call)
            break

    # Execute
    attending(fl_server, attend_request(host, wall_clock()), body)

    # Assert
    assert [c.client_id for c in got] == [selected[0]]


def test_a_newer_stream_replaces_an_older_one(
    fl_server: Server, identities: dict[str, Identity]
) -> None:
    # Prepare: a client process attends, then (restarted) attends again
    selected = fl_server.state.selections[1].selected
    host = FakeHost(fl_server.genesis.digest, [identities[selected[0]]])
    ended: list[int] = []

    async def body(ch: Any) -> None:
        stub = pb_grpc.ServerStub(ch)
        first = stub.Attend(attend_request(host, wall_clock()))
        while selected[0] not in fl_server.attending:
            await asyncio.sleep(0.01)  # polling the server's state, not a race
        old_queue = fl_server.attending[selected[0]]
        second = stub.Attend(attend_request(host, wall_clock()))
        # Execute: the notice goes out after the second stream is attached
        while fl_server.attending.get(selected[0]) is old_queue:
            await asyncio.sleep(0.01)
        fl_server.notify(1, selected, b"\x01" * 32)
        # Assert: the first stream ends with nothing; the second gets the notice
        ended.append(len([c async for c in first]))
        async for call in second:
            ended.append(pb.RoundNotice.FromString(call.notice.payload).round)
            break

    serve(lambda s: add_servicer(s, "Server", ServerServicer(fl_server)), body)
    assert ended == [0, 1]


@pytest.mark.parametrize(
    ("case", "code"),
    [
        ("empty", grpc.StatusCode.INVALID_ARGUMENT),
        ("impostor", grpc.StatusCode.PERMISSION_DENIED),
        ("forged", grpc.StatusCode.UNAUTHENTICATED),
        ("miner", grpc.StatusCode.PERMISSION_DENIED),
        ("stale", grpc.StatusCode.INVALID_ARGUMENT),
        ("other-network", grpc.StatusCode.INVALID_ARGUMENT),
        ("twice", grpc.StatusCode.INVALID_ARGUMENT),
        ("garbage", grpc.StatusCode.INVALID_ARGUMENT),
    ],
)
def test_an_attend_request_not_signed_fresh_by_each_client_is_refused(
    fl_server: Server, identities: dict[str, Identity], case: str, code: Any
) -> None:
    # Prepare
    now = wall_clock()
    me = identities["client-000"]
    entries = {
        "empty": [],
        "impostor": [
            attendance(identities["client-001"], fl_server, time_ms=now, client_id=me.node_id)
        ],
        "forged": [attendance(me, fl_server, time_ms=now)],
        "miner": [attendance(identities["miner-0"], fl_server, time_ms=now)],
        "stale": [attendance(me, fl_server, time_ms=now - ATTEND_FRESH_MS - 60_000)],
        "other-network": [attendance(me, fl_server, time_ms=now, genesis_digest=b"\x07" * 32)],
        "twice": [attendance(me, fl_server, time_ms=now)] * 2,
        "garbage": [me.sign("attend", b"\xff\xff\xff")],
    }[case]
    if case == "forged":
        entries[0].signature = bytes(64)
    codes: list[Any] = []

    async def body(calls: Any) -> None:
        try:
            async for _ in calls:
                pass
        except grpc.aio.AioRpcError as exc:
            codes.append(exc.code())

    # Execute
    attending(fl_server, pb.AttendRequest(clients=entries), body)

    # Assert: refused, and nobody attached
    assert codes == [code]
    assert fl_server.attending == {}


def test_the_round_driver_moves_on_when_the_verdicts_commit(
    small_genesis: Genesis, identities: dict[str, Identity], tmp_path: Path
) -> None:
    # Prepare: a round whose selected clients are not connected at all
    test = Split(x=torch.zeros(10, 1, 28, 28), y=torch.zeros(10, dtype=torch.int64))
    server = Server(
        small_genesis, identities["server"], run_dir=tmp_path, test=test, log=NodeLog("s")
    )
    state = server.state
    commit(state, [(c, Registration(c, (50, 50) + (0,) * 9)) for c in CLIENT_IDS])
    selection = replace(state.expected_selection(1), selected=("client-000", "client-001"))
    state.apply_record("server", selection)
    open_calls = []

    async def main() -> None:
        driver = asyncio.create_task(
            server.notify_until_verdicts(1, selection.selected, b"\x01" * 32, asyncio.Event())
        )
        while server.open_call is None:
            await asyncio.sleep(0.01)  # polling the server's state, not a race
        open_calls.append(server.open_call[0])
        # Execute: the miners' verdicts commit with no update in
        state.apply_record("miner-0", RoundVerdicts(1, (), selection.selected, (), ()))
        await asyncio.wait_for(driver, 30)

    asyncio.run(main())

    # Assert: the notice was open for round 1, and is withdrawn
    assert open_calls == [1]
    assert server.open_call is None


def test_a_client_process_reconnects_to_a_server_that_comes_up_and_takes_its_notice(
    fl_server: Server, identities: dict[str, Identity], tmp_path: Path
) -> None:
    # Prepare: the server's address has nothing listening yet; the client attends it
    from commands.launcher import free_ports
    from node.client_service import attend

    port = free_ports(1)[0]
    address = f"127.0.0.1:{port}"
    nodes = tuple(
        replace(n, address=address) if n.role == "server" else n for n in fl_server.genesis.nodes
    )
    moved = Genesis(
        protocol=fl_server.genesis.protocol,
        selection=fl_server.genesis.selection,
        run=fl_server.genesis.run,
        nodes=nodes,
    )
    selected = fl_server.state.selections[1].selected
    log = NodeLog(f"clients-{tmp_path.name}", tmp_path / "log")  # a logger of its own
    taken: list[tuple[str, int]] = []

    class Host(FakeHost):
        membership = moved.membership

        async def start_round(self, cid: str, notice: pb.RoundNotice) -> RoundAnswer:
            taken.append((cid, notice.round))
            stop.set()
            return RoundAnswer(accepted=True)

    host = Host(fl_server.genesis.digest, [identities[selected[0]]])
    host.channels = ChannelPool()
    stop = asyncio.Event()

    async def main() -> None:
        client = asyncio.create_task(attend(host, stop, log))
        for _ in range(600):  # at most 30 s
            if client.done() or "cannot reach the server" in (tmp_path / "log").read_text():
                break
            await asyncio.sleep(0.05)  # polling the client's log, not a race
        assert not client.done(), client.result()
        # Execute: the server comes up with round 1 open
        server = grpc.aio.server()
        add_servicer(server, "Server", ServerServicer(fl_server))
        server.add_insecure_port(address)
        await server.start()
        fl_server.notify(1, selected, b"\x01" * 32)
        try:
            await asyncio.wait_for(client, 60)
        finally:
            await server.stop(None)

    asyncio.run(main())

    # Assert: one line for the outage, one for the recovery, and the notice taken
    text = (tmp_path / "log").read_text()
    assert text.count("cannot reach the server") == 1
    assert text.count("reachable again") == 1
    assert taken == [(selected[0], 1)]
