"""A short real-MNIST run of the simulator through the CLI."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]


@pytest.mark.mnist
def test_short_simulation_exceeds_85_percent(mnist_root, tmp_path):
    # Prepare
    metrics = tmp_path / "run.json"
    cmd = [
        sys.executable,
        str(REPO / "cli.py"),
        "simulate",
        "--data-dir",
        str(mnist_root),
        "--clients",
        "10",
        "--frac",
        "0.5",
        "--rounds",
        "3",
        "--local-epochs",
        "2",
        "--batch-size",
        "20",
        "--lr",
        "0.05",
        "--train-size",
        "12000",
        "--test-size",
        "2000",
        "--metrics-out",
        str(metrics),
        "--plot",
        str(tmp_path / "run.png"),
        "--quiet",
    ]
    # Execute
    subprocess.run(cmd, check=True, cwd=tmp_path, timeout=300)
    # Assert
    doc = json.loads(metrics.read_text())
    accuracies = [r["accuracy"] for r in doc["rounds"]]
    assert len(accuracies) == 3
    assert accuracies[-1] > 0.85
    assert accuracies[-1] > accuracies[0]
    assert doc["config"]["clients"] == 10
    assert set(doc["rounds"][0]) >= {
        "round",
        "accuracy",
        "loss",
        "selected",
        "accepted",
        "rejected",
        "epsilon_spent_max",
        "seconds",
    }
    assert (tmp_path / "run.png").stat().st_size > 0
