"""``network up``: a whole network as local OS processes on 127.0.0.1.

Creates the run directory (genesis.toml, keys/, one folder per node with its
log, and chain.db for miners), starts the server, the miners and the client
processes through ``cli.py node``, follows the server's progress
(``commands.progress``: a bar, a line per round or nothing), writes the
metrics document of ``simulate`` plus ``chain_heads`` (head hash per miner),
and stops every process it started, by pid, when done, on error or on
Ctrl-C.
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import grpc

from commands.progress import ProgressView, RunProgress
from fl.config import RunConfig
from node.durable import write_json_durably
from node.genesis import Genesis, ProtocolParams, init_network, key_path, node_ids
from node.serving import Transport, sync_channel, use_transport
from node.tls import TLS_DIR
from proto import llbcfl_pb2 as pb
from proto import llbcfl_pb2_grpc as pb_grpc

CLI = Path(__file__).resolve().parent.parent / "cli.py"


def free_ports(count: int) -> list[int]:
    """``count`` distinct ports the OS reports free on 127.0.0.1 right now."""
    sockets = []
    try:
        for _ in range(count):
            s = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
            s.bind(("127.0.0.1", 0))
            sockets.append(s)
        return [s.getsockname()[1] for s in sockets]
    finally:
        for s in sockets:
            s.close()


@dataclass
class NodeProcess:
    name: str
    command: list[str]
    directory: Path
    process: subprocess.Popen | None = None
    log: Any = field(default=None, repr=False)

    def start(self) -> None:
        self.directory.mkdir(parents=True, exist_ok=True)
        self.log = open(self.directory / "log", "ab")  # noqa: SIM115 - closed in stop()
        self.process = subprocess.Popen(
            self.command, stdout=self.log, stderr=subprocess.STDOUT, start_new_session=True
        )

    @property
    def pid(self) -> int | None:
        return self.process.pid if self.process else None

    def alive(self) -> bool:
        return self.process is not None and self.process.poll() is None

    def terminate(self) -> None:
        """Send SIGTERM if still running (a node stops on its first SIGTERM; more are no-ops)."""
        if self.process is not None and self.process.poll() is None:
            os.kill(self.process.pid, signal.SIGTERM)

    def stop(self, timeout: float = 10.0) -> None:
        if self.process is not None and self.process.poll() is None:
            self.terminate()
            try:
                self.process.wait(timeout)
            except subprocess.TimeoutExpired:
                os.kill(self.process.pid, signal.SIGKILL)
                self.process.wait()
        if self.log is not None:
            self.log.close()
            self.log = None


def stop_all(procs: list[NodeProcess], timeout: float = 10.0) -> None:
    """Stop every process: SIGTERM to all at once, then wait for each in turn, with
    SIGKILL for one still running ``timeout`` seconds after the signals went out."""
    for p in procs:
        with contextlib.suppress(OSError):
            p.terminate()
    deadline = time.monotonic() + timeout
    for p in procs:
        with contextlib.suppress(OSError):
            p.stop(timeout=max(0.1, deadline - time.monotonic()))


def plan_network(
    run_dir: Path,
    config: RunConfig,
    *,
    miners: int,
    protocol: Mapping[str, int],
    selection_seed: str = "block",
    tls: bool = True,
) -> Genesis:
    listening = [
        node_id
        for node_id, role in node_ids(miners=miners, clients=config.clients)
        if role != "client"
    ]  # clients dial out: they need no port
    ports = free_ports(len(listening))
    hosts = {node_id: f"127.0.0.1:{port}" for node_id, port in zip(listening, ports, strict=True)}
    params = ProtocolParams(**protocol, selection_seed=selection_seed, testbed=True)
    return init_network(run_dir, run=config, miners=miners, hosts=hosts, protocol=params, tls=tls)


def node_commands(
    genesis: Genesis,
    run_dir: Path,
    *,
    client_procs: int,
    data_dir: str | None,
    log_format: str = "text",
) -> list[NodeProcess]:
    base = [sys.executable, str(CLI), "node", "--genesis", str(run_dir / "genesis.toml")]
    if data_dir:
        base += ["--data-dir", data_dir]
    if log_format != "text":
        base += ["--log-format", log_format]
    members = genesis.membership
    procs = []
    server = members.server.node_id
    procs.append(
        NodeProcess(
            server,
            [
                *base,
                "--role",
                "server",
                "--key",
                str(key_path(run_dir, server)),
                "--run-dir",
                str(run_dir / server),
                "--metrics-out",
                str(run_dir / server / "metrics.json"),
            ],
            run_dir / server,
        )
    )
    for miner in members.miners:
        d = run_dir / miner.node_id
        procs.append(
            NodeProcess(
                miner.node_id,
                [
                    *base,
                    "--role",
                    "miner",
                    "--key",
                    str(key_path(run_dir, miner.node_id)),
                    "--run-dir",
                    str(d),
                    "--db",
                    str(d / "chain.db"),
                ],
                d,
            )
        )
    clients = [c.node_id for c in members.clients]
    groups = max(1, min(client_procs, len(clients)))
    for g in range(groups):
        ids = clients[g::groups]
        name = f"clients-{g}"
        keys = [arg for cid in ids for arg in ("--key", str(key_path(run_dir, cid)))]
        # Every client process of the testbed shares one ledger (one lock).
        ledger = ["--privacy-ledger", str(run_dir / "privacy-ledger.json")]
        procs.append(NodeProcess(name, [*base, "--role", "client", *keys, *ledger], run_dir / name))
    return procs


def operator_transport(network_dir: Path, genesis: Genesis) -> Transport | None:
    """Mutual TLS as the network's server, from ``network_dir/tls`` (None without TLS):
    how the testbed's launcher and the benches read the nodes' status."""
    from node.roles import transport_for

    return transport_for(genesis, genesis.membership.server.node_id, Path(network_dir) / TLS_DIR)


def miner_heads(genesis: Genesis) -> dict[str, tuple[int, str]]:
    """(height, head hash hex) per reachable miner."""
    heads = {}
    for miner in genesis.membership.miners:
        try:
            with sync_channel(miner.address) as ch:
                status = pb_grpc.NodeStub(ch).Status(pb.StatusRequest(), timeout=2)
            heads[miner.node_id] = (status.chain_height, status.head_hash.hex())
        except grpc.RpcError:
            continue
    return heads


def converged_heads(genesis: Genesis, *, timeout: float = 15.0) -> dict[str, str]:
    """Head hash per reachable miner, once every miner answers with the same head.

    A miner that is down or still catching up gets until ``timeout``; after
    that the heads of the reachable miners are returned as they are.
    """
    deadline = time.monotonic() + timeout
    everyone = len(genesis.membership.miners)
    while True:
        heads = miner_heads(genesis)
        agreed = len(set(heads.values())) <= 1 and len(heads) == everyone
        if agreed or time.monotonic() > deadline:
            return {k: v[1] for k, v in sorted(heads.items())}
        time.sleep(0.2)  # polling other processes' chains; not a test race


def read_progress(path: Path, *, rounds: int) -> RunProgress | None:
    """The server's progress.json, or None while there is none (written atomically)."""
    try:
        info = json.loads(path.read_text())
    except (OSError, ValueError):
        return None
    return RunProgress.from_json(info, rounds=rounds) if isinstance(info, dict) else None


def network_up(
    config: RunConfig,
    *,
    run_dir: Path,
    miners: int,
    client_procs: int,
    protocol: Mapping[str, int],
    view: ProgressView,
    selection_seed: str = "block",
    tls: bool = True,
    timeout: float | None = None,
    on_started: Callable[[list[NodeProcess]], None] | None = None,
    log_format: str = "text",
) -> dict[str, Any]:
    """Run the network to the end; return the metrics document (also in run_dir/metrics.json)."""
    run_dir.mkdir(parents=True, exist_ok=True)
    genesis = plan_network(
        run_dir,
        config,
        miners=miners,
        protocol=protocol,
        selection_seed=selection_seed,
        tls=tls,
    )
    # The launcher reads the miners' heads as the server (the testbed's operator).
    use_transport(operator_transport(run_dir, genesis))
    procs = node_commands(
        genesis,
        run_dir,
        client_procs=client_procs,
        data_dir=config.data_dir,
        log_format=log_format,
    )
    metrics_path = run_dir / "server" / "metrics.json"
    progress_path = run_dir / "server" / "progress.json"
    try:
        for p in procs:
            p.start()
        pids = {p.name: {"pid": p.pid, "command": p.command} for p in procs}
        write_json_durably(run_dir / "pids.json", pids)
        view.message(f"started {len(procs)} processes in {run_dir}")
        if on_started is not None:
            on_started(procs)
        server = procs[0]
        start = time.monotonic()
        last = RunProgress(config.rounds)
        while not metrics_path.exists():
            if not server.alive():
                raise RuntimeError(f"the server exited early; see {server.directory / 'log'}")
            if timeout is not None and time.monotonic() - start > timeout:
                raise RuntimeError(f"the network did not finish within {timeout:.0f} s")
            last = read_progress(progress_path, rounds=config.rounds) or last
            view.update(last)  # also when unchanged: the bar's clock moves on
            time.sleep(0.2)  # following child processes; not a test race
        doc = json.loads(metrics_path.read_text())
        last = read_progress(progress_path, rounds=config.rounds) or last
        # Rounds that finished since the last reading, each with its own numbers.
        for record in doc["rounds"]:
            if record["round"] > view.shown:
                view.update(last.after_round(record))
        view.update(last)
        doc["chain_heads"] = converged_heads(genesis)
        doc["run_dir"] = str(run_dir)
        write_json_durably(run_dir / "metrics.json", doc)
        return doc
    finally:
        view.close()
        stop_all(list(reversed(procs)))
