"""What every daemon shares: logging, the Node and health services, signals, chain records.

A daemon is ``serve(role_node)``: start a ``grpc.aio`` server on the node's
genesis address with the role's servicers, the ``Node`` status service and
the standard gRPC health service, run the role's driver, and stop cleanly
(grace period, stores closed) on SIGINT or SIGTERM.
"""

from __future__ import annotations

import asyncio
import logging
import signal
import sys
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import grpc
from google.protobuf.message import DecodeError
from grpc_health.v1 import health, health_pb2, health_pb2_grpc

from chain.records import Record, encode_operation, record_kind_name
from consensus.ledger import Request
from fl.config import RunConfig
from fl.datasets import Splits, load_splits
from node.genesis import Membership
from node.identity import Identity, signing_tag, verify_signature
from proto import llbcfl_pb2 as pb

ROLE_ENUM = {"client": pb.ROLE_CLIENT, "miner": pb.ROLE_MINER, "server": pb.ROLE_SERVER}
GRPC_OPTIONS = [
    ("grpc.max_send_message_length", 4 << 20),
    ("grpc.max_receive_message_length", 4 << 20),
    # A restarted peer must be reachable again within a second, not after
    # gRPC's default reconnect backoff (up to 120 s), shared by every channel
    # to the same address unless each channel keeps its own subchannels.
    ("grpc.use_local_subchannel_pool", 1),
    ("grpc.initial_reconnect_backoff_ms", 200),
    ("grpc.min_reconnect_backoff_ms", 200),
    ("grpc.max_reconnect_backoff_ms", 1000),
]


class NodeLog:
    """Log lines prefixed with ``[node-id r<round>]``."""

    def __init__(self, node_id: str, log_file: Path | None = None) -> None:
        self.node_id = node_id
        self.round = 0
        self._logger = logging.getLogger(f"llbcfl.{node_id}")
        self._logger.setLevel(logging.INFO)
        self._logger.propagate = False
        if not self._logger.handlers:
            handler: logging.Handler = (
                logging.FileHandler(log_file) if log_file else logging.StreamHandler(sys.stderr)
            )
            handler.setFormatter(logging.Formatter("%(asctime)s %(message)s"))
            self._logger.addHandler(handler)

    def _fmt(self, message: str) -> str:
        return f"[{self.node_id} r{self.round}] {message}"

    def info(self, message: str) -> None:
        self._logger.info(self._fmt(message))

    def warning(self, message: str) -> None:
        self._logger.warning(self._fmt("WARNING " + message))

    def error(self, message: str) -> None:
        self._logger.error(self._fmt("ERROR " + message))


def record_verifier(membership: Membership) -> Callable[[str, str, str, bytes, bytes], bool]:
    """``ChainState.check_block(verify=...)``: the submitter's signature over the record."""

    def verify(node_id: str, role: str, kind: str, operation: bytes, signature: bytes) -> bool:
        node = membership.get(node_id)
        if node is None or node.role != role:
            return False
        return verify_signature(node.public_key, signing_tag(kind) + operation, signature)

    return verify


def roles_of(membership: Membership) -> dict[str, str]:
    return {n.node_id: n.role for n in membership}


def signed_record(identity: Identity, record: Record) -> pb.Envelope:
    """The envelope a node submits to the miners (``Miner.Submit``)."""
    operation = encode_operation(record)
    return identity.sign(record_kind_name(record), operation)


def envelope_request(envelope: pb.Envelope, node_id: str) -> Request:
    """The consensus request for a submitted envelope (its timestamp is inside the payload)."""
    timestamp = int.from_bytes(envelope.payload[:8], "big") if len(envelope.payload) >= 8 else 0
    return Request(node_id, timestamp, bytes(envelope.payload), bytes(envelope.signature))


class NodeStatusServicer:
    """``Node.Status`` from a callable returning (round, height, head hash)."""

    def __init__(
        self, *, node_id: str, role: str, genesis_digest: bytes, status: Callable[[], tuple]
    ) -> None:
        self._node_id = node_id
        self._role = ROLE_ENUM[role]
        self._genesis = genesis_digest
        self._status = status

    async def Status(self, request: pb.StatusRequest, context: Any) -> pb.NodeStatus:
        rnd, height, head = self._status()
        return pb.NodeStatus(
            node_id=self._node_id,
            role=self._role,
            round=rnd,
            chain_height=height,
            head_hash=head,
            genesis_digest=self._genesis,
        )


def _parse(cls: Any, raw: bytes) -> Any:
    try:
        return cls.FromString(raw)
    except DecodeError:
        return None


def _checked_handler(method: Any, impl: Callable[..., Any]) -> Any:
    """A method handler that parses requests itself: malformed bytes -> INVALID_ARGUMENT."""
    request_cls = getattr(pb, method.input_type.name)
    serialize = getattr(pb, method.output_type.name).SerializeToString
    bad = f"malformed {method.input_type.name} protobuf"

    async def parsed_stream(raw_iterator: Any, context: Any) -> Any:
        async for raw in raw_iterator:
            message = _parse(request_cls, raw)
            if message is None:
                await context.abort(grpc.StatusCode.INVALID_ARGUMENT, bad)
            yield message

    if method.client_streaming:
        if method.server_streaming:

            async def stream_stream(raw_iterator: Any, context: Any) -> Any:
                async for item in impl(parsed_stream(raw_iterator, context), context):
                    yield item

            return grpc.stream_stream_rpc_method_handler(
                stream_stream, response_serializer=serialize
            )

        async def stream_unary(raw_iterator: Any, context: Any) -> Any:
            return await impl(parsed_stream(raw_iterator, context), context)

        return grpc.stream_unary_rpc_method_handler(stream_unary, response_serializer=serialize)
    if method.server_streaming:

        async def unary_stream(raw: bytes, context: Any) -> Any:
            request = _parse(request_cls, raw)
            if request is None:
                await context.abort(grpc.StatusCode.INVALID_ARGUMENT, bad)
            async for item in impl(request, context):
                yield item

        return grpc.unary_stream_rpc_method_handler(unary_stream, response_serializer=serialize)

    async def unary_unary(raw: bytes, context: Any) -> Any:
        request = _parse(request_cls, raw)
        if request is None:
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, bad)
        return await impl(request, context)

    return grpc.unary_unary_rpc_method_handler(unary_unary, response_serializer=serialize)


def add_servicer(server: grpc.aio.Server, service: str, servicer: Any) -> None:
    """Register ``servicer`` for ``llbcfl.v1.<service>`` (instead of the generated
    ``add_*Servicer_to_server``) so that undecodable requests are refused with
    INVALID_ARGUMENT rather than gRPC's generic UNKNOWN."""
    descriptor = pb.DESCRIPTOR.services_by_name[service]
    handlers = {m.name: _checked_handler(m, getattr(servicer, m.name)) for m in descriptor.methods}
    server.add_generic_rpc_handlers(
        (grpc.method_handlers_generic_handler(descriptor.full_name, handlers),)
    )


def add_health(server: grpc.aio.Server) -> health.HealthServicer:
    servicer = health.HealthServicer()
    health_pb2_grpc.add_HealthServicer_to_server(servicer, server)
    servicer.set("", health_pb2.HealthCheckResponse.SERVING)
    return servicer


def channel(address: str) -> grpc.aio.Channel:
    return grpc.aio.insecure_channel(address, options=GRPC_OPTIONS)


async def run_until_signal(
    main: Callable[[asyncio.Event], Awaitable[None]], *, log: NodeLog | None = None
) -> None:
    """Run ``main(stop)``; SIGINT/SIGTERM set ``stop`` (main must return soon after)."""
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)
    try:
        await main(stop)
    finally:
        if log is not None:
            log.info("stopped")


def load_node_splits(config: RunConfig, data_dir: str | None, *, train: bool) -> Splits:
    """The dataset's splits of a daemon, from ``--data-dir`` or the genesis' data dir.

    Miners use only the validation split and the server only the test split;
    with ``train=False`` they skip the clients' training images (60,000 as
    float32 are 188 MB, about 600 MB at peak while converting).
    """
    return load_splits(config, data_dir=data_dir, train=train)
