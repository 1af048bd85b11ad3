"""Admission: the DP plan, the record cap and duplicates, as every replica checks them."""

from __future__ import annotations

import math
import re
from dataclasses import replace

import pytest
from hypothesis import given
from hypothesis import strategies as st

import chain.state
from chain.admission import plan_problems, registration_problems
from chain.records import Registration
from chain.state import ChainState, InvalidRecord
from fl.config import RunConfig
from fl.privacy import PrivacyPlan, fit_histogram
from fl.rounds import privacy_plan, record_cap
from tests.chain.blocks import commit, record_request
from tests.chain.test_records import CLIENTS, check, registration

CAP = 1_000
CONFIG = RunConfig(clients=4, frac=0.5, rounds=3, model="mlp", max_records=CAP)
LAPLACE = privacy_plan(RunConfig(clients=4, rounds=3, dp="laplace", epsilon=5.0))


def step(plan: PrivacyPlan, **changes: object) -> PrivacyPlan:
    return replace(plan, step=replace(plan.step, **changes))


# The DP plan ---------------------------------------------------------------------


def test_the_plans_of_every_mechanism_are_in_range() -> None:
    for dp in ("none", "gaussian", "laplace"):
        plan = privacy_plan(RunConfig(clients=4, rounds=3, dp=dp, epsilon=5.0))
        assert plan_problems(plan) == [], dp


@pytest.mark.parametrize(
    ("plan", "reason"),
    [
        (step(LAPLACE, noise_multiplier_or_eps0=0.0), "training step noise must be a finite"),
        (step(LAPLACE, noise_multiplier_or_eps0=-1.0), "training step noise must be a finite"),
        (step(LAPLACE, noise_multiplier_or_eps0=math.nan), "training step noise must be a finite"),
        (step(LAPLACE, noise_multiplier_or_eps0=math.inf), "training step noise must be a finite"),
        (step(LAPLACE, steps=0), "training step steps must be >= 1, got 0"),
        (step(LAPLACE, sample_rate=0.0), "training step sample rate must be in (0, 1]"),
        (step(LAPLACE, sample_rate=1.5), "training step sample rate must be in (0, 1]"),
        (step(LAPLACE, sample_rate=math.nan), "training step sample rate must be in (0, 1]"),
        (
            replace(LAPLACE, registration=replace(LAPLACE.registration, noise=0.0)),
            "registration histogram noise must be a finite number > 0, got 0.0",
        ),
    ],
)
def test_each_out_of_range_plan_field_is_named(plan: PrivacyPlan, reason: str) -> None:
    # Execute
    problems = plan_problems(plan)
    # Assert: exactly the one field, with its value
    assert len(problems) == 1
    assert problems[0].startswith(reason)


def test_a_chain_on_an_out_of_range_plan_does_not_start(monkeypatch: pytest.MonkeyPatch) -> None:
    # Prepare: the genesis' plan, as if its calibration had given zero noise
    bad = step(LAPLACE, noise_multiplier_or_eps0=0.0)
    monkeypatch.setattr(chain.state, "privacy_plan", lambda config: bad)
    # Execute / Assert: no replica, server, client or `chain verify` runs on it
    with pytest.raises(ValueError, match="DP plan is out of range: training step noise"):
        ChainState(CONFIG, clients=CLIENTS)


# The record cap ------------------------------------------------------------------


def test_the_default_cap_is_four_equal_shares() -> None:
    assert record_cap(RunConfig(clients=100, train_size=60_000)) == 2_400
    assert record_cap(CONFIG) == CAP


@pytest.mark.parametrize(
    ("histogram", "reason"),
    [
        ((CAP // 10 + 1,) * 10 + (0,), f"claims 1010 records, more than the record cap {CAP}"),
        ((10**9,) + (0,) * 10, f"count 0 is 1000000000, outside [-{CAP}, {CAP}]"),
        ((CAP + 1, -CAP - 1) + (0,) * 9, "count 0 is 1001, outside"),
        ((10,) * 10, "a registration holds 11 counts"),
    ],
)
def test_a_registration_beyond_the_cap_is_refused(histogram: tuple[int, ...], reason: str) -> None:
    # Prepare
    state = ChainState(CONFIG, clients=CLIENTS)
    # Execute / Assert
    with pytest.raises(InvalidRecord, match=f"registration of {CLIENTS[0]}: .*{re.escape(reason)}"):
        state.check_record(CLIENTS[0], Registration(CLIENTS[0], histogram))
    assert state.registrations == {}


def test_a_registration_at_the_cap_with_noisy_negative_bins_is_admitted() -> None:
    # Prepare: the cap exactly, some bins below zero (DP noise does that)
    histogram = (-3, 203, 200, 200, 200, 200, 0, 0, 0, 0, 0)
    state = ChainState(CONFIG, clients=CLIENTS)
    # Execute
    commit(state, [(CLIENTS[0], Registration(CLIENTS[0], histogram))])
    # Assert
    assert state.released_records(CLIENTS[0]) == CAP


@given(st.lists(st.integers(-(10**12), 10**12), min_size=11, max_size=11))
def test_a_fitted_release_is_always_admitted(histogram: list[int]) -> None:
    # Execute
    fitted = fit_histogram(histogram, cap=CAP)
    # Assert: an honest client is never refused, and a release within bounds is unchanged
    assert registration_problems(fitted, num_classes=10, cap=CAP) == []
    if registration_problems(histogram, num_classes=10, cap=CAP) == []:
        assert fitted == tuple(histogram)


def test_fitting_an_oversized_release_keeps_the_class_proportions() -> None:
    assert fit_histogram((3000, 1000, -5) + (0,) * 8, cap=CAP) == (753, 251, -5) + (0,) * 8


def test_an_update_claiming_other_than_its_registration_is_refused() -> None:
    # Prepare: round 1 selected; one update claims more than its client registered
    from tests.chain.test_records import registered_state, update, verdicts_for

    state = registered_state()
    selection = state.expected_selection(1)
    commit(state, [("server", selection)])
    honest = verdicts_for(state, selection.selected)
    inflated = replace(honest, updates=(replace(update(selection.selected[0]), n_samples=10**9),))
    inflated = replace(inflated, updates=inflated.updates + honest.updates[1:])
    # Execute / Assert
    with pytest.raises(InvalidRecord, match="claims 1000000000 records, its registration 100"):
        state.check_record("miner-0", inflated)


# Duplicates ----------------------------------------------------------------------


def test_the_same_registration_again_is_refused() -> None:
    # Prepare
    state = ChainState(CONFIG, clients=CLIENTS)
    commit(state, [(CLIENTS[0], registration(CLIENTS[0]))])
    # Execute / Assert: identical or not, a client registers once
    with pytest.raises(
        InvalidRecord, match=re.escape("already registered (the same registration again)")
    ):
        state.check_record(CLIENTS[0], registration(CLIENTS[0]))
    with pytest.raises(InvalidRecord, match="already registered differently"):
        state.check_record(CLIENTS[0], registration(CLIENTS[0], per_class=12))


def test_a_block_repeating_an_executed_timestamp_is_refused() -> None:
    # Prepare: client-000 registered (its timestamp 0 is executed)
    state = ChainState(CONFIG, clients=CLIENTS)
    commit(state, [(CLIENTS[0], registration(CLIENTS[0]))])
    again = record_request(CLIENTS[0], registration(CLIENTS[0]))
    # Execute
    problem = check(state, [again])
    # Assert: refused, not skipped and stored
    assert problem == f"request {CLIENTS[0]}/0: timestamp already used " + (
        "(the chain executes a submitter's timestamp once)"
    )


def test_a_block_holding_one_request_twice_is_refused() -> None:
    state = ChainState(CONFIG, clients=CLIENTS)
    twice = [record_request(CLIENTS[1], registration(CLIENTS[1]))] * 2
    assert "timestamp already used" in check(state, twice)
    assert check(state, twice[:1]) == ""
