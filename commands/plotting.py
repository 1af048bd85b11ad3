"""Figures from metrics files.

Two kinds:

- :func:`plot_runs` overlays the accuracy-vs-round curves of several runs
  (the paper's Figures 3-8). The legend names each curve by the options that
  differ between the runs (:func:`run_labels`); the options they share go in
  a small subtitle (:func:`shared_options`). The legend sits below the axes,
  so it never covers a curve.
- :func:`plot_run` shows one run: test accuracy per round, and below it, on
  the same rounds, the privacy spent (max and mean over clients, against the
  budget; no panel without DP) and the accepted, rejected and silent
  clients of every round.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Sequence
from dataclasses import fields
from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt
from matplotlib.ticker import MaxNLocator

from fl.config import TUNED, RunConfig
from fl.privacy import MECHANISMS, mechanism_of

# Options that say what a run is, shown in a subtitle whatever their value and
# in this order; every other option is shown only where it differs from its
# default. Legends list the differing options in the same order.
CORE_KEYS = (
    "dataset",
    "model",
    "clients",
    "frac",
    "rounds",
    "dist",
    "alpha",
    "dp",
    "epsilon",
    "malicious",
    "attack",
)
# Never shown: where the data is, and how many threads ran it.
HIDDEN_KEYS = frozenset({"data_dir", "threads", "malicious_clients"})
DEFAULTS: dict[str, Any] = {f.name: f.default for f in fields(RunConfig)}

_DP_KEYS = frozenset(
    {
        "epsilon",
        "delta",
        "clip",
        "dp_participations",
        "dp_subspace",
        "dp_augmentations",
        "dp_accountant",
        "dp_registration_share",
        "reproducible_noise",
    }
)
_VALIDATION_KEYS = frozenset(
    {
        "val_rule",
        "val_k",
        "val_threshold",
        "norm_bound",
        "val_norm_spread",
        "val_cosine_spread",
        "val_reference_cosine",
    }
)
# An option that means nothing for this run (epsilon without DP, the attack
# without attackers ...) is left out of its label and its subtitle.
_RELEVANT: dict[str, Callable[[dict[str, Any]], bool]] = {
    **{k: (lambda c: c.get("dp", "none") != "none") for k in _DP_KEYS},
    **{k: (lambda c: bool(c.get("validation", True))) for k in _VALIDATION_KEYS},
    "alpha": lambda c: c.get("dist") == "dirichlet",
    "attack": lambda c: bool(c.get("malicious")),
    "rep_threshold": lambda c: bool(c.get("reputation", True)),
    "freshness": lambda c: bool(c.get("reputation", True)),
}

SUBTITLE_WIDTH = 95  # characters per subtitle line at the default figure width


def _relevant(key: str, config: dict[str, Any]) -> bool:
    return key in config and _RELEVANT.get(key, lambda c: True)(config)


def _ordered_keys(configs: Sequence[dict[str, Any]]) -> list[str]:
    seen: list[str] = []
    for c in configs:
        seen += [k for k in c if k not in seen and k not in HIDDEN_KEYS]
    core = [k for k in CORE_KEYS if k in seen]
    return core + [k for k in seen if k not in CORE_KEYS]


def _value(value: Any) -> str:
    if isinstance(value, bool):
        return "on" if value else "off"
    if isinstance(value, float):
        return f"{value:g}"
    return str(value)


def option_text(key: str, value: Any) -> str:
    """One option as the command line spells it: ``server-momentum=0.9``."""
    if key == "dp" and value == "none":
        return "no DP"
    if key == "malicious" and not value:
        return "no attackers"
    return f"{key.replace('_', '-')}={_value(value)}"


def _default(key: str, config: dict[str, Any]) -> Any:
    """``key``'s default in a run like ``config``: its mechanism's tuned value for a
    tuned option (``fl.config.TUNED``)."""
    if key in TUNED and config.get("dp") in MECHANISMS:
        return mechanism_of(config["dp"]).tuned_options(config.get("epsilon", 10.0))[key]
    return DEFAULTS[key]


def _worth_showing(key: str, config: dict[str, Any]) -> bool:
    return key in CORE_KEYS or key not in DEFAULTS or config.get(key) != _default(key, config)


def differing_options(configs: Sequence[dict[str, Any]]) -> list[str]:
    """The options that tell the runs apart (ordered as shown): those with different
    values where they mean something, and those that mean something in some runs
    only (epsilon when only some runs use DP), unless at their default."""
    out = []
    for k in _ordered_keys(configs):
        if k in TUNED and all(c.get(k) == _default(k, c) for c in configs):
            continue  # each run has its mechanism's tuned value: --dp says it
        relevant = [c for c in configs if _relevant(k, c)]
        values = {repr(c.get(k)) for c in relevant}
        partly = 0 < len(relevant) < len(configs) and _worth_showing(k, relevant[0])
        if len(values) > 1 or partly:
            out.append(k)
    return out


def run_labels(configs: Sequence[dict[str, Any]]) -> list[str]:
    """Label each run by the options that differ between the runs shown.

    Runs that differ in nothing but hidden options are numbered. A single run
    has no label of its own: its options go in the subtitle.
    """
    keys = differing_options(configs) if len(configs) > 1 else []
    labels = [", ".join(option_text(k, c[k]) for k in keys if _relevant(k, c)) for c in configs]
    return [label or f"run {i}" for i, label in enumerate(labels, 1)]


def shared_options(configs: Sequence[dict[str, Any]]) -> list[str]:
    """The options every run shares: the core ones, and the others where not default."""
    if not configs:
        return []
    varying = set(differing_options(configs))
    first = configs[0]
    out = []
    for k in _ordered_keys(configs):
        if k in varying or not all(_relevant(k, c) for c in configs):
            continue
        if _worth_showing(k, first):
            out.append(option_text(k, first.get(k)))
    return out


def subtitle(configs: Sequence[dict[str, Any]], *, width: int = SUBTITLE_WIDTH) -> str:
    """The shared options, comma-separated, in lines of at most ``width`` characters
    (an option is never split, whatever its length)."""
    lines: list[str] = []
    for text in shared_options(configs):
        if lines and len(lines[-1]) + 2 + len(text) <= width:
            lines[-1] += ", " + text
        else:
            if lines:
                lines[-1] += ","
            lines.append(text)
    return "\n".join(lines)


def _titles(fig: Any, ax: Any, title: str, configs: Sequence[dict[str, Any]]) -> None:
    fig.suptitle(title, fontsize=11)
    ax.set_title(subtitle(configs), fontsize=7.5, color="0.3")


def _save(fig: Any, out: Path) -> None:
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=120)
    plt.close(fig)


def _rounds(doc: dict[str, Any]) -> list[int]:
    return [r["round"] for r in doc["rounds"]]


def _accuracy(doc: dict[str, Any]) -> list[float]:
    return [100.0 * r["accuracy"] for r in doc["rounds"]]


def plot_runs(
    docs: Sequence[dict[str, Any]],
    out: Path,
    *,
    title: str | None = None,
    labels: Sequence[str] | None = None,
) -> None:
    """Overlay the accuracy-vs-round curves of ``docs`` in one PNG."""
    configs = [d.get("config", {}) for d in docs]
    names = list(labels) if labels else run_labels(configs)
    # Legend below the axes: three columns of short labels, else one per line;
    # the figure grows with its rows so the axes keep their height.
    columns = 1 if max(map(len, names), default=0) > 40 else min(len(names), 3)
    rows = -(-len(names) // max(columns, 1))
    fig, ax = plt.subplots(figsize=(7.5, 4.6 + 0.22 * rows), layout="constrained")
    many = max((len(d["rounds"]) for d in docs), default=0) > 30
    for doc, name in zip(docs, names, strict=True):
        ax.plot(
            _rounds(doc),
            _accuracy(doc),
            label=name,
            linewidth=1.5,
            marker=None if many else "o",
            markersize=3,
        )
    ax.set_xlabel("round")
    ax.set_ylabel("test accuracy (%)")
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax.grid(True, alpha=0.3)
    _titles(fig, ax, title or "Test accuracy per round", configs)
    fig.legend(loc="outside lower center", ncols=columns, fontsize=9, frameon=False)
    _save(fig, out)


# Client outcomes of a round, bottom to top, with their colours.
OUTCOMES = (
    ("accepted", "#4c9a4c"),
    ("accepted (attacker)", "#e69f00"),
    ("rejected (attacker)", "#c0392b"),
    ("rejected (honest)", "#f1948a"),
    ("silent", "#aaaaaa"),
)


def round_outcomes(doc: dict[str, Any]) -> dict[str, list[int]]:
    """Per round, how many selected clients were accepted, rejected or silent,
    attackers (``config.malicious_clients``) counted apart."""
    attackers = set(doc.get("config", {}).get("malicious_clients", []))
    counts: dict[str, list[int]] = {name: [] for name, _ in OUTCOMES}

    def split(ids: Iterable[str]) -> tuple[int, int]:
        ids = list(ids)
        bad = sum(1 for c in ids if c in attackers)
        return len(ids) - bad, bad

    for r in doc["rounds"]:
        honest_ok, bad_ok = split(r.get("accepted", []))
        honest_no, bad_no = split(r.get("rejected", {}))
        counts["accepted"].append(honest_ok)
        counts["accepted (attacker)"].append(bad_ok)
        counts["rejected (attacker)"].append(bad_no)
        counts["rejected (honest)"].append(honest_no)
        counts["silent"].append(len(r.get("silent", [])))
    return counts


def _accuracy_headline(doc: dict[str, Any]) -> str:
    acc = _accuracy(doc)
    best = max(range(len(acc)), key=acc.__getitem__)
    return (
        f"final test accuracy {acc[-1]:.1f} %, best {acc[best]:.1f} % "
        f"(round {doc['rounds'][best]['round']})"
    )


def _side_legend(ax: Any, *, lines_last: bool = False) -> None:
    handles, labels = ax.get_legend_handles_labels()
    if lines_last:  # matplotlib lists lines before bars
        order = sorted(range(len(handles)), key=lambda i: hasattr(handles[i], "get_xdata"))
        handles, labels = [handles[i] for i in order], [labels[i] for i in order]
    ax.legend(
        handles, labels, loc="upper left", bbox_to_anchor=(1.01, 1.0), fontsize=8, frameon=False
    )


def plot_run(doc: dict[str, Any], out: Path, *, title: str | None = None) -> None:
    """One run: accuracy, privacy spent (with DP) and client outcomes per round."""
    config = doc.get("config", {})
    private = config.get("dp", "none") != "none" and any(
        r.get("epsilon_spent_max") is not None for r in doc["rounds"]
    )
    ratios = [2.2, 1.3, 1.3] if private else [2.2, 1.3]
    fig, axes = plt.subplots(
        len(ratios),
        1,
        sharex=True,
        figsize=(8, 7.5 if private else 6),
        height_ratios=ratios,
        layout="constrained",
    )
    rounds = _rounds(doc)
    top = axes[0]
    top.plot(rounds, _accuracy(doc), marker="o", markersize=3.5, linewidth=1.5, color="C0")
    top.set_ylabel("test accuracy (%)")
    _titles(fig, top, title or _accuracy_headline(doc), [config])

    if private:
        ax = axes[1]
        most = [r.get("epsilon_spent_max") or 0.0 for r in doc["rounds"]]
        mean = [r.get("epsilon_spent_mean", 0.0) for r in doc["rounds"]]
        budget = float(config.get("epsilon", max(most)))
        ax.plot(rounds, most, marker="o", markersize=3, color="C3", label="max over clients")
        ax.plot(rounds, mean, marker="o", markersize=3, color="C1", label="mean over clients")
        ax.axhline(budget, color="0.2", linestyle="--", linewidth=1, label=f"budget ε = {budget:g}")
        ax.set_ylim(0, 1.15 * max(budget, *most))
        ax.set_ylabel("ε spent")
        _side_legend(ax)

    ax = axes[-1]
    bottom = [0] * len(rounds)
    outcomes = round_outcomes(doc)
    for name, colour in OUTCOMES:
        heights = outcomes[name]
        if not any(heights):
            continue
        ax.bar(rounds, heights, bottom=bottom, color=colour, width=0.7, label=name)
        bottom = [b + h for b, h in zip(bottom, heights, strict=True)]
    # Clients whose privacy budget is spent decline selection: not in the bars.
    declined = [len(r.get("declined", [])) for r in doc["rounds"]]
    if any(declined):
        ax.plot(
            rounds,
            declined,
            color="0.25",
            linestyle=":",
            marker="x",
            markersize=5,
            label="declined (budget spent)",
        )
    ax.set_ylim(0, 1.12 * max(*bottom, *declined, 1))
    ax.set_ylabel("clients")
    ax.yaxis.set_major_locator(MaxNLocator(nbins=6, integer=True, steps=[1, 2, 5, 10]))
    _side_legend(ax, lines_last=True)

    for ax in axes:
        ax.grid(True, alpha=0.3)
        ax.set_axisbelow(True)
    axes[-1].set_xlabel("round")
    axes[-1].xaxis.set_major_locator(MaxNLocator(integer=True))
    fig.align_ylabels(axes)
    _save(fig, out)


def plot_metrics(
    docs: Sequence[dict[str, Any]],
    out: Path,
    *,
    title: str | None = None,
    labels: Sequence[str] | None = None,
) -> None:
    """One run unlabelled: :func:`plot_run`; otherwise :func:`plot_runs`."""
    if len(docs) == 1 and not labels:
        plot_run(docs[0], out, title=title)
    else:
        plot_runs(docs, out, title=title, labels=labels)
