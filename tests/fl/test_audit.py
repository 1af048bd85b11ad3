"""The privacy audit's statistics (pure): confidence bounds, GDP conversion, thresholds."""

from __future__ import annotations

import math

import numpy as np
import pytest

from fl.audit import (
    ErrorCounts,
    clopper_pearson_upper,
    epsilon_lower_bound,
    error_counts,
    gdp_delta,
    gdp_epsilon,
    gdp_mu_lower_bound,
)
from fl.privacy import Release, gaussian_epsilon

# --- statistics ----------------------------------------------------------------


def test_clopper_pearson_upper_bound_pinned() -> None:
    # Execute: no error in 100 trials; 5 errors in 100 trials (one-sided 95%)
    none = clopper_pearson_upper(0, 100, alpha=0.05)
    five = clopper_pearson_upper(5, 100, alpha=0.05)

    # Assert: 1 - 0.05^(1/100), and the beta quantile
    assert none == pytest.approx(1 - 0.05 ** (1 / 100), rel=1e-12)
    assert five == pytest.approx(0.10225, abs=1e-4)


def test_model_free_bound_is_zero_for_a_coin_flip_and_high_for_a_perfect_guess() -> None:
    # Execute
    coin = epsilon_lower_bound(ErrorCounts(500, 1000, 500, 1000), delta=0.0, alpha=0.05)
    perfect = epsilon_lower_bound(ErrorCounts(0, 1000, 0, 1000), delta=0.0, alpha=0.05)

    # Assert: the perfect guesser is only limited by the number of trials
    assert coin == 0.0
    upper = clopper_pearson_upper(0, 1000, alpha=0.025)
    assert perfect == pytest.approx(math.log((1 - upper) / upper), rel=1e-12)


@pytest.mark.parametrize("mu", [0.3, 1.0, 2.5])
def test_gdp_epsilon_inverts_gdp_delta(mu: float) -> None:
    # Execute
    epsilon = gdp_epsilon(mu, delta=1e-5)

    # Assert
    assert gdp_delta(epsilon, mu) == pytest.approx(1e-5, rel=1e-6)


def test_gdp_epsilon_of_one_gaussian_release_is_just_below_the_accountants() -> None:
    # Prepare: one Gaussian step with noise multiplier 2.4 is exactly 1/2.4-GDP
    sigma = 2.4

    # Execute
    exact = gdp_epsilon(1 / sigma, delta=1e-5)
    prv = gaussian_epsilon([Release(sigma, 1.0, 1)], delta=1e-5, accountant="prv")

    # Assert: PRV is an upper bound within its error band
    assert exact <= prv <= exact + 0.1


def test_mu_lower_bound_recovers_a_gaussian_shift() -> None:
    # Prepare: 20,000 draws per side, shifted by mu = 1, threshold 0.5 (rates 0.3085)
    rng = np.random.default_rng(0)
    out, inn = rng.normal(0, 1, 20_000), rng.normal(1, 1, 20_000)
    counts = ErrorCounts(int((out >= 0.5).sum()), 20_000, int((inn < 0.5).sum()), 20_000)

    # Execute
    mu = gdp_mu_lower_bound(counts, alpha=0.05)

    # Assert: a lower bound, and a close one
    assert 0.9 < mu <= 1.0


def test_error_counts_choose_the_threshold_on_the_calibration_trials_only() -> None:
    # Prepare: calibration trials separate perfectly at 0.5; the test trials do not
    statistic = np.array([0.0, 1.0, 0.0, 1.0, 0.2, 0.6, 0.8, 0.4])
    canary_in = np.array([False, True, False, True, False, True, False, True])

    # Execute
    counts = error_counts(
        statistic, canary_in, calibration=4, bound=lambda c: -c.false_positives - c.false_negatives
    )

    # Assert: threshold 0.5, so 0.8 (out) is a false positive, 0.4 (in) a false negative
    assert counts == ErrorCounts(1, 2, 1, 2)
