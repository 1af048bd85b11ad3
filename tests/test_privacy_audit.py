"""``privacy audit`` end to end: the game against the real client code on MNIST.

Both directions are checked: secret noise stays below the claimed epsilon of
one participation, and a client with public noise or with noise calibrated
for half the sensitivity is caught. The confidence is 0.999 so that a run
with secret (unseeded) noise fails by chance at most once in a thousand.
"""

from __future__ import annotations

import json

import pytest
from click.testing import CliRunner

from cli import main


def audit(*args: str) -> tuple[int, dict]:
    result = CliRunner().invoke(main, ["privacy", "audit", "--quiet", *args])
    report = json.loads(result.stdout[result.stdout.index("{") :])
    return result.exit_code, report


@pytest.mark.mnist
@pytest.mark.slow
def test_audit_of_secret_noise_stays_below_the_claim(mnist_root: object) -> None:
    # Execute: the reference setting (Gaussian, epsilon 10 over 22 participations)
    code, report = audit("--quick", "--trials", "4000", "--confidence", "0.999")

    # Assert: the bound holds, and the curious miner cannot regenerate the noise
    assert code == 0 and report["passed"]
    assert 0 <= report["empirical_epsilon_lower_bound"] <= report["claimed_epsilon_per_release"]
    assert report["noise"] == "secret"
    assert not report["miner_view"]["noise_regenerated"]
    assert report["miner_view"]["regenerated_noise_median_relative_error"] > 1.0


@pytest.mark.mnist
@pytest.mark.slow
def test_audit_catches_noise_calibrated_for_half_the_sensitivity(mnist_root: object) -> None:
    # Execute
    code, report = audit(
        "--quick", "--trials", "4000", "--confidence", "0.999", "--fault", "halve-sensitivity"
    )

    # Assert
    assert code == 1 and not report["passed"]
    assert report["empirical_epsilon_lower_bound"] > report["claimed_epsilon_per_release"]


@pytest.mark.mnist
def test_audit_of_public_noise_reaches_its_ceiling(mnist_root: object) -> None:
    # Execute
    code, report = audit("--quick", "--trials", "200", "--reproducible-noise")

    # Assert: the regenerated noise explains every update; perfect guesses
    assert code == 1 and report["miner_view"]["noise_regenerated"]
    assert report["miner_view"]["regenerated_noise_median_relative_error"] < 1e-4
    assert report["empirical_epsilon_lower_bound"] == pytest.approx(report["ceiling"], rel=0.01)
    assert report["empirical_epsilon_lower_bound"] > report["claimed_epsilon_per_release"]


def test_audit_rejects_bad_options_with_a_usage_error() -> None:
    # Execute
    result = CliRunner().invoke(main, ["privacy", "audit", "--records", "0"])

    # Assert
    assert result.exit_code == 2 and "--records must be >= 1" in result.output
