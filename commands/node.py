"""``node``: run one node daemon (or a process of client identities)."""

from __future__ import annotations

import sys
from pathlib import Path

import click


@click.command("node")
@click.option(
    "--role",
    type=click.Choice(["client", "miner", "server"]),
    default=None,
    help="the node to run [required unless --bundle]",
)
@click.option(
    "--genesis",
    "genesis_path",
    type=click.Path(dir_okay=False),
    default=None,
    help="the network's genesis.toml [required unless --bundle]",
)
@click.option(
    "--bundle",
    type=click.Path(file_okay=False, exists=True),
    default=None,
    help="run every node of this host bundle (network init --bundles): one process per "
    "server or miner key, one for all client keys, each with its state under --state-dir "
    "[default: DIR/state]; exits when they all have",
)
@click.option("--key", "keys", multiple=True, type=click.Path(dir_okay=False), help="key file")
@click.option(
    "--key-dir",
    type=click.Path(file_okay=False),
    default=None,
    help="clients: host every client key in this folder",
)
@click.option("--data-dir", type=click.Path(file_okay=False), default=None)
@click.option(
    "--db",
    type=click.Path(dir_okay=False),
    default=None,
    help="miners: the chain (SQLite) [default: chain.db in the state folder]",
)
@click.option(
    "--state-dir",
    "--run-dir",
    "run_dir",
    type=click.Path(file_okay=False),
    default=None,
    help="miners and server: the node's own folder (chain, blobs, checkpoints, metrics) "
    "[default: $XDG_STATE_HOME/llbcfl/networks/<genesis>/<node id>, "
    "else ~/.local/state/...; never the working directory]",
)
@click.option(
    "--bind-host",
    default=None,
    help="listen on this host (e.g. 0.0.0.0) with the port of the node's genesis address; "
    "the genesis address stays the one others dial [default: the genesis address]",
)
@click.option("--metrics-out", type=click.Path(dir_okay=False), default=None, help="server only")
@click.option(
    "--privacy-ledger",
    type=click.Path(dir_okay=False),
    default=None,
    help="clients: the privacy-budget ledger of the hosted clients' records; keep one per "
    "machine and data set, runs on the same records add to it "
    "[default: $XDG_STATE_HOME/llbcfl/privacy-ledger.json, else ~/.local/state/...]",
)
@click.option(
    "--stay",
    is_flag=True,
    help="miners and clients: keep serving after the run's last round is on the chain "
    "[default: exit 0 then; a miner first serves its final blocks for 30 s]",
)
@click.option(
    "--metrics-port",
    type=click.IntRange(1, 65535),
    default=None,
    help="serve Prometheus metrics on http://HOST:PORT/metrics (HOST: --bind-host, else "
    "the genesis address's host) [default: off]",
)
@click.option(
    "--tls-dir",
    type=click.Path(file_okay=False),
    default=None,
    help="the node's TLS files (ca.pem, <node id>.pem and .key from network init) "
    "[default: tls/ beside the keys/ folder of its first --key]",
)
@click.option(
    "--log-format",
    type=click.Choice(["text", "json"]),
    default="text",
    show_default=True,
    help="log lines on stderr: text ([node rROUND vVIEW hHEIGHT] message) or JSON lines "
    "(ts, level, node, role, round, view, height, msg, event); docs/NETWORK.md, 'Logs'",
)
def node_command(
    role: str | None,
    genesis_path: str | None,
    bundle: str | None,
    keys: tuple[str, ...],
    key_dir: str | None,
    data_dir: str | None,
    db: str | None,
    run_dir: str | None,
    metrics_out: str | None,
    privacy_ledger: str | None,
    stay: bool,
    bind_host: str | None,
    metrics_port: int | None,
    log_format: str,
    tls_dir: str | None,
) -> None:
    """Run one node daemon (or, for clients, several client identities).

    It runs until SIGINT/SIGTERM, or until the run is over: the server exits
    once it has written the metrics of the last round, and miners and clients
    exit 0 once the chain holds that round's summary (unless --stay).
    """
    if bundle is not None:
        run_host_bundle(
            Path(bundle),
            state_dir=run_dir,
            data_dir=data_dir,
            bind_host=bind_host,
            log_format=log_format,
        )
        return
    if role is None or genesis_path is None:
        raise click.UsageError("give --role and --genesis (or --bundle DIR)")
    from node.roles import run_node

    try:
        run_node(
            role=role,
            genesis_path=Path(genesis_path),
            keys=[Path(k) for k in keys],
            key_dir=Path(key_dir) if key_dir else None,
            data_dir=data_dir,
            db=Path(db) if db else None,
            run_dir=Path(run_dir) if run_dir else None,
            metrics_out=Path(metrics_out) if metrics_out else None,
            privacy_ledger=Path(privacy_ledger) if privacy_ledger else None,
            stay=stay,
            bind_host=bind_host,
            metrics_port=metrics_port,
            log_format=log_format,
            tls_dir=Path(tls_dir) if tls_dir else None,
        )
    except ValueError as exc:
        raise click.ClickException(str(exc)) from exc


def run_host_bundle(
    bundle: Path,
    *,
    state_dir: str | None,
    data_dir: str | None,
    bind_host: str | None,
    log_format: str = "text",
) -> None:
    from commands.bundle import bundle_processes, run_bundle
    from node.genesis import GenesisError
    from node.identity import KeyFileError

    state = Path(state_dir) if state_dir else bundle / "state"
    try:
        procs = bundle_processes(
            bundle, state_dir=state, data_dir=data_dir, bind_host=bind_host, log_format=log_format
        )
    except (GenesisError, KeyFileError, ValueError, OSError) as exc:
        raise click.ClickException(str(exc)) from exc
    sys.exit(run_bundle(procs, say=lambda line: click.echo(line, err=True)))
