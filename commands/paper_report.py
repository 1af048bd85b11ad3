"""The paper's figures in its layout, and the table of its statements beside ours.

Each of Figures 3-8 has three panels, left to right No-DP, Laplace-DP and
Gaussian-DP, for one partition and one length; the axes are the same
across a figure. The table puts each conclusion the paper draws from them
beside the number measured here.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt

from commands.paper import DIST_TITLES, FIGURES, MECHS, PANEL_TITLES, Curve

Docs = dict[Curve, dict[str, Any]]
COLOURS = {"none": "#1f77b4", "laplace": "#d62728", "gaussian": "#2ca02c"}


def draw_figure(docs: Docs, dist: str, rounds: int, out: Path, *, epsilon: float) -> None:
    number = FIGURES[(dist, rounds)]
    fig, axes = plt.subplots(1, 3, figsize=(13, 4.2), sharey=True)
    for ax, mech in zip(axes, MECHS, strict=True):
        doc = docs[Curve(dist, mech, rounds)]
        xs = [r["round"] for r in doc["rounds"]]
        ys = [100.0 * r["accuracy"] for r in doc["rounds"]]
        ax.plot(xs, ys, color=COLOURS[mech], linewidth=1.3)
        title = PANEL_TITLES[mech] + ("" if mech == "none" else f" (ε = {epsilon:g})")
        ax.set_title(f"{title}\nfinal {ys[-1]:.1f}%, best {max(ys):.1f}%", fontsize=10)
        ax.set_xlabel("round")
        ax.set_xlim(0, len(xs) + 1)
        ax.set_ylim(0, 100)
        ax.grid(True, alpha=0.3)
    axes[0].set_ylabel("global test accuracy (%)")
    fig.suptitle(
        f"Fig. {number}. Accuracy of LL-BCFL on {DIST_TITLES[dist]} MNIST over {rounds} rounds "
        "(K = 100, 10% of clients a round)",
        fontsize=11,
    )
    fig.tight_layout()
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=110)
    plt.close(fig)


def draw_figures(docs: Docs, out: Path, *, epsilon: float) -> list[Path]:
    paths = []
    for (dist, rounds), number in sorted(FIGURES.items(), key=lambda kv: kv[1]):
        path = out / f"fig{number}.png"
        draw_figure(docs, dist, rounds, path, epsilon=epsilon)
        paths.append(path)
    return paths


# The paper's statements ----------------------------------------------------


def final(docs: Docs, dist: str, mech: str, rounds: int) -> float:
    return 100.0 * docs[Curve(dist, mech, rounds)]["final_accuracy"]


def spread_last(docs: Docs, dist: str, mech: str, rounds: int, n: int = 10) -> float:
    """Max minus min of the last ``n`` rounds' accuracy, in points: how settled the curve is."""
    acc = [100.0 * r["accuracy"] for r in docs[Curve(dist, mech, rounds)]["rounds"][-n:]]
    return max(acc) - min(acc)


@dataclass(frozen=True)
class Statement:
    figure: str
    paper: str
    measure: Callable[[Docs], str]
    criterion: str  # what "holds" is taken to mean
    holds: Callable[[Docs], bool]  # does the paper's statement hold for our curves?


def _pair(docs: Docs, dist: str, rounds: int) -> str:
    return (
        f"Laplace {final(docs, dist, 'laplace', rounds):.1f}%, "
        f"Gaussian {final(docs, dist, 'gaussian', rounds):.1f}%"
    )


def _not_converged(docs: Docs, dist: str, rounds: int) -> str:
    return "; ".join(
        f"{PANEL_TITLES[m]} final {final(docs, dist, m, rounds):.1f}%, last 10 rounds within "
        f"{spread_last(docs, dist, m, rounds):.1f} points"
        for m in ("laplace", "gaussian")
    )


def _gain(docs: Docs, mech: str) -> float:
    return final(docs, "noniid", mech, 200) - final(docs, "noniid", mech, 100)


def _gap_to_none(docs: Docs, mech: str) -> float:
    return final(docs, "iid", "none", 500) - final(docs, "iid", mech, 500)


STATEMENTS = (
    Statement(
        "3 (IID, 100)",
        "Laplace reaches about 90%",
        lambda d: f"Laplace {final(d, 'iid', 'laplace', 100):.1f}%",
        "within 3 points of 90",
        lambda d: abs(final(d, "iid", "laplace", 100) - 90) <= 3,
    ),
    Statement(
        "3 (IID, 100)",
        "Gaussian reaches at most 70%",
        lambda d: f"Gaussian {final(d, 'iid', 'gaussian', 100):.1f}%",
        "at most 70",
        lambda d: final(d, "iid", "gaussian", 100) <= 70,
    ),
    Statement(
        "4 (non-IID, 100)",
        "neither noisy variant converges",
        lambda d: _not_converged(d, "noniid", 100),
        "each ends with its last 10 rounds more than 2 points apart",
        # Converged: the last 10 rounds within 2 points of each other.
        lambda d: all(spread_last(d, "noniid", m, 100) > 2 for m in ("laplace", "gaussian")),
    ),
    Statement(
        "5 (IID, 200)",
        "both noisy variants end between 80% and 90%",
        lambda d: _pair(d, "iid", 200),
        "both in [80, 90]",
        lambda d: all(80 <= final(d, "iid", m, 200) <= 90 for m in ("laplace", "gaussian")),
    ),
    Statement(
        "6 (non-IID, 200)",
        "Laplace ends 10 points above its 100-round figure",
        lambda d: (
            f"{_gain(d, 'laplace'):+.1f} points ({final(d, 'noniid', 'laplace', 100):.1f}"
            f"% → {final(d, 'noniid', 'laplace', 200):.1f}%)"
        ),
        "gain within 3 points of +10",
        lambda d: abs(_gain(d, "laplace") - 10) <= 3,
    ),
    Statement(
        "6 (non-IID, 200)",
        "Gaussian improves markedly over its 100-round figure",
        lambda d: (
            f"{_gain(d, 'gaussian'):+.1f} points ({final(d, 'noniid', 'gaussian', 100):.1f}"
            f"% → {final(d, 'noniid', 'gaussian', 200):.1f}%)"
        ),
        "gain of 5 points or more",
        lambda d: _gain(d, "gaussian") >= 5,
    ),
    Statement(
        "7 (IID, 500)",
        "the noisy curves end close to the no-DP curve",
        lambda d: (
            f"no DP {final(d, 'iid', 'none', 500):.1f}%; gap Laplace "
            f"{_gap_to_none(d, 'laplace'):.1f}, Gaussian {_gap_to_none(d, 'gaussian'):.1f} points"
        ),
        "both within 3 points of no DP",
        lambda d: all(_gap_to_none(d, m) <= 3 for m in ("laplace", "gaussian")),
    ),
    Statement(
        "8 (non-IID, 500)",
        "non-IID at 500 rounds reaches what IID reached at 200",
        lambda d: "; ".join(
            f"{PANEL_TITLES[m]} {final(d, 'noniid', m, 500):.1f}% vs {final(d, 'iid', m, 200):.1f}%"
            for m in MECHS
        ),
        "each non-IID 500-round final at least the IID 200-round final minus 2",
        lambda d: all(final(d, "noniid", m, 500) >= final(d, "iid", m, 200) - 2 for m in MECHS),
    ),
)


def statements_table(docs: Docs) -> str:
    lines = [
        "| figure | the paper | measured here | taken to hold when | holds here |",
        "|---|---|---|---|---|",
    ]
    for s in STATEMENTS:
        lines.append(
            f"| {s.figure} | {s.paper} | {s.measure(docs)} | {s.criterion} | "
            f"{'yes' if s.holds(docs) else 'no'} |"
        )
    return "\n".join(lines)


def finals_table(docs: Docs) -> str:
    lines = [
        "| partition | rounds | No-DP | Laplace-DP | Gaussian-DP |",
        "|---|---|---|---|---|",
    ]
    for (dist, rounds), _ in sorted(FIGURES.items(), key=lambda kv: kv[1]):
        cells = " | ".join(f"{final(docs, dist, m, rounds):.1f}" for m in MECHS)
        lines.append(f"| {DIST_TITLES[dist]} | {rounds} | {cells} |")
    return "\n".join(lines)
