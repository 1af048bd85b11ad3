"""One folder per host of a network: what that host needs to run its nodes, and the command.

``network init --bundles`` writes, for each host of the genesis addresses,
``OUT/hosts/<host>/`` with:

* ``genesis.toml``, the network's (the same file everywhere);
* ``keys/<id>.key`` for the nodes that host runs, and no other (mode 0600,
  folder 0700);
* ``tls/``: the network CA's certificate and, for those nodes only, their
  TLS certificates and keys (0600); never the CA's key (``node.tls``);
* ``run.sh``: ``llbcfl node --bundle`` on the folder (``commands.bundle``:
  one process per server or miner key and one for all the client keys,
  started together and waited for); each node keeps its state under
  ``$LLBCFL_STATE`` (default ``state/`` in the bundle) and exits 0 when the
  run is over;
* ``README.txt``: which nodes, which ports to open, what the host needs.

Copy a host's folder to it, install the project there, and run ``sh
run.sh`` (or ``llbcfl node --bundle FOLDER``). A host name in a bundle path
is the genesis host as written (an IP address or a DNS name).
"""

from __future__ import annotations

from collections import defaultdict
from pathlib import Path

from node.durable import write_durably
from node.genesis import GENESIS_FILE, Genesis, key_path
from node.tls import CA_CERT, TLS_DIR, node_files

HOSTS_DIR = "hosts"


def host_of(address: str) -> str:
    """The host part of ``host:port`` (an IPv6 host without its brackets)."""
    return address.rpartition(":")[0].strip("[]")


def nodes_by_host(genesis: Genesis) -> dict[str, list[str]]:
    """Node ids per host, in genesis order."""
    hosts: dict[str, list[str]] = defaultdict(list)
    for node in genesis.nodes:
        host = node.address if node.role == "client" else host_of(node.address)
        hosts[host].append(node.node_id)
    return dict(hosts)


def run_script(genesis: Genesis, host: str, node_ids: list[str]) -> str:
    return "\n".join(
        [
            "#!/bin/sh",
            f"# LL-BCFL network {genesis.digest.hex()[:16]}, host {host}: {', '.join(node_ids)}.",
            "# Needs `llbcfl` on PATH (the project installed) and MNIST in $LLBCFL_DATA.",
            "# Runs every node of this folder (llbcfl node --bundle), each with its state",
            "# and log under $LLBCFL_STATE (default: state/ here); exits once they all",
            "# have (0: the run is over). Ctrl-C or SIGTERM stops them all.",
            "set -eu",
            'here="$(cd "$(dirname "$0")" && pwd)"',
            'exec llbcfl node --bundle "$here" --state-dir "${LLBCFL_STATE:-$here/state}" \\',
            '    ${LLBCFL_BIND_HOST:+--bind-host "$LLBCFL_BIND_HOST"} "$@"',
            "",
        ]
    )


def readme(genesis: Genesis, host: str, node_ids: list[str]) -> str:
    members = genesis.membership
    ports = [members[n].address.rpartition(":")[2] for n in node_ids if members[n].role != "client"]
    inbound = (
        f"Open for incoming TCP (gRPC) on {host}: {', '.join(ports)}"
        if ports
        else "Opens no port: clients dial out (to the server's and the miners' ports)."
    )
    return "\n".join(
        [
            f"LL-BCFL network {genesis.digest.hex()[:16]}: host {host}",
            "",
            f"Runs: {', '.join(node_ids)}",
            inbound,
            "Needs: Python 3.10+, this project installed (`make venv`, then `llbcfl` on PATH",
            "from .venv/bin), and the MNIST files in $LLBCFL_DATA (every role reads them).",
            "Start: sh run.sh   (= llbcfl node --bundle .; state and logs under ./state,",
            "or $LLBCFL_STATE;",
            "listen on another interface with LLBCFL_BIND_HOST=0.0.0.0).",
            "Keys in keys/ (and TLS keys in tls/) are this host's only: keep them private",
            "(mode 0600).",
            "",
        ]
    )


def copy_tls(network_dir: Path, folder: Path, node_ids: list[str]) -> None:
    """The CA certificate and these nodes' certificates and keys (0600) into ``folder/tls``;
    never the CA's key."""
    source, tls = Path(network_dir) / TLS_DIR, folder / TLS_DIR
    tls.mkdir(parents=True, exist_ok=True)
    tls.chmod(0o700)
    write_durably(tls / CA_CERT, (source / CA_CERT).read_bytes(), mode=0o600)
    for node_id in node_ids:
        cert, key = node_files(source, node_id)
        write_durably(tls / cert.name, cert.read_bytes(), mode=0o600)
        write_durably(tls / key.name, key.read_bytes(), mode=0o600)


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
        if genesis.protocol.tls_ca_sha256:
            copy_tls(network_dir, folder, node_ids)
        write_durably(folder / "run.sh", run_script(genesis, host, node_ids).encode(), mode=0o755)
        write_durably(folder / "README.txt", readme(genesis, host, node_ids).encode(), mode=0o644)
        written[host] = folder
    return written
