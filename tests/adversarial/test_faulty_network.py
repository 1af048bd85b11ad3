"""Faults that must not stop a run: a corrupt chain.db at a miner's restart, a silent client.

One ``network up`` run (4 miners, 4 clients in a process each, every client
selected in every round, 2 rounds, an 8 s round deadline), driven from this
test process:

* The process of client-003 is frozen (SIGSTOP) as soon as it exists, so the
  network waits for its registration: a hold in which the chain does not move.
* client-000 registers, answers ``Node.Status`` (it listens), and is frozen
  then: the kernel still accepts connections to it but nothing answers, so the
  server's start-round notices to it hang (finding 4).
* During the hold, miner-2 is stopped, its chain.db truncated, and started
  again with its own command; miner-3 likewise with random bytes in the middle
  of the file (finding 7). Each must set the file aside as
  ``chain.db.corrupt-<k>``, start from an empty chain and fetch it from its
  peers (an idle network: by its own catch-up, not by new blocks).
* client-003 is thawed: it registers and the rounds run. client-000 is silent
  in round 1, whose deadline (8 s) is shorter than the server's notice
  timeout (10 s): the round ends at its deadline while the notices still
  hang. In round 2 the attacker, holding client-000's key, sends client-001's
  round-1 update (fetched with the server's key) as client-000's own: every
  miner rejects it as a copy (finding 8). client-000 is thawed once the last
  round's verdicts are committed.
* At the end: ``network up`` exits 0, every miner (the two restarted ones
  included) holds the same head, and ``chain verify`` passes on every chain.
"""

from __future__ import annotations

import random
import re
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from chain.records import Registration, RoundSummary, RoundVerdicts, Selection
from commands.chaintools import read_blocks
from fl.privacy import released_count
from tests.adversarial.attacker import (
    Attacker,
    chain_entries,
    stream_digest,
    tensors_of,
    update_parts,
)
from tests.adversarial.live import LiveNetwork, running, wait_until

OPTIONS: dict[str, Any] = {
    "model": "mlp",
    "train_size": 1500,
    "clients": 4,
    "frac": 1.0,
    "rounds": 2,
    "val_size": 200,
    "test_size": 500,
    "selection": "random",  # every client in every round, whatever its reputation
    "miners": 4,
    "client_procs": 4,
    "round_deadline": 8,
    "timeout": 300,
}
HELD_PROCESS = "clients-3"  # client-003: the network waits for its registration
SILENT = "client-000"
SILENT_PROCESS = "clients-0"
WAIT = 120.0  # bound of every wait on the network (seconds)


@pytest.fixture(scope="module")
def network(tmp_path_factory: pytest.TempPathFactory, mnist_root: Path) -> Iterator[LiveNetwork]:
    run_dir = tmp_path_factory.mktemp("faulty") / "run"
    with running(run_dir, mnist_root=mnist_root, options=OPTIONS, freeze=(HELD_PROCESS,)) as net:
        yield net


def registered(attacker: Attacker, miner: str) -> set[str]:
    return {e.record.client for e in attacker.chain(miner) if isinstance(e.record, Registration)}


def attends(network: LiveNetwork, client: str) -> bool:
    """The server logged ``client``'s Attend stream (its process is up and connected)."""
    try:
        text = network.log("server")
    except OSError:
        return False
    return re.search(rf"attending: .*\b{client}\b", text) is not None


def head(attacker: Attacker, miner: str) -> tuple[int, bytes] | None:
    status = attacker.status(miner)
    return None if status is None else (status.chain_height, bytes(status.head_hash))


@pytest.fixture(scope="module")
def held(network: LiveNetwork, attacker: Attacker) -> tuple[int, bytes]:
    """The hold: every client but client-003 registered on every miner, client-000
    frozen once it attends the server; the chain's (height, head) during the hold."""
    others = set(attacker.clients) - {"client-003"}
    wait_until(
        lambda: all(registered(attacker, m) == others for m in attacker.miners),
        timeout=WAIT,
        what="the registrations of every client but client-003",
    )
    wait_until(
        lambda: attends(network, SILENT), timeout=WAIT, what=f"{SILENT} to attend the server"
    )
    network.freeze(SILENT_PROCESS)
    heads = {head(attacker, m) for m in attacker.miners}
    assert len(heads) == 1 and None not in heads, heads
    return heads.pop()  # type: ignore[return-value]


def damaged(data: bytes, damage: str) -> bytes:
    if damage == "truncated":
        return data[: len(data) // 3 + 100]
    middle = len(data) // 2
    noise = random.Random(7).randbytes(4096)  # seeded: the same damage every run
    return data[:middle] + noise + data[middle + len(noise) :]


@pytest.mark.parametrize(
    ("miner", "damage"), [("miner-2", "truncated"), ("miner-3", "random bytes in the middle")]
)
def test_a_corrupt_chain_db_is_set_aside_and_the_chain_fetched_again_from_peers(
    held: tuple[int, bytes], network: LiveNetwork, attacker: Attacker, miner: str, damage: str
) -> None:
    # Prepare: the miner stopped (SIGTERM: its WAL is checkpointed into chain.db, so
    # the file is the only copy), then its chain.db damaged
    network.stop_node(miner)
    db = network.run_dir / miner / "chain.db"
    wal = db.with_name("chain.db-wal")
    assert not wal.exists() or wal.stat().st_size == 0
    bad = damaged(db.read_bytes(), damage)
    db.write_bytes(bad)
    # Execute: the miner started again with its own command
    network.restart(miner)
    # Assert: it starts, catches up with its peers (the chain does not move: the
    # network waits for client-003) and sets the damaged file aside, never deleting it
    wait_until(lambda: head(attacker, miner) == held, timeout=WAIT, what=f"{miner} to catch up")
    assert (db.parent / "chain.db.corrupt-1").read_bytes() == bad
    log = network.log(miner)
    assert "unreadable store" in log and "moved to" in log and "fetched again from peers" in log
    assert "state transfer" in log.split("unreadable store")[-1]


@dataclass
class Finished:
    output: str  # network up's
    verdicts: dict[int, RoundVerdicts]  # by round, from miner-0's chain
    copied: tuple[str, bytes]  # whose update client-000 sent as its own in round 2, its digest


def selections_on(attacker: Attacker, miner: str) -> list[Selection]:
    return [e.record for e in attacker.chain(miner) if isinstance(e.record, Selection)]


def verdicts_on(attacker: Attacker, miner: str) -> dict[int, RoundVerdicts]:
    records = [e.record for e in attacker.chain(miner) if isinstance(e.record, RoundVerdicts)]
    return {v.round: v for v in records}


def summary_of(attacker: Attacker, miner: str, rnd: int) -> RoundSummary | None:
    for entry in attacker.chain(miner):
        if isinstance(entry.record, RoundSummary) and entry.record.round == rnd:
            return entry.record
    return None


def copy_as_silent_client(attacker: Attacker, rnd: int) -> tuple[str, bytes]:
    """Round ``rnd``'s upload of client-000 (its process is frozen; the attacker holds
    its key): client-001's accepted update of round ``rnd - 1``, fetched with the
    server's key and re-signed as client-000's, trained from this round's model
    (finding 8). Returns the copied client and the copy's digest."""
    previous = verdicts_on(attacker, "miner-0")[rnd - 1]
    source = next(u for u in previous.updates if u.accepted and u.client != SILENT)
    fetched = attacker.fetch_update(
        "miner-0", source.digest, source.client, attacker.key(attacker.server)
    )
    assert fetched.ok, fetched
    summary = wait_until(
        lambda: summary_of(attacker, "miner-0", rnd - 1), timeout=WAIT, what="a summary"
    )
    registration = next(
        e.record
        for e in attacker.chain("miner-0")
        if isinstance(e.record, Registration) and e.record.client == SILENT
    )
    parts = update_parts(
        attacker.key(SILENT),
        tensors_of(fetched.reply),
        round=rnd,
        base_digest=summary.model_digest,
        num_samples=released_count(registration.histogram),
    )
    receipts = attacker.submit_update_everywhere(parts)
    assert all(r.ok for r in receipts), receipts  # stored: it is judged by validation
    return source.client, stream_digest(parts)


@pytest.fixture(scope="module")
def finished(held: tuple[int, bytes], network: LiveNetwork, attacker: Attacker) -> Finished:
    """client-003 thawed (it registers, the rounds run), client-000 frozen until the
    last round's verdicts are committed, its key used in round 2 to send a copy of
    client-001's round-1 update; the run to its end."""
    network.thaw(HELD_PROCESS)
    rounds = attacker.config.rounds
    wait_until(
        lambda: 2 in {s.round for s in selections_on(attacker, "miner-0")},
        timeout=WAIT + OPTIONS["round_deadline"],
        what="round 2's selection",
    )
    copied = copy_as_silent_client(attacker, 2)
    wait_until(
        lambda: rounds in verdicts_on(attacker, "miner-0"),
        timeout=WAIT + rounds * OPTIONS["round_deadline"],
        what="the last round's verdicts",
    )
    by_round = verdicts_on(attacker, "miner-0")
    network.thaw(SILENT_PROCESS)
    return Finished(network.finish(timeout=WAIT), by_round, copied)


def test_a_selected_client_that_never_answers_does_not_hold_the_rounds(
    finished: Finished, network: LiveNetwork, attacker: Attacker
) -> None:
    # Assert: round 1 ended (at its deadline: client-000 sent nothing) with client-000
    # selected and silent, and the run finished within its bound
    rounds = list(range(1, attacker.config.rounds + 1))
    assert sorted(finished.verdicts) == rounds
    first = finished.verdicts[1]
    assert SILENT in first.silent and SILENT not in first.accepted, first
    assert [r["round"] for r in network.metrics()["rounds"]] == rounds
    assert finished.output.startswith(f"run summary: {len(rounds)} rounds")


def test_a_copy_of_another_clients_update_is_rejected_as_a_copy(
    finished: Finished, network: LiveNetwork, attacker: Attacker
) -> None:
    # Assert: client-000's round-2 upload, another client's round-1 update re-signed,
    # is on every chain as rejected for being a copy (negative evidence), and the
    # client it copied is not harmed
    source, digest = finished.copied
    for miner in attacker.miners:
        blocks = read_blocks(network.run_dir / miner / "chain.db")
        records = [e.record for e in chain_entries(blocks)]
        verdicts = next(r for r in records if isinstance(r, RoundVerdicts) and r.round == 2)
        entry = next(u for u in verdicts.updates if u.client == SILENT)
        assert entry.digest == digest and not entry.accepted, entry
        assert entry.reason.startswith("copy"), entry.reason
        assert source in verdicts.accepted, verdicts


def test_the_run_ends_with_one_head_on_every_miner_and_every_chain_verified(
    finished: Finished, network: LiveNetwork, attacker: Attacker
) -> None:
    # Execute
    results = network.verify_chains(attacker.miners)
    # Assert: the restarted miners included
    heads = network.metrics()["chain_heads"]
    assert sorted(heads) == attacker.miners and len(set(heads.values())) == 1, heads
    assert "one head; `chain verify` OK on every one" in finished.output
    for miner, result in results.items():
        assert result.returncode == 0 and "chain OK" in result.stdout, (miner, result.stdout)
