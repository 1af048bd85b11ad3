"""``data``: manage the MNIST files (``data fetch``)."""

from __future__ import annotations

import click

from fl.data import DataError, resolve_data_root


@click.group()
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
