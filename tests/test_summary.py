"""The run summary printed by ``simulate`` and ``network up``, on hand-built metrics."""

from __future__ import annotations

import signal
from pathlib import Path
from typing import Any

import pytest
from click.testing import CliRunner

import cli
import commands.launcher
from commands.summary import ChainCheck, run_summary
from fl.config import RunConfig
from node.genesis import init_network


def _round(rnd: int, accuracy: float, **fields: Any) -> dict[str, Any]:
    record = {
        "round": rnd,
        "accuracy": accuracy,
        "selected": [],
        "accepted": [],
        "rejected": {},
        "epsilon_spent_max": None,
        "declined": [],
        "silent": [],
    }
    record.update(fields)
    return record


def dp_run_with_attackers() -> dict[str, Any]:
    """Four clients, two of them attackers: c3 caught twice, c4 accepted once."""
    config = {
        "clients": 4,
        "rounds": 3,
        "dp": "gaussian",
        "epsilon": 8.0,
        "delta": 1e-5,
        "malicious": 0.5,
        "attack": "noise",
        "validation": True,
        "malicious_clients": ["c3", "c4"],
    }
    rounds = [
        _round(
            1,
            0.60,
            selected=["c1", "c3"],
            accepted=["c1"],
            rejected={"c3": "update norm 70 > 3 x round median 1"},
            epsilon_spent_max=4.0,
            epsilon_spent_mean=2.0,
        ),
        _round(
            2,
            0.82,
            selected=["c2", "c3", "c4"],
            accepted=["c4"],
            rejected={"c2": "validation accuracy 0.1 < 0.5", "c3": "update norm 71 > 3 x 1"},
            epsilon_spent_max=6.0,
            epsilon_spent_mean=4.5,
        ),
        _round(
            3,
            0.80,
            selected=["c1", "c2"],
            accepted=["c1", "c2"],
            epsilon_spent_max=7.99,
            epsilon_spent_mean=6.0,
            declined=["c4"],
            reputation={"c1": 0.7, "c2": 0.5, "c3": 0.2, "c4": 0.45},
        ),
    ]
    return {"config": config, "rounds": rounds, "total_seconds": 12.5}


def line_with(lines: list[str], start: str) -> str:
    (found,) = [line for line in lines if line.strip().startswith(start)]
    return found


def test_summary_gives_final_and_best_accuracy_with_their_rounds() -> None:
    lines = run_summary(dp_run_with_attackers())
    assert lines[0] == "run summary: 3 rounds in 12.5 s"
    assert line_with(lines, "accuracy:") == (
        "  accuracy: final 80.0 % (round 3), best 82.0 % (round 2)"
    )


def test_summary_compares_the_privacy_spent_with_the_budget() -> None:
    # Prepare: the same run, once within its budget and once over it
    doc = dp_run_with_attackers()
    over = dp_run_with_attackers()
    over["rounds"][-1]["epsilon_spent_max"] = 8.5
    # Execute
    within = line_with(run_summary(doc), "privacy:")
    beyond = line_with(run_summary(over), "privacy:")
    # Assert
    assert "gaussian local DP, ε = 8, δ = 1e-05 per client" in within
    assert "max 7.99, mean 6.00 over clients, within budget" in within
    assert "max 8.50, mean 6.00 over clients, OVER BUDGET" in beyond
    assert line_with(run_summary(doc), "1 client") == (
        "    1 client had spent its budget and sat out round 3"
    )


def test_summary_follows_each_attacker_and_counts_honest_rejections() -> None:
    lines = run_summary(dp_run_with_attackers())
    assert line_with(lines, "attackers:").endswith(
        "attackers: 2 of 4 clients, attack 'noise'; "
        "final reputation of honest clients 0.60 on average"
    )
    assert line_with(lines, "c3:") == (
        "    c3: selected in rounds 1, 2; rejected in rounds 1, 2 "
        "(first: update norm 70 > 3 x round median 1); never accepted; reputation 0.20"
    )
    assert line_with(lines, "c4:") == (
        "    c4: selected in round 2; accepted in round 2; reputation 0.45"
    )
    assert line_with(lines, "honest updates rejected:") == (
        "  honest updates rejected: 1: c2 (round 2)"
    )


def test_summary_of_a_run_without_dp_or_attackers() -> None:
    # Prepare
    doc = {
        "config": {"clients": 2, "rounds": 2, "dp": "none", "malicious_clients": []},
        "rounds": [
            _round(1, 0.9, selected=["c1", "c2"], accepted=["c1", "c2"]),
            _round(2, 0.95, selected=["c1", "c2"], accepted=["c1", "c2"]),
        ],
    }
    # Execute
    lines = run_summary(doc, files={"plot": "out/run.png"})
    # Assert
    assert lines == [
        "run summary: 2 rounds",
        "  accuracy: final 95.0 % (round 2), best 95.0 % (round 2)",
        "  privacy: no DP (updates are sent as trained)",
        "  attackers: none",
        "  honest updates rejected: none",
        "  plot: out/run.png",
    ]


def test_summary_says_a_run_stopped_early() -> None:
    doc = dp_run_with_attackers()
    doc["rounds"] = doc["rounds"][:2]
    doc["interrupted"] = True
    assert line_with(run_summary(doc), "accuracy:").endswith("; interrupted after 2 of 3 rounds")


def test_summary_reports_the_chains_in_one_line_when_all_verified() -> None:
    # Prepare
    doc = dp_run_with_attackers()
    doc["chain_heads"] = {"miner-0": "ab", "miner-1": "ab"}
    chains = {m: ChainCheck(True, 13, "chain OK") for m in ("miner-0", "miner-1")}
    # Execute
    lines = run_summary(doc, chains=chains)
    # Assert
    assert line_with(lines, "chain:") == (
        "  chain: 2 miners at height 13, one head; `chain verify` OK on every one"
    )


def test_summary_names_the_miner_whose_chain_failed() -> None:
    # Prepare
    doc = dp_run_with_attackers()
    doc["chain_heads"] = {"miner-0": "ab", "miner-1": "cd"}
    chains = {
        "miner-0": ChainCheck(True, 13, "chain OK: 13 blocks"),
        "miner-1": ChainCheck(False, 13, "chain INVALID at height 3: bad certificate"),
    }
    # Execute
    lines = run_summary(doc, chains=chains)
    # Assert
    start = lines.index("  chain: `chain verify` per miner, DIFFERENT heads:")
    assert lines[start + 1 : start + 3] == [
        "    miner-0: height 13: chain OK: 13 blocks",
        "    miner-1: height 13: chain INVALID at height 3: bad certificate",
    ]


def test_network_up_prints_the_summary_and_fails_when_a_chain_does_not_verify(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Prepare: a "network" whose genesis exists but whose miners left no chain
    run_dir = tmp_path / "run"

    def fake_network_up(config: RunConfig, *, run_dir: Path, **_: Any) -> dict[str, Any]:
        init_network(run_dir, run=config, miners=4)
        doc = dp_run_with_attackers()
        doc["chain_heads"] = {}
        return doc

    monkeypatch.setattr(commands.launcher, "network_up", fake_network_up)
    # The command makes SIGTERM stop its nodes; this test process keeps its own handler.
    monkeypatch.setattr(signal, "signal", lambda *args: None)
    plot = tmp_path / "run.png"
    # Execute
    result = CliRunner().invoke(
        cli.main,
        ["network", "up", "--clients", "4", "--run-dir", str(run_dir), "--plot", str(plot)],
    )
    # Assert
    assert result.exit_code == 1, result.output
    lines = result.output.splitlines()
    assert lines[0] == "run summary: 3 rounds in 12.5 s"
    assert "  chain: `chain verify` per miner:" in lines
    assert f"    miner-3: height 0: no chain at {run_dir / 'miner-3' / 'chain.db'}" in lines
    assert f"  plot: {plot}" in lines
    assert plot.read_bytes()[:4] == b"\x89PNG"
