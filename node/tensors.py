"""Tensor streams: state dicts to protobuf messages, their digest and the signed claim.

A model or an update travels as one :class:`~proto.llbcfl_pb2.TensorStreamPart`
stream: a header (round, sender, base digest, sample count, the tensors'
names, dtypes and shapes, total size), chunks of at most 1 MiB that slice
the concatenated raw little-endian bytes of the tensors in name order, and a
trailer with the digest and the sender's signed claim. The header carries
the sender's signature over its own fields (``header_kind``), so a receiver
authenticates a stream before it reserves memory for its data. Protobuf types stop
here: callers get ``name -> torch.Tensor`` mappings (``fl.weights.Weights``).

The digest is ``chain.digests.weights_digest`` (SHA-256 over canonical
bytes, recomputed as the chunks arrive); the claim the sender signs
(``chain.digests.claim_bytes``) travels in an envelope of kind ``update``
(clients) or ``model`` (the server).

This module sends (:func:`tensor_stream`, :func:`relay_stream`);
``node.tensor_receiver`` checks and reassembles what arrives.
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable, Iterable, Iterator
from typing import TYPE_CHECKING, Final

from chain.digests import (
    DIGEST_TAG,
    claim_bytes,
    dtype_name,
    header_bytes,
    nbytes_of,
    raw_bytes,
    tensor_record,
)
from consensus.canonical import pack_u32
from fl.weights import Weights
from node.identity import Identity
from proto import llbcfl_pb2 as pb

if TYPE_CHECKING:
    from node.tensor_receiver import ReceivedTensors

CHUNK_BYTES: Final = 1 << 20
UPDATE_KIND: Final = "update"
MODEL_KIND: Final = "model"
MODEL_REQUEST_KIND: Final = "model-request"
FETCH_UPDATE_KIND: Final = "fetch-update"  # a miner or the server asks a miner for an update
# Who may sign a stream of each kind.
SIGNER_ROLES: Final = {UPDATE_KIND: ("client",), MODEL_KIND: ("server",)}


def header_kind(kind: str) -> str:
    """The envelope kind of a stream header's signature (``update-header``, ...)."""
    return f"{kind}-header"


def sign_header(header: pb.TensorStreamHeader, identity: Identity, kind: str) -> None:
    """Set ``header.auth``: ``identity``'s signature over the header's canonical bytes."""
    payload = header_bytes(
        round=header.round,
        sender_id=header.sender_id,
        base_digest=header.base_digest,
        num_samples=header.num_samples,
        total_bytes=header.total_bytes,
    )
    header.auth.CopyFrom(identity.sign(header_kind(kind), payload))


Layout = list[tuple[str, str, tuple[int, ...], int, int]]  # name, dtype, shape, offset, nbytes


def stream_layout(specs: Iterable[tuple[str, str, tuple[int, ...]]]) -> Layout:
    """Where each tensor's bytes lie in the stream (tensors in the given order)."""
    layout, offset = [], 0
    for name, dtype, shape in specs:
        nbytes = nbytes_of(dtype, shape)
        layout.append((name, dtype, shape, offset, nbytes))
        offset += nbytes
    return layout


class StreamHasher:
    """:func:`_digest` of a stream's tensors, fed with the data as it arrives.

    Sender and receiver hash each chunk as it passes, so hashing overlaps
    the transfer instead of following it.
    """

    def __init__(self, layout: Layout) -> None:
        self.stream_layout = layout
        self._hasher = hashlib.sha256(DIGEST_TAG + pack_u32(len(layout)))
        self._next = 0  # index of the tensor being hashed
        self._opened = False  # its record header is hashed
        self._done = 0  # stream bytes hashed

    def feed(self, data: bytes | bytearray, end: int) -> None:
        """Hash the stream bytes up to ``end``; ``data`` holds at least ``[0, end)``."""
        with memoryview(data) as view:
            while self._next < len(self.stream_layout):
                name, dtype, shape, offset, nbytes = self.stream_layout[self._next]
                if not self._opened:
                    self._hasher.update(tensor_record(name, dtype, shape, nbytes))
                    self._opened = True
                stop = min(end, offset + nbytes)
                if stop > self._done:
                    self._hasher.update(view[self._done : stop])
                    self._done = stop
                if self._done < offset + nbytes:
                    return
                self._next += 1
                self._opened = False

    def digest(self) -> bytes:
        if self._next != len(self.stream_layout):
            raise ValueError("digest of an incomplete stream")
        return self._hasher.digest()


def check_chunk_bytes(chunk_bytes: int) -> None:
    if not 1 <= chunk_bytes <= CHUNK_BYTES:
        raise ValueError(f"chunk_bytes must be in [1, {CHUNK_BYTES}], got {chunk_bytes}")


def _parts(
    header: pb.TensorStreamHeader,
    data: bytes,
    chunk_bytes: int,
    trailer: Callable[[], pb.TensorStreamTrailer],
    before_chunk: Callable[[int], None] = lambda end: None,
) -> Iterator[pb.TensorStreamPart]:
    """Header, ``data`` in chunks, then the trailer, built once the chunks are out.

    ``before_chunk(end)`` sees each chunk's end offset before the chunk leaves.
    """
    yield pb.TensorStreamPart(header=header)
    for offset in range(0, len(data), chunk_bytes):
        before_chunk(min(len(data), offset + chunk_bytes))
        piece = data[offset : offset + chunk_bytes]
        yield pb.TensorStreamPart(chunk=pb.TensorChunk(offset=offset, data=piece))
    yield pb.TensorStreamPart(trailer=trailer())


def tensor_stream(
    weights: Weights,
    *,
    identity: Identity,
    kind: str,
    round: int,
    base_digest: bytes = b"",
    num_samples: int = 0,
    chunk_bytes: int = CHUNK_BYTES,
) -> Iterator[pb.TensorStreamPart]:
    """The stream that sends ``weights`` as ``identity``: header, chunks, signed trailer.

    The digest is computed chunk by chunk as the stream is consumed (only the
    trailer needs it), so the first chunk leaves before the data is hashed.
    """
    check_chunk_bytes(chunk_bytes)
    specs = [(n, dtype_name(weights[n]), tuple(weights[n].shape)) for n in sorted(weights)]
    layout = stream_layout(specs)
    header = pb.TensorStreamHeader(
        round=round,
        sender_id=identity.node_id,
        base_digest=base_digest,
        num_samples=num_samples,
        tensors=[pb.TensorSpec(name=n, dtype=d, shape=s) for n, d, s in specs],
        total_bytes=sum(item[4] for item in layout),
    )
    sign_header(header, identity, kind)
    data = b"".join(raw_bytes(weights[name]) for name, _, _ in specs)
    hasher = StreamHasher(layout)

    def signed_trailer() -> pb.TensorStreamTrailer:
        hasher.feed(data, len(data))  # empty tensors at the end
        digest = hasher.digest()
        claim = claim_bytes(
            round=round,
            sender_id=identity.node_id,
            base_digest=base_digest,
            digest=digest,
            num_samples=num_samples,
        )
        return pb.TensorStreamTrailer(digest=digest, claim=identity.sign(kind, claim))

    return _parts(header, data, chunk_bytes, signed_trailer, lambda end: hasher.feed(data, end))


def relay_stream(
    received: ReceivedTensors, *, chunk_bytes: int = CHUNK_BYTES
) -> Iterator[pb.TensorStreamPart]:
    """The same stream again, with the original sender's claim (miners serve FetchUpdate)."""
    check_chunk_bytes(chunk_bytes)
    names = [spec.name for spec in received.header.tensors]
    data = b"".join(raw_bytes(received.weights[name]) for name in names)
    trailer = pb.TensorStreamTrailer(digest=received.digest, claim=received.claim)
    return _parts(received.header, data, chunk_bytes, lambda: trailer)
