"""Tests for fl.selection (Algorithm 1: self-assessment and reputation-based selection)."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from fl.selection import DataSummary, SelectionParams, select_clients, self_assessment

EIGHT = {f"c{i}": (i + 1) / 10 for i in range(8)}
NEUTRAL = dict.fromkeys(EIGHT, 0.5)

client_ids = st.text("abcdefgh", min_size=1, max_size=3)
unit = st.floats(0.0, 1.0)


@st.composite
def populations(draw: st.DrawFn) -> tuple[dict[str, float], dict[str, float], set[str]]:
    """Self scores, reputations and a declined subset over the same clients."""
    ids = draw(st.lists(client_ids, min_size=1, max_size=10, unique=True))
    self_scores = {c: draw(unit) for c in ids}
    reputations = {c: draw(unit) for c in ids}
    declined = set(draw(st.lists(st.sampled_from(ids), max_size=len(ids))))
    return self_scores, reputations, declined


# --- self-assessment ------------------------------------------------------------


def test_self_assessment_pinned() -> None:
    # Prepare: size 300/600 = 0.5, quality 0.8, coverage 5/10 = 0.5
    summary = DataSummary("a", 300, (0, 1, 2, 3, 4), 0.8)

    # Execute
    score = self_assessment(summary, max_samples=600, num_classes=10)

    # Assert: 0.4*0.5 + 0.3*0.8 + 0.3*0.5
    assert score == pytest.approx(0.59, rel=1e-15)


def test_self_assessment_clamps_inflated_claims() -> None:
    # Prepare: too many samples, quality 5, duplicated and invented classes
    summary = DataSummary("liar", 10_000, (0, 0, 0, 42, -1), 5.0)

    # Execute
    score = self_assessment(summary, max_samples=600, num_classes=10)

    # Assert: size 1, quality 1, coverage 1/10 -> 0.4 + 0.3 + 0.03
    assert score == pytest.approx(0.73, rel=1e-15)


def test_self_assessment_custom_weights_pinned() -> None:
    # Prepare: size 0.25, quality 0.4, coverage 1.0
    summary = DataSummary("b", 150, tuple(range(10)), 0.4)

    # Execute
    score = self_assessment(summary, max_samples=600, num_classes=10, weights=(0.2, 0.2, 0.6))

    # Assert: 0.05 + 0.08 + 0.6
    assert score == pytest.approx(0.73, rel=1e-15)


@given(
    n=st.integers(0, 10**6),
    classes=st.lists(st.integers(-5, 20), max_size=30),
    quality=st.floats(-10.0, 10.0),
)
def test_self_assessment_stays_in_unit_interval(n: int, classes: list[int], quality: float) -> None:
    # Execute
    score = self_assessment(
        DataSummary("x", n, tuple(classes), quality), max_samples=600, num_classes=10
    )

    # Assert
    assert 0.0 <= score <= 1.0


# --- paper mode -------------------------------------------------------------------

PAPER_SELF = {"a": 0.9, "b": 0.5, "c": 0.5, "d": 0.1}
PAPER_REP = {"a": 0.1, "b": 0.8, "c": 0.8, "d": 0.9}  # scores 0.5, 0.65, 0.65, 0.5


def _paper(n: int, *, round: int = 2, declined: tuple[str, ...] = ()) -> list[str]:
    return select_clients(
        round=round,
        self_scores=PAPER_SELF,
        reputations=PAPER_REP,
        declined=declined,
        params=SelectionParams(n=n, mode="paper"),
        seed=b"",
    )


def test_paper_mode_takes_top_n_by_combined_score() -> None:
    # Execute
    selected = _paper(2)

    # Assert
    assert selected == ["b", "c"]


def test_paper_mode_breaks_ties_by_client_id() -> None:
    # Execute: a and d tie at 0.5 for the third place
    selected = _paper(3)

    # Assert
    assert selected == ["a", "b", "c"]


def test_paper_mode_round_one_uses_self_assessment_only() -> None:
    # Execute
    selected = _paper(1, round=1)

    # Assert
    assert selected == ["a"]


def test_paper_mode_skips_declined_clients() -> None:
    # Execute
    selected = _paper(2, declined=("b",))

    # Assert
    assert selected == ["a", "c"]


# --- weighted mode ----------------------------------------------------------------


def _weighted(
    *,
    seed: bytes,
    n: int = 3,
    round: int = 3,
    self_scores: dict[str, float] = EIGHT,
    reputations: dict[str, float] | None = NEUTRAL,
    declined: set[str] | frozenset[str] = frozenset({"c7"}),
    threshold: float = 0.4,
) -> list[str]:
    return select_clients(
        round=round,
        self_scores=self_scores,
        reputations=reputations,
        declined=declined,
        params=SelectionParams(n=n, threshold=threshold),
        seed=seed,
    )


def test_weighted_draw_pinned_for_zero_seed() -> None:
    # Execute
    selected = _weighted(seed=bytes(32))

    # Assert: a regression pin; the draw must be identical on every platform
    assert selected == ["c3", "c5", "c6"]


def test_weighted_draw_pinned_for_other_seed() -> None:
    # Execute
    selected = _weighted(seed=b"\x01" * 32)

    # Assert
    assert selected == ["c1", "c4", "c6"]


def test_weighted_draw_varies_with_seed() -> None:
    # Execute
    draws = {tuple(_weighted(seed=bytes([i]))) for i in range(20)}

    # Assert
    assert len(draws) > 1


def test_weighted_draw_varies_with_round() -> None:
    # Execute
    draws = {tuple(_weighted(seed=b"x", round=r)) for r in range(2, 22)}

    # Assert
    assert len(draws) > 1


def test_weighted_single_pick_follows_weights() -> None:
    # Prepare: selection probability of "a" for n = 1 is 0.9 / (0.9 + 0.1)
    scores = {"a": 0.9, "b": 0.1}

    # Execute
    picks = [
        _weighted(seed=i.to_bytes(4, "big"), n=1, round=1, self_scores=scores, declined=set())
        for i in range(2000)
    ]

    # Assert: three standard errors are 3 * sqrt(0.09 / 2000) = 0.02
    assert sum(p == ["a"] for p in picks) / 2000 == pytest.approx(0.9, abs=0.02)


def test_weighted_round_one_ignores_reputation_threshold() -> None:
    # Prepare
    reputations = dict.fromkeys(EIGHT, 0.0)

    # Execute
    selected = _weighted(seed=b"s", n=8, round=1, reputations=reputations)

    # Assert: everyone but the declined c7
    assert selected == sorted(set(EIGHT) - {"c7"})


def test_weighted_zero_score_client_only_fills_up() -> None:
    # Prepare
    scores = {"zero": 0.0, "x": 0.2, "y": 0.3}

    # Execute
    few = _weighted(seed=b"s", n=2, round=1, self_scores=scores, declined=set())
    all_ = _weighted(seed=b"s", n=3, round=1, self_scores=scores, declined=set())

    # Assert
    assert (few, all_) == (["x", "y"], ["x", "y", "zero"])


def test_missing_reputation_is_an_error() -> None:
    # Execute / Assert
    with pytest.raises(ValueError, match="c0"):
        _weighted(seed=b"s", reputations={"c1": 0.5})


@given(population=populations(), n=st.integers(1, 12), seed=st.binary(max_size=32))
def test_weighted_draw_is_deterministic(
    population: tuple[dict[str, float], dict[str, float], set[str]], n: int, seed: bytes
) -> None:
    # Prepare
    self_scores, reputations, declined = population

    # Execute
    first = _weighted(
        seed=seed, n=n, self_scores=self_scores, reputations=reputations, declined=declined
    )
    second = _weighted(
        seed=seed,
        n=n,
        self_scores=dict(reversed(self_scores.items())),
        reputations=reputations,
        declined=set(declined),
    )

    # Assert
    assert first == second


@given(population=populations(), n=st.integers(1, 12), seed=st.binary(max_size=32))
def test_weighted_picks_min_of_n_and_eligible_and_only_eligible(
    population: tuple[dict[str, float], dict[str, float], set[str]], n: int, seed: bytes
) -> None:
    # Prepare
    self_scores, reputations, declined = population
    eligible = {c for c in self_scores if c not in declined and reputations[c] >= 0.4}

    # Execute
    selected = _weighted(
        seed=seed, n=n, self_scores=self_scores, reputations=reputations, declined=declined
    )

    # Assert
    assert set(selected) <= eligible
    assert len(selected) == len(set(selected)) == min(n, len(eligible))
    assert selected == sorted(selected)


@given(population=populations(), n=st.integers(1, 12))
def test_paper_mode_never_picks_declined(
    population: tuple[dict[str, float], dict[str, float], set[str]], n: int
) -> None:
    # Prepare
    self_scores, reputations, declined = population

    # Execute
    selected = select_clients(
        round=2,
        self_scores=self_scores,
        reputations=reputations,
        declined=declined,
        params=SelectionParams(n=n, mode="paper"),
        seed=b"",
    )

    # Assert
    assert not set(selected) & declined
    assert len(selected) == min(n, len(set(self_scores) - declined))


@pytest.mark.parametrize(
    "kwargs",
    [{"n": 0}, {"n": 1, "mode": "random"}, {"n": 1, "w4": -0.1}, {"n": 1, "threshold": 1.5}],
)
def test_selection_params_reject_invalid_settings(kwargs: dict[str, object]) -> None:
    # Execute / Assert
    with pytest.raises(ValueError):
        SelectionParams(**kwargs)  # type: ignore[arg-type]
