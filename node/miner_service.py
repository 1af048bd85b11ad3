"""The miner daemon: the ``Miner`` service, its protocol rules, and the replica's timer.

:class:`MinerServicer` only decodes (PBFT bytes, tensor streams) and calls
:class:`MinerHandler`, whose methods hold the protocol rules and raise the
refusals of ``node.errors`` (``node.serving`` maps them to status codes).
:func:`run_miner` serves it with ``node.serving.serve`` and drives the
replica: ``tick`` every ``protocol.tick_ms``, verdicts once a round's uploads
are in, blob repair and catch-up every 20 ticks.

Every call into the miner's synchronous core (``Replica.step``, ``tick``,
``propose``, ``Miner.drain``, ``Miner.maybe_submit_verdicts``) holds
``MinerHandler.core``. Round validation (``fl.rounds.validate_round``, seconds
for a round of many updates) runs in one worker process (``node.workers``)
while the core is held, so the event loop keeps answering ``Node.Status``, health,
uploads being received and ``FetchUpdate``/``FetchBlocks`` meanwhile: before
the core would validate (the round's uploads are complete or its deadline
passed; a PRE-PREPARE or FORWARD carries a verdict record), the handler runs
``Miner._own_validation``'s computation for the same (round, updates) there, and
the core's own call then finds the verdicts in the miner's cache. If the
worker's key turns out to be another one, the core validates on the loop as
before: the outcome never depends on the worker.

While the miner is read-only (a full disk, ``node.full_disk``) the replica is
not driven: PBFT messages from peers are dropped (PBFT retransmits, and state
transfer catches up later), uploads and submissions are refused with
RESOURCE_EXHAUSTED, reads are served, and the timer probes for space every
``PROBE_SECONDS``; once there is room the miner resumes and catches up.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import math
from collections.abc import AsyncIterator, Callable, Iterator
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path
from typing import Any

import torch

from chain.records import decode_operation, kind_named
from chain.state import Phase
from consensus.ledger import Block, Request
from consensus.messages import Blocks, Message, decode_message
from node.daemon import NodeLog, load_node_splits
from node.errors import (
    AUTH_CODES,
    Busy,
    DiskFull,
    Duplicate,
    InvalidRequest,
    NotFound,
    NotPermitted,
    NotReady,
    Refused,
    TooSlow,
    WrongState,
)
from node.full_disk import PROBE_SECONDS, DiskGuard
from node.genesis import Genesis
from node.identity import AuthError, Identity, verify_envelope
from node.membership import NodeInfo
from node.metrics import STREAM_BYTES, VALIDATION
from node.miner import Miner, validate_elsewhere, worker_ready
from node.offchain import check_fetch_request, wall_clock_ms
from node.peers import PBFT_WIRE_KIND, BlobFetcher, catch_up_from_peers, verdict_records
from node.serving import (
    STREAM_IDLE_SECONDS,
    Endpoint,
    SenderRate,
    bounded_parts,
    listen_address,
    serve,
)
from node.tensor_receiver import ReceivedTensors, TensorStreamReceiver, UpdateRejected
from node.tensors import UPDATE_KIND, relay_stream
from node.workers import worker_process, worker_thread
from proto import llbcfl_pb2 as pb
from proto import llbcfl_pb2_grpc as pb_grpc

Digests = list[tuple[str, bytes, int]]  # (client, digest, samples), the validation's key
# Signed records one member may submit: a second, and in a burst (the server
# submits a few per round, a client one registration).
SUBMIT_RATE = 20.0
SUBMIT_BURST = 50
# PBFT messages at least this large are decoded on a worker thread, not on the loop.
DECODE_ELSEWHERE_BYTES = 256 << 10


class MinerHandler:
    """The protocol rules of each Miner request, on one :class:`~node.miner.Miner`."""

    def __init__(self, miner: Miner, *, clock_ms: Callable[[], int] = wall_clock_ms) -> None:
        self.m = miner
        self.clock_ms = clock_ms  # what fetch requests' freshness is checked against
        self.core = asyncio.Lock()
        self.fetcher = BlobFetcher(miner)
        self.processes: ProcessPoolExecutor | None = None
        self.prepared: set[int] = set()  # rounds _prepare_next_model computed ahead
        self.validator = worker_thread("prepare")
        self.uploading: set[str] = set()  # clients with an update stream open (one each)
        self.submits = SenderRate(rate=SUBMIT_RATE, burst=SUBMIT_BURST)
        self.links: dict[str, int] = {}  # miner id -> generation of its newest Deliver stream

    def close(self) -> None:
        self.validator.shutdown(wait=False, cancel_futures=True)
        if self.processes is not None:
            self.processes.shutdown(wait=True, cancel_futures=True)

    # Requests -----------------------------------------------------------------------

    def authenticate_link(self, item: pb.PbftMessage) -> NodeInfo:
        """The miner that sent ``item`` (signature over the data's hash), before any decoding.

        :class:`~node.identity.AuthError` (UNAUTHENTICATED, PERMISSION_DENIED)
        unless a miner of the genesis signed SHA-256(``item.data``).
        """
        signer = verify_envelope(
            item.auth, self.m.membership, expected_kind=PBFT_WIRE_KIND, allowed_roles=("miner",)
        )
        if item.auth.payload != hashlib.sha256(item.data).digest():
            raise AuthError("bad-signature", f"{signer.node_id}'s link signature is for other data")
        return signer

    async def decode(self, data: bytes) -> Message:
        """A PBFT message from authenticated bytes; large ones on a worker thread."""
        if len(data) < DECODE_ELSEWHERE_BYTES:
            return decode_message(data)
        return await asyncio.get_running_loop().run_in_executor(None, decode_message, data)

    async def deliver(self, message: Any) -> None:
        """One PBFT message from a peer: fetch the blobs it refers to, then step the replica.

        The message's own signature is checked first: nothing is fetched for
        a message its claimed sender did not sign; a message naming more
        updates than the network has clients is dropped. Dropped too while
        the miner is read-only (and when it turns read-only here).
        """
        m = self.m
        if m.disk.read_only:
            return
        if not message.is_authentic(m.verify_pbft):
            m.log.warning(f"dropped a {type(message).__name__} whose signature is not its sender's")
            return
        missing = self.fetcher.wanted_by(message)
        if len(missing) > len(m.membership.clients):
            m.log.warning(
                f"dropped a {type(message).__name__} from replica {message.sender} naming "
                f"{len(missing)} unknown updates (the network has {len(m.membership.clients)} "
                "clients)"
            )
            return
        if missing:
            m.log.info(f"fetching {len(missing)} blob(s) before {type(message).__name__}")
            await self.fetcher.fetch(missing, prefer=message.sender)
        async with self.core:
            if m.disk.read_only:
                return
            for record in verdict_records(message):
                if record.round == m.state.current_round:
                    held = [u for u in record.updates if m.blobs.get(u.digest, u.client)]
                    await self._prevalidate(
                        record.round, [(u.client, u.digest, u.n_samples) for u in held]
                    )
            before = m.replica.height
            m.replica.step(message)
            try:
                m.drain()
            except DiskFull:
                return
            await self._prepare_next_model()
        if isinstance(message, Blocks):
            moved = m.replica.height != before
            m.log.info(
                f"state transfer: {len(message.blocks)} block(s) from replica "
                f"{message.sender}, height {before} -> {m.replica.height}",
                event="state-transfer" if moved else None,
            )

    async def submit(self, envelope: pb.Envelope) -> pb.SubmitReceipt:
        """A signed record from a client or the server, proposed if valid on the chain.

        A record whose (submitter, timestamp) the chain already executed, or
        that a request waiting in the pool already holds, is refused with
        :class:`Duplicate` (ALREADY_EXISTS): it would never be executed.
        """
        m = self.m
        kind = kind_named(envelope.kind)
        if kind is None or kind.role == "miner":
            raise InvalidRequest(f"cannot submit {envelope.kind!r} records")
        signer = verify_envelope(
            envelope, m.membership, expected_kind=envelope.kind, allowed_roles=(kind.role,)
        )
        self.submits.take(signer.node_id)
        timestamp, record = decode_operation(envelope.payload)
        if kind.code != record.KIND:
            raise InvalidRequest("envelope kind != record kind")
        request = Request(
            signer.node_id, timestamp, bytes(envelope.payload), bytes(envelope.signature)
        )
        async with self.core:
            m.disk.check()
            if timestamp <= m.state.last_timestamp.get(signer.node_id, -1):
                raise Duplicate(
                    f"{signer.node_id}'s timestamp {timestamp} is already used on the chain "
                    "(a record is executed once)"
                )
            if m.replica.is_pending(request.key):
                raise Duplicate(
                    f"{signer.node_id}'s timestamp {timestamp} is already taken by a request "
                    "waiting to be ordered"
                )
            problem = m.state.check_request(request, verify=m.verify_record, role_of=m.roles)
            if problem:
                raise WrongState(problem)
            m.replica.propose(request)
            m.drain()
        return pb.SubmitReceipt(accepted=True)

    @contextlib.contextmanager
    def update_receiver(self) -> Iterator[TensorStreamReceiver]:
        """A receiver for one upload; the sender's stream slot is freed when it ends.

        Once the header's signature verified, and before anything is
        allocated, :meth:`admit_upload` checks the sender may upload now and
        takes its one slot.
        """
        protocol = self.m.genesis.protocol
        taken: list[str] = []

        def admit(header: pb.TensorStreamHeader, signer: NodeInfo) -> None:
            self.admit_upload(header.round, signer.node_id)
            self.uploading.add(signer.node_id)
            taken.append(signer.node_id)

        try:
            yield TensorStreamReceiver(
                expected=self.m.spec,
                max_total_bytes=protocol.max_stream_bytes,
                max_chunk_bytes=protocol.chunk_bytes,
                membership=self.m.membership,
                kind=UPDATE_KIND,
                admit=admit,
            )
        finally:
            for cid in taken:
                self.uploading.discard(cid)

    def admit_upload(self, rnd: int, cid: str) -> None:
        """Refuse an authenticated upload header now rather than after its data."""
        m = self.m
        if rnd == 0 or rnd != m.state.current_round:
            raise WrongState(f"round {rnd} is not open for updates (open: {m.state.current_round})")
        if cid not in m.state.selections[rnd].selected:
            raise NotPermitted(f"{cid} is not selected in round {rnd}")
        if cid in self.uploading:
            raise Busy(f"{cid} already has an update stream open")

    async def refused_update(self, exc: UpdateRejected) -> None:
        """A stream the receiver refused; a signed one with bad values is kept as evidence."""
        m = self.m
        if exc.sender is None and exc.code in AUTH_CODES.values():
            m.log.refused_outsider(f"refused an update stream no member signed: {exc.reason}")
        else:
            m.log.warning(f"refused update: {exc.reason}")
        if exc.evidence is not None:
            async with self.core:
                m.note_malformed(exc.evidence)
                await self._verdicts_if_due()

    async def accept_update(self, received: ReceivedTensors) -> pb.UpdateReceipt:
        """A selected client's update for the open round, from this round's model."""
        m = self.m
        cid, rnd = received.sender.node_id, received.round
        async with self.core:
            m.disk.check()
            if rnd == 0 or rnd != m.state.current_round:
                raise WrongState(
                    f"round {rnd} is not open for updates (open: {m.state.current_round})"
                )
            if cid not in m.state.selections[rnd].selected:
                raise NotPermitted(f"{cid} is not selected in round {rnd}")
            held = m.blobs.by_round.get(rnd, {}).get(cid)
            if held is not None:
                if held == received.digest:
                    return pb.UpdateReceipt(round=rnd, client_id=cid, digest=held)
                raise Duplicate(f"{cid} already sent an update for round {rnd}")
            base = m.models.digest(rnd, m.state, m.blobs.update_of)
            if base is None:
                raise NotReady("global model not yet known")
            if received.base_digest != base:
                raise InvalidRequest("update not trained from this round's model")
            if received.num_samples != m.state.released_records(cid):
                raise InvalidRequest("sample count differs from the registration")
            m.blobs.put(received)
            STREAM_BYTES.labels(m.identity.node_id, "in").inc(received.header.total_bytes)
            m.log.info(f"stored update of {cid} ({received.digest.hex()[:12]})")
            await self._verdicts_if_due()
        return pb.UpdateReceipt(round=rnd, client_id=cid, digest=received.digest)

    def held_update(self, envelope: pb.Envelope) -> ReceivedTensors:
        """The update a miner's or the server's fresh signed request names
        (``node.offchain.check_fetch_request``): nobody else reads updates."""
        request = check_fetch_request(envelope, self.m.membership, now_ms=self.clock_ms())
        received = self.m.blobs.get(bytes(request.digest), request.client_id)
        if received is None:
            raise NotFound(f"no update of {request.client_id!r} with this digest")
        return received

    def blocks_from(self, height: int) -> Iterator[Block]:
        store = self.m.store
        start = max(1, height)
        top = store.height()
        while start <= top:
            stop = min(top + 1, start + 64)
            yield from store.read_range(start, stop)
            start = stop

    # The replica's timer and the round's validation ---------------------------------

    async def tick(self) -> None:
        """One tick of the replica's timer (none while read-only)."""
        async with self.core:
            if self.m.disk.read_only:
                return
            self.m.replica.tick()
            try:
                self.m.drain()
            except DiskFull:
                return
            await self._verdicts_if_due()
            await self._prepare_next_model()

    async def probe_disk(self) -> bool:
        """While read-only, look for space (off the event loop); True once writable again."""
        async with self.core:
            return await asyncio.to_thread(self.m.disk.probe)

    async def _prepare_next_model(self) -> None:
        """Once a round's verdicts commit (or registration closes), the next round's heavy work.

        The next round's model (what the round summary is checked against
        and what its updates must start from) and the privacy accounting
        of one more participation (what the next selection's declined
        clients need; a PRV composition takes a fifth of a second): computed
        here, off the event loop, the core's later calls find them cached.
        """
        m = self.m
        if m.state.phase not in (Phase.AGGREGATING, Phase.SELECTING):
            return
        rnd = max(m.state.verdicts, default=0) + 1  # the round to prepare (1: after registration)
        if rnd in self.prepared or rnd < m.models.first:
            return

        def prepare() -> bool:
            ready = m.models.weights(rnd, m.state, m.blobs.update_of) is not None
            m.state.declined()
            return ready

        try:
            if await asyncio.get_running_loop().run_in_executor(self.validator, prepare):
                self.prepared.add(rnd)
        except Exception as exc:  # the core computes it again on the loop and fails there
            m.log.warning(f"preparing round {rnd} on the worker failed: {exc!r}")

    async def _verdicts_if_due(self) -> None:
        """``maybe_submit_verdicts`` with its validation done on the worker (core held).

        Nothing while read-only: the verdicts follow once there is room again.
        """
        if self.m.disk.read_only:
            return
        due = self.m.round_to_validate()
        if due is not None:
            await self._prevalidate(*due)
        try:
            self.m.maybe_submit_verdicts()
            self.m.drain()
        except DiskFull:
            return

    async def _prevalidate(self, rnd: int, digests: Digests) -> None:
        """Fill the miner's verdict cache for (``rnd``, ``digests``) on the validation thread."""
        m = self.m
        key = (rnd, tuple(digests))
        if key in m._own_verdicts:
            return
        inputs = m.validation_inputs(m.state, rnd, digests)
        if inputs is None:
            return
        weights, updates, history = inputs
        loop = asyncio.get_running_loop()
        started = loop.time()
        try:
            own = await loop.run_in_executor(
                self.validation_process(),
                validate_elsewhere,
                m.config.to_dict(),
                weights,
                updates,
                history,
                m.validation,
            )
        except Exception as exc:  # the core validates again on the loop and fails there
            m.log.warning(f"validation of round {rnd} in the worker process failed: {exc!r}")
            return
        VALIDATION.labels(m.identity.node_id).observe(loop.time() - started)
        m._own_verdicts[key] = own

    def warm_up(self) -> None:
        """Start the validation worker now: spawning it and importing torch there take
        seconds (7 s on 2 loaded cores), which round 1 would otherwise spend after its
        uploads are in."""
        self.validation_process().submit(worker_ready)

    def validation_process(self) -> ProcessPoolExecutor:
        """The one worker process that validates rounds (started on first use)."""
        if self.processes is None:
            self.processes = worker_process()
        return self.processes


class MinerServicer(pb_grpc.MinerServicer):
    """The gRPC face: decodes requests, calls :class:`MinerHandler` (errors: node.serving)."""

    def __init__(self, handler: MinerHandler) -> None:
        self.h = handler

    async def Deliver(self, request_iterator: Any, context: Any) -> pb.Ack:
        """A peer's PBFT messages, each authenticated before it is decoded.

        The first item (a peer sends an empty one on connecting) must come
        within ``STREAM_IDLE_SECONDS`` and binds the stream to its signer;
        an item signed by anyone else ends the call. A newer stream from the
        same miner supersedes this one (it ends at its next item).
        """
        count = 0
        owner: str | None = None
        generation = 0
        links = self.h.links
        async for item in first_within(request_iterator, STREAM_IDLE_SECONDS):
            signer = self.h.authenticate_link(item)
            if owner is None:
                owner = signer.node_id
                generation = links[owner] = links.get(owner, 0) + 1
            elif signer.node_id != owner:
                raise NotPermitted(f"a stream of {owner} carries a message of {signer.node_id}")
            if links.get(owner) != generation:
                break  # superseded by a newer stream of the same peer
            if item.data:
                message = await self.h.decode(item.data)
                if message.sender != signer.replica:
                    raise NotPermitted(
                        f"{owner} (replica {signer.replica}) relayed replica "
                        f"{message.sender}'s message as its own"
                    )
                await self.h.deliver(message)
                count += 1
        return pb.Ack(received=count)

    async def Submit(self, request: pb.Envelope, context: Any) -> pb.SubmitReceipt:
        return await self.h.submit(request)

    async def SubmitUpdate(self, request_iterator: Any, context: Any) -> pb.UpdateReceipt:
        """One update stream: signature-checked header, bounded in time (``bounded_parts``)."""
        parts = bounded_parts(request_iterator)
        with self.h.update_receiver() as receiver:
            try:
                async for part in parts:
                    receiver.add(part)
                received = receiver.finish()
            except Refused as exc:
                if isinstance(exc, UpdateRejected):
                    await self.h.refused_update(exc)
                if receiver.signer is not None:
                    # A member's stream: read (and drop) the rest, up to a bound,
                    # before answering: grpc.aio clients still writing when the
                    # server ends the call can report INTERNAL instead of this
                    # status (grpc/grpc#36066). An outsider's ends at once.
                    with contextlib.suppress(Refused):
                        await discard_rest(parts, limit=self.h.m.genesis.protocol.max_stream_bytes)
                raise
        return await self.h.accept_update(received)

    async def FetchUpdate(self, request: pb.Envelope, context: Any) -> Any:
        received = self.h.held_update(request)
        for part in relay_stream(received, chunk_bytes=self.h.m.genesis.protocol.chunk_bytes):
            yield part

    async def FetchBlocks(self, request: pb.FetchBlocksRequest, context: Any) -> Any:
        for block in self.h.blocks_from(request.from_height):
            yield pb.BlockBytes(height=block.height, block=block.encode())


async def first_within(items: Any, seconds: float) -> AsyncIterator[Any]:
    """The items of a client stream whose first item comes within ``seconds``."""
    iterator = aiter(items)
    try:
        first = await asyncio.wait_for(anext(iterator), seconds)
    except StopAsyncIteration:
        return
    except asyncio.TimeoutError:
        raise TooSlow(f"no stream message for {seconds:.0f} s") from None
    yield first
    async for item in iterator:
        yield item


async def discard_rest(request_iterator: Any, *, limit: int) -> None:
    """Consume what is left of a client stream without keeping it (at most ``limit`` bytes)."""
    seen = 0
    async for part in request_iterator:
        seen += part.ByteSize()
        if seen > limit:
            return


# After the run's last round is on the chain, a miner keeps serving its final
# blocks this long (lagging peers, the server and auditors read them) before it exits.
LINGER_SECONDS = 30.0


async def drive(handler: MinerHandler, stop: asyncio.Event, *, stay: bool = False) -> None:
    """Tick the replica until ``stop``; repair missing blobs and catch up every 20 ticks.

    While the miner is read-only, probe for space every :data:`PROBE_SECONDS`
    instead. Unless ``stay``, set ``stop`` :data:`LINGER_SECONDS` after the
    chain holds the run's last round summary: the run is over.
    """
    miner = handler.m
    handler.warm_up()
    for peer in miner.peers.values():
        peer.start()
    tick = miner.genesis.protocol.tick_ms / 1e3
    ticks = 0
    repair: asyncio.Task | None = None
    poll: asyncio.Task | None = None
    loop = asyncio.get_running_loop()
    over_at: float | None = None
    probed_at = -math.inf
    try:
        while not stop.is_set():
            with contextlib.suppress(asyncio.TimeoutError):
                await asyncio.wait_for(stop.wait(), tick)
            if miner.disk.read_only:
                if loop.time() - probed_at >= PROBE_SECONDS:
                    probed_at = loop.time()
                    if await handler.probe_disk() and (poll is None or poll.done()):
                        poll = asyncio.create_task(catch_up_from_peers(miner))
                continue
            await handler.tick()
            if miner.state.phase is Phase.DONE and not stay:
                if over_at is None:
                    over_at = loop.time()
                    miner.log.info(
                        f"the run is over (round {miner.state.last_summarised} summarised at "
                        f"height {miner.store.height()}); exiting in {LINGER_SECONDS:.0f} s"
                    )
                elif loop.time() - over_at >= LINGER_SECONDS:
                    miner.log.info("exiting: the run is over")
                    stop.set()
            ticks += 1
            if ticks % 20 == 0:
                missing = handler.fetcher.committed_missing()
                if missing and (repair is None or repair.done()):
                    repair = asyncio.create_task(handler.fetcher.fetch(missing))
                if poll is None or poll.done():
                    poll = asyncio.create_task(catch_up_from_peers(miner))
    finally:
        for task in (repair, poll):
            if task is not None:
                task.cancel()
                with contextlib.suppress(asyncio.CancelledError, Exception):
                    await task


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
    stay: bool = False,
    bind_host: str | None = None,
    metrics_port: int | None = None,
) -> None:
    config = genesis.run
    torch.set_num_threads(config.threads)
    splits = load_node_splits(config, data_dir, train=False)
    opened: list[Miner] = []

    def open_miner() -> None:
        opened.append(
            Miner(
                genesis,
                identity,
                db_path=db_path,
                run_dir=run_dir,
                validation=splits.validation,
                log=log,
            )
        )

    # Opening a WAL database writes (its shared-memory file), and so does
    # creating blobs/: on a full disk, wait (read-only, one log line) for room.
    opening = DiskGuard(log, Path(db_path).parent, Path(run_dir))
    while not opening.retry(f"opening {db_path}", open_miner):
        with contextlib.suppress(asyncio.TimeoutError):
            await asyncio.wait_for(stop.wait(), PROBE_SECONDS)
        if stop.is_set():
            return
    miner = opened[0]
    handler = MinerHandler(miner)
    address = listen_address(genesis.membership[identity.node_id].address, bind_host)
    endpoint = Endpoint(
        node_id=identity.node_id,
        role="miner",
        address=address,
        genesis_digest=genesis.digest,
        status=miner.status,
        services={"Miner": MinerServicer(handler)},
    )

    def listening(_ports: list[int]) -> None:
        height = miner.store.height()
        log.info(f"miner replica {miner.index} listening on {address}, height {height}")
        if ready_file is not None:
            ready_file.write_text("ready\n")

    try:
        await serve(
            [endpoint],
            stop=stop,
            run=lambda: drive(handler, stop, stay=stay),
            log=log,
            listening=listening,
            metrics_port=metrics_port,
        )
    finally:
        for peer in miner.peers.values():
            await peer.stop()
        handler.close()
        miner.store.close()
