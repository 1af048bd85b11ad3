"""LL-BCFL command line: ``python cli.py --help`` or the ``llbcfl`` script."""

from __future__ import annotations

import signal
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import click

from chain.records import SELECTION_SEEDS
from commands.privacy import privacy
from fl.aggregation import AGGREGATIONS
from fl.attacks import ATTACKS
from fl.config import SELECTIONS, SERVER_LR_DECAYS, RunConfig
from fl.data import DataError, resolve_data_root
from fl.models import MODEL_NAMES
from fl.partition import DISTRIBUTIONS
from fl.privacy import ACCOUNTANTS, MECHANISMS
from fl.validation import RULES

DEFAULTS = RunConfig()


def _run_options(fn: Callable[..., Any]) -> Callable[..., Any]:
    """The federated-run options shared by ``simulate`` (and later ``network up``)."""
    options = [
        click.option(
            "--dataset", type=click.Choice(["mnist"]), default=DEFAULTS.dataset, show_default=True
        ),
        click.option(
            "--data-dir",
            type=click.Path(file_okay=False),
            default=None,
            help="MNIST root holding MNIST/raw/ [default: $LLBCFL_DATA, else ./data]",
        ),
        click.option(
            "--clients",
            "-K",
            type=int,
            default=DEFAULTS.clients,
            show_default=True,
            help="number of clients K",
        ),
        click.option(
            "--frac",
            "-C",
            type=float,
            default=DEFAULTS.frac,
            show_default=True,
            help="fraction of clients selected per round",
        ),
        click.option("--rounds", "-T", type=int, default=DEFAULTS.rounds, show_default=True),
        click.option(
            "--dist",
            type=click.Choice(DISTRIBUTIONS),
            default=DEFAULTS.dist,
            show_default=True,
            help="data partition: iid, noniid (2 label shards per client), dirichlet",
        ),
        click.option(
            "--alpha",
            type=float,
            default=DEFAULTS.alpha,
            show_default=True,
            help="Dirichlet concentration for --dist dirichlet",
        ),
        click.option(
            "--model", type=click.Choice(MODEL_NAMES), default=DEFAULTS.model, show_default=True
        ),
        click.option(
            "--local-epochs",
            "-E",
            type=float,
            default=DEFAULTS.local_epochs,
            show_default=True,
            help="local epochs per round (fractions train on part of an epoch)",
        ),
        click.option(
            "--batch-size", "-B", type=int, default=DEFAULTS.batch_size, show_default=True
        ),
        click.option("--lr", type=float, default=DEFAULTS.lr, show_default=True),
        click.option("--momentum", type=float, default=DEFAULTS.momentum, show_default=True),
        click.option(
            "--dropout/--no-dropout",
            default=DEFAULTS.dropout,
            show_default=True,
            help="the CNN's dropout during local training (off helps DP-SGD: the "
            "noise already regularises)",
        ),
        click.option("--seed", type=int, default=DEFAULTS.seed, show_default=True),
        click.option(
            "--aggregation",
            type=click.Choice(AGGREGATIONS),
            default=DEFAULTS.aggregation,
            show_default=True,
        ),
        click.option(
            "--server-momentum",
            type=float,
            default=DEFAULTS.server_momentum,
            show_default=True,
            help="server momentum b of FedAvgM (0: plain FedAvg)",
        ),
        click.option(
            "--server-lr",
            type=float,
            default=DEFAULTS.server_lr,
            show_default=True,
            help="server step size applied to the aggregate (FedAvgM)",
        ),
        click.option(
            "--server-lr-decay",
            type=click.Choice(SERVER_LR_DECAYS),
            default=DEFAULTS.server_lr_decay,
            show_default=True,
            help="schedule of the server step: none, or cosine from --server-lr down to "
            "a tenth of it in the last round",
        ),
        click.option(
            "--selection",
            type=click.Choice(SELECTIONS),
            default=DEFAULTS.selection,
            show_default=True,
            help="weighted: reputation gate then score-weighted draw; paper: top-N; "
            "random: uniform (the FedAvg control)",
        ),
        click.option(
            "--dp",
            type=click.Choice(MECHANISMS),
            default=DEFAULTS.dp,
            show_default=True,
            help="local DP mechanism applied on each client during training",
        ),
        click.option(
            "--epsilon",
            type=float,
            default=DEFAULTS.epsilon,
            show_default=True,
            help="each client's total privacy budget over the run",
        ),
        click.option(
            "--delta",
            type=float,
            default=DEFAULTS.delta,
            show_default=True,
            help="DP delta (gaussian only)",
        ),
        click.option(
            "--clip",
            type=float,
            default=DEFAULTS.clip,
            show_default=True,
            help="per-sample gradient norm bound (L2 for gaussian, L1 for laplace)",
        ),
        click.option(
            "--dp-participations",
            type=int,
            default=None,
            help="rounds a client may join; noise is calibrated for this many "
            "[default: 1.1 x rounds x frac]",
        ),
        click.option(
            "--dp-subspace",
            type=int,
            default=DEFAULTS.dp_subspace,
            show_default=True,
            help="clip and noise per-sample gradients in a random public subspace of this "
            "dimension (0: full parameter space); makes --dp laplace usable",
        ),
        click.option(
            "--dp-augmentations",
            type=int,
            default=DEFAULTS.dp_augmentations,
            show_default=True,
            help="average each record's gradient over this many copies (itself and random "
            "shifts of up to 2 pixels) before clipping; same privacy, less noisy gradient",
        ),
        click.option(
            "--dp-accountant",
            type=click.Choice(ACCOUNTANTS),
            default=DEFAULTS.dp_accountant,
            show_default=True,
            help="Gaussian accounting: rdp (Renyi DP), prv (privacy loss random variables), "
            "or auto: calibrate with both and keep the one that needs less noise",
        ),
        click.option(
            "--dp-registration-share",
            type=float,
            default=DEFAULTS.dp_registration_share,
            show_default=True,
            help="share of epsilon spent on the registration's noisy label histogram",
        ),
        click.option(
            "--reproducible-noise",
            is_flag=True,
            default=DEFAULTS.reproducible_noise,
            help="draw DP noise from the run seed instead of the OS's secret generator: "
            "anyone with the seed can remove it, so there is NO privacy (tests and "
            "equivalence checks only)",
        ),
        click.option(
            "--validation/--no-validation",
            default=DEFAULTS.validation,
            show_default=True,
            help="miners' checks and Algorithm 2 (off: accept every update)",
        ),
        click.option(
            "--val-rule",
            type=click.Choice(RULES),
            default=DEFAULTS.val_rule,
            show_default=True,
            help="relative: reject below round median - k*MAD; absolute: the paper's threshold",
        ),
        click.option(
            "--val-k",
            type=float,
            default=DEFAULTS.val_k,
            show_default=True,
            help="MAD multiplier of the relative rule",
        ),
        click.option(
            "--val-threshold",
            type=float,
            default=DEFAULTS.val_threshold,
            show_default=True,
            help="minimum validation accuracy of the absolute rule",
        ),
        click.option(
            "--norm-bound",
            type=float,
            default=None,
            help="reject updates whose L2 norm exceeds this [default: no absolute bound]",
        ),
        click.option(
            "--val-norm-spread/--no-val-norm-spread",
            default=DEFAULTS.val_norm_spread,
            show_default=True,
            help="relative rule: also reject norms above the round median + k*MAD (for IID "
            "DP runs under attack; on non-IID data it rejects honest clients)",
        ),
        click.option(
            "--val-cosine-spread/--no-val-cosine-spread",
            default=DEFAULTS.val_cosine_spread,
            show_default=True,
            help="relative rule: also reject updates whose cosine with the round's other "
            "updates is below the median - k*MAD (for IID DP runs under attack)",
        ),
        click.option(
            "--val-reference-cosine/--no-val-reference-cosine",
            default=DEFAULTS.val_reference_cosine,
            show_default=True,
            help="relative rule: also reject updates whose cosine with the validation set's "
            "clipped descent direction (at --clip) is below the round median - k*MAD (for IID "
            "runs under attack; colluding attackers cannot move this reference)",
        ),
        click.option(
            "--reputation/--no-reputation",
            default=DEFAULTS.reputation,
            show_default=True,
            help="subjective-logic reputation in selection",
        ),
        click.option(
            "--rep-threshold",
            type=float,
            default=DEFAULTS.rep_threshold,
            show_default=True,
            help="reputation a client needs to be eligible (weighted selection)",
        ),
        click.option(
            "--freshness",
            type=float,
            default=DEFAULTS.freshness,
            show_default=True,
            help="per-round decay z of old evidence",
        ),
        click.option(
            "--malicious",
            type=float,
            default=DEFAULTS.malicious,
            show_default=True,
            help="fraction of clients that attack",
        ),
        click.option(
            "--attack",
            type=click.Choice(ATTACKS),
            default=DEFAULTS.attack,
            show_default=True,
            help="what malicious clients do",
        ),
        click.option(
            "--val-size",
            type=int,
            default=DEFAULTS.val_size,
            show_default=True,
            help="test images held by the miners for validation",
        ),
        click.option(
            "--test-size",
            type=int,
            default=DEFAULTS.test_size,
            show_default=True,
            help="test images used to report accuracy",
        ),
        click.option(
            "--train-size",
            type=int,
            default=DEFAULTS.train_size,
            show_default=True,
            help="training images shared among the clients",
        ),
        click.option(
            "--threads",
            type=int,
            default=DEFAULTS.threads,
            show_default=True,
            help="torch threads per process (results are identical only for equal counts)",
        ),
    ]
    for option in reversed(options):
        fn = option(fn)
    return fn


REPRODUCIBLE_NOISE_WARNING = (
    "WARNING: --reproducible-noise draws the DP noise from the run seed; anyone who knows "
    "the seed can remove it, so this run has NO differential privacy (tests and "
    "equivalence checks only)"
)


def _config(kwargs: dict[str, Any]) -> RunConfig:
    try:
        config = RunConfig(**kwargs)
    except ValueError as exc:
        raise click.UsageError(str(exc)) from exc
    if config.reproducible_noise and config.dp != "none":
        click.echo(REPRODUCIBLE_NOISE_WARNING, err=True)
    return config


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
def main() -> None:
    """LL-BCFL: blockchain-assisted federated learning with local differential privacy."""


@main.group()
def data() -> None:
    """Manage the MNIST files."""


@data.command("fetch")
@click.option(
    "--data-dir",
    type=click.Path(file_okay=False),
    default=None,
    help="where to put MNIST/raw/ [default: $LLBCFL_DATA, else ./data]",
)
def data_fetch(data_dir: str | None) -> None:
    """Download the four MNIST files (or verify the ones present) and check their MD5."""
    from commands.datafetch import fetch_mnist

    try:
        fetch_mnist(resolve_data_root(data_dir))
    except DataError as exc:
        raise click.ClickException(str(exc)) from exc


@main.command()
@_run_options
@click.option(
    "--metrics-out",
    type=click.Path(dir_okay=False),
    default=None,
    help="write the metrics JSON here",
)
@click.option(
    "--plot",
    type=click.Path(dir_okay=False),
    default=None,
    help="write an accuracy-vs-round PNG here",
)
@click.option("--quiet", is_flag=True, help="no progress bar")
def simulate(metrics_out: str | None, plot: str | None, quiet: bool, **kwargs: Any) -> None:
    """Run the whole federated loop in one process."""
    from commands.runner import run_simulate

    config = _config(kwargs)
    try:
        doc = run_simulate(
            config,
            metrics_out=Path(metrics_out) if metrics_out else None,
            plot=Path(plot) if plot else None,
            progress=not quiet,
        )
    except DataError as exc:
        raise click.ClickException(str(exc)) from exc
    except KeyboardInterrupt:
        click.echo("interrupted; completed rounds were written", err=True)
        sys.exit(130)
    click.echo(
        f"final accuracy {doc['final_accuracy']:.4f}, best {doc['best_accuracy']:.4f}, "
        f"{doc['total_seconds']:.1f} s"
    )


_selection_seed_option = click.option(
    "--selection-seed",
    type=click.Choice(SELECTION_SEEDS),
    default="block",
    show_default=True,
    help="seed of each round's client selection: 'block' = digest of the block that closed "
    "the previous round (the one holding its summary; round 1: the last registration), "
    "as in the paper's protocol; 'run' = derived from --seed, so the selection equals "
    "simulate's (for equivalence checks)",
)


@main.group()
def network() -> None:
    """Set up a network of node daemons: one server, n = 3f+1 miners, K clients."""


@network.command("init")
@_run_options
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
    "--testbed",
    is_flag=True,
    help="mark the network as a testbed for experiments on public data: only a testbed "
    "may use --reproducible-noise",
)
@_selection_seed_option
def network_init(
    out_dir: str,
    miners: int,
    host_map: str | None,
    base_port: int,
    force: bool,
    testbed: bool,
    selection_seed: str,
    **kwargs: Any,
) -> None:
    """Write OUT/genesis.toml and a key file per node (OUT/keys/<id>.key, mode 0600).

    The run options define the federated run every node will follow; the
    genesis also holds protocol parameters (timeouts, chunk size) that can be
    edited before the network starts.
    """
    from node.genesis import GenesisError, ProtocolParams, init_network, load_host_map

    config = _config(kwargs)
    out = Path(out_dir)
    try:
        hosts = load_host_map(Path(host_map)) if host_map else {}
        genesis = init_network(
            out,
            run=config,
            miners=miners,
            base_port=base_port,
            hosts=hosts,
            protocol=ProtocolParams(selection_seed=selection_seed, testbed=testbed),
            force=force,
        )
    except (GenesisError, OSError) as exc:
        raise click.ClickException(str(exc)) from exc
    members = genesis.membership
    click.echo(
        f"wrote {out / 'genesis.toml'} (network {genesis.digest.hex()[:16]}): 1 server, "
        f"{len(members.miners)} miners (f = {genesis.protocol.f}), {len(members.clients)} clients"
    )
    click.echo(f"keys in {out / 'keys'}/ (mode 0600): give each node only its own key")
    for label, nodes in (
        ("server", members.servers),
        ("miners", members.miners),
        ("clients", members.clients),
    ):
        first, last = nodes[0], nodes[-1]
        ids = first.node_id if first is last else f"{first.node_id} .. {last.node_id}"
        addresses = first.address if first is last else f"{first.address} .. {last.address}"
        click.echo(f"  {label:<8} {ids:<28} {addresses}")


@network.command("up")
@_run_options
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
@click.option(
    "--round-deadline",
    type=float,
    default=60.0,
    show_default=True,
    help="seconds the miners wait for selected clients' updates",
)
@click.option("--timeout", type=float, default=None, help="give up after this many seconds")
@click.option("--metrics-out", type=click.Path(dir_okay=False), default=None)
@_selection_seed_option
def network_up_command(
    miners: int,
    client_procs: int,
    run_dir: str | None,
    round_deadline: float,
    timeout: float | None,
    metrics_out: str | None,
    selection_seed: str,
    **kwargs: Any,
) -> None:
    """Start a whole network on 127.0.0.1 (one OS process per node), run it, stop it."""
    import time as _time

    from commands.launcher import network_up
    from node.durable import write_json_durably
    from node.genesis import GenesisError

    config = _config(kwargs)

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
            round_deadline_ms=int(round_deadline * 1000),
            selection_seed=selection_seed,
            progress=lambda line: click.echo(line, err=True),
            timeout=timeout,
        )
    except (GenesisError, RuntimeError, OSError) as exc:
        raise click.ClickException(str(exc)) from exc
    except KeyboardInterrupt:
        click.echo("interrupted; every node process was stopped", err=True)
        sys.exit(130)
    if metrics_out:
        write_json_durably(Path(metrics_out), doc)
    heads = set(doc["chain_heads"].values())
    click.echo(
        f"final accuracy {doc['final_accuracy']:.4f}, best {doc['best_accuracy']:.4f}, "
        f"{doc['total_seconds']:.1f} s; {len(doc['chain_heads'])} miners, "
        f"{'one head' if len(heads) == 1 else 'DIFFERENT heads'}; run dir {run_path}"
    )


@main.command("node")
@click.option("--role", type=click.Choice(["client", "miner", "server"]), required=True)
@click.option("--genesis", "genesis_path", type=click.Path(dir_okay=False), required=True)
@click.option("--key", "keys", multiple=True, type=click.Path(dir_okay=False), help="key file")
@click.option(
    "--key-dir",
    type=click.Path(file_okay=False),
    default=None,
    help="clients: host every client key in this folder",
)
@click.option("--data-dir", type=click.Path(file_okay=False), default=None)
@click.option("--db", type=click.Path(dir_okay=False), default=None, help="miner chain (SQLite)")
@click.option(
    "--run-dir",
    type=click.Path(file_okay=False),
    default=None,
    help="miners and server: state, blobs, checkpoints",
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
def node_command(
    role: str,
    genesis_path: str,
    keys: tuple[str, ...],
    key_dir: str | None,
    data_dir: str | None,
    db: str | None,
    run_dir: str | None,
    metrics_out: str | None,
    privacy_ledger: str | None,
) -> None:
    """Run one node daemon (or, for clients, several client identities) until SIGINT/SIGTERM."""
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
        )
    except ValueError as exc:
        raise click.ClickException(str(exc)) from exc


@main.group()
def chain() -> None:
    """Inspect and audit a miner's chain (SQLite)."""


@chain.command("show")
@click.option("--db", type=click.Path(exists=True, dir_okay=False), required=True)
@click.option("--height", type=int, default=None, help="only this block")
def chain_show(db: str, height: int | None) -> None:
    """Blocks, per-round selections and verdicts, reputations and privacy spent."""
    from commands.chaintools import show_chain

    try:
        for line in show_chain(Path(db), height=height):
            click.echo(line)
    except ValueError as exc:
        raise click.ClickException(str(exc)) from exc


@chain.command("verify")
@click.option("--db", type=click.Path(exists=True, dir_okay=False), required=True)
@click.option("--genesis", "genesis_path", type=click.Path(dir_okay=False), required=True)
def chain_verify(db: str, genesis_path: str) -> None:
    """Check links, payload digests, commit certificates and record signatures."""
    from commands.chaintools import verify_chain_file

    try:
        ok, message = verify_chain_file(Path(db), Path(genesis_path))
    except ValueError as exc:
        raise click.ClickException(str(exc)) from exc
    click.echo(message)
    if not ok:
        sys.exit(1)


main.add_command(privacy)


@privacy.command("plan")
@_run_options
def privacy_plan(**kwargs: Any) -> None:
    """Print the privacy plan of a run as JSON: the calibrated noise, the registration
    histogram's noise, and epsilon per participation and in total by each accountant."""
    import json

    from fl.rounds import privacy_report

    click.echo(json.dumps(privacy_report(_config(kwargs)), indent=1))


@main.command()
@click.argument("metrics", nargs=-1, required=True, type=click.Path(exists=True, dir_okay=False))
@click.option("--out", type=click.Path(dir_okay=False), required=True, help="PNG to write")
@click.option("--title", default=None, help="figure title")
@click.option("--label", "labels", multiple=True, help="legend label per file, in order")
def plot(metrics: tuple[str, ...], out: str, title: str | None, labels: tuple[str, ...]) -> None:
    """Overlay accuracy-vs-round curves of saved runs (METRICS are JSON files)."""
    from commands.plotting import plot_runs
    from commands.runner import read_metrics

    if labels and len(labels) != len(metrics):
        raise click.UsageError(f"{len(labels)} --label given for {len(metrics)} files")
    try:
        docs = [read_metrics(Path(m)) for m in metrics]
    except ValueError as exc:
        raise click.ClickException(str(exc)) from exc
    plot_runs(docs, Path(out), title=title, labels=labels or None)
    click.echo(f"wrote {out}")


if __name__ == "__main__":
    main()
