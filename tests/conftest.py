"""Shared fixtures: the real-MNIST root (tests needing it skip without it)."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from fl.data import MNIST_FILES, find_file, resolve_data_root

# Results are bit-identical only for equal thread counts; the CLI defaults to 1.
torch.set_num_threads(1)


@pytest.fixture(scope="session")
def mnist_root() -> Path:
    root = resolve_data_root(None).resolve()
    missing = [f.name for f in MNIST_FILES if find_file(root, f.name) is None]
    if missing:
        pytest.skip(
            f"real MNIST not found under {root}/MNIST/raw (missing {', '.join(missing)}); "
            "set LLBCFL_DATA to a folder holding MNIST/raw/ to run this test"
        )
    return root


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    """Every test under tests/e2e/ starts real node processes: mark it ``e2e``; every
    test under tests/adversarial/ attacks a live network of them: mark it ``adversarial``."""
    for item in items:
        if "e2e" in item.path.parts:
            item.add_marker(pytest.mark.e2e)
        if "adversarial" in item.path.parts:
            item.add_marker(pytest.mark.adversarial)
