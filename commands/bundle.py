"""``node --bundle DIR``: run every node of one host's bundle (``network init --bundles``).

A bundle holds the genesis and the keys of the nodes one host runs
(``node.bundles``). This starts one ``cli.py node`` process per server or
miner key and one for all the client keys, each with its state under
``STATE/<node id>`` (its log in ``STATE/<node id>/log``; the clients share
``STATE/clients`` and the privacy ledger ``STATE/privacy-ledger.json``),
waits for all of them, and exits with the first non-zero status (0 when
every node ended its run by itself). SIGINT or SIGTERM stops them all.
"""

from __future__ import annotations

import signal
import sys
import time
from collections.abc import Callable
from pathlib import Path
from types import FrameType

from commands.launcher import CLI, NodeProcess, stop_all
from node.genesis import GENESIS_FILE, read_genesis
from node.identity import load_identity

POLL_SECONDS = 0.5


def bundle_processes(
    bundle: Path,
    *,
    state_dir: Path,
    data_dir: str | None = None,
    bind_host: str | None = None,
    log_format: str = "text",
) -> list[NodeProcess]:
    """The node processes of ``bundle`` (not started). ValueError on a bad bundle."""
    genesis_path = bundle / GENESIS_FILE
    genesis = read_genesis(genesis_path)
    keys = sorted((bundle / "keys").glob("*.key"))
    if not keys:
        raise ValueError(f"{bundle / 'keys'} holds no key file: not a host bundle")
    members = genesis.membership
    base = [sys.executable, str(CLI), "node", "--genesis", str(genesis_path)]
    if data_dir:
        base += ["--data-dir", data_dir]
    if bind_host:
        base += ["--bind-host", bind_host]
    if log_format != "text":
        base += ["--log-format", log_format]
    procs, clients = [], []
    for path in keys:
        identity = load_identity(path)
        member = members.get(identity.node_id)
        if member is None or member.public_key != identity.public_key:
            raise ValueError(f"{path} is not the key of a node of {genesis_path}")
        if member.role == "client":
            clients.append(path)
            continue
        state = state_dir / member.node_id
        command = [*base, "--role", member.role, "--key", str(path), "--state-dir", str(state)]
        if member.role == "server":
            command += ["--metrics-out", str(state / "metrics.json")]
        procs.append(NodeProcess(member.node_id, command, state))
    if clients:
        command = [*base, "--role", "client"]
        for path in clients:
            command += ["--key", str(path)]
        command += ["--privacy-ledger", str(state_dir / "privacy-ledger.json")]
        procs.append(NodeProcess("clients", command, state_dir / "clients"))
    return procs


def run_bundle(procs: list[NodeProcess], *, say: Callable[[str], None] = print) -> int:
    """Start ``procs``, wait for all; the first non-zero exit status, else 0."""
    stopping: list[int] = []

    def on_signal(signum: int, _frame: FrameType | None) -> None:
        stopping.append(signum)

    previous = {s: signal.signal(s, on_signal) for s in (signal.SIGINT, signal.SIGTERM)}
    try:
        for p in procs:
            p.start()
            say(f"started {p.name} (pid {p.pid}), log {p.directory / 'log'}")
        while not stopping and any(p.alive() for p in procs):
            time.sleep(POLL_SECONDS)  # polling child processes, not a race
    finally:
        stop_all(procs)
        for s, handler in previous.items():
            signal.signal(s, handler)
    codes = [p.process.returncode for p in procs if p.process is not None]
    status = next((c if c > 0 else 1 for c in codes if c != 0), 0)  # < 0: killed by a signal
    if stopping:
        say("stopped: every node of this bundle was sent SIGTERM")
        return 130
    say(f"every node of this bundle has exited (status {status})")
    return status
