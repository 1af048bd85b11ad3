"""``privacy``: the DP plan a run would use, and an empirical audit of the client's release.

``privacy plan`` prints the calibration of a run (noise, histogram noise,
epsilon per participation and in total, by each accountant) as JSON.
``privacy audit`` plays the distinguishing game of ``fl.audit`` against the
real client code at the reference benchmark setting (non-IID MNIST, K=100,
20 clients per round, 100 rounds, full-batch DP-SGD with server momentum)
and prints the empirical lower bound on epsilon next to the accountant's
claim, as JSON; it exits 1 when the bound exceeds the claim.
"""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path
from typing import Any

import click
import torch

from commands.options import run_config, run_options
from fl.config import RunConfig
from fl.data import DataError, load_mnist, resolve_data_root

# The reference benchmark setting (bench/accuracy.py): what the audit audits.
AUDIT_SETTING: dict[str, Any] = {
    "clients": 100,
    "frac": 0.2,
    "rounds": 100,
    "dist": "noniid",
    "model": "cnn",
    "batch_size": 600,
    "local_epochs": 1.0,
    "momentum": 0.0,
    "dropout": False,
    "server_momentum": 0.9,
    "delta": 1e-5,
    "clip": 1.0,
}
MECHANISM_SETTING: dict[str, dict[str, Any]] = {
    "gaussian": {"lr": 2.0},
    "laplace": {"lr": 10.0, "dp_subspace": 128},
}
# --quick: fewer trials on fewer records (same noise, clip and claim).
QUICK = {"trials": 2000, "records": 20}
FULL = {"trials": 10000, "records": 50}
CANARY_CANDIDATES = 50


@click.group()
def privacy() -> None:
    """Inspect a run's privacy plan; audit the client's release empirically."""


@privacy.command("plan")
@run_options
def privacy_plan(**kwargs: Any) -> None:
    """Print the privacy plan of a run as JSON: the calibrated noise, the registration
    histogram's noise, and epsilon per participation and in total by each accountant."""
    from fl.rounds import privacy_report

    click.echo(json.dumps(privacy_report(run_config(kwargs)), indent=1))


@privacy.command("audit")
@click.option(
    "--dp", type=click.Choice(["gaussian", "laplace"]), default="gaussian", show_default=True
)
@click.option(
    "--epsilon",
    type=float,
    default=10.0,
    show_default=True,
    help="each client's total budget over the run (the per-release claim follows from it)",
)
@click.option(
    "--trials",
    type=int,
    default=None,
    help=f"[default: {FULL['trials']}; --quick: {QUICK['trials']}]",
)
@click.option(
    "--records",
    type=int,
    default=None,
    help=f"the audited client's records besides the canary [default: {FULL['records']}; "
    f"--quick: {QUICK['records']}]",
)
@click.option("--quick", is_flag=True, help="fewer trials and records: under 2 minutes on 2 cores")
@click.option(
    "--reproducible-noise",
    is_flag=True,
    help="audit a client whose noise is seeded (public): the audit must then fail",
)
@click.option(
    "--fault",
    type=click.Choice(["none", "halve-sensitivity"]),
    default="none",
    show_default=True,
    help="break the client on purpose: halve-sensitivity calibrates the noise for half the "
    "real sensitivity (the audit must then fail)",
)
@click.option(
    "--confidence",
    type=float,
    default=0.95,
    show_default=True,
    help="probability that the reported lower bound holds",
)
@click.option("--seed", type=int, default=0, show_default=True, help="data, canary and trial order")
@click.option("--data-dir", type=click.Path(file_okay=False), default=None, help="MNIST root")
@click.option(
    "--out", type=click.Path(dir_okay=False), default=None, help="also write the JSON here"
)
@click.option("--quiet", is_flag=True, help="no progress on stderr")
def audit(
    dp: str,
    epsilon: float,
    trials: int | None,
    records: int | None,
    quick: bool,
    reproducible_noise: bool,
    fault: str,
    confidence: float,
    seed: int,
    data_dir: str | None,
    out: str | None,
    quiet: bool,
) -> None:
    """Audit one client's update: a canary in or out, many trials, a lower bound on epsilon.

    Prints JSON: the claimed epsilon of one participation (by each
    accountant), the empirical lower bound with its confidence, how close it
    comes, and whether noise regenerated from the public seed explains the
    update (the curious miner's attack). Exit status 1 when the lower bound
    exceeds the claim, i.e. the client leaks more than it says.
    """
    from chain.models import initial_weights
    from fl.audit import AuditSetup, choose_canary, run_audit
    from fl.models import build_model
    from fl.seeds import torch_generator
    from node.durable import write_json_durably

    sizes = QUICK if quick else FULL
    trials = sizes["trials"] if trials is None else trials
    records = sizes["records"] if records is None else records
    if records < 1 or trials < 40:
        raise click.UsageError("--records must be >= 1 and --trials >= 40")
    try:
        config = RunConfig(
            **AUDIT_SETTING,
            **MECHANISM_SETTING[dp],
            dp=dp,
            epsilon=epsilon,
            seed=seed,
            reproducible_noise=reproducible_noise,
            data_dir=data_dir,
        )
    except ValueError as exc:
        raise click.UsageError(str(exc)) from exc
    torch.set_num_threads(1)
    try:
        splits = load_mnist(resolve_data_root(data_dir), train_size=60_000, val_size=1, test_size=1)
    except DataError as exc:
        raise click.ClickException(str(exc)) from exc
    order = torch.randperm(60_000, generator=torch_generator(seed, "audit", "records"))
    x, y = splits.train.x[order], splits.train.y[order]
    model = build_model(config.model, generator=torch.Generator())
    weights = initial_weights(config)
    pool = slice(records, records + CANARY_CANDIDATES)
    pick = records + choose_canary(model, weights, x[pool], y[pool])
    setup = AuditSetup(
        config=config,
        x=x[:records],
        y=y[:records],
        canary_x=x[pick : pick + 1],
        canary_y=(y[pick : pick + 1] + 1) % 10,  # a mislabelled record
        model=model,
        weights=weights,
        fault=fault,
    )
    start = time.perf_counter()

    def show(done: int, total: int) -> None:
        if not quiet and (done % max(1, total // 20) == 0 or done == total):
            elapsed = time.perf_counter() - start
            left = elapsed / done * (total - done)
            click.echo(
                f"audit: trial {done}/{total}, {elapsed:.0f} s, about {left:.0f} s left", err=True
            )

    try:
        result = run_audit(setup, trials=trials, seed=seed, confidence=confidence, progress=show)
    except ValueError as exc:
        raise click.UsageError(str(exc)) from exc
    report = {**result.report, "seconds": round(time.perf_counter() - start, 1)}
    text = json.dumps(report, indent=1)
    click.echo(text)
    if out:
        write_json_durably(Path(out), report)
    if not result.passed:
        click.echo(
            f"AUDIT FAILED: empirical epsilon >= {report['empirical_epsilon_lower_bound']:.3f} "
            f"exceeds the claim {report['claimed_epsilon_per_release']:.3f}",
            err=True,
        )
        sys.exit(1)
