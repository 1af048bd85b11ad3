"""The gRPC transport every daemon shares: options, channels, servicer wrapping, ``serve``.

A daemon is ``serve(endpoints, stop=..., run=driver)``: for each endpoint
(a node id, role and genesis address with the role's servicers) it starts a
``grpc.aio`` server with :data:`SERVER_OPTIONS`, the role's services, the
``Node`` status service and the standard gRPC health service; then it runs
the role's driver; when the driver returns (SIGINT or SIGTERM set ``stop``:
``node.daemon.run_until_signal``) or fails, health turns NOT_SERVING and every
server stops with a grace period of :data:`GRACE_SECONDS`: client streams
idle at that moment end at once (UNAVAILABLE), other calls have the grace
period to finish before they are cancelled (:class:`Calls`).

Servicers are registered with :func:`add_servicer`, which wraps every method:
it parses the request bytes itself (an undecodable protobuf is refused with
INVALID_ARGUMENT rather than gRPC's generic UNKNOWN) and turns what the
handler raises into a status with ``node.errors.status_of``: domain errors
give their code and a one-line message, anything else INTERNAL with
"internal error" (the traceback goes to the node's log, never to the caller).
"""

from __future__ import annotations

import asyncio
import contextlib
import ctypes
import ctypes.util
import gc
import logging
import time
from collections.abc import Awaitable, Callable, Mapping, Sequence
from dataclasses import dataclass, field
from functools import cached_property
from typing import Any, Final, NoReturn

import grpc
from grpc_health.v1 import health, health_pb2

from node.daemon import NodeLog
from node.errors import INTERNAL_DETAIL, Busy, NotPermitted, NotReady, TooSlow, decode, status_of
from node.membership import Membership
from node.metrics import REFUSED
from node.tls import NodeTls
from proto import llbcfl_pb2 as pb

ROLE_ENUM: Final = {"client": pb.ROLE_CLIENT, "miner": pb.ROLE_MINER, "server": pb.ROLE_SERVER}
# Tensor chunks are at most 1 MiB (node.tensors.CHUNK_BYTES); PBFT messages,
# envelopes and block batches are far below this bound.
MAX_MESSAGE_BYTES: Final = 4 << 20
GRACE_SECONDS: Final = 1.0
SERVER_OPTIONS: Final = [
    ("grpc.max_send_message_length", MAX_MESSAGE_BYTES),
    ("grpc.max_receive_message_length", MAX_MESSAGE_BYTES),
    # Ping an idle connection every 30 s and drop it if the ping goes
    # unanswered for 10 s: a peer that vanished (power, network) releases its
    # long-lived Miner/Deliver stream instead of holding it forever.
    ("grpc.keepalive_time_ms", 30_000),
    ("grpc.keepalive_timeout_ms", 10_000),
    # Concurrent calls on one connection (each peer, client or follower opens
    # its own); the rest queue in HTTP/2 flow control.
    ("grpc.max_concurrent_streams", 100),
    # A connection with no call for 5 minutes is closed (peers reconnect).
    ("grpc.max_connection_idle_ms", 300_000),
    # A client that pings more often than every 10 s without sending data
    # gets GOAWAY after two such pings (ping floods cost the server).
    ("grpc.http2.min_ping_interval_without_data_ms", 10_000),
    ("grpc.http2.max_ping_strikes", 2),
]
CHANNEL_OPTIONS: Final = [
    ("grpc.max_send_message_length", MAX_MESSAGE_BYTES),
    ("grpc.max_receive_message_length", MAX_MESSAGE_BYTES),
    # A restarted peer must be reachable again within a second, not after
    # gRPC's default reconnect backoff (up to 120 s), shared by every channel
    # to the same address unless each channel keeps its own subchannels.
    ("grpc.use_local_subchannel_pool", 1),
    ("grpc.initial_reconnect_backoff_ms", 200),
    ("grpc.min_reconnect_backoff_ms", 200),
    ("grpc.max_reconnect_backoff_ms", 1000),
]
# Inbound tensor streams (SubmitUpdate): the longest wait for the next part
# (the header included), and the longest a whole stream may stay open. An
# idle or trickling stream ends with DEADLINE_EXCEEDED and frees what it held.
STREAM_IDLE_SECONDS: Final = 10.0
STREAM_MAX_SECONDS: Final = 120.0
_fallback_log = logging.getLogger("llbcfl.serving")
# Refusals since memory was last reclaimed (see reclaim_memory).
_refused = 0
RECLAIM_SECONDS: Final = 1.0


def _malloc_trim() -> Callable[[], None]:
    """glibc's ``malloc_trim(0)`` (gives freed heap pages back to the system), else a no-op."""
    name = ctypes.util.find_library("c")
    try:
        trim = ctypes.CDLL(name).malloc_trim if name else None
    except (OSError, AttributeError):
        trim = None
    return (lambda: trim(0)) if trim is not None else (lambda: None)


async def reclaim_memory(stop: asyncio.Event, *, every: float = RECLAIM_SECONDS) -> None:
    """After refused calls, a full garbage collection and ``malloc_trim``, once per ``every`` s.

    A refused call can leave its request (megabytes) in reference cycles of
    asyncio tasks and gRPC's call objects, which only a full collection
    frees; large buffers freed by many threads then stay in glibc's arenas.
    Under a flood of refused requests a node would keep hundreds of MB it
    no longer uses; this gives them back, and costs nothing while nothing
    is refused.
    """
    global _refused
    trim = _malloc_trim()
    due = 0  # passes left: a few more after the last refusal, for what is freed late
    while not stop.is_set():
        with contextlib.suppress(asyncio.TimeoutError):
            await asyncio.wait_for(stop.wait(), every)
        if _refused:
            _refused, due = 0, 5
        if due:
            due -= 1
            gc.collect()
            trim()


async def bounded_parts(
    parts: Any, *, idle: float = STREAM_IDLE_SECONDS, total: float = STREAM_MAX_SECONDS
) -> Any:
    """The items of a client stream, each within ``idle`` s, all within ``total`` s.

    Raises :class:`~node.errors.TooSlow` (DEADLINE_EXCEEDED) otherwise.
    """
    loop = asyncio.get_running_loop()
    end = loop.time() + total
    iterator = aiter(parts)
    while True:
        left = end - loop.time()
        wait = min(idle, left)
        try:
            if wait <= 0:
                raise asyncio.TimeoutError
            item = await asyncio.wait_for(anext(iterator), wait)
        except StopAsyncIteration:
            return
        except asyncio.TimeoutError:
            if wait < idle:
                raise TooSlow(f"stream open longer than {total:.0f} s") from None
            raise TooSlow(f"no stream message for {idle:.0f} s") from None
        yield item


def listen_address(advertised: str, bind_host: str | None) -> str:
    """Where to listen: the genesis (advertised) address, or its port on ``bind_host``.

    The genesis holds the address the other nodes dial; a host behind one
    interface of several, or in a container, listens on another one (e.g.
    ``0.0.0.0``) with the same port.
    """
    if not bind_host:
        return advertised
    _, _, port = advertised.rpartition(":")
    host = f"[{bind_host}]" if ":" in bind_host and not bind_host.startswith("[") else bind_host
    return f"{host}:{port}"


# Which roles may call each method once mutual TLS has named the caller
# (node.tls); a method not listed is open to every member.
EVERY_ROLE: Final = frozenset({"client", "miner", "server"})
METHOD_ROLES: Final[Mapping[str, frozenset[str]]] = {
    "Miner/Deliver": frozenset({"miner"}),
    "Miner/Submit": EVERY_ROLE,
    "Miner/SubmitUpdate": frozenset({"client"}),
    "Miner/FetchUpdate": frozenset({"miner", "server"}),
    "Miner/FetchBlocks": EVERY_ROLE,
    "Server/DownloadModel": frozenset({"client"}),
    "Server/Attend": frozenset({"client"}),
    "Node/Status": EVERY_ROLE,
    "Health/Check": EVERY_ROLE,
    "Health/List": EVERY_ROLE,
    "Health/Watch": EVERY_ROLE,
}


@dataclass(frozen=True)
class Transport:
    """Mutual TLS for this process: its certificate, and who is at which genesis address."""

    tls: NodeTls
    membership: Membership

    @cached_property
    def names(self) -> dict[str, str]:
        """Listening address -> the node id whose certificate must answer there."""
        return {n.address: n.node_id for n in self.membership.nodes if n.role != "client"}

    def server_credentials(self) -> grpc.ServerCredentials:
        return grpc.ssl_server_credentials(
            [(self.tls.key, self.tls.cert)],
            root_certificates=self.tls.ca,
            require_client_auth=True,
        )

    def channel_credentials(self) -> grpc.ChannelCredentials:
        return grpc.ssl_channel_credentials(
            root_certificates=self.tls.ca,
            private_key=self.tls.key,
            certificate_chain=self.tls.cert,
        )

    def channel_options(self, address: str) -> list[tuple[str, Any]]:
        node_id = self.names.get(address)
        if node_id is None:
            raise ValueError(f"{address} is no listening node's address in the genesis")
        # The peer's certificate must carry the node id the genesis lists here.
        return [*CHANNEL_OPTIONS, ("grpc.ssl_target_name_override", node_id)]

    def admit(self, where: str, context: Any) -> None:
        """Refuse a caller whose certificate names no member whose role ``where`` admits."""
        names = context.auth_context().get("x509_common_name") or []
        if len(names) != 1:
            raise NotPermitted("no client certificate of this network")
        node_id = names[0].decode("utf-8", "replace")
        member = self.membership.get(node_id)
        if member is None:
            raise NotPermitted(f"{node_id!r} is not a member of this network")
        allowed = METHOD_ROLES.get(where, EVERY_ROLE)
        if member.role not in allowed:
            raise NotPermitted(f"{where} is not open to {member.role}s ({node_id})")


# This process's transport: None is plaintext gRPC (--insecure networks, and tests).
_transport: Transport | None = None


def use_transport(transport: Transport | None) -> None:
    """Serve and dial with ``transport`` (mutual TLS) from now on; None: plaintext."""
    global _transport
    _transport = transport


def current_transport() -> Transport | None:
    return _transport


def channel(address: str) -> grpc.aio.Channel:
    """A channel to a genesis address: mutual TLS when the process uses it."""
    if _transport is None:
        return grpc.aio.insecure_channel(address, options=CHANNEL_OPTIONS)
    return grpc.aio.secure_channel(
        address, _transport.channel_credentials(), options=_transport.channel_options(address)
    )


class ChannelPool:
    """One channel per peer address, kept open and shared by every call to that peer
    (a client process's identities, the server's submissions): one connection,
    and one TLS handshake, per peer. ``async with pool.get(address) as ch`` does
    not close it; :meth:`close` closes them all (the owner, at its end)."""

    def __init__(self) -> None:
        self._channels: dict[str, grpc.aio.Channel] = {}

    def get(self, address: str) -> contextlib.AbstractAsyncContextManager[grpc.aio.Channel]:
        ch = self._channels.get(address)
        if ch is None:
            ch = self._channels[address] = channel(address)
        return contextlib.nullcontext(ch)  # type: ignore[return-value]

    async def close(self) -> None:
        channels, self._channels = list(self._channels.values()), {}
        for ch in channels:
            await ch.close()


def sync_channel(address: str) -> grpc.Channel:
    """:func:`channel` for synchronous callers (the launcher, benches)."""
    if _transport is None:
        return grpc.insecure_channel(address, options=CHANNEL_OPTIONS)
    return grpc.secure_channel(
        address, _transport.channel_credentials(), options=_transport.channel_options(address)
    )


class SenderRate:
    """A token bucket per authenticated sender: ``rate`` requests a second, bursts of ``burst``.

    Checked after a request's signature (an outsider has no bucket to
    drain); what goes over is refused with :class:`~node.errors.Busy`.
    """

    def __init__(
        self, *, rate: float, burst: int, clock: Callable[[], float] = time.monotonic
    ) -> None:
        self.rate = rate
        self.burst = burst
        self._clock = clock
        self._tokens: dict[str, tuple[float, float]] = {}  # sender -> (tokens, at)

    def take(self, sender: str) -> None:
        now = self._clock()
        tokens, at = self._tokens.get(sender, (float(self.burst), now))
        tokens = min(float(self.burst), tokens + (now - at) * self.rate)
        if tokens < 1.0:
            self._tokens[sender] = (tokens, now)
            raise Busy(f"{sender} sends more than {self.rate:g} requests a second; retry later")
        self._tokens[sender] = (tokens - 1.0, now)


@dataclass(frozen=True)
class StatusInfo:
    """What ``Node.Status`` reports besides who the node is."""

    round: int  # the federated round this node is in (0 before the first)
    height: int  # committed blocks it holds
    head: bytes = b""  # the last block's hash
    view: int | None = None  # miners: the PBFT view
    peers: tuple[tuple[str, str, bool], ...] = ()  # miners: (node id, address, link up)
    read_only: bool = False  # its disk is full: it refuses writes (node.full_disk)


class NodeStatusServicer:
    """``Node.Status`` from a callable returning a :class:`StatusInfo`."""

    def __init__(
        self,
        *,
        node_id: str,
        role: str,
        genesis_digest: bytes,
        status: Callable[[], StatusInfo],
    ) -> None:
        self._node_id = node_id
        self._role = ROLE_ENUM[role]
        self._genesis = genesis_digest
        self._status = status

    async def Status(self, request: pb.StatusRequest, context: Any) -> pb.NodeStatus:
        info = self._status()
        reply = pb.NodeStatus(
            node_id=self._node_id,
            role=self._role,
            round=info.round,
            chain_height=info.height,
            head_hash=info.head,
            genesis_digest=self._genesis,
            peers=[pb.PeerState(node_id=n, address=a, connected=c) for n, a, c in info.peers],
            read_only=info.read_only,
        )
        if info.view is not None:
            reply.view = info.view
        return reply


# Servicer wrapping: decode, call, map errors --------------------------------------


def refusal(exc: Exception, *, where: str, log: NodeLog | None) -> tuple[grpc.StatusCode, str]:
    """The status for ``exc`` (``node.errors``); what was unexpected is logged in full.

    Call it inside the ``except`` block and end the call outside it
    (:func:`refuse`): an abort raised while ``exc`` is being handled would
    chain to it, and through its traceback keep the handler's frames (a
    refused 3.5 MiB message among their locals) alive until a full garbage
    collection.
    """
    status = status_of(exc)
    if status is None:
        message = f"{where}: unexpected {type(exc).__name__}"
        if log is not None:
            log.exception(message)
        else:
            _fallback_log.error(message, exc_info=exc)
        status = (grpc.StatusCode.INTERNAL, INTERNAL_DETAIL)
    return status


async def refuse(context: Any, status: tuple[grpc.StatusCode, str]) -> NoReturn:
    """End the call with ``status`` (outside any ``except`` block: see :func:`refusal`)."""
    await context.abort(*status)
    raise AssertionError("context.abort returned")  # pragma: no cover


class Calls:
    """The calls one server is handling, and whether it is stopping.

    A stopping server ends client streams that wait for their next message
    with UNAVAILABLE (a peer's ``Miner/Deliver`` stream never ends by
    itself), so the grace period is not spent on them; ``serve`` then waits
    for the handlers still running before it returns, so none is left for
    the event loop's shutdown to cancel (grpc logs those as
    "Exception not handled ... CancelledError").
    """

    def __init__(self) -> None:
        self.tasks: set[asyncio.Task] = set()
        self.stopping = asyncio.Event()

    def track(self) -> None:
        task = asyncio.current_task()
        if task is not None:
            self.tasks.add(task)
            task.add_done_callback(self.tasks.discard)

    async def until_stopping(self, items: Any) -> Any:
        """The items of a client stream while the server is not stopping."""
        iterator = aiter(items)
        stopping = asyncio.ensure_future(self.stopping.wait())
        following: asyncio.Future | None = None
        try:
            while True:
                following = asyncio.ensure_future(anext(iterator))
                # Its outcome is read below, or no longer wanted (the call ended).
                following.add_done_callback(_outcome_read)
                await asyncio.wait({following, stopping}, return_when=asyncio.FIRST_COMPLETED)
                if not following.done():
                    raise NotReady("the node is stopping")
                try:
                    item = following.result()
                except StopAsyncIteration:
                    return
                yield item
        finally:
            stopping.cancel()
            if following is not None and not following.done():
                following.cancel()


def _outcome_read(future: asyncio.Future) -> None:
    if not future.cancelled():
        future.exception()


def _method_handler(
    method: Any,
    impl: Callable[..., Any],
    log: NodeLog | None,
    calls: Calls | None,
    messages: Any = pb,
) -> Any:
    request_cls = getattr(messages, method.input_type.name)
    serialize = getattr(messages, method.output_type.name).SerializeToString
    what = f"{method.input_type.name} protobuf"
    where = f"{method.containing_service.name}/{method.name}"

    def admit(context: Any) -> None:
        if _transport is not None:
            _transport.admit(where, context)

    def parse(raw: bytes) -> Any:
        if calls is not None:
            calls.track()
        return decode(request_cls, raw, what)

    async def requests(raw_iterator: Any) -> Any:
        if calls is not None:
            calls.track()
            raw_iterator = calls.until_stopping(raw_iterator)
        async for raw in raw_iterator:
            yield decode(request_cls, raw, what)

    def failed(exc: Exception) -> tuple[grpc.StatusCode, str] | None:
        """None when the handler aborted by itself (re-raised), else the refusal's status."""
        global _refused
        _refused += 1
        if isinstance(exc, grpc.aio.AbortError):
            return None
        status = refusal(exc, where=where, log=log)
        REFUSED.labels(status[0].name).inc()
        return status

    if method.client_streaming:
        if method.server_streaming:

            async def stream_stream(raw_iterator: Any, context: Any) -> Any:
                try:
                    admit(context)
                    async for item in impl(requests(raw_iterator), context):
                        yield item
                    return
                except Exception as exc:
                    if (status := failed(exc)) is None:
                        raise
                await refuse(context, status)

            return grpc.stream_stream_rpc_method_handler(
                stream_stream, response_serializer=serialize
            )

        async def stream_unary(raw_iterator: Any, context: Any) -> Any:
            try:
                admit(context)
                return await impl(requests(raw_iterator), context)
            except Exception as exc:
                if (status := failed(exc)) is None:
                    raise
            await refuse(context, status)

        return grpc.stream_unary_rpc_method_handler(stream_unary, response_serializer=serialize)
    if method.server_streaming:

        async def unary_stream(raw: bytes, context: Any) -> Any:
            try:
                admit(context)
                async for item in impl(parse(raw), context):
                    yield item
                return
            except Exception as exc:
                if (status := failed(exc)) is None:
                    raise
            await refuse(context, status)

        return grpc.unary_stream_rpc_method_handler(unary_stream, response_serializer=serialize)

    async def unary_unary(raw: bytes, context: Any) -> Any:
        try:
            admit(context)
            return await impl(parse(raw), context)
        except Exception as exc:
            if (status := failed(exc)) is None:
                raise
        await refuse(context, status)

    return grpc.unary_unary_rpc_method_handler(unary_unary, response_serializer=serialize)


def add_servicer(
    server: grpc.aio.Server,
    service: str,
    servicer: Any,
    *,
    log: NodeLog | None = None,
    calls: Calls | None = None,
) -> None:
    """Register ``servicer`` for ``llbcfl.v1.<service>`` (instead of the generated
    ``add_*Servicer_to_server``), each method wrapped as the module docstring says."""
    descriptor = pb.DESCRIPTOR.services_by_name[service]
    handlers = {
        m.name: _method_handler(m, getattr(servicer, m.name), log, calls)
        for m in descriptor.methods
    }
    server.add_generic_rpc_handlers(
        (grpc.method_handlers_generic_handler(descriptor.full_name, handlers),)
    )


class _HealthWatch:
    """``Watch`` of grpc's health servicer (it writes to the context) as an async generator."""

    def __init__(self, servicer: health.aio.HealthServicer) -> None:
        self._servicer = servicer

    async def __call__(self, request: Any, context: Any) -> Any:
        await self._servicer.Watch(request, context)
        return
        yield  # pragma: no cover - makes this an async generator that yields nothing


def add_health(server: grpc.aio.Server, *, log: NodeLog | None = None) -> health.aio.HealthServicer:
    """The standard health service, SERVING (its asyncio version: a ``Watch`` must not
    hold a thread of its own, nor keep the server from stopping).

    Its methods are wrapped like ours (:func:`add_servicer`): an undecodable
    request gets INVALID_ARGUMENT, not gRPC's UNKNOWN with the parser's text
    and a traceback in the log.
    """
    servicer = health.aio.HealthServicer()
    descriptor = health_pb2.DESCRIPTOR.services_by_name["Health"]
    impls = {"Check": servicer.Check, "List": servicer.List, "Watch": _HealthWatch(servicer)}
    handlers = {
        m.name: _method_handler(m, impls[m.name], log, None, messages=health_pb2)
        for m in descriptor.methods
    }
    server.add_generic_rpc_handlers(
        (grpc.method_handlers_generic_handler(descriptor.full_name, handlers),)
    )
    return servicer


# serve() -----------------------------------------------------------------------------


@dataclass(frozen=True)
class Endpoint:
    """One listening node: who it is, where, and the role's servicers by service name."""

    node_id: str
    role: str
    address: str
    genesis_digest: bytes
    status: Callable[[], StatusInfo]
    services: Mapping[str, Any] = field(default_factory=dict)


@dataclass
class _Running:
    server: Any
    health: health.aio.HealthServicer
    calls: Calls
    port: int

    async def stop(self, grace: float) -> None:
        await self.health.enter_graceful_shutdown()
        self.calls.stopping.set()
        await self.server.stop(grace)
        if self.calls.tasks:
            await asyncio.wait(set(self.calls.tasks), timeout=grace)
        for _ in range(3):  # grpc's own task of each call ends right after the handler
            await asyncio.sleep(0)


async def _start(endpoint: Endpoint, log: NodeLog | None) -> _Running:
    server = grpc.aio.server(options=SERVER_OPTIONS)
    calls = Calls()
    for name, servicer in endpoint.services.items():
        add_servicer(server, name, servicer, log=log, calls=calls)
    status = NodeStatusServicer(
        node_id=endpoint.node_id,
        role=endpoint.role,
        genesis_digest=endpoint.genesis_digest,
        status=endpoint.status,
    )
    add_servicer(server, "Node", status, log=log, calls=calls)
    health_servicer = add_health(server, log=log)
    if _transport is None:
        port = server.add_insecure_port(endpoint.address)
    else:
        port = server.add_secure_port(endpoint.address, _transport.server_credentials())
    await server.start()
    return _Running(server, health_servicer, calls, port)


async def serve(
    endpoints: Sequence[Endpoint],
    *,
    stop: asyncio.Event,
    run: Callable[[], Awaitable[None]] | None = None,
    log: NodeLog | None = None,
    grace: float = GRACE_SECONDS,
    listening: Callable[[list[int]], None] | None = None,
    metrics_port: int | None = None,
    metrics_host: str | None = None,
) -> None:
    """Serve ``endpoints`` while ``run()`` runs (without one: until ``stop`` is set).

    With ``metrics_port``, Prometheus metrics (``node.metrics``) are served on
    that port, on ``metrics_host`` (default: the host the first endpoint
    listens on, else 127.0.0.1).

    ``listening`` gets the bound ports once every server has started (port
    0 in an address picks a free one). On return or failure ``stop`` is set
    and every server stops within ``grace`` seconds (:class:`Calls`).
    """
    running: list[_Running] = []
    reclaim = asyncio.create_task(reclaim_memory(stop))
    stop_metrics: Callable[[], None] | None = None
    try:
        if metrics_port is not None:
            from node.metrics import start_metrics_server

            host = metrics_host or (
                endpoints[0].address.rpartition(":")[0].strip("[]") if endpoints else ""
            )
            stop_metrics = start_metrics_server(
                metrics_port,
                host=host or "127.0.0.1",
                endpoints=[(e.node_id, e.status) for e in endpoints],
            )
            if log is not None:
                log.info(f"metrics on http://{host}:{metrics_port}/metrics")
        for endpoint in endpoints:
            running.append(await _start(endpoint, log))
        # What exists now (modules, data, models: 300 000 objects in a miner)
        # lives as long as the node: a full collection (reclaim_memory) need
        # not scan it, which takes it from 135 ms to well under 1 ms.
        gc.freeze()
        if listening is not None:
            listening([r.port for r in running])
        await (stop.wait() if run is None else run())
    finally:
        stop.set()
        await asyncio.gather(*(r.stop(grace) for r in running))
        await reclaim
        if stop_metrics is not None:
            stop_metrics()
