"""The client daemon: one process hosting one or more client identities.

Each identity keeps its private shard (``fl.rounds.Federation``: the same
deterministic partition as the simulator), its privacy accountant (persisted
in ``RUN_DIR/<id>.privacy.json`` before an update leaves the process) and
listens on its own genesis address. At start it registers its data summary
and DP step plan on the chain. When the server's signed ``start-round``
notice arrives, it downloads the global model (checking the server's
signature and the digest the notice names), trains with
``ClientState.participate`` (the simulator's call, with the same per-client
generators, so the update is bit-identical), and streams the update, with
its signed claim, to every miner.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
from pathlib import Path
from typing import Any

import grpc
import torch

from fl.models import build_model
from fl.rounds import ClientState, Federation
from fl.seeds import torch_generator
from node.daemon import (
    NodeLog,
    NodeStatusServicer,
    add_health,
    add_servicer,
    channel,
    load_node_splits,
    signed_record,
)
from node.genesis import Genesis
from node.identity import AuthError, Identity, verify_envelope, write_file_atomically
from node.offchain import initial_spec
from node.records import REGISTRATION_TIMESTAMP, Registration
from node.tensors import (
    MODEL_KIND,
    MODEL_REQUEST_KIND,
    UPDATE_KIND,
    UpdateRejected,
    receive_tensor_stream,
    tensor_stream,
)
from proto import llbcfl_pb2 as pb
from proto import llbcfl_pb2_grpc as pb_grpc


def registration(state: ClientState) -> Registration:
    s, p = state.summary, state.plan
    return Registration(
        s.client,
        s.n_samples,
        tuple(s.classes_present),
        float(s.quality),
        float(p.sample_rate),
        int(p.steps),
        float(p.noise_multiplier_or_eps0),
    )


class ClientHost:
    """The identities of one client process and the training they share."""

    def __init__(
        self, genesis: Genesis, identities: list[Identity], *, federation: Federation, run_dir: Path
    ) -> None:
        self.genesis = genesis
        self.config = genesis.run
        self.membership = genesis.membership
        self.run_dir = run_dir
        self.identities = {i.node_id: i for i in identities}
        self.states: dict[str, ClientState] = {}
        for ident in identities:
            node = self.membership.get(ident.node_id)
            if node is None or node.role != "client" or node.public_key != ident.public_key:
                raise ValueError(f"{ident.node_id} is not a client of this genesis")
            state = federation.client(ident.node_id)
            ledger = self._ledger(ident.node_id)
            if ledger.exists():
                state.accountant.load_state_dict(json.loads(ledger.read_text()))
            self.states[ident.node_id] = state
        self.model = build_model(self.config.model, generator=torch_generator(0, "scratch"))
        self.spec = initial_spec(self.config)
        self.lock = asyncio.Lock()
        self.rounds_started: dict[str, set[int]] = {cid: set() for cid in self.identities}
        self.trained: dict[str, set[int]] = {}
        self.tasks: set[asyncio.Task] = set()
        self.logs = {cid: NodeLog(cid) for cid in self.identities}

    def _ledger(self, cid: str) -> Path:
        return self.run_dir / f"{cid}.privacy.json"

    async def register_all(self, stop: asyncio.Event) -> None:
        async def one(cid: str, address: str) -> None:
            envelope = signed_record(
                self.identities[cid],
                registration(self.states[cid]),
                timestamp=REGISTRATION_TIMESTAMP,
            )
            for _attempt in range(100):
                if stop.is_set():
                    return
                try:
                    async with channel(address) as ch:
                        await pb_grpc.MinerStub(ch).Submit(envelope, timeout=10)
                    return
                except grpc.aio.AioRpcError as exc:
                    if exc.code() != grpc.StatusCode.UNAVAILABLE:
                        self.logs[cid].warning(f"registration refused: {exc.details()}")
                        return
                    await asyncio.sleep(0.2)  # miner still starting: retry with backoff

        await asyncio.gather(
            *(one(cid, m.address) for cid in self.identities for m in self.membership.miners)
        )

    async def start_round(self, cid: str, notice: pb.RoundNotice) -> pb.StartRoundReply:
        state = self.states[cid]
        if notice.round in self.rounds_started[cid]:
            return pb.StartRoundReply(accepted=True, reason="already started")
        if state.declines():
            return pb.StartRoundReply(accepted=False, reason="privacy budget exhausted")
        self.rounds_started[cid].add(notice.round)
        task = asyncio.create_task(self._train_and_upload(cid, notice))
        self.tasks.add(task)
        task.add_done_callback(self.tasks.discard)
        return pb.StartRoundReply(accepted=True)

    async def _download(self, cid: str, notice: pb.RoundNotice) -> Any:
        server = self.membership.server
        async with channel(server.address) as ch:
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
        log.round = notice.round
        try:
            weights = await self._download(cid, notice)
            async with self.lock:
                update = await asyncio.to_thread(
                    self.states[cid].participate,
                    self.model,
                    weights,
                    round=notice.round,
                    config=self.config,
                )
                # The spend is durable before anything leaves the process.
                ledger = json.dumps(self.states[cid].accountant.state_dict()).encode()
                write_file_atomically(self._ledger(cid), ledger, mode=0o600)
                self.trained.setdefault(cid, set()).add(notice.round)
            if update is None:
                log.info("sends nothing this round")
                return
            await asyncio.gather(
                *(
                    self._upload(cid, m.address, update, notice.model_digest)
                    for m in self.membership.miners
                )
            )
            log.info("update sent")
        except (grpc.aio.AioRpcError, UpdateRejected) as exc:
            log.error(f"round {notice.round} failed: {exc}")
            if notice.round not in self.trained.get(cid, set()):
                # Nothing was trained (e.g. the server went down during the
                # download): a repeated notice may start the round again.
                self.rounds_started[cid].discard(notice.round)

    async def _upload(self, cid: str, address: str, update: Any, base: bytes) -> None:
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
                async with channel(address) as ch:
                    await pb_grpc.MinerStub(ch).SubmitUpdate(iter(parts), timeout=60)
                return
            except grpc.aio.AioRpcError as exc:
                if exc.code() not in (
                    grpc.StatusCode.UNAVAILABLE,
                    grpc.StatusCode.FAILED_PRECONDITION,
                ):
                    self.logs[cid].warning(f"{address} refused the update: {exc.details()}")
                    return
                await asyncio.sleep(0.2)  # miner down or not yet at this round: retry


class ClientServicer(pb_grpc.ClientServicer):
    def __init__(self, host: ClientHost, cid: str) -> None:
        self.host = host
        self.cid = cid

    async def StartRound(self, request: pb.Envelope, context: Any) -> pb.StartRoundReply:
        try:
            verify_envelope(
                request,
                self.host.membership,
                expected_kind="start-round",
                allowed_roles=("server",),
            )
        except AuthError as exc:
            code = (
                grpc.StatusCode.PERMISSION_DENIED
                if exc.reason == "wrong-role"
                else grpc.StatusCode.UNAUTHENTICATED
            )
            await context.abort(code, str(exc))
        notice = pb.RoundNotice()
        try:
            notice.ParseFromString(request.payload)
        except Exception:
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, "malformed round notice")
        if notice.round < 1 or len(notice.model_digest) != 32:
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, "malformed round notice")
        return await self.host.start_round(self.cid, notice)


async def run_clients(
    genesis: Genesis,
    identities: list[Identity],
    *,
    run_dir: Path,
    data_dir: str | None,
    stop: asyncio.Event,
    log: NodeLog,
) -> None:
    config = genesis.run
    torch.set_num_threads(config.threads)
    splits = load_node_splits(config, data_dir, train=True)
    host = ClientHost(
        genesis,
        identities,
        federation=Federation.create(config, splits.train, only={i.node_id for i in identities}),
        run_dir=run_dir,
    )
    del splits  # the hosted shards are copies; the rest of MNIST can go
    servers = []
    for cid in host.identities:
        server = grpc.aio.server()
        add_servicer(server, "Client", ClientServicer(host, cid))
        add_servicer(
            server,
            "Node",
            NodeStatusServicer(
                node_id=cid,
                role="client",
                genesis_digest=genesis.digest,
                status=lambda cid=cid: (max(host.rounds_started[cid], default=0), 0, b""),
            ),
        )
        add_health(server)
        server.add_insecure_port(genesis.membership[cid].address)
        await server.start()
        servers.append(server)
    log.info(f"hosting {len(host.identities)} client(s): {', '.join(host.identities)}")
    try:
        await host.register_all(stop)
        await stop.wait()
    finally:
        for task in list(host.tasks):
            task.cancel()
        for server in servers:
            await server.stop(1.0)
        with contextlib.suppress(Exception):
            await asyncio.gather(*host.tasks, return_exceptions=True)
