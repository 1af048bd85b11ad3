"""The attacker every live network of this folder is attacked with (its module's ``network``)."""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from tests.adversarial.attacker import Attacker
from tests.adversarial.live import LiveNetwork


@pytest.fixture(scope="module")
def attacker(network: LiveNetwork) -> Iterator[Attacker]:
    attacker = Attacker(network.run_dir)
    try:
        yield attacker
    finally:
        attacker.close()
