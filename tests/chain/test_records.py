"""On-chain records: canonical bytes, and the checks a replica makes before voting."""

from __future__ import annotations

import math

import pytest

from chain.records import (
    Registration,
    RoundSummary,
    RoundVerdicts,
    Selection,
    UpdateRecord,
    decode_operation,
    encode_operation,
    timestamp_of,
)
from chain.state import ChainState
from chain.verdicts import verdicts_agree
from consensus.canonical import MalformedMessage
from consensus.ledger import Block, Request, encode_batch
from fl.config import RunConfig
from fl.rounds import selection_seed
from tests.chain.blocks import commit, next_block
from tests.chain.blocks import record_request as request

CLIENTS = ("client-000", "client-001", "client-002", "client-003")
CONFIG = RunConfig(clients=4, frac=0.5, rounds=3, model="mlp")
ROLES = {**{c: "client" for c in CLIENTS}, "server": "server", "miner-0": "miner"}


def always(*_args: object) -> bool:
    return True


def registration(cid: str, per_class: int = 10) -> Registration:
    return Registration(cid, (per_class,) * 10 + (0,))


def registered_state(selection_seed: str = "block") -> ChainState:
    """Every client registered, in one committed block (height 1)."""
    state = ChainState(CONFIG, clients=CLIENTS, selection_seed=selection_seed)
    commit(state, [(cid, registration(cid)) for cid in CLIENTS])
    return state


def block_of(requests: list[Request], height: int = 1) -> Block:
    return Block.propose(
        height=height, previous_hash=bytes(32), view=0, proposer=0, payload=encode_batch(requests)
    )


def update(cid: str, accepted: bool = True) -> UpdateRecord:
    return UpdateRecord(cid, bytes([1]) * 32, bytes(32), 100, 0.5, accepted, "r", b"s")


def verdicts_for(state: ChainState, selected: tuple[str, ...], rnd: int = 1) -> RoundVerdicts:
    draft = RoundVerdicts(rnd, tuple(update(c) for c in selected), (), (), ())
    return RoundVerdicts(
        rnd, draft.updates, (), state.reputations_after(rnd, draft), state.privacy_after(draft)
    )


def play_round(state: ChainState, rnd: int) -> Block:
    """Commit round ``rnd``'s selection, verdicts and summary in three blocks; the last one."""
    selection = state.expected_selection(rnd)
    commit(state, [("server", selection)])
    verdicts = verdicts_for(state, selection.selected, rnd)
    commit(state, [("miner-0", verdicts)])
    summary = RoundSummary(rnd, bytes([rnd]) * 32, 0.5, 0.5)
    return commit(state, [("server", summary)])


def check(state: ChainState, requests: list[Request]) -> str:
    return state.check_block(next_block(state, requests), verify=always, role_of=ROLES)


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
    operation = encode_operation(record)  # type: ignore[arg-type]
    # Execute
    timestamp, decoded = decode_operation(operation)
    # Assert
    assert (timestamp, decoded) == (timestamp_of(record), record)
    assert encode_operation(decoded) == operation


def test_trailing_bytes_are_malformed() -> None:
    operation = encode_operation(RoundSummary(1, b"\x01" * 32, 0.5, 0.5))
    with pytest.raises(MalformedMessage):
        decode_operation(operation + b"\x00")


def test_selection_equal_to_algorithm_1_is_valid() -> None:
    # Prepare
    state = registered_state()
    selection = state.expected_selection(1)
    # Execute
    problem = state.check_block(
        block_of([request("server", selection)]), verify=always, role_of=ROLES
    )
    # Assert
    assert problem == ""
    assert len(selection.selected) == CONFIG.clients_per_round


def test_selection_other_than_algorithm_1_is_refused() -> None:
    state = registered_state()
    expected = state.expected_selection(1)
    other = tuple(sorted(set(CLIENTS) - set(expected.selected)))
    forged = Selection(1, expected.seed, other, expected.declined)
    problem = state.check_block(block_of([request("server", forged)]), verify=always, role_of=ROLES)
    assert "differs from Algorithm 1" in problem


def test_selection_by_a_client_is_refused() -> None:
    state = registered_state()
    selection = state.expected_selection(1)
    problem = state.check_block(
        block_of([request("client-000", selection)]), verify=always, role_of=ROLES
    )
    assert "needs a server" in problem


def test_bad_signature_is_refused() -> None:
    state = registered_state()
    never = lambda *_args: False  # noqa: E731
    problem = state.check_block(
        block_of([request("server", state.expected_selection(1))]), verify=never, role_of=ROLES
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
    good = state.check_block(block_of([request("miner-0", honest)]), verify=always, role_of=ROLES)
    bad = state.check_block(block_of([request("miner-0", inflated)]), verify=always, role_of=ROLES)
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
        block_of([request("miner-0", record)]), verify=always, role_of=ROLES
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


# The selection seed ------------------------------------------------------------


def test_round_1_seed_is_the_digest_of_the_block_with_the_last_registration() -> None:
    # Prepare: registrations in two blocks, then an empty block
    state = ChainState(CONFIG, clients=CLIENTS)
    first = [(cid, registration(cid)) for cid in CLIENTS[:2]]
    rest = [(cid, registration(cid)) for cid in CLIENTS[2:]]
    commit(state, first)
    last_registration = commit(state, rest)
    later = commit(state, [])
    # Execute
    selection = state.expected_selection(1)
    # Assert
    assert selection.seed == last_registration.digest
    assert selection.seed != later.digest
    assert check(state, [request("server", selection)]) == ""


def test_round_r_seed_is_the_digest_of_the_block_with_the_summary_of_r_minus_1() -> None:
    # Prepare: round 1 played; a late duplicate verdict record commits after the summary
    state = registered_state()
    summary_block = play_round(state, 1)
    late = RoundVerdicts(1, (), state.selections[1].selected, (), ())
    commit(state, [("miner-1", late)])
    # Execute
    selection = state.expected_selection(2)
    # Assert
    assert selection.seed == summary_block.digest
    assert state.head_hash != summary_block.digest
    assert check(state, [request("server", selection)]) == ""


def test_selection_in_the_same_block_as_the_summary_it_follows_is_refused() -> None:
    # Prepare: round 1 selected and judged; its summary not yet committed
    state = registered_state()
    selection = state.expected_selection(1)
    commit(state, [("server", selection)])
    verdicts = verdicts_for(state, selection.selected)
    commit(state, [("miner-0", verdicts)])
    summary = RoundSummary(1, b"\x01" * 32, 0.5, 0.5)
    # The only seeds a proposer could know: the round-1 anchor and the current head
    seeds = (state.anchors[1], state.head_hash)
    forged = [Selection(2, seed, selection.selected, ()) for seed in seeds]
    # Execute
    problems = [
        check(
            state,
            [
                request("server", summary),
                request("server", record),
            ],
        )
        for record in forged
    ]
    alone = check(state, [request("server", summary)])
    # Assert
    assert alone == ""
    assert all("belongs in a later block" in p for p in problems), problems


def test_selection_in_the_same_block_as_the_last_registration_is_refused() -> None:
    # Prepare: all but the last client registered
    state = ChainState(CONFIG, clients=CLIENTS)
    commit(state, [(cid, registration(cid)) for cid in CLIENTS[:-1]])
    last = request(CLIENTS[-1], registration(CLIENTS[-1]))
    forged = Selection(1, state.head_hash, CLIENTS[: CONFIG.clients_per_round], ())
    # Execute
    problem = check(state, [last, request("server", forged)])
    # Assert
    assert "belongs in a later block" in problem


def test_run_derived_seed_is_refused_under_block_seeds() -> None:
    # Prepare
    state = registered_state("block")
    expected = state.expected_selection(1)
    forged = Selection(1, selection_seed(CONFIG, 1), expected.selected, expected.declined)
    # Execute
    problem = check(state, [request("server", forged)])
    # Assert
    assert "has seed" in problem and "selection_seed = block" in problem


def test_block_seed_is_refused_under_run_seeds() -> None:
    # Prepare
    state = registered_state("run")
    expected = state.expected_selection(1)
    forged = Selection(1, state.head_hash, expected.selected, expected.declined)
    # Execute
    problem = check(state, [request("server", forged)])
    # Assert
    assert expected.seed == selection_seed(CONFIG, 1)
    assert "has seed" in problem and "selection_seed = run" in problem


def test_run_seeds_equal_the_simulators_in_every_round() -> None:
    # Prepare
    state = registered_state("run")
    play_round(state, 1)
    # Execute
    selection = state.expected_selection(2)
    # Assert
    assert selection.seed == selection_seed(CONFIG, 2)
    assert check(state, [request("server", selection)]) == ""


def test_unknown_selection_seed_is_refused() -> None:
    with pytest.raises(ValueError, match="selection_seed must be one of"):
        ChainState(CONFIG, clients=CLIENTS, selection_seed="hash")
