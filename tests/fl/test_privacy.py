"""Tests for fl.privacy: noise sources, calibration, accounting, the registration release."""

from __future__ import annotations

import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from opacus.accountants import RDPAccountant

from fl.privacy import (
    DPConfig,
    PrivacyAccountant,
    Release,
    SecretNoise,
    SeededNoise,
    StepPlan,
    amplified_epsilon,
    calibrate_gaussian,
    calibrate_laplace,
    clip_per_sample,
    composed_epsilon,
    gaussian_epsilon,
    label_histogram,
    noisy_sum,
    plan_privacy,
    poisson_mask,
    private_gradient,
    public_schedule,
    release_histogram,
    released_count,
)
from fl.selection import summary_from_histogram

# Opacus warns when the best RDP order is the largest one (large epsilons); it
# is advice about tightness, not an error.
pytestmark = pytest.mark.filterwarnings("ignore:Optimal order is the largest alpha")


def _seeded(seed: int) -> SeededNoise:
    return SeededNoise(torch.Generator().manual_seed(seed))


# --- DPConfig ---------------------------------------------------------------


@pytest.mark.parametrize(
    "kwargs",
    [
        {"mechanism": "exponential", "epsilon": 1.0},
        {"mechanism": "gaussian", "epsilon": 0.0},
        {"mechanism": "gaussian", "epsilon": math.nan},
        {"mechanism": "laplace", "epsilon": math.inf},
        {"mechanism": "gaussian", "epsilon": 1.0, "delta": 0.0},
        {"mechanism": "gaussian", "epsilon": 1.0, "delta": 1.0},
        {"mechanism": "gaussian", "epsilon": 1.0, "clip": 0.0},
        {"mechanism": "gaussian", "epsilon": 1.0, "max_participations": 0},
        {"mechanism": "gaussian", "epsilon": 1.0, "registration_share": 0.0},
        {"mechanism": "gaussian", "epsilon": 1.0, "registration_share": 1.0},
        {"mechanism": "gaussian", "epsilon": 1.0, "accountant": "moments"},
    ],
)
def test_dpconfig_rejects_invalid_settings(kwargs: dict[str, object]) -> None:
    # Execute / Assert
    with pytest.raises(ValueError):
        DPConfig(**kwargs)  # type: ignore[arg-type]


def test_dpconfig_none_accepts_infinite_epsilon() -> None:
    # Execute
    config = DPConfig(mechanism="none", epsilon=math.inf)

    # Assert
    assert config.mechanism == "none"


# --- calibration ------------------------------------------------------------


def test_calibrate_gaussian_pinned_noise_multiplier() -> None:
    # Execute
    sigma = calibrate_gaussian(epsilon=10.0, delta=1e-5, sample_rate=0.1, steps=100)

    # Assert: Opacus's get_noise_multiplier gives 0.8868; both searches stop
    # anywhere in the band that spends [9.99, 10], here sigma in [0.8868, 0.8877]
    assert sigma == pytest.approx(0.8871, abs=1e-4)


def test_calibrate_gaussian_with_prv_needs_less_noise_and_spends_the_target() -> None:
    # Execute: 22 full-batch steps, as in the reference setting
    rdp = calibrate_gaussian(epsilon=10.0, delta=1e-5, sample_rate=1.0, steps=22)
    prv = calibrate_gaussian(epsilon=10.0, delta=1e-5, sample_rate=1.0, steps=22, accountant="prv")

    # Assert: PRV is tighter; each spends the target within its tolerance
    spent = gaussian_epsilon([Release(prv, 1.0, 22)], delta=1e-5, accountant="prv")
    assert prv < rdp
    assert 10.0 - 0.01 <= spent <= 10.0


def test_calibrate_gaussian_with_a_prefix_leaves_room_for_it() -> None:
    # Prepare: a registration release before the steps
    prefix = (Release(8.0, 1.0, 1),)

    # Execute
    alone = calibrate_gaussian(epsilon=5.0, delta=1e-5, sample_rate=1.0, steps=10)
    after = calibrate_gaussian(epsilon=5.0, delta=1e-5, sample_rate=1.0, steps=10, prefix=prefix)

    # Assert
    total = gaussian_epsilon([*prefix, Release(after, 1.0, 10)], delta=1e-5, accountant="rdp")
    assert after > alone
    assert 5.0 - 0.01 <= total <= 5.0


def test_calibrate_gaussian_spends_target_within_tolerance_under_opacus() -> None:
    # Prepare
    sigma = calibrate_gaussian(epsilon=10.0, delta=1e-5, sample_rate=0.1, steps=100)
    accountant = RDPAccountant()
    for _ in range(100):
        accountant.step(noise_multiplier=sigma, sample_rate=0.1)

    # Execute
    achieved = accountant.get_epsilon(delta=1e-5)

    # Assert
    assert 10.0 - 0.01 <= achieved <= 10.0


def test_calibrate_laplace_without_subsampling_splits_budget_evenly() -> None:
    # Execute
    eps0 = calibrate_laplace(epsilon=3.0, sample_rate=1.0, steps=7)

    # Assert
    assert eps0 == 3.0 / 7


def test_calibrate_laplace_pinned_with_subsampling() -> None:
    # Execute: ln(1 + (e^0.1 - 1) / 0.5) = ln(1.2103418361512954)
    eps0 = calibrate_laplace(epsilon=1.0, sample_rate=0.5, steps=10)

    # Assert
    assert eps0 == pytest.approx(0.190902828926382, rel=1e-13)


@given(
    epsilon=st.floats(0.01, 50.0),
    sample_rate=st.floats(1e-4, 1.0),
    steps=st.integers(1, 10_000),
)
def test_calibrate_laplace_composes_to_exactly_the_budget(
    epsilon: float, sample_rate: float, steps: int
) -> None:
    # Prepare
    eps0 = calibrate_laplace(epsilon=epsilon, sample_rate=sample_rate, steps=steps)

    # Execute
    spent = steps * amplified_epsilon(eps0=eps0, sample_rate=sample_rate)

    # Assert
    assert spent == pytest.approx(epsilon, rel=1e-9)


# --- planning and accounting ------------------------------------------------


def test_public_schedule_comes_from_public_numbers_only() -> None:
    # Execute: q = 64/600, one expected epoch = ceil(600/64) = 10 steps
    schedule = public_schedule(expected_records=600, batch_size=64, local_epochs=2)

    # Assert
    assert schedule == (64 / 600, 20)


def test_public_schedule_caps_rate_at_one() -> None:
    # Execute
    schedule = public_schedule(expected_records=10, batch_size=64, local_epochs=3)

    # Assert
    assert schedule == (1.0, 3)


def test_laplace_plan_gives_the_registration_its_share_and_training_the_rest() -> None:
    # Prepare
    config = DPConfig("laplace", 2.0, clip=0.5, max_participations=4, registration_share=0.1)

    # Execute
    plan = plan_privacy(config, sample_rate=64 / 600, steps=20)

    # Assert
    eps0 = calibrate_laplace(epsilon=1.8, sample_rate=64 / 600, steps=80)
    assert plan.registration == Release(0.2, 1.0, 1)
    assert plan.histogram_scale == pytest.approx(5.0)
    assert (plan.step.noise_multiplier_or_eps0, plan.step.noise_scale) == (eps0, 0.5 / eps0)


def test_gaussian_plan_picks_the_accountant_that_needs_less_noise() -> None:
    # Prepare
    config = DPConfig("gaussian", 10.0, 1e-5, 2.0, 22)

    # Execute
    auto = plan_privacy(config, sample_rate=1.0, steps=1)
    rdp = plan_privacy(
        DPConfig("gaussian", 10.0, 1e-5, 2.0, 22, accountant="rdp"), sample_rate=1.0, steps=1
    )

    # Assert: at q = 1 PRV is the tighter; the scale is sigma times the clip
    assert auto.accountant == "prv"
    assert auto.step.noise_multiplier_or_eps0 < rdp.step.noise_multiplier_or_eps0
    assert auto.step.noise_scale == 2.0 * auto.step.noise_multiplier_or_eps0


def _spend_all(config: DPConfig, *, sample_rate: float, steps: int) -> tuple[bool, bool]:
    """(the registration and every planned participation fit, one more would exceed)."""
    plan = plan_privacy(config, sample_rate=sample_rate, steps=steps)
    accountant = PrivacyAccountant(config, plan)
    accountant.record_registration()
    all_fit = accountant.spent_epsilon() <= config.epsilon
    for _ in range(config.max_participations):
        all_fit &= not accountant.would_exceed()
        accountant.record_participation()
        all_fit &= accountant.spent_epsilon() <= config.epsilon * (1 + 1e-9)
    return all_fit, accountant.would_exceed()


@settings(max_examples=4, deadline=None)
@given(
    epsilon=st.floats(0.5, 8.0),
    sample_rate=st.floats(0.05, 1.0),
    steps=st.integers(1, 20),
    max_participations=st.integers(1, 4),
)
def test_gaussian_budget_fits_registration_and_max_participations_and_no_more(
    epsilon: float, sample_rate: float, steps: int, max_participations: int
) -> None:
    # Prepare
    config = DPConfig("gaussian", epsilon, 1e-5, 1.0, max_participations)

    # Execute
    all_fit, one_more_exceeds = _spend_all(config, sample_rate=sample_rate, steps=steps)

    # Assert
    assert all_fit and one_more_exceeds


@given(
    epsilon=st.floats(0.01, 20.0),
    sample_rate=st.floats(1e-3, 1.0),
    steps=st.integers(1, 500),
    max_participations=st.integers(1, 50),
)
def test_laplace_budget_fits_registration_and_max_participations_and_no_more(
    epsilon: float, sample_rate: float, steps: int, max_participations: int
) -> None:
    # Prepare
    config = DPConfig("laplace", epsilon, clip=1.0, max_participations=max_participations)

    # Execute
    all_fit, one_more_exceeds = _spend_all(config, sample_rate=sample_rate, steps=steps)

    # Assert
    assert all_fit and one_more_exceeds


def test_none_accountant_spends_nothing_and_never_runs_out() -> None:
    # Prepare
    config = DPConfig("none", math.inf)
    accountant = PrivacyAccountant(config, plan_privacy(config, sample_rate=0.5, steps=10))
    accountant.record_registration()
    for _ in range(3):
        accountant.record_participation()

    # Execute
    spent = accountant.spent_epsilon()

    # Assert
    assert spent == 0.0 and not accountant.would_exceed()


def test_accountant_laplace_spend_pinned() -> None:
    # Prepare: registration 0.25, then two participations of 10 unamplified steps
    config = DPConfig("laplace", 5.0, max_participations=2, registration_share=0.05)
    accountant = PrivacyAccountant(config, plan_privacy(config, sample_rate=1.0, steps=10))
    accountant.record_registration()
    for _ in range(2):
        accountant.record_participation()

    # Execute
    spent = accountant.spent_epsilon()

    # Assert
    assert spent == pytest.approx(5.0, rel=1e-12) and accountant.participations == 2


def test_accountant_counts_the_registration_once() -> None:
    # Prepare
    config = DPConfig("gaussian", 4.0)
    accountant = PrivacyAccountant(config, plan_privacy(config, sample_rate=1.0, steps=1))
    accountant.record_registration()

    # Execute / Assert
    with pytest.raises(ValueError, match="already"):
        accountant.record_registration()


def test_accountant_reports_both_gaussian_accountants() -> None:
    # Prepare
    config = DPConfig("gaussian", 4.0, max_participations=3)
    accountant = PrivacyAccountant(config, plan_privacy(config, sample_rate=1.0, steps=1))
    accountant.record_registration()
    accountant.record_participation()

    # Execute
    rdp = accountant.spent_epsilon(accountant="rdp")
    prv = accountant.spent_epsilon(accountant="prv")

    # Assert: the plan's accountant is the default; RDP is the looser bound
    assert accountant.spent_epsilon() == prv < rdp


def test_composed_epsilon_adds_mechanisms_by_basic_composition() -> None:
    # Prepare: runs on the same data with two mechanisms
    gaussian = [("gaussian", Release(2.0, 1.0, 3))]
    laplace = [("laplace", Release(0.5, 1.0, 2)), ("laplace", Release(0.25, 1.0, 1))]

    # Execute
    total = composed_epsilon([*gaussian, *laplace], delta=1e-5, accountant="rdp")

    # Assert
    alone = gaussian_epsilon([Release(2.0, 1.0, 3)], delta=1e-5, accountant="rdp")
    assert total == pytest.approx(alone + 1.25, rel=1e-12)


# --- the registration release -----------------------------------------------


def test_label_histogram_counts_classes_and_invalid_labels() -> None:
    # Execute
    counts = label_histogram(torch.tensor([0, 2, 2, 9, -1, 12]), num_classes=10)

    # Assert
    assert counts.tolist() == [1, 0, 2, 0, 0, 0, 0, 0, 0, 1, 2]


def test_histogram_without_dp_is_exact() -> None:
    # Prepare
    config = DPConfig("none", math.inf)
    plan = plan_privacy(config, sample_rate=1.0, steps=1)

    # Execute
    released = release_histogram(
        torch.tensor([3, 3, 5]), num_classes=10, plan=plan, noise=SecretNoise()
    )

    # Assert
    assert released == (0, 0, 0, 2, 0, 1, 0, 0, 0, 0, 0) and released_count(released) == 3


def test_gaussian_histogram_noise_has_the_planned_spread() -> None:
    # Prepare: 2,000 releases of an empty histogram
    config = DPConfig("gaussian", 2.0, max_participations=5)
    plan = plan_privacy(config, sample_rate=1.0, steps=1)
    noise = _seeded(5)

    # Execute
    counts = torch.tensor(
        [
            release_histogram(
                torch.tensor([], dtype=torch.int64), num_classes=10, plan=plan, noise=noise
            )
            for _ in range(2000)
        ],
        dtype=torch.float64,
    )

    # Assert: rounding adds 1/12 to the variance
    assert counts.std().item() == pytest.approx(math.sqrt(plan.histogram_sd**2 + 1 / 12), rel=0.03)
    assert abs(counts.mean().item()) < 0.1 * plan.histogram_sd


def test_summary_from_a_histogram_uses_counts_threshold_and_invalid_bin() -> None:
    # Execute
    summary = summary_from_histogram("c", (50, 3, -4, 0, 0, 0, 0, 0, 0, 30, 20), class_threshold=10)

    # Assert: size is the raw sum, quality the share of valid non-negative counts
    assert summary.n_samples == 99
    assert summary.classes_present == (0, 9)
    assert summary.quality == pytest.approx(83 / 103)


# --- clipping ---------------------------------------------------------------

_grad_rows = st.lists(
    st.lists(st.floats(-1e3, 1e3), min_size=3, max_size=3), min_size=1, max_size=6
)


@pytest.mark.parametrize(("norm", "order"), [("l1", 1), ("l2", 2)])
@given(rows=_grad_rows, bound=st.floats(0.01, 10.0))
def test_clipped_norms_never_exceed_bound(
    norm: str, order: int, rows: list[list[float]], bound: float
) -> None:
    # Prepare
    grads = torch.tensor(rows, dtype=torch.float64)

    # Execute
    clipped = clip_per_sample(grads, norm=norm, bound=bound)  # type: ignore[arg-type]

    # Assert
    norms = torch.linalg.vector_norm(clipped, ord=order, dim=1)
    assert bool((norms <= bound * (1 + 1e-12)).all())


def test_clipping_leaves_small_gradients_untouched() -> None:
    # Prepare: L2 norms 0.5 and 0.0 are within the bound 1.0
    grads = torch.tensor([[0.3, 0.4], [0.0, 0.0]], dtype=torch.float64)

    # Execute
    clipped = clip_per_sample(grads, norm="l2", bound=1.0)

    # Assert
    assert torch.equal(clipped, grads)


def test_clipping_scales_large_gradient_onto_bound() -> None:
    # Prepare: L1 norm 8, bound 2 -> factor 1/4
    grads = torch.tensor([[3.0, -5.0]], dtype=torch.float64)

    # Execute
    clipped = clip_per_sample(grads, norm="l1", bound=2.0)

    # Assert
    assert clipped.tolist() == [[0.75, -1.25]]


def test_clipping_per_parameter_list_uses_joint_norm() -> None:
    # Prepare: the same two samples, flat and split into a [B, 2] and a [B, 1, 1] parameter
    flat = torch.tensor([[3.0, 4.0, 12.0], [0.1, 0.1, 0.1]], dtype=torch.float64)
    parts = [flat[:, :2], flat[:, 2:].reshape(2, 1, 1)]

    # Execute
    clipped_parts = clip_per_sample(parts, norm="l2", bound=1.0)

    # Assert
    rejoined = torch.cat([clipped_parts[0], clipped_parts[1].reshape(2, 1)], dim=1)
    assert torch.allclose(rejoined, clip_per_sample(flat, norm="l2", bound=1.0), atol=0, rtol=0)


# --- noise ------------------------------------------------------------------


def test_noisy_sum_without_mechanism_is_the_plain_sum() -> None:
    # Prepare
    grads = torch.tensor([[1.0, 2.0], [3.0, 4.0]])

    # Execute
    total = noisy_sum(grads, mechanism="none", scale=0.0, noise=SecretNoise())

    # Assert
    assert total.tolist() == [4.0, 6.0]


@pytest.mark.parametrize("source", [SecretNoise(), _seeded(1)], ids=["secret", "seeded"])
def test_gaussian_noise_has_zero_mean_and_variance_scale_squared(source: object) -> None:
    # Prepare: 200k coordinates of one noised sum of zeros
    zeros = torch.zeros(1, 200_000, dtype=torch.float64)

    # Execute
    noise = noisy_sum(zeros, mechanism="gaussian", scale=2.0, noise=source)  # type: ignore[arg-type]

    # Assert: standard errors are 2/sqrt(n) = 0.0045 for the mean, about 0.0127 for the variance
    assert abs(noise.mean().item()) < 0.02
    assert noise.var().item() == pytest.approx(4.0, rel=0.02)
    # Fourth moment of a normal: 3 sigma^4 (a sum of uniforms would fall short)
    assert (noise**4).mean().item() == pytest.approx(48.0, rel=0.05)


@pytest.mark.parametrize("source", [SecretNoise(), _seeded(2)], ids=["secret", "seeded"])
def test_laplace_noise_has_zero_mean_and_variance_two_scale_squared(source: object) -> None:
    # Prepare
    zeros = torch.zeros(1, 200_000, dtype=torch.float64)

    # Execute
    noise = noisy_sum(zeros, mechanism="laplace", scale=1.5, noise=source)  # type: ignore[arg-type]

    # Assert: Var = 2 b^2 = 4.5; Laplace kurtosis 6 gives a variance SE of about 0.027
    assert abs(noise.mean().item()) < 0.02
    assert noise.var().item() == pytest.approx(4.5, rel=0.03)
    assert noise.abs().mean().item() == pytest.approx(1.5, rel=0.01)  # E|X| = b


def test_secret_uniforms_cover_the_unit_interval_evenly() -> None:
    # Execute
    u = SecretNoise().uniform(100_000)

    # Assert: ten equal bins, each 10% within 5 standard errors (0.0047)
    counts = torch.histc(u, bins=10, min=0.0, max=1.0) / len(u)
    assert float(u.min()) >= 0.0 and float(u.max()) < 1.0
    assert bool(((counts - 0.1).abs() < 0.005).all())


@pytest.mark.parametrize("mechanism", ["gaussian", "laplace"])
def test_seeded_noise_repeats_and_secret_noise_never_does(mechanism: str) -> None:
    # Prepare
    grads = torch.ones(4, 10)

    # Execute
    seeded = [noisy_sum(grads, mechanism=mechanism, scale=1.0, noise=_seeded(7)) for _ in range(2)]  # type: ignore[arg-type]
    secret = [
        noisy_sum(grads, mechanism=mechanism, scale=1.0, noise=SecretNoise()) for _ in range(2)
    ]  # type: ignore[arg-type]

    # Assert
    assert torch.equal(seeded[0], seeded[1])
    assert not torch.equal(secret[0], secret[1])
    assert not torch.equal(secret[0], seeded[0])


@pytest.mark.parametrize("mechanism", ["gaussian", "laplace"])
def test_noise_does_not_touch_global_rng(mechanism: str) -> None:
    # Prepare
    before = torch.random.get_rng_state()

    # Execute
    for source in (SecretNoise(), _seeded(3)):
        noisy_sum(torch.ones(4, 10), mechanism=mechanism, scale=1.0, noise=source)  # type: ignore[arg-type]

    # Assert
    assert torch.equal(torch.random.get_rng_state(), before)


def test_noisy_sum_keeps_the_list_form() -> None:
    # Prepare
    parts = [torch.zeros(3, 2, 2), torch.zeros(3, 5)]

    # Execute
    noised = noisy_sum(parts, mechanism="laplace", scale=1.0, noise=_seeded(4))

    # Assert
    assert [tuple(t.shape) for t in noised] == [(2, 2), (5,)]


def test_private_gradient_divides_by_the_released_count_times_the_rate() -> None:
    # Prepare: q * N~ = 0.5 * 8 = 4, realised batch of 2, exact N unknown to the step
    config = DPConfig("none", math.inf)
    plan = StepPlan(0.5, 1, 0.0, 0.0)
    grads = torch.tensor([[2.0, 4.0], [6.0, 8.0]])

    # Execute
    gradient = private_gradient(
        grads, config=config, plan=plan, released_records=8, noise=SecretNoise()
    )

    # Assert
    assert gradient.tolist() == [2.0, 3.0]


def test_poisson_mask_at_rate_one_takes_everyone_and_draws_nothing() -> None:
    # Prepare
    source = _seeded(9)
    state = source.generator.get_state()

    # Execute
    chosen = poisson_mask(5, sample_rate=1.0, noise=source)

    # Assert
    assert chosen.tolist() == [0, 1, 2, 3, 4]
    assert torch.equal(source.generator.get_state(), state)


def test_poisson_mask_samples_at_its_rate() -> None:
    # Execute
    chosen = poisson_mask(100_000, sample_rate=0.3, noise=SecretNoise())

    # Assert: standard error 0.00145
    assert len(chosen) / 100_000 == pytest.approx(0.3, abs=0.008)
