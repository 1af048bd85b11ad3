"""Off-chain data: update blobs stored by (digest, client), and how miners and the server
fetch them from a miner.

:class:`BlobStore` keeps each accepted-for-storage update as the exact
tensor stream the client sent (header, chunks, the client's signed trailer),
one file per (digest, client) under ``DIR/blobs/``; reading a blob back runs
the full receiver checks again, so a corrupted file is never used. Every
lookup names the client as well as the digest: two clients may send the
same bytes (one copying the other), and a miner holding the digest under
one client must still fetch, and check, the other's signed stream before it
can judge a block that names it.
The global model of each round is recomputed from the chain and these blobs
(``chain.models.GlobalModels``, fed by :meth:`BlobStore.update_of`).

Only miners and the server may read updates (a client that could would send
another's update as its own): ``Miner/FetchUpdate`` takes a
``fetch-update`` envelope (:func:`fetch_request`) signed by a miner or the
server of the genesis and issued within :data:`FETCH_FRESHNESS_MS` of the
serving miner's clock (:func:`check_fetch_request`); :func:`fetch_update`
is the one call that asks for a blob.
"""

from __future__ import annotations

import contextlib
import time
from collections import OrderedDict
from collections.abc import Iterable
from pathlib import Path
from typing import Final

import grpc

from chain.digests import ModelSpec
from chain.records import UpdateRecord
from chain.verdicts import Upload
from consensus.canonical import Reader, pack_blob
from fl.rounds import ClientUpdate
from node.durable import write_durably
from node.errors import NotPermitted, decode
from node.full_disk import DiskGuard
from node.identity import Identity, verify_envelope
from node.membership import Membership
from node.serving import channel
from node.tensor_receiver import ReceivedTensors, UpdateRejected, receive_tensor_stream
from node.tensors import FETCH_UPDATE_KIND, UPDATE_KIND, relay_stream
from proto import llbcfl_pb2 as pb
from proto import llbcfl_pb2_grpc as pb_grpc

BlobKey = tuple[bytes, str]
"""(digest, client): what a blob is stored and asked for under."""

# A fetch request is served this long either side of its issue time (the
# signer's clock against the serving miner's): it limits the replay of a
# request seen on the (still plaintext) wire.
FETCH_FRESHNESS_MS: Final = 60_000
# Who may read updates.
READER_ROLES: Final = ("miner", "server")


class BlobStore:
    """Update streams by (digest, client) (files), with an in-memory cache of decoded ones."""

    def __init__(
        self,
        directory: Path | None,
        *,
        membership: Membership,
        spec: ModelSpec,
        max_bytes: int,
        disk: DiskGuard | None = None,
    ) -> None:
        self._dir = Path(directory) / "blobs" if directory is not None else None
        self._disk = disk
        if self._dir is not None:
            self._dir.mkdir(parents=True, exist_ok=True)
        self._membership = membership
        self._spec = spec
        self._max_bytes = max_bytes
        # Keyed by (digest, client): two clients may send identical tensors.
        self._cache: dict[BlobKey, ReceivedTensors] = {}
        self.by_round: dict[int, dict[str, bytes]] = {}  # round -> client -> digest
        if self._dir is not None:
            for path in sorted(self._dir.glob("*.bin")):
                try:
                    self._remember(self._read(path))
                except Exception:  # a torn or corrupted file: drop it
                    path.unlink(missing_ok=True)

    def _path(self, digest: bytes, client: str) -> Path:
        assert self._dir is not None
        return self._dir / f"{digest.hex()}-{client}.bin"

    def _remember(self, received: ReceivedTensors) -> None:
        key = (received.digest, received.sender.node_id)
        self._cache[key] = received
        self.by_round.setdefault(received.round, {})[received.sender.node_id] = received.digest

    def _read(self, path: Path) -> ReceivedTensors:
        reader = Reader(path.read_bytes())
        parts = []
        for _ in range(reader.count()):
            part = pb.TensorStreamPart()
            part.ParseFromString(reader.blob())
            parts.append(part)
        reader.finish()
        return receive_tensor_stream(
            parts,
            expected=self._spec,
            membership=self._membership,
            kind=UPDATE_KIND,
            max_total_bytes=self._max_bytes,
        )

    def has(self, digest: bytes, client: str) -> bool:
        return (digest, client) in self._cache

    def get(self, digest: bytes, client: str) -> ReceivedTensors | None:
        """The stream with ``digest`` sent by ``client``."""
        return self._cache.get((digest, client))

    def put(self, received: ReceivedTensors) -> None:
        """Store durably (``node.durable``) before anyone is told it is stored.

        With a ``disk`` guard, refused while the node is read-only, and a full
        disk turns it read-only (``node.full_disk``): either way
        :class:`node.errors.DiskFull`, with nothing stored, in memory or on disk.
        """
        if (received.digest, received.sender.node_id) in self._cache:
            return
        if self._dir is not None:
            parts = [p.SerializeToString() for p in relay_stream(received)]
            data = len(parts).to_bytes(4, "big") + b"".join(pack_blob(p) for p in parts)
            path = self._path(received.digest, received.sender.node_id)
            with (
                self._disk.writing(f"storing an update of {received.sender.node_id}")
                if self._disk is not None
                else contextlib.nullcontext()
            ):
                write_durably(path, data)
        self._remember(received)

    def missing(self, keys: Iterable[BlobKey]) -> list[BlobKey]:
        """The (digest, client) pairs of ``keys`` not held, each once, in order."""
        return [k for k in dict.fromkeys(keys) if k not in self._cache]

    def update_of(self, record: UpdateRecord) -> ClientUpdate | None:
        """The tensors of an update record, weighted as the chain says (``chain.models``)."""
        received = self.get(record.digest, record.client)
        if received is None:
            return None
        return as_update(received, client=record.client, n_samples=record.n_samples)


def upload_of(received: ReceivedTensors) -> Upload:
    """The signed claim of a received update, as the verdict rules see it."""
    return Upload(
        received.sender.node_id,
        received.round,
        received.digest,
        received.base_digest,
        received.num_samples,
        received.claim.signature,
    )


def as_update(received: ReceivedTensors, *, client: str, n_samples: int) -> ClientUpdate:
    """``received``'s tensors as ``client``'s update (the chain names client and weight)."""
    return ClientUpdate(client, received.round, OrderedDict(received.weights), n_samples, 0.0)


def wall_clock_ms() -> int:
    """Unix time in ms: the issue time of fetch requests, and what a miner checks them by."""
    return int(time.time() * 1000)


def fetch_request(identity: Identity, key: BlobKey, *, now_ms: int) -> pb.Envelope:
    """A ``fetch-update`` envelope for the blob ``key``, signed by ``identity`` at ``now_ms``."""
    digest, client = key
    request = pb.FetchUpdateRequest(digest=digest, client_id=client, issued_ms=now_ms)
    return identity.sign(FETCH_UPDATE_KIND, request.SerializeToString())


def check_fetch_request(
    envelope: pb.Envelope, membership: Membership, *, now_ms: int
) -> pb.FetchUpdateRequest:
    """The request of a ``fetch-update`` envelope a miner may serve.

    Signed by a miner or the server of the genesis (``AuthError`` otherwise:
    UNAUTHENTICATED, or PERMISSION_DENIED for another role) and issued
    within :data:`FETCH_FRESHNESS_MS` of ``now_ms`` (:class:`NotPermitted`).
    """
    signer = verify_envelope(
        envelope, membership, expected_kind=FETCH_UPDATE_KIND, allowed_roles=READER_ROLES
    )
    request = decode(pb.FetchUpdateRequest, envelope.payload, "fetch request")
    skew = now_ms - request.issued_ms
    if abs(skew) > FETCH_FRESHNESS_MS:
        raise NotPermitted(
            f"{signer.node_id}'s fetch request was issued {skew / 1e3:.0f} s from this "
            f"miner's clock; requests are served within {FETCH_FRESHNESS_MS / 1e3:g} s"
        )
    return request


async def fetch_update(
    address: str,
    key: BlobKey,
    *,
    identity: Identity,
    membership: Membership,
    spec: ModelSpec,
    max_bytes: int,
    now_ms: int,
    timeout: float,
) -> ReceivedTensors:
    """The blob ``key`` from the miner at ``address``, with the client's signature checked.

    Raises ``grpc.aio.AioRpcError`` (the miner refused or is unreachable)
    and :class:`~node.tensor_receiver.UpdateRejected` (the stream is not the
    client's signed update, or not the one asked for).
    """
    digest, client = key
    async with channel(address) as ch:
        request = fetch_request(identity, key, now_ms=now_ms)
        parts = [p async for p in pb_grpc.MinerStub(ch).FetchUpdate(request, timeout=timeout)]
    received = receive_tensor_stream(
        parts, expected=spec, membership=membership, kind=UPDATE_KIND, max_total_bytes=max_bytes
    )
    if (received.digest, received.sender.node_id) != key:
        raise UpdateRejected(
            grpc.StatusCode.DATA_LOSS,
            f"asked for {client}'s {digest.hex()[:12]}, got {received.sender.node_id}'s "
            f"{received.digest.hex()[:12]}",
        )
    return received
