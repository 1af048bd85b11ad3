"""The server daemon: the ``Server`` service (model downloads) and the round driver.

:class:`ServerServicer` decodes and streams; :func:`model_for` holds the
rules of a download (a ``model-request`` envelope signed by a client, naming
itself, for the open round, while it is selected) and :func:`attendees`
those of an ``Attend`` stream (each hosted client's signed, fresh
attendance for this network); both raise the refusals of ``node.errors``.
:func:`run_server` serves it with ``node.serving.serve`` and runs
``Server.drive`` until the last round (or a signal).
"""

from __future__ import annotations

import asyncio
import contextlib
from pathlib import Path
from typing import Any

import torch

from fl.weights import Weights
from node.daemon import NodeLog, load_node_splits
from node.errors import InvalidRequest, NotPermitted, WrongState, decode
from node.genesis import Genesis
from node.identity import Identity, verify_envelope
from node.metrics import STREAM_BYTES
from node.offchain import wall_clock_ms
from node.server import ATTEND_KIND, Server, Stopped
from node.serving import Endpoint, StatusInfo, listen_address, serve
from node.tensors import MODEL_KIND, MODEL_REQUEST_KIND, tensor_stream
from proto import llbcfl_pb2 as pb
from proto import llbcfl_pb2_grpc as pb_grpc


def model_for(server: Server, envelope: pb.Envelope) -> tuple[int, Weights]:
    """The open round and its model, for a client's signed model request."""
    signer = verify_envelope(
        envelope, server.membership, expected_kind=MODEL_REQUEST_KIND, allowed_roles=("client",)
    )
    request = decode(pb.ModelRequest, envelope.payload, "model request")
    if request.client_id != signer.node_id:
        raise NotPermitted(f"{signer.node_id} asks for the model as {request.client_id!r}")
    current = server.current
    if current is None or request.round != current[0]:
        raise WrongState(f"round {request.round} is not open")
    rnd, weights, _digest = current
    if request.client_id not in server.state.selections[rnd].selected:
        raise NotPermitted(f"{request.client_id} is not selected")
    return rnd, weights


# An attendance signed longer ago (or later) than this is refused: a copy
# seen on the wire cannot open a stream for long.
ATTEND_FRESH_MS = 5 * 60_000


def attendees(server: Server, request: pb.AttendRequest, *, now_ms: int) -> list[str]:
    """The client ids of an Attend request, each entry signed by that client,
    naming this network, fresh; else the refusals of ``node.errors``."""
    members = server.membership
    if not 0 < len(request.clients) <= len(members.clients):
        raise InvalidRequest(f"an Attend request names 1 to {len(members.clients)} clients")
    cids: list[str] = []
    for envelope in request.clients:
        signer = verify_envelope(
            envelope, members, expected_kind=ATTEND_KIND, allowed_roles=("client",)
        )
        entry = decode(pb.Attendance, envelope.payload, "attendance")
        if entry.client_id != signer.node_id:
            raise NotPermitted(f"{signer.node_id} attends as {entry.client_id!r}")
        if entry.genesis_digest != server.genesis.digest:
            raise InvalidRequest(f"{signer.node_id}'s attendance names another network")
        if abs(now_ms - entry.time_ms) > ATTEND_FRESH_MS:
            raise InvalidRequest(f"{signer.node_id}'s attendance is stale (check its clock)")
        if signer.node_id in cids:
            raise InvalidRequest(f"{signer.node_id} attends twice in one request")
        cids.append(signer.node_id)
    return cids


class ServerServicer(pb_grpc.ServerServicer):
    """The gRPC face: calls :func:`model_for`, streams the model signed by the server."""

    def __init__(self, server: Server) -> None:
        self.s = server

    async def DownloadModel(self, envelope: pb.Envelope, context: Any) -> Any:
        rnd, weights = model_for(self.s, envelope)
        for part in tensor_stream(
            weights,
            identity=self.s.identity,
            kind=MODEL_KIND,
            round=rnd,
            chunk_bytes=self.s.genesis.protocol.chunk_bytes,
        ):
            if part.HasField("chunk"):
                STREAM_BYTES.labels(self.s.identity.node_id, "out").inc(len(part.chunk.data))
            yield part

    async def Attend(self, request: pb.AttendRequest, context: Any) -> Any:
        cids = attendees(self.s, request, now_ms=wall_clock_ms())
        queue: asyncio.Queue[pb.RoundCall | None] = asyncio.Queue()
        self.s.attach(cids, queue)
        self.s.log.info(f"attending: {', '.join(cids)}")
        await context.send_initial_metadata(())  # tells the client it is attached
        try:
            while (call := await queue.get()) is not None:
                yield call
        finally:
            self.s.detach(cids, queue)


async def run_server(
    genesis: Genesis,
    identity: Identity,
    *,
    run_dir: Path,
    data_dir: str | None,
    stop: asyncio.Event,
    log: NodeLog,
    metrics_path: Path,
    exit_when_done: bool = True,
    bind_host: str | None = None,
    metrics_port: int | None = None,
) -> None:
    config = genesis.run
    torch.set_num_threads(config.threads)
    splits = load_node_splits(config, data_dir, train=False)
    server = Server(genesis, identity, run_dir=run_dir, test=splits.test, log=log)
    address = listen_address(genesis.membership[identity.node_id].address, bind_host)
    endpoint = Endpoint(
        node_id=identity.node_id,
        role="server",
        address=address,
        genesis_digest=genesis.digest,
        status=lambda: StatusInfo(
            server.current[0] if server.current else 0,
            server.state.height,
            server.state.head_hash if server.state.height else b"",
            read_only=server.disk.read_only,
        ),
        services={"Server": ServerServicer(server)},
    )

    async def drive() -> None:
        follower = asyncio.create_task(server.follower.follow(stop))
        try:
            driver = asyncio.create_task(server.drive(stop, metrics_path))
            stopper = asyncio.create_task(stop.wait())
            await asyncio.wait({driver, stopper}, return_when=asyncio.FIRST_COMPLETED)
            stopper.cancel()
            if not driver.done():
                driver.cancel()
            with contextlib.suppress(asyncio.CancelledError, Stopped):
                await driver  # re-raises a real failure of the round driver
            if not exit_when_done:
                await stop.wait()
        finally:
            stop.set()
            with contextlib.suppress(asyncio.CancelledError):
                await follower
            await server.channels.close()

    await serve(
        [endpoint],
        stop=stop,
        run=drive,
        log=log,
        listening=lambda _ports: log.info(f"server listening on {address}"),
        metrics_port=metrics_port,
    )
