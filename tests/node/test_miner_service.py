"""The Miner service on a real grpc.aio server (127.0.0.1, port 0): what it refuses.

Every refusal answers with its gRPC status and stores nothing.
"""

from __future__ import annotations

import asyncio
from collections import OrderedDict
from collections.abc import Awaitable, Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import replace
from pathlib import Path
from typing import Any

import grpc
import pytest
import torch

from chain.digests import weights_digest
from chain.models import GlobalModels, initial_weights
from chain.records import (
    Registration,
    RoundSummary,
    RoundVerdicts,
    decode_operation,
)
from chain.verdicts import build_verdicts
from consensus.ledger import Block, Request, encode_batch
from consensus.messages import PrePrepare
from fl.config import RunConfig
from fl.data import Split
from node.daemon import NodeLog, signed_record
from node.genesis import Genesis
from node.identity import Identity
from node.miner import Miner
from node.miner_service import MinerHandler, MinerServicer
from node.offchain import fetch_request, upload_of
from node.peers import PeerLink, link_item
from node.serving import add_servicer
from node.tensor_receiver import ReceivedTensors, receive_tensor_stream
from node.tensors import UPDATE_KIND, sign_header, tensor_stream
from proto import llbcfl_pb2 as pb
from proto import llbcfl_pb2_grpc as pb_grpc
from tests.chain.blocks import commit

CONFIG = RunConfig(clients=3, frac=0.67, rounds=2, model="mlp", val_size=20, test_size=20)


@pytest.fixture
def small_genesis(genesis: Genesis) -> Genesis:
    return Genesis(
        protocol=genesis.protocol, selection=genesis.selection, run=CONFIG, nodes=genesis.nodes
    )


def registration_of(cid: str) -> Registration:
    return Registration(cid, (50, 50, 0, 0, 0, 0, 0, 0, 0, 0, 0))


@pytest.fixture
def registering_miner(
    small_genesis: Genesis, identities: dict[str, Identity], tmp_path: Path
) -> Miner:
    """A miner of a chain with no block yet: registrations are open."""
    validation = Split(x=torch.zeros(20, 1, 28, 28), y=torch.zeros(20, dtype=torch.int64))
    m = Miner(
        small_genesis,
        identities["miner-1"],
        db_path=tmp_path / "chain.db",
        run_dir=tmp_path,
        validation=validation,
        log=NodeLog("miner-1", tmp_path / "log"),
    )
    yield m
    m.store.close()


@pytest.fixture
def miner(registering_miner: Miner) -> Miner:
    """Every client registered, round 1 selected."""
    m = registering_miner
    registrations = [(c.node_id, registration_of(c.node_id)) for c in m.genesis.membership.clients]
    commit(m.state, registrations)  # a block: its digest seeds round 1's selection
    m.state.apply_record("server", m.state.expected_selection(1))
    return m


HANDLERS: dict[int, MinerHandler] = {}  # the handler serving each miner under test
# The clock the miners of these tests check fetch requests against (Unix ms).
NOW_MS = 1_700_000_000_000


def run_with_miner(
    miner: Miner, body: Callable[[Any], Awaitable[None]], *, stub: bool = True
) -> None:
    async def main() -> None:
        server = grpc.aio.server()
        handler = HANDLERS[id(miner)] = MinerHandler(miner, clock_ms=lambda: NOW_MS)
        add_servicer(server, "Miner", MinerServicer(handler))
        port = server.add_insecure_port("127.0.0.1:0")
        await server.start()
        try:
            async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as ch:
                await body(pb_grpc.MinerStub(ch) if stub else ch)
        finally:
            await server.stop(None)

    asyncio.run(main())


def delta(value: float = 0.0) -> OrderedDict[str, torch.Tensor]:
    return OrderedDict((k, torch.full_like(v, value)) for k, v in initial_weights(CONFIG).items())


def update_parts(
    identity: Identity, *, rnd: int = 1, weights: Any = None, base: bytes | None = None
) -> list[pb.TensorStreamPart]:
    return list(
        tensor_stream(
            delta() if weights is None else weights,
            identity=identity,
            kind="update",
            round=rnd,
            base_digest=weights_digest(initial_weights(CONFIG)) if base is None else base,
            num_samples=100,
        )
    )


def expect_refusal(miner: Miner, parts: list[pb.TensorStreamPart], code: grpc.StatusCode) -> None:
    async def body(stub: Any) -> None:
        with pytest.raises(grpc.aio.AioRpcError) as info:
            await stub.SubmitUpdate(iter(parts))
        assert info.value.code() == code, info.value.details()

    run_with_miner(miner, body)
    assert miner.blobs.by_round == {}


def selected(miner: Miner) -> list[str]:
    return list(miner.state.selections[1].selected)


def test_selected_update_is_stored_under_its_digest(miner: Miner, identities: Any) -> None:
    # Prepare
    cid = selected(miner)[0]
    parts = update_parts(identities[cid])
    receipts = []

    async def body(stub: Any) -> None:
        receipts.append(await stub.SubmitUpdate(iter(parts)))

    # Execute
    run_with_miner(miner, body)
    # Assert
    digest = receipts[0].digest
    assert receipts[0].client_id == cid
    assert miner.blobs.by_round[1][cid] == digest
    assert miner.blobs.get(digest, cid) is not None


def test_unselected_client_is_refused(miner: Miner, identities: Any) -> None:
    outsider = next(
        c for c in ("client-000", "client-001", "client-002") if c not in selected(miner)
    )
    expect_refusal(miner, update_parts(identities[outsider]), grpc.StatusCode.PERMISSION_DENIED)


def test_wrong_round_is_refused(miner: Miner, identities: Any) -> None:
    parts = update_parts(identities[selected(miner)[0]], rnd=2)
    expect_refusal(miner, parts, grpc.StatusCode.FAILED_PRECONDITION)


def test_nan_update_is_refused_and_noted_as_malformed(miner: Miner, identities: Any) -> None:
    # Prepare
    cid = selected(miner)[0]
    weights = delta()
    next(iter(weights.values()))[0] = float("nan")
    parts = update_parts(identities[cid], weights=weights)
    # Execute, Assert: refused, nothing stored, the signed refusal kept for the verdicts
    expect_refusal(miner, parts, grpc.StatusCode.INVALID_ARGUMENT)
    _evidence, reason = miner.malformed[1][cid]
    assert reason.startswith("malformed: ") and "NaN" in reason


def test_wrong_shape_is_refused(miner: Miner, identities: Any) -> None:
    weights = delta()
    name = next(iter(weights))
    weights[name] = torch.zeros(3, 3)
    parts = update_parts(identities[selected(miner)[0]], weights=weights)
    expect_refusal(miner, parts, grpc.StatusCode.INVALID_ARGUMENT)


def test_update_signed_by_a_miner_is_refused(miner: Miner, identities: Any) -> None:
    parts = update_parts(identities["miner-2"])
    expect_refusal(miner, parts, grpc.StatusCode.PERMISSION_DENIED)


def test_update_claiming_another_client_is_refused(miner: Miner, identities: Any) -> None:
    victim, forger = selected(miner)[0], selected(miner)[1]
    parts = update_parts(identities[forger])
    parts[0].header.sender_id = victim
    expect_refusal(miner, parts, grpc.StatusCode.PERMISSION_DENIED)


def test_tampered_data_is_refused(miner: Miner, identities: Any) -> None:
    parts = update_parts(identities[selected(miner)[0]])
    data = bytearray(parts[1].chunk.data)
    data[0] ^= 1
    parts[1].chunk.data = bytes(data)
    expect_refusal(miner, parts, grpc.StatusCode.INVALID_ARGUMENT)


def test_oversized_stream_is_refused(miner: Miner, identities: Any) -> None:
    client = identities[selected(miner)[0]]
    parts = update_parts(client)
    parts[0].header.total_bytes = miner.genesis.protocol.max_stream_bytes + 1
    sign_header(parts[0].header, client, "update")
    expect_refusal(miner, parts, grpc.StatusCode.RESOURCE_EXHAUSTED)


def test_unsigned_stream_header_is_refused_unauthenticated(miner: Miner, identities: Any) -> None:
    parts = update_parts(identities[selected(miner)[0]])
    parts[0].header.ClearField("auth")
    expect_refusal(miner, parts, grpc.StatusCode.UNAUTHENTICATED)


def test_unselected_client_is_refused_at_its_header(miner: Miner, identities: Any) -> None:
    # Prepare: a registered client that round 1 did not select
    others = [c.node_id for c in miner.genesis.membership.clients]
    outsider = next(c for c in others if c not in selected(miner))
    # Execute / Assert: refused before any chunk is read (the stream has no data)
    parts = update_parts(identities[outsider])[:1]
    expect_refusal(miner, parts, grpc.StatusCode.PERMISSION_DENIED)


def test_second_concurrent_stream_of_one_client_is_refused(miner: Miner, identities: Any) -> None:
    # Prepare: a client's first stream sends its header and waits
    client = identities[selected(miner)[0]]
    parts = update_parts(client)
    header_sent = asyncio.Event()
    release = asyncio.Event()

    async def slow() -> Any:
        yield parts[0]
        header_sent.set()
        await release.wait()

    async def body(stub: Any) -> None:
        first = stub.SubmitUpdate(slow())
        await header_sent.wait()
        await asyncio.wait_for(until_uploading(miner, client.node_id), 10)
        # Execute: a second stream of the same client while the first is open
        with pytest.raises(grpc.aio.AioRpcError) as info:
            await stub.SubmitUpdate(iter(parts))
        release.set()
        first.cancel()
        # Assert
        assert info.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED

    run_with_miner(miner, body)
    assert miner.blobs.by_round == {}


async def until_uploading(miner: Miner, cid: str) -> None:
    handler = HANDLERS[id(miner)]
    while cid not in handler.uploading:
        await asyncio.sleep(0.01)  # polling a condition (bounded by the caller's wait_for)


def test_update_from_another_model_is_refused(miner: Miner, identities: Any) -> None:
    parts = update_parts(identities[selected(miner)[0]], base=b"\x01" * 32)
    expect_refusal(miner, parts, grpc.StatusCode.INVALID_ARGUMENT)


def test_second_different_update_of_the_round_is_refused(miner: Miner, identities: Any) -> None:
    # Prepare
    ident = identities[selected(miner)[0]]
    first, second = update_parts(ident), update_parts(ident, weights=delta(0.001))
    codes = []

    async def body(stub: Any) -> None:
        await stub.SubmitUpdate(iter(first))
        try:
            await stub.SubmitUpdate(iter(second))
        except grpc.aio.AioRpcError as exc:
            codes.append(exc.code())

    # Execute
    run_with_miner(miner, body)
    # Assert
    assert codes == [grpc.StatusCode.ALREADY_EXISTS]
    assert len(miner.blobs.by_round[1]) == 1


def test_submit_by_the_wrong_role_is_refused(miner: Miner, identities: Any) -> None:
    # A client signs a round summary, which only the server may submit.
    envelope = signed_record(identities["client-000"], RoundSummary(1, b"\x01" * 32, 0.5, 0.5))

    async def body(stub: Any) -> None:
        with pytest.raises(grpc.aio.AioRpcError) as info:
            await stub.Submit(envelope)
        assert info.value.code() == grpc.StatusCode.PERMISSION_DENIED

    run_with_miner(miner, body)
    assert miner.replica.pending_count == 0


def test_submit_of_a_duplicate_or_a_used_timestamp_is_refused(
    registering_miner: Miner, identities: Any
) -> None:
    # Prepare: client-000's registration, and another one with the same timestamp
    miner = registering_miner
    first = signed_record(identities["client-000"], registration_of("client-000"))
    other = signed_record(identities["client-000"], Registration("client-000", (7,) * 11))
    receipts, refusals = [], []

    async def submit(stub: Any, envelope: pb.Envelope) -> None:
        try:
            receipts.append(await stub.Submit(envelope))
        except grpc.aio.AioRpcError as exc:
            refusals.append((exc.code(), exc.details()))

    async def while_pending(stub: Any) -> None:
        await submit(stub, first)
        await submit(stub, first)  # the same record again, still waiting to be ordered
        await submit(stub, other)

    async def once_committed(stub: Any) -> None:
        await submit(stub, first)
        await submit(stub, other)

    # Execute: three submissions while the first waits, two once it is on the chain
    run_with_miner(miner, while_pending)
    pending = miner.replica.pending_count
    commit(miner.state, [("client-000", registration_of("client-000"))])
    run_with_miner(miner, once_committed)
    # Assert: only the first is accepted; every later one is refused, saying why
    assert [r.accepted for r in receipts] == [True]
    assert pending == 1
    assert [code for code, _ in refusals] == [grpc.StatusCode.ALREADY_EXISTS] * 4
    assert all("waiting to be ordered" in details for _, details in refusals[:2])
    assert all("already used on the chain" in details for _, details in refusals[2:])


def test_submit_with_a_forged_signature_is_refused(miner: Miner, identities: Any) -> None:
    selection = miner.state.expected_selection(1)
    envelope = signed_record(identities["server"], selection)
    envelope.signature = bytes(64)

    async def body(stub: Any) -> None:
        with pytest.raises(grpc.aio.AioRpcError) as info:
            await stub.Submit(envelope)
        assert info.value.code() == grpc.StatusCode.UNAUTHENTICATED

    run_with_miner(miner, body)
    assert miner.replica.pending_count == 0


def test_malformed_pbft_message_of_a_miner_is_refused(miner: Miner, identities: Any) -> None:
    async def body(stub: Any) -> None:
        with pytest.raises(grpc.aio.AioRpcError) as info:
            await stub.Deliver(iter([link_item(identities["miner-2"], b"\x00garbage")]))
        assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT

    run_with_miner(miner, body)
    assert miner.store.height() == 0


@pytest.mark.parametrize("signer", [None, "client-000", "outsider"])
def test_pbft_item_not_signed_by_a_miner_is_refused_before_decoding(
    miner: Miner, identities: Any, signer: str | None, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Prepare: a large unsigned (or client-, or outsider-signed) item; decoding is watched
    decoded: list[int] = []
    monkeypatch.setattr("node.miner_service.decode_message", lambda data: decoded.append(1))
    data = b"\x01" + b"\x00" * (3 << 20)
    if signer is None:
        item = pb.PbftMessage(data=data)
    elif signer == "outsider":
        item = link_item(Identity.generate(node_id="miner-2", role="miner"), data)
    else:
        item = link_item(identities[signer], data)
    expected = grpc.StatusCode.PERMISSION_DENIED if signer == "client-000" else None

    async def body(stub: Any) -> None:
        with pytest.raises(grpc.aio.AioRpcError) as info:
            await stub.Deliver(iter([item]))
        assert info.value.code() == (expected or grpc.StatusCode.UNAUTHENTICATED)

    # Execute
    run_with_miner(miner, body)
    # Assert
    assert decoded == [] and miner.store.height() == 0


def test_pbft_item_whose_signature_covers_other_bytes_is_refused(
    miner: Miner, identities: Any
) -> None:
    # Prepare: a miner's signed item with its data swapped
    item = link_item(identities["miner-2"], b"\x00honest")
    item.data = b"\x00forged"

    async def body(stub: Any) -> None:
        with pytest.raises(grpc.aio.AioRpcError) as info:
            await stub.Deliver(iter([item]))
        assert info.value.code() == grpc.StatusCode.UNAUTHENTICATED

    run_with_miner(miner, body)


def test_a_stream_bound_to_one_miner_refuses_another_miners_items(
    miner: Miner, identities: Any
) -> None:
    items = [link_item(identities["miner-2"], b""), link_item(identities["miner-3"], b"")]

    async def body(stub: Any) -> None:
        with pytest.raises(grpc.aio.AioRpcError) as info:
            await stub.Deliver(iter(items))
        assert info.value.code() == grpc.StatusCode.PERMISSION_DENIED

    run_with_miner(miner, body)


def test_fetch_of_an_unknown_digest_is_not_found(miner: Miner, identities: Any) -> None:
    request = fetch_request(identities["miner-0"], (b"\x02" * 32, "client-000"), now_ms=NOW_MS)

    async def body(stub: Any) -> None:
        with pytest.raises(grpc.aio.AioRpcError) as info:
            async for _ in stub.FetchUpdate(request):
                pass
        assert info.value.code() == grpc.StatusCode.NOT_FOUND

    run_with_miner(miner, body)


def test_replica_votes_only_for_verdicts_matching_its_own_validation(
    miner: Miner, identities: Any
) -> None:
    # Prepare: every selected client's update is held; the miner builds its record
    async def upload_all(stub: Any) -> None:
        for cid in selected(miner):
            await stub.SubmitUpdate(iter(update_parts(identities[cid])))

    run_with_miner(miner, upload_all)
    honest = verdicts_of_miner(miner)
    flipped = RoundVerdicts(
        1,
        tuple(replace(u, accepted=not u.accepted) for u in honest.updates),
        honest.silent,
        honest.reputations,
        honest.privacy,
    )
    # Execute
    votes = [
        miner._validate(block_with(miner, identities["miner-0"], r)) for r in (honest, flipped)
    ]
    # Assert
    assert votes == [True, False]


def verdicts_of_miner(miner: Miner) -> RoundVerdicts:
    """The record this miner would submit (it is not the primary: force the fallback)."""
    miner.ready_at[1] = -1e9

    async def build() -> None:
        miner.maybe_submit_verdicts()

    asyncio.run(build())
    (request,) = miner.replica._pending.values()
    _, record = decode_operation(request.operation)
    assert isinstance(record, RoundVerdicts)
    return record


def block_with(miner: Miner, signer: Identity, record: RoundVerdicts) -> Block:
    envelope = signed_record(signer, record)
    request = Request(signer.node_id, 1, bytes(envelope.payload), bytes(envelope.signature))
    return Block.propose(
        height=miner.state.height + 1,
        previous_hash=miner.state.head_hash,
        view=0,
        proposer=0,
        payload=encode_batch([request]),
    )


def test_undecodable_protobuf_is_refused_as_invalid_argument(miner: Miner) -> None:
    # Raw bytes that are no valid Envelope / TensorStreamPart on the wire
    garbage = b"\xff\xff\xff\xff"
    codes = []

    async def body(channel: Any) -> None:
        submit = channel.unary_unary("/llbcfl.v1.Miner/Submit")
        upload = channel.stream_unary("/llbcfl.v1.Miner/SubmitUpdate")
        for call in (submit(garbage), upload(iter([garbage]))):
            try:
                await call
            except grpc.aio.AioRpcError as exc:
                codes.append(exc.code())

    run_with_miner(miner, body, stub=False)
    assert codes == [grpc.StatusCode.INVALID_ARGUMENT] * 2
    assert miner.blobs.by_round == {}
    assert miner.replica.pending_count == 0


def upload_distinct_updates(miner: Miner, identities: Any) -> list[tuple[str, bytes, int]]:
    """Every selected client uploads a different random update; the validation's key."""
    generator = torch.Generator().manual_seed(7)

    async def upload_all(stub: Any) -> None:
        for cid in selected(miner):
            weights = OrderedDict(
                (k, 0.01 * torch.randn(v.shape, generator=generator))
                for k, v in initial_weights(CONFIG).items()
            )
            await stub.SubmitUpdate(iter(update_parts(identities[cid], weights=weights)))

    run_with_miner(miner, upload_all)
    have = miner.blobs.by_round[1]
    return [(c, have[c], miner.state.released_records(c)) for c in sorted(have)]


def test_validation_in_the_worker_process_is_bit_identical(miner: Miner, identities: Any) -> None:
    # Prepare: a validation split that makes the verdicts' accuracies non-trivial
    generator = torch.Generator().manual_seed(3)
    miner.validation = Split(
        x=torch.randn(20, 1, 28, 28, generator=generator), y=torch.arange(20) % 10
    )
    digests = upload_distinct_updates(miner, identities)
    miner._own_verdicts.clear()
    on_loop = miner._own_validation(miner.state, 1, digests)
    miner._own_verdicts.clear()
    handler = MinerHandler(miner)
    # Execute: the same validation, in the handler's worker process
    try:
        asyncio.run(handler._prevalidate(1, digests))
    finally:
        handler.close()
    # Assert: the same verdicts, accuracies equal to the last bit
    on_worker = miner._own_verdicts[(1, tuple(digests))]
    assert on_worker.keys() == on_loop.keys()
    for cid, (accepted, reason, accuracy) in on_loop.items():
        assert on_worker[cid][:2] == (accepted, reason)
        assert repr(on_worker[cid][2]) == repr(accuracy)


def test_node_status_answers_while_a_round_is_validated(
    miner: Miner, identities: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Prepare: the round's uploads are in; validation is made slow (1.5 s)
    import threading
    import time

    import node.miner
    from node.serving import Endpoint, serve

    digests = upload_distinct_updates(miner, identities)
    miner._own_verdicts.clear()
    real = node.miner.validate_round
    started = threading.Event()
    threads: list[str] = []

    def slow_validate_round(*args: Any, **kwargs: Any) -> Any:
        threads.append(threading.current_thread().name)
        started.set()
        time.sleep(1.5)
        return real(*args, **kwargs)

    monkeypatch.setattr(node.miner, "validate_round", slow_validate_round)
    handler = MinerHandler(miner)
    # The patch reaches a worker thread, not the worker process the miner spawns:
    # stand a thread in for that process (same executor interface, same call).
    handler.processes = ThreadPoolExecutor(1, thread_name_prefix="validate")  # type: ignore[assignment]
    endpoint = Endpoint(
        node_id="miner-1",
        role="miner",
        address="127.0.0.1:0",
        genesis_digest=miner.genesis.digest,
        status=miner.status,
        services={"Miner": MinerServicer(handler)},
    )
    ports: list[int] = []
    answered_in: list[float] = []

    async def main() -> None:
        stop = asyncio.Event()

        async def run() -> None:
            tick = asyncio.create_task(handler.tick())  # finds the round due: validates
            assert await asyncio.to_thread(started.wait, 30), "validation never started"
            async with grpc.aio.insecure_channel(f"127.0.0.1:{ports[0]}") as ch:
                t0 = time.monotonic()
                await pb_grpc.NodeStub(ch).Status(pb.StatusRequest(), timeout=5)
                answered_in.append(time.monotonic() - t0)
            await tick

        await serve([endpoint], stop=stop, run=run, listening=ports.extend)

    # Execute
    try:
        asyncio.run(main())
    finally:
        handler.close()
    # Assert: answered during the validation, which ran once, off the event loop
    assert answered_in[0] < 1.0
    assert len(threads) == 1 and threads[0].startswith("validate")
    assert (1, tuple(digests)) in miner._own_verdicts


def test_the_next_rounds_model_is_aggregated_on_the_worker_once_verdicts_commit(
    miner: Miner, identities: Any
) -> None:
    # Prepare: round 1's uploads, and a committed verdict record accepting them all
    digests = upload_distinct_updates(miner, identities)
    held = {c: upload_of(miner.blobs.get(d, c)) for c, d, _ in digests}  # type: ignore[arg-type]
    own = {c: (True, "accepted", 0.5) for c in held}
    miner.state.apply_record(
        "miner-0", build_verdicts(miner.state, 1, held=held, own=own, malformed={})
    )
    handler = MinerHandler(miner)
    assert not miner.models.known(2)
    # Execute
    try:
        asyncio.run(handler._prepare_next_model())
    finally:
        handler.close()
    # Assert: cached, and equal to an aggregation from scratch
    assert miner.models.known(2)
    expected = GlobalModels(CONFIG).weights(2, miner.state, miner.blobs.update_of)
    got = miner.models.weights(2, miner.state, miner.blobs.update_of)
    assert expected is not None and got is not None
    assert all(torch.equal(expected[k], got[k]) for k in expected)


# Reading updates: only miners and the server, by (digest, client) ----------------


def received_update(miner: Miner, identity: Identity, weights: Any = None) -> ReceivedTensors:
    """``identity``'s round-1 update as a miner's receiver accepts it."""
    return receive_tensor_stream(
        update_parts(identity, weights=weights),
        expected=miner.spec,
        membership=miner.membership,
        kind=UPDATE_KIND,
        max_total_bytes=miner.genesis.protocol.max_stream_bytes,
    )


def fetch_codes(miner: Miner, requests: list[pb.Envelope]) -> list[Any]:
    """For each request: the stream's sender and digest, or the refusal's status code."""
    out: list[Any] = []

    async def body(stub: Any) -> None:
        for request in requests:
            try:
                parts = [p async for p in stub.FetchUpdate(request)]
                out.append((parts[0].header.sender_id, parts[-1].trailer.digest))
            except grpc.aio.AioRpcError as exc:
                out.append(exc.code())

    run_with_miner(miner, body)
    return out


def test_fetch_update_serves_miners_and_the_server_only(miner: Miner, identities: Any) -> None:
    # Prepare: the miner holds a client's update
    cid = selected(miner)[0]
    held = received_update(miner, identities[cid])
    miner.blobs.put(held)
    key = (held.digest, cid)
    stranger = Identity.generate(node_id="miner-0", role="miner", seed=b"\x09" * 32)
    fresh = fetch_request(identities["miner-0"], key, now_ms=NOW_MS)
    requests = [
        fresh,
        fetch_request(identities["server"], key, now_ms=NOW_MS - 59_000),
        fetch_request(identities[cid], key, now_ms=NOW_MS),  # a client, even the sender
        fetch_request(stranger, key, now_ms=NOW_MS),  # a key outside the genesis
        fetch_request(identities["miner-0"], key, now_ms=NOW_MS - 61_000),  # stale
        fetch_request(identities["miner-0"], key, now_ms=NOW_MS + 61_000),  # from the future
        # the right request, signed as another kind of message
        identities["miner-0"].sign("model-request", fresh.payload),
    ]
    # Execute
    codes = fetch_codes(miner, requests)
    # Assert
    assert codes == [
        (cid, held.digest),
        (cid, held.digest),
        grpc.StatusCode.PERMISSION_DENIED,
        grpc.StatusCode.UNAUTHENTICATED,
        grpc.StatusCode.PERMISSION_DENIED,
        grpc.StatusCode.PERMISSION_DENIED,
        grpc.StatusCode.UNAUTHENTICATED,
    ]


def test_fetch_update_names_the_client_as_well_as_the_digest(miner: Miner, identities: Any) -> None:
    # Prepare: one client's update held; the other selected client never sent one
    sender, other = selected(miner)
    held = received_update(miner, identities[sender])
    miner.blobs.put(held)
    # Execute
    codes = fetch_codes(
        miner,
        [
            fetch_request(identities["miner-0"], (held.digest, other), now_ms=NOW_MS),
            fetch_request(identities["miner-0"], (held.digest, sender), now_ms=NOW_MS),
        ],
    )
    # Assert: the same digest under another client is not that client's update
    assert codes == [grpc.StatusCode.NOT_FOUND, (sender, held.digest)]


def second_miner(genesis: Genesis, identities: Any, directory: Path, of: Miner) -> Miner:
    """miner-0 (the primary of view 0), with ``of``'s validation set, in ``directory``."""
    directory.mkdir()
    return Miner(
        genesis,
        identities["miner-0"],
        db_path=directory / "chain.db",
        run_dir=directory,
        validation=of.validation,
        log=NodeLog("miner-0", directory / "log"),
    )


def test_a_miner_holding_a_digest_under_one_client_fetches_it_under_another(
    registering_miner: Miner, small_genesis: Genesis, identities: Any, tmp_path: Path
) -> None:
    # Prepare: two miners on one chain, round 1 selected; both selected clients
    # sent the same bytes D. miner-1 holds D from the first client only,
    # miner-0 (the primary) from both, and proposes the round's verdicts.
    x = registering_miner
    y = second_miner(small_genesis, identities, tmp_path / "m0", of=x)
    registrations = [(c.node_id, registration_of(c.node_id)) for c in x.genesis.membership.clients]
    y.state.apply_block(commit(x.state, registrations))
    for m in (x, y):
        m.state.apply_record("server", m.state.expected_selection(1))
    first, second = selected(x)
    a, b = received_update(x, identities[first]), received_update(x, identities[second])
    assert a.digest == b.digest
    x.blobs.put(a)
    y.blobs.put(a)
    y.blobs.put(b)
    key = [(c, a.digest, y.state.released_records(c)) for c in (first, second)]
    held = {c: upload_of(y.blobs.get(d, c)) for c, d, _ in key}  # type: ignore[arg-type]
    record = build_verdicts(
        y.state, 1, held=held, own=y._own_validation(y.state, 1, key), malformed={}
    )
    block = block_with(x, identities["miner-0"], record)
    proposal = PrePrepare(view=0, height=block.height, block=block, sender=0)
    handler = MinerHandler(x)
    wanted = handler.fetcher.wanted_by(proposal)
    vote_without = x._validate(block)

    async def fetch_from_primary(channel_to_y: Any) -> None:
        x.peers = {0: PeerLink(channel_to_y, identities["miner-1"])}
        await handler.fetcher.fetch(wanted, prefer=0)

    # Execute: miner-1 fetches what it lacks from miner-0, then judges the block
    try:
        run_with_address(y, fetch_from_primary)
    finally:
        handler.close()
        y.store.close()
    vote = x._validate(block)
    # Assert: it lacked the second client's blob although it held the digest,
    # fetched that client's signed stream, and votes for the block
    assert wanted == [(a.digest, second)]
    assert vote_without is False
    fetched = x.blobs.get(a.digest, second)
    assert fetched is not None and fetched.sender.node_id == second
    assert vote is True
    assert [u.accepted for u in record.updates] == [False, False]
    assert all(u.reason.startswith("copy: the same update as") for u in record.updates)


def run_with_address(miner: Miner, body: Callable[[str], Awaitable[None]]) -> None:
    """``body(address)`` while ``miner``'s Miner service listens on 127.0.0.1, port 0."""

    async def main() -> None:
        server = grpc.aio.server()
        add_servicer(server, "Miner", MinerServicer(MinerHandler(miner)))
        port = server.add_insecure_port("127.0.0.1:0")
        await server.start()
        try:
            await body(f"127.0.0.1:{port}")
        finally:
            await server.stop(None)

    asyncio.run(main())


def test_an_update_for_round_0_while_no_round_is_open_is_refused(
    registering_miner: Miner, identities: Any
) -> None:
    # Prepare: registrations are open (no round); a client's stream names round 0
    parts = update_parts(identities["client-000"], rnd=0)
    # Execute / Assert: refused as another round, not an internal error
    expect_refusal(registering_miner, parts, grpc.StatusCode.FAILED_PRECONDITION)
