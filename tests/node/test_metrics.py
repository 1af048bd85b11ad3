"""Prometheus metrics: served on their own port by serve(), with the status and counters."""

from __future__ import annotations

import asyncio
import socket
import urllib.request

from node.metrics import BLOCKS, EPSILON
from node.serving import Endpoint, StatusInfo, serve


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def scrape(port: int) -> str:
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5) as reply:
        return reply.read().decode()


def test_a_node_serves_its_status_and_counters_on_the_metrics_port() -> None:
    # Prepare: a miner-like endpoint, and counters it moved
    status = StatusInfo(4, 17, b"", view=2, peers=(("miner-1", "127.0.0.1:9", True),))
    endpoint = Endpoint(
        node_id="miner-metrics-test",
        role="miner",
        address="127.0.0.1:0",
        genesis_digest=b"\x07" * 32,
        status=lambda: status,
    )
    BLOCKS.labels("miner-metrics-test").inc(3)
    EPSILON.labels("client-metrics-test").set(1.25)
    port = free_port()
    pages: list[str] = []

    async def main() -> None:
        stop = asyncio.Event()

        async def scrape_then_stop() -> None:
            pages.append(await asyncio.to_thread(scrape, port))
            stop.set()

        await serve([endpoint], stop=stop, run=scrape_then_stop, metrics_port=port)

    # Execute
    asyncio.run(main())
    # Assert: the status gauges read at scrape time, and the counters
    page = pages[0]
    assert 'llbcfl_round{node="miner-metrics-test"} 4.0' in page
    assert 'llbcfl_chain_height{node="miner-metrics-test"} 17.0' in page
    assert 'llbcfl_view{node="miner-metrics-test"} 2.0' in page
    assert 'llbcfl_peer_up{node="miner-metrics-test",peer="miner-1"} 1.0' in page
    assert 'llbcfl_blocks_committed_total{node="miner-metrics-test"} 3.0' in page
    assert 'llbcfl_epsilon_spent{node="client-metrics-test"} 1.25' in page
    assert "process_resident_memory_bytes" in page
    # ... and the port is closed once the node stopped
    try:
        scrape(port)
    except OSError:
        pass
    else:
        raise AssertionError("metrics still served after the node stopped")
