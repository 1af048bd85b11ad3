"""``network``: write a network's genesis and keys (``init``), or run one locally (``up``)."""

from __future__ import annotations

import signal
import sys
from pathlib import Path
from typing import Any

import click

from commands.options import (
    protocol_options,
    protocol_settings,
    run_config,
    run_options,
    selection_seed_option,
)


@click.group()
def network() -> None:
    """Set up a network of node daemons: one server, n = 3f+1 miners, K clients."""


@network.command("init")
@run_options
@click.option(
    "--out",
    "out_dir",
    type=click.Path(file_okay=False),
    required=True,
    help="directory for genesis.toml and keys/",
)
@click.option(
    "--miners",
    type=int,
    default=4,
    show_default=True,
    help="number of miners n = 3f+1 (tolerates f faulty ones)",
)
@click.option(
    "--host-map",
    type=click.Path(exists=True, dir_okay=False),
    default=None,
    help="TOML (or .json) table: node id, role or 'default' -> host or host:port "
    "[default: every node on 127.0.0.1]",
)
@click.option(
    "--base-port",
    type=int,
    default=50051,
    show_default=True,
    help="first port; nodes without a port in --host-map get sequential ports",
)
@click.option("--force", is_flag=True, help="replace an existing genesis and its keys")
@click.option(
    "--bundles",
    is_flag=True,
    help="also write OUT/hosts/<host>/ per host: the genesis, only that host's keys, and "
    "run.sh with the exact commands of its nodes (copy the folder there, run sh run.sh)",
)
@click.option(
    "--testbed",
    is_flag=True,
    help="mark the network as a testbed for experiments on public data: only a testbed "
    "may use --reproducible-noise",
)
@click.option(
    "--insecure",
    is_flag=True,
    help="no TLS: plaintext gRPC that any host can call (experiments only; every node "
    "warns) [default: a network CA and mutual TLS on every channel]",
)
@protocol_options
@selection_seed_option
def network_init(
    out_dir: str,
    miners: int,
    host_map: str | None,
    base_port: int,
    force: bool,
    bundles: bool,
    testbed: bool,
    selection_seed: str,
    insecure: bool,
    **kwargs: Any,
) -> None:
    """Write OUT/genesis.toml, a key file per node (OUT/keys/<id>.key, mode 0600) and,
    unless --insecure, the network CA and each node's TLS certificate and key (OUT/tls/).

    The run options define the federated run every node will follow; the
    genesis also holds the protocol settings (round deadline, view timeout,
    chunk size, ...).
    """
    from node.genesis import GenesisError, ProtocolParams, init_network, load_host_map

    protocol = protocol_settings(kwargs)
    config = run_config(kwargs)
    out = Path(out_dir)
    try:
        hosts = load_host_map(Path(host_map)) if host_map else {}
        genesis = init_network(
            out,
            run=config,
            miners=miners,
            base_port=base_port,
            hosts=hosts,
            protocol=ProtocolParams(**protocol, selection_seed=selection_seed, testbed=testbed),
            force=force,
            tls=not insecure,
        )
    except (GenesisError, OSError) as exc:
        raise click.ClickException(str(exc)) from exc
    members = genesis.membership
    click.echo(
        f"wrote {out / 'genesis.toml'} (network {genesis.digest.hex()[:16]}): 1 server, "
        f"{len(members.miners)} miners (f = {genesis.protocol.f}), {len(members.clients)} clients"
    )
    click.echo(f"keys in {out / 'keys'}/ (mode 0600): give each node only its own key")
    if insecure:
        click.echo("WARNING: --insecure: no TLS; any host can call the nodes", err=True)
    else:
        click.echo(
            f"TLS in {out / 'tls'}/: the network CA (keep ca.key off the nodes' hosts) and "
            "each node's certificate and key"
        )
    for label, nodes in (
        ("server", members.servers),
        ("miners", members.miners),
        ("clients", members.clients),
    ):
        first, last = nodes[0], nodes[-1]
        ids = first.node_id if first is last else f"{first.node_id} .. {last.node_id}"
        addresses = first.address if first is last else f"{first.address} .. {last.address}"
        click.echo(f"  {label:<8} {ids:<28} {addresses}")
    if bundles:
        from node.bundles import write_host_bundles

        try:
            written = write_host_bundles(out, genesis)
        except OSError as exc:
            raise click.ClickException(f"cannot write the host bundles: {exc}") from exc
        for host, folder in written.items():
            click.echo(f"host {host}: {folder}/ (copy it there, then: sh run.sh)")


@network.command("certify")
@click.option(
    "--network-dir",
    type=click.Path(file_okay=False, exists=True),
    required=True,
    help="the folder network init wrote (genesis.toml, tls/ with the CA's key)",
)
@click.argument("node_id")
def network_certify(network_dir: str, node_id: str) -> None:
    """Issue NODE_ID a new TLS key and certificate (rotation), signed by the network CA.

    Writes NETWORK_DIR/tls/NODE_ID.pem and .key (0600), replacing the old
    ones. Copy both to the node's host (its bundle's tls/ folder), then
    restart that node; the other nodes need nothing: they trust the CA.
    """
    from node.genesis import GenesisError, read_genesis
    from node.tls import TlsError, reissue

    folder = Path(network_dir)
    try:
        genesis = read_genesis(folder / "genesis.toml")
    except GenesisError as exc:
        raise click.ClickException(str(exc)) from exc
    if not genesis.protocol.tls_ca_sha256:
        raise click.ClickException("this network runs without TLS (network init --insecure)")
    if genesis.membership.get(node_id) is None:
        raise click.ClickException(f"{node_id!r} is not a node of this network")
    try:
        cert = reissue(folder, node_id)
    except (TlsError, OSError) as exc:
        raise click.ClickException(str(exc)) from exc
    click.echo(f"wrote {cert} and {cert.with_suffix('.key')} (0600): copy both to {node_id}'s host")


@network.command("up")
@run_options
@click.option("--miners", type=int, default=4, show_default=True, help="n = 3f+1 miners")
@click.option(
    "--client-procs",
    type=int,
    default=2,
    show_default=True,
    help="OS processes the clients are spread over",
)
@click.option(
    "--run-dir",
    type=click.Path(file_okay=False),
    default=None,
    help="where genesis, keys, logs and chains go [default: a new folder under ./runs/]",
)
@click.option("--timeout", type=float, default=None, help="give up after this many seconds")
@click.option(
    "--metrics-out",
    type=click.Path(dir_okay=False),
    default=None,
    help="also write the metrics JSON here [always written to RUN_DIR/metrics.json]",
)
@click.option(
    "--plot",
    type=click.Path(dir_okay=False),
    default=None,
    help="write a PNG of the run here: accuracy, privacy spent and accepted/rejected "
    "clients per round",
)
@click.option(
    "--quiet",
    is_flag=True,
    help="no progress on stderr, only the final line [default: a bar on a terminal, "
    "else a line per round]",
)
@click.option(
    "--log-format",
    type=click.Choice(["text", "json"]),
    default="text",
    show_default=True,
    help="the nodes' logs (RUN_DIR/<node>/log): text or JSON lines (node --log-format)",
)
@click.option(
    "--insecure",
    is_flag=True,
    help="no TLS: plaintext gRPC that any host can call (experiments only; every node "
    "warns) [default: a network CA and mutual TLS on every channel]",
)
@protocol_options
@selection_seed_option
def network_up_command(
    miners: int,
    client_procs: int,
    run_dir: str | None,
    timeout: float | None,
    metrics_out: str | None,
    plot: str | None,
    selection_seed: str,
    quiet: bool,
    log_format: str,
    insecure: bool,
    **kwargs: Any,
) -> None:
    """Start a whole network on 127.0.0.1 (one OS process per node), run it, stop it.

    At the end every miner's chain is checked as `chain verify` does, and a
    summary is printed: accuracy, privacy spent, the attackers' fate, the
    chains. Exits with status 1 if a chain fails the check.
    """
    import time as _time

    from commands.chaintools import verify_run_chains
    from commands.launcher import network_up
    from commands.plotting import plot_run
    from commands.progress import progress_view
    from commands.summary import run_summary
    from node.durable import write_json_durably
    from node.genesis import GenesisError

    protocol = protocol_settings(kwargs)
    config = run_config(kwargs)

    def stop_on_sigterm(signum: int, frame: object) -> None:
        raise KeyboardInterrupt  # the launcher's finally stops every node it started

    signal.signal(signal.SIGTERM, stop_on_sigterm)
    if run_dir is None:
        run_path = Path("runs") / _time.strftime("%Y%m%d-%H%M%S")
        suffix = 1
        while run_path.exists():
            run_path = Path("runs") / f"{_time.strftime('%Y%m%d-%H%M%S')}-{suffix}"
            suffix += 1
    else:
        run_path = Path(run_dir)
    try:
        doc = network_up(
            config,
            run_dir=run_path,
            miners=miners,
            client_procs=client_procs,
            protocol=protocol,
            selection_seed=selection_seed,
            tls=not insecure,
            view=progress_view(quiet=quiet, stream=sys.stderr, rounds=config.rounds),
            timeout=timeout,
            log_format=log_format,
        )
    except (GenesisError, RuntimeError, OSError) as exc:
        raise click.ClickException(str(exc)) from exc
    except KeyboardInterrupt:
        click.echo("interrupted; every node process was stopped", err=True)
        sys.exit(130)
    if metrics_out:
        write_json_durably(Path(metrics_out), doc)
    if plot and doc["rounds"]:
        plot_run(doc, Path(plot))
    try:
        chains = verify_run_chains(run_path)
    except ValueError as exc:
        raise click.ClickException(str(exc)) from exc
    files = {
        "plot": plot if doc["rounds"] else None,
        "metrics": metrics_out or str(run_path / "metrics.json"),
        "run dir": str(run_path),
    }
    for line in run_summary(doc, chains=chains, files={k: v for k, v in files.items() if v}):
        click.echo(line)
    if not all(check.ok for check in chains.values()):
        sys.exit(1)
