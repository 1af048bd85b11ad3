"""A selected client that never answers: how long does its round last?

Runs a small local network with the ``network up`` launcher (4 miners, one
process per client, every client selected in every round). Once round 1 is
summarised it SIGSTOPs the process of ``client-000``: the kernel still
accepts connections to it, but nothing answers, so the server's start-round
notice to it hangs and it sends no update. The process is sent SIGCONT once
round 2 is summarised, or after ``--stop-bound`` seconds at the latest, and
on any exit. Prints JSON: each round's seconds (the server's own timing), the
deadline, and for round 2 the margin over the deadline (target: at most 2 s;
before the notices were bounded and concurrent it was 510 s, 50 attempts of
10 s each).

    python bench/silent_client.py --data-dir data
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import signal
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from commands.launcher import NodeProcess, network_up
from commands.progress import LineView
from fl.config import RunConfig

CONFIG = {
    "model": "mlp",
    "train_size": 1_500,
    "clients": 3,
    "frac": 1.0,
    "rounds": 3,
    "val_size": 200,
    "test_size": 500,
    "selection": "random",  # the stopped client stays selected in round 2 whatever its score
}
SILENT_PROCESS = "clients-0"  # hosts client-000
SILENT_CLIENT = "client-000"
STOPPED_ROUND = 2


def summarised(run_dir: Path) -> int:
    """The last round the server reported done (0: none yet)."""
    try:
        return int(json.loads((run_dir / "server" / "progress.json").read_text())["round"])
    except (OSError, ValueError, KeyError):
        return 0


class Freezer:
    """SIGSTOPs one node process after round ``STOPPED_ROUND - 1``; always SIGCONTs it."""

    def __init__(self, run_dir: Path, *, bound: float) -> None:
        self.run_dir = run_dir
        self.bound = bound
        self.pid: int | None = None
        self.stopped_at: float | None = None
        self.resumed_at: float | None = None
        self.done = threading.Event()
        self.thread = threading.Thread(target=self._watch, daemon=True)

    def started(self, procs: list[NodeProcess]) -> None:
        self.pid = next(p.pid for p in procs if p.name == SILENT_PROCESS)
        self.thread.start()

    def _watch(self) -> None:
        while not self.done.is_set() and summarised(self.run_dir) < STOPPED_ROUND - 1:
            time.sleep(0.05)  # polling another process's progress file
        if self.done.is_set() or self.pid is None:
            return
        os.kill(self.pid, signal.SIGSTOP)
        self.stopped_at = time.monotonic()
        give_up = self.stopped_at + self.bound
        while summarised(self.run_dir) < STOPPED_ROUND and time.monotonic() < give_up:
            if self.done.wait(0.05):
                break
        self.resume()

    def resume(self) -> None:
        if self.pid is not None and self.stopped_at is not None and self.resumed_at is None:
            self.resumed_at = time.monotonic()
            with contextlib.suppress(ProcessLookupError):
                os.kill(self.pid, signal.SIGCONT)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--data-dir", default=None)
    parser.add_argument("--deadline", type=float, default=15.0, help="round deadline, seconds")
    parser.add_argument("--stop-bound", type=float, default=180.0, help="longest SIGSTOP, seconds")
    parser.add_argument("--timeout", type=float, default=900.0, help="whole run, seconds")
    parser.add_argument("--run-dir", default=None)
    args = parser.parse_args()
    run_dir = Path(args.run_dir or tempfile.mkdtemp(prefix="silent-client-")) / "run"
    config = RunConfig(**CONFIG, data_dir=args.data_dir)
    freezer = Freezer(run_dir, bound=args.stop_bound)
    try:
        doc = network_up(
            config,
            run_dir=run_dir,
            miners=4,
            client_procs=config.clients,
            protocol={"round_deadline_ms": int(args.deadline * 1000)},
            view=LineView(sys.stderr),
            timeout=args.timeout,
            on_started=freezer.started,
        )
    finally:
        freezer.done.set()
        freezer.resume()
    rounds: list[dict[str, Any]] = doc["rounds"]
    stalled = rounds[STOPPED_ROUND - 1]
    out = {
        "run_dir": str(run_dir),
        "deadline_seconds": args.deadline,
        "round_seconds": {r["round"]: round(r["seconds"], 2) for r in rounds},
        "stopped_round": STOPPED_ROUND,
        "stopped_client_silent": SILENT_CLIENT in stalled["silent"],
        "stopped_round_seconds": round(stalled["seconds"], 2),
        "margin_over_deadline_seconds": round(stalled["seconds"] - args.deadline, 2),
        "sigstop_seconds": (
            round(freezer.resumed_at - freezer.stopped_at, 2)
            if freezer.stopped_at is not None and freezer.resumed_at is not None
            else None
        ),
        "accuracy": [round(r["accuracy"], 4) for r in rounds],
    }
    print(json.dumps(out, indent=2))


if __name__ == "__main__":
    main()
