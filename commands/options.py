"""Options shared by several commands: the run options and ``--selection-seed``."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import click

from chain.records import SELECTION_SEEDS
from fl.aggregation import AGGREGATIONS
from fl.attacks import ATTACKS
from fl.config import SELECTIONS, SERVER_LR_DECAYS, RunConfig
from fl.models import MODEL_NAMES
from fl.partition import DISTRIBUTIONS
from fl.privacy import ACCOUNTANTS, MECHANISMS
from fl.validation import RULES

DEFAULTS = RunConfig()


def run_options(fn: Callable[..., Any]) -> Callable[..., Any]:
    """The federated-run options of ``simulate``, ``network init``, ``network up`` and
    ``privacy plan``."""
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


def run_config(kwargs: dict[str, Any]) -> RunConfig:
    try:
        config = RunConfig(**kwargs)
    except ValueError as exc:
        raise click.UsageError(str(exc)) from exc
    if config.reproducible_noise and config.dp != "none":
        click.echo(REPRODUCIBLE_NOISE_WARNING, err=True)
    return config


selection_seed_option = click.option(
    "--selection-seed",
    type=click.Choice(SELECTION_SEEDS),
    default="block",
    show_default=True,
    help="seed of each round's client selection: 'block' = digest of the block that closed "
    "the previous round (the one holding its summary; round 1: the last registration), "
    "as in the paper's protocol; 'run' = derived from --seed, so the selection equals "
    "simulate's (for equivalence checks)",
)
