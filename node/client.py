"""The client daemon: one process hosting one or more client identities.

Each identity keeps its private shard (``fl.rounds.Federation``: the same
deterministic partition as the simulator). The process opens no port: it
dials out, to the server for its round notices (``Server/Attend``, one
stream for every identity it hosts: ``node.client_service``) and to the
miners to register and upload. Its privacy spend lives in the host's privacy ledger
(``node.privacy_ledger``), keyed by the digest of its records, so spending
composes across runs on the same data and survives restarts.

At start a client reads the chain (``node.follower``: certified blocks only),
takes the larger of its ledger and the chain (releases the chain shows are
entered in the ledger), and registers its noisy label histogram: the one
already entered for this network if there is one, so a restart never
releases a second draw.

A ``start-round`` notice from the server is accepted only for a round whose
selection is committed on the chain with this client in it, whose model is
the one the chain commits to, that this client has not trained before (in
this network, even before a restart: ``ALREADY_EXISTS``) and whose spend
fits the budget (else the client declines and says so). The client then
downloads the model (checking the server's signature and the digest),
*reserves* the round's spend in the ledger (durably, under a lock that
covers every identity of the process and every process sharing the ledger),
trains with ``ClientState.participate`` (the simulator's call, secret noise
unless the testbed genesis asks for reproducible noise), and streams the
update, with its signed claim, to every miner.

A full disk under the ledger (``node.full_disk``) makes the host read-only:
a reservation that cannot be written is not made, so that round is not
trained (nothing is released without its entry on disk), and start-round
notices are refused with RESOURCE_EXHAUSTED until a probe finds room again.
"""

from __future__ import annotations

import asyncio
import contextlib
from dataclasses import dataclass
from typing import Any

import grpc

from chain.digests import weights_digest
from chain.models import initial_spec, initial_weights
from chain.records import Registration
from fl.data import shard_digest
from fl.models import model_for
from fl.privacy import BudgetExhausted
from fl.rounds import ClientState, Federation, privacy_plan
from fl.seeds import torch_generator
from node.daemon import NodeLog, signed_record
from node.errors import DiskFull, Duplicate, InvalidRequest, NotPermitted, WrongState
from node.follower import ChainFollower
from node.full_disk import DiskGuard
from node.genesis import Genesis
from node.identity import Identity
from node.metrics import EPSILON, STREAM_BYTES
from node.privacy_ledger import (
    REGISTRATION_ROUND,
    AlreadyReserved,
    Budget,
    LedgerEntry,
    PrivacyLedger,
    entry_for,
)
from node.serving import ChannelPool
from node.tensor_receiver import UpdateRejected, receive_tensor_stream
from node.tensors import MODEL_KIND, MODEL_REQUEST_KIND, UPDATE_KIND, tensor_stream
from proto import llbcfl_pb2 as pb
from proto import llbcfl_pb2_grpc as pb_grpc

# How long a starting client waits for a miner to answer before it goes on
# without the chain (a new network's chain is empty anyway).
STARTUP_CHAIN_SECONDS = 30.0


@dataclass(frozen=True)
class RoundAnswer:
    """What a client does with a start-round notice: train, or decline (and why)."""

    accepted: bool
    reason: str = ""


class ClientHost:
    """The identities of one client process, their ledger and the training they share."""

    def __init__(
        self,
        genesis: Genesis,
        identities: list[Identity],
        *,
        federation: Federation,
        ledger: PrivacyLedger,
        log: NodeLog,
        follower: ChainFollower | None = None,
    ) -> None:
        self.genesis = genesis
        self.config = genesis.run
        self.membership = genesis.membership
        self.network = genesis.digest
        self.ledger = ledger
        self.log = log
        self.disk = DiskGuard(log, ledger.path.parent)
        self.identities = {i.node_id: i for i in identities}
        self.states: dict[str, ClientState] = {}
        for ident in identities:
            node = self.membership.get(ident.node_id)
            if node is None or node.role != "client" or node.public_key != ident.public_key:
                raise ValueError(f"{ident.node_id} is not a client of this genesis")
            self.states[ident.node_id] = federation.client(ident.node_id)
        self.data = {cid: shard_digest(s.x, s.y) for cid, s in self.states.items()}
        self.plan = privacy_plan(self.config)
        self.budget = Budget(self.config.epsilon, self.config.delta, self.plan.accountant)
        self.follower = follower or ChainFollower(genesis, log)
        self.model = model_for(self.config, generator=torch_generator(0, "scratch"))
        self.spec = initial_spec(self.config)
        self.initial_digest = weights_digest(initial_weights(self.config))
        # One reservation-and-training at a time across every hosted identity
        # (the model object is shared; the ledger file has its own lock).
        self.lock = asyncio.Lock()
        self.in_flight: dict[str, set[int]] = {cid: set() for cid in self.identities}
        self.last_round: dict[str, int] = dict.fromkeys(self.identities, 0)
        self.tasks: set[asyncio.Task] = set()
        # One connection per peer (the server, each miner) for every identity hosted.
        self.channels = ChannelPool()
        self.logs = {cid: log.child(cid) for cid in self.identities}

    def entry(self, rnd: int) -> LedgerEntry:
        """The ledger entry of this network's round ``rnd`` (0: the registration)."""
        release = self.plan.registration if rnd == REGISTRATION_ROUND else self.plan.step.release
        return entry_for(self.network, rnd, self.config.dp, release)

    def spent(self, cid: str) -> float:
        return self.budget.spent(self.ledger.entries(self.data[cid]))

    # Start: ledger, chain and registration ----------------------------------------

    async def read_chain(self, stop: asyncio.Event) -> None:
        """Catch up with the chain, waiting a bounded time for a miner to answer."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + STARTUP_CHAIN_SECONDS
        while not stop.is_set() and loop.time() < deadline:
            if await self.follower.catch_up():
                return
            with contextlib.suppress(asyncio.TimeoutError):
                await asyncio.wait_for(stop.wait(), 0.2)
        self.log.warning("no miner answered: starting without the chain")

    def reconcile(self) -> None:
        """Take the larger of the ledger and the chain, and fix each client's histogram.

        The chain's registration of a client wins (it is what the miners
        hold); otherwise the histogram already entered for this network, or
        this start's draw, entered now before it is released.
        """
        chain = self.follower.state
        for cid, state in self.states.items():
            data = self.data[cid]
            registered = chain.registrations.get(cid)
            if registered is not None:
                state.histogram = registered.histogram
                self.ledger.adopt(data, [self.entry(REGISTRATION_ROUND)], registered.histogram)
            else:
                state.histogram = self.ledger.register(
                    data, self.entry(REGISTRATION_ROUND), state.histogram, self.budget
                )
            on_chain = [
                self.entry(rnd)
                for rnd, verdicts in chain.verdicts.items()
                if any(u.client == cid for u in verdicts.updates)
            ]
            if self.ledger.adopt(data, on_chain):
                self.logs[cid].info("ledger behind the chain: entered the rounds the chain shows")
            self.logs[cid].info(f"epsilon spent on these records so far: {self.spent(cid):.4f}")

    async def register_all(self, stop: asyncio.Event) -> None:
        async def one(cid: str, address: str) -> None:
            state = self.states[cid]
            envelope = signed_record(
                self.identities[cid], Registration(cid, tuple(state.histogram))
            )
            for _attempt in range(100):
                if stop.is_set():
                    return
                try:
                    async with self.channels.get(address) as ch:
                        await pb_grpc.MinerStub(ch).Submit(envelope, timeout=10)
                    return
                except grpc.aio.AioRpcError as exc:
                    if exc.code() == grpc.StatusCode.ALREADY_EXISTS:
                        return  # on the chain, or waiting to be ordered: nothing to add
                    if exc.code() != grpc.StatusCode.UNAVAILABLE:
                        self.logs[cid].warning(f"registration refused: {exc.details()}")
                        return
                    await asyncio.sleep(0.2)  # miner still starting: retry with backoff

        await asyncio.gather(
            *(one(cid, m.address) for cid in self.identities for m in self.membership.miners)
        )

    # Rounds -----------------------------------------------------------------------------

    def _committed_model(self, rnd: int) -> bytes | None:
        """The digest of round ``rnd``'s starting model as the chain commits to it."""
        if rnd == 1:
            return self.initial_digest
        summary = self.follower.state.summaries.get(rnd - 1)
        return summary.model_digest if summary is not None else None

    async def start_round(self, cid: str, notice: pb.RoundNotice) -> RoundAnswer:
        """Act on a start-round notice (signature checked), or refuse it (``node.errors``)."""
        rnd = notice.round
        self.disk.check()  # taking part starts with a write to the ledger
        if rnd > self.config.rounds:
            raise InvalidRequest(f"round {rnd} is past the run's {self.config.rounds} rounds")
        data = self.data[cid]
        if rnd in self.in_flight[cid] or rnd in self.ledger.rounds(data, self.network):
            raise Duplicate(f"{cid} already took part in round {rnd}")
        await self.follower.catch_up()
        selection = self.follower.state.selections.get(rnd)
        if selection is None:
            raise WrongState(f"round {rnd} has no committed selection on the chain")
        if cid not in selection.selected:
            raise NotPermitted(f"{cid} is not selected in round {rnd}")
        if notice.model_digest != self._committed_model(rnd):
            raise InvalidRequest(
                f"the model announced for round {rnd} is not the one the chain commits to"
            )
        if not self.budget.fits([*self.ledger.entries(data), self.entry(rnd)]):
            return RoundAnswer(accepted=False, reason="privacy budget exhausted")
        if rnd in self.in_flight[cid]:  # a concurrent notice got here first
            raise Duplicate(f"{cid} already took part in round {rnd}")
        self.in_flight[cid].add(rnd)
        self.last_round[cid] = max(self.last_round[cid], rnd)
        task = asyncio.create_task(self._train_and_upload(cid, notice))
        self.tasks.add(task)
        task.add_done_callback(self.tasks.discard)
        return RoundAnswer(accepted=True)

    async def _download(self, cid: str, notice: pb.RoundNotice) -> Any:
        server = self.membership.server
        async with self.channels.get(server.address) as ch:
            request = pb.ModelRequest(round=notice.round, client_id=cid)
            envelope = self.identities[cid].sign(MODEL_REQUEST_KIND, request.SerializeToString())
            parts = [p async for p in pb_grpc.ServerStub(ch).DownloadModel(envelope, timeout=60)]
        received = receive_tensor_stream(
            parts,
            expected=self.spec,
            membership=self.membership,
            kind=MODEL_KIND,
            max_total_bytes=self.genesis.protocol.max_stream_bytes,
        )
        if received.digest != notice.model_digest or received.round != notice.round:
            raise UpdateRejected(grpc.StatusCode.INVALID_ARGUMENT, "model is not the announced one")
        return received.weights

    async def _train_and_upload(self, cid: str, notice: pb.RoundNotice) -> None:
        log = self.logs[cid]
        log.round = rnd = notice.round
        try:
            weights = await self._download(cid, notice)
            async with self.lock:
                # The spend is on disk before training starts: a crash from
                # here on can only over-count.
                with self.disk.writing(f"reserving round {rnd} of {cid} in the privacy ledger"):
                    spent = await asyncio.to_thread(
                        self.ledger.reserve, self.data[cid], self.entry(rnd), self.budget
                    )
                log.info(f"reserved round {rnd}: epsilon spent {spent:.4f}")
                EPSILON.labels(cid).set(spent)
                update = await asyncio.to_thread(
                    self.states[cid].participate,
                    self.model,
                    weights,
                    round=rnd,
                    config=self.config,
                )
            if update is None:
                log.info("sends nothing this round")
                return
            delivered = await asyncio.gather(
                *(
                    self._upload(cid, m.address, update, notice.model_digest)
                    for m in self.membership.miners
                )
            )
            if any(delivered):
                log.info(f"update sent to {sum(delivered)} of {len(delivered)} miners")
            else:
                log.error(f"round {rnd}: the update reached no miner")
        except (AlreadyReserved, BudgetExhausted) as exc:
            log.warning(f"round {rnd} not trained: {exc}")
        except DiskFull:  # nothing reserved, nothing released
            log.info(f"round {rnd} not trained: the disk is full")
        except (grpc.aio.AioRpcError, UpdateRejected) as exc:
            log.error(f"round {rnd} failed: {exc}")
        except Exception as exc:  # a task's error would otherwise vanish unseen
            log.error(f"round {rnd} failed: {type(exc).__name__}: {exc}")
        finally:
            # A round that was reserved stays refused (the ledger says so); one
            # that failed before its reservation may be noticed again.
            self.in_flight[cid].discard(rnd)

    async def _upload(self, cid: str, address: str, update: Any, base: bytes) -> bool:
        for _attempt in range(50):
            parts = tensor_stream(
                update.delta,
                identity=self.identities[cid],
                kind=UPDATE_KIND,
                round=update.round,
                base_digest=base,
                num_samples=update.n_samples,
                chunk_bytes=self.genesis.protocol.chunk_bytes,
            )
            try:
                async with self.channels.get(address) as ch:
                    await pb_grpc.MinerStub(ch).SubmitUpdate(iter(parts), timeout=60)
                size = sum(t.numel() * t.element_size() for t in update.delta.values())
                STREAM_BYTES.labels(cid, "out").inc(size)
                return True
            except grpc.aio.AioRpcError as exc:
                if exc.code() not in (
                    grpc.StatusCode.UNAVAILABLE,
                    grpc.StatusCode.FAILED_PRECONDITION,
                ):
                    self.logs[cid].warning(f"{address} refused the update: {exc.details()}")
                    return False
                await asyncio.sleep(0.2)  # miner down or not yet at this round: retry
        self.logs[cid].warning(f"{address} unreachable: update not delivered there")
        return False
