"""How a client host takes start-round notices: the chain decides, the ledger remembers.

Notices go through the client's real check (``node.client_service.start_round``,
what the ``Server/Attend`` stream hands each notice to); the host reads a
prepared chain (rounds 1..10 selected ``client-000`` and ``client-001``) and
trains for real; only the model download and the upload are in-memory
(``tests.node.client_host_harness``).
"""

from __future__ import annotations

import asyncio
import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import grpc
import pytest

from chain.records import RoundVerdicts, UpdateRecord
from fl.privacy import BUDGET_RTOL
from node.client import RoundAnswer
from node.client_service import start_round
from node.errors import status_of
from proto import llbcfl_pb2 as pb
from tests.node.client_host_harness import CONFIG, make_host, notice
from tests.node.conftest import fixed_identity

ROOT = Path(__file__).resolve().parents[2]
SERVER = fixed_identity("server", "server")


async def send(host: Any, cid: str, *notices: pb.RoundNotice) -> list[Any]:
    """Each notice, signed by the server, through the client's check (as the Attend
    stream hands it over), all at once: the answer, or the refusal's status code."""

    async def one(n: pb.RoundNotice) -> Any:
        envelope = SERVER.sign("start-round", n.SerializeToString())
        try:
            return await start_round(host, cid, envelope)
        except Exception as exc:
            refusal = status_of(exc)
            if refusal is None:
                raise
            return refusal[0]

    replies = await asyncio.gather(*(one(n) for n in notices))
    await asyncio.gather(*list(host.tasks))  # let every accepted round finish
    return replies


def test_a_burst_of_notices_never_spends_past_the_budget(tmp_path: Path) -> None:
    # Prepare: a budget of 2 participations (after the registration)
    async def run() -> tuple[Any, list[Any]]:
        host = await make_host(tmp_path / "ledger.json")
        return host, await send(host, "client-000", *(notice(r) for r in range(1, 11)))

    # Execute: notices for all 10 selected rounds at once
    host, replies = asyncio.run(run())

    # Assert: two rounds trained and sent, the spend within the budget
    data = host.data["client-000"]
    assert len(host.uploads) == 2
    assert len(host.ledger.rounds(data, host.network)) == 2
    assert host.spent("client-000") <= CONFIG.epsilon * (1 + BUDGET_RTOL)
    declined = [r for r in replies if isinstance(r, RoundAnswer) and not r.accepted]
    assert all(r.reason == "privacy budget exhausted" for r in declined)


def test_repeated_notices_for_one_round_train_it_once(tmp_path: Path) -> None:
    # Prepare
    async def run() -> tuple[Any, list[Any]]:
        host = await make_host(tmp_path / "ledger.json")
        return host, await send(host, "client-000", *([notice(1)] * 5))

    # Execute
    host, replies = asyncio.run(run())

    # Assert
    accepted = [r for r in replies if isinstance(r, RoundAnswer) and r.accepted]
    assert len(accepted) == 1
    assert replies.count(grpc.StatusCode.ALREADY_EXISTS) == 4
    assert host.uploads == [("client-000", 1)]


def test_a_restarted_client_refuses_a_round_it_trained(tmp_path: Path) -> None:
    # Prepare: round 1 trained, then the process "restarts" on the same ledger
    async def run() -> list[Any]:
        first = await make_host(tmp_path / "ledger.json")
        await send(first, "client-000", notice(1))
        again = await make_host(tmp_path / "ledger.json")
        return await send(again, "client-000", notice(1))

    # Execute
    (reply,) = asyncio.run(run())

    # Assert
    assert reply == grpc.StatusCode.ALREADY_EXISTS


@pytest.mark.parametrize(
    ("cid", "round_notice", "code"),
    [
        ("client-002", notice(1), grpc.StatusCode.PERMISSION_DENIED),  # not selected
        ("client-000", notice(11), grpc.StatusCode.INVALID_ARGUMENT),  # past the run
        ("client-000", notice(2, b"\x09" * 32), grpc.StatusCode.INVALID_ARGUMENT),  # other model
    ],
    ids=["unselected", "past-the-run", "uncommitted-model"],
)
def test_notices_the_chain_does_not_back_are_refused(
    tmp_path: Path, cid: str, round_notice: pb.RoundNotice, code: grpc.StatusCode
) -> None:
    # Prepare
    async def run() -> tuple[Any, list[Any]]:
        host = await make_host(tmp_path / "ledger.json", cid=cid)
        return host, await send(host, cid, round_notice)

    # Execute
    host, (reply,) = asyncio.run(run())

    # Assert: refused, nothing reserved or sent
    assert reply == code
    assert host.uploads == [] and host.ledger.rounds(host.data[cid], host.network) == set()


def test_a_notice_for_a_round_not_on_the_chain_is_refused(tmp_path: Path) -> None:
    # Prepare: the chain has no selection for round 3 yet
    async def run() -> tuple[Any, list[Any]]:
        host = await make_host(tmp_path / "ledger.json")
        del host.follower.state.selections[3]
        return host, await send(host, "client-000", notice(3))

    # Execute
    host, (reply,) = asyncio.run(run())

    # Assert
    assert reply == grpc.StatusCode.FAILED_PRECONDITION
    assert host.uploads == []


def test_the_ledger_keeps_a_round_killed_between_reservation_and_upload(tmp_path: Path) -> None:
    # Prepare: a client process that blocks in training once round 1 is reserved
    ledger, marker = tmp_path / "ledger.json", tmp_path / "training"
    proc = subprocess.Popen(
        [sys.executable, "-m", "tests.node.client_host_harness", str(ledger), str(marker)],
        cwd=ROOT,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
    )
    try:
        deadline = time.monotonic() + 120
        while not marker.exists():  # polling another process's progress
            assert proc.poll() is None, proc.communicate()[0].decode()
            assert time.monotonic() < deadline, "the client never reached training"
            time.sleep(0.05)
        # Execute: kill -9 while it trains, before anything was uploaded
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait(timeout=30)
    finally:
        if proc.poll() is None:
            os.kill(proc.pid, signal.SIGKILL)
            proc.wait(timeout=30)

    async def restart() -> tuple[Any, list[Any]]:
        host = await make_host(ledger)
        return host, await send(host, "client-000", notice(1))

    host, (reply,) = asyncio.run(restart())

    # Assert: the participation is counted and the round is never trained again
    data = host.data["client-000"]
    assert host.ledger.rounds(data, host.network) == {1}
    assert reply == grpc.StatusCode.ALREADY_EXISTS
    assert host.spent("client-000") > host.budget.spent(host.ledger.entries(data)[:1])


def test_a_client_whose_ledger_is_behind_takes_the_spend_the_chain_shows(tmp_path: Path) -> None:
    # Prepare: the chain shows client-000's update in round 1; the ledger is empty
    async def run() -> tuple[Any, list[Any]]:
        host = await make_host(tmp_path / "ledger.json")  # reconciles once, on an empty chain
        chain = host.follower.state
        chain.verdicts[1] = RoundVerdicts(1, (committed_update("client-000"),), (), (), ())
        registered = chain.registrations["client-000"].histogram
        host.ledger.path.unlink()  # the ledger is lost
        host.reconcile()
        return host, [registered, *(await send(host, "client-000", notice(1)))]

    # Execute
    host, (registered, reply) = asyncio.run(run())

    # Assert: the registration and round 1 are counted, and round 1 is refused
    data = host.data["client-000"]
    assert host.ledger.rounds(data, host.network) == {1}
    assert host.ledger.histogram(data, host.network) == registered
    assert host.states["client-000"].histogram == registered
    assert reply == grpc.StatusCode.ALREADY_EXISTS


def committed_update(cid: str) -> UpdateRecord:
    return UpdateRecord(cid, b"\x01" * 32, b"\x02" * 32, 100, 0.5, True, "accepted", b"s")
