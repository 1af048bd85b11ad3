"""On-chain application records and the replicated chain state (pure: no I/O).

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

:class:`ChainState` applies committed records in order and answers what a
replica must recompute: the selection Algorithm 1 gives for the next round
(seeded, with genesis ``protocol.selection_seed = "block"``, by the digest of
the block that made the round due: the protocol's "selection randomness
from the previous block hash"), reputations
(``fl.reputation.ReputationBook`` fed from verdict records), declined
clients and privacy spent (``fl.privacy.PrivacyAccountant`` replayed from
the registrations and the participations, with the run's plan).
:meth:`ChainState.check_block` is the pure part of the miners'
``validate(block)``; what needs tensors (the verdicts themselves,
the aggregated model's digest) is injected as callbacks, so this module
stays testable without sockets or files.
"""

from __future__ import annotations

import copy
import math
import struct
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Final

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
from consensus.ledger import Block, Request
from fl.config import RunConfig
from fl.datasets import dataset_of
from fl.privacy import PrivacyAccountant, PrivacyPlan, released_count
from fl.reputation import ReputationBook
from fl.rounds import (
    dp_config,
    nominal_max_samples,
    privacy_plan,
    reputation_params,
    select_round,
)
from fl.rounds import selection_seed as run_selection_seed
from fl.selection import DataSummary, self_assessment, summary_from_histogram

KIND_REGISTER: Final = 1
KIND_SELECT: Final = 2
KIND_VERDICTS: Final = 3
KIND_SUMMARY: Final = 4
KIND_NAMES: Final = {
    KIND_REGISTER: "chain-register",
    KIND_SELECT: "chain-select",
    KIND_VERDICTS: "chain-verdicts",
    KIND_SUMMARY: "chain-summary",
}
KIND_ROLES: Final = {
    KIND_REGISTER: "client",
    KIND_SELECT: "server",
    KIND_VERDICTS: "miner",
    KIND_SUMMARY: "server",
}
# Replicas agree on verdicts exactly and on validation accuracies within this
# (absolute) tolerance; one validation image is 1/val_size, so any real
# disagreement about a prediction exceeds it for val_size < 1000.
ACCURACY_TOLERANCE: Final = 1e-6
# Reputations are replayed by the same IEEE operations on every replica; the
# tolerance only absorbs the double round trip.
FLOAT_TOLERANCE: Final = 1e-12
# Epsilons come from numerical accountants (PRV composes by FFT); replicas
# built on other numerical libraries may differ in the last digits.
PRIVACY_TOLERANCE: Final = 1e-9

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


# Records -------------------------------------------------------------------


@dataclass(frozen=True)
class Registration:
    """A client's one release about its data: its label histogram, noisy under DP.

    One count per class, then the count of records with an invalid label
    (``fl.privacy.release_histogram``). The record count, classes present
    and quality that selection uses are derived from it
    (:meth:`ChainState.summary`); the DP plan is not in the record: it
    follows from the genesis alone (``fl.rounds.privacy_plan``).
    """

    client: str
    histogram: tuple[int, ...]

    KIND = KIND_REGISTER

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


@dataclass(frozen=True)
class Selection:
    round: int
    seed: bytes
    selected: tuple[str, ...]
    declined: tuple[str, ...]

    KIND = KIND_SELECT

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


@dataclass(frozen=True)
class RoundVerdicts:
    round: int
    updates: tuple[UpdateRecord, ...]  # sorted by client
    silent: tuple[str, ...]
    reputations: tuple[tuple[str, float], ...]  # every client, sorted, after this round
    privacy: tuple[tuple[str, float], ...]  # every client, sorted: epsilon spent after this round

    KIND = KIND_VERDICTS

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


@dataclass(frozen=True)
class RoundSummary:
    round: int
    model_digest: bytes
    accuracy: float
    loss: float

    KIND = KIND_SUMMARY

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
_READERS: Final = {
    KIND_REGISTER: Registration.read,
    KIND_SELECT: Selection.read,
    KIND_VERDICTS: RoundVerdicts.read,
    KIND_SUMMARY: RoundSummary.read,
}


def encode_operation(record: Record, *, timestamp: int) -> bytes:
    """The canonical ``Request.operation`` bytes of ``record``."""
    return pack_u64(timestamp) + pack_u8(record.KIND) + record.encode()


def decode_operation(operation: bytes) -> tuple[int, Record]:
    """(timestamp, record); :class:`MalformedMessage` on anything else."""
    reader = Reader(operation)
    timestamp, kind = reader.u64(), reader.u8()
    read = _READERS.get(kind)
    if read is None:
        raise MalformedMessage(f"unknown record kind {kind}")
    record = read(reader)
    reader.finish()
    return timestamp, record


def record_kind_name(record: Record) -> str:
    """The envelope kind whose tag the submitter's signature covers."""
    return KIND_NAMES[record.KIND]


# Timestamps: one strictly increasing sequence per submitter (PBFT executes a
# (client, timestamp) once), derived from what is submitted so a restarted
# node re-submits with the same timestamp and the replicas deduplicate it.
def selection_timestamp(rnd: int) -> int:
    return 2 * rnd


def summary_timestamp(rnd: int) -> int:
    return 2 * rnd + 1


REGISTRATION_TIMESTAMP: Final = 1


def verdicts_timestamp(rnd: int) -> int:
    return rnd


# Chain state -----------------------------------------------------------------

VerifyRecord = Callable[[str, str, str, bytes, bytes], bool]
"""``verify(node_id, role, kind_name, operation, signature) -> bool`` (node.identity)."""
CheckVerdicts = Callable[["ChainState", RoundVerdicts], str]
"""Replica's own validation of the blobs behind a verdict record: '' when it agrees."""
CheckSummary = Callable[["ChainState", RoundSummary], str]
"""Replica's own aggregation for the round: '' when the summary's digest matches."""


class InvalidRecord(Exception):
    """A request that a replica must not vote for."""


@dataclass
class ChainState:
    """Everything a replica, the server or an auditor derives from the committed records."""

    config: RunConfig
    clients: tuple[str, ...]  # genesis client ids, in client-index order
    selection_seed: str = "block"  # genesis protocol.selection_seed: "block" or "run"
    height: int = 0
    head_hash: bytes = bytes(32)
    last_timestamp: dict[str, int] = field(default_factory=dict)
    registrations: dict[str, Registration] = field(default_factory=dict)
    selections: dict[int, Selection] = field(default_factory=dict)
    verdicts: dict[int, RoundVerdicts] = field(default_factory=dict)
    summaries: dict[int, RoundSummary] = field(default_factory=dict)
    book: ReputationBook = field(init=False)
    accountants: dict[str, PrivacyAccountant] = field(default_factory=dict)
    record_heights: dict[tuple[str, int], int] = field(default_factory=dict)
    # Round r -> digest of the block that made round r due: the block that
    # applied the last registration (r = 1) or the summary of round r-1.
    anchors: dict[int, bytes] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if self.selection_seed not in SELECTION_SEEDS:
            raise ValueError(
                f"selection_seed must be one of {SELECTION_SEEDS}, got {self.selection_seed!r}"
            )
        self.book = ReputationBook(reputation_params(self.config))
        self.plan: PrivacyPlan = privacy_plan(self.config)

    # Queries ---------------------------------------------------------------

    @property
    def all_registered(self) -> bool:
        return all(c in self.registrations for c in self.clients)

    @property
    def current_round(self) -> int:
        """The round whose selection is committed and whose verdicts are not (0: none)."""
        if not self.selections:
            return 0
        last = max(self.selections)
        return 0 if last in self.verdicts else last

    @property
    def last_summarised(self) -> int:
        return max(self.summaries, default=0)

    @property
    def due_round(self) -> int:
        """The round whose selection the applied records call for next (0: registrations open)."""
        return self.last_summarised + 1 if self.all_registered else 0

    def round_seed(self, rnd: int) -> bytes:
        """The seed of round ``rnd``'s draw.

        ``"block"``: the digest of the block that made the round due, fixed
        once that block is applied, so every replica, the server and an
        auditor derive it whatever commits afterwards; it cannot be
        predicted before that block is proposed. ``"run"``:
        ``fl.rounds.selection_seed`` of the run seed and the round, the seed
        ``simulate`` uses.
        """
        if self.selection_seed == "run":
            return run_selection_seed(self.config, rnd)
        anchor = self.anchors.get(rnd)
        if anchor is None:
            raise InvalidRecord(
                f"round {rnd} has no seed yet: the block that makes it due is not applied"
            )
        return anchor

    def summary(self, cid: str) -> DataSummary:
        """The data summary selection uses, derived from the client's registration."""
        histogram = self.registrations[cid].histogram
        return summary_from_histogram(cid, histogram, class_threshold=self.plan.class_threshold)

    def released_records(self, cid: str) -> int:
        """The record count the client's registration released: its FedAvg weight."""
        return released_count(self.registrations[cid].histogram)

    def self_scores(self) -> dict[str, float]:
        return {
            cid: self_assessment(
                self.summary(cid),
                max_samples=nominal_max_samples(self.config),
                num_classes=dataset_of(self.config).num_classes,
            )
            for cid in self.clients
        }

    def declined(self) -> list[str]:
        return sorted(cid for cid in self.clients if self._accountant(cid).would_exceed())

    def expected_selection(self, rnd: int) -> Selection:
        """Algorithm 1 for round ``rnd`` from this state (the same call the simulator makes)."""
        declined = self.declined()
        reputations = (
            self.book.scores(rnd - 1, clients=self.clients) if self.config.reputation else None
        )
        seed = self.round_seed(rnd)
        selected = select_round(
            self.config,
            rnd=rnd,
            self_scores=self.self_scores(),
            reputations=reputations,
            declined=declined,
            seed=seed,
        )
        return Selection(rnd, seed, tuple(selected), tuple(declined))

    def reputations_after(self, rnd: int, record: RoundVerdicts) -> tuple[tuple[str, float], ...]:
        """Reputation of every client once ``record``'s evidence is added."""
        book = copy.deepcopy(self.book)
        if self.config.reputation:
            book.record_round(rnd, record.accepted, list(record.rejected), record.silent)
        return tuple(book.scores(rnd, clients=self.clients).items())

    def privacy_after(self, record: RoundVerdicts) -> tuple[tuple[str, float], ...]:
        """Epsilon spent by every client once the participants of ``record`` are accounted."""
        sent = {u.client for u in record.updates}
        out = []
        for cid in self.clients:
            acc = self._accountant(cid)
            if cid in sent:
                acc = copy.deepcopy(acc)
                acc.record_participation()
            out.append((cid, acc.spent_epsilon()))
        return tuple(out)

    def _accountant(self, cid: str) -> PrivacyAccountant:
        acc = self.accountants.get(cid)
        if acc is None:
            acc = self.accountants[cid] = PrivacyAccountant(dp_config(self.config), self.plan)
        return acc

    # Checks ----------------------------------------------------------------

    def check_record(
        self,
        submitter: str,
        record: Record,
        *,
        check_verdicts: CheckVerdicts | None = None,
        check_summary: CheckSummary | None = None,
    ) -> None:
        """Raise :class:`InvalidRecord` unless ``record`` may be applied to this state now."""
        if isinstance(record, Registration):
            if record.client != submitter or submitter not in self.clients:
                raise InvalidRecord(f"{submitter} registers as {record.client}")
            old = self.registrations.get(record.client)
            if old is not None and old != record:
                raise InvalidRecord(f"{record.client} is already registered differently")
            if len(record.histogram) != dataset_of(self.config).num_classes + 1:
                raise InvalidRecord(
                    f"a registration holds {dataset_of(self.config).num_classes + 1} counts "
                    "(one per class, then "
                    f"invalid labels), got {len(record.histogram)}"
                )
        elif isinstance(record, Selection):
            self._check_selection(record)
        elif isinstance(record, RoundVerdicts):
            if record.round in self.verdicts:
                return  # a late duplicate from another miner: valid, applied as a no-op
            self._check_verdicts(record)
            if check_verdicts is not None:
                problem = check_verdicts(self, record)
                if problem:
                    raise InvalidRecord(problem)
        elif isinstance(record, RoundSummary):
            if record.round not in self.verdicts or record.round in self.summaries:
                raise InvalidRecord(f"no open round {record.round} to summarise")
            if record.round != self.last_summarised + 1:
                raise InvalidRecord(f"summary of round {record.round} out of order")
            if check_summary is not None:
                problem = check_summary(self, record)
                if problem:
                    raise InvalidRecord(problem)

    def _check_selection(self, record: Selection) -> None:
        rnd = record.round
        if not self.all_registered:
            raise InvalidRecord("selection before every client registered")
        if rnd != len(self.selections) + 1 or rnd != self.last_summarised + 1:
            raise InvalidRecord(f"selection for round {rnd} out of order")
        if rnd > self.config.rounds:
            raise InvalidRecord(f"round {rnd} is past the configured {self.config.rounds}")
        if self.selection_seed == "block" and rnd not in self.anchors:
            # In check_block's trial copy: the record that made the round due
            # is earlier in this same block, whose digest (the seed) does not
            # exist until the block is proposed. The server waits for that
            # block to commit before it submits the selection.
            raise InvalidRecord(
                f"selection for round {rnd} in the block that makes the round due "
                "(its seed is that block's digest): it belongs in a later block"
            )
        expected = self.expected_selection(rnd)
        if record.seed != expected.seed:
            raise InvalidRecord(
                f"selection for round {rnd} has seed {record.seed.hex()[:16]}, the chain gives "
                f"{expected.seed.hex()[:16]} (selection_seed = {self.selection_seed})"
            )
        if record != expected:
            raise InvalidRecord(
                f"selection for round {rnd} differs from Algorithm 1 on the chain: "
                f"{list(record.selected)} != {list(expected.selected)}"
            )

    def _check_verdicts(self, record: RoundVerdicts) -> None:
        rnd = record.round
        selection = self.selections.get(rnd)
        if selection is None or rnd != self.current_round:
            raise InvalidRecord(f"verdicts for round {rnd}, which is not open")
        clients = [u.client for u in record.updates]
        if clients != sorted(set(clients)) or not set(clients) <= set(selection.selected):
            raise InvalidRecord("updates must be from distinct selected clients, sorted")
        if record.silent != tuple(sorted(set(selection.selected) - set(clients))):
            raise InvalidRecord("silent clients are not the selected clients without an update")
        if not _close(record.reputations, self.reputations_after(rnd, record)):
            raise InvalidRecord("reputations differ from the recomputation")
        if not _close(record.privacy, self.privacy_after(record), PRIVACY_TOLERANCE):
            raise InvalidRecord("privacy spent differs from the recomputation")

    # Application -------------------------------------------------------------

    def apply_record(self, submitter: str, record: Record) -> None:
        """Apply a committed (already validated) record."""
        if isinstance(record, Registration):
            if record.client not in self.registrations:
                self.registrations[record.client] = record
                self._accountant(record.client).record_registration()
        elif isinstance(record, Selection):
            self.selections.setdefault(record.round, record)
        elif isinstance(record, RoundVerdicts):
            if record.round in self.verdicts:
                return
            self.verdicts[record.round] = record
            if self.config.reputation:
                self.book.record_round(
                    record.round, record.accepted, list(record.rejected), record.silent
                )
            for u in record.updates:
                self._accountant(u.client).record_participation()
        elif isinstance(record, RoundSummary):
            self.summaries.setdefault(record.round, record)

    def _fresh(self, request: Request) -> bool:
        return request.timestamp > self.last_timestamp.get(request.client, -1)

    def apply_block(self, block: Block) -> None:
        """Apply a committed block (height must be the next one)."""
        if block.height != self.height + 1:
            raise ValueError(f"block {block.height} applied at height {self.height}")
        due = self.due_round
        for request in block.requests():
            if not self._fresh(request):
                continue
            self.last_timestamp[request.client] = request.timestamp
            try:
                _, record = decode_operation(request.operation)
            except MalformedMessage:
                continue  # never validated by an honest quorum; nothing to apply
            self.record_heights.setdefault(
                (KIND_NAMES[record.KIND], _round_of(record)), block.height
            )
            self.apply_record(request.client, record)
        self.height = block.height
        self.head_hash = block.digest
        if self.due_round != due:
            self.anchors[self.due_round] = block.digest

    def check_block(
        self,
        block: Block,
        *,
        verify: VerifyRecord,
        role_of: Mapping[str, str],
        check_verdicts: CheckVerdicts | None = None,
        check_summary: CheckSummary | None = None,
    ) -> str:
        """'' when every fresh request of ``block`` is valid in order, else why not.

        Stale requests (already executed timestamps) are skipped exactly as
        the replica skips them at execution.
        """
        trial = copy.deepcopy(self)
        for request in block.requests():
            if not trial._fresh(request):
                continue
            problem = trial.check_request(
                request,
                verify=verify,
                role_of=role_of,
                check_verdicts=check_verdicts,
                check_summary=check_summary,
            )
            if problem:
                return f"request {request.client}/{request.timestamp}: {problem}"
            trial.last_timestamp[request.client] = request.timestamp
            trial.apply_record(request.client, decode_operation(request.operation)[1])
        return ""

    def check_request(
        self,
        request: Request,
        *,
        verify: VerifyRecord,
        role_of: Mapping[str, str],
        check_verdicts: CheckVerdicts | None = None,
        check_summary: CheckSummary | None = None,
    ) -> str:
        """'' when ``request`` is authentic, well-formed and valid on this state."""
        try:
            timestamp, record = decode_operation(request.operation)
        except MalformedMessage as exc:
            return f"malformed record: {exc}"
        if timestamp != request.timestamp:
            return "timestamp differs from the signed record's"
        role = KIND_ROLES[record.KIND]
        if role_of.get(request.client) != role:
            return f"{request.client} may not submit {record_kind_name(record)} (needs a {role})"
        if not verify(
            request.client, role, record_kind_name(record), request.operation, request.signature
        ):
            return "bad signature"
        try:
            self.check_record(
                request.client, record, check_verdicts=check_verdicts, check_summary=check_summary
            )
        except InvalidRecord as exc:
            return str(exc)
        return ""


def _round_of(record: Record) -> int:
    return 0 if isinstance(record, Registration) else record.round


def _close(
    a: Sequence[tuple[str, float]], b: Sequence[tuple[str, float]], tol: float = FLOAT_TOLERANCE
) -> bool:
    return len(a) == len(b) and all(
        ka == kb and abs(va - vb) <= tol for (ka, va), (kb, vb) in zip(a, b, strict=True)
    )


def verdicts_agree(claimed: RoundVerdicts, own: Mapping[str, tuple[bool, str, float]]) -> str:
    """'' when ``own`` (client -> accepted, reason, accuracy) matches ``claimed``'s verdicts.

    Verdicts must be equal; accuracies within :data:`ACCURACY_TOLERANCE`
    (NaN, an update never evaluated, matches only NaN).
    """
    if sorted(own) != [u.client for u in claimed.updates]:
        return "verdicts cover other clients than the replica's own validation"
    for u in claimed.updates:
        accepted, _reason, accuracy = own[u.client]
        if accepted != u.accepted:
            return f"{u.client}: verdict {u.accepted} but the replica finds {accepted}"
        both_nan = math.isnan(accuracy) and math.isnan(u.accuracy)
        if not both_nan and not abs(accuracy - u.accuracy) <= ACCURACY_TOLERANCE:
            return f"{u.client}: accuracy {u.accuracy} but the replica finds {accuracy}"
    return ""
