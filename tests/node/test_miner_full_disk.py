"""A miner whose disk fills: read-only, nothing sent ahead of the store, recovery.

Real grpc.aio servers on 127.0.0.1 (port 0); the full disk is injected into
the write path (the blob store's fsync, the block store's append or
save_view raise what a full disk raises). tests/node/test_full_disk_tmpfs.py
fills a real tmpfs instead.
"""

from __future__ import annotations

import asyncio
import errno
import sqlite3
from collections import OrderedDict
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import grpc
import pytest
import torch

import node.durable
from chain.digests import weights_digest
from chain.models import initial_weights
from chain.records import Record, Registration, encode_operation, timestamp_of
from chain.state import ChainState
from consensus.ledger import (
    COMMIT_TAG,
    GENESIS_HASH,
    Block,
    CommitCertificate,
    Request,
    encode_batch,
    vote_bytes,
)
from consensus.messages import Blocks
from consensus.store import BlockStore
from fl.config import RunConfig
from fl.data import Split
from node.daemon import NodeLog, signed_record
from node.genesis import Genesis
from node.identity import Identity, pbft_signer
from node.miner import Miner
from node.miner_service import MinerHandler, MinerServicer
from node.serving import Endpoint, serve
from node.tensors import tensor_stream
from proto import llbcfl_pb2 as pb
from proto import llbcfl_pb2_grpc as pb_grpc

CONFIG = RunConfig(clients=3, frac=0.67, rounds=2, model="mlp", val_size=20, test_size=20)
CLIENTS = ("client-000", "client-001", "client-002")
HISTOGRAM = (50, 50, 0, 0, 0, 0, 0, 0, 0, 0, 0)


@pytest.fixture
def small_genesis(genesis: Genesis) -> Genesis:
    return Genesis(
        protocol=genesis.protocol, selection=genesis.selection, run=CONFIG, nodes=genesis.nodes
    )


def signed_request(identity: Identity, record: Record) -> Request:
    envelope = signed_record(identity, record)
    return Request(
        identity.node_id, timestamp_of(record), encode_operation(record), envelope.signature
    )


def certified(previous: Block | None, requests: list[Request], ids: dict[str, Identity]) -> Block:
    """The block after ``previous`` holding ``requests``, certified by miners 0, 1 and 2."""
    height = previous.height + 1 if previous is not None else 1
    block = Block.propose(
        height=height,
        previous_hash=previous.digest if previous is not None else GENESIS_HASH,
        view=0,
        proposer=0,
        payload=encode_batch(requests),
    )
    signatures = [
        (
            i,
            pbft_signer(ids[f"miner-{i}"])(
                vote_bytes(COMMIT_TAG, view=0, height=height, digest=block.digest, sender=i)
            ),
        )
        for i in range(3)
    ]
    cert = CommitCertificate(view=0, height=height, digest=block.digest, signatures=signatures)
    return block.with_certificate(cert)


def registration_blocks(ids: dict[str, Identity]) -> list[Block]:
    """Three certified blocks, one client's registration each."""
    blocks: list[Block] = []
    for cid in CLIENTS:
        request = signed_request(ids[cid], Registration(cid, HISTOGRAM))
        blocks.append(certified(blocks[-1] if blocks else None, [request], ids))
    return blocks


def round_one_blocks(genesis: Genesis, ids: dict[str, Identity]) -> list[Block]:
    """Every client registered in block 1, round 1's selection in block 2."""
    requests = [signed_request(ids[c], Registration(c, HISTOGRAM)) for c in CLIENTS]
    first = certified(None, requests, ids)
    state = ChainState(CONFIG, clients=CLIENTS, selection_seed=genesis.protocol.selection_seed)
    state.apply_block(first)
    selection = signed_request(ids["server"], state.expected_selection(1))
    return [first, certified(first, [selection], ids)]


def make_miner(
    genesis: Genesis,
    ids: dict[str, Identity],
    directory: Path,
    blocks: list[Block],
    *,
    log_dir: Path | None = None,
) -> tuple[Miner, Path]:
    """miner-1 with its chain (holding ``blocks``) and blobs in ``directory``, and its
    log file (returned) in ``log_dir`` (default: ``directory``)."""
    store = BlockStore(directory / "chain.db", verify=lambda *_: True, n=4)
    for block in blocks:
        store.append(block)
    store.close()
    validation = Split(x=torch.zeros(20, 1, 28, 28), y=torch.zeros(20, dtype=torch.int64))
    log_file = (log_dir or directory) / "miner.log"
    miner = Miner(
        genesis,
        ids["miner-1"],
        db_path=directory / "chain.db",
        run_dir=directory,
        validation=validation,
        log=NodeLog(f"miner-1-{log_file.parent.name}", log_file),
    )
    return miner, log_file


def error_lines(log_file: Path) -> list[str]:
    return [line for line in log_file.read_text().splitlines() if "ERROR" in line]


def queued(miner: Miner) -> list[int]:
    """How many messages wait for each peer (the links are not started: nothing leaves)."""
    return [link.queue.qsize() for _, link in sorted(miner.peers.items())]


def no_space(*_args: Any) -> None:
    raise OSError(errno.ENOSPC, "No space left on device")


def update_parts(identity: Identity) -> list[pb.TensorStreamPart]:
    delta = OrderedDict((k, torch.full_like(v, 0.1)) for k, v in initial_weights(CONFIG).items())
    return list(
        tensor_stream(
            delta,
            identity=identity,
            kind="update",
            round=1,
            base_digest=weights_digest(initial_weights(CONFIG)),
            num_samples=100,
        )
    )


def serving(miner: Miner, handler: MinerHandler, body: Callable[[Any], Awaitable[None]]) -> None:
    """Run ``body(channel)`` against the miner's Miner and Node services."""
    endpoint = Endpoint(
        node_id="miner-1",
        role="miner",
        address="127.0.0.1:0",
        genesis_digest=miner.genesis.digest,
        status=miner.status,
        services={"Miner": MinerServicer(handler)},
    )
    ports: list[int] = []

    async def main() -> None:
        async def run() -> None:
            async with grpc.aio.insecure_channel(f"127.0.0.1:{ports[0]}") as ch:
                await body(ch)

        await serve([endpoint], stop=asyncio.Event(), run=run, listening=ports.extend)

    asyncio.run(main())


def test_a_read_only_miner_refuses_uploads_and_submissions_and_serves_reads(
    small_genesis: Genesis, identities: dict[str, Identity], tmp_path: Path, monkeypatch: Any
) -> None:
    # Prepare: round 1 open; the disk is full for the next blob
    miner, log_file = make_miner(
        small_genesis, identities, tmp_path, round_one_blocks(small_genesis, identities)
    )
    handler = MinerHandler(miner)
    first, second = miner.state.selections[1].selected
    selection_again = signed_record(identities["server"], miner.state.expected_selection(1))
    monkeypatch.setattr(node.durable.os, "fsync", no_space)
    seen: dict[str, Any] = {}

    async def refused(call: Awaitable[Any]) -> tuple[str, str]:
        with pytest.raises(grpc.aio.AioRpcError) as info:
            await call
        return info.value.code().name, info.value.details()

    async def body(ch: Any) -> None:
        miners, nodes = pb_grpc.MinerStub(ch), pb_grpc.NodeStub(ch)
        # Execute: the upload that meets the full disk, then one while read-only
        seen["upload"] = await refused(miners.SubmitUpdate(iter(update_parts(identities[first]))))
        seen["again"] = await refused(miners.SubmitUpdate(iter(update_parts(identities[second]))))
        seen["submit"] = await refused(miners.Submit(selection_again))
        seen["status"] = await nodes.Status(pb.StatusRequest())
        seen["blocks"] = [b.height async for b in miners.FetchBlocks(pb.FetchBlocksRequest())]
        # Execute: room again
        monkeypatch.undo()
        seen["probe"] = await handler.probe_disk()
        seen["status after"] = await nodes.Status(pb.StatusRequest())
        seen["receipt"] = await miners.SubmitUpdate(iter(update_parts(identities[first])))

    try:
        serving(miner, handler, body)
    finally:
        handler.close()
        miner.store.close()
    # Assert: refused with RESOURCE_EXHAUSTED "disk full"; nothing half-stored
    for what in ("upload", "again", "submit"):
        code, details = seen[what]
        assert code == "RESOURCE_EXHAUSTED" and details.startswith("disk full"), (what, details)
    assert len(error_lines(log_file)) == 1
    # Assert: reads served meanwhile, and Status says read-only
    assert seen["status"].read_only and seen["status"].chain_height == 2
    assert seen["blocks"] == [1, 2]
    # Assert: after recovery the node is writable and the upload is stored
    assert seen["probe"] and not seen["status after"].read_only
    assert seen["receipt"].client_id == first
    assert miner.blobs.by_round[1] == {first: seen["receipt"].digest}
    assert [p.suffix for p in (tmp_path / "blobs").iterdir()] == [".bin"]


def test_a_view_that_cannot_be_stored_is_never_announced(
    small_genesis: Genesis, identities: dict[str, Identity], tmp_path: Path, monkeypatch: Any
) -> None:
    # Prepare: a registration waits in the pool (forwarded to the primary, miner-0),
    # and storing a view meets a full disk
    miner, log_file = make_miner(small_genesis, identities, tmp_path, [])
    handler = MinerHandler(miner)
    envelope = signed_record(identities["client-000"], Registration("client-000", HISTOGRAM))
    timeout = small_genesis.protocol.view_timeout_ticks

    def full(self: BlockStore, view: int) -> None:
        raise sqlite3.OperationalError("database or disk is full")

    async def main() -> tuple[list[int], list[int]]:
        await handler.submit(envelope)
        forwarded = queued(miner)
        monkeypatch.setattr(BlockStore, "save_view", full)
        # Execute: past the view timeout, the replica wants view 1
        for _ in range(timeout + 5):
            await handler.tick()
        return forwarded, queued(miner)

    try:
        forwarded, after = asyncio.run(main())
        # Assert: the VIEW-CHANGE was never queued for any peer
        assert forwarded == [1, 0, 0] and after == [1, 0, 0]
        # Assert: read-only, one error line, the replica rebuilt from the store: in
        # view 0 (where it abstains: it may have voted there), its pool forgotten
        assert miner.disk.read_only and miner.status().read_only
        assert len(error_lines(log_file)) == 1
        assert "disk full while storing the view" in error_lines(log_file)[0]
        assert miner.store.load_view() is None
        assert (miner.replica.view, miner.replica.pending_count) == (0, 0)
        assert miner.replica.now == 0  # not ticked while read-only
        # Execute: room again
        monkeypatch.undo()
        recovered = asyncio.run(handler.probe_disk())
        asyncio.run(handler.tick())
        # Assert: writable, ticking again
        assert recovered and not miner.disk.read_only and miner.replica.now == 1
    finally:
        handler.close()
        miner.store.close()


def test_blocks_that_cannot_be_stored_are_forgotten_and_fetched_again(
    small_genesis: Genesis, identities: dict[str, Identity], tmp_path: Path, monkeypatch: Any
) -> None:
    # Prepare: a peer's state transfer of three blocks; the disk fills after the first
    miner, log_file = make_miner(small_genesis, identities, tmp_path, [])
    handler = MinerHandler(miner)
    blocks = registration_blocks(identities)
    transfer = Blocks(blocks=blocks, new_view=None, sender=0)
    transfer.signature = pbft_signer(identities["miner-0"])(transfer.signed)
    append = BlockStore.append

    def fills_after_one(self: BlockStore, block: Block) -> None:
        if block.height > 1:
            raise sqlite3.OperationalError("database or disk is full")
        append(self, block)

    monkeypatch.setattr(BlockStore, "append", fills_after_one)
    try:
        # Execute
        asyncio.run(handler.deliver(transfer))
        # Assert: the store holds block 1, and the replica and the chain state,
        # which had executed all three, hold no more than the store
        assert miner.disk.read_only and len(error_lines(log_file)) == 1
        assert miner.store.height() == 1
        assert (miner.replica.height, miner.state.height) == (1, 1)
        assert set(miner.state.registrations) == {"client-000"}
        assert queued(miner) == [0, 0, 0]
        # Execute: while read-only, the same transfer is dropped
        asyncio.run(handler.deliver(transfer))
        assert miner.store.height() == 1
        # Execute: room again; the peer's transfer arrives again
        monkeypatch.undo()
        assert asyncio.run(handler.probe_disk())
        asyncio.run(handler.deliver(transfer))
        # Assert: all three blocks stored and applied
        assert miner.store.height() == 3
        assert (miner.replica.height, miner.state.height) == (3, 3)
        assert set(miner.state.registrations) == set(CLIENTS)
    finally:
        handler.close()
        miner.store.close()
