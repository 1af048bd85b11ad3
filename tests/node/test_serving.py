"""node.serving on real grpc.aio servers (127.0.0.1, free ports): serve() and error mapping.

Every domain exception a handler raises reaches the caller as its status
code with a one-line message; anything unexpected as INTERNAL with a fixed
message, its traceback only in the node's log.
"""

from __future__ import annotations

import asyncio
import gc
import logging
import time
import weakref
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import grpc
import pytest
from google.protobuf.message import DecodeError
from grpc_health.v1 import health_pb2, health_pb2_grpc

from consensus.canonical import MalformedMessage
from node.daemon import NodeLog
from node.errors import (
    INTERNAL_DETAIL,
    Busy,
    Duplicate,
    InvalidRequest,
    NotFound,
    NotPermitted,
    NotReady,
    TooSlow,
    WrongState,
    status_of,
)
from node.identity import AuthError
from node.serving import (
    GRACE_SECONDS,
    Endpoint,
    SenderRate,
    StatusInfo,
    add_servicer,
    bounded_parts,
    listen_address,
    serve,
)
from node.tensor_receiver import UpdateRejected
from proto import llbcfl_pb2 as pb
from proto import llbcfl_pb2_grpc as pb_grpc

Code = grpc.StatusCode
DOMAIN_ERRORS = [
    (InvalidRequest("bad request"), Code.INVALID_ARGUMENT),
    (NotPermitted("not selected"), Code.PERMISSION_DENIED),
    (WrongState("round 3 is not open"), Code.FAILED_PRECONDITION),
    (Duplicate("already sent"), Code.ALREADY_EXISTS),
    (NotReady("model not yet known"), Code.UNAVAILABLE),
    (NotFound("no such update"), Code.NOT_FOUND),
    (Busy("client-001 already has an update stream open"), Code.RESOURCE_EXHAUSTED),
    (TooSlow("no stream message for 10 s"), Code.DEADLINE_EXCEEDED),
    (AuthError("wrong-role", "a miner is not a client"), Code.PERMISSION_DENIED),
    (AuthError("unknown-signer", "signer is not a member"), Code.UNAUTHENTICATED),
    (AuthError("bad-signature", "bad signature"), Code.UNAUTHENTICATED),
    (AuthError("wrong-kind", "not a model request"), Code.UNAUTHENTICATED),
    (MalformedMessage("truncated field"), Code.INVALID_ARGUMENT),
    (DecodeError("Error parsing message"), Code.INVALID_ARGUMENT),
    (UpdateRejected(Code.RESOURCE_EXHAUSTED, "stream too large"), Code.RESOURCE_EXHAUSTED),
    (UpdateRejected(Code.UNAUTHENTICATED, "claim does not match"), Code.UNAUTHENTICATED),
]
IDS = [f"{type(e).__name__}-{c.name}" for e, c in DOMAIN_ERRORS]


class Raising:
    """A Node servicer whose Status raises ``exc`` (a handler's error, as the servicer sees it)."""

    def __init__(self, exc: Exception) -> None:
        self.exc = exc

    async def Status(self, request: pb.StatusRequest, context: Any) -> pb.NodeStatus:
        raise self.exc


def call_status(servicer: Any, log: NodeLog | None = None) -> grpc.aio.AioRpcError:
    async def main() -> grpc.aio.AioRpcError:
        server = grpc.aio.server()
        add_servicer(server, "Node", servicer, log=log)
        port = server.add_insecure_port("127.0.0.1:0")
        await server.start()
        try:
            async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as ch:
                with pytest.raises(grpc.aio.AioRpcError) as info:
                    await pb_grpc.NodeStub(ch).Status(pb.StatusRequest(), timeout=10)
            return info.value
        finally:
            await server.stop(None)

    return asyncio.run(main())


@pytest.mark.parametrize(("exc", "code"), DOMAIN_ERRORS, ids=IDS)
def test_each_domain_error_has_its_status(exc: Exception, code: grpc.StatusCode) -> None:
    status = status_of(exc)
    assert status is not None and status[0] == code
    assert "Traceback" not in status[1] and "\n" not in status[1]


@pytest.mark.parametrize(("exc", "code"), DOMAIN_ERRORS, ids=IDS)
def test_a_servicer_error_reaches_the_caller_as_its_status(
    exc: Exception, code: grpc.StatusCode
) -> None:
    error = call_status(Raising(exc))
    assert error.code() == code
    assert "Traceback" not in (error.details() or "")


def test_messages_are_one_short_line() -> None:
    error = call_status(Raising(WrongState("first line " + "x" * 500 + "\nsecond line")))
    details = error.details() or ""
    assert error.code() == Code.FAILED_PRECONDITION
    assert details.startswith("first line") and "second" not in details
    assert len(details) <= 200


def test_an_unexpected_error_is_internal_and_logged_not_told(tmp_path: Path) -> None:
    # Prepare
    log_file = tmp_path / "node.log"
    log = NodeLog("serving-test", log_file)
    secret = "secret detail of /srv/node/state"
    # Execute
    error = call_status(Raising(KeyError(secret)), log=log)
    # Assert: the caller learns nothing internal; the node's log has the traceback
    assert error.code() == Code.INTERNAL
    assert error.details() == INTERNAL_DETAIL
    logged = log_file.read_text()
    assert "Node/Status: unexpected KeyError" in logged
    assert "Traceback" in logged and secret in logged


def test_an_undecodable_request_is_invalid_argument() -> None:
    async def main() -> grpc.aio.AioRpcError:
        server = grpc.aio.server()
        add_servicer(server, "Node", Raising(AssertionError("never called")))
        port = server.add_insecure_port("127.0.0.1:0")
        await server.start()
        try:
            async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as ch:
                with pytest.raises(grpc.aio.AioRpcError) as info:
                    await ch.unary_unary("/llbcfl.v1.Node/Status")(b"\xff\xff\xff\xff")
            return info.value
        finally:
            await server.stop(None)

    error = asyncio.run(main())
    assert error.code() == Code.INVALID_ARGUMENT
    assert error.details() == "malformed StatusRequest protobuf"


# serve() ------------------------------------------------------------------------------


def endpoint(**services: Any) -> Endpoint:
    return Endpoint(
        node_id="miner-0",
        role="miner",
        address="127.0.0.1:0",
        genesis_digest=b"\x07" * 32,
        status=lambda: StatusInfo(
            3, 12, b"\x05" * 32, view=5, peers=(("miner-1", "127.0.0.1:9", False),)
        ),
        services=services,
    )


def run_serving(
    body: Callable[[str, asyncio.Event], Awaitable[None]], *, grace: float = GRACE_SECONDS
) -> float:
    """serve() one endpoint on a free port while ``body(address, stop)`` runs; seconds
    from ``stop`` being set to serve() returning."""

    async def main() -> float:
        stop = asyncio.Event()
        ports: list[int] = []
        stopped_at: list[float] = []

        async def client() -> None:
            while not ports:
                await asyncio.sleep(0.01)
            try:
                await body(f"127.0.0.1:{ports[0]}", stop)
            finally:
                stopped_at.append(time.monotonic())
                stop.set()

        task = asyncio.create_task(client())
        await serve([endpoint()], stop=stop, grace=grace, listening=ports.extend)
        returned = time.monotonic()
        await task
        return returned - stopped_at[0]

    return asyncio.run(main())


def test_serve_answers_node_status_and_health_then_stops() -> None:
    replies: list[Any] = []

    async def body(address: str, stop: asyncio.Event) -> None:
        async with grpc.aio.insecure_channel(address) as ch:
            replies.append(await pb_grpc.NodeStub(ch).Status(pb.StatusRequest(), timeout=5))
            check = health_pb2.HealthCheckRequest(service="")
            replies.append(await health_pb2_grpc.HealthStub(ch).Check(check, timeout=5))

    elapsed = run_serving(body)
    status, health = replies
    assert (status.node_id, status.role, status.round, status.chain_height) == (
        "miner-0",
        pb.ROLE_MINER,
        3,
        12,
    )
    assert status.head_hash == b"\x05" * 32 and status.genesis_digest == b"\x07" * 32
    assert status.HasField("view") and status.view == 5
    assert [(p.node_id, p.address, p.connected) for p in status.peers] == [
        ("miner-1", "127.0.0.1:9", False)
    ]
    assert health.status == health_pb2.HealthCheckResponse.SERVING
    assert elapsed < 1.0  # nothing open: no need to wait for the grace period


def test_serve_stops_within_the_grace_period_despite_an_open_stream() -> None:
    # A health Watch stream never ends by itself (as a peer's Miner/Deliver stream)
    grace = 0.5

    async def main() -> tuple[float, list[Any], Any]:
        stop = asyncio.Event()
        ports: list[int] = []
        updates: list[Any] = []
        serving = asyncio.create_task(
            serve([endpoint()], stop=stop, grace=grace, listening=ports.extend)
        )
        while not ports:
            await asyncio.sleep(0.01)
        async with grpc.aio.insecure_channel(f"127.0.0.1:{ports[0]}") as ch:
            watch = health_pb2_grpc.HealthStub(ch).Watch(health_pb2.HealthCheckRequest())

            async def read() -> Any:
                try:
                    async for update in watch:
                        updates.append(update.status)
                except grpc.aio.AioRpcError as exc:
                    return exc.code()
                return grpc.StatusCode.OK

            reader = asyncio.create_task(read())
            while not updates:
                await asyncio.sleep(0.01)
            started = time.monotonic()
            stop.set()
            await serving
            elapsed = time.monotonic() - started
            ended = await asyncio.wait_for(reader, 5)
        return elapsed, updates, ended

    elapsed, updates, ended = asyncio.run(main())
    # Serving first, NOT_SERVING once stopping; the open call ends with the server
    assert updates[0] == health_pb2.HealthCheckResponse.SERVING
    assert health_pb2.HealthCheckResponse.NOT_SERVING in updates[1:] or ended != Code.OK
    assert elapsed < grace + 1.0


class Counting(pb_grpc.MinerServicer):
    """A Miner service whose Deliver reads its stream to the end (as the miner's does)."""

    def __init__(self) -> None:
        self.received = 0

    async def Deliver(self, request_iterator: Any, context: Any) -> pb.Ack:
        async for _ in request_iterator:
            self.received += 1
        return pb.Ack(received=self.received)


def test_serve_ends_idle_client_streams_at_once_when_stopping() -> None:
    # A peer's Deliver stream that is open and idle must not hold the stop for the grace
    grace = 5.0
    servicer = Counting()

    async def main() -> tuple[float, Any]:
        stop = asyncio.Event()
        ports: list[int] = []
        idle = asyncio.Event()
        serving = asyncio.create_task(
            serve([endpoint(Miner=servicer)], stop=stop, grace=grace, listening=ports.extend)
        )
        while not ports:
            await asyncio.sleep(0.01)

        async def messages() -> Any:
            yield pb.PbftMessage(data=b"one")
            await idle.wait()  # then nothing more, for ever

        async with grpc.aio.insecure_channel(f"127.0.0.1:{ports[0]}") as ch:
            call = asyncio.ensure_future(pb_grpc.MinerStub(ch).Deliver(messages()))
            while servicer.received == 0:
                await asyncio.sleep(0.01)
            started = time.monotonic()
            stop.set()
            await serving
            elapsed = time.monotonic() - started
            try:
                await asyncio.wait_for(call, 5)
                code = Code.OK
            except grpc.aio.AioRpcError as exc:
                code = exc.code()
        return elapsed, code

    elapsed, code = asyncio.run(main())
    assert elapsed < 1.0
    assert code == Code.UNAVAILABLE


async def _parts(gaps: list[float]) -> Any:
    """A client stream whose i-th item comes after ``gaps[i]`` seconds."""
    for index, gap in enumerate(gaps):
        await asyncio.sleep(gap)  # the stream's own pacing, not a race
        yield index


async def _collect(parts: Any, seen: list[int]) -> None:
    async for item in parts:
        seen.append(item)


@pytest.mark.parametrize(
    ("gaps", "idle", "total", "seen", "reason"),
    [
        ([0.0, 0.0, 0.0], 0.5, 5.0, [0, 1, 2], None),
        ([0.0, 2.0], 0.2, 5.0, [0], "no stream message"),  # a stalled stream
        ([0.0] + [0.2] * 9, 1.0, 0.5, [0], "open longer"),  # a trickle, each gap < idle
    ],
    ids=["prompt", "idle", "trickle"],
)
def test_bounded_parts_end_idle_and_trickling_streams(
    gaps: list[float], idle: float, total: float, seen: list[int], reason: str | None
) -> None:
    # Execute
    got: list[int] = []

    async def main() -> None:
        await _collect(bounded_parts(_parts(gaps), idle=idle, total=total), got)

    if reason is None:
        asyncio.run(main())
    else:
        with pytest.raises(TooSlow, match=reason):
            asyncio.run(main())
    # Assert: everything before the cut, in order (a trickle is cut part-way)
    assert got[: len(seen)] == seen and got == list(range(len(got)))
    assert len(got) == len(seen) if reason != "open longer" else len(got) < len(gaps)


class _Held:
    """Stands for a large request a refused handler had in its frame."""


class RefusingWithAFrame:
    """A Node servicer whose Status holds a :class:`_Held` in its frame, then refuses."""

    def __init__(self) -> None:
        self.held: list[weakref.ref] = []

    async def Status(self, request: pb.StatusRequest, context: Any) -> pb.NodeStatus:
        request_data = _Held()
        self.held.append(weakref.ref(request_data))
        raise InvalidRequest("refused")


def test_a_refused_call_frees_its_request_without_a_garbage_collection() -> None:
    # Prepare: no cyclic collection may run during the calls
    servicer = RefusingWithAFrame()
    gc.collect()
    gc.disable()
    try:
        # Execute
        errors = [call_status(servicer) for _ in range(3)]
        # Assert: refused, and what the handler held is gone by reference counting
        assert {e.code() for e in errors} == {Code.INVALID_ARGUMENT}
        assert [ref() for ref in servicer.held] == [None, None, None]
    finally:
        gc.enable()


@pytest.mark.parametrize("raw", [b"\xff\xff\xff", b"\x0a\x05ab"], ids=["garbage", "truncated"])
def test_an_undecodable_health_check_is_invalid_argument_without_a_traceback(
    raw: bytes, caplog: pytest.LogCaptureFixture
) -> None:
    # Prepare: the raw bytes go out as they are
    codes: list[Any] = []

    async def body(address: str, stop: asyncio.Event) -> None:
        async with grpc.aio.insecure_channel(address) as ch:
            check = ch.unary_unary("/grpc.health.v1.Health/Check")
            with pytest.raises(grpc.aio.AioRpcError) as info:
                await check(raw, timeout=5)
            codes.append((info.value.code(), info.value.details()))
            empty = await health_pb2_grpc.HealthStub(ch).Check(health_pb2.HealthCheckRequest())
            codes.append(empty.status)

    # Execute
    with caplog.at_level(logging.DEBUG):
        run_serving(body)
    # Assert: refused plainly, an empty request still answered, nothing logged with a traceback
    assert codes[0] == (Code.INVALID_ARGUMENT, "malformed HealthCheckRequest protobuf")
    assert codes[1] == health_pb2.HealthCheckResponse.SERVING
    assert not [r for r in caplog.records if r.exc_info or "Traceback" in r.getMessage()]


def test_sender_rate_refuses_a_burst_beyond_its_bound_and_refills_with_time() -> None:
    # Prepare: 2 a second, bursts of 3, on a clock the test moves
    now = [0.0]
    rate = SenderRate(rate=2.0, burst=3, clock=lambda: now[0])
    # Execute: a burst of 3 passes, the 4th is refused; another sender is not affected
    for _ in range(3):
        rate.take("client-001")
    with pytest.raises(Busy, match="more than 2 requests a second"):
        rate.take("client-001")
    rate.take("client-002")
    # Assert: half a second later one more passes, and only one
    now[0] += 0.5
    rate.take("client-001")
    with pytest.raises(Busy):
        rate.take("client-001")


@pytest.mark.parametrize(
    ("advertised", "bind_host", "expected"),
    [
        ("198.18.0.5:50051", None, "198.18.0.5:50051"),
        ("198.18.0.5:50051", "0.0.0.0", "0.0.0.0:50051"),
        ("node-a.lan:7000", "127.0.0.1", "127.0.0.1:7000"),
        ("[fd00::5]:7000", "::", "[::]:7000"),
    ],
)
def test_a_node_listens_on_its_bind_host_with_the_advertised_port(
    advertised: str, bind_host: str | None, expected: str
) -> None:
    assert listen_address(advertised, bind_host) == expected
