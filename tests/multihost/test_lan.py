"""The fault suite: a network over seven hosts (Linux network namespaces on a bridge),
deployed from its bundles, one fault per fresh network (tests/multihost/faults.py).

``network init --host-map ... --bundles`` as docs/DEPLOY.md says, then each
host's folder run with ``sh run.sh`` inside that host's namespace: the
server, one miner per host (four: f = 1), two hosts of two clients. After
round 1 (or a client's reservation of round 2): kill -9 and restart of a
backup miner, of the primary, of the server, of a client process; SIGSTOP
then SIGCONT of the primary; the primary's link or the server's down then
up; two miners killed (the network stops without forking), then one back
(it resumes), then the other. Every run must complete: the server and the
clients end by themselves with status 0, every miner reaches the run's end
(one run waits for the miners to exit by themselves, the others stop them
with SIGTERM to skip their 30 s of serving), every miner's chain verifies
and all end on one head; each fault's own check must hold. Every namespace,
link and process is removed at the end, even on failure. Skipped where
namespaces cannot be made (not root).
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.multihost.faults import FAULTS, run_fault
from tests.multihost.netns import Lan, unavailable

pytestmark = pytest.mark.e2e
LINGER = {"kill-backup"}  # runs whose miners must also exit by themselves


@pytest.fixture
def lan() -> Iterator[Lan]:
    reason = unavailable()
    if reason:
        pytest.skip(reason)
    network = Lan()
    try:
        yield network
    finally:
        network.close()
        assert network.leftovers() == []


@pytest.mark.parametrize("fault", list(FAULTS))
def test_a_network_over_seven_hosts_recovers_from(
    lan: Lan, tmp_path: Path, mnist_root: Path, fault: str
) -> None:
    _net, record, head = run_fault(lan, tmp_path, mnist_root, fault, linger=fault in LINGER)
    assert record.started and record.ended >= record.started, record
    assert head.startswith("chain OK"), head
