"""``plot``: a figure of one saved run, or the accuracy curves of several overlaid."""

from __future__ import annotations

from pathlib import Path

import click


@click.command()
@click.argument("metrics", nargs=-1, required=True, type=click.Path(exists=True, dir_okay=False))
@click.option("--out", type=click.Path(dir_okay=False), required=True, help="PNG to write")
@click.option(
    "--title",
    default=None,
    help="figure title [default: the final and best accuracy, or 'Test accuracy per round']",
)
@click.option(
    "--label",
    "labels",
    multiple=True,
    help="legend label per file, in order [default: the options that differ]",
)
def plot(metrics: tuple[str, ...], out: str, title: str | None, labels: tuple[str, ...]) -> None:
    """Plot saved runs (METRICS are JSON files).

    One file: its accuracy, privacy spent and accepted/rejected clients per
    round. Several: their accuracy curves overlaid, labelled by the options
    that differ; the options they share go in the subtitle.
    """
    from commands.plotting import plot_metrics
    from commands.runner import read_metrics

    if labels and len(labels) != len(metrics):
        raise click.UsageError(f"{len(labels)} --label given for {len(metrics)} files")
    try:
        docs = [read_metrics(Path(m)) for m in metrics]
    except ValueError as exc:
        raise click.ClickException(str(exc)) from exc
    plot_metrics(docs, Path(out), title=title, labels=labels or None)
    click.echo(f"wrote {out}")
