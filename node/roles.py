"""``cli.py node``: load the genesis and keys, then run one role's daemon until a signal."""

from __future__ import annotations

import asyncio
import os
from pathlib import Path

from fl.data import DataError
from node.daemon import NodeLog, run_until_signal
from node.genesis import Genesis, GenesisError, read_genesis
from node.identity import KeyFileError, load_identity
from node.privacy_ledger import LedgerCorruptError
from node.serving import Transport, current_transport, use_transport
from node.tls import TLS_DIR, TlsError, load_node_tls


def run_node(
    *,
    role: str,
    genesis_path: Path,
    keys: list[Path],
    key_dir: Path | None,
    data_dir: str | None,
    db: Path | None,
    run_dir: Path | None,
    metrics_out: Path | None,
    privacy_ledger: Path | None = None,
    stay: bool = False,
    bind_host: str | None = None,
    metrics_port: int | None = None,
    log_format: str = "text",
    tls_dir: Path | None = None,
) -> None:
    """Raise ValueError with a plain message on any configuration problem.

    ``run_dir`` is the node's state folder (``--state-dir``); by default a
    folder of its own under the user's state directory
    (:func:`default_state_dir`), never the working directory.
    """
    try:
        genesis = read_genesis(genesis_path)
        paths = list(keys) + (sorted(key_dir.glob("*.key")) if key_dir else [])
        identities = [load_identity(p) for p in paths]
    except (GenesisError, KeyFileError) as exc:
        raise ValueError(str(exc)) from exc
    if role == "client" and key_dir:
        identities = [i for i in identities if i.role == "client"]
    if not identities:
        raise ValueError("give at least one --key (or --key-dir for clients)")
    wrong = [i.node_id for i in identities if i.role != role]
    if wrong:
        raise ValueError(f"keys of other roles given to a {role}: {', '.join(wrong)}")
    if role != "client" and len(identities) != 1:
        raise ValueError(f"a {role} takes exactly one --key")
    for ident in identities:
        member = genesis.membership.get(ident.node_id)
        if member is None or member.public_key != ident.public_key:
            raise ValueError(f"{ident.node_id}'s key is not in {genesis_path}")
    name = identities[0].node_id if len(identities) == 1 else f"clients({len(identities)})"
    run_dir = run_dir or default_state_dir(genesis.digest, name)
    if role != "client":  # a client's only state is its privacy ledger
        run_dir.mkdir(parents=True, exist_ok=True)
    log = NodeLog(name, role=role, log_format=log_format)
    use_transport(transport_for(genesis, identities[0].node_id, tls_dir or default_tls_dir(paths)))
    if current_transport() is None:
        log.warning(
            "INSECURE: this network's genesis names no CA, so its traffic is plaintext gRPC "
            "and any host that reaches a node can call it (network init --insecure: "
            "experiments only)"
        )

    async def main(stop: asyncio.Event) -> None:
        if role == "miner":
            from node.miner_service import run_miner

            await run_miner(
                genesis,
                identities[0],
                db_path=db or run_dir / "chain.db",
                run_dir=run_dir,
                data_dir=data_dir,
                stop=stop,
                log=log,
                stay=stay,
                bind_host=bind_host,
                metrics_port=metrics_port,
            )
        elif role == "server":
            from node.server_service import run_server

            await run_server(
                genesis,
                identities[0],
                run_dir=run_dir,
                data_dir=data_dir,
                stop=stop,
                log=log,
                metrics_path=metrics_out or run_dir / "metrics.json",
                bind_host=bind_host,
                metrics_port=metrics_port,
            )
        else:
            from node.client_service import run_clients

            await run_clients(
                genesis,
                identities,
                ledger_path=privacy_ledger or default_ledger_path(),
                data_dir=data_dir,
                stop=stop,
                log=log,
                stay=stay,
                bind_host=bind_host,
                metrics_port=metrics_port,
            )

    try:
        asyncio.run(run_until_signal(main, log=log))
    except (DataError, LedgerCorruptError) as exc:
        raise ValueError(str(exc)) from exc


def default_tls_dir(key_paths: list[Path]) -> Path:
    """``tls/`` beside the ``keys/`` folder of the first key (network init's layout,
    and a host bundle's)."""
    return key_paths[0].resolve().parent.parent / TLS_DIR


def transport_for(genesis: Genesis, node_id: str, tls_dir: Path) -> Transport | None:
    """Mutual TLS as ``node_id`` when the genesis names a CA, else None (plaintext);
    ValueError when the files are missing, loose or not this network's."""
    expected = genesis.protocol.tls_ca_sha256
    if not expected:
        return None
    try:
        return Transport(load_node_tls(tls_dir, node_id, expected_ca=expected), genesis.membership)
    except TlsError as exc:
        raise ValueError(str(exc)) from exc


def state_home() -> Path:
    """LL-BCFL's state folder: ``$XDG_STATE_HOME/llbcfl``, else ``~/.local/state/llbcfl``."""
    state = os.environ.get("XDG_STATE_HOME") or str(Path.home() / ".local" / "state")
    return Path(state) / "llbcfl"


def default_state_dir(genesis_digest: bytes, name: str) -> Path:
    """A node's state folder unless ``--state-dir`` says otherwise: one per network and node.

    Under :func:`state_home`, named by the genesis digest and the node's id,
    so a restart from any working directory finds its chain, blobs and
    checkpoints again, and two networks never share a folder.
    """
    return state_home() / "networks" / genesis_digest.hex()[:16] / name


def default_ledger_path() -> Path:
    """Where a client host keeps its privacy ledger unless told otherwise.

    A per-user state folder, not the working directory: the ledger must
    outlive runs and folders, since every run on the same records adds to it.
    """
    return state_home() / "privacy-ledger.json"
