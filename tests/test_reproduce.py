"""``reproduce paper``: the plan of runs, resuming, the no-DP prefixes, the report."""

from __future__ import annotations

import json
import subprocess
import sys
import time
from pathlib import Path

import pytest

from chain.simulator import run_simulation
from commands import paper
from commands.paper_report import STATEMENTS, statements_table
from fl.config import RunConfig
from fl.datasets import load_splits

ROOT = Path(__file__).resolve().parents[1]


def test_fourteen_runs_draw_the_eighteen_curves():
    # Execute
    curves = paper.curves()
    runs = paper.runs()
    # Assert: every curve comes from a planned run; only no-DP curves share one
    assert len(curves) == 18 and len(set(curves)) == 18
    assert len(runs) == 14
    assert {c.run for c in curves} == set(runs)
    assert all(c.run == c for c in curves if c.dp != "none")
    assert {(c.dist, c.rounds) for c in curves} == set(paper.FIGURES)
    assert runs[0].rounds == 500 and runs[-1].rounds == 100  # longest first


def test_a_run_configuration_uses_the_mechanisms_tuned_defaults():
    # Execute
    gauss = paper.run_config(
        paper.Curve("iid", "gaussian", 200), epsilon=10, seed=0, data_dir=None, quick=False
    )
    none = paper.run_config(
        paper.Curve("noniid", "none", 500), epsilon=10, seed=0, data_dir=None, quick=False
    )
    # Assert
    assert (gauss.clients, gauss.frac, gauss.rounds, gauss.dist) == (100, 0.1, 200, "iid")
    assert gauss == RunConfig(
        clients=100, frac=0.1, rounds=200, dp="gaussian", epsilon=10, **paper.EVAL
    )
    assert (gauss.batch_size, gauss.server_momentum) == (600, 0.9)
    assert (none.batch_size, none.lr, none.dist) == (10, 0.02, "noniid")


def _doc(config: RunConfig, accuracies: list[float], **extra) -> dict:
    return {
        "config": {**config.to_dict(), "malicious_clients": []},
        "rounds": [
            {"round": i + 1, "accuracy": a, "seconds": 1.0} for i, a in enumerate(accuracies)
        ],
        "final_accuracy": accuracies[-1],
        "best_accuracy": max(accuracies),
        **extra,
    }


def test_only_a_complete_run_of_the_same_configuration_counts_as_finished(tmp_path):
    # Prepare
    config = RunConfig(rounds=3)
    path = tmp_path / "run.json"
    cases = {
        "complete": (_doc(config, [0.1, 0.2, 0.3]), True),
        "interrupted": (_doc(config, [0.1, 0.2, 0.3], interrupted=True), False),
        "short": (_doc(config, [0.1, 0.2]), False),
        "other config": (_doc(RunConfig(rounds=3, seed=1), [0.1, 0.2, 0.3]), False),
    }
    for name, (doc, expected) in cases.items():
        path.write_text(json.dumps(doc))
        # Execute / Assert
        assert (paper.finished(path, config) is not None) == expected, name
    path.write_text("{not json")
    assert paper.finished(path, config) is None
    assert paper.finished(tmp_path / "missing.json", config) is None


def test_a_prefix_keeps_the_first_rounds_and_restates_the_summary():
    # Prepare
    doc = _doc(RunConfig(rounds=4), [0.2, 0.5, 0.4, 0.9])
    # Execute
    cut = paper.prefix(doc, 3)
    # Assert
    assert [r["round"] for r in cut["rounds"]] == [1, 2, 3]
    assert (cut["final_accuracy"], cut["best_accuracy"]) == (0.4, 0.5)
    assert cut["config"]["rounds"] == 3 and cut["total_seconds"] == 3.0
    assert doc["config"]["rounds"] == 4  # the run's own document is unchanged


def test_without_dp_a_shorter_run_is_the_longer_runs_first_rounds():
    """The premise of drawing the 100- and 200-round no-DP curves from the 500-round run."""
    # Prepare
    small = {"dataset": "synthetic", "clients": 10, "frac": 0.3, "train_size": 400}
    short = RunConfig(rounds=2, **small)
    long = RunConfig(rounds=4, **small)
    splits = load_splits(long)
    # Execute
    a = run_simulation(short, splits, clock=time.perf_counter)
    b = run_simulation(long, splits, clock=time.perf_counter)
    # Assert: same selections, verdicts, losses and accuracies round for round
    timeless = [{k: v for k, v in r.items() if k != "seconds"} for r in b["rounds"][:2]]
    assert [{k: v for k, v in r.items() if k != "seconds"} for r in a["rounds"]] == timeless


def _docs(finals: dict[tuple[str, str, int], float]) -> dict:
    docs = {}
    for curve in paper.curves():
        acc = finals.get((curve.dist, curve.dp, curve.rounds), 0.5)
        docs[curve] = _doc(RunConfig(), [acc] * 10)
    return docs


def test_the_statements_table_reads_each_statement_off_the_curves():
    # Prepare: curves that match the paper on Figure 3's two statements only
    docs = _docs({("iid", "laplace", 100): 0.9, ("iid", "gaussian", 100): 0.65})
    # Execute
    table = statements_table(docs).splitlines()
    # Assert: one row per statement, after the header
    assert len(table) == 2 + len(STATEMENTS)
    assert table[2].startswith("| 3 (IID, 100) | Laplace reaches about 90% | Laplace 90.0%")
    assert table[2].endswith("| yes |") and table[3].endswith("| yes |")
    # Flat curves "converge", so Figure 4's statement does not hold for them.
    assert table[4].startswith("| 4 (non-IID, 100)") and table[4].endswith("| no |")
    higher = statements_table(_docs({("iid", "gaussian", 100): 0.95})).splitlines()
    assert "Gaussian 95.0%" in higher[3] and higher[3].endswith("| no |")


@pytest.mark.slow
@pytest.mark.mnist
def test_quick_reproduction_writes_the_six_figures_and_resumes(tmp_path, mnist_root):
    # Prepare
    out = tmp_path / "paper"
    command = [
        sys.executable, "cli.py", "reproduce", "paper", "--quick", "--jobs", "2",
        "--out", str(out), "--data-dir", str(mnist_root),
    ]  # fmt: skip
    # Execute
    first = subprocess.run(command, cwd=ROOT, capture_output=True, text=True, timeout=600)
    # Assert
    assert first.returncode == 0, first.stderr[-2000:]
    for n in range(3, 9):
        assert (out / f"fig{n}.png").stat().st_size > 10_000
    readme = (out / "README.md").read_text()
    assert "| 8 (non-IID, 500) |" in readme and "--quick run" in readme
    runs = sorted((out / "runs").glob("*.json"))
    assert len(runs) == 14
    # Prepare: lose one run, as an interruption would
    lost = out / "runs" / "noniid-gaussian-100.json"
    lost.unlink()
    kept = {p: p.stat().st_mtime_ns for p in runs if p != lost}
    # Execute
    again = subprocess.run(command, cwd=ROOT, capture_output=True, text=True, timeout=600)
    # Assert: only the lost run ran again
    assert again.returncode == 0, again.stderr[-2000:]
    assert "13 already finished" in again.stderr
    assert lost.exists()
    assert {p: p.stat().st_mtime_ns for p in kept} == kept


def test_bad_options_get_a_plain_error(tmp_path):
    from click.testing import CliRunner

    import cli

    # Execute
    result = CliRunner().invoke(
        cli.main, ["reproduce", "paper", "--out", str(tmp_path), "--epsilon", "-1"]
    )
    jobs = CliRunner().invoke(
        cli.main, ["reproduce", "paper", "--out", str(tmp_path), "--jobs", "0"]
    )
    # Assert
    assert result.exit_code == 2 and "--epsilon must be a positive number" in result.output
    assert jobs.exit_code == 2 and "--jobs" in jobs.output
    assert not (tmp_path / "runs").exists()


def test_the_results_go_between_the_docs_markers_with_the_figures_beside_it(tmp_path):
    from commands.reproduce import _fill_doc

    # Prepare
    doc = tmp_path / "docs" / "PAPER.md"
    doc.parent.mkdir()
    doc.write_text("intro\n<!-- results: begin -->\nold\n<!-- results: end -->\nafter\n")
    readme = tmp_path / "README.md"
    readme.write_text("# Title\n\n## Figures\n\n![fig3](fig3.png)\n")
    figure = tmp_path / "fig3.png"
    figure.write_bytes(b"\x89PNG")
    # Execute
    _fill_doc(doc, readme=readme, figures=[figure])
    # Assert
    assert doc.read_text() == (
        "intro\n<!-- results: begin -->\n### Figures\n\n![fig3](img/paper/fig3.png)\n"
        "<!-- results: end -->\nafter\n"
    )
    assert (doc.parent / "img" / "paper" / "fig3.png").read_bytes() == b"\x89PNG"
    doc.write_text("no markers\n")
    with pytest.raises(ValueError, match="results: begin"):
        _fill_doc(doc, readme=readme, figures=[figure])
