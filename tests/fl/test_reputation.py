"""Tests for fl.reputation (subjective-logic opinions from freshness-weighted evidence)."""

from __future__ import annotations

import json

import pytest
from hypothesis import given
from hypothesis import strategies as st

from fl.reputation import (
    Evidence,
    Opinion,
    ReputationBook,
    ReputationParams,
    freshness,
    opinion_from_evidence,
)

DEFAULT = ReputationParams()
NOW = 30

evidence = st.builds(
    Evidence,
    round=st.integers(0, NOW),
    positive=st.integers(0, 6),
    negative=st.integers(0, 6),
)
histories = st.lists(evidence, max_size=12)


def _reputation(history: list[Evidence], now: int = NOW) -> float:
    return opinion_from_evidence(history, now=now, params=DEFAULT).reputation


# --- pinned opinions ----------------------------------------------------------


def test_mixed_history_opinion_pinned() -> None:
    # Prepare: fresh positives 3*0.81 + 1*0.9 = 3.33, fresh negatives 1*0.9 = 0.9,
    # r = 0.3*3.33 = 0.999, s = 0.7*0.9 = 0.63, r + s + W = 3.629
    history = [Evidence(1, 3, 0), Evidence(2, 1, 1)]

    # Execute
    opinion = opinion_from_evidence(history, now=3, params=DEFAULT)

    # Assert: b = 0.999/3.629, d = 0.63/3.629, u = 2/3.629, T = 1.999/3.629
    assert opinion.belief == pytest.approx(0.275282446955084, rel=1e-14)
    assert opinion.disbelief == pytest.approx(0.17360154312482778, rel=1e-14)
    assert opinion.uncertainty == pytest.approx(0.5511160099200881, rel=1e-14)
    assert opinion.reputation == pytest.approx(0.5508404519151281, rel=1e-14)


def test_negative_only_opinion_pinned() -> None:
    # Prepare: s = 0.7*2 = 1.4, r + s + W = 3.4
    history = [Evidence(5, 0, 2)]

    # Execute
    opinion = opinion_from_evidence(history, now=5, params=DEFAULT)

    # Assert
    assert opinion == Opinion(0.0, 1.4 / 3.4, 2 / 3.4, 0.5)
    assert opinion.reputation == pytest.approx(0.29411764705882354, rel=1e-15)


def test_single_fresh_positive_opinion_pinned() -> None:
    # Prepare: r = 0.3, T = (0.3 + 0.5*2) / 2.3
    history = [Evidence(4, 1, 0)]

    # Execute
    reputation = _reputation(history, now=4)

    # Assert
    assert reputation == pytest.approx(0.5652173913043478, rel=1e-15)


def test_freshness_matches_power() -> None:
    # Execute
    weights = [freshness(0.9, age) for age in range(12)]

    # Assert
    assert weights == pytest.approx([0.9**age for age in range(12)], rel=1e-15)


# --- properties ---------------------------------------------------------------


@given(history=histories)
def test_belief_disbelief_uncertainty_sum_to_one(history: list[Evidence]) -> None:
    # Execute
    opinion = opinion_from_evidence(history, now=NOW, params=DEFAULT)

    # Assert
    assert abs(opinion.belief + opinion.disbelief + opinion.uncertainty - 1) <= 1e-12


@given(history=histories, extra=evidence)
def test_more_negative_evidence_never_raises_reputation(
    history: list[Evidence], extra: Evidence
) -> None:
    # Prepare
    worse = [*history, Evidence(extra.round, 0, extra.negative + 1)]

    # Execute
    before, after = _reputation(history), _reputation(worse)

    # Assert
    assert after <= before


@given(history=histories, extra=evidence)
def test_more_positive_evidence_never_lowers_reputation(
    history: list[Evidence], extra: Evidence
) -> None:
    # Prepare
    better = [*history, Evidence(extra.round, extra.positive + 1, 0)]

    # Execute
    before, after = _reputation(history), _reputation(better)

    # Assert
    assert after >= before


@given(history=histories, wait=st.integers(1, 20))
def test_evidence_fades_toward_base_rate(history: list[Evidence], wait: int) -> None:
    # Execute
    now = abs(_reputation(history, now=NOW) - DEFAULT.a)
    later = abs(_reputation(history, now=NOW + wait) - DEFAULT.a)

    # Assert
    assert later <= now + 1e-15


def test_older_identical_evidence_counts_less() -> None:
    # Execute: the same single acceptance, 1 and 10 rounds ago
    recent = _reputation([Evidence(NOW - 1, 1, 0)])
    old = _reputation([Evidence(NOW - 10, 1, 0)])

    # Assert
    assert DEFAULT.a < old < recent


@given(a=st.floats(0.0, 1.0), now=st.integers(0, 1000))
def test_newcomer_reputation_is_exactly_the_base_rate(a: float, now: int) -> None:
    # Prepare
    book = ReputationBook(ReputationParams(a=a))

    # Execute
    opinion = book.opinion("newcomer", now)

    # Assert
    assert opinion.reputation == a and opinion.uncertainty == 1.0


@given(history=histories, data=st.data())
def test_opinion_is_independent_of_evidence_order(
    history: list[Evidence], data: st.DataObject
) -> None:
    # Prepare
    shuffled = data.draw(st.permutations(history))

    # Execute
    original = opinion_from_evidence(history, now=NOW, params=DEFAULT)
    reordered = opinion_from_evidence(shuffled, now=NOW, params=DEFAULT)

    # Assert: bit-for-bit, not approximately
    assert reordered == original


# --- validation -----------------------------------------------------------------


@pytest.mark.parametrize(
    "kwargs",
    [
        {"kappa": 0.3, "eta": 0.6},
        {"kappa": 0.5, "eta": 0.5},
        {"kappa": 0.7, "eta": 0.3},
        {"z": 0.0},
        {"z": 1.5},
        {"W": 0.0},
        {"a": 1.5},
        {"threshold": -0.1},
    ],
)
def test_params_reject_invalid_settings(kwargs: dict[str, float]) -> None:
    # Execute / Assert
    with pytest.raises(ValueError):
        ReputationParams(**kwargs)


def test_evidence_newer_than_now_is_refused() -> None:
    # Execute / Assert
    with pytest.raises(ValueError, match="newer"):
        opinion_from_evidence([Evidence(5, 1, 0)], now=4, params=DEFAULT)


# --- the book -----------------------------------------------------------------


def test_book_counts_rejected_and_silent_as_negative() -> None:
    # Prepare
    book = ReputationBook()

    # Execute
    book.record_round(1, accepted=["a", "b"], rejected=["b", "c"], silent=["d"])

    # Assert
    assert [book.evidence(c) for c in "abcd"] == [
        (Evidence(1, 1, 0),),
        (Evidence(1, 1, 1),),
        (Evidence(1, 0, 1),),
        (Evidence(1, 0, 1),),
    ]


def test_book_opinion_matches_the_pure_function() -> None:
    # Prepare
    book = ReputationBook()
    book.record_round(1, accepted=["a"], rejected=[], silent=[])
    book.record_round(2, accepted=["a"], rejected=["a"], silent=[])

    # Execute
    opinion = book.opinion("a", 3)

    # Assert
    expected = opinion_from_evidence([Evidence(1, 1, 0), Evidence(2, 1, 1)], now=3, params=DEFAULT)
    assert opinion == expected


def test_book_refuses_rounds_out_of_order() -> None:
    # Prepare
    book = ReputationBook()
    book.record_round(3, accepted=["a"], rejected=[], silent=[])

    # Execute / Assert
    with pytest.raises(ValueError, match="round 2"):
        book.record_round(2, accepted=["a"], rejected=[], silent=[])


def test_book_scores_include_requested_newcomers() -> None:
    # Prepare
    book = ReputationBook()
    book.record_round(1, accepted=[], rejected=["bad"], silent=[])

    # Execute
    scores = book.scores(1, clients=["new", "bad"])

    # Assert: s = 0.7, T = 0.5 * 2 / 2.7
    assert scores == {"bad": pytest.approx(1 / 2.7, rel=1e-15), "new": 0.5}


def test_book_state_survives_json_round_trip() -> None:
    # Prepare
    book = ReputationBook()
    book.record_round(1, accepted=["a", "b"], rejected=["c"], silent=[])
    book.record_round(4, accepted=["c"], rejected=[], silent=["a"])
    restored = ReputationBook()

    # Execute
    restored.load_state_dict(json.loads(json.dumps(book.state_dict())))

    # Assert
    assert restored.scores(5) == book.scores(5)
    assert restored.state_dict() == book.state_dict()
