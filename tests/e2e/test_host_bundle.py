"""End to end: a network run from its host bundle's run.sh (every node on 127.0.0.1).

``network init --bundles`` with every node on one host gives one bundle;
``sh run.sh`` (``llbcfl node --bundle``) with the project's ``llbcfl`` on PATH must run the whole
network to its end: every node exits 0 by itself (the server once its last
round's metrics are written, miners after serving their final blocks, the
clients once the last summary is on the chain), the state of each node is
under ``$LLBCFL_STATE``, and every miner's chain verifies.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
pytestmark = pytest.mark.e2e
RUN = ["--model", "mlp", "--train-size", "1500", "--clients", "4", "--frac", "0.5"]
RUN += ["--rounds", "2", "--val-size", "200", "--test-size", "500", "--round-deadline", "30"]


def free_base_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def test_a_host_runs_its_nodes_to_the_end_from_its_bundle(tmp_path: Path, mnist_root: Path) -> None:
    # Prepare
    net = tmp_path / "net"
    init = [sys.executable, str(ROOT / "cli.py"), "network", "init", "--out", str(net)]
    init += ["--base-port", str(free_base_port()), "--bundles", *RUN]
    subprocess.run(init, check=True, capture_output=True, text=True, cwd=ROOT)
    bundle = net / "hosts" / "127.0.0.1"
    state = tmp_path / "state"
    env = {
        **os.environ,
        "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}",
        "LLBCFL_DATA": str(mnist_root),
        "LLBCFL_STATE": str(state),
    }
    # Execute: from another working directory, as an operator would
    process = subprocess.Popen(
        ["sh", str(bundle / "run.sh")],
        cwd=tmp_path,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        start_new_session=True,
    )
    try:
        output, _ = process.communicate(timeout=300)
    except subprocess.TimeoutExpired:
        os.killpg(process.pid, signal.SIGTERM)  # the script's own session: its nodes
        output, _ = process.communicate(timeout=60)
        pytest.fail(f"run.sh did not finish:\n{output}")
    # Assert: every node exited 0 by itself; the state is where it was told to be
    assert process.returncode == 0, output
    assert "every node of this bundle has exited (status 0)" in output
    metrics = json.loads((state / "server" / "metrics.json").read_text())
    assert [r["round"] for r in metrics["rounds"]] == [1, 2]
    for i in range(4):
        verify = [sys.executable, str(ROOT / "cli.py"), "chain", "verify"]
        verify += ["--db", str(state / f"miner-{i}" / "chain.db")]
        verify += ["--genesis", str(bundle / "genesis.toml")]
        result = subprocess.run(verify, capture_output=True, text=True, cwd=ROOT)
        assert result.returncode == 0 and "chain OK" in result.stdout, result.stdout
    assert (state / "privacy-ledger.json").exists()
