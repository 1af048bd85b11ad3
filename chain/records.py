"""On-chain application records: the kinds, their canonical bytes, their order (pure).

Every request ordered by the PBFT miners carries one record. The request's
``operation`` is canonical bytes (``consensus.canonical``): a u64 timestamp
(equal to ``Request.timestamp``), a one-byte kind, then the record's fields
in a fixed order; floats are IEEE-754 big-endian doubles. ``Request.client``
is the submitter's node id and ``Request.signature`` its Ed25519 signature
over ``b"LLBCFL/v1/chain-<kind>\\0" + operation`` (``node.identity``'s
envelope tag), so a record can be re-checked by anyone holding the genesis.

=============  =========  ====================================================
record         signed by  content
=============  =========  ====================================================
Registration   client     noisy label histogram (the client's data summary:
                          size, classes and quality are derived from it);
                          every replica replays the client's privacy
                          accountant from it and the genesis' DP plan
Selection      server     round, seed, selected ids, declined ids
RoundVerdicts  miner      round; per update: client, digest, base digest,
                          samples, validation accuracy, verdict, reason and the
                          client's claim signature; silent ids; reputations
                          after the round; privacy spent per participant
RoundSummary   server     round, global-model digest, test accuracy and loss
=============  =========  ====================================================

A record kind is a class registered once with :func:`record_kind` (its wire
code, the envelope kind its signature covers, and the role that signs it).
Its timestamp is derived, never allocated by hand (:func:`timestamp_of`):
the kinds a role signs are numbered in registration order, and a record of
round r gets ``r * (number of kinds the role signs) + its number``, one
strictly increasing sequence per submitter in the order the protocol
submits them (PBFT executes a (client, timestamp) once), and the same value
when a restarted node submits the same record again. A new kind signed by
the server is one more registered class; the sequence makes room for it.
What the chain does with each kind, and when, is ``chain.state``.
"""

from __future__ import annotations

import struct
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any, ClassVar, Final, TypeVar

from consensus.canonical import (
    MalformedMessage,
    Reader,
    pack_blob,
    pack_i64,
    pack_text,
    pack_u8,
    pack_u32,
    pack_u64,
)

# Where a round's selection seed comes from (genesis protocol.selection_seed).
SELECTION_SEEDS: Final = ("block", "run")

_F64: Final = struct.Struct(">d")


def pack_f64(value: float) -> bytes:
    return _F64.pack(value)


def read_f64(reader: Reader) -> float:
    return float(_F64.unpack(reader.raw(8))[0])


def _pack_ids(ids: Sequence[str]) -> bytes:
    return pack_u32(len(ids)) + b"".join(pack_text(i) for i in ids)


def _read_ids(reader: Reader) -> tuple[str, ...]:
    return tuple(reader.text() for _ in range(reader.count()))


def _pack_scores(scores: Sequence[tuple[str, float]]) -> bytes:
    return pack_u32(len(scores)) + b"".join(pack_text(c) + pack_f64(v) for c, v in scores)


def _read_scores(reader: Reader) -> tuple[tuple[str, float], ...]:
    return tuple((reader.text(), read_f64(reader)) for _ in range(reader.count()))


# The registry ----------------------------------------------------------------


@dataclass(frozen=True)
class RecordKind:
    """One registered record kind."""

    code: int  # the one-byte kind on the wire
    name: str  # the envelope kind the submitter's signature covers
    role: str  # the only role that may submit it
    cls: type
    read: Callable[[Reader], Any]


RECORD_KINDS: dict[int, RecordKind] = {}
"""Wire code -> kind, in registration order."""

_R = TypeVar("_R")


def record_kind(code: int, *, name: str, role: str) -> Callable[[type[_R]], type[_R]]:
    """Register a record class (it needs ``round``, ``encode()`` and ``read(reader)``)."""

    def register(cls: type[_R]) -> type[_R]:
        if code in RECORD_KINDS or any(k.name == name for k in RECORD_KINDS.values()):
            raise ValueError(f"record kind {code}/{name} is registered twice")
        if not 0 < code < 256:
            raise ValueError(f"record kind code {code} is not one byte")
        RECORD_KINDS[code] = RecordKind(code, name, role, cls, cls.read)  # type: ignore[attr-defined]
        cls.KIND = code  # type: ignore[attr-defined]
        return cls

    return register


def kind_of(record: Any) -> RecordKind:
    return RECORD_KINDS[record.KIND]


def kind_named(name: str) -> RecordKind | None:
    """The kind whose envelope name is ``name`` (None: no such kind)."""
    return next((k for k in RECORD_KINDS.values() if k.name == name), None)


def record_kind_name(record: Any) -> str:
    """The envelope kind whose tag the submitter's signature covers."""
    return kind_of(record).name


def kinds_signed_by(role: str) -> list[RecordKind]:
    return [k for k in RECORD_KINDS.values() if k.role == role]


def timestamp_of(record: Any) -> int:
    """The record's request timestamp: its round and its place in its signer's sequence."""
    kind = kind_of(record)
    sequence = kinds_signed_by(kind.role)
    return record.round * len(sequence) + sequence.index(kind)


# Records -------------------------------------------------------------------


@record_kind(1, name="chain-register", role="client")
@dataclass(frozen=True)
class Registration:
    """A client's one release about its data: its label histogram, noisy under DP.

    One count per class, then the count of records with an invalid label
    (``fl.privacy.release_histogram``). The record count, classes present
    and quality that selection uses are derived from it
    (``ChainState.summary``); the DP plan is not in the record: it follows
    from the genesis alone (``fl.rounds.privacy_plan``).
    """

    client: str
    histogram: tuple[int, ...]

    KIND: ClassVar[int]
    round: ClassVar[int] = 0  # before the first round

    def encode(self) -> bytes:
        return (
            pack_text(self.client)
            + pack_u32(len(self.histogram))
            + b"".join(pack_i64(c) for c in self.histogram)
        )

    @classmethod
    def read(cls, reader: Reader) -> Registration:
        client = reader.text()
        return cls(client, tuple(reader.i64() for _ in range(reader.count())))


@record_kind(2, name="chain-select", role="server")
@dataclass(frozen=True)
class Selection:
    round: int
    seed: bytes
    selected: tuple[str, ...]
    declined: tuple[str, ...]

    KIND: ClassVar[int]

    def encode(self) -> bytes:
        return (
            pack_u64(self.round)
            + pack_blob(self.seed)
            + _pack_ids(self.selected)
            + _pack_ids(self.declined)
        )

    @classmethod
    def read(cls, reader: Reader) -> Selection:
        return cls(reader.u64(), reader.blob(), _read_ids(reader), _read_ids(reader))


@dataclass(frozen=True)
class UpdateRecord:
    client: str
    digest: bytes
    base_digest: bytes
    n_samples: int
    accuracy: float  # NaN when the update failed a hard check before evaluation
    accepted: bool
    reason: str
    claim_signature: bytes

    def encode(self) -> bytes:
        return (
            pack_text(self.client)
            + pack_blob(self.digest)
            + pack_blob(self.base_digest)
            + pack_u64(self.n_samples)
            + pack_f64(self.accuracy)
            + pack_u8(1 if self.accepted else 0)
            + pack_text(self.reason)
            + pack_blob(self.claim_signature)
        )

    @classmethod
    def read(cls, reader: Reader) -> UpdateRecord:
        return cls(
            reader.text(),
            reader.blob(),
            reader.blob(),
            reader.u64(),
            read_f64(reader),
            reader.flag(),
            reader.text(),
            reader.blob(),
        )


@record_kind(3, name="chain-verdicts", role="miner")
@dataclass(frozen=True)
class RoundVerdicts:
    round: int
    updates: tuple[UpdateRecord, ...]  # sorted by client
    silent: tuple[str, ...]
    reputations: tuple[tuple[str, float], ...]  # every client, sorted, after this round
    privacy: tuple[tuple[str, float], ...]  # every client, sorted: epsilon spent after this round

    KIND: ClassVar[int]

    def encode(self) -> bytes:
        return (
            pack_u64(self.round)
            + pack_u32(len(self.updates))
            + b"".join(u.encode() for u in self.updates)
            + _pack_ids(self.silent)
            + _pack_scores(self.reputations)
            + _pack_scores(self.privacy)
        )

    @classmethod
    def read(cls, reader: Reader) -> RoundVerdicts:
        rnd = reader.u64()
        updates = tuple(UpdateRecord.read(reader) for _ in range(reader.count()))
        return cls(rnd, updates, _read_ids(reader), _read_scores(reader), _read_scores(reader))

    @property
    def accepted(self) -> list[str]:
        return [u.client for u in self.updates if u.accepted]

    @property
    def rejected(self) -> dict[str, str]:
        return {u.client: u.reason for u in self.updates if not u.accepted}


@record_kind(4, name="chain-summary", role="server")
@dataclass(frozen=True)
class RoundSummary:
    round: int
    model_digest: bytes
    accuracy: float
    loss: float

    KIND: ClassVar[int]

    def encode(self) -> bytes:
        return (
            pack_u64(self.round)
            + pack_blob(self.model_digest)
            + pack_f64(self.accuracy)
            + pack_f64(self.loss)
        )

    @classmethod
    def read(cls, reader: Reader) -> RoundSummary:
        return cls(reader.u64(), reader.blob(), read_f64(reader), read_f64(reader))


Record = Registration | Selection | RoundVerdicts | RoundSummary


def encode_operation(record: Record) -> bytes:
    """The canonical ``Request.operation`` bytes of ``record`` (its timestamp first)."""
    return pack_u64(timestamp_of(record)) + pack_u8(record.KIND) + record.encode()


def decode_operation(operation: bytes) -> tuple[int, Record]:
    """(timestamp, record); :class:`MalformedMessage` on anything else."""
    reader = Reader(operation)
    timestamp, code = reader.u64(), reader.u8()
    kind = RECORD_KINDS.get(code)
    if kind is None:
        raise MalformedMessage(f"unknown record kind {code}")
    record = kind.read(reader)
    reader.finish()
    return timestamp, record
