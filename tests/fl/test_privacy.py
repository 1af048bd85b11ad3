"""Tests for fl.privacy (mechanisms, calibration, accounting) and fl.privacy_ledger."""

from __future__ import annotations

import json
import math
import os
import re
from pathlib import Path

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from opacus.accountants import RDPAccountant

from fl.privacy import (
    DPConfig,
    PrivacyAccountant,
    amplified_epsilon,
    calibrate_gaussian,
    calibrate_laplace,
    clip_per_sample,
    noisy_sum,
    plan_participation,
    private_gradient,
)
from fl.privacy_ledger import BudgetLedger, LedgerCorruptError

# Opacus warns when the best RDP order is the largest one (large epsilons); it
# is advice about tightness, not an error.
pytestmark = pytest.mark.filterwarnings("ignore:Optimal order is the largest alpha")


def _generator(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


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

    # Assert
    assert sigma == pytest.approx(0.8868, abs=5e-5)


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


# --- accounting -------------------------------------------------------------


def _spend_all(config: DPConfig, *, n_samples: int, batch_size: int) -> tuple[bool, bool]:
    """(every planned participation fit, one more would exceed)."""
    plan = plan_participation(config, n_samples=n_samples, batch_size=batch_size, local_epochs=1)
    accountant = PrivacyAccountant(config)
    participation = {
        "sample_rate": plan.sample_rate,
        "steps": plan.steps,
        "noise_multiplier_or_eps0": plan.noise_multiplier_or_eps0,
    }
    all_fit = True
    for _ in range(config.max_participations):
        all_fit &= not accountant.would_exceed(**participation)
        accountant.record_participation(**participation)
        all_fit &= accountant.spent_epsilon() <= config.epsilon * (1 + 1e-9)
    return all_fit, accountant.would_exceed(**participation)


@settings(max_examples=4, deadline=None)
@given(
    epsilon=st.floats(0.5, 8.0),
    n_samples=st.integers(20, 200),
    batch_size=st.integers(5, 200),
    max_participations=st.integers(1, 4),
)
def test_gaussian_budget_fits_max_participations_and_no_more(
    epsilon: float, n_samples: int, batch_size: int, max_participations: int
) -> None:
    # Prepare
    config = DPConfig("gaussian", epsilon, 1e-5, 1.0, max_participations)

    # Execute
    all_fit, one_more_exceeds = _spend_all(config, n_samples=n_samples, batch_size=batch_size)

    # Assert
    assert all_fit and one_more_exceeds


@given(
    epsilon=st.floats(0.01, 20.0),
    n_samples=st.integers(1, 5000),
    batch_size=st.integers(1, 500),
    max_participations=st.integers(1, 50),
)
def test_laplace_budget_fits_max_participations_and_no_more(
    epsilon: float, n_samples: int, batch_size: int, max_participations: int
) -> None:
    # Prepare
    config = DPConfig("laplace", epsilon, clip=1.0, max_participations=max_participations)

    # Execute
    all_fit, one_more_exceeds = _spend_all(config, n_samples=n_samples, batch_size=batch_size)

    # Assert
    assert all_fit and one_more_exceeds


def test_none_accountant_spends_nothing_and_never_runs_out() -> None:
    # Prepare
    accountant = PrivacyAccountant(DPConfig("none", math.inf))
    for _ in range(3):
        accountant.record_participation(sample_rate=0.5, steps=10, noise_multiplier_or_eps0=0.0)

    # Execute
    spent = accountant.spent_epsilon()

    # Assert
    assert spent == 0.0 and not accountant.would_exceed(
        sample_rate=0.5, steps=10, noise_multiplier_or_eps0=0.0
    )


def test_accountant_laplace_spend_pinned() -> None:
    # Prepare: two participations of 10 unamplified steps at eps0 = 0.05
    accountant = PrivacyAccountant(DPConfig("laplace", 5.0))
    for _ in range(2):
        accountant.record_participation(sample_rate=1.0, steps=10, noise_multiplier_or_eps0=0.05)

    # Execute
    spent = accountant.spent_epsilon()

    # Assert
    assert spent == pytest.approx(1.0, rel=1e-15) and accountant.participations == 2


def test_accountant_state_survives_json_round_trip() -> None:
    # Prepare
    config = DPConfig("gaussian", 4.0, 1e-5, 1.0, 3)
    original = PrivacyAccountant(config)
    original.record_participation(sample_rate=0.1, steps=20, noise_multiplier_or_eps0=1.3)
    original.record_participation(sample_rate=0.2, steps=5, noise_multiplier_or_eps0=1.1)
    restored = PrivacyAccountant(config)

    # Execute
    restored.load_state_dict(json.loads(json.dumps(original.state_dict())))

    # Assert
    assert restored.state_dict() == original.state_dict()
    assert restored.spent_epsilon() == original.spent_epsilon()


def test_accountant_refuses_state_of_another_mechanism() -> None:
    # Prepare
    laplace = PrivacyAccountant(DPConfig("laplace", 1.0))
    gaussian = PrivacyAccountant(DPConfig("gaussian", 1.0))

    # Execute / Assert
    with pytest.raises(ValueError, match="mechanism"):
        gaussian.load_state_dict(laplace.state_dict())


# --- planning ---------------------------------------------------------------


def test_plan_participation_pinned_rate_and_steps() -> None:
    # Prepare
    config = DPConfig("laplace", 2.0, clip=0.5, max_participations=4)

    # Execute: q = 64/600, one expected epoch = ceil(600/64) = 10 steps
    plan = plan_participation(config, n_samples=600, batch_size=64, local_epochs=2)

    # Assert
    eps0 = calibrate_laplace(epsilon=2.0, sample_rate=64 / 600, steps=80)
    assert (plan.sample_rate, plan.steps) == (64 / 600, 20)
    assert (plan.noise_multiplier_or_eps0, plan.noise_scale) == (eps0, 0.5 / eps0)


def test_plan_participation_caps_rate_at_one() -> None:
    # Execute
    plan = plan_participation(DPConfig("none", 1.0), n_samples=10, batch_size=64, local_epochs=3)

    # Assert
    assert (plan.sample_rate, plan.steps, plan.noise_scale) == (1.0, 3, 0.0)


def test_plan_participation_gaussian_scale_is_sigma_times_clip() -> None:
    # Prepare
    config = DPConfig("gaussian", 10.0, 1e-5, 2.0, 10)

    # Execute: 10 steps per participation, 100 in total at q = 0.1
    plan = plan_participation(config, n_samples=100, batch_size=10, local_epochs=1)

    # Assert
    sigma = calibrate_gaussian(epsilon=10.0, delta=1e-5, sample_rate=0.1, steps=100)
    assert (plan.noise_multiplier_or_eps0, plan.noise_scale) == (sigma, 2.0 * sigma)


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
    total = noisy_sum(grads, mechanism="none", scale=0.0, generator=_generator(0))

    # Assert
    assert total.tolist() == [4.0, 6.0]


def test_gaussian_noise_has_zero_mean_and_variance_scale_squared() -> None:
    # Prepare: 200k coordinates of one noised sum of zeros
    zeros = torch.zeros(1, 200_000, dtype=torch.float64)

    # Execute
    noise = noisy_sum(zeros, mechanism="gaussian", scale=2.0, generator=_generator(1))

    # Assert: standard errors are 2/sqrt(n) = 0.0045 for the mean, about 0.0127 for the variance
    assert abs(noise.mean().item()) < 0.02
    assert noise.var().item() == pytest.approx(4.0, rel=0.02)


def test_laplace_noise_has_zero_mean_and_variance_two_scale_squared() -> None:
    # Prepare
    zeros = torch.zeros(1, 200_000, dtype=torch.float64)

    # Execute
    noise = noisy_sum(zeros, mechanism="laplace", scale=1.5, generator=_generator(2))

    # Assert: Var = 2 b^2 = 4.5; Laplace kurtosis 6 gives a variance SE of about 0.027
    assert abs(noise.mean().item()) < 0.02
    assert noise.var().item() == pytest.approx(4.5, rel=0.03)
    assert noise.abs().mean().item() == pytest.approx(1.5, rel=0.01)  # E|X| = b


@pytest.mark.parametrize("mechanism", ["gaussian", "laplace"])
def test_same_generator_seed_gives_identical_noise(mechanism: str) -> None:
    # Prepare
    grads = torch.ones(4, 10)

    # Execute
    first = noisy_sum(grads, mechanism=mechanism, scale=1.0, generator=_generator(7))  # type: ignore[arg-type]
    second = noisy_sum(grads, mechanism=mechanism, scale=1.0, generator=_generator(7))  # type: ignore[arg-type]

    # Assert
    assert torch.equal(first, second)


@pytest.mark.parametrize("mechanism", ["gaussian", "laplace"])
def test_noise_does_not_touch_global_rng(mechanism: str) -> None:
    # Prepare
    before = torch.random.get_rng_state()

    # Execute
    noisy_sum(torch.ones(4, 10), mechanism=mechanism, scale=1.0, generator=_generator(3))  # type: ignore[arg-type]

    # Assert
    assert torch.equal(torch.random.get_rng_state(), before)


def test_noisy_sum_keeps_the_list_form() -> None:
    # Prepare
    parts = [torch.zeros(3, 2, 2), torch.zeros(3, 5)]

    # Execute
    noised = noisy_sum(parts, mechanism="laplace", scale=1.0, generator=_generator(4))

    # Assert
    assert [tuple(t.shape) for t in noised] == [(2, 2), (5,)]


def test_private_gradient_divides_by_expected_batch_size() -> None:
    # Prepare: q * N = 0.5 * 8 = 4 expected records, realised batch of 2
    config = DPConfig("none", math.inf)
    plan = plan_participation(config, n_samples=8, batch_size=4, local_epochs=1)
    grads = torch.tensor([[2.0, 4.0], [6.0, 8.0]])

    # Execute
    gradient = private_gradient(
        grads, config=config, plan=plan, n_samples=8, generator=_generator(0)
    )

    # Assert
    assert gradient.tolist() == [2.0, 3.0]


# --- ledger -----------------------------------------------------------------


def _state(spent: float) -> dict[str, object]:
    return {"mechanism": "laplace", "participations": 1, "history": [[spent, 1.0, 1]]}


def test_ledger_round_trip_survives_restart(tmp_path: Path) -> None:
    # Prepare
    path = tmp_path / "ledger.json"
    BudgetLedger(path).record("client-1", 1, _state(0.1))
    BudgetLedger(path).record("client-1", 3, _state(0.2))

    # Execute: a fresh object stands for a restarted process
    entry = BudgetLedger(path).entry("client-1")

    # Assert
    assert entry is not None
    assert (entry.accountant, entry.rounds) == (_state(0.2), (1, 3))


def test_ledger_missing_file_is_empty(tmp_path: Path) -> None:
    # Execute
    entries = BudgetLedger(tmp_path / "absent.json").load()

    # Assert
    assert entries == {}


def test_ledger_refuses_a_round_not_after_the_last(tmp_path: Path) -> None:
    # Prepare
    ledger = BudgetLedger(tmp_path / "ledger.json")
    ledger.record("client-1", 2, _state(0.1))

    # Execute / Assert
    with pytest.raises(ValueError, match="round 2"):
        ledger.record("client-1", 2, _state(0.2))


def test_ledger_corrupt_file_error_names_the_file(tmp_path: Path) -> None:
    # Prepare
    path = tmp_path / "ledger.json"
    path.write_text('{"version": 1, "clients": ', encoding="utf-8")

    # Execute / Assert
    with pytest.raises(LedgerCorruptError, match=re.escape(str(path))):
        BudgetLedger(path).load()


def test_ledger_malformed_structure_is_corrupt(tmp_path: Path) -> None:
    # Prepare
    path = tmp_path / "ledger.json"
    path.write_text('{"version": 1, "clients": {"c": {"rounds": "1"}}}', encoding="utf-8")

    # Execute / Assert
    with pytest.raises(LedgerCorruptError, match="'c'"):
        BudgetLedger(path).load()


def test_ledger_failed_replace_keeps_old_file_and_no_temp(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Prepare
    path = tmp_path / "ledger.json"
    ledger = BudgetLedger(path)
    ledger.record("client-1", 1, _state(0.1))
    before = path.read_bytes()

    def crash(src: str, dst: str) -> None:
        raise OSError("simulated crash before rename")

    monkeypatch.setattr(os, "replace", crash)

    # Execute
    with pytest.raises(OSError, match="simulated"):
        ledger.record("client-1", 2, _state(0.2))

    # Assert
    assert path.read_bytes() == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ledger.json"]


def test_ledger_write_leaves_only_the_ledger_file(tmp_path: Path) -> None:
    # Prepare
    ledger = BudgetLedger(tmp_path / "ledger.json")

    # Execute
    ledger.record("client-1", 1, _state(0.1))
    ledger.record("client-2", 1, _state(0.3))

    # Assert
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ledger.json"]
