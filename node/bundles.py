"""One folder per host of a network: what that host needs to run its nodes, and the command.

``network init --bundles`` writes, for each host of the genesis addresses,
``OUT/hosts/<host>/`` with:

* ``genesis.toml``, the network's (the same file everywhere);
* ``keys/<id>.key`` for the nodes that host runs, and no other (mode 0600,
  folder 0700);
* ``run.sh``, the exact ``llbcfl node`` commands of those nodes (the server,
  each miner, and one process for all its clients), started together and
  waited for; each node keeps its state under ``$LLBCFL_STATE`` (default
  ``state/`` in the bundle) and exits 0 when the run is over;
* ``README.txt``: which nodes, which ports to open, what the host needs.

Copy a host's folder to it, install the project there, and run
``sh run.sh``. A host name in a bundle path is the genesis host as written
(an IP address or a DNS name).
"""

from __future__ import annotations

import shlex
from collections import defaultdict
from pathlib import Path

from node.durable import write_durably
from node.genesis import GENESIS_FILE, Genesis, key_path

HOSTS_DIR = "hosts"


def host_of(address: str) -> str:
    """The host part of ``host:port`` (an IPv6 host without its brackets)."""
    return address.rpartition(":")[0].strip("[]")


def nodes_by_host(genesis: Genesis) -> dict[str, list[str]]:
    """Node ids per host, in genesis order."""
    hosts: dict[str, list[str]] = defaultdict(list)
    for node in genesis.nodes:
        hosts[host_of(node.address)].append(node.node_id)
    return dict(hosts)


def _commands(genesis: Genesis, node_ids: list[str]) -> list[tuple[str, list[str]]]:
    """(what, argv after ``llbcfl``) of the processes a host runs."""
    members = genesis.membership
    base = ["node", "--genesis", GENESIS_FILE]
    out = []
    for node_id in node_ids:
        role = members[node_id].role
        if role == "client":
            continue
        state = f"$STATE/{node_id}"
        argv = [*base, "--role", role, "--key", f"keys/{node_id}.key", "--state-dir", state]
        if role == "server":
            argv += ["--metrics-out", f"{state}/metrics.json"]
        out.append((node_id, argv))
    clients = [n for n in node_ids if members[n].role == "client"]
    if clients:
        argv = [*base, "--role", "client"]
        for cid in clients:
            argv += ["--key", f"keys/{cid}.key"]
        argv += ["--privacy-ledger", "$STATE/privacy-ledger.json"]
        label = clients[0] if len(clients) == 1 else f"{clients[0]}..{clients[-1]}"
        out.append((label, argv))
    return out


def _quote(arg: str) -> str:
    """Shell quoting that leaves ``$STATE`` to the shell."""
    if arg.startswith("$STATE"):
        return '"' + arg + '"'
    return shlex.quote(arg)


def run_script(genesis: Genesis, host: str, node_ids: list[str]) -> str:
    lines = [
        "#!/bin/sh",
        f"# LL-BCFL network {genesis.digest.hex()[:16]}, host {host}: {', '.join(node_ids)}.",
        "# Run from anywhere: sh run.sh. Needs `llbcfl` on PATH (the project installed)",
        "# and MNIST in $LLBCFL_DATA (or the genesis's data_dir). Each node exits 0 once",
        "# the run is over; Ctrl-C (or SIGTERM) stops them all.",
        "set -eu",
        'cd "$(dirname "$0")"',
        'STATE="${LLBCFL_STATE:-$PWD/state}"',
        'BIND="${LLBCFL_BIND_HOST:+--bind-host $LLBCFL_BIND_HOST}"',
        'mkdir -p "$STATE"',
        'pids=""',
        "trap 'kill $pids 2>/dev/null' INT TERM",
    ]
    for label, argv in _commands(genesis, node_ids):
        command = " ".join(_quote(a) for a in argv)
        lines.append(f'llbcfl {command} $BIND >"$STATE/{label}.log" 2>&1 &')
        lines.append('pids="$pids $!"')
        lines.append(f'echo "started {label} (pid $!), log $STATE/{label}.log"')
    lines += [
        "status=0",
        'for pid in $pids; do wait "$pid" || status=$?; done',
        'echo "every node of this host has exited (status $status)"',
        'exit "$status"',
    ]
    return "\n".join(lines) + "\n"


def readme(genesis: Genesis, host: str, node_ids: list[str]) -> str:
    members = genesis.membership
    ports = [members[n].address.rpartition(":")[2] for n in node_ids]
    return "\n".join(
        [
            f"LL-BCFL network {genesis.digest.hex()[:16]}: host {host}",
            "",
            f"Runs: {', '.join(node_ids)}",
            f"Open for incoming TCP (gRPC) on {host}: {', '.join(ports)}",
            "Needs: Python 3.10+, this project installed (`make venv`, then `llbcfl` on PATH",
            "from .venv/bin), and the MNIST files in $LLBCFL_DATA (every role reads them).",
            "Start: sh run.sh   (state and logs under ./state, or $LLBCFL_STATE;",
            "listen on another interface with LLBCFL_BIND_HOST=0.0.0.0).",
            "Keys in keys/ are this host's only: keep them private (mode 0600).",
            "",
        ]
    )


def write_host_bundles(network_dir: Path, genesis: Genesis) -> dict[str, Path]:
    """``network_dir/hosts/<host>/`` for every host (see the module docstring)."""
    network_dir = Path(network_dir)
    genesis_text = (network_dir / GENESIS_FILE).read_bytes()
    written = {}
    for host, node_ids in nodes_by_host(genesis).items():
        folder = network_dir / HOSTS_DIR / host
        keys = folder / "keys"
        keys.mkdir(parents=True, exist_ok=True)
        keys.chmod(0o700)
        write_durably(folder / GENESIS_FILE, genesis_text, mode=0o644)
        for node_id in node_ids:
            key = key_path(network_dir, node_id).read_bytes()
            write_durably(keys / f"{node_id}.key", key, mode=0o600)
        write_durably(folder / "run.sh", run_script(genesis, host, node_ids).encode(), mode=0o755)
        write_durably(folder / "README.txt", readme(genesis, host, node_ids).encode(), mode=0o644)
        written[host] = folder
    return written
