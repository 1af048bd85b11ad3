"""Off-chain data: update blobs stored by digest.

:class:`BlobStore` keeps each accepted-for-storage update as the exact
tensor stream the client sent (header, chunks, the client's signed trailer),
one file per digest under ``DIR/blobs/``; reading a blob back runs the full
receiver checks again, so a corrupted file is never used.
The global model of each round is recomputed from the chain and these blobs
(``chain.models.GlobalModels``, fed by :meth:`BlobStore.update_of`).
"""

from __future__ import annotations

import contextlib
from collections import OrderedDict
from collections.abc import Iterable
from pathlib import Path

from chain.digests import ModelSpec
from chain.records import UpdateRecord
from chain.verdicts import Upload
from consensus.canonical import Reader, pack_blob
from fl.rounds import ClientUpdate
from node.durable import write_durably
from node.full_disk import DiskGuard
from node.membership import Membership
from node.tensor_receiver import ReceivedTensors, receive_tensor_stream
from node.tensors import UPDATE_KIND, relay_stream
from proto import llbcfl_pb2 as pb


class BlobStore:
    """Update streams by digest (files), with an in-memory cache of decoded ones."""

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
        self._cache: dict[tuple[bytes, str], ReceivedTensors] = {}
        self._digests: dict[bytes, tuple[bytes, str]] = {}
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
        self._digests.setdefault(received.digest, key)
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

    def has(self, digest: bytes) -> bool:
        return digest in self._digests

    def get(self, digest: bytes, client: str | None = None) -> ReceivedTensors | None:
        """The stream with ``digest`` sent by ``client`` (any sender when None)."""
        if client is not None:
            return self._cache.get((digest, client))
        key = self._digests.get(digest)
        return None if key is None else self._cache[key]

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

    def missing(self, digests: Iterable[bytes]) -> list[bytes]:
        return [d for d in digests if d not in self._digests]

    def update_of(self, record: UpdateRecord) -> ClientUpdate | None:
        """The tensors of an update record, weighted as the chain says (``chain.models``)."""
        received = self.get(record.digest)
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
