"""Accuracy-vs-round figures from metrics files (the paper's Figures 3-8)."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt

# Options that name a run in a legend, in the order they are shown.
LABEL_KEYS = (
    "dist",
    "dp",
    "epsilon",
    "model",
    "local_epochs",
    "frac",
    "aggregation",
    "selection",
    "malicious",
    "attack",
    "validation",
    "reputation",
)


def run_labels(configs: Sequence[dict[str, Any]]) -> list[str]:
    """Label each run by the options that differ between the runs shown."""
    keys = [k for k in LABEL_KEYS if any(k in c for c in configs)]
    if len(configs) > 1:
        varying = [k for k in keys if len({repr(c.get(k)) for c in configs}) > 1]
        keys = varying or keys[:2]
    return [", ".join(f"{k}={c.get(k)}" for k in keys) or "run" for c in configs]


def plot_runs(
    docs: Sequence[dict[str, Any]],
    out: Path,
    *,
    title: str | None = None,
    labels: Sequence[str] | None = None,
) -> None:
    names = list(labels) if labels else run_labels([d.get("config", {}) for d in docs])
    fig, ax = plt.subplots(figsize=(7, 4.5))
    for doc, name in zip(docs, names, strict=True):
        rounds = [r["round"] for r in doc["rounds"]]
        acc = [100.0 * r["accuracy"] for r in doc["rounds"]]
        ax.plot(rounds, acc, label=name, linewidth=1.4)
    ax.set_xlabel("round")
    ax.set_ylabel("test accuracy (%)")
    ax.grid(True, alpha=0.3)
    if title:
        ax.set_title(title)
    ax.legend(fontsize=8)
    fig.tight_layout()
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=120)
    plt.close(fig)
