"""The miner daemon: a PBFT replica over gRPC, update intake, validation, state transfer.

The replica (``consensus.replica.Replica``) is driven exactly as
docs/CONSENSUS.md says: ``step`` for every PBFT message from a peer,
``tick`` on a timer of ``protocol.tick_ms``, ``propose`` for submitted
records; each ``Ready`` is persisted (``BlockStore``, SQLite) before its
messages are sent. The application side is :class:`chain.records.ChainState`
plus what needs tensors: the update blobs (:class:`node.offchain.BlobStore`)
and the recomputed global models (:class:`node.offchain.GlobalModels`).

Round r at a miner: once the selection of r is committed, selected clients
upload their updates (``SubmitUpdate``); when every selected client has
uploaded, or the round deadline passed, the miner validates the round's
updates (``fl.rounds.validate_round``, the simulator's call) and submits a
verdict record. The first verdict record of a round that commits counts;
every replica re-validates the same blobs before voting for it.
"""

from __future__ import annotations

import asyncio
import contextlib
import math
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import grpc
import torch

from chain.records import (
    KIND_NAMES,
    KIND_ROLES,
    KIND_VERDICTS,
    ChainState,
    RoundSummary,
    RoundVerdicts,
    UpdateRecord,
    decode_operation,
    encode_operation,
    record_kind_name,
    verdicts_agree,
    verdicts_timestamp,
)
from consensus.canonical import MalformedMessage
from consensus.ledger import Block, Request
from consensus.messages import Blocks, Fetch, Forward, PrePrepare, decode_message
from consensus.replica import Replica
from consensus.store import BlockStore
from fl.data import Split
from fl.models import build_model
from fl.rounds import validate_round
from fl.seeds import torch_generator
from fl.validation import structural_problem
from node.daemon import (
    NodeLog,
    NodeStatusServicer,
    add_health,
    add_servicer,
    channel,
    load_node_splits,
    record_verifier,
    roles_of,
)
from node.genesis import Genesis
from node.identity import AuthError, Identity, pbft_signer, pbft_verifier, verify_envelope
from node.offchain import BlobStore, GlobalModels, as_update, initial_spec
from node.tensor_receiver import (
    ReceivedTensors,
    TensorStreamReceiver,
    UpdateRejected,
    receive_tensor_stream,
)
from node.tensors import UPDATE_KIND, relay_stream
from proto import llbcfl_pb2 as pb
from proto import llbcfl_pb2_grpc as pb_grpc

PEER_QUEUE = 10_000
KIND_BY_NAME = {name: kind for kind, name in KIND_NAMES.items()}


class PeerLink:
    """Outgoing PBFT messages to one peer over a long-lived ``Deliver`` stream."""

    def __init__(self, address: str, log: NodeLog | None = None) -> None:
        self.address = address
        self.log = log
        self.connected = True
        self.queue: asyncio.Queue[bytes] = asyncio.Queue(PEER_QUEUE)
        self._task: asyncio.Task | None = None

    def send(self, data: bytes) -> None:
        with contextlib.suppress(asyncio.QueueFull):
            self.queue.put_nowait(data)  # PBFT retransmits what is dropped

    def start(self) -> None:
        self._task = asyncio.create_task(self._run())

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task

    async def _messages(self) -> AsyncIterator[pb.PbftMessage]:
        while True:
            data = await self.queue.get()
            yield pb.PbftMessage(data=data)
            if not self.connected and self.log is not None:
                self.log.info(f"link to {self.address} up")
            self.connected = True

    async def _run(self) -> None:
        while True:
            try:
                async with channel(self.address) as ch:
                    # Start the stream only on a connected channel: a call begun
                    # while the peer is down can linger and swallow messages
                    # after the peer is back.
                    await asyncio.wait_for(ch.channel_ready(), timeout=1.0)
                    await pb_grpc.MinerStub(ch).Deliver(self._messages())
            except asyncio.CancelledError:
                raise
            except Exception as exc:  # any failure: reconnect; PBFT retransmits
                if self.log is not None and self.connected:
                    self.log.info(f"link to {self.address} down: {type(exc).__name__}")
                self.connected = False
                # What queued for a peer that is down is stale by the time it is
                # back (it catches up by state transfer): do not replay it.
                while not self.queue.empty():
                    self.queue.get_nowait()
            await asyncio.sleep(0.2)  # reconnect backoff (not a test race)


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
        self._fetching: set[bytes] = set()

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

    def wanted_blobs(self, message: Any) -> list[bytes]:
        """Digests the verdict records of a PRE-PREPARE or FORWARD refer to that we lack.

        The message waits until they are fetched from peers, so that the
        replica validates (or, as primary, batches) with the blobs at hand.
        """
        wanted: list[bytes] = []
        try:
            if isinstance(message, PrePrepare):
                requests = message.block.requests()
            elif isinstance(message, Forward):
                requests = [message.request]
            else:
                return []
            for request in requests:
                _, record = decode_operation(request.operation)
                if isinstance(record, RoundVerdicts):
                    bad = self.malformed.get(record.round, {})
                    wanted.extend(
                        u.digest
                        for u in record.updates
                        if u.client not in bad or bad[u.client][0].digest != u.digest
                    )
        except MalformedMessage:
            return []
        return self.blobs.missing(wanted)

    def committed_missing_blobs(self) -> list[bytes]:
        wanted = [u.digest for v in self.state.verdicts.values() for u in v.updates if u.accepted]
        return self.blobs.missing(wanted)

    async def fetch_blobs(self, digests: list[bytes], *, prefer: int | None = None) -> None:
        """Fetch update blobs from peer miners (the client's signature is checked again)."""
        order = sorted(self.peers, key=lambda i: (i != prefer, i))
        for digest in digests:
            if self.blobs.has(digest) or digest in self._fetching:
                continue
            self._fetching.add(digest)
            try:
                for peer in order:
                    try:
                        async with channel(self.peers[peer].address) as ch:
                            stub = pb_grpc.MinerStub(ch)
                            parts = [
                                p
                                async for p in stub.FetchUpdate(
                                    pb.FetchUpdateRequest(digest=digest), timeout=10
                                )
                            ]
                        received = receive_tensor_stream(
                            parts,
                            expected=self.spec,
                            membership=self.membership,
                            kind=UPDATE_KIND,
                            max_total_bytes=self.genesis.protocol.max_stream_bytes,
                        )
                    except (grpc.aio.AioRpcError, UpdateRejected):
                        continue
                    if received.digest == digest:
                        self.blobs.put(received)
                        break
            finally:
                self._fetching.discard(digest)

    async def catch_up_from_peers(self) -> None:
        """Ask peers how far they are; when one is ahead, send it a signed FETCH.

        A replica that restarted behind, or sat out while the others moved
        on, sees no traffic above its height once the network is idle; the
        core's own state transfer (FETCH, answered by BLOCKS with the
        certified blocks and the NEW-VIEW) then brings it up to date.
        """
        for peer in self.peers.values():
            try:
                async with channel(peer.address) as ch:
                    status = await pb_grpc.NodeStub(ch).Status(pb.StatusRequest(), timeout=1)
            except grpc.aio.AioRpcError:
                continue
            if status.chain_height > self.replica.height:
                self.log.info(
                    f"behind: height {self.replica.height}, {status.node_id} has "
                    f"{status.chain_height}; fetching"
                )
                fetch = Fetch(from_height=self.replica.height + 1, sender=self.index)
                fetch.signature = self.sign_pbft(fetch.signed)
                peer.send(fetch.encode())
                return

    def status(self) -> tuple[int, int, bytes]:
        head = self.store.head()
        rnd = max(self.state.selections, default=0)
        return rnd, self.store.height(), head.digest if head is not None else b""


class MinerServicer(pb_grpc.MinerServicer):
    """Thin gRPC layer: converts, checks, maps errors to status codes, calls :class:`Miner`."""

    def __init__(self, miner: Miner) -> None:
        self.m = miner

    async def Deliver(self, request_iterator: Any, context: Any) -> pb.Ack:
        m = self.m
        count = 0
        async for item in request_iterator:
            try:
                message = decode_message(item.data)
            except MalformedMessage as exc:
                await context.abort(grpc.StatusCode.INVALID_ARGUMENT, f"malformed PBFT: {exc}")
            missing = m.wanted_blobs(message)
            if missing:
                m.log.info(f"fetching {len(missing)} blob(s) before {type(message).__name__}")
                await m.fetch_blobs(missing, prefer=message.sender)
            before = m.replica.height
            m.replica.step(message)
            m.drain()
            if isinstance(message, Blocks):
                m.log.info(
                    f"state transfer: {len(message.blocks)} block(s) from replica "
                    f"{message.sender}, height {before} -> {m.replica.height}"
                )
            count += 1
        return pb.Ack(received=count)

    async def Submit(self, request: pb.Envelope, context: Any) -> pb.SubmitReceipt:
        m = self.m
        kind = KIND_BY_NAME.get(request.kind)
        if kind is None or kind == KIND_VERDICTS:
            await context.abort(
                grpc.StatusCode.INVALID_ARGUMENT, f"cannot submit {request.kind!r} records"
            )
        try:
            signer = verify_envelope(
                request, m.membership, expected_kind=request.kind, allowed_roles=(KIND_ROLES[kind],)
            )
        except AuthError as exc:
            code = (
                grpc.StatusCode.PERMISSION_DENIED
                if exc.reason == "wrong-role"
                else grpc.StatusCode.UNAUTHENTICATED
            )
            await context.abort(code, str(exc))
        try:
            timestamp, record = decode_operation(request.payload)
        except MalformedMessage as exc:
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, f"malformed record: {exc}")
        if kind != record.KIND:
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, "envelope kind != record kind")
        req = Request(signer.node_id, timestamp, bytes(request.payload), bytes(request.signature))
        if timestamp <= m.state.last_timestamp.get(signer.node_id, -1):
            return pb.SubmitReceipt(accepted=True, reason="already committed")
        problem = m.state.check_request(req, verify=m.verify_record, role_of=m.roles)
        if problem:
            await context.abort(grpc.StatusCode.FAILED_PRECONDITION, problem)
        m.replica.propose(req)
        m.drain()
        return pb.SubmitReceipt(accepted=True)

    async def SubmitUpdate(self, request_iterator: Any, context: Any) -> pb.UpdateReceipt:
        m = self.m
        protocol = m.genesis.protocol
        receiver = TensorStreamReceiver(
            expected=m.spec,
            max_total_bytes=protocol.max_stream_bytes,
            max_chunk_bytes=protocol.chunk_bytes,
        )
        try:
            async for part in request_iterator:
                receiver.add(part)
            received = receiver.finish(membership=m.membership, kind=UPDATE_KIND)
        except UpdateRejected as exc:
            m.log.warning(f"refused update: {exc.reason}")
            if exc.evidence is not None:
                m.note_malformed(exc.evidence)
                m.maybe_submit_verdicts()
                m.drain()
            # Read (and drop) the rest of the stream, up to a bound, before
            # answering: grpc.aio clients that are still writing when the
            # server ends the call can report INTERNAL instead of this status
            # (grpc/grpc#36066).
            await _discard_rest(request_iterator, limit=protocol.max_stream_bytes)
            await context.abort(exc.code, exc.reason)
        cid, rnd = received.sender.node_id, received.round
        if rnd != m.state.current_round:
            await context.abort(
                grpc.StatusCode.FAILED_PRECONDITION,
                f"round {rnd} is not open for updates (open: {m.state.current_round})",
            )
        if cid not in m.state.selections[rnd].selected:
            await context.abort(
                grpc.StatusCode.PERMISSION_DENIED, f"{cid} is not selected in round {rnd}"
            )
        held = m.blobs.by_round.get(rnd, {}).get(cid)
        if held is not None:
            if held == received.digest:
                return pb.UpdateReceipt(round=rnd, client_id=cid, digest=held)
            await context.abort(
                grpc.StatusCode.ALREADY_EXISTS, f"{cid} already sent an update for round {rnd}"
            )
        base = m.models.digest(rnd, m.state, m.blobs)
        if base is None:
            await context.abort(grpc.StatusCode.UNAVAILABLE, "global model not yet known")
        if received.base_digest != base:
            await context.abort(
                grpc.StatusCode.INVALID_ARGUMENT, "update not trained from this round's model"
            )
        if received.num_samples != m.state.released_records(cid):
            await context.abort(
                grpc.StatusCode.INVALID_ARGUMENT, "sample count differs from the registration"
            )
        m.blobs.put(received)
        m.log.info(f"stored update of {cid} ({received.digest.hex()[:12]})")
        m.maybe_submit_verdicts()
        m.drain()
        return pb.UpdateReceipt(round=rnd, client_id=cid, digest=received.digest)

    async def FetchUpdate(self, request: pb.FetchUpdateRequest, context: Any) -> Any:
        received = self.m.blobs.get(bytes(request.digest))
        if received is None:
            await context.abort(grpc.StatusCode.NOT_FOUND, "no update with this digest")
        for part in relay_stream(received, chunk_bytes=self.m.genesis.protocol.chunk_bytes):
            yield part

    async def FetchBlocks(self, request: pb.FetchBlocksRequest, context: Any) -> Any:
        store = self.m.store
        start = max(1, request.from_height)
        top = store.height()
        while start <= top:
            stop = min(top + 1, start + 64)
            for block in store.read_range(start, stop):
                yield pb.BlockBytes(height=block.height, block=block.encode())
            start = stop


async def run_miner(
    genesis: Genesis,
    identity: Identity,
    *,
    db_path: Path,
    run_dir: Path,
    data_dir: str | None,
    stop: asyncio.Event,
    log: NodeLog,
    ready_file: Path | None = None,
) -> None:
    config = genesis.run
    torch.set_num_threads(config.threads)
    splits = load_node_splits(config, data_dir, train=False)
    miner = Miner(
        genesis,
        identity,
        db_path=db_path,
        run_dir=run_dir,
        validation=splits.validation,
        log=log,
    )
    server = grpc.aio.server(options=[("grpc.max_receive_message_length", 4 << 20)])
    add_servicer(server, "Miner", MinerServicer(miner))
    add_servicer(
        server,
        "Node",
        NodeStatusServicer(
            node_id=identity.node_id,
            role="miner",
            genesis_digest=genesis.digest,
            status=miner.status,
        ),
    )
    add_health(server)
    address = genesis.membership[identity.node_id].address
    server.add_insecure_port(address)
    await server.start()
    for peer in miner.peers.values():
        peer.start()
    log.info(f"miner replica {miner.index} listening on {address}, height {miner.store.height()}")
    if ready_file is not None:
        ready_file.write_text("ready\n")
    tick = genesis.protocol.tick_ms / 1e3
    ticks = 0
    repair: asyncio.Task | None = None
    poll: asyncio.Task | None = None
    try:
        while not stop.is_set():
            with contextlib.suppress(asyncio.TimeoutError):
                await asyncio.wait_for(stop.wait(), tick)
            miner.replica.tick()
            miner.drain()
            miner.maybe_submit_verdicts()
            miner.drain()
            ticks += 1
            if ticks % 20 == 0:
                missing = miner.committed_missing_blobs()
                if missing and (repair is None or repair.done()):
                    repair = asyncio.create_task(miner.fetch_blobs(missing))
                if poll is None or poll.done():
                    poll = asyncio.create_task(miner.catch_up_from_peers())
    finally:
        await server.stop(1.0)
        for peer in miner.peers.values():
            await peer.stop()
        miner.store.close()


async def _discard_rest(request_iterator: Any, *, limit: int) -> None:
    """Consume what is left of a client stream without keeping it (at most ``limit`` bytes)."""
    seen = 0
    async for part in request_iterator:
        seen += part.ByteSize()
        if seen > limit:
            return
