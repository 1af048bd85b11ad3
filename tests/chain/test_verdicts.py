"""The verdict rules a miner follows, tested without sockets or an event loop."""

from __future__ import annotations

import math

import pytest

from chain.records import UpdateRecord
from chain.state import ChainState
from chain.verdicts import (
    Upload,
    admits_malformed,
    build_verdicts,
    check_verdicts,
    round_ready,
    submits_now,
    uploads_complete,
)
from tests.chain.blocks import commit
from tests.chain.test_records import registered_state


def opened() -> tuple[ChainState, tuple[str, ...]]:
    state = registered_state()
    selection = state.expected_selection(1)
    commit(state, [("server", selection)])
    return state, selection.selected


def upload(state: ChainState, cid: str, *, digest: bytes = b"\x01" * 32) -> Upload:
    return Upload(cid, 1, digest, b"\x0b" * 32, state.released_records(cid), b"sig-" + cid.encode())


def test_a_round_is_ready_when_every_update_is_in_or_at_its_deadline() -> None:
    assert round_ready(complete=True, now=101.0, opened_at=100.0, deadline=60.0)
    assert not round_ready(complete=False, now=159.9, opened_at=100.0, deadline=60.0)
    assert round_ready(complete=False, now=160.0, opened_at=100.0, deadline=60.0)


def test_the_primary_submits_at_once_and_a_backup_two_view_timeouts_later() -> None:
    # Prepare: the round became ready at t = 101; two view timeouts are 2 s
    timing = {"ready_at": 101.0, "fallback": 2.0}
    # Execute / Assert
    assert submits_now(is_primary=True, now=101.0, **timing)
    assert not submits_now(is_primary=False, now=102.9, **timing)
    assert submits_now(is_primary=False, now=103.0, **timing)


def test_built_verdicts_record_silent_clients_and_malformed_updates_as_rejected() -> None:
    # Prepare: one client uploaded, one sent NaN, the rest are silent
    state, selected = opened()
    good, bad, *silent = selected
    held = {good: upload(state, good)}
    malformed = {bad: (upload(state, bad, digest=b"\x02" * 32), "malformed: non-finite")}
    # Execute
    record = build_verdicts(
        state, 1, held=held, own={good: (True, "accepted", 0.75)}, malformed=malformed
    )
    # Assert: the record passes the replica's own recomputation
    state.check_record("miner-0", record)
    assert [u.client for u in record.updates] == sorted([good, bad])
    assert record.accepted == [good] and record.rejected == {bad: "malformed: non-finite"}
    assert list(record.silent) == sorted(silent)
    assert math.isnan(next(u.accuracy for u in record.updates if u.client == bad))


@pytest.mark.parametrize(
    ("tamper", "message"),
    [
        (lambda u: u, ""),
        (lambda u: UpdateRecord(**{**u.__dict__, "n_samples": u.n_samples + 1}), "does not match"),
        (lambda u: UpdateRecord(**{**u.__dict__, "accepted": False}), "verdict"),
        (lambda u: UpdateRecord(**{**u.__dict__, "digest": b"\x09" * 32}), "not held"),
    ],
)
def test_another_miners_record_is_checked_against_what_this_miner_holds(
    tamper: object, message: str
) -> None:
    # Prepare: this miner holds one upload and accepts it
    state, selected = opened()
    cid = selected[0]
    mine = upload(state, cid)
    record = build_verdicts(
        state, 1, held={cid: mine}, own={cid: (True, "accepted", 0.75)}, malformed={}
    )
    claimed = record.__class__(
        record.round,
        tuple(tamper(u) for u in record.updates),  # type: ignore[operator]
        record.silent,
        record.reputations,
        record.privacy,
    )
    # Execute
    problem = check_verdicts(
        state,
        claimed,
        model_digest=mine.base_digest,
        held=lambda u: mine if u.digest == mine.digest and u.client == cid else None,
        malformed={},
        validate=lambda digests: {c: (True, "accepted", 0.75) for c, _, _ in digests},
    )
    # Assert
    assert (problem == "") if not message else (message in problem)


def test_a_malformed_update_counts_only_for_the_open_round_and_its_model() -> None:
    state, selected = opened()
    cid = selected[0]
    mine = upload(state, cid)
    assert admits_malformed(state, mine, model_digest=lambda: mine.base_digest)
    assert not admits_malformed(state, mine, model_digest=lambda: b"\x00" * 32)
    other_round = Upload(cid, 2, mine.digest, mine.base_digest, mine.n_samples, b"")
    asked = []
    assert not admits_malformed(state, other_round, model_digest=lambda: asked.append(1))
    assert asked == []  # the model of another round is never recomputed
    assert uploads_complete(state, 1, {c: 1 for c in selected})
    assert not uploads_complete(state, 1, {cid: 1})
