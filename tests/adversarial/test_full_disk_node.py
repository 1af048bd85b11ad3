"""End to end: a miner process (``cli.py node``) whose chain is on a tmpfs that fills.

One miner of a four-miner genesis runs alone, its ``chain.db`` and ``blobs/``
on a 4 MiB tmpfs, its log elsewhere. A client's registration waits in its
pool; the tmpfs is filled; the view change that follows cannot be stored.
The process must stay up, say so once in its log (no traceback), report
``read_only`` in ``Node.Status``, refuse a submission with RESOURCE_EXHAUSTED,
and leave read-only mode by itself once the tmpfs has room again. Needs root
(mount) and the real MNIST (the miner's validation split).
"""

from __future__ import annotations

import asyncio
import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

import grpc
import pytest

from chain.records import Registration
from fl.config import RunConfig
from node.daemon import signed_record
from node.genesis import init_network, key_path
from node.identity import load_identity
from proto import llbcfl_pb2 as pb
from proto import llbcfl_pb2_grpc as pb_grpc
from tests.node.test_full_disk_tmpfs import fill, tiny_disk  # noqa: F401 (a fixture)

ROOT = Path(__file__).resolve().parents[2]
RUN = RunConfig(clients=2, frac=0.5, rounds=1, model="mlp", val_size=50, test_size=50)
HISTOGRAM = (5,) * 10 + (0,)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


async def status(address: str) -> pb.NodeStatus | None:
    try:
        async with grpc.aio.insecure_channel(address) as ch:
            return await pb_grpc.NodeStub(ch).Status(pb.StatusRequest(), timeout=2)
    except grpc.aio.AioRpcError:
        return None


async def submit(address: str, envelope: pb.Envelope) -> grpc.StatusCode:
    try:
        async with grpc.aio.insecure_channel(address) as ch:
            await pb_grpc.MinerStub(ch).Submit(envelope, timeout=5)
    except grpc.aio.AioRpcError as exc:
        return exc.code()
    return grpc.StatusCode.OK


def wait_until(
    process: subprocess.Popen, address: str, what: str, ok: Callable[[pb.NodeStatus], bool]
) -> pb.NodeStatus:
    """Poll ``Node.Status`` until ``ok`` (another process: a condition with a deadline)."""
    deadline = time.monotonic() + 90
    while time.monotonic() < deadline:
        assert process.poll() is None, f"the miner exited ({process.returncode}) waiting for {what}"
        reply = asyncio.run(status(address))
        if reply is not None and ok(reply):
            return reply
        time.sleep(0.2)
    pytest.fail(f"never saw {what}")


@pytest.mark.slow
def test_a_miner_process_on_a_full_disk_stays_up_read_only_and_recovers(
    tmp_path: Path,
    tiny_disk: Path,  # noqa: F811 (the fixture imported above)
    mnist_root: Path,
) -> None:
    # Prepare: a genesis with miner-1 on a free port; miner-1 started alone
    address = f"127.0.0.1:{free_port()}"
    init_network(
        tmp_path / "net",
        run=RUN,
        base_port=free_port(),
        hosts={"default": "127.0.0.1", "miner-1": address},
        tls=False,
    )
    clients = [load_identity(key_path(tmp_path / "net", f"client-00{i}")) for i in (0, 1)]
    envelopes = [signed_record(c, Registration(c.node_id, HISTOGRAM)) for c in clients]
    command = [
        sys.executable,
        str(ROOT / "cli.py"),
        "node",
        "--role",
        "miner",
        "--genesis",
        str(tmp_path / "net" / "genesis.toml"),
        "--key",
        str(key_path(tmp_path / "net", "miner-1")),
        "--db",
        str(tiny_disk / "chain.db"),
        "--run-dir",
        str(tiny_disk / "miner-1"),
        "--data-dir",
        str(mnist_root),
        "--stay",
    ]
    log_file = tmp_path / "miner-1.log"
    with open(log_file, "wb") as log:
        process = subprocess.Popen(
            command, cwd=ROOT, stdout=log, stderr=subprocess.STDOUT, start_new_session=True
        )
    try:
        wait_until(process, address, "the miner serving", lambda s: not s.read_only)
        filler = fill(tiny_disk)
        # Execute: a registration waits in the pool; its view change cannot be stored
        accepted = asyncio.run(submit(address, envelopes[0]))
        full = wait_until(process, address, "read-only mode", lambda s: s.read_only)
        refused = asyncio.run(submit(address, envelopes[1]))
        # Execute: room again
        filler.unlink()
        recovered = wait_until(
            process, address, "the end of read-only mode", lambda s: not s.read_only
        )
    finally:
        if process.poll() is None:
            os.kill(process.pid, signal.SIGTERM)
        try:
            process.wait(timeout=30)
        except subprocess.TimeoutExpired:
            os.kill(process.pid, signal.SIGKILL)
            process.wait(timeout=30)
    # Assert: up throughout, read-only with the store's height, writes refused
    text = log_file.read_text()
    assert accepted == grpc.StatusCode.OK, text
    assert full.read_only and full.chain_height == 0
    assert refused == grpc.StatusCode.RESOURCE_EXHAUSTED, text
    assert not recovered.read_only
    # Assert: one error line for it, and no traceback; a clean stop
    errors = [line for line in text.splitlines() if "ERROR" in line]
    assert len(errors) == 1 and "disk full while storing the view" in errors[0], text
    assert "leaving read-only mode" in text and "Traceback" not in text, text
    assert process.returncode == 0, text
