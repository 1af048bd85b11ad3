"""A client host on a prepared chain, for tests of how it takes start-round notices.

The chain is a real :class:`chain.records.ChainState` (every client
registered; rounds 1..R selected with ``SELECTED`` and the models of the
earlier rounds summarised), held by a follower that never needs a miner.
The host's model download and update upload are replaced by in-memory
stand-ins, so a test sees what the host reserves, trains and sends.

Run as a module it is the process a test kills: it takes a notice for
round 1 and blocks in training after the reservation, having written a
marker file, until it is killed::

    python -m tests.node.client_host_harness LEDGER MARKER
"""

from __future__ import annotations

import asyncio
import sys
import threading
from pathlib import Path
from typing import Any

import torch

from chain.models import initial_weights
from chain.records import Registration, RoundSummary, RoundVerdicts, Selection
from chain.state import ChainState
from fl.config import RunConfig
from fl.data import Split
from fl.rounds import ClientState, Federation
from node.client import ClientHost
from node.daemon import NodeLog
from node.genesis import Genesis
from node.privacy_ledger import PrivacyLedger
from proto import llbcfl_pb2 as pb
from tests.node.conftest import NODES, fixed_identity, network_genesis

ROUNDS = 10
CONFIG = RunConfig(
    clients=3,
    frac=0.67,
    rounds=ROUNDS,
    model="mlp",
    train_size=300,
    dp="gaussian",
    epsilon=5.0,
    dp_participations=2,
    batch_size=100,
)
SELECTED = ("client-000", "client-001")
TRAIN = Split(x=torch.zeros(300, 1, 28, 28), y=torch.arange(300) % 10)


def summary_digest(rnd: int) -> bytes:
    """The model digest the prepared chain commits to after round ``rnd``."""
    return bytes([rnd]) * 32


class StaticFollower:
    """A follower whose chain is already read (no miner is asked)."""

    def __init__(self, state: ChainState) -> None:
        self.state = state
        self.caught_up = True

    async def catch_up(self, **_: Any) -> bool:
        return True

    async def close(self) -> None:
        return None


def prepared_chain(genesis: Genesis) -> ChainState:
    state = ChainState(genesis.run, clients=tuple(c.node_id for c in genesis.membership.clients))
    for c in genesis.membership.clients:
        state.apply_record(c.node_id, Registration(c.node_id, (10,) * 10 + (0,)))
    for rnd in range(1, ROUNDS + 1):
        state.apply_record("server", Selection(rnd, bytes(32), SELECTED, ()))
        if rnd < ROUNDS:
            silent = RoundVerdicts(rnd, (), tuple(sorted(SELECTED)), (), ())
            state.apply_record("miner-0", silent)
            state.apply_record("server", RoundSummary(rnd, summary_digest(rnd), 0.5, 0.5))
    return state


class RecordingHost(ClientHost):
    """A host whose download returns the initial model and whose uploads are recorded."""

    uploads: list[tuple[str, int]]

    async def _download(self, cid: str, notice: pb.RoundNotice) -> Any:
        return initial_weights(self.config)

    async def _upload(self, cid: str, address: str, update: Any, base: bytes) -> bool:
        if address == self.membership.miners[0].address:
            self.uploads.append((cid, update.round))
        return True


def test_genesis() -> Genesis:
    return network_genesis(CONFIG)


async def make_host(ledger: Path, *, cid: str = "client-000") -> RecordingHost:
    """A host of ``cid`` on the prepared chain (call inside a running loop)."""
    genesis = test_genesis()
    host = RecordingHost(
        genesis,
        [fixed_identity(cid, "client")],
        federation=Federation.create(CONFIG, TRAIN, only={cid}),
        ledger=PrivacyLedger(ledger),
        log=NodeLog("clients"),
        follower=StaticFollower(prepared_chain(genesis)),  # type: ignore[arg-type]
    )
    host.uploads = []
    host.reconcile()
    return host


def notice(rnd: int, digest: bytes | None = None) -> pb.RoundNotice:
    """The notice the server would send for round ``rnd`` (the committed model)."""
    if digest is None:
        from chain.digests import weights_digest

        digest = weights_digest(initial_weights(CONFIG)) if rnd == 1 else summary_digest(rnd - 1)
    return pb.RoundNotice(round=rnd, model_digest=digest, deadline_ms=1000)


async def _train_then_block(ledger: Path, marker: Path) -> None:
    host = await make_host(ledger)
    release = threading.Event()

    def blocking_participate(self: ClientState, *args: Any, **kwargs: Any) -> None:
        marker.write_text("reserved and training\n")
        release.wait()  # until the process is killed

    ClientState.participate = blocking_participate  # type: ignore[method-assign]
    await host.start_round("client-000", notice(1))
    await asyncio.gather(*host.tasks)


if __name__ == "__main__":
    assert NODES  # the network the genesis describes
    asyncio.run(_train_then_block(Path(sys.argv[1]), Path(sys.argv[2])))
