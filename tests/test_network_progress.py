"""``network up``'s progress: the formatting, the three views, ``--quiet`` on the command line."""

from __future__ import annotations

import io
import signal
from collections.abc import Iterator
from dataclasses import replace
from pathlib import Path
from typing import Any

import pytest
from click.testing import CliRunner

import cli
import commands.chaintools
import commands.launcher
from chain.metrics import RoundRecord, metrics_document
from commands.progress import (
    BarView,
    LineView,
    QuietView,
    RoundClock,
    RunProgress,
    bar_postfix,
    duration,
    progress_view,
    round_line,
    status,
)

DP = {"epsilon_budget": 10.0}


class FakeClock:
    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


class Terminal(io.StringIO):
    def isatty(self) -> bool:
        return True


def test_durations_are_minutes_and_seconds_or_hours() -> None:
    assert [duration(s) for s in (0, 59.4, 61, 3599, 3661, -3)] == [
        "0:00",
        "0:59",
        "1:01",
        "59:59",
        "1:01:01",
        "0:00",
    ]


@pytest.mark.parametrize(
    ("progress", "text"),
    [
        (RunProgress(3), "starting the nodes"),
        (RunProgress(3, phase="registering", registered=5, clients=8), "registering 5/8 clients"),
        (RunProgress(3, phase="selecting"), "round 1/3 selecting"),
        (RunProgress(3, round=1, phase="training", selected=4), "round 2/3 training (4 clients)"),
        (RunProgress(3, round=1, phase="aggregating", selected=4), "round 2/3 aggregating"),
        (RunProgress(3, round=3, phase="done"), "done 3/3 rounds"),
    ],
)
def test_the_status_names_the_phase_and_the_round_in_progress(
    progress: RunProgress, text: str
) -> None:
    assert status(progress) == text


def test_the_postfix_shows_time_left_accuracy_privacy_and_blocks_when_known() -> None:
    nothing = RunProgress(3, phase="registering")
    everything = RunProgress(3, round=1, accuracy=0.81234, blocks=9, epsilon_spent_max=3.4, **DP)
    unspent = RunProgress(3, phase="selecting", blocks=2, **DP)
    assert bar_postfix(nothing, None) == ""
    assert bar_postfix(everything, 75) == "~1:15 left, acc 0.8123, ε 3.40/10, 9 blocks"
    assert bar_postfix(unspent, None) == "ε -/10, 2 blocks"


def test_a_round_line_has_the_accuracy_privacy_blocks_and_times() -> None:
    private = RunProgress(5, round=2, accuracy=0.5, blocks=17, epsilon_spent_max=3.41, **DP)
    public = RunProgress(5, round=5, accuracy=0.9, blocks=40)
    assert round_line(private, elapsed=62, remaining=93) == (
        "round 2/5: test accuracy 0.5000, ε 3.41/10, 17 blocks, 1:02 elapsed, ~1:33 left"
    )
    assert round_line(public, elapsed=200, remaining=None) == (
        "round 5/5: test accuracy 0.9000, 40 blocks, 3:20 elapsed"
    )


def test_the_time_left_is_the_mean_round_counting_down_from_the_first_selection() -> None:
    # Prepare: 30 s of start-up and registrations, then rounds of 20 s
    clock = RoundClock(start=0.0)
    clock.observe(RunProgress(4, phase="registering"), now=10.0)
    assert clock.remaining(4, now=10.0) is None
    clock.observe(RunProgress(4, phase="selecting"), now=30.0)
    assert clock.remaining(4, now=40.0) is None  # no round finished yet
    # Execute
    clock.observe(RunProgress(4, round=1, phase="selecting"), now=50.0)
    clock.observe(RunProgress(4, round=2, phase="selecting"), now=70.0)
    # Assert: 2 rounds left at 20 s each, minus the time since the last one
    assert clock.remaining(4, now=70.0) == 40.0
    assert clock.remaining(4, now=85.0) == 25.0
    assert clock.remaining(4, now=200.0) == 0.0
    assert clock.elapsed(85.0) == 85.0
    clock.observe(RunProgress(4, round=4, phase="done"), now=110.0)
    assert clock.remaining(4, now=110.0) is None  # nothing left to estimate


def readings() -> list[RunProgress]:
    """What the launcher reads during a 2-round run (repeated readings included)."""
    base = RunProgress(2, clients=4, **DP)
    return [
        base,
        replace(base, phase="registering", registered=2, blocks=1),
        replace(base, phase="selecting", registered=4, blocks=2),
        replace(base, phase="training", registered=4, selected=2, blocks=3),
        replace(base, phase="training", registered=4, selected=2, blocks=3),
        replace(base, round=1, accuracy=0.7, phase="selecting", blocks=5, epsilon_spent_max=4.0),
        replace(base, round=1, accuracy=0.7, phase="selecting", blocks=5, epsilon_spent_max=4.0),
        replace(base, round=2, accuracy=0.8, phase="done", blocks=8, epsilon_spent_max=7.5),
    ]


def test_the_line_view_prints_one_plain_line_per_round() -> None:
    # Prepare
    out, clock = io.StringIO(), FakeClock()
    view = LineView(out, clock=clock)
    # Execute: a reading every 10 s
    view.message("started 7 processes in run")
    for reading in readings():
        clock.now += 10
        view.update(reading)
    view.close()
    # Assert
    assert out.getvalue().splitlines() == [
        "started 7 processes in run",
        "round 1/2: test accuracy 0.7000, ε 4.00/10, 5 blocks, 1:00 elapsed, ~0:30 left",
        "round 2/2: test accuracy 0.8000, ε 7.50/10, 8 blocks, 1:20 elapsed",
    ]
    assert "\r" not in out.getvalue()


def test_the_quiet_view_prints_nothing() -> None:
    view = QuietView()
    view.message("started 7 processes in run")
    for reading in readings():
        view.update(reading)
    view.close()
    assert view.shown == 2


def test_the_bar_moves_within_a_round_and_ends_full() -> None:
    # Prepare
    out, clock = Terminal(), FakeClock()
    view = BarView(out, rounds=2, clock=clock)
    # Execute
    view.message("started 7 processes in run")
    frames = []
    for reading in readings():
        clock.now += 10
        view.update(reading)
        frames.append(out.getvalue().rsplit("\r", 1)[-1])
    view.close()
    # Assert: every reading redraws the line (carriage returns, no new lines)
    assert out.getvalue().startswith("started 7 processes in run\n")
    assert "registering 2/4 clients" in frames[1]
    assert "round 1/2 training (2 clients)" in frames[3]
    assert "0/2 rounds" in frames[3] and "ε -/10, 3 blocks" in frames[3]
    assert "round 2/2 selecting" in frames[5] and "1/2 rounds" in frames[5]
    assert "~0:30 left, acc 0.7000, ε 4.00/10, 5 blocks" in frames[5]
    assert "~0:20 left" in frames[6]  # the estimate counts down between readings
    assert "done 2/2 rounds" in frames[7] and "2/2 rounds" in frames[7]
    assert "left" not in frames[7]
    assert all(frame.startswith(("starting", "registering", "round", "done")) for frame in frames)
    assert out.getvalue().count("\n") == 2  # the message, and the bar left when closed


def test_the_view_is_quiet_a_bar_on_a_terminal_or_lines_elsewhere() -> None:
    assert type(progress_view(quiet=True, stream=Terminal(), rounds=3)) is QuietView
    assert type(progress_view(quiet=False, stream=Terminal(), rounds=3)) is BarView
    assert type(progress_view(quiet=False, stream=io.StringIO(), rounds=3)) is LineView


@pytest.fixture
def fake_network(monkeypatch: pytest.MonkeyPatch) -> Iterator[list[RunProgress]]:
    """``network up`` without processes: the launcher shows ``readings()`` and returns a doc."""
    shown = readings()

    def network_up(config: Any, *, view: Any, run_dir: Path, **_: Any) -> dict[str, Any]:
        try:
            view.message(f"started 7 processes in {run_dir}")
            for reading in shown:
                view.update(reading)
        finally:
            view.close()
        records = [
            RoundRecord(r, acc, 0.5, ["client-000"], ["client-000"], {}, None, 40.0)
            for r, acc in ((1, 0.7), (2, 0.8))
        ]
        doc = metrics_document(config, records, total_seconds=80.0, malicious_clients=[])
        return {**doc, "chain_heads": {"miner-0": "ab", "miner-1": "ab"}}

    monkeypatch.setattr(commands.launcher, "network_up", network_up)
    monkeypatch.setattr(commands.chaintools, "verify_run_chains", lambda run_dir: {})
    sigterm = signal.getsignal(signal.SIGTERM)  # network up installs its own handler
    yield shown
    signal.signal(signal.SIGTERM, sigterm)


@pytest.mark.parametrize("quiet", [False, True])
def test_network_up_prints_a_line_per_round_to_a_log_or_nothing_with_quiet(
    fake_network: list[RunProgress], tmp_path: Path, quiet: bool
) -> None:
    # Execute: stderr is not a terminal under the runner
    args = ["network", "up", "--rounds", "2", "--run-dir", str(tmp_path / "run")]
    result = CliRunner().invoke(cli.main, args + (["--quiet"] if quiet else []))
    # Assert
    assert result.exit_code == 0, result.output
    assert result.stdout.startswith("run summary: 2 rounds in 80.0 s")  # on stdout only
    lines = result.stderr.splitlines()
    if quiet:
        assert lines == []
    else:
        assert [line.split(", ")[0] for line in lines] == [
            f"started 7 processes in {tmp_path / 'run'}",
            "round 1/2: test accuracy 0.7000",
            "round 2/2: test accuracy 0.8000",
        ]
