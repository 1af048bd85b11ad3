"""``chain``: inspect and audit a miner's chain (``show``, ``verify``)."""

from __future__ import annotations

import sys
from pathlib import Path

import click


@click.group()
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
        check = verify_chain_file(Path(db), Path(genesis_path))
    except ValueError as exc:
        raise click.ClickException(str(exc)) from exc
    click.echo(check.message)
    if not check.ok:
        sys.exit(1)
