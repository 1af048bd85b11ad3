"""Figures of metrics files: legend labels, subtitles, and the PNGs themselves."""

from __future__ import annotations

from dataclasses import fields
from pathlib import Path
from typing import Any

from commands.plotting import (
    plot_metrics,
    round_outcomes,
    run_labels,
    shared_options,
    subtitle,
)
from fl.config import RunConfig

PNG = b"\x89PNG\r\n\x1a\n"


def config(**changes: Any) -> dict[str, Any]:
    """A full metrics-file config: the defaults with ``changes`` (as a run records it)."""
    known = {f.name for f in fields(RunConfig)}
    run = RunConfig(**{k: v for k, v in changes.items() if k in known})
    return {**run.to_dict(), "malicious_clients": [], **changes}


def test_labels_name_only_the_option_that_differs() -> None:
    configs = [config(dist=d, clients=20, rounds=5) for d in ("iid", "noniid", "dirichlet")]
    assert run_labels(configs) == ["dist=iid", "dist=noniid", "dist=dirichlet, alpha=0.5"]


def test_labels_leave_out_options_that_mean_nothing_for_a_run() -> None:
    # epsilon means nothing without DP, the attack nothing without attackers
    configs = [
        config(dp="none", epsilon=10.0),
        config(dp="gaussian", epsilon=4.0, malicious=0.2, attack="noise"),
    ]
    assert run_labels(configs) == [
        "no DP, no attackers",
        "dp=gaussian, epsilon=4, malicious=0.2, attack=noise",
    ]


def test_runs_that_differ_in_nothing_shown_are_numbered() -> None:
    configs = [config(threads=1), config(threads=2, data_dir="/elsewhere")]
    assert run_labels(configs) == ["run 1", "run 2"]


def test_shared_options_are_the_core_ones_and_the_others_not_at_their_default() -> None:
    # Prepare: two runs sharing a learning rate and dropout off their tuned
    # defaults, differing in epsilon
    configs = [config(dp="gaussian", epsilon=e, lr=1.0, dropout=True) for e in (10.0, 20.0)]
    # Execute
    shared = shared_options(configs)
    # Assert
    assert shared == [
        "dataset=mnist",
        "model=cnn",
        "clients=100",
        "frac=0.1",
        "rounds=50",
        "dist=iid",
        "dp=gaussian",
        "no attackers",
        "lr=1",
        "dropout=on",
    ]


def test_subtitle_wraps_between_options_never_inside_one() -> None:
    configs = [config(dp="gaussian", server_momentum=0.9, batch_size=600, momentum=0.0)]
    text = subtitle(configs, width=40)
    lines = text.split("\n")
    assert len(lines) > 1
    assert all(len(line) <= 40 for line in lines)
    assert text.replace(",\n", ", ").split(", ") == shared_options(configs)


def metrics(cfg: dict[str, Any], accuracies: list[float], **per_round: Any) -> dict[str, Any]:
    rounds = []
    for i, acc in enumerate(accuracies, 1):
        record = {"round": i, "accuracy": acc, "selected": ["c1", "c2", "c3"]}
        record["accepted"], record["rejected"], record["silent"] = ["c1", "c2"], {"c3": "x"}, []
        record.update({k: v[i - 1] for k, v in per_round.items()})
        rounds.append(record)
    return {"config": cfg, "rounds": rounds}


def test_outcomes_count_attackers_apart() -> None:
    # Prepare: c3 attacks; round 1 rejects it, round 2 accepts it and c2 stays silent
    doc = metrics(config(malicious_clients=["c3"]), [0.5, 0.6])
    doc["rounds"][1].update(accepted=["c1", "c3"], rejected={}, silent=["c2"])
    # Execute
    counts = round_outcomes(doc)
    # Assert
    assert counts == {
        "accepted": [2, 1],
        "accepted (attacker)": [0, 1],
        "rejected (attacker)": [1, 0],
        "rejected (honest)": [0, 0],
        "silent": [0, 1],
    }


def test_one_run_with_dp_one_without_and_an_overlay_are_written(tmp_path: Path) -> None:
    # Prepare
    private = metrics(
        config(dp="gaussian", epsilon=8.0, malicious_clients=["c3"]),
        [0.5, 0.7, 0.8],
        epsilon_spent_max=[3.0, 6.0, 7.9],
        epsilon_spent_mean=[2.0, 4.0, 5.0],
    )
    plain = metrics(config(), [0.6, 0.8, 0.9], epsilon_spent_max=[None] * 3)
    # Execute
    plot_metrics([private], tmp_path / "dp.png")
    plot_metrics([plain], tmp_path / "plain.png", title="no DP")
    plot_metrics([private, plain], tmp_path / "both" / "overlay.png")
    # Assert
    for name in ("dp.png", "plain.png", "both/overlay.png"):
        assert (tmp_path / name).read_bytes()[:8] == PNG
