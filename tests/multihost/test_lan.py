"""A network over five hosts (Linux network namespaces on a bridge), deployed from its bundles.

``network init --host-map ... --bundles`` as docs/DEPLOY.md says, then each
host's folder run with ``sh run.sh`` inside that host's namespace: the
server on 198.18.0.2, two miners on each of 198.18.0.3 and .4, two clients
on each of .20 and .21. Every node must end its run by itself (exit 0), and
every miner's chain must verify, on one head. The same on a fresh network
with a fault after round 1: the link of the host of two miners cut for 20 s
(with f = 1 the network stops, without forking, and resumes), or the
server's. Every namespace and link is removed at the end, even on failure.
Skipped where namespaces cannot be made (not root).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.multihost.netns import Lan, unavailable

ROOT = Path(__file__).resolve().parents[2]
pytestmark = pytest.mark.e2e
HOSTS = """server = "198.18.0.2"
"miner-0..miner-1" = "198.18.0.3"
"miner-2..miner-3" = "198.18.0.4"
"client-000..client-001" = "198.18.0.20"
"client-002..client-003" = "198.18.0.21"
"""
RUN = ["--model", "mlp", "--train-size", "1500", "--clients", "4", "--frac", "0.5"]
RUN += ["--rounds", "2", "--val-size", "200", "--test-size", "500", "--round-deadline", "30"]


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


class LinkCut:
    """Cuts the links of ``hosts`` once round 1 is summarised, for ``seconds``, then
    restores them (always, also when the test fails)."""

    def __init__(self, lan: Lan, hosts: tuple[str, ...], progress: Path, seconds: float) -> None:
        self.lan, self.hosts, self.progress, self.seconds = lan, hosts, progress, seconds
        self.done = threading.Event()
        self.cut_at: float | None = None
        self.thread = threading.Thread(target=self._run, daemon=True)
        self.thread.start()

    def _summarised(self) -> int:
        try:
            return int(json.loads(self.progress.read_text())["round"])
        except (OSError, ValueError, KeyError):
            return 0

    def _run(self) -> None:
        while not self.done.is_set() and self._summarised() < 1:
            time.sleep(0.1)  # polling the server's progress file
        if self.done.is_set():
            return
        for host in self.hosts:
            self.lan.cut(host, down=True)
        self.cut_at = time.monotonic()
        self.done.wait(self.seconds)  # the fault's length
        for host in self.hosts:
            self.lan.cut(host, down=False)

    def stop(self) -> None:
        self.done.set()
        self.thread.join(timeout=30)


# Faults, each on a fresh network: which hosts lose their link after round 1, for 20 s.
FAULTS = {
    "no fault": (),
    "two miners cut (the network stops, then resumes)": ("198.18.0.4",),
    "the server cut from every miner": ("198.18.0.2",),
}


@pytest.mark.parametrize("fault", list(FAULTS))
def test_a_network_over_five_hosts_runs_from_its_bundles(
    lan: Lan, tmp_path: Path, mnist_root: Path, fault: str
) -> None:
    # Prepare: the genesis and one folder per host, on "the operator's machine"
    hosts = tmp_path / "hosts.toml"
    hosts.write_text(HOSTS)
    net = tmp_path / "net"
    init = [sys.executable, str(ROOT / "cli.py"), "network", "init", "--out", str(net)]
    init += ["--host-map", str(hosts), "--bundles", *RUN]
    subprocess.run(init, check=True, capture_output=True, text=True, cwd=ROOT)
    bundles = sorted((net / "hosts").iterdir())
    assert [b.name for b in bundles] == [
        "198.18.0.2",
        "198.18.0.20",
        "198.18.0.21",
        "198.18.0.3",
        "198.18.0.4",
    ]
    for bundle in bundles:
        lan.add_host(bundle.name)
    env = {
        **os.environ,
        "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}",
        "LLBCFL_DATA": str(mnist_root),
    }
    # Execute: each host runs its own folder, miners first (docs/DEPLOY.md)
    order = ["198.18.0.3", "198.18.0.4", "198.18.0.2", "198.18.0.20", "198.18.0.21"]
    runs = {
        host: lan.spawn(
            host,
            ["sh", str(net / "hosts" / host / "run.sh")],
            env={**env, "LLBCFL_STATE": str(tmp_path / "state" / host)},
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
        )
        for host in order
    }
    progress = tmp_path / "state/198.18.0.2/server/progress.json"
    cut = LinkCut(lan, FAULTS[fault], progress, seconds=20.0) if FAULTS[fault] else None
    outputs = {}
    try:
        for host, process in runs.items():
            try:
                outputs[host], _ = process.communicate(timeout=300)
            except subprocess.TimeoutExpired:
                pytest.fail(f"host {host} did not finish; logs in {tmp_path / 'state' / host}")
    finally:
        if cut is not None:
            cut.stop()
    if cut is not None:
        assert cut.cut_at is not None, "the fault was never applied"
    # Assert: every host's nodes ended by themselves
    for host, process in runs.items():
        assert process.returncode == 0, (host, outputs[host])
        assert "every node of this bundle has exited (status 0)" in outputs[host]
    metrics = json.loads((tmp_path / "state/198.18.0.2/server/metrics.json").read_text())
    assert [r["round"] for r in metrics["rounds"]] == [1, 2]
    # ... and every miner's chain verifies, on one head
    heads = set()
    for host, miners in (("198.18.0.3", (0, 1)), ("198.18.0.4", (2, 3))):
        for i in miners:
            db = tmp_path / "state" / host / f"miner-{i}" / "chain.db"
            verify = [sys.executable, str(ROOT / "cli.py"), "chain", "verify", "--db", str(db)]
            verify += ["--genesis", str(net / "genesis.toml")]
            result = subprocess.run(verify, capture_output=True, text=True, cwd=ROOT)
            assert result.returncode == 0 and "chain OK" in result.stdout, result.stdout
            heads.add(result.stdout.strip().splitlines()[-1])
    assert len(heads) == 1, heads
