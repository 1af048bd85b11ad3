"""On-chain records: canonical bytes, and the checks a replica makes before voting."""

from __future__ import annotations

import math

import pytest

from consensus.canonical import MalformedMessage
from consensus.ledger import Block, Request, encode_batch
from fl.config import RunConfig
from node.records import (
    ChainState,
    Registration,
    RoundSummary,
    RoundVerdicts,
    Selection,
    UpdateRecord,
    decode_operation,
    encode_operation,
    verdicts_agree,
)

CLIENTS = ("client-000", "client-001", "client-002", "client-003")
CONFIG = RunConfig(clients=4, frac=0.5, rounds=3, model="mlp")
ROLES = {**{c: "client" for c in CLIENTS}, "server": "server", "miner-0": "miner"}


def always(*_args: object) -> bool:
    return True


def registration(cid: str, n: int = 100) -> Registration:
    return Registration(cid, n, tuple(range(10)), 1.0, 0.32, 4, 0.0)


def registered_state() -> ChainState:
    state = ChainState(CONFIG, clients=CLIENTS)
    for cid in CLIENTS:
        state.apply_record(cid, registration(cid))
    return state


def block_of(requests: list[Request], height: int = 1) -> Block:
    return Block.propose(
        height=height, previous_hash=bytes(32), view=0, proposer=0, payload=encode_batch(requests)
    )


def request(submitter: str, record: object, timestamp: int) -> Request:
    return Request(submitter, timestamp, encode_operation(record, timestamp=timestamp), b"sig")


def update(cid: str, accepted: bool = True) -> UpdateRecord:
    return UpdateRecord(cid, bytes([1]) * 32, bytes(32), 100, 0.5, accepted, "r", b"s")


def verdicts_for(state: ChainState, selected: tuple[str, ...]) -> RoundVerdicts:
    draft = RoundVerdicts(1, tuple(update(c) for c in selected), (), (), ())
    return RoundVerdicts(
        1, draft.updates, (), state.reputations_after(1, draft), state.privacy_after(draft)
    )


@pytest.mark.parametrize(
    "record",
    [
        registration("client-001"),
        Selection(3, b"\x07" * 32, ("client-000", "client-002"), ("client-003",)),
        RoundVerdicts(2, (update("client-000"),), ("client-001",), (("a", 0.5),), (("a", 1.25),)),
        RoundSummary(2, b"\x01" * 32, 0.875, 0.5),
    ],
)
def test_records_round_trip_through_canonical_bytes(record: object) -> None:
    # Prepare
    operation = encode_operation(record, timestamp=9)  # type: ignore[arg-type]
    # Execute
    timestamp, decoded = decode_operation(operation)
    # Assert
    assert (timestamp, decoded) == (9, record)
    assert encode_operation(decoded, timestamp=9) == operation


def test_trailing_bytes_are_malformed() -> None:
    operation = encode_operation(RoundSummary(1, b"\x01" * 32, 0.5, 0.5), timestamp=3)
    with pytest.raises(MalformedMessage):
        decode_operation(operation + b"\x00")


def test_selection_equal_to_algorithm_1_is_valid() -> None:
    # Prepare
    state = registered_state()
    selection = state.expected_selection(1)
    # Execute
    problem = state.check_block(
        block_of([request("server", selection, 2)]), verify=always, role_of=ROLES
    )
    # Assert
    assert problem == ""
    assert len(selection.selected) == CONFIG.clients_per_round


def test_selection_other_than_algorithm_1_is_refused() -> None:
    state = registered_state()
    expected = state.expected_selection(1)
    other = tuple(sorted(set(CLIENTS) - set(expected.selected)))
    forged = Selection(1, expected.seed, other, expected.declined)
    problem = state.check_block(
        block_of([request("server", forged, 2)]), verify=always, role_of=ROLES
    )
    assert "differs from Algorithm 1" in problem


def test_selection_by_a_client_is_refused() -> None:
    state = registered_state()
    selection = state.expected_selection(1)
    problem = state.check_block(
        block_of([request("client-000", selection, 2)]), verify=always, role_of=ROLES
    )
    assert "needs a server" in problem


def test_bad_signature_is_refused() -> None:
    state = registered_state()
    never = lambda *_args: False  # noqa: E731
    problem = state.check_block(
        block_of([request("server", state.expected_selection(1), 2)]), verify=never, role_of=ROLES
    )
    assert problem.endswith("bad signature")


def test_verdicts_with_wrong_reputations_are_refused() -> None:
    # Prepare
    state = registered_state()
    selection = state.expected_selection(1)
    state.apply_record("server", selection)
    honest = verdicts_for(state, selection.selected)
    inflated = RoundVerdicts(
        1, honest.updates, (), tuple((c, 1.0) for c, _ in honest.reputations), honest.privacy
    )
    # Execute
    good = state.check_block(
        block_of([request("miner-0", honest, 1)]), verify=always, role_of=ROLES
    )
    bad = state.check_block(
        block_of([request("miner-0", inflated, 1)]), verify=always, role_of=ROLES
    )
    # Assert
    assert good == ""
    assert "reputations differ" in bad


def test_verdicts_from_an_unselected_client_are_refused() -> None:
    state = registered_state()
    selection = state.expected_selection(1)
    state.apply_record("server", selection)
    outsider = next(c for c in CLIENTS if c not in selection.selected)
    record = verdicts_for(state, tuple(sorted((*selection.selected, outsider))))
    problem = state.check_block(
        block_of([request("miner-0", record, 1)]), verify=always, role_of=ROLES
    )
    assert "distinct selected clients" in problem


def test_applied_verdicts_feed_reputation_and_a_duplicate_is_a_no_op() -> None:
    # Prepare
    state = registered_state()
    selection = state.expected_selection(1)
    state.apply_record("server", selection)
    record = verdicts_for(state, selection.selected)
    # Execute
    state.apply_record("miner-0", record)
    state.apply_record("miner-1", RoundVerdicts(1, (), selection.selected, (), ()))
    # Assert
    scores = state.book.scores(1, clients=CLIENTS)
    assert all(scores[c] > 0.5 for c in selection.selected)
    assert state.verdicts[1] == record
    assert state.current_round == 0


def test_replica_check_of_verdicts_is_exact_on_verdict_and_tolerant_on_accuracy() -> None:
    claimed = RoundVerdicts(1, (update("client-000"),), (), (), ())
    assert verdicts_agree(claimed, {"client-000": (True, "r", 0.5 + 1e-9)}) == ""
    assert "verdict" in verdicts_agree(claimed, {"client-000": (False, "r", 0.5)})
    assert "accuracy" in verdicts_agree(claimed, {"client-000": (True, "r", 0.51)})
    assert "other clients" in verdicts_agree(claimed, {"client-001": (True, "r", math.nan)})
