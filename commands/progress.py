"""What ``network up`` shows while a network runs: a bar, a line per round, or nothing.

The server writes ``progress.json`` (:func:`chain.metrics.progress_report`)
whenever the chain moves on; the launcher reads it a few times a second and
hands it to a view:

- :class:`BarView` (stderr is a terminal): a tqdm bar that moves within a
  round too: the phase (registering, selecting, training, aggregating), the
  elapsed time and the estimate of the time left are redrawn on every read;
- :class:`LineView` (stderr is a file or a pipe: CI logs, ``make demo >
  log``): one plain line per finished round, no carriage returns;
- :class:`QuietView` (``--quiet``): nothing.

The formatting is in pure functions of a :class:`RunProgress` (and of times
passed in), tested without a network.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass, replace
from typing import Any, TextIO

from tqdm import tqdm

STATUS_WIDTH = 32  # the bar's description is padded to this, so the bar does not jump


@dataclass(frozen=True)
class RunProgress:
    """One reading of the server's ``progress.json``."""

    rounds: int
    round: int = 0  # rounds summarised on the chain
    accuracy: float | None = None  # test accuracy of round ``round``
    phase: str = "starting"  # starting (no progress.json yet), or the chain's phase
    registered: int = 0
    clients: int = 0
    selected: int | None = None  # clients selected for the round in progress
    blocks: int | None = None  # chain height
    epsilon_spent_max: float | None = None
    epsilon_budget: float | None = None

    @classmethod
    def from_json(cls, info: dict[str, Any], *, rounds: int) -> RunProgress:
        """Read a progress.json document; fields it lacks keep their defaults."""
        known = {k: info[k] for k in cls.__dataclass_fields__ if k in info}
        return cls(**{**known, "rounds": rounds})

    def after_round(self, record: dict[str, Any]) -> RunProgress:
        """This progress moved on to a round record of the metrics document."""
        done = record["round"]
        return replace(
            self,
            round=done,
            accuracy=record["accuracy"],
            phase="done" if done >= self.rounds else self.phase,
            blocks=record.get("block_height", self.blocks),
            epsilon_spent_max=record.get("epsilon_spent_max", self.epsilon_spent_max),
        )


def duration(seconds: float) -> str:
    """``m:ss`` or ``h:mm:ss``."""
    total = max(0, round(seconds))
    hours, rest = divmod(total, 3600)
    minutes, secs = divmod(rest, 60)
    return f"{hours}:{minutes:02d}:{secs:02d}" if hours else f"{minutes}:{secs:02d}"


def status(p: RunProgress) -> str:
    """What the network is doing now, e.g. ``round 2/5 training (4 clients)``."""
    if p.phase == "starting":
        return "starting the nodes"
    if p.phase == "registering":
        return f"registering {p.registered}/{p.clients} clients"
    if p.phase == "done":
        return f"done {p.round}/{p.rounds} rounds"
    current = f"round {min(p.round + 1, p.rounds)}/{p.rounds}"
    if p.phase == "training" and p.selected is not None:
        return f"{current} training ({p.selected} clients)"
    return f"{current} {p.phase}"


def privacy(p: RunProgress) -> str | None:
    """``ε 3.41/10`` (max spent by a client so far / budget); None without DP."""
    if p.epsilon_budget is None:
        return None
    spent = "-" if p.epsilon_spent_max is None else f"{p.epsilon_spent_max:.2f}"
    return f"ε {spent}/{p.epsilon_budget:g}"


def details(p: RunProgress) -> list[str]:
    """The last accuracy, the privacy spent and the chain height, those known."""
    out = []
    if p.accuracy is not None:
        out.append(f"acc {p.accuracy:.4f}")
    spent = privacy(p)
    if spent is not None:
        out.append(spent)
    if p.blocks is not None:
        out.append(f"{p.blocks} blocks")
    return out


def bar_postfix(p: RunProgress, remaining: float | None) -> str:
    """The text after the bar: time left, then :func:`details`."""
    left = [f"~{duration(remaining)} left"] if remaining is not None else []
    return ", ".join(left + details(p))


def round_line(p: RunProgress, *, elapsed: float, remaining: float | None) -> str:
    """One line for a finished round, e.g.
    ``round 2/5: test accuracy 0.8123, ε 3.41/10, 17 blocks, 1:02 elapsed, ~1:33 left``."""
    parts = [f"round {p.round}/{p.rounds}: test accuracy {p.accuracy:.4f}"]
    parts += details(p)[1:] if p.accuracy is not None else details(p)
    parts.append(f"{duration(elapsed)} elapsed")
    if remaining is not None:
        parts.append(f"~{duration(remaining)} left")
    return ", ".join(parts)


class RoundClock:
    """The time left, from the mean duration of the finished rounds.

    Round 1 starts when registrations close (what comes before, starting
    processes and loading data, happens once); the estimate counts down
    within a round and never goes below zero.
    """

    def __init__(self, start: float) -> None:
        self.start = start
        self.rounds_start: float | None = None
        self.done = 0
        self.done_at = start

    def observe(self, p: RunProgress, now: float) -> None:
        if self.rounds_start is None and p.phase not in ("starting", "registering"):
            self.rounds_start = now
        if p.round > self.done:
            self.done, self.done_at = p.round, now

    def elapsed(self, now: float) -> float:
        return now - self.start

    def remaining(self, rounds: int, now: float) -> float | None:
        """Seconds left (None: no round finished yet, or none left)."""
        if self.done == 0 or self.done >= rounds or self.rounds_start is None:
            return None
        per_round = (self.done_at - self.rounds_start) / self.done
        return max(0.0, per_round * (rounds - self.done) - (now - self.done_at))


class ProgressView:
    """The base of the views: follows the time; shows nothing."""

    def __init__(self, *, clock: Callable[[], float] = time.monotonic) -> None:
        self.now = clock
        self.clock = RoundClock(clock())
        self.shown = 0  # the last round reported

    def message(self, line: str) -> None:
        """A line about the launcher itself (processes started)."""

    def update(self, p: RunProgress) -> None:
        """A new reading (called a few times a second, changed or not)."""
        self.clock.observe(p, self.now())
        self.shown = max(self.shown, p.round)

    def close(self) -> None:
        """The run ended (or failed): leave the terminal clean for what follows."""


class QuietView(ProgressView):
    """``--quiet``: nothing on stderr."""


class LineView(ProgressView):
    """One plain line per finished round (for logs)."""

    def __init__(self, stream: TextIO, *, clock: Callable[[], float] = time.monotonic) -> None:
        super().__init__(clock=clock)
        self.stream = stream

    def message(self, line: str) -> None:
        print(line, file=self.stream, flush=True)

    def update(self, p: RunProgress) -> None:
        new = p.round > self.shown and p.accuracy is not None
        super().update(p)
        if new:
            now = self.now()
            line = round_line(
                p,
                elapsed=self.clock.elapsed(now),
                remaining=self.clock.remaining(p.rounds, now),
            )
            self.message(line)


class BarView(ProgressView):
    """A tqdm bar of the rounds, redrawn on every reading (for a terminal).

    The bar appears with the first reading, so an error before the nodes
    start prints on a clean line.
    """

    def __init__(
        self, stream: TextIO, *, rounds: int, clock: Callable[[], float] = time.monotonic
    ) -> None:
        super().__init__(clock=clock)
        self.stream = stream
        self.rounds = rounds
        self.bar: tqdm | None = None

    def message(self, line: str) -> None:
        if self.bar is None:
            print(line, file=self.stream, flush=True)
        else:
            self.bar.write(line, file=self.stream)

    def update(self, p: RunProgress) -> None:
        super().update(p)
        if self.bar is None:
            self.bar = tqdm(
                total=self.rounds,
                file=self.stream,
                bar_format="{desc} |{bar}| {n_fmt}/{total_fmt} rounds [{elapsed}{postfix}]",
                desc=status(p).ljust(STATUS_WIDTH),
                # One bar at position 0: the row count only hides bars below the
                # screen, and a terminal that reports 0 rows would hide this one.
                nrows=24,
            )
        self.bar.n = p.round
        self.bar.set_description_str(status(p).ljust(STATUS_WIDTH), refresh=False)
        self.bar.set_postfix_str(bar_postfix(p, self.clock.remaining(p.rounds, self.now())))

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()
            self.bar = None


def progress_view(*, quiet: bool, stream: TextIO, rounds: int) -> ProgressView:
    """Quiet; a bar when ``stream`` is a terminal; otherwise a line per round."""
    if quiet:
        return QuietView()
    if stream.isatty():
        return BarView(stream, rounds=rounds)
    return LineView(stream)
