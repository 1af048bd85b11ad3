"""``network up``'s process handling, with stand-in processes (no node is started)."""

from __future__ import annotations

import signal
import subprocess
from pathlib import Path

import pytest

import commands.launcher
from commands.launcher import NodeProcess, stop_all


class StandIn:
    """A Popen that records what is done to it; ``stuck`` ignores SIGTERM."""

    def __init__(self, pid: int, events: list[tuple[str, int]], *, stuck: bool = False) -> None:
        self.pid, self.events, self.stuck = pid, events, stuck
        self.returncode: int | None = None

    def poll(self) -> int | None:
        return self.returncode

    def wait(self, timeout: float | None = None) -> int:
        self.events.append(("wait", self.pid))
        if self.stuck and timeout is not None:
            raise subprocess.TimeoutExpired("node", timeout)
        self.returncode = 0
        return 0


@pytest.fixture
def events(monkeypatch: pytest.MonkeyPatch) -> list[tuple[str, int]]:
    log: list[tuple[str, int]] = []
    names = {signal.SIGTERM: "SIGTERM", signal.SIGKILL: "SIGKILL"}
    monkeypatch.setattr(
        commands.launcher.os, "kill", lambda pid, sig: log.append((names[sig], pid))
    )
    return log


def node(pid: int, events: list[tuple[str, int]], *, stuck: bool = False) -> NodeProcess:
    p = NodeProcess(f"node-{pid}", [], Path("."))
    p.process = StandIn(pid, events, stuck=stuck)  # type: ignore[assignment]
    return p


def test_stop_all_signals_every_process_before_waiting_for_any(events) -> None:
    # Prepare
    procs = [node(pid, events) for pid in (101, 102, 103)]
    # Execute
    stop_all(procs)
    # Assert: the three stop together instead of one after the other
    assert events[:3] == [("SIGTERM", 101), ("SIGTERM", 102), ("SIGTERM", 103)]
    assert [e for e in events if e[0] == "wait"] == [("wait", 101), ("wait", 102), ("wait", 103)]
    assert all(not p.alive() for p in procs)


def test_stop_all_kills_a_process_that_ignores_sigterm(events) -> None:
    # Prepare
    procs = [node(201, events, stuck=True), node(202, events)]
    # Execute
    stop_all(procs, timeout=0.5)
    # Assert
    assert ("SIGKILL", 201) in events
    assert ("SIGKILL", 202) not in events
    assert all(not p.alive() for p in procs)
