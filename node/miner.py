"""The miner: a PBFT replica with its chain state, update blobs, models and validation.

The replica (``consensus.replica.Replica``) is driven exactly as
docs/CONSENSUS.md says: ``step`` for every PBFT message from a peer,
``tick`` on a timer of ``protocol.tick_ms``, ``propose`` for submitted
records; each ``Ready`` is persisted (``BlockStore``, SQLite) before its
messages are sent. The application side is :class:`chain.records.ChainState`
plus what needs tensors: the update blobs (:class:`node.offchain.BlobStore`)
and the recomputed global models (:class:`chain.models.GlobalModels`); the
verdict rules are ``chain.verdicts``.
The daemon around it (the ``Miner`` service, the timer) is
``node.miner_service``; the links to the other miners are ``node.peers``.

A full disk (``node.full_disk``) turns the miner read-only. When it strikes
while a ``Ready`` is persisted, that Ready's messages are never sent, and the
replica and the chain state, which may hold votes and blocks that never
reached the store, are rebuilt from the store, as after a crash: the new
replica abstains in every view up to the stored one (it may have voted
there), and once space returns it catches up from its peers by state
transfer. Nothing the replica sent was ever ahead of what the store holds.

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
import time
from pathlib import Path
from typing import Any

import torch

from chain.models import GlobalModels, initial_spec
from chain.records import (
    RoundSummary,
    RoundVerdicts,
    UpdateRecord,
    encode_operation,
    record_kind_name,
    timestamp_of,
)
from chain.state import ChainState
from chain.verdicts import (
    OwnVerdict,
    Upload,
    admits_malformed,
    build_verdicts,
    check_verdicts,
    own_verdicts,
    round_history,
    round_ready,
    submits_now,
    uploads_complete,
)
from consensus.ledger import Block, Request
from consensus.replica import Ready, Replica
from consensus.store import BlockStore
from fl.config import RunConfig
from fl.copies import RoundHistory
from fl.data import Split
from fl.models import model_for
from fl.rounds import ClientUpdate, validate_round
from fl.seeds import torch_generator
from fl.validation import structural_problem
from node.daemon import NodeLog, record_verifier, roles_of
from node.errors import DiskFull
from node.full_disk import DiskGuard
from node.genesis import Genesis
from node.identity import Identity, pbft_signer, pbft_verifier
from node.metrics import BLOCKS, VALIDATION
from node.offchain import BlobStore, as_update, upload_of
from node.peers import PeerLink
from node.serving import StatusInfo
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
        self.disk = DiskGuard(log, Path(db_path).parent, Path(run_dir) / "blobs")
        self.store = BlockStore(db_path, verify=self.verify_pbft, n=self.n)
        if self.store.set_aside is not None:
            log.error(f"{self.store.verdict.reason}; the chain will be fetched again from peers")
        elif not self.store.verdict.ok:
            log.warning(f"store truncated: {self.store.verdict.reason}")
        self.state = self._state_from_store()
        self.spec = initial_spec(self.config)
        self.blobs = BlobStore(
            run_dir,
            membership=members,
            spec=self.spec,
            max_bytes=genesis.protocol.max_stream_bytes,
            disk=self.disk,
        )
        self.models = GlobalModels(self.config)
        self.validation = validation
        self.scratch = model_for(self.config, generator=torch_generator(0, "scratch"))
        self.sign_pbft = pbft_signer(identity)
        self.replica = self._replica_from_store(restored_view=self.store.load_view())
        self.peers = {
            m.replica: PeerLink(m.address, identity, log, name=m.node_id)
            for m in members.miners
            if m.replica != self.index
        }
        self.peer_ids = {m.replica: m.node_id for m in members.miners}
        self._logged_view = self.replica.view
        log.view, log.height = self.replica.view, self.state.height
        self.submitted: set[int] = set()
        # Correctly signed updates refused for their values (NaN): never
        # stored, but recorded on chain as rejected ("malformed"), as the
        # simulator's validate_round does.
        self.malformed: dict[int, dict[str, tuple[Upload, str]]] = {}
        self.opened_at: dict[int, float] = {}
        self.ready_at: dict[int, float] = {}
        self._own_verdicts: dict[tuple, dict[str, tuple[bool, str, float]]] = {}

    def _state_from_store(self) -> ChainState:
        state = ChainState(
            self.config,
            clients=tuple(c.node_id for c in self.membership.clients),
            selection_seed=self.genesis.protocol.selection_seed,
        )
        for block in self.store.read_range(1, self.store.height() + 1):
            state.apply_block(block)
        return state

    def _replica_from_store(self, *, restored_view: int | None) -> Replica:
        return Replica(
            replica_id=self.index,
            n=self.n,
            sign=self.sign_pbft,
            verify=self.verify_pbft,
            validate=self._validate,
            chain=self.store,
            restored_view=restored_view,
            timeout=self.genesis.protocol.view_timeout_ticks,
        )

    def _reload_from_store(self) -> None:
        """Forget what the replica and the chain state hold beyond the store (a failed persist).

        The new replica abstains through the stored view, and through view 0
        when none is stored: the old one sent messages only in those views (a
        Ready's messages go out after its view is stored), and may have voted
        in them. Requests waiting in the old replica's pool are lost with it;
        the other miners hold them, and verdicts not yet on the chain are
        submitted again.
        """
        self.state = self._state_from_store()
        self.replica = self._replica_from_store(restored_view=self.store.load_view() or 0)
        self.submitted &= set(self.state.verdicts)
        self._logged_view = self.replica.view
        self.log.view, self.log.height = self.replica.view, self.state.height

    # Consensus driving --------------------------------------------------------

    def drain(self) -> None:
        """Persist, send and apply everything the replica has ready.

        Raises :class:`node.errors.DiskFull` while read-only, and when a
        persist fails for want of space: the miner is then read-only, with
        its replica and chain state rebuilt from the store (module docstring).
        """
        self.disk.check()
        while self.replica.has_ready():
            ready = self.replica.ready()
            what = f"storing block {ready.blocks[0].height}" if ready.blocks else "storing the view"
            try:
                with self.disk.writing(what):
                    self._persist(ready)
            except DiskFull:
                self._reload_from_store()
                raise
            for dest, message in ready.messages:
                data = message.encode()
                targets = self.peers.values() if dest is None else [self.peers.get(dest)]
                for peer in targets:
                    if peer is not None:
                        peer.send(data)
            for committed in ready.committed:
                self._apply(committed.block)
            self.replica.advance()
        self.log.view = self.replica.view
        rnd = self.state.current_round
        if rnd and rnd not in self.opened_at:
            self.opened_at[rnd] = asyncio.get_running_loop().time()
            self.log.round = rnd
            self.log.info(
                f"round {rnd} open at height {self.state.height}: "
                f"selected {list(self.state.selections[rnd].selected)}",
                event="round-start",
            )

    def _persist(self, ready: Ready) -> None:
        if ready.view is not None:
            self.store.save_view(ready.view)
            if ready.view != self._logged_view:
                self.log.view = ready.view
                self.log.warning(
                    f"view change: view {self._logged_view} -> {ready.view} "
                    f"(primary {self.peer_ids[ready.view % self.n]})",
                    event="view-change",
                )
                self._logged_view = ready.view
        for block in ready.blocks:
            self.store.append(block)

    def _apply(self, block: Block) -> None:
        if block.height == self.state.height + 1:
            self.state.apply_block(block)
            self.log.height = block.height
            BLOCKS.labels(self.identity.node_id).inc()

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
        digest = self.models.digest(record.round + 1, state, self.blobs.update_of)
        if digest is None:
            return f"cannot recompute the model after round {record.round} (missing blobs)"
        if digest != record.model_digest:
            return f"model digest of round {record.round} differs from the recomputed aggregate"
        return ""

    def _held(self, u: UpdateRecord) -> Upload | None:
        received = self.blobs.get(u.digest, u.client)
        return None if received is None else upload_of(received)

    def _check_verdicts(self, state: ChainState, record: RoundVerdicts) -> str:
        return check_verdicts(
            state,
            record,
            model_digest=self.models.digest(record.round, state, self.blobs.update_of),
            held=self._held,
            malformed=self.malformed.get(record.round, {}),
            validate=lambda digests: self._own_validation(state, record.round, list(digests)),
        )

    def note_malformed(self, evidence: ReceivedTensors) -> None:
        """Remember a selected client's signed update that was refused for its values."""
        upload, state = upload_of(evidence), self.state
        if not admits_malformed(
            state,
            upload,
            model_digest=lambda: self.models.digest(upload.round, state, self.blobs.update_of),
        ):
            return
        weights = self.models.weights(upload.round, state, self.blobs.update_of)
        problem = structural_problem(evidence.weights, weights) or "malformed update"
        by_client = self.malformed.setdefault(upload.round, {})
        by_client.setdefault(upload.client, (upload, f"malformed: {problem}"))

    def _own_validation(
        self, state: ChainState, rnd: int, digests: list[tuple[str, bytes, int]]
    ) -> dict[str, OwnVerdict]:
        """Verdicts of ``validate_round`` over (client, digest, samples) of round ``rnd``."""
        key = (rnd, tuple(digests))
        if key not in self._own_verdicts:
            inputs = self.validation_inputs(state, rnd, digests)
            assert inputs is not None
            weights, updates, history = inputs
            started = time.perf_counter()
            verdicts = validate_round(
                self.config,
                model=self.scratch,
                global_weights=weights,
                updates=updates,
                validation=self.validation,
                history=history,
            )
            VALIDATION.labels(self.identity.node_id).observe(time.perf_counter() - started)
            self._own_verdicts[key] = own_verdicts(verdicts)
        return self._own_verdicts[key]

    def validation_inputs(
        self, state: ChainState, rnd: int, digests: list[tuple[str, bytes, int]]
    ) -> tuple[Any, list[ClientUpdate], RoundHistory] | None:
        """The round's global weights, the updates behind ``digests`` and what the copy
        check compares them with (None: not at hand)."""
        weights = self.models.weights(rnd, state, self.blobs.update_of)
        base = self.models.digest(rnd, state, self.blobs.update_of)
        held = [(self.blobs.get(d, c), c, n) for c, d, n in digests]
        if weights is None or base is None or any(r is None for r, _, _ in held):
            return None
        history = round_history(
            state,
            rnd,
            base_digest=base,
            digests={c: d for c, d, _ in digests},
            fetch=self.blobs.update_of,
        )
        if history is None:
            return None
        updates = [as_update(r, client=c, n_samples=n) for r, c, n in held if r is not None]
        return weights, updates, history

    # Round work ----------------------------------------------------------------

    def round_to_validate(self) -> tuple[int, list[tuple[str, bytes, int]]] | None:
        """The open round and its (client, digest, samples) once it is ready for verdicts.

        None while no round is open, this miner already submitted its
        verdicts, or uploads are missing before the deadline
        (:func:`chain.verdicts.round_ready`).
        """
        state = self.state
        rnd = state.current_round
        if rnd == 0 or rnd in self.submitted:
            return None
        have = self.blobs.by_round.get(rnd, {})
        if not round_ready(
            complete=uploads_complete(state, rnd, {**self.malformed.get(rnd, {}), **have}),
            now=asyncio.get_running_loop().time(),
            opened_at=self.opened_at.get(rnd, math.inf),
            deadline=self.genesis.protocol.round_deadline_ms / 1e3,
        ):
            return None
        selected = state.selections[rnd].selected
        good = sorted(cid for cid in have if cid in selected)
        return rnd, [(c, have[c], state.released_records(c)) for c in good]

    def maybe_submit_verdicts(self) -> None:
        """Submit this miner's verdict record once the round is ready and it is its turn."""
        todo = self.round_to_validate()
        if todo is None:
            return
        rnd, key = todo
        state = self.state
        now = asyncio.get_running_loop().time()
        ready_at = self.ready_at.setdefault(rnd, now)
        fallback = 2 * self.genesis.protocol.view_timeout_ms / 1e3
        if not submits_now(
            is_primary=self.replica.is_primary, now=now, ready_at=ready_at, fallback=fallback
        ):
            return
        if self.models.weights(rnd, state, self.blobs.update_of) is None:
            return
        held = {c: upload_of(self.blobs.get(d, c)) for c, d, _ in key}  # type: ignore[arg-type]
        own = self._own_validation(state, rnd, key)
        record = build_verdicts(
            state, rnd, held=held, own=own, malformed=self.malformed.get(rnd, {})
        )
        operation = encode_operation(record)
        envelope = self.identity.sign(record_kind_name(record), operation)
        self.submitted.add(rnd)
        self.log.info(
            f"verdicts: accepted {record.accepted}, rejected {sorted(record.rejected)}, "
            f"silent {list(record.silent)}"
        )
        self.replica.propose(
            Request(self.identity.node_id, timestamp_of(record), operation, envelope.signature)
        )

    def status(self) -> StatusInfo:
        head = self.store.head()
        rnd = max(self.state.selections, default=0)
        return StatusInfo(
            rnd,
            self.store.height(),
            head.digest if head is not None else b"",
            view=self.replica.view,
            read_only=self.disk.read_only,
            peers=tuple(
                (self.peer_ids[index], link.address, link.connected)
                for index, link in sorted(self.peers.items())
            ),
        )


def validate_elsewhere(
    config: dict[str, Any],
    weights: Any,
    updates: list[ClientUpdate],
    history: RoundHistory,
    validation: Split,
) -> dict[str, OwnVerdict]:
    """``Miner._own_validation``'s verdicts, computed in another process from its inputs.

    The miner runs it in a worker process so that validation holds neither
    its event loop nor its interpreter lock; the model is the same seeded
    scratch model and the thread count the run's, so the verdicts are
    bit-identical to validating in the miner itself.
    """
    run = RunConfig.from_dict(config)
    torch.set_num_threads(run.threads)
    model = model_for(run, generator=torch_generator(0, "scratch"))
    verdicts = validate_round(
        run,
        model=model,
        global_weights=weights,
        updates=updates,
        validation=validation,
        history=history,
    )
    return own_verdicts(verdicts)


def worker_ready() -> bool:
    """Nothing: run in the validation worker at start, it spawns it and imports this
    module (torch, the models) there before round 1 needs them."""
    return True
