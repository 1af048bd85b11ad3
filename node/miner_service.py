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
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Callable, Iterator
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path
from typing import Any

import torch

from chain.records import decode_operation, kind_named
from chain.state import Phase
from consensus.ledger import Block, Request
from consensus.messages import Blocks, decode_message
from node.daemon import NodeLog, load_node_splits
from node.errors import Duplicate, InvalidRequest, NotFound, NotPermitted, NotReady, WrongState
from node.genesis import Genesis
from node.identity import Identity, verify_envelope
from node.miner import Miner, validate_elsewhere
from node.offchain import check_fetch_request, wall_clock_ms
from node.peers import BlobFetcher, catch_up_from_peers, verdict_records
from node.serving import Endpoint, serve
from node.tensor_receiver import ReceivedTensors, TensorStreamReceiver, UpdateRejected
from node.tensors import UPDATE_KIND, relay_stream
from node.workers import worker_process, worker_thread
from proto import llbcfl_pb2 as pb
from proto import llbcfl_pb2_grpc as pb_grpc

Digests = list[tuple[str, bytes, int]]  # (client, digest, samples), the validation's key


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

    def close(self) -> None:
        self.validator.shutdown(wait=False, cancel_futures=True)
        if self.processes is not None:
            self.processes.shutdown(wait=True, cancel_futures=True)

    # Requests -----------------------------------------------------------------------

    async def deliver(self, message: Any) -> None:
        """One PBFT message from a peer: fetch the blobs it refers to, then step the replica."""
        m = self.m
        missing = self.fetcher.wanted_by(message)
        if missing:
            m.log.info(f"fetching {len(missing)} blob(s) before {type(message).__name__}")
            await self.fetcher.fetch(missing, prefer=message.sender)
        async with self.core:
            for record in verdict_records(message):
                if record.round == m.state.current_round:
                    held = [u for u in record.updates if m.blobs.get(u.digest, u.client)]
                    await self._prevalidate(
                        record.round, [(u.client, u.digest, u.n_samples) for u in held]
                    )
            before = m.replica.height
            m.replica.step(message)
            m.drain()
            await self._prepare_next_model()
        if isinstance(message, Blocks):
            m.log.info(
                f"state transfer: {len(message.blocks)} block(s) from replica "
                f"{message.sender}, height {before} -> {m.replica.height}"
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
        timestamp, record = decode_operation(envelope.payload)
        if kind.code != record.KIND:
            raise InvalidRequest("envelope kind != record kind")
        request = Request(
            signer.node_id, timestamp, bytes(envelope.payload), bytes(envelope.signature)
        )
        async with self.core:
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

    def update_receiver(self) -> TensorStreamReceiver:
        protocol = self.m.genesis.protocol
        return TensorStreamReceiver(
            expected=self.m.spec,
            max_total_bytes=protocol.max_stream_bytes,
            max_chunk_bytes=protocol.chunk_bytes,
        )

    async def refused_update(self, exc: UpdateRejected) -> None:
        """A stream the receiver refused; a signed one with bad values is kept as evidence."""
        m = self.m
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
            if rnd != m.state.current_round:
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
        async with self.core:
            self.m.replica.tick()
            self.m.drain()
            await self._verdicts_if_due()
            await self._prepare_next_model()

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
        """``maybe_submit_verdicts`` with its validation done on the worker (core held)."""
        due = self.m.round_to_validate()
        if due is not None:
            await self._prevalidate(*due)
        self.m.maybe_submit_verdicts()
        self.m.drain()

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
        m._own_verdicts[key] = own

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
        count = 0
        async for item in request_iterator:
            await self.h.deliver(decode_message(item.data))
            count += 1
        return pb.Ack(received=count)

    async def Submit(self, request: pb.Envelope, context: Any) -> pb.SubmitReceipt:
        return await self.h.submit(request)

    async def SubmitUpdate(self, request_iterator: Any, context: Any) -> pb.UpdateReceipt:
        receiver = self.h.update_receiver()
        try:
            async for part in request_iterator:
                receiver.add(part)
            received = receiver.finish(membership=self.h.m.membership, kind=UPDATE_KIND)
        except UpdateRejected as exc:
            await self.h.refused_update(exc)
            # Read (and drop) the rest of the stream, up to a bound, before
            # answering: grpc.aio clients that are still writing when the
            # server ends the call can report INTERNAL instead of this status
            # (grpc/grpc#36066).
            await discard_rest(request_iterator, limit=self.h.m.genesis.protocol.max_stream_bytes)
            raise
        return await self.h.accept_update(received)

    async def FetchUpdate(self, request: pb.Envelope, context: Any) -> Any:
        received = self.h.held_update(request)
        for part in relay_stream(received, chunk_bytes=self.h.m.genesis.protocol.chunk_bytes):
            yield part

    async def FetchBlocks(self, request: pb.FetchBlocksRequest, context: Any) -> Any:
        for block in self.h.blocks_from(request.from_height):
            yield pb.BlockBytes(height=block.height, block=block.encode())


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

    Unless ``stay``, set ``stop`` :data:`LINGER_SECONDS` after the chain
    holds the run's last round summary: the run is over.
    """
    miner = handler.m
    for peer in miner.peers.values():
        peer.start()
    tick = miner.genesis.protocol.tick_ms / 1e3
    ticks = 0
    repair: asyncio.Task | None = None
    poll: asyncio.Task | None = None
    loop = asyncio.get_running_loop()
    over_at: float | None = None
    try:
        while not stop.is_set():
            with contextlib.suppress(asyncio.TimeoutError):
                await asyncio.wait_for(stop.wait(), tick)
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
    handler = MinerHandler(miner)
    address = genesis.membership[identity.node_id].address
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
        )
    finally:
        for peer in miner.peers.values():
            await peer.stop()
        handler.close()
        miner.store.close()
