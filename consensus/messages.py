"""PBFT protocol messages and their canonical wire encoding.

Message kinds follow Castro & Liskov, "Practical Byzantine Fault Tolerance"
(OSDI 1999; TOCS 2002): PRE-PREPARE, PREPARE, COMMIT, VIEW-CHANGE and
NEW-VIEW, plus FETCH / BLOCKS for state transfer and FORWARD to relay a
client request to the primary. Checkpoints are the commit certificates of
executed blocks (a certified block proves its height is stable), so there
is no separate CHECKPOINT message.

Each message keeps its signed bytes precomputed (``signed``): a domain tag
naming kind and version, then the fields, sender included. The network
layer carries :meth:`Message.encode` bytes; :func:`decode_message` rejects
anything malformed with :class:`~consensus.canonical.MalformedMessage`.
The ``sender`` field is only a claim: replicas count a message for a
sender only after ``verify(sender, signed, signature)`` succeeds.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import ClassVar, Final, TypeVar

from consensus.canonical import (
    MalformedMessage,
    Reader,
    domain_tag,
    pack_blob,
    pack_u8,
    pack_u32,
    pack_u64,
)
from consensus.ledger import (
    COMMIT_TAG,
    GENESIS_HASH,
    PREPARE_TAG,
    Block,
    CommitCertificate,
    Request,
    Verify,
    vote_bytes,
)

Sign = Callable[[bytes], bytes]
"""``sign(signed_bytes) -> signature`` for the replica's own key, injected by the node."""


class Message:
    """Base class: ``sender``, ``signature`` and the precomputed ``signed`` bytes."""

    __slots__ = ("sender", "signature", "signed")
    KIND: ClassVar[int] = 0

    sender: int
    signature: bytes
    signed: bytes

    def body(self) -> bytes:
        """Wire fields after the kind byte, signature excluded."""
        raise NotImplementedError

    def encode(self) -> bytes:
        return pack_u8(self.KIND) + pack_blob(self.body()) + pack_blob(self.signature)

    def is_authentic(self, verify: Verify) -> bool:
        return verify(self.sender, self.signed, self.signature)

    def __repr__(self) -> str:
        fields = ", ".join(
            f"{name}={getattr(self, name)!r}"
            for name in ("view", "height", "new_view", "from_height")
            if hasattr(self, name)
        )
        return f"{type(self).__name__}(sender={self.sender}, {fields})"


class PrePrepare(Message):
    __slots__ = ("block", "digest", "height", "view")
    KIND: ClassVar[int] = 1
    TAG: ClassVar[bytes] = domain_tag("PRE-PREPARE")

    def __init__(
        self, *, view: int, height: int, block: Block, sender: int, signature: bytes = b""
    ):
        self.view = view
        self.height = height
        self.block = block
        self.digest = block.digest
        self.sender = sender
        self.signature = signature
        # The header digest binds the payload (the header holds its SHA-256).
        self.signed = vote_bytes(
            self.TAG, view=view, height=height, digest=block.digest, sender=sender
        )

    def body(self) -> bytes:
        return (
            pack_u32(self.sender)
            + pack_u64(self.view)
            + pack_u64(self.height)
            + self.block.encode()
        )

    @classmethod
    def read_body(cls, reader: Reader, signature: bytes) -> PrePrepare:
        sender, view, height = reader.u32(), reader.u64(), reader.u64()
        block = Block.read(reader)
        return cls(view=view, height=height, block=block, sender=sender, signature=signature)


class _Vote(Message):
    __slots__ = ("digest", "height", "view")
    TAG: ClassVar[bytes] = b""

    def __init__(
        self, *, view: int, height: int, digest: bytes, sender: int, signature: bytes = b""
    ):
        self.view = view
        self.height = height
        self.digest = digest
        self.sender = sender
        self.signature = signature
        self.signed = vote_bytes(self.TAG, view=view, height=height, digest=digest, sender=sender)

    def body(self) -> bytes:
        return pack_u32(self.sender) + pack_u64(self.view) + pack_u64(self.height) + self.digest

    @classmethod
    def read_body(cls, reader: Reader, signature: bytes) -> _Vote:
        sender, view, height, digest = reader.u32(), reader.u64(), reader.u64(), reader.digest()
        return cls(view=view, height=height, digest=digest, sender=sender, signature=signature)


class Prepare(_Vote):
    __slots__ = ()
    KIND: ClassVar[int] = 2
    TAG: ClassVar[bytes] = PREPARE_TAG


class Commit(_Vote):
    __slots__ = ()
    KIND: ClassVar[int] = 3
    TAG: ClassVar[bytes] = COMMIT_TAG


class PreparedCertificate:
    """A PRE-PREPARE plus 2f matching PREPAREs from distinct backups (C&L's P set)."""

    __slots__ = ("pre_prepare", "prepares")

    def __init__(self, pre_prepare: PrePrepare, prepares: Sequence[Prepare]) -> None:
        self.pre_prepare = pre_prepare
        self.prepares = tuple(prepares)

    @property
    def view(self) -> int:
        return self.pre_prepare.view

    @property
    def height(self) -> int:
        return self.pre_prepare.height

    @property
    def digest(self) -> bytes:
        return self.pre_prepare.digest

    def encode(self) -> bytes:
        parts = [pack_blob(self.pre_prepare.encode()), pack_u32(len(self.prepares))]
        parts.extend(pack_blob(prepare.encode()) for prepare in self.prepares)
        return b"".join(parts)

    @classmethod
    def read(cls, reader: Reader) -> PreparedCertificate:
        pre_prepare = _expect(decode_message(reader.blob()), PrePrepare)
        prepares = [_expect(decode_message(reader.blob()), Prepare) for _ in range(reader.count())]
        return cls(pre_prepare, prepares)

    def is_valid(self, *, verify: Verify, n: int, f: int) -> bool:
        pre = self.pre_prepare
        primary = pre.view % n
        if pre.sender != primary or not pre.block.payload_matches():
            return False
        if pre.block.height != pre.height or not pre.is_authentic(verify):
            return False
        backups: set[int] = set()
        for prepare in self.prepares:
            if (prepare.view, prepare.height, prepare.digest) != (pre.view, pre.height, pre.digest):
                return False
            if prepare.sender == primary or prepare.sender in backups:
                return False
            if not 0 <= prepare.sender < n or not prepare.is_authentic(verify):
                return False
            backups.add(prepare.sender)
        return len(backups) >= 2 * f


class ViewChange(Message):
    """VIEW-CHANGE: the stable checkpoint (with its proof) and prepared certificates."""

    __slots__ = ("checkpoint", "checkpoint_digest", "checkpoint_height", "new_view", "prepared")
    KIND: ClassVar[int] = 4
    TAG: ClassVar[bytes] = domain_tag("VIEW-CHANGE")

    def __init__(
        self,
        *,
        new_view: int,
        checkpoint_height: int,
        checkpoint_digest: bytes,
        checkpoint: CommitCertificate | None,
        prepared: Sequence[PreparedCertificate],
        sender: int,
        signature: bytes = b"",
    ) -> None:
        self.new_view = new_view
        self.checkpoint_height = checkpoint_height
        self.checkpoint_digest = checkpoint_digest
        self.checkpoint = checkpoint
        self.prepared = tuple(prepared)
        self.sender = sender
        self.signature = signature
        self.signed = self.TAG + self.body()

    def body(self) -> bytes:
        parts = [
            pack_u32(self.sender),
            pack_u64(self.new_view),
            pack_u64(self.checkpoint_height),
            self.checkpoint_digest,
        ]
        cert = self.checkpoint
        parts.append(pack_u8(1) + cert.encode() if cert is not None else pack_u8(0))
        parts.append(pack_u32(len(self.prepared)))
        parts.extend(pack_blob(p.encode()) for p in self.prepared)
        return b"".join(parts)

    @classmethod
    def read_body(cls, reader: Reader, signature: bytes) -> ViewChange:
        sender, new_view, height = reader.u32(), reader.u64(), reader.u64()
        digest = reader.digest()
        checkpoint = CommitCertificate.read(reader) if reader.flag() else None
        prepared = [PreparedCertificate.read(Reader(reader.blob())) for _ in range(reader.count())]
        return cls(
            new_view=new_view,
            checkpoint_height=height,
            checkpoint_digest=digest,
            checkpoint=checkpoint,
            prepared=prepared,
            sender=sender,
            signature=signature,
        )

    def is_valid(self, *, verify: Verify, n: int, f: int) -> bool:
        """Checkpoint proof and prepared certificates check out (signature excluded).

        With one block in flight a replica only prepares the height right
        after its last executed block, so any prepared certificate must be
        for ``checkpoint_height + 1`` and from a view below ``new_view``.
        """
        cert = self.checkpoint
        if self.checkpoint_height == 0:
            if cert is not None or self.checkpoint_digest != GENESIS_HASH:
                return False
        elif (
            cert is None
            or (cert.height, cert.digest)
            != (
                self.checkpoint_height,
                self.checkpoint_digest,
            )
            or not cert.is_valid(verify=verify, n=n)
        ):
            return False
        for prepared in self.prepared:
            if prepared.height != self.checkpoint_height + 1 or prepared.view >= self.new_view:
                return False
            if prepared.pre_prepare.block.header.previous_hash != self.checkpoint_digest:
                return False
            if not prepared.is_valid(verify=verify, n=n, f=f):
                return False
        return len(self.prepared) <= 1


class NewView(Message):
    """NEW-VIEW: 2f+1 VIEW-CHANGEs and the PRE-PREPAREs the new primary re-issues."""

    __slots__ = ("pre_prepares", "view", "view_changes")
    KIND: ClassVar[int] = 5
    TAG: ClassVar[bytes] = domain_tag("NEW-VIEW")

    def __init__(
        self,
        *,
        view: int,
        view_changes: Sequence[ViewChange],
        pre_prepares: Sequence[PrePrepare],
        sender: int,
        signature: bytes = b"",
    ) -> None:
        self.view = view
        self.view_changes = tuple(view_changes)
        self.pre_prepares = tuple(pre_prepares)
        self.sender = sender
        self.signature = signature
        self.signed = self.TAG + self.body()

    def body(self) -> bytes:
        parts = [pack_u32(self.sender), pack_u64(self.view), pack_u32(len(self.view_changes))]
        parts.extend(pack_blob(vc.encode()) for vc in self.view_changes)
        parts.append(pack_u32(len(self.pre_prepares)))
        parts.extend(pack_blob(pp.encode()) for pp in self.pre_prepares)
        return b"".join(parts)

    @classmethod
    def read_body(cls, reader: Reader, signature: bytes) -> NewView:
        sender, view = reader.u32(), reader.u64()
        vcs = [_expect(decode_message(reader.blob()), ViewChange) for _ in range(reader.count())]
        pps = [_expect(decode_message(reader.blob()), PrePrepare) for _ in range(reader.count())]
        return cls(
            view=view, view_changes=vcs, pre_prepares=pps, sender=sender, signature=signature
        )


class Fetch(Message):
    """State transfer request: send me certified blocks from ``from_height`` on."""

    __slots__ = ("from_height",)
    KIND: ClassVar[int] = 6
    TAG: ClassVar[bytes] = domain_tag("FETCH")

    def __init__(self, *, from_height: int, sender: int, signature: bytes = b"") -> None:
        self.from_height = from_height
        self.sender = sender
        self.signature = signature
        self.signed = self.TAG + self.body()

    def body(self) -> bytes:
        return pack_u32(self.sender) + pack_u64(self.from_height)

    @classmethod
    def read_body(cls, reader: Reader, signature: bytes) -> Fetch:
        sender, from_height = reader.u32(), reader.u64()
        return cls(from_height=from_height, sender=sender, signature=signature)


class Blocks(Message):
    """State transfer reply: certified blocks and the NEW-VIEW that installed the sender's view."""

    __slots__ = ("blocks", "new_view")
    KIND: ClassVar[int] = 7
    TAG: ClassVar[bytes] = domain_tag("BLOCKS")

    def __init__(
        self,
        *,
        blocks: Sequence[Block],
        new_view: NewView | None,
        sender: int,
        signature: bytes = b"",
    ) -> None:
        self.blocks = tuple(blocks)
        self.new_view = new_view
        self.sender = sender
        self.signature = signature
        self.signed = self.TAG + self.body()

    def body(self) -> bytes:
        parts = [pack_u32(self.sender), pack_u32(len(self.blocks))]
        parts.extend(pack_blob(block.encode()) for block in self.blocks)
        nv = self.new_view
        parts.append(pack_u8(1) + pack_blob(nv.encode()) if nv is not None else pack_u8(0))
        return b"".join(parts)

    @classmethod
    def read_body(cls, reader: Reader, signature: bytes) -> Blocks:
        sender = reader.u32()
        blocks = [Block.decode(reader.blob()) for _ in range(reader.count())]
        new_view = _expect(decode_message(reader.blob()), NewView) if reader.flag() else None
        return cls(blocks=blocks, new_view=new_view, sender=sender, signature=signature)


class Forward(Message):
    """A backup relays a client request it received to the primary."""

    __slots__ = ("request",)
    KIND: ClassVar[int] = 8
    TAG: ClassVar[bytes] = domain_tag("FORWARD")

    def __init__(self, *, request: Request, sender: int, signature: bytes = b"") -> None:
        self.request = request
        self.sender = sender
        self.signature = signature
        self.signed = self.TAG + self.body()

    def body(self) -> bytes:
        return pack_u32(self.sender) + self.request.encode()

    @classmethod
    def read_body(cls, reader: Reader, signature: bytes) -> Forward:
        sender = reader.u32()
        return cls(request=Request.read(reader), sender=sender, signature=signature)


_KINDS: Final[dict[int, type[Message]]] = {
    cls.KIND: cls
    for cls in (PrePrepare, Prepare, Commit, ViewChange, NewView, Fetch, Blocks, Forward)
}


_M = TypeVar("_M", bound=Message)


def _expect(message: Message, cls: type[_M]) -> _M:
    if type(message) is not cls:
        raise MalformedMessage(f"expected {cls.__name__}, got {type(message).__name__}")
    return message  # type: ignore[return-value]


def decode_message(data: bytes) -> Message:
    """Parse :meth:`Message.encode` bytes; raise MalformedMessage on any defect."""
    reader = Reader(data)
    kind = reader.u8()
    cls = _KINDS.get(kind)
    if cls is None:
        raise MalformedMessage(f"unknown message kind {kind}")
    body, signature = reader.blob(), reader.blob()
    reader.finish()
    body_reader = Reader(body)
    message = cls.read_body(body_reader, signature)  # type: ignore[attr-defined]
    body_reader.finish()
    return message
