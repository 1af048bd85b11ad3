"""The miner: a PBFT replica with its chain state, update blobs, models and validation.

The replica (``consensus.replica.Replica``) is driven exactly as
docs/CONSENSUS.md says: ``step`` for every PBFT message from a peer,
``tick`` on a timer of ``protocol.tick_ms``, ``propose`` for submitted
records; each ``Ready`` is persisted (``BlockStore``, SQLite) before its
messages are sent. The application side is :class:`chain.records.ChainState`
plus what needs tensors: the update blobs (:class:`node.offchain.BlobStore`)
and the recomputed global models (:class:`node.offchain.GlobalModels`).
The daemon around it (the ``Miner`` service, the timer) is
``node.miner_service``; the links to the other miners are ``node.peers``.

Round r at a miner: once the selection of r is committed, selected clients
upload their updates (``SubmitUpdate``); when every selected client has
uploaded, or the round deadline passed, the miner validates the round's
updates (``fl.rounds.validate_round``, the simulator's call) and submits a
verdict record. The first verdict record of a round that commits counts;
every replica re-validates the same blobs before voting for it.
"""

from __future__ import annotations

import asyncio
import math
from pathlib import Path

from chain.records import (
    ChainState,
    RoundSummary,
    RoundVerdicts,
    UpdateRecord,
    encode_operation,
    record_kind_name,
    verdicts_agree,
    verdicts_timestamp,
)
from consensus.ledger import Block, Request
from consensus.replica import Replica
from consensus.store import BlockStore
from fl.data import Split
from fl.models import build_model
from fl.rounds import validate_round
from fl.seeds import torch_generator
from fl.validation import structural_problem
from node.daemon import NodeLog, record_verifier, roles_of
from node.genesis import Genesis
from node.identity import Identity, pbft_signer, pbft_verifier
from node.offchain import BlobStore, GlobalModels, as_update, initial_spec
from node.peers import PeerLink
from node.tensor_receiver import ReceivedTensors


class Miner:
    """Replica, chain state, blobs and models of one miner; the servicers call into it."""

    def __init__(
        self,
        genesis: Genesis,
        identity: Identity,
        *,
        db_path: Path,
        run_dir: Path,
        validation: Split,
        log: NodeLog,
    ) -> None:
        self.genesis = genesis
        self.config = genesis.run
        self.identity = identity
        self.log = log
        members = genesis.membership
        self.membership = members
        me = members[identity.node_id]
        if me.role != "miner" or me.public_key != identity.public_key or me.replica is None:
            raise ValueError(f"{identity.node_id} is not a miner of this genesis")
        self.index = me.replica
        self.n = genesis.protocol.miners
        self.verify_pbft = pbft_verifier(members)
        self.verify_record = record_verifier(members)
        self.roles = roles_of(members)
        self.store = BlockStore(db_path, verify=self.verify_pbft, n=self.n)
        if not self.store.verdict.ok:
            log.warning(f"store truncated: {self.store.verdict.reason}")
        self.state = ChainState(
            self.config,
            clients=tuple(c.node_id for c in members.clients),
            selection_seed=genesis.protocol.selection_seed,
        )
        for block in self.store.read_range(1, self.store.height() + 1):
            self.state.apply_block(block)
        self.spec = initial_spec(self.config)
        self.blobs = BlobStore(
            run_dir,
            membership=members,
            spec=self.spec,
            max_bytes=genesis.protocol.max_stream_bytes,
        )
        self.models = GlobalModels(self.config)
        self.validation = validation
        self.scratch = build_model(self.config.model, generator=torch_generator(0, "scratch"))
        self.sign_pbft = pbft_signer(identity)
        self.replica = Replica(
            replica_id=self.index,
            n=self.n,
            sign=self.sign_pbft,
            verify=self.verify_pbft,
            validate=self._validate,
            chain=self.store,
            restored_view=self.store.load_view(),
            timeout=genesis.protocol.view_timeout_ticks,
        )
        self.peers = {
            m.replica: PeerLink(m.address, log) for m in members.miners if m.replica != self.index
        }
        self.submitted: set[int] = set()
        # Correctly signed updates refused for their values (NaN): never
        # stored, but recorded on chain as rejected ("malformed"), as the
        # simulator's validate_round does.
        self.malformed: dict[int, dict[str, tuple[ReceivedTensors, str]]] = {}
        self.opened_at: dict[int, float] = {}
        self.ready_at: dict[int, float] = {}
        self._own_verdicts: dict[tuple, dict[str, tuple[bool, str, float]]] = {}

    # Consensus driving --------------------------------------------------------

    def drain(self) -> None:
        """Persist, send and apply everything the replica has ready."""
        while self.replica.has_ready():
            ready = self.replica.ready()
            if ready.view is not None:
                self.store.save_view(ready.view)
            for block in ready.blocks:
                self.store.append(block)
            for dest, message in ready.messages:
                data = message.encode()
                targets = self.peers.values() if dest is None else [self.peers.get(dest)]
                for peer in targets:
                    if peer is not None:
                        peer.send(data)
            for committed in ready.committed:
                self._apply(committed.block)
            self.replica.advance()
        rnd = self.state.current_round
        if rnd and rnd not in self.opened_at:
            self.opened_at[rnd] = asyncio.get_running_loop().time()
            self.log.round = rnd
            self.log.info(
                f"round {rnd} open at height {self.state.height}: "
                f"selected {list(self.state.selections[rnd].selected)}"
            )

    def _apply(self, block: Block) -> None:
        if block.height == self.state.height + 1:
            self.state.apply_block(block)

    def _catch_up(self) -> None:
        # The core validates block h+1 in the same step that executed h, before
        # the caller has seen h in a Ready: apply those committed blocks first.
        for committed in self.replica.committed_pending():
            self._apply(committed.block)

    def _validate(self, block: Block) -> bool:
        self._catch_up()
        if block.header.previous_hash != self.state.head_hash:
            self.log.warning(f"block {block.height} does not extend the applied chain")
            return False
        problem = self.state.check_block(
            block,
            verify=self.verify_record,
            role_of=self.roles,
            check_verdicts=self._check_verdicts,
            check_summary=self._check_summary,
        )
        if problem:
            self.log.warning(f"rejecting block {block.height}: {problem}")
            return False
        return True

    def _check_summary(self, state: ChainState, record: RoundSummary) -> str:
        digest = self.models.digest(record.round + 1, state, self.blobs)
        if digest is None:
            return f"cannot recompute the model after round {record.round} (missing blobs)"
        if digest != record.model_digest:
            return f"model digest of round {record.round} differs from the recomputed aggregate"
        return ""

    def _check_verdicts(self, state: ChainState, record: RoundVerdicts) -> str:
        base = self.models.digest(record.round, state, self.blobs)
        if base is None:
            return f"no global model for round {record.round}"
        evaluated = []
        for u in record.updates:
            received = self.blobs.get(u.digest, u.client)
            if received is None:
                problem = self._check_malformed_entry(record.round, u)
                if problem:
                    return problem
                continue
            evaluated.append(u)
            if (
                received.sender.node_id != u.client
                or received.round != record.round
                or received.num_samples != u.n_samples
                or received.base_digest != u.base_digest
                or u.base_digest != base
                or received.claim.signature != u.claim_signature
            ):
                return f"{u.client}: record does not match the signed update"
        own = self._own_validation(
            state, record.round, [(u.client, u.digest, u.n_samples) for u in evaluated]
        )
        return verdicts_agree(RoundVerdicts(record.round, tuple(evaluated), (), (), ()), own)

    def _check_malformed_entry(self, rnd: int, u: UpdateRecord) -> str:
        seen = self.malformed.get(rnd, {}).get(u.client)
        if seen is None or seen[0].digest != u.digest:
            return f"{u.client}: update {u.digest.hex()[:12]} not held"
        evidence, reason = seen
        if (
            u.accepted
            or u.reason != reason
            or not math.isnan(u.accuracy)
            or u.claim_signature != evidence.claim.signature
            or u.n_samples != evidence.num_samples
            or u.base_digest != evidence.base_digest
        ):
            return f"{u.client}: malformed update recorded differently"
        return ""

    def note_malformed(self, evidence: ReceivedTensors) -> None:
        """Remember a selected client's signed update that was refused for its values."""
        cid, rnd = evidence.sender.node_id, evidence.round
        state = self.state
        if rnd != state.current_round or cid not in state.selections[rnd].selected:
            return
        weights = self.models.weights(rnd, state, self.blobs)
        if weights is None or evidence.base_digest != self.models.digest(rnd, state, self.blobs):
            return
        if evidence.num_samples != state.released_records(cid):
            return
        problem = structural_problem(evidence.weights, weights) or "malformed update"
        self.malformed.setdefault(rnd, {}).setdefault(cid, (evidence, f"malformed: {problem}"))

    def _own_validation(
        self, state: ChainState, rnd: int, digests: list[tuple[str, bytes, int]]
    ) -> dict[str, tuple[bool, str, float]]:
        """Verdicts of ``validate_round`` over (client, digest, samples) of round ``rnd``."""
        key = (rnd, tuple(digests))
        if key not in self._own_verdicts:
            weights = self.models.weights(rnd, state, self.blobs)
            assert weights is not None
            updates = [
                as_update(self.blobs.get(d, c), client=c, n_samples=n)  # type: ignore[arg-type]
                for c, d, n in digests
            ]
            verdicts = validate_round(
                self.config,
                model=self.scratch,
                global_weights=weights,
                updates=updates,
                validation=self.validation,
            )
            self._own_verdicts[key] = {
                cid: (v.accepted, v.reason, math.nan if v.accuracy is None else v.accuracy)
                for cid, v in verdicts.items()
            }
        return self._own_verdicts[key]

    # Round work ----------------------------------------------------------------

    def maybe_submit_verdicts(self) -> None:
        """Submit this miner's verdict record once the round's uploads are complete."""
        state = self.state
        rnd = state.current_round
        if rnd == 0 or rnd in self.submitted:
            return
        selection = state.selections[rnd]
        have = self.blobs.by_round.get(rnd, {})
        bad = {c: v for c, v in self.malformed.get(rnd, {}).items() if c not in have}
        complete = all(cid in have or cid in bad for cid in selection.selected)
        now = asyncio.get_running_loop().time()
        deadline = self.opened_at.get(rnd, math.inf) + self.genesis.protocol.round_deadline_ms / 1e3
        if not complete and now < deadline:
            return
        # The primary submits at once; backups only if no verdicts committed
        # within two view timeouts (the primary may be down), so a round
        # normally adds one verdict record to the chain, not n.
        ready_at = self.ready_at.setdefault(rnd, now)
        fallback = 2 * self.genesis.protocol.view_timeout_ms / 1e3
        if not self.replica.is_primary and now < ready_at + fallback:
            return
        if self.models.weights(rnd, state, self.blobs) is None:
            return
        good = sorted(cid for cid in have if cid in selection.selected)
        own = self._own_validation(
            state,
            rnd,
            [(c, have[c], state.released_records(c)) for c in good],
        )
        clients = sorted([*good, *bad])
        updates = []
        for cid in clients:
            if cid in bad:
                evidence, reason = bad[cid]
                updates.append(
                    UpdateRecord(
                        cid,
                        evidence.digest,
                        evidence.base_digest,
                        evidence.num_samples,
                        math.nan,
                        False,
                        reason,
                        evidence.claim.signature,
                    )
                )
                continue
            digest = have[cid]
            received = self.blobs.get(digest, cid)
            assert received is not None
            accepted, reason, accuracy = own[cid]
            updates.append(
                UpdateRecord(
                    cid,
                    digest,
                    received.base_digest,
                    received.num_samples,
                    accuracy,
                    accepted,
                    reason,
                    received.claim.signature,
                )
            )
        silent = tuple(sorted(set(selection.selected) - set(clients)))
        draft = RoundVerdicts(rnd, tuple(updates), silent, (), ())
        record = RoundVerdicts(
            rnd,
            tuple(updates),
            silent,
            state.reputations_after(rnd, draft),
            state.privacy_after(draft),
        )
        operation = encode_operation(record, timestamp=verdicts_timestamp(rnd))
        envelope = self.identity.sign(record_kind_name(record), operation)
        self.submitted.add(rnd)
        self.log.info(
            f"verdicts: accepted {record.accepted}, rejected {sorted(record.rejected)}, "
            f"silent {list(silent)}"
        )
        self.replica.propose(
            Request(self.identity.node_id, verdicts_timestamp(rnd), operation, envelope.signature)
        )

    def status(self) -> tuple[int, int, bytes]:
        head = self.store.head()
        rnd = max(self.state.selections, default=0)
        return rnd, self.store.height(), head.digest if head is not None else b""
