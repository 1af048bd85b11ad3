"""The replicated chain state and the round lifecycle (pure: no I/O).

:class:`ChainState` applies committed records in order and answers what a
replica must recompute: the selection Algorithm 1 gives for the next round
(seeded, with genesis ``protocol.selection_seed = "block"``, by the digest of
the block that made the round due: the protocol's "selection randomness
from the previous block hash"), reputations
(``fl.reputation.ReputationBook`` fed from verdict records), declined
clients and privacy spent (``fl.privacy.PrivacyAccountant`` replayed from
the registrations and the participations, with the run's plan).

The round lifecycle is one table, :data:`TRANSITIONS` (h11's ``_state.py``
is the model): for each :class:`Phase`, the record kinds that may be
applied and the phase each leads to. Two transitions follow from the state
rather than from a record, and are in :meth:`ChainState._settle`: the last
registration opens round 1, and the summary of the last round ends the run.
A record the table does not allow in the current phase is refused before
any record-specific check runs; a late second verdict record of a round
(from another miner) is a valid no-op in any phase. A second registration of
a client is refused, identical or not, and so is any request whose
(submitter, timestamp) the chain already executed: nothing is stored twice.
What a record must satisfy to be admitted (the DP plan, the histogram and
its record cap) is ``chain.admission``.

:meth:`ChainState.check_block` is the pure part of the miners'
``validate(block)``; what needs tensors (the verdicts themselves, the
aggregated model's digest) is injected as callbacks, so this module stays
testable without sockets or files. The simulator drives the same state
through ``chain.sequencer``.
"""

from __future__ import annotations

import copy
import enum
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Final

from chain.admission import plan_problems, registration_problems
from chain.records import (
    SELECTION_SEEDS,
    Record,
    Registration,
    RoundSummary,
    RoundVerdicts,
    Selection,
    decode_operation,
    kind_of,
    record_kind_name,
    timestamp_of,
)
from consensus.canonical import MalformedMessage
from consensus.ledger import Block, Request
from fl.config import RunConfig
from fl.datasets import dataset_of
from fl.privacy import PrivacyAccountant, PrivacyPlan, released_count
from fl.reputation import ReputationBook
from fl.rounds import (
    dp_config,
    nominal_max_samples,
    privacy_plan,
    record_cap,
    reputation_params,
    select_round,
)
from fl.rounds import selection_seed as run_selection_seed
from fl.selection import DataSummary, self_assessment, summary_from_histogram

# Reputations are replayed by the same IEEE operations on every replica; the
# tolerance only absorbs the double round trip.
FLOAT_TOLERANCE: Final = 1e-12
# Epsilons come from numerical accountants (PRV composes by FFT); replicas
# built on other numerical libraries may differ in the last digits.
PRIVACY_TOLERANCE: Final = 1e-9

VerifyRecord = Callable[[str, str, str, bytes, bytes], bool]
"""``verify(node_id, role, kind_name, operation, signature) -> bool`` (node.identity)."""
CheckVerdicts = Callable[["ChainState", RoundVerdicts], str]
"""Replica's own validation of the blobs behind a verdict record: '' when it agrees."""
CheckSummary = Callable[["ChainState", RoundSummary], str]
"""Replica's own aggregation for the round: '' when the summary's digest matches."""


class InvalidRecord(Exception):
    """A request that a replica must not vote for."""


class Phase(enum.Enum):
    REGISTERING = "registrations are open"
    SELECTING = "the next round awaits its selection"
    TRAINING = "the round awaits its verdicts"
    AGGREGATING = "the round awaits its summary"
    DONE = "every round is summarised"


TRANSITIONS: Final[Mapping[Phase, Mapping[type, Phase]]] = {
    Phase.REGISTERING: {Registration: Phase.REGISTERING},
    Phase.SELECTING: {Selection: Phase.TRAINING},
    Phase.TRAINING: {RoundVerdicts: Phase.AGGREGATING},
    Phase.AGGREGATING: {RoundSummary: Phase.SELECTING},
    Phase.DONE: {},
}
"""Phase -> record kind -> the phase after it is applied (every allowed move)."""


@dataclass
class ChainState:
    """Everything a replica, the server or an auditor derives from the committed records."""

    config: RunConfig
    clients: tuple[str, ...]  # genesis client ids, in client-index order
    selection_seed: str = "block"  # genesis protocol.selection_seed: "block" or "run"
    height: int = 0
    head_hash: bytes = bytes(32)
    phase: Phase = Phase.REGISTERING
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
        problems = plan_problems(self.plan)
        if problems:
            raise ValueError("the run's DP plan is out of range: " + "; ".join(problems))
        self.record_cap = record_cap(self.config)

    # Queries ---------------------------------------------------------------

    @property
    def all_registered(self) -> bool:
        return all(c in self.registrations for c in self.clients)

    @property
    def current_round(self) -> int:
        """The round whose selection is committed and whose verdicts are not (0: none)."""
        return max(self.selections) if self.phase is Phase.TRAINING else 0

    @property
    def last_summarised(self) -> int:
        return max(self.summaries, default=0)

    @property
    def due_round(self) -> int:
        """The round whose selection the applied records call for next (0: registrations open)."""
        return 0 if self.phase is Phase.REGISTERING else self.last_summarised + 1

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
        """The record count the client's registration released (at most the record cap):
        its FedAvg weight, before ``fl.aggregation.fedavg_weights`` bounds it in its round."""
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

    def _already_applied(self, record: Record) -> bool:
        # A late duplicate from another miner: the primary and a backup may
        # both submit a round's verdicts (chain.verdicts.submits_now).
        return isinstance(record, RoundVerdicts) and record.round in self.verdicts

    def check_record(
        self,
        submitter: str,
        record: Record,
        *,
        check_verdicts: CheckVerdicts | None = None,
        check_summary: CheckSummary | None = None,
    ) -> None:
        """Raise :class:`InvalidRecord` unless ``record`` may be applied to this state now."""
        if self._already_applied(record):
            return
        if type(record) not in TRANSITIONS[self.phase]:
            raise InvalidRecord(
                f"no {record_kind_name(record)} (round {record.round}) while {self.phase.value}"
                + (f" (round {max(self.selections)})" if self.selections else "")
            )
        if isinstance(record, Registration):
            self._check_registration(submitter, record)
        elif isinstance(record, Selection):
            self._check_selection(record)
        elif isinstance(record, RoundVerdicts):
            self._check_verdicts(record)
            if check_verdicts is not None:
                problem = check_verdicts(self, record)
                if problem:
                    raise InvalidRecord(problem)
        elif isinstance(record, RoundSummary):
            if record.round != max(self.selections):
                raise InvalidRecord(f"summary of round {record.round} out of order")
            if check_summary is not None:
                problem = check_summary(self, record)
                if problem:
                    raise InvalidRecord(problem)

    def _check_registration(self, submitter: str, record: Registration) -> None:
        if record.client != submitter or submitter not in self.clients:
            raise InvalidRecord(f"{submitter} registers as {record.client}")
        if record.client in self.registrations:
            same = self.registrations[record.client] == record
            raise InvalidRecord(
                f"{record.client} is already registered"
                + (" (the same registration again)" if same else " differently")
            )
        problems = registration_problems(
            record.histogram,
            num_classes=dataset_of(self.config).num_classes,
            cap=self.record_cap,
        )
        if problems:
            raise InvalidRecord(f"registration of {record.client}: " + "; ".join(problems))

    def _check_selection(self, record: Selection) -> None:
        rnd = record.round
        if rnd != self.due_round:
            raise InvalidRecord(f"selection for round {rnd} out of order")
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
        if rnd != self.current_round:
            raise InvalidRecord(f"verdicts for round {rnd}, which is not open")
        selection = self.selections[rnd]
        clients = [u.client for u in record.updates]
        if clients != sorted(set(clients)) or not set(clients) <= set(selection.selected):
            raise InvalidRecord("updates must be from distinct selected clients, sorted")
        if record.silent != tuple(sorted(set(selection.selected) - set(clients))):
            raise InvalidRecord("silent clients are not the selected clients without an update")
        for u in record.updates:
            if u.n_samples != self.released_records(u.client):
                raise InvalidRecord(
                    f"{u.client}'s update claims {u.n_samples} records, its registration "
                    f"{self.released_records(u.client)}"
                )
        if not _close(record.reputations, self.reputations_after(rnd, record)):
            raise InvalidRecord("reputations differ from the recomputation")
        if not _close(record.privacy, self.privacy_after(record), PRIVACY_TOLERANCE):
            raise InvalidRecord("privacy spent differs from the recomputation")

    # Application -------------------------------------------------------------

    def apply_record(self, submitter: str, record: Record) -> None:
        """Apply a committed (already validated) record."""
        if self._already_applied(record):
            return
        following = TRANSITIONS[self.phase].get(type(record))
        if following is None:
            return  # never validated by an honest quorum; nothing to apply
        if isinstance(record, Registration):
            if record.client in self.registrations:
                return  # a second registration: never validated by an honest quorum
            self.registrations[record.client] = record
            self._accountant(record.client).record_registration()
        elif isinstance(record, Selection):
            self.selections[record.round] = record
        elif isinstance(record, RoundVerdicts):
            self.verdicts[record.round] = record
            if self.config.reputation:
                self.book.record_round(
                    record.round, record.accepted, list(record.rejected), record.silent
                )
            for u in record.updates:
                self._accountant(u.client).record_participation()
        elif isinstance(record, RoundSummary):
            self.summaries[record.round] = record
        self.phase = following
        self._settle()

    def _settle(self) -> None:
        """The transitions that follow from the state, not from a record."""
        if self.phase is Phase.REGISTERING and self.all_registered:
            self.phase = Phase.SELECTING
        if self.phase is Phase.SELECTING and self.last_summarised >= self.config.rounds:
            self.phase = Phase.DONE

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
            self.record_heights.setdefault((kind_of(record).name, record.round), block.height)
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
        """'' when every request of ``block`` is valid in order, else why not.

        A request whose (submitter, timestamp) the chain already executed,
        earlier or in this block, is refused: an honest primary never
        proposes one (it drops them from its pool), so a block holding one
        would only store a duplicate. (``apply_block`` still skips them: a
        committed block is a fact.)
        """
        trial = copy.deepcopy(self)
        for request in block.requests():
            if not trial._fresh(request):
                return (
                    f"request {request.client}/{request.timestamp}: timestamp already used "
                    f"(the chain executes a submitter's timestamp once)"
                )
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
        if timestamp != timestamp_of(record):
            return f"timestamp {timestamp} is not the record's ({timestamp_of(record)})"
        kind = kind_of(record)
        if role_of.get(request.client) != kind.role:
            return f"{request.client} may not submit {kind.name} (needs a {kind.role})"
        if not verify(request.client, kind.role, kind.name, request.operation, request.signature):
            return "bad signature"
        try:
            self.check_record(
                request.client, record, check_verdicts=check_verdicts, check_summary=check_summary
            )
        except InvalidRecord as exc:
            return str(exc)
        return ""


def _close(
    a: Sequence[tuple[str, float]], b: Sequence[tuple[str, float]], tol: float = FLOAT_TOLERANCE
) -> bool:
    return len(a) == len(b) and all(
        ka == kb and abs(va - vb) <= tol for (ka, va), (kb, vb) in zip(a, b, strict=True)
    )
