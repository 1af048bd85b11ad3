"""Prometheus metrics of a node process (``cli.py node --metrics-port``; off by default).

One registry per process (a client process hosts several identities: the
``node`` label tells them apart). Two kinds of series:

* read at scrape time from what ``Node.Status`` reports (:class:`StatusCollector`):
  ``llbcfl_round``, ``llbcfl_chain_height``, ``llbcfl_view`` (miners),
  ``llbcfl_peer_up`` (miners, per peer), ``llbcfl_read_only``;
* counted where the work happens: ``llbcfl_blocks_committed_total``,
  ``llbcfl_view_changes_total``, ``llbcfl_rounds_completed_total`` (server),
  ``llbcfl_stream_bytes_total`` (tensor streams in and out),
  ``llbcfl_validation_seconds`` (miners: a round's validation),
  ``llbcfl_refused_total`` (refused calls, by status code) and
  ``llbcfl_epsilon_spent`` (clients: the privacy spent on each hosted
  client's records, from its ledger);
* the process's own (``process_resident_memory_bytes``, CPU seconds).

Counting costs a dictionary lookup and an addition whether or not the
endpoint is served. :func:`start_metrics_server` serves ``/metrics`` over
HTTP on its own port (prometheus_client's server, in a thread).
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence
from typing import Any

from prometheus_client import (
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    ProcessCollector,
    start_http_server,
)
from prometheus_client.core import GaugeMetricFamily

REGISTRY = CollectorRegistry(auto_describe=True)
ProcessCollector(registry=REGISTRY)  # process_resident_memory_bytes, CPU seconds, open fds

BLOCKS = Counter("llbcfl_blocks_committed", "Blocks this node applied", ["node"], registry=REGISTRY)
VIEW_CHANGES = Counter(
    "llbcfl_view_changes", "PBFT view changes this miner entered", ["node"], registry=REGISTRY
)
ROUNDS = Counter(
    "llbcfl_rounds_completed", "Rounds the server summarised", ["node"], registry=REGISTRY
)
STREAM_BYTES = Counter(
    "llbcfl_stream_bytes",
    "Tensor data streamed (updates and models)",
    ["node", "direction"],
    registry=REGISTRY,
)
VALIDATION = Histogram(
    "llbcfl_validation_seconds",
    "Seconds a miner spent validating one round's updates",
    ["node"],
    buckets=(0.1, 0.25, 0.5, 1, 2, 5, 10, 30, 60),
    registry=REGISTRY,
)
REFUSED = Counter(
    "llbcfl_refused", "Calls this process refused, by status code", ["code"], registry=REGISTRY
)
EPSILON = Gauge(
    "llbcfl_epsilon_spent",
    "Privacy (epsilon) spent on a hosted client's records, from its ledger",
    ["node"],
    registry=REGISTRY,
)


class StatusCollector:
    """Gauges read from each endpoint's status callable when Prometheus scrapes."""

    def __init__(self, endpoints: Sequence[tuple[str, Callable[[], Any]]]) -> None:
        self.endpoints = list(endpoints)

    def collect(self) -> Iterator[GaugeMetricFamily]:
        round_ = GaugeMetricFamily("llbcfl_round", "The federated round", labels=["node"])
        height = GaugeMetricFamily("llbcfl_chain_height", "Committed blocks held", labels=["node"])
        view = GaugeMetricFamily("llbcfl_view", "PBFT view (miners)", labels=["node"])
        read_only = GaugeMetricFamily(
            "llbcfl_read_only", "1 while the node's disk is full", labels=["node"]
        )
        peer = GaugeMetricFamily(
            "llbcfl_peer_up", "1 while the link to a peer miner is up", labels=["node", "peer"]
        )
        for node_id, status in self.endpoints:
            info = status()
            round_.add_metric([node_id], info.round)
            height.add_metric([node_id], info.height)
            read_only.add_metric([node_id], float(getattr(info, "read_only", False)))
            if info.view is not None:
                view.add_metric([node_id], info.view)
            for peer_id, _address, up in info.peers:
                peer.add_metric([node_id, peer_id], float(up))
        yield from (round_, height, view, read_only, peer)


def start_metrics_server(
    port: int, *, host: str, endpoints: Sequence[tuple[str, Callable[[], Any]]]
) -> Callable[[], None]:
    """Serve ``/metrics`` on ``host:port``; returns the function that stops it."""
    collector = StatusCollector(endpoints)
    REGISTRY.register(collector)
    try:
        server, thread = start_http_server(port, addr=host, registry=REGISTRY)
    except OSError:
        REGISTRY.unregister(collector)
        raise

    def stop() -> None:
        server.shutdown()
        thread.join(timeout=5)
        REGISTRY.unregister(collector)

    return stop
