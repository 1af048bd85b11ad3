"""``plot``: overlay accuracy-vs-round curves of saved runs."""

from __future__ import annotations

from pathlib import Path

import click


@click.command()
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
