"""The round lifecycle: the transition table decides which record may come next."""

from __future__ import annotations

import pytest

from chain.records import (
    RECORD_KINDS,
    Registration,
    RoundSummary,
    RoundVerdicts,
    Selection,
    kinds_signed_by,
    record_kind,
    timestamp_of,
)
from chain.state import TRANSITIONS, ChainState, InvalidRecord, Phase
from tests.chain.blocks import commit
from tests.chain.test_records import (
    CLIENTS,
    CONFIG,
    play_round,
    registered_state,
    registration,
    verdicts_for,
)


def records_of_round(state: ChainState, rnd: int) -> dict[type, object]:
    """One valid-looking record of each kind for round ``rnd`` (not necessarily valid now)."""
    selection = state.expected_selection(rnd) if state.phase is Phase.SELECTING else None
    selected = selection.selected if selection is not None else CLIENTS[:2]
    return {
        Registration: registration(CLIENTS[0], per_class=11),  # differs from the committed one
        Selection: selection or Selection(rnd, bytes(32), selected, ()),
        # (a second verdict record of a round that has one is a valid no-op: use the next)
        RoundVerdicts: RoundVerdicts(rnd + (rnd in state.verdicts), (), tuple(selected), (), ()),
        RoundSummary: RoundSummary(rnd, bytes(32), 0.5, 0.5),
    }


def test_the_table_covers_every_phase_and_only_registered_kinds() -> None:
    kinds = {k.cls for k in RECORD_KINDS.values()}
    assert set(TRANSITIONS) == set(Phase)
    for moves in TRANSITIONS.values():
        assert set(moves) <= kinds


def test_a_run_walks_the_phases_in_order() -> None:
    # Prepare
    state = ChainState(CONFIG, clients=CLIENTS, selection_seed="run")
    seen = [state.phase]
    # Execute: registrations one block each, then every round
    for cid in CLIENTS:
        commit(state, [(cid, registration(cid))])
        seen.append(state.phase)
    for rnd in range(1, CONFIG.rounds + 1):
        selection = state.expected_selection(rnd)
        commit(state, [("server", selection)])
        seen.append(state.phase)
        commit(state, [("miner-0", verdicts_for(state, selection.selected, rnd))])
        seen.append(state.phase)
        commit(state, [("server", RoundSummary(rnd, bytes(32), 0.5, 0.5))])
        seen.append(state.phase)
    # Assert
    r, s, t, a, d = (
        Phase.REGISTERING,
        Phase.SELECTING,
        Phase.TRAINING,
        Phase.AGGREGATING,
        Phase.DONE,
    )
    assert seen == [r, r, r, r, s, t, a, s, t, a, s, t, a, d]
    assert state.due_round == CONFIG.rounds + 1 and state.current_round == 0


@pytest.mark.parametrize("phase", list(Phase))
def test_only_the_tables_kinds_are_accepted_in_each_phase(phase: Phase) -> None:
    # Prepare: a chain in ``phase`` (run seeds: a selection needs no anchor block)
    state = ChainState(CONFIG, clients=CLIENTS, selection_seed="run")
    if phase is not Phase.REGISTERING:
        commit(state, [(cid, registration(cid)) for cid in CLIENTS])
    for rnd in range(1, CONFIG.rounds + 1):
        if state.phase is phase:
            break
        selection = state.expected_selection(rnd)
        commit(state, [("server", selection)])
        if state.phase is phase:
            break
        commit(state, [("miner-0", verdicts_for(state, selection.selected, rnd))])
        if state.phase is phase:
            break
        commit(state, [("server", RoundSummary(rnd, bytes(32), 0.5, 0.5))])
    assert state.phase is phase
    rnd = (
        state.due_round
        if phase in (Phase.SELECTING, Phase.DONE)
        else max(state.selections, default=1)
    )
    # Execute / Assert: a kind outside the table is refused, naming the phase
    for kind, record in records_of_round(state, rnd).items():
        if kind in TRANSITIONS[phase]:
            continue
        with pytest.raises(InvalidRecord, match=phase.value):
            state.check_record("server", record)  # type: ignore[arg-type]


def test_a_late_verdict_record_is_a_no_op_in_any_later_phase() -> None:
    # Prepare: round 1 summarised, round 2 selected (training)
    state = registered_state()
    play_round(state, 1)
    commit(state, [("server", state.expected_selection(2))])
    late = state.verdicts[1]
    # Execute / Assert: another miner's late verdict record is a valid no-op
    state.check_record("miner-1", late)
    before = (dict(state.verdicts), state.phase)
    state.apply_record("miner-1", late)
    assert (dict(state.verdicts), state.phase) == before


def test_a_second_different_registration_is_refused() -> None:
    state = ChainState(CONFIG, clients=CLIENTS)
    commit(state, [(CLIENTS[0], registration(CLIENTS[0]))])
    with pytest.raises(InvalidRecord, match="already registered differently"):
        state.check_record(CLIENTS[0], registration(CLIENTS[0], per_class=12))


def test_timestamps_follow_each_signers_registered_kinds() -> None:
    # Assert: the server signs selection then summary in each round
    assert [k.cls for k in kinds_signed_by("server")] == [Selection, RoundSummary]
    assert timestamp_of(Selection(3, b"", (), ())) == 6
    assert timestamp_of(RoundSummary(3, b"", 0.0, 0.0)) == 7
    assert timestamp_of(RoundVerdicts(3, (), (), (), ())) == 3
    assert timestamp_of(registration(CLIENTS[0])) == 0


def test_a_new_server_record_kind_gets_a_slot_in_the_servers_sequence() -> None:
    # Prepare: register a third server-signed kind for the duration of the test
    from dataclasses import dataclass

    @record_kind(200, name="chain-test-note", role="server")
    @dataclass(frozen=True)
    class Note:
        round: int

        def encode(self) -> bytes:
            return b""

        @classmethod
        def read(cls, reader: object) -> Note:
            raise NotImplementedError

    try:
        # Assert: one strictly increasing sequence per round, in registration order
        stamps = [
            timestamp_of(r)
            for rnd in (1, 2)
            for r in (Selection(rnd, b"", (), ()), RoundSummary(rnd, b"", 0, 0), Note(rnd))
        ]
        assert stamps == sorted(set(stamps)) == [3, 4, 5, 6, 7, 8]
    finally:
        del RECORD_KINDS[200]


def test_a_kind_code_is_registered_once() -> None:
    with pytest.raises(ValueError, match="registered twice"):
        record_kind(1, name="chain-other", role="client")(type("X", (), {"read": None}))
