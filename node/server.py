"""The federated-learning server daemon: selection, model distribution, aggregation.

Round r (docs/NETWORK.md, "One round"): once the block holding round r-1's summary
(for round 1: the last registration) is committed, compute Algorithm 1 from
the chain state (:meth:`chain.records.ChainState.expected_selection`, the
simulator's ``select_round`` call, seeded by that block's digest or, with
``selection_seed = "run"``, by the run seed) and submit it to the miners;
once the selection is committed, put a signed ``start-round`` notice on
the ``Server/Attend`` stream of each selected client (clients dial out and
keep that stream open; one that connects later in the round gets it then;
the client downloads the model with ``Server.DownloadModel``), while
waiting for the committed verdict record of r (the miners close the round
at its deadline, so no client can hold it longer);
fetch the accepted updates by digest and client from the miners, with a
signed ``fetch-update`` request (only miners and the server may read
updates; the receiver re-checks each client's signed claim and the
digest); aggregate with ``fl.rounds.aggregate_round``; evaluate on the test
split; checkpoint; submit the round summary and wait for it to commit.

A full disk (``node.full_disk``) makes the server read-only: it keeps serving
model downloads and ``Node.Status``, writes ``progress.json`` again when it
can, and waits at its next checkpoint (or ``metrics.json``), trying the write
again every ``PROBE_SECONDS``, so no round is summarised before its
checkpoint is on disk; it goes on by itself once the write fits.

A restarted server first reads the chain up to a miner's head, then resumes
from the newest checkpoint whose model digest the committed round summaries
hold (``node.checkpoints``): it skips the rounds up to it and fetches only
the updates of later rounds.

The server learns of commits by following the chain (``node.follower``): it
polls a miner's ``FetchBlocks`` and accepts a block only with a valid commit
certificate (2f+1 miner signatures), so a single lying miner cannot make it
act on an uncommitted block.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import grpc

from chain.digests import claim_bytes, weights_digest
from chain.metrics import RoundRecord, metrics_document, progress_report, round_record
from chain.models import GlobalModels, initial_spec
from chain.records import (
    Record,
    RoundSummary,
    UpdateRecord,
    record_kind_name,
)
from fl.attacks import choose_malicious
from fl.data import Split
from fl.models import model_for
from fl.seeds import numpy_generator, torch_generator
from fl.training import evaluate
from fl.weights import set_weights
from node.checkpoints import Checkpoint, newest_trusted_checkpoint, write_checkpoint
from node.daemon import NodeLog, signed_record
from node.durable import write_json_durably
from node.follower import ChainFollower
from node.full_disk import PROBE_SECONDS, DiskGuard
from node.genesis import Genesis
from node.identity import Identity, signing_tag, verify_signature
from node.metrics import ROUNDS
from node.offchain import BlobKey, BlobStore, fetch_update, wall_clock_ms
from node.serving import ChannelPool
from node.tensor_receiver import UpdateRejected
from node.tensors import UPDATE_KIND
from proto import llbcfl_pb2 as pb
from proto import llbcfl_pb2_grpc as pb_grpc

POLL_SECONDS = 0.05
# Envelope kind of a client's attendance (``Server/Attend``, node.client_service).
ATTEND_KIND = "attend"
# A record not on the chain this long after it was submitted is submitted again
# (the same signed bytes: a miner that holds it answers ALREADY_EXISTS).
RESUBMIT_SECONDS = 10.0
# A miner that refuses a record as out of turn (FAILED_PRECONDITION) is most
# likely a block behind the one the server follows: asked again this often, so
# many times, before the record waits for the next resubmission.
BEHIND_WAIT_SECONDS = 0.2
BEHIND_RETRIES = 15


class Stopped(Exception):
    """SIGINT/SIGTERM arrived while the server was waiting for the chain."""


class Server:
    def __init__(
        self, genesis: Genesis, identity: Identity, *, run_dir: Path, test: Split, log: NodeLog
    ) -> None:
        self.genesis = genesis
        self.config = genesis.run
        self.identity = identity
        self.run_dir = run_dir
        self.log = log
        self.disk = DiskGuard(log, run_dir)
        self.membership = genesis.membership
        if self.membership.server.node_id != identity.node_id:
            raise ValueError(f"{identity.node_id} is not this genesis's server")
        self.follower = ChainFollower(genesis, log, on_advance=self.write_progress)
        self.state = self.follower.state
        self.spec = initial_spec(self.config)
        self.blobs = BlobStore(
            None,
            membership=self.membership,
            spec=self.spec,
            max_bytes=genesis.protocol.max_stream_bytes,
        )
        self.models = GlobalModels(self.config)
        self.test = test
        self.scratch = model_for(self.config, generator=torch_generator(0, "scratch"))
        self.current: tuple[int, Any, bytes] | None = None  # round, weights, digest
        self.progress: dict[str, Any] | None = None  # as last written to progress.json
        # Client id -> the queue of its Attend stream; the open round's notice.
        self.channels = ChannelPool()  # one connection per miner
        self.attending: dict[str, asyncio.Queue[pb.RoundCall | None]] = {}
        self.open_call: tuple[int, frozenset[str], pb.Envelope] | None = None

    async def wait_for(self, condition: Callable[[], bool], stop: asyncio.Event) -> None:
        while not condition():
            if stop.is_set():
                raise Stopped
            with contextlib.suppress(asyncio.TimeoutError):
                await asyncio.wait_for(stop.wait(), POLL_SECONDS)

    async def submit_until(
        self, record: Record, committed: Callable[[], bool], stop: asyncio.Event
    ) -> None:
        """Submit ``record`` and wait until ``committed()``, submitting it again every
        :data:`RESUBMIT_SECONDS` meanwhile: a record that reached no miner (the
        server cut from them) is not lost. Its timestamp is fixed by the record,
        so a copy that arrives twice is executed once."""
        loop = asyncio.get_running_loop()
        while not committed():
            # In the background: a miner that lags must not hold the round once
            # the others have committed the record.
            sending = asyncio.create_task(self.submit(record))
            try:
                deadline = loop.time() + RESUBMIT_SECONDS
                while not committed() and loop.time() < deadline:
                    if stop.is_set():
                        raise Stopped
                    with contextlib.suppress(asyncio.TimeoutError):
                        await asyncio.wait_for(stop.wait(), POLL_SECONDS)
            finally:
                sending.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await sending

    def write_progress(self) -> None:
        """Write run_dir/progress.json (``network up`` shows it) if the chain moved it on.

        Called when the follower applied blocks and after each round. A failed
        write is logged, not raised: the run does not depend on it. On a full
        disk it is tried again (quietly) at the next change, and its success
        ends read-only mode.
        """
        report = progress_report(self.state)
        if report == self.progress:
            return
        path = self.run_dir / "progress.json"
        try:
            written = self.disk.retry(
                "writing progress.json", lambda: write_json_durably(path, report)
            )
        except OSError as exc:
            self.log.warning(f"progress.json not written: {exc}")
            return
        if written:
            self.progress = report

    async def persist(self, what: str, write: Callable[[], object], stop: asyncio.Event) -> None:
        """``write()``; on a full disk, wait read-only and try again every PROBE_SECONDS."""
        while not self.disk.retry(what, write):
            with contextlib.suppress(asyncio.TimeoutError):
                await asyncio.wait_for(stop.wait(), PROBE_SECONDS)
            if stop.is_set():
                raise Stopped

    # Talking to miners and clients -------------------------------------------------

    async def submit(self, record: Record) -> None:
        envelope = signed_record(self.identity, record)

        async def one(address: str) -> bool:
            for attempt in range(BEHIND_RETRIES + 1):
                try:
                    async with self.channels.get(address) as ch:
                        await pb_grpc.MinerStub(ch).Submit(envelope, timeout=10)
                    return True
                except grpc.aio.AioRpcError as exc:
                    if exc.code() == grpc.StatusCode.ALREADY_EXISTS:
                        # On the chain already (a restart), or forwarded to this
                        # miner by another one before this copy arrived.
                        self.log.info(f"submit to {address}: {exc.details()}")
                        return True
                    if exc.code() == grpc.StatusCode.FAILED_PRECONDITION and (
                        attempt < BEHIND_RETRIES
                    ):
                        # The miner has not applied the block this record follows
                        # yet (the server read it from a faster one): ask again soon.
                        await asyncio.sleep(BEHIND_WAIT_SECONDS)
                        continue
                    self.log.warning(f"submit to {address}: {exc.code().name} {exc.details()}")
                    return False
            return False

        miners = self.membership.miners
        reached = sum(await asyncio.gather(*(one(m.address) for m in miners)))
        quorum = 2 * ((len(miners) - 1) // 3) + 1
        if reached < quorum:
            self.log.warning(
                f"{record_kind_name(record)} reached {reached} of {len(miners)} miners, "
                f"fewer than a quorum of {quorum}: it commits only if they forward it",
                event="no-quorum",
            )

    # Client connections --------------------------------------------------------

    def attach(self, cids: list[str], queue: asyncio.Queue) -> None:
        """``queue`` (an Attend stream) now gets the notices of ``cids``; a stream that
        they replace and that carries no other identity is ended. The notice
        of the open round goes out at once to those it selects."""
        for cid in cids:
            old = self.attending.get(cid)
            self.attending[cid] = queue
            if old is not None and old is not queue and old not in self.attending.values():
                old.put_nowait(None)
        if self.open_call is not None:
            _rnd, selected, envelope = self.open_call
            for cid in cids:
                if cid in selected:
                    queue.put_nowait(pb.RoundCall(client_id=cid, notice=envelope))

    def detach(self, cids: list[str], queue: asyncio.Queue) -> None:
        for cid in cids:
            if self.attending.get(cid) is queue:
                del self.attending[cid]

    def notify(self, rnd: int, selected: tuple[str, ...], digest: bytes) -> None:
        """Put round ``rnd``'s signed start-round notice on each selected client's stream.

        Clients dial out (``Server/Attend``): the notice goes to those
        attending now, and to any selected client that connects before the
        round's verdicts commit (:meth:`attach`). The round never waits for a
        client: the miners close it at its deadline.
        """
        deadline = self.genesis.protocol.round_deadline_ms
        notice = pb.RoundNotice(round=rnd, model_digest=digest, deadline_ms=deadline)
        envelope = self.identity.sign("start-round", notice.SerializeToString())
        self.open_call = (rnd, frozenset(selected), envelope)
        absent = []
        for cid in selected:
            queue = self.attending.get(cid)
            if queue is None:
                absent.append(cid)
            else:
                queue.put_nowait(pb.RoundCall(client_id=cid, notice=envelope))
        if absent:
            self.log.warning(
                f"not connected: {', '.join(absent)}; each gets round {rnd}'s notice "
                "if it connects before the round closes"
            )

    async def notify_until_verdicts(
        self, rnd: int, selected: tuple[str, ...], digest: bytes, stop: asyncio.Event
    ) -> None:
        """Notify the selected clients and wait for round ``rnd``'s verdicts to commit.

        The wait never depends on a client: the verdicts commit at the latest
        at the round's deadline; then the notice is withdrawn.
        """
        self.notify(rnd, selected, digest)
        try:
            await self.wait_for(lambda: rnd in self.state.verdicts, stop)
        finally:
            self.open_call = None

    async def fetch_updates(self, keys: list[BlobKey]) -> None:
        """Fetch the updates ``keys`` (digest, client) from the miners, the client's
        signature checked again (``node.offchain.fetch_update``)."""
        for key in self.blobs.missing(keys):
            digest, client = key
            for miner in self.membership.miners:
                try:
                    received = await fetch_update(
                        miner.address,
                        key,
                        identity=self.identity,
                        membership=self.membership,
                        spec=self.spec,
                        max_bytes=self.genesis.protocol.max_stream_bytes,
                        now_ms=wall_clock_ms(),
                        timeout=30,
                    )
                except (grpc.aio.AioRpcError, UpdateRejected) as exc:
                    self.log.warning(
                        f"fetch {client}'s {digest.hex()[:12]} from {miner.node_id}: {exc}"
                    )
                    continue
                self.blobs.put(received)
                self.log.info(
                    f"fetched round {received.round} update {digest.hex()[:12]} "
                    f"of {client} from {miner.node_id}"
                )
                break
            else:
                raise RuntimeError(f"no miner holds {client}'s update {digest.hex()}")

    # The rounds ------------------------------------------------------------------

    def _client_signed(self, rnd: int, u: UpdateRecord) -> bool:
        """The client's own signature over (round, id, base, digest, samples) in the record."""
        claim = claim_bytes(
            round=rnd,
            sender_id=u.client,
            base_digest=u.base_digest,
            digest=u.digest,
            num_samples=u.n_samples,
        )
        key = self.membership[u.client].public_key
        return verify_signature(key, signing_tag(UPDATE_KIND) + claim, u.claim_signature)

    @property
    def checkpoint_dir(self) -> Path:
        return self.run_dir / "checkpoints"

    def checkpoint(self, rnd: int) -> None:
        """Write the model after round ``rnd`` and the server velocity (atomically)."""
        weights = self.models.weights(rnd + 1, self.state, self.blobs.update_of)
        assert weights is not None
        velocity = self.models.velocity(rnd + 1)
        write_checkpoint(self.checkpoint_dir, Checkpoint(rnd, weights, velocity))

    def resume_from_checkpoint(self) -> int:
        """Seed the global models from the newest checkpoint the chain vouches for.

        Returns its round (0: none, every round is recomputed from round 1).
        Call it once the chain is read up to a miner's head: a checkpoint
        newer than the last summary this server has seen is not trusted.
        """
        found = newest_trusted_checkpoint(
            self.checkpoint_dir,
            summaries=self.state.summaries,
            spec=self.spec,
            with_velocity=self.config.server_momentum > 0,
            warn=self.log.warning,
        )
        if found is None:
            return 0
        self.models.resume(found.round + 1, found.weights, found.velocity)
        self.log.info(
            f"resuming from round-{found.round:04d}.pt: its model digest is the one "
            f"committed for round {found.round}"
        )
        return found.round

    async def run_round(self, rnd: int, stop: asyncio.Event) -> None:
        state = self.state
        self.log.round = rnd
        if rnd < self.models.first:
            return  # resumed from a checkpoint after this round: its summary is committed
        if rnd not in state.selections:
            await self.wait_for(lambda: state.last_summarised == rnd - 1, stop)
            selection = state.expected_selection(rnd)
            self.log.info(f"selecting {list(selection.selected)}", event="round-start")
            await self.submit_until(selection, lambda: rnd in state.selections, stop)
        selection = state.selections[rnd]
        # After a restart the blobs of the rounds since the checkpoint it resumed
        # from (or since round 1) are fetched again, and the global model is
        # recomputed from the chain.
        earlier = [
            (u.digest, u.client)
            for r in range(self.models.first, rnd)
            for u in state.verdicts[r].updates
            if u.accepted
        ]
        await self.fetch_updates(earlier)
        weights = self.models.weights(rnd, state, self.blobs.update_of)
        assert weights is not None
        digest = weights_digest(weights)
        self.current = (rnd, weights, digest)
        if rnd not in state.verdicts:
            await self.notify_until_verdicts(rnd, selection.selected, digest, stop)
        verdicts = state.verdicts[rnd]
        self.log.info(f"verdicts committed: accepted {verdicts.accepted}")
        await self.fetch_updates([(u.digest, u.client) for u in verdicts.updates if u.accepted])
        for u in verdicts.updates:
            if u.accepted and not self._client_signed(rnd, u):
                raise RuntimeError(f"round {rnd}: {u.client}'s signature on its digest is invalid")
        new_weights = self.models.weights(rnd + 1, state, self.blobs.update_of)
        assert new_weights is not None
        set_weights(self.scratch, new_weights)
        loss, acc = evaluate(self.scratch, self.test.x, self.test.y)
        what = f"writing the checkpoint of round {rnd}"
        await self.persist(what, lambda: self.checkpoint(rnd), stop)
        if rnd not in state.summaries:
            summary = RoundSummary(rnd, weights_digest(new_weights), acc, loss)
            await self.submit_until(summary, lambda: rnd in state.summaries, stop)
        ROUNDS.labels(self.identity.node_id).inc()
        self.log.info(f"test accuracy {acc:.4f}")

    def round_record(self, rnd: int, seconds: float) -> RoundRecord:
        record = round_record(self.state, rnd, seconds=seconds)
        record.extra["block_height"] = self.state.record_heights.get(("chain-summary", rnd))
        return record

    async def drive(self, stop: asyncio.Event, metrics_path: Path) -> dict[str, Any]:
        start = time.perf_counter()
        self.log.info("waiting for every client to register")
        self.write_progress()
        await self.wait_for(lambda: self.follower.caught_up and self.state.all_registered, stop)
        self.resume_from_checkpoint()
        records = []
        for rnd in range(1, self.config.rounds + 1):
            t0 = time.perf_counter()
            await self.run_round(rnd, stop)
            records.append(self.round_record(rnd, time.perf_counter() - t0))
            self.write_progress()
        # Who attacks is part of the run config (simulation of attackers), not
        # something the server observes; it is listed for comparison with simulate.
        malicious = choose_malicious(
            [c.node_id for c in self.membership.clients],
            fraction=self.config.malicious,
            rng=numpy_generator(self.config.seed, "malicious"),
        )
        doc = metrics_document(
            self.config,
            records,
            total_seconds=time.perf_counter() - start,
            malicious_clients=malicious,
        )
        await self.persist(
            f"writing {metrics_path.name}", lambda: write_json_durably(metrics_path, doc), stop
        )
        self.log.info(f"done: final accuracy {records[-1].accuracy:.4f}, metrics {metrics_path}")
        return doc
