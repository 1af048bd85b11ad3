"""PBFT commit latency over gRPC: 4 miner daemons on 127.0.0.1, signed records.

Writes a genesis with ``node.genesis.init_network`` (one key per node,
free ports), starts the 4 miners as ``cli.py node --role miner`` processes
(the real daemon: replica driver, SQLite block store, Ed25519-signed PBFT
messages over ``Miner.Deliver`` streams), then submits ``--requests``
``Registration`` records one at a time to one miner's ``Miner.Submit``, each
signed by a different client identity of the genesis (a registration is the
one record a replica accepts without an FL round: it only checks the
signature, the submitter and ranges). Latency is submit -> the submitted-to
miner's ``Node.Status`` reports the new chain height (polled every
``--poll-ms``). One request is in flight at a time, so each is its own
block, and blocks/s is requests over the wall time of the sequence.

The miners' ``tick_ms`` (default 50) drives only timers (view change,
retransmission, state transfer); proposals and votes are sent when they
arise, so the tick does not enter the commit path.

python bench/pbft_latency.py --data-dir data --requests 200
"""

from __future__ import annotations

import argparse
import contextlib
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

import grpc

from chain.records import Registration
from commands.launcher import NodeProcess, free_ports, node_commands, operator_transport
from fl.config import RunConfig
from node.daemon import signed_record
from node.genesis import ProtocolParams, init_network, key_path, node_ids
from node.identity import load_identity
from node.serving import sync_channel, use_transport
from proto import llbcfl_pb2 as pb
from proto import llbcfl_pb2_grpc as pb_grpc


def wait_ready(address: str, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    with sync_channel(address) as ch:
        stub = pb_grpc.NodeStub(ch)
        while True:
            try:
                stub.Status(pb.StatusRequest(), timeout=1)
                return
            except grpc.RpcError:
                if time.monotonic() > deadline:
                    raise
                time.sleep(0.2)  # the miner is still loading data


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(q * (len(ordered) - 1)))]


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--data-dir", default=None)
    parser.add_argument("--requests", type=int, default=200)
    parser.add_argument("--via", type=int, default=0, help="replica index to submit to")
    parser.add_argument("--tick-ms", type=int, default=50)
    parser.add_argument("--poll-ms", type=float, default=1.0)
    parser.add_argument("--timeout", type=float, default=300.0, help="whole run, seconds")
    args = parser.parse_args()
    config = RunConfig(
        clients=args.requests, data_dir=args.data_dir, train_size=1000, rounds=1, frac=0.01
    )
    with tempfile.TemporaryDirectory() as tmp:
        run_dir = Path(tmp)
        plan = [n for n, role in node_ids(miners=4, clients=config.clients) if role != "client"]
        hosts = {n: f"127.0.0.1:{p}" for n, p in zip(plan, free_ports(len(plan)), strict=True)}
        protocol = ProtocolParams(tick_ms=args.tick_ms)
        genesis = init_network(run_dir, run=config, miners=4, hosts=hosts, protocol=protocol)
        use_transport(operator_transport(run_dir, genesis))  # mutual TLS, as the server
        miners: list[NodeProcess] = [
            p
            for p in node_commands(genesis, run_dir, client_procs=1, data_dir=args.data_dir)
            if p.name.startswith("miner-")
        ]
        target = genesis.membership.miners[args.via]
        latencies: list[float] = []
        try:
            for p in miners:
                p.start()
            for m in genesis.membership.miners:
                wait_ready(m.address, args.timeout)
            envelopes = [
                signed_record(
                    load_identity(key_path(run_dir, c.node_id)),
                    Registration(c.node_id, (200, 200, 200, 0, 0, 0, 0, 0, 0, 0, 0)),
                )
                for c in genesis.membership.clients
            ]
            deadline = time.monotonic() + args.timeout
            with sync_channel(target.address) as ch:
                submit, status = pb_grpc.MinerStub(ch).Submit, pb_grpc.NodeStub(ch).Status
                height = status(pb.StatusRequest(), timeout=5).chain_height
                start = time.perf_counter()
                for envelope in envelopes:
                    t0 = time.perf_counter()
                    submit(envelope, timeout=10)
                    while status(pb.StatusRequest(), timeout=5).chain_height <= height:
                        if time.monotonic() > deadline:
                            raise TimeoutError("a request did not commit in time")
                        time.sleep(args.poll_ms / 1e3)
                    latencies.append(time.perf_counter() - t0)
                    height += 1
                wall = time.perf_counter() - start
        finally:
            for p in reversed(miners):
                with contextlib.suppress(OSError):
                    p.stop()
    p50, p99 = percentile(latencies, 0.5), percentile(latencies, 0.99)
    result = {
        "miners": 4,
        "requests": len(latencies),
        "submitted_to": target.node_id,
        "tick_ms": args.tick_ms,
        "poll_ms": args.poll_ms,
        "p50_ms": round(1e3 * p50, 2),
        "p99_ms": round(1e3 * p99, 2),
        "mean_ms": round(1e3 * statistics.fmean(latencies), 2),
        "max_ms": round(1e3 * max(latencies), 2),
        "blocks_per_s": round(len(latencies) / wall, 1),
        "targets": {"p50_ms": 15, "p99_ms": 50},
    }
    print(json.dumps(result))
    sys.exit(0)


if __name__ == "__main__":
    main()
