"""The client host's privacy ledger: reserve before release, durable, locked, composed."""

from __future__ import annotations

import json
import multiprocessing
import os
import re
from pathlib import Path

import pytest

from fl.privacy import BudgetExhausted, Release
from node.privacy_ledger import (
    REGISTRATION_ROUND,
    AlreadyReserved,
    Budget,
    LedgerCorruptError,
    PrivacyLedger,
    entry_for,
)

DATA = b"\x01" * 32
OTHER_DATA = b"\x02" * 32
NET_A = b"\xaa" * 32
NET_B = b"\xbb" * 32
# Laplace: each round spends 1.0, the registration 0.5, so the sums are exact.
STEP = Release(1.0, 1.0, 1)
REGISTRATION = Release(0.5, 1.0, 1)
BUDGET = Budget(epsilon=3.5, delta=1e-5, accountant="rdp")


def round_entry(rnd: int, network: bytes = NET_A):
    return entry_for(network, rnd, "laplace", STEP)


def registration_entry(network: bytes = NET_A):
    return entry_for(network, REGISTRATION_ROUND, "laplace", REGISTRATION)


def test_reservations_survive_a_restart(tmp_path: Path) -> None:
    # Prepare
    path = tmp_path / "ledger.json"
    PrivacyLedger(path).register(DATA, registration_entry(), (1, 2), BUDGET)
    PrivacyLedger(path).reserve(DATA, round_entry(1), BUDGET)

    # Execute: a fresh object stands for a restarted process
    ledger = PrivacyLedger(path)

    # Assert
    assert ledger.rounds(DATA, NET_A) == {1}
    assert ledger.histogram(DATA, NET_A) == (1, 2)
    assert BUDGET.spent(ledger.entries(DATA)) == 1.5


def test_a_round_is_reserved_once_per_network(tmp_path: Path) -> None:
    # Prepare
    ledger = PrivacyLedger(tmp_path / "ledger.json")
    ledger.reserve(DATA, round_entry(1), BUDGET)
    before = (tmp_path / "ledger.json").read_bytes()

    # Execute / Assert: the same round again is refused and nothing is written;
    # the same round number of another network is another release
    with pytest.raises(AlreadyReserved):
        ledger.reserve(DATA, round_entry(1), BUDGET)
    assert (tmp_path / "ledger.json").read_bytes() == before
    ledger.reserve(DATA, round_entry(1, NET_B), BUDGET)
    assert ledger.rounds(DATA, NET_B) == {1}


def test_spending_composes_across_networks_on_the_same_data(tmp_path: Path) -> None:
    # Prepare: network A spent 0.5 + 2 x 1.0 of the 3.5
    ledger = PrivacyLedger(tmp_path / "ledger.json")
    ledger.register(DATA, registration_entry(NET_A), (1,), BUDGET)
    ledger.reserve(DATA, round_entry(1, NET_A), BUDGET)
    ledger.reserve(DATA, round_entry(2, NET_A), BUDGET)

    # Execute / Assert: network B's registration fits (3.0), its first round does not
    ledger.register(DATA, registration_entry(NET_B), (1,), BUDGET)
    with pytest.raises(BudgetExhausted):
        ledger.reserve(DATA, round_entry(1, NET_B), BUDGET)
    # ... while other records have their own budget
    ledger.reserve(OTHER_DATA, round_entry(1, NET_B), BUDGET)
    assert BUDGET.spent(ledger.entries(DATA)) == 3.0


def test_registering_again_returns_the_histogram_already_released(tmp_path: Path) -> None:
    # Prepare
    ledger = PrivacyLedger(tmp_path / "ledger.json")
    first = ledger.register(DATA, registration_entry(), (5, 6), BUDGET)

    # Execute: a restart drew another histogram
    second = ledger.register(DATA, registration_entry(), (9, 9), BUDGET)

    # Assert: the first release is reused, and counted once
    assert first == second == (5, 6)
    assert len(ledger.entries(DATA)) == 1


def test_adopting_the_chain_adds_only_missing_releases(tmp_path: Path) -> None:
    # Prepare: the ledger knows round 1; the chain shows the registration, rounds 1 and 2
    ledger = PrivacyLedger(tmp_path / "ledger.json")
    ledger.reserve(DATA, round_entry(1), BUDGET)

    # Execute
    added = ledger.adopt(DATA, [registration_entry(), round_entry(1), round_entry(2)], (3, 4))

    # Assert
    assert added == 2
    assert ledger.rounds(DATA, NET_A) == {1, 2}
    assert ledger.histogram(DATA, NET_A) == (3, 4)


def test_missing_file_is_an_empty_ledger(tmp_path: Path) -> None:
    # Execute
    ledger = PrivacyLedger(tmp_path / "absent.json")

    # Assert
    assert ledger.entries(DATA) == [] and ledger.histogram(DATA, NET_A) is None


def test_corrupt_file_error_names_the_file(tmp_path: Path) -> None:
    # Prepare
    path = tmp_path / "ledger.json"
    path.write_text('{"version": 2, "data": ', encoding="utf-8")

    # Execute / Assert
    with pytest.raises(LedgerCorruptError, match=re.escape(str(path))):
        PrivacyLedger(path).entries(DATA)


@pytest.mark.parametrize(
    "document",
    [
        {"version": 1, "clients": {}},
        {"version": 2, "data": {"ab": {"releases": "x", "histograms": {}}}},
        {"version": 2, "data": {"ab": {"releases": [{"round": 1}], "histograms": {}}}},
    ],
)
def test_malformed_structure_is_corrupt(tmp_path: Path, document: object) -> None:
    # Prepare
    path = tmp_path / "ledger.json"
    path.write_text(json.dumps(document), encoding="utf-8")

    # Execute / Assert: refused, never treated as empty (that would reset the budget)
    with pytest.raises(LedgerCorruptError, match="corrupt"):
        PrivacyLedger(path).reserve(DATA, round_entry(1), BUDGET)


def test_failed_replace_keeps_the_old_file_and_no_temporary(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Prepare
    path = tmp_path / "ledger.json"
    ledger = PrivacyLedger(path)
    ledger.reserve(DATA, round_entry(1), BUDGET)
    before = path.read_bytes()

    def crash(src: str, dst: str) -> None:
        raise OSError("simulated crash before rename")

    monkeypatch.setattr(os, "replace", crash)

    # Execute
    with pytest.raises(OSError, match="simulated"):
        ledger.reserve(DATA, round_entry(2), BUDGET)

    # Assert
    assert path.read_bytes() == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ledger.json", "ledger.json.lock"]


def test_ledger_file_is_private(tmp_path: Path) -> None:
    # Execute
    PrivacyLedger(tmp_path / "ledger.json").reserve(DATA, round_entry(1), BUDGET)

    # Assert
    assert (tmp_path / "ledger.json").stat().st_mode & 0o777 == 0o600


def _reserve_rounds(path: str, rounds: list[int], results: multiprocessing.Queue) -> None:
    ledger = PrivacyLedger(path)
    for rnd in rounds:
        try:
            ledger.reserve(
                DATA, round_entry(rnd), Budget(epsilon=20.0, delta=1e-5, accountant="rdp")
            )
            results.put(("ok", rnd))
        except (AlreadyReserved, BudgetExhausted) as exc:
            results.put((type(exc).__name__, rnd))


def test_processes_sharing_a_ledger_never_lose_or_double_a_reservation(tmp_path: Path) -> None:
    # Prepare: two processes race to reserve the same 30 rounds (budget: 20 of them).
    # "spawn", not "fork": a fork of this threaded test process (gRPC, torch) can
    # deadlock in the child; daemon children cannot hold the interpreter's exit.
    path = str(tmp_path / "ledger.json")
    context = multiprocessing.get_context("spawn")
    results: multiprocessing.Queue = context.Queue()
    procs = [
        context.Process(
            target=_reserve_rounds, args=(path, list(range(1, 31)), results), daemon=True
        )
        for _ in range(2)
    ]

    # Execute
    try:
        for p in procs:
            p.start()
        outcomes = [results.get(timeout=120) for _ in range(60)]
        for p in procs:
            p.join(timeout=60)
    finally:
        for p in procs:
            if p.is_alive():
                p.kill()
                p.join(timeout=10)

    # Assert: each round reserved by exactly one process, 20 in all, all on disk
    won = sorted(rnd for status, rnd in outcomes if status == "ok")
    assert won == list(range(1, 21))
    assert PrivacyLedger(path).rounds(DATA, NET_A) == set(range(1, 21))
