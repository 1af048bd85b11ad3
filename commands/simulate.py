"""``simulate``: the whole federated loop in one process."""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Any

import click

from commands.options import run_config, run_options
from fl.data import DataError


@click.command()
@run_options
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
    help="write a PNG of the run here: accuracy, privacy spent and accepted/rejected "
    "clients per round",
)
@click.option("--quiet", is_flag=True, help="no progress bar")
def simulate(metrics_out: str | None, plot: str | None, quiet: bool, **kwargs: Any) -> None:
    """Run the whole federated loop in one process; print a summary at the end."""
    from commands.runner import run_simulate
    from commands.summary import run_summary

    config = run_config(kwargs)
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
    files = {"plot": plot if doc["rounds"] else None, "metrics": metrics_out}
    for line in run_summary(doc, files={k: v for k, v in files.items() if v}):
        click.echo(line)
