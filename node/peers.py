"""A miner's traffic with the other miners: PBFT links, update blobs, catching up.

:class:`PeerLink` carries outgoing PBFT messages to one peer over a
long-lived ``Miner/Deliver`` stream. :class:`BlobFetcher` fetches update
blobs a miner lacks from its peers (``node.offchain.fetch_update``: a
signed request naming digest and client; the client's signature and the
digest are checked again) before a message that refers to them is handed
to the replica, and for committed verdicts.
:func:`catch_up_from_peers` asks the peers how far they are and sends a
signed FETCH to one that is ahead (the core's own state transfer).
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
from collections.abc import AsyncIterator
from typing import TYPE_CHECKING, Any

import grpc

from chain.records import RoundVerdicts, decode_operation
from consensus.canonical import MalformedMessage
from consensus.messages import Fetch, Forward, PrePrepare
from node.daemon import NodeLog
from node.errors import DiskFull
from node.identity import Identity
from node.offchain import BlobKey, fetch_update, wall_clock_ms
from node.serving import channel
from node.tensor_receiver import UpdateRejected
from proto import llbcfl_pb2 as pb
from proto import llbcfl_pb2_grpc as pb_grpc

if TYPE_CHECKING:
    from node.miner import Miner

PEER_QUEUE = 10_000
# The envelope kind of a link item's signature (SHA-256 of the PBFT bytes).
PBFT_WIRE_KIND = "pbft-wire"


def link_item(identity: Identity, data: bytes) -> pb.PbftMessage:
    """``data`` as a ``Deliver`` item signed by ``identity`` (checked before decoding)."""
    auth = identity.sign(PBFT_WIRE_KIND, hashlib.sha256(data).digest())
    return pb.PbftMessage(data=data, auth=auth)


class PeerLink:
    """Outgoing PBFT messages to one peer over a long-lived ``Deliver`` stream.

    Every item is signed (:func:`link_item`); the first, sent on connecting,
    is empty: it binds the stream to this miner at the peer. The link is up
    once that item is written on a connected channel, and down when the
    stream fails; each change is logged once (``peer-up`` the first time,
    then ``peer-lost`` and ``peer-recovered``), never each reconnection attempt.
    """

    def __init__(
        self,
        address: str,
        identity: Identity,
        log: NodeLog | None = None,
        *,
        name: str | None = None,
    ) -> None:
        self.address = address
        self.name = f"{name} ({address})" if name else address
        self.identity = identity
        self.log = log
        self.connected = True  # what Status says until the first attempt tells
        self.up: bool | None = None  # None: not tried yet
        self.queue: asyncio.Queue[bytes] = asyncio.Queue(PEER_QUEUE)
        self._task: asyncio.Task | None = None

    def send(self, data: bytes) -> None:
        with contextlib.suppress(asyncio.QueueFull):
            self.queue.put_nowait(data)  # PBFT retransmits what is dropped

    def start(self) -> None:
        self._task = asyncio.create_task(self._run())

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task

    def went(self, up: bool, why: str = "") -> None:
        """The link is now up (or down, for ``why``): one log line if that is a change."""
        before, self.up, self.connected = self.up, up, up
        if before == up or self.log is None:
            return
        if not up:
            self.log.info(f"link to {self.name} down: {why}", event="peer-lost")
        elif before is None:
            self.log.info(f"link to {self.name} up", event="peer-up")
        else:
            self.log.info(f"link to {self.name} up again", event="peer-recovered")

    async def _messages(self) -> AsyncIterator[pb.PbftMessage]:
        yield link_item(self.identity, b"")
        # Asked for the next item: the binding item was written.
        self.went(up=True)
        while True:
            data = await self.queue.get()
            yield link_item(self.identity, data)

    async def _run(self) -> None:
        while True:
            try:
                async with channel(self.address) as ch:
                    # Start the stream only on a connected channel: a call begun
                    # while the peer is down can linger and swallow messages
                    # after the peer is back.
                    await asyncio.wait_for(ch.channel_ready(), timeout=1.0)
                    await pb_grpc.MinerStub(ch).Deliver(self._messages())
            except asyncio.CancelledError:
                raise
            except Exception as exc:  # any failure: reconnect; PBFT retransmits
                self.went(up=False, why=failure(exc))
                # What queued for a peer that is down is stale by the time it is
                # back (it catches up by state transfer): do not replay it.
                while not self.queue.empty():
                    self.queue.get_nowait()
            await asyncio.sleep(0.2)  # reconnect backoff (not a test race)


def failure(exc: BaseException) -> str:
    """A failed link's reason, short: the exception's type, and a gRPC call's code."""
    if isinstance(exc, grpc.aio.AioRpcError):
        return f"{exc.code().name} {exc.details() or ''}".strip()
    if isinstance(exc, TimeoutError):
        return "not connected within 1 s"
    return type(exc).__name__


class BlobFetcher:
    """Update blobs a miner lacks, fetched from its peers by (digest, client)."""

    def __init__(self, miner: Miner) -> None:
        self.m = miner
        self._fetching: set[BlobKey] = set()

    def wanted_by(self, message: Any) -> list[BlobKey]:
        """Blobs the verdict records of a PRE-PREPARE or FORWARD refer to that we lack.

        The message waits until they are fetched from peers, so that the
        replica validates (or, as primary, batches) with the blobs at hand.
        A blob is named by digest and client: holding the same digest under
        another client does not count (it is another client's signed update).
        """
        wanted: list[BlobKey] = []
        for record in verdict_records(message):
            bad = self.m.malformed.get(record.round, {})
            wanted.extend(
                (u.digest, u.client)
                for u in record.updates
                if u.client not in bad or bad[u.client][0].digest != u.digest
            )
        return self.m.blobs.missing(wanted)

    def committed_missing(self) -> list[BlobKey]:
        state = self.m.state
        wanted = [
            (u.digest, u.client) for v in state.verdicts.values() for u in v.updates if u.accepted
        ]
        return self.m.blobs.missing(wanted)

    async def fetch(self, keys: list[BlobKey], *, prefer: int | None = None) -> None:
        """Fetch update blobs from peer miners (the client's signature is checked again)."""
        m = self.m
        order = sorted(m.peers, key=lambda i: (i != prefer, i))
        for key in keys:
            if m.blobs.has(*key) or key in self._fetching:
                continue
            self._fetching.add(key)
            try:
                for peer in order:
                    try:
                        received = await fetch_update(
                            m.peers[peer].address,
                            key,
                            identity=m.identity,
                            membership=m.membership,
                            spec=m.spec,
                            max_bytes=m.genesis.protocol.max_stream_bytes,
                            now_ms=wall_clock_ms(),
                            timeout=10,
                        )
                    except (grpc.aio.AioRpcError, UpdateRejected):
                        continue
                    try:
                        m.blobs.put(received)
                    except DiskFull:  # read-only now: fetched again once there is room
                        return
                    break
            finally:
                self._fetching.discard(key)


def verdict_records(message: Any) -> list[RoundVerdicts]:
    """The verdict records a PRE-PREPARE's block or a FORWARD's request carries."""
    if isinstance(message, PrePrepare):
        try:
            requests = message.block.requests()
        except MalformedMessage:
            return []
    elif isinstance(message, Forward):
        requests = [message.request]
    else:
        return []
    records = []
    for request in requests:
        try:
            _, record = decode_operation(request.operation)
        except MalformedMessage:
            return []
        if isinstance(record, RoundVerdicts):
            records.append(record)
    return records


async def catch_up_from_peers(miner: Miner) -> None:
    """Ask peers how far they are; when one is ahead, send it a signed FETCH.

    A replica that restarted behind, or sat out while the others moved
    on, sees no traffic above its height once the network is idle; the
    core's own state transfer (FETCH, answered by BLOCKS with the
    certified blocks and the NEW-VIEW) then brings it up to date.
    """
    for peer in miner.peers.values():
        try:
            async with channel(peer.address) as ch:
                status = await pb_grpc.NodeStub(ch).Status(pb.StatusRequest(), timeout=1)
        except grpc.aio.AioRpcError:
            continue
        if status.chain_height > miner.replica.height:
            miner.log.info(
                f"behind: height {miner.replica.height}, {status.node_id} has "
                f"{status.chain_height}; fetching",
                event="catch-up",
            )
            fetch = Fetch(from_height=miner.replica.height + 1, sender=miner.index)
            fetch.signature = miner.sign_pbft(fetch.signed)
            peer.send(fetch.encode())
            return
