"""The client daemon: the ``Client`` service of every hosted identity, and the host's start.

:class:`ClientServicer` decodes and calls :func:`start_round`, which checks
that the notice is the server's (signature, kind, role) and well formed and
hands it to ``ClientHost.start_round`` (the chain and the ledger decide);
refusals are those of ``node.errors``. :func:`run_clients` serves one
endpoint per identity with ``node.serving.serve``, then reads the chain,
reconciles the privacy ledger and registers every identity.
"""

from __future__ import annotations

import asyncio
import contextlib
from pathlib import Path
from typing import Any

import torch

from chain.state import Phase
from fl.privacy import BudgetExhausted
from fl.rounds import Federation
from node.client import ClientHost
from node.daemon import NodeLog, load_node_splits
from node.errors import InvalidRequest, decode
from node.full_disk import PROBE_SECONDS
from node.genesis import Genesis
from node.identity import Identity, verify_envelope
from node.privacy_ledger import PrivacyLedger
from node.serving import Endpoint, StatusInfo, listen_address, serve
from proto import llbcfl_pb2 as pb
from proto import llbcfl_pb2_grpc as pb_grpc


async def start_round(host: ClientHost, cid: str, envelope: pb.Envelope) -> pb.StartRoundReply:
    """The server's signed start-round notice for ``cid``, checked and handed to the host."""
    verify_envelope(
        envelope, host.membership, expected_kind="start-round", allowed_roles=("server",)
    )
    notice = decode(pb.RoundNotice, envelope.payload, "round notice")
    if notice.round < 1 or len(notice.model_digest) != 32:
        raise InvalidRequest("malformed round notice")
    return await host.start_round(cid, notice)


class ClientServicer(pb_grpc.ClientServicer):
    """The gRPC face of one hosted identity: calls :func:`start_round`."""

    def __init__(self, host: ClientHost, cid: str) -> None:
        self.host = host
        self.cid = cid

    async def StartRound(self, request: pb.Envelope, context: Any) -> pb.StartRoundReply:
        return await start_round(self.host, self.cid, request)


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
    endpoints = [
        Endpoint(
            node_id=cid,
            role="client",
            address=listen_address(genesis.membership[cid].address, bind_host),
            genesis_digest=genesis.digest,
            status=lambda cid=cid: StatusInfo(
                host.last_round[cid], host.follower.state.height, read_only=host.disk.read_only
            ),
            services={"Client": ClientServicer(host, cid)},
        )
        for cid in host.identities
    ]

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
            await follow_to_the_end(host, stop, stay=stay, log=log)
        finally:
            for task in list(host.tasks):
                task.cancel()

    try:
        await serve(endpoints, stop=stop, run=drive, log=log, metrics_port=metrics_port)
    finally:
        with contextlib.suppress(Exception):
            await asyncio.gather(*host.tasks, return_exceptions=True)
        await host.follower.close()
