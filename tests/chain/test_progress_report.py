"""The progress report ``network up`` shows is read off the chain at every step of a run."""

from __future__ import annotations

from dataclasses import replace

from chain.metrics import progress_report
from chain.records import RoundSummary
from chain.state import ChainState
from tests.chain.blocks import commit
from tests.chain.test_records import CLIENTS, CONFIG, registration, verdicts_for


def test_the_report_follows_the_phases_of_a_round() -> None:
    # Prepare
    state = ChainState(CONFIG, clients=CLIENTS, selection_seed="run")
    reports = [progress_report(state)]
    # Execute: one registration, the others, then round 1's three records
    commit(state, [(CLIENTS[0], registration(CLIENTS[0]))])
    reports.append(progress_report(state))
    commit(state, [(cid, registration(cid)) for cid in CLIENTS[1:]])
    reports.append(progress_report(state))
    selection = state.expected_selection(1)
    commit(state, [("server", selection)])
    reports.append(progress_report(state))
    commit(state, [("miner-0", verdicts_for(state, selection.selected, 1))])
    reports.append(progress_report(state))
    commit(state, [("server", RoundSummary(1, bytes(32), 0.625, 0.5))])
    reports.append(progress_report(state))
    # Assert
    picked = [(r["phase"], r["registered"], r["selected"], r["blocks"]) for r in reports]
    assert picked == [
        ("registering", 0, None, 0),
        ("registering", 1, None, 1),
        ("selecting", 4, None, 2),
        ("training", 4, 2, 3),
        ("aggregating", 4, 2, 4),
        ("selecting", 4, None, 5),
    ]
    assert [r["round"] for r in reports] == [0, 0, 0, 0, 0, 1]
    assert [r["accuracy"] for r in reports] == [None] * 5 + [0.625]
    assert all(r["rounds"] == 3 and r["clients"] == 4 for r in reports)
    # Without DP there is no privacy to report
    assert all(r["epsilon_spent_max"] is None and r["epsilon_budget"] is None for r in reports)


def test_the_report_ends_done_after_the_last_summary() -> None:
    # Prepare
    config = replace(CONFIG, rounds=1)
    state = ChainState(config, clients=CLIENTS, selection_seed="run")
    commit(state, [(cid, registration(cid)) for cid in CLIENTS])
    selection = state.expected_selection(1)
    commit(state, [("server", selection)])
    commit(state, [("miner-0", verdicts_for(state, selection.selected, 1))])
    # Execute
    commit(state, [("server", RoundSummary(1, bytes(32), 0.75, 0.5))])
    report = progress_report(state)
    # Assert
    assert (report["phase"], report["round"], report["rounds"]) == ("done", 1, 1)
    assert report["accuracy"] == 0.75


def test_privacy_spent_is_the_largest_the_newest_verdicts_state_against_the_budget() -> None:
    # Prepare: a DP run, registered
    config = replace(CONFIG, dp="gaussian", epsilon=8.0, dp_accountant="rdp")
    state = ChainState(config, clients=CLIENTS, selection_seed="run")
    commit(state, [(cid, registration(cid)) for cid in CLIENTS])
    before = progress_report(state)
    selection = state.expected_selection(1)
    commit(state, [("server", selection)])
    verdicts = verdicts_for(state, selection.selected, 1)
    # Execute
    commit(state, [("miner-0", verdicts)])
    after = progress_report(state)
    # Assert: nothing stated before the first verdict record; then its maximum
    assert (before["epsilon_spent_max"], before["epsilon_budget"]) == (None, 8.0)
    spent = dict(verdicts.privacy)
    assert after["epsilon_spent_max"] == max(spent.values())
    assert after["epsilon_spent_max"] == max(spent[c] for c in selection.selected)
    assert 0 < after["epsilon_spent_max"] < 8.0
    assert after["epsilon_budget"] == 8.0
