"""The client daemon: its dial-out connection to the server, and the host's start.

A client process listens on no port. :func:`attend` keeps one
``Server/Attend`` stream open to the server for every identity the process
hosts (reconnecting with backoff, with one log line when the server is lost
and one when it is back); each ``RoundCall`` on it goes to :func:`start_round`,
which checks that the notice is the server's (signature, kind, role) and
well formed and hands it to ``ClientHost.start_round`` (the chain and the
ledger decide). :func:`run_clients` reads the chain, reconciles the privacy
ledger, registers every identity, and attends until the run is over.
"""

from __future__ import annotations

import asyncio
import contextlib
from pathlib import Path

import grpc
import torch

from chain.state import Phase
from fl.privacy import BudgetExhausted
from fl.rounds import Federation
from node.client import ClientHost, RoundAnswer
from node.daemon import NodeLog, load_node_splits
from node.errors import InvalidRequest, Refused, WrongState, decode
from node.full_disk import PROBE_SECONDS
from node.genesis import Genesis
from node.identity import AuthError, Identity, verify_envelope
from node.offchain import wall_clock_ms
from node.privacy_ledger import PrivacyLedger
from node.server import ATTEND_KIND
from node.serving import serve
from proto import llbcfl_pb2 as pb
from proto import llbcfl_pb2_grpc as pb_grpc

# Reconnecting to the server: the first wait, doubled after each failure up to the last.
RECONNECT_SECONDS = (0.2, 5.0)
# The server's answers to an Attend call that trying again cannot change.
# A notice for a round whose selection this host's chain does not show yet is
# tried again this often, for this long (its miner may be a block behind).
BEHIND_WAIT_SECONDS = 0.2
BEHIND_SECONDS = 30.0
REFUSED_FOR_GOOD = (grpc.StatusCode.UNAUTHENTICATED, grpc.StatusCode.PERMISSION_DENIED)


async def start_round(host: ClientHost, cid: str, envelope: pb.Envelope) -> RoundAnswer:
    """The server's signed start-round notice for ``cid``, checked and handed to the host."""
    verify_envelope(
        envelope, host.membership, expected_kind="start-round", allowed_roles=("server",)
    )
    notice = decode(pb.RoundNotice, envelope.payload, "round notice")
    if notice.round < 1 or len(notice.model_digest) != 32:
        raise InvalidRequest("malformed round notice")
    return await host.start_round(cid, notice)


def attend_request(host: ClientHost, now_ms: int) -> pb.AttendRequest:
    """Every hosted identity's signed attendance, as of ``now_ms``."""
    return pb.AttendRequest(
        clients=[
            ident.sign(
                ATTEND_KIND,
                pb.Attendance(
                    client_id=cid, genesis_digest=host.network, time_ms=now_ms
                ).SerializeToString(),
            )
            for cid, ident in host.identities.items()
        ]
    )


def call_round(call: pb.RoundCall) -> int | str:
    try:
        return pb.RoundNotice.FromString(call.notice.payload).round
    except Exception:  # the notice's own check says what is wrong with it
        return "?"


async def answer(host: ClientHost, call: pb.RoundCall, log: NodeLog) -> None:
    """Act on one notice of the stream; what cannot be acted on is logged, not raised."""
    cid = call.client_id
    if cid not in host.identities:
        log.warning(f"the server sent a notice for {cid!r}, which this process does not host")
        return
    loop = asyncio.get_running_loop()
    give_up = loop.time() + BEHIND_SECONDS
    while True:
        try:
            reply = await start_round(host, cid, call.notice)
            break
        except WrongState:
            # The notice can come before the miner this host reads the chain from
            # has applied the block with the round's selection: read again soon.
            if loop.time() < give_up:
                await asyncio.sleep(BEHIND_WAIT_SECONDS)
                continue
            host.logs[cid].info(f"notice not taken: the chain shows no round {call_round(call)}")
            return
        except (Refused, AuthError) as exc:
            host.logs[cid].info(f"notice not taken: {exc}")
            return
    if not reply.accepted:
        host.logs[cid].info(f"declines the round: {reply.reason}")


async def attend(host: ClientHost, stop: asyncio.Event, log: NodeLog) -> None:
    """Keep the ``Server/Attend`` stream open until ``stop``, acting on every notice."""
    address = host.membership.server.address
    wait, longest = RECONNECT_SECONDS
    lost = False
    tasks: set[asyncio.Task] = set()

    async def stream() -> None:
        nonlocal lost, wait
        async with host.channels.get(address) as ch:
            calls = pb_grpc.ServerStub(ch).Attend(attend_request(host, wall_clock_ms()))
            await calls.initial_metadata()  # sent once the server attached the stream
            if not calls.done():  # (a failed call has empty metadata, and is done)
                if lost:
                    log.info(f"server {address} reachable again")
                    lost = False
                wait = RECONNECT_SECONDS[0]
            async for call in calls:
                task = asyncio.create_task(answer(host, call, log))
                tasks.add(task)
                task.add_done_callback(tasks.discard)
        # The server ended the stream (it stops, or a newer stream replaced this one).

    stopping = asyncio.create_task(stop.wait())
    try:
        while not stop.is_set():
            open_stream = asyncio.create_task(stream())
            await asyncio.wait({open_stream, stopping}, return_when=asyncio.FIRST_COMPLETED)
            if not open_stream.done():
                open_stream.cancel()
                await asyncio.gather(open_stream, return_exceptions=True)
                break
            try:
                open_stream.result()
            except grpc.aio.AioRpcError as exc:
                if exc.code() in REFUSED_FOR_GOOD:
                    raise ValueError(f"the server refuses this client: {exc.details()}") from exc
                if not lost:
                    log.warning(
                        f"cannot reach the server {address} ({exc.code().name}); "
                        "trying again with backoff"
                    )
                    lost = True
            with contextlib.suppress(asyncio.TimeoutError):
                await asyncio.wait_for(stop.wait(), wait)
            wait = min(2 * wait, longest)
    finally:
        stopping.cancel()
        for task in tasks:
            task.cancel()


# How often an idle client process reads the chain to learn that the run is over.
END_POLL_SECONDS = 2.0


async def follow_to_the_end(
    host: ClientHost, stop: asyncio.Event, *, stay: bool, log: NodeLog
) -> None:
    """Wait for ``stop``; unless ``stay``, set it once the chain holds the run's last
    round summary (read every :data:`END_POLL_SECONDS`). While the host is
    read-only (a full disk), probe for space as often."""
    while not stop.is_set():
        with contextlib.suppress(asyncio.TimeoutError):
            await asyncio.wait_for(stop.wait(), END_POLL_SECONDS)
        if host.disk.read_only:
            await asyncio.to_thread(host.disk.probe)
        if stay or stop.is_set():
            continue
        await host.follower.catch_up()
        if host.follower.state.phase is Phase.DONE:
            log.info(f"the run is over (round {host.follower.state.last_summarised}); exiting")
            stop.set()


async def enter_in_ledger(host: ClientHost, stop: asyncio.Event) -> None:
    """``host.reconcile()``, waiting read-only while the disk is too full to write the ledger
    (trying again every :data:`node.full_disk.PROBE_SECONDS`; each step is idempotent)."""
    what = "entering the registrations in the privacy ledger"
    while not stop.is_set() and not host.disk.retry(what, host.reconcile):
        with contextlib.suppress(asyncio.TimeoutError):
            await asyncio.wait_for(stop.wait(), PROBE_SECONDS)


async def run_clients(
    genesis: Genesis,
    identities: list[Identity],
    *,
    ledger_path: Path,
    data_dir: str | None,
    stop: asyncio.Event,
    log: NodeLog,
    stay: bool = False,
    bind_host: str | None = None,
    metrics_port: int | None = None,
) -> None:
    config = genesis.run
    torch.set_num_threads(config.threads)
    if config.reproducible_noise:
        log.warning(
            "REPRODUCIBLE NOISE: anyone with the genesis can regenerate this run's DP noise; "
            "these updates carry no privacy (testbed only)"
        )
    splits = load_node_splits(config, data_dir, train=True)
    host = ClientHost(
        genesis,
        identities,
        federation=Federation.create(config, splits.train, only={i.node_id for i in identities}),
        ledger=PrivacyLedger(ledger_path),
        log=log,
    )
    del splits  # the hosted shards are copies; the rest of MNIST can go

    async def drive() -> None:
        log.info(f"hosting {len(host.identities)} client(s): {', '.join(host.identities)}")
        log.info(f"privacy ledger {ledger_path}")
        try:
            await host.read_chain(stop)
            try:
                await enter_in_ledger(host, stop)
            except BudgetExhausted as exc:
                raise ValueError(
                    f"{exc}: the privacy ledger {ledger_path} shows these records' budget spent "
                    "by earlier runs"
                ) from exc
            await host.register_all(stop)
            jobs = [
                asyncio.create_task(attend(host, stop, log)),
                asyncio.create_task(follow_to_the_end(host, stop, stay=stay, log=log)),
            ]
            try:
                done, _ = await asyncio.wait(jobs, return_when=asyncio.FIRST_COMPLETED)
                for job in done:
                    job.result()  # a refusal by the server ends the process with its message
            finally:
                for job in jobs:
                    job.cancel()
                await asyncio.gather(*jobs, return_exceptions=True)
        finally:
            for task in list(host.tasks):
                task.cancel()

    try:
        await serve(
            [], stop=stop, run=drive, log=log, metrics_port=metrics_port, metrics_host=bind_host
        )
    finally:
        with contextlib.suppress(Exception):
            await asyncio.gather(*host.tasks, return_exceptions=True)
        await host.follower.close()
        await host.channels.close()
