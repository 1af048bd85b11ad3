"""``reproduce paper``: the paper's 18 runs, its Figures 3-8 and a point-by-point table."""

from __future__ import annotations

import json
import os
import platform
import re
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import click

from fl.data import DataError


@click.group()
def reproduce() -> None:
    """Regenerate published results with this implementation."""


@reproduce.command("paper")
@click.option(
    "--out",
    "out_dir",
    type=click.Path(file_okay=False),
    required=True,
    help="folder for the runs, fig3.png ... fig8.png and README.md (rerun to resume)",
)
@click.option(
    "--epsilon",
    type=float,
    default=10.0,
    show_default=True,
    help="each client's total budget in the DP runs (the paper does not state its own)",
)
@click.option(
    "--jobs",
    type=click.IntRange(1, 64),
    default=2,
    show_default=True,
    help="runs at a time, one process each",
)
@click.option("--seed", type=int, default=0, show_default=True)
@click.option(
    "--data-dir",
    type=click.Path(file_okay=False),
    default=None,
    help="MNIST root holding MNIST/raw/ [default: $LLBCFL_DATA, else ./data]",
)
@click.option(
    "--quick",
    is_flag=True,
    help="the whole pipeline in a few minutes: 2-4 rounds a run on a tenth of the data "
    "(checks the command, not the paper)",
)
@click.option(
    "--doc",
    type=click.Path(dir_okay=False, exists=True),
    default=None,
    help="also put the results into this markdown file, between its '<!-- results: begin -->' "
    "and '<!-- results: end -->' lines, and copy the figures to img/paper/ beside it "
    "(how docs/PAPER.md is made)",
)
def reproduce_paper(
    out_dir: str,
    epsilon: float,
    jobs: int,
    seed: int,
    data_dir: str | None,
    quick: bool,
    doc: str | None,
) -> None:
    """Run the paper's experiments (IID and non-IID MNIST; no DP, Laplace and Gaussian
    local DP; 100, 200 and 500 rounds; K = 100 clients, 10% a round), draw its
    Figures 3-8 in its layout and write OUT/README.md with the settings and a
    table of the paper's statements beside the numbers measured here.

    Finished runs are kept in OUT/runs/; run the same command again to resume
    after an interruption. A full run takes about 70-90 minutes on 2 cores
    with --jobs 2.
    """
    from commands import paper

    if not (epsilon > 0 and epsilon < float("inf")):
        raise click.UsageError(f"--epsilon must be a positive number, got {epsilon}")
    out = Path(out_dir)
    try:
        the_plan = paper.plan(out, epsilon=epsilon, seed=seed, data_dir=data_dir, quick=quick)
    except ValueError as exc:
        raise click.UsageError(str(exc)) from exc
    _check_data(the_plan)
    total = len(the_plan.configs)
    kept = len(the_plan.done)
    click.echo(
        f"{total} runs draw the 18 curves ({kept} already finished in {out / 'runs'}); "
        f"{the_plan.rounds_left()} rounds to go, {jobs} at a time",
        err=True,
    )
    started = time.monotonic()
    try:
        _execute(the_plan, jobs=jobs)
    except KeyboardInterrupt:
        click.echo(
            f"\ninterrupted: {len(the_plan.done)} of {total} runs finished and kept in "
            f"{out / 'runs'}; run the same command to resume",
            err=True,
        )
        sys.exit(130)
    except DataError as exc:
        raise click.ClickException(str(exc)) from exc
    wall = _add_wall_time(out, time.monotonic() - started)
    paths = _write_results(the_plan, epsilon=epsilon, quick=quick, wall=wall, jobs=jobs)
    click.echo(f"wrote {', '.join(p.name for p in paths)} in {out}")
    if doc is not None:
        try:
            _fill_doc(Path(doc), readme=paths[-1], figures=paths[:-1])
        except ValueError as exc:
            raise click.ClickException(str(exc)) from exc
        click.echo(f"wrote the results into {doc}")


def _check_data(the_plan: Any) -> None:
    """Fail early, with the data's own message, rather than in every worker."""
    from fl.datasets import dataset_of, resolve_data_root

    config = next(iter(the_plan.configs.values()))
    try:
        dataset_of(config).load(
            resolve_data_root(config.data_dir), train_size=1, val_size=1, test_size=1
        )
    except DataError as exc:
        raise click.ClickException(str(exc)) from exc


def _execute(the_plan: Any, *, jobs: int) -> None:
    from tqdm import tqdm

    from commands import paper

    total_runs = len(the_plan.configs)
    bar = tqdm(total=the_plan.rounds_left(), unit="round", desc="reproduce", file=sys.stderr)
    latest: dict[str, str] = {}

    def on_round(name: str, rnd: int, accuracy: float) -> None:
        run = next(r for r in the_plan.configs if r.name == name)
        latest[name] = f"{name} {rnd}/{the_plan.configs[run].rounds} {100 * accuracy:.1f}%"
        bar.set_description(f"run {len(the_plan.done) + 1}/{total_runs}")
        bar.set_postfix_str(" | ".join(latest.values()))
        bar.update(1)

    def on_done(run: Any) -> None:
        latest.pop(run.name, None)
        doc = the_plan.done[run]
        bar.write(
            f"finished {run.name} ({len(the_plan.done)}/{total_runs}): final accuracy "
            f"{100 * doc['final_accuracy']:.1f}%, {doc['total_seconds'] / 60:.1f} min"
        )

    try:
        paper.execute(the_plan, jobs=jobs, on_round=on_round, on_done=on_done)
    finally:
        bar.close()


def _add_wall_time(out: Path, seconds: float) -> float:
    """The wall time of every invocation that worked on ``out``, this one included."""
    from node.durable import write_json_durably

    path = out / "wall_time.json"
    try:
        before = float(json.loads(path.read_text())["seconds"])
    except (OSError, ValueError, KeyError, TypeError):
        before = 0.0
    write_json_durably(path, {"seconds": before + seconds})
    return before + seconds


PRIVACY_HEADER = (
    "| mechanism | ε (total) | δ | accountant | participations | sample rate | steps a round "
    "| noise multiplier (Gaussian) or ε per step (Laplace) |"
)


def _commit() -> str:
    try:
        return subprocess.run(
            ["git", "rev-parse", "--short", "HEAD"],
            capture_output=True,
            text=True,
            check=True,
            cwd=Path(__file__).resolve().parent,
        ).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return "unknown"


def _write_results(
    the_plan: Any, *, epsilon: float, quick: bool, wall: float, jobs: int
) -> list[Path]:
    from commands import paper
    from commands.paper_report import draw_figures, finals_table, statements_table
    from fl.config import TUNED

    docs = paper.documents(the_plan)
    paths = draw_figures(docs, the_plan.out, epsilon=epsilon)
    sample = {m: docs[paper.Curve("iid", m, 100)] for m in paper.MECHS}
    config = sample["none"]["config"]
    tuned_rows = "\n".join(
        f"| {name} | " + " | ".join(str(sample[m]["config"][name]) for m in paper.MECHS) + " |"
        for name in TUNED
    )
    privacy_rows = []
    for mech in ("laplace", "gaussian"):
        p = sample[mech]["privacy"]
        privacy_rows.append(
            f"| {mech} | {p['epsilon']:g} | {p['delta']:g} | {p['accountant']} | "
            f"{p['participations']} | {p['sample_rate']:g} | {p['steps']} | "
            f"{p['noise_multiplier_or_eps0']:.4g} |"
        )
    quick_note = (
        "\n**--quick run: 2-4 rounds on a tenth of the data. It checks the pipeline; its "
        "numbers say nothing about the paper.**\n"
        if quick
        else ""
    )
    figures = "\n".join(f"![{p.stem}]({p.name})" for p in paths)
    text = f"""# The paper's Figures 3-8, reproduced
{quick_note}
Made by `python cli.py reproduce paper --out {the_plan.out} --epsilon {epsilon:g} --jobs {jobs}`
at commit {_commit()}, in {wall / 60:.1f} min of wall time on {os.cpu_count()} cores
({platform.machine()}, Python {platform.python_version()}).

## Settings

- MNIST, K = {config["clients"]} clients, {config["frac"]:.0%} of them selected a round,
  {config["train_size"]} training images; IID, or non-IID with two label shards per client.
- Test accuracy on {config["test_size"]} MNIST test images; the miners validate on
  {config["val_size"]} others. Seed {config["seed"]}.
- Local DP is record-level, per client, under add/remove-one adjacency, and its
  budget covers everything a client releases: the registration's noisy label histogram
  ({sample["gaussian"]["config"]["dp_registration_share"]:.0%} of ε) and every update. The
  noise comes from the operating system's secret generator.
- Each mechanism runs with its tuned settings, the defaults of `simulate` and `network`:

| option | No-DP | Laplace-DP | Gaussian-DP |
|---|---|---|---|
{tuned_rows}

{PRIVACY_HEADER}
|---|---|---|---|---|---|---|---|
{chr(10).join(privacy_rows)}

The no-DP curves at 100 and 200 rounds are the first rounds of the 500-round run: without
DP no option depends on the run's length, so these runs would repeat it round for round.
The DP runs calibrate their noise for their length, so each is a run of its own
({len(the_plan.configs)} runs in all).

## Figures

{figures}

## Final accuracy (%)

{finals_table(docs)}

## The paper's statements beside ours

"no" in the last column means the curves here do not behave as the paper describes
(higher or lower: the numbers say which).

{statements_table(docs)}
"""
    readme = the_plan.out / "README.md"
    readme.write_text(text)
    return [*paths, readme]


BEGIN, END = "<!-- results: begin -->", "<!-- results: end -->"


def _fill_doc(doc: Path, *, readme: Path, figures: list[Path]) -> None:
    """Put ``readme``'s body between ``doc``'s result markers; copy the figures beside it."""
    import shutil

    text = doc.read_text()
    if text.count(BEGIN) != 1 or text.count(END) != 1 or text.index(BEGIN) > text.index(END):
        raise ValueError(f"{doc} needs one {BEGIN!r} line followed by one {END!r} line")
    images = doc.parent / "img" / "paper"
    images.mkdir(parents=True, exist_ok=True)
    for figure in figures:
        shutil.copyfile(figure, images / figure.name)
    body = readme.read_text().split("\n", 1)[1].strip()  # without its title
    for figure in figures:
        body = body.replace(f"]({figure.name})", f"](img/paper/{figure.name})")
    body = re.sub(r"(?m)^## ", "### ", body)  # its sections go under the doc's
    head, rest = text.split(BEGIN, 1)
    tail = rest.split(END, 1)[1]
    doc.write_text(f"{head}{BEGIN}\n{body}\n{END}{tail}")
