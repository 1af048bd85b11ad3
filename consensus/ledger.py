"""Requests, blocks, commit certificates and chain verification.

A block is a header (height, previous hash, view, proposer, payload digest),
an opaque payload (here: the canonical encoding of a batch of client
requests) and a commit certificate: 2f+1 COMMIT signatures over
(view, height, block digest), as in Castro & Liskov, "Practical Byzantine
Fault Tolerance" (OSDI 1999; TOCS 2002), where a request is committed once
2f+1 replicas have sent matching COMMITs. The certificate makes a block
self-proving: anyone holding the replicas' public keys can check it, which
is what state transfer and auditors rely on.

The header carries the view in which the block was *first* proposed; a
block re-issued in a later NEW-VIEW keeps its bytes (and so its digest),
while the certificate records the view in which it actually committed.
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable, Iterable, Sequence
from typing import Final

from consensus.canonical import (
    DIGEST_SIZE,
    MalformedMessage,
    Reader,
    domain_tag,
    pack_blob,
    pack_text,
    pack_u8,
    pack_u32,
    pack_u64,
)

GENESIS_HASH: Final = bytes(DIGEST_SIZE)
COMMIT_TAG: Final = domain_tag("COMMIT")
PREPARE_TAG: Final = domain_tag("PREPARE")
_HEADER_TAG: Final = b"LLBCFL/block/v1\x00"

Verify = Callable[[int, bytes, bytes], bool]
"""``verify(signer_id, signed_bytes, signature) -> bool``, injected by the node."""


def max_faulty(n: int) -> int:
    """f for n = 3f+1 replicas (n larger than 3f+1 tolerates the same f)."""
    return (n - 1) // 3


def quorum_size(n: int) -> int:
    """2f+1: any two quorums share at least one honest replica."""
    return 2 * max_faulty(n) + 1


def vote_bytes(tag: bytes, *, view: int, height: int, digest: bytes, sender: int) -> bytes:
    """Signed bytes of a PREPARE or COMMIT: tag, view, height, digest, signer."""
    return tag + pack_u64(view) + pack_u64(height) + digest + pack_u32(sender)


class Request:
    """One operation submitted for ordering; (client, timestamp) executes once."""

    __slots__ = ("client", "operation", "signature", "timestamp")

    def __init__(self, client: str, timestamp: int, operation: bytes, signature: bytes) -> None:
        self.client = client
        self.timestamp = timestamp
        self.operation = operation
        self.signature = signature

    @property
    def key(self) -> tuple[str, int]:
        return (self.client, self.timestamp)

    def encode(self) -> bytes:
        return (
            pack_text(self.client)
            + pack_u64(self.timestamp)
            + pack_blob(self.operation)
            + pack_blob(self.signature)
        )

    @classmethod
    def read(cls, reader: Reader) -> Request:
        return cls(reader.text(), reader.u64(), reader.blob(), reader.blob())

    def __eq__(self, other: object) -> bool:
        return isinstance(other, Request) and self.encode() == other.encode()

    def __hash__(self) -> int:
        return hash(self.encode())

    def __repr__(self) -> str:
        return f"Request({self.client!r}, {self.timestamp}, {self.operation!r})"


def encode_batch(requests: Sequence[Request]) -> bytes:
    """Canonical block payload: a count, then each request in the given order."""
    return pack_u32(len(requests)) + b"".join(request.encode() for request in requests)


def decode_batch(payload: bytes) -> list[Request]:
    reader = Reader(payload)
    requests = [Request.read(reader) for _ in range(reader.count())]
    reader.finish()
    return requests


class BlockHeader:
    __slots__ = (
        "digest",
        "encoded",
        "height",
        "payload_digest",
        "previous_hash",
        "proposer",
        "view",
    )

    def __init__(
        self, *, height: int, previous_hash: bytes, view: int, proposer: int, payload_digest: bytes
    ) -> None:
        if len(previous_hash) != DIGEST_SIZE or len(payload_digest) != DIGEST_SIZE:
            raise MalformedMessage("header digests must be 32 bytes")
        self.height = height
        self.previous_hash = previous_hash
        self.view = view
        self.proposer = proposer
        self.payload_digest = payload_digest
        # Precomputed once: the header is hashed and signed on every vote.
        self.encoded = (
            pack_u64(height) + previous_hash + pack_u64(view) + pack_u32(proposer) + payload_digest
        )
        self.digest = hashlib.sha256(_HEADER_TAG + self.encoded).digest()

    @classmethod
    def read(cls, reader: Reader) -> BlockHeader:
        return cls(
            height=reader.u64(),
            previous_hash=reader.digest(),
            view=reader.u64(),
            proposer=reader.u32(),
            payload_digest=reader.digest(),
        )


class CommitCertificate:
    """2f+1 COMMIT signatures for (view, height, digest), sorted by signer id."""

    __slots__ = ("digest", "height", "signatures", "view")

    def __init__(
        self, *, view: int, height: int, digest: bytes, signatures: Sequence[tuple[int, bytes]]
    ) -> None:
        self.view = view
        self.height = height
        self.digest = digest
        self.signatures = tuple(sorted(signatures))

    def encode(self) -> bytes:
        parts = [pack_u64(self.view), pack_u64(self.height), self.digest]
        parts.append(pack_u32(len(self.signatures)))
        for signer, signature in self.signatures:
            parts.append(pack_u32(signer) + pack_blob(signature))
        return b"".join(parts)

    @classmethod
    def read(cls, reader: Reader) -> CommitCertificate:
        view, height, digest = reader.u64(), reader.u64(), reader.digest()
        signatures = [(reader.u32(), reader.blob()) for _ in range(reader.count())]
        return cls(view=view, height=height, digest=digest, signatures=signatures)

    def is_valid(self, *, verify: Verify, n: int) -> bool:
        """True when 2f+1 *distinct* replicas in 0..n-1 signed this COMMIT."""
        seen: set[int] = set()
        for signer, signature in self.signatures:
            if signer in seen or not 0 <= signer < n:
                return False
            payload = vote_bytes(
                COMMIT_TAG, view=self.view, height=self.height, digest=self.digest, sender=signer
            )
            if not verify(signer, payload, signature):
                return False
            seen.add(signer)
        return len(seen) >= quorum_size(n)


class Block:
    __slots__ = ("_requests", "certificate", "digest", "header", "height", "payload")

    def __init__(
        self, header: BlockHeader, payload: bytes, *, certificate: CommitCertificate | None = None
    ) -> None:
        self.header = header
        self.payload = payload
        self.certificate = certificate
        # Plain attributes, not properties: read on every vote in the hot path.
        self.digest = header.digest
        self.height = header.height
        self._requests: list[Request] | None = None

    def payload_matches(self) -> bool:
        return hashlib.sha256(self.payload).digest() == self.header.payload_digest

    def requests(self) -> list[Request]:
        """The decoded request batch (decoded once; raises MalformedMessage)."""
        if self._requests is None:
            self._requests = decode_batch(self.payload)
        return self._requests

    def with_certificate(self, certificate: CommitCertificate) -> Block:
        block = Block(self.header, self.payload, certificate=certificate)
        block._requests = self._requests
        return block

    def encode(self) -> bytes:
        cert = self.certificate
        tail = pack_u8(1) + cert.encode() if cert is not None else pack_u8(0)
        return self.header.encoded + pack_blob(self.payload) + tail

    @classmethod
    def read(cls, reader: Reader) -> Block:
        header = BlockHeader.read(reader)
        payload = reader.blob()
        certificate = CommitCertificate.read(reader) if reader.flag() else None
        return cls(header, payload, certificate=certificate)

    @classmethod
    def decode(cls, data: bytes) -> Block:
        reader = Reader(data)
        block = cls.read(reader)
        reader.finish()
        return block

    @classmethod
    def propose(
        cls, *, height: int, previous_hash: bytes, view: int, proposer: int, payload: bytes
    ) -> Block:
        header = BlockHeader(
            height=height,
            previous_hash=previous_hash,
            view=view,
            proposer=proposer,
            payload_digest=hashlib.sha256(payload).digest(),
        )
        return cls(header, payload)


class ChainVerdict:
    """Outcome of :func:`verify_chain`: how many blocks verified, and why it stopped."""

    __slots__ = ("first_bad_height", "reason", "verified")

    def __init__(self, *, verified: int, first_bad_height: int | None, reason: str) -> None:
        self.verified = verified
        self.first_bad_height = first_bad_height
        self.reason = reason

    @property
    def ok(self) -> bool:
        return self.first_bad_height is None

    def __repr__(self) -> str:
        return (
            f"ChainVerdict(verified={self.verified}, "
            f"first_bad_height={self.first_bad_height}, reason={self.reason!r})"
        )


def check_block(block: Block, *, previous_hash: bytes, height: int, verify: Verify, n: int) -> str:
    """Return '' when ``block`` is a certified successor of ``previous_hash``, else why not."""
    header = block.header
    if header.height != height:
        return f"height {header.height} where {height} was expected"
    if header.previous_hash != previous_hash:
        return "previous hash does not link to the preceding block"
    if not block.payload_matches():
        return "payload digest mismatch"
    cert = block.certificate
    if cert is None:
        return "missing commit certificate"
    if cert.height != height or cert.digest != header.digest:
        return "commit certificate is for another block"
    if not cert.is_valid(verify=verify, n=n):
        return "commit certificate lacks 2f+1 valid distinct signatures"
    return ""


def verify_chain(
    blocks: Iterable[Block],
    *,
    verify: Verify,
    n: int,
    f: int | None = None,
    previous_hash: bytes = GENESIS_HASH,
    first_height: int = 1,
) -> ChainVerdict:
    """Check every link, payload digest and certificate; name the first bad height."""
    if f is not None and f != max_faulty(n):
        raise ValueError(f"f={f} does not match n={n} (expected {max_faulty(n)})")
    height, verified = first_height, 0
    for block in blocks:
        reason = check_block(block, previous_hash=previous_hash, height=height, verify=verify, n=n)
        if reason:
            return ChainVerdict(verified=verified, first_bad_height=height, reason=reason)
        previous_hash = block.digest
        height += 1
        verified += 1
    return ChainVerdict(verified=verified, first_bad_height=None, reason="")
