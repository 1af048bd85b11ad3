"""``Node.Status`` latency on the miners while they validate rounds of 20 updates.

Runs ``network up`` as a child process (its own ``--run-dir`` in a temp
folder; by default 20 clients, all selected every round, so each round has
20 updates to validate on the miners' validation set) and, for the whole
run, sends ``Node.Status`` to every miner (``--poll``) on a fixed schedule of
one call every ``--poll-ms``, whether or not the previous calls have been
answered: a call sent while a miner's event loop is busy waits for it, so
the latencies are those a caller asking at a random moment would see. Each
call has a ``--deadline`` (default 10 s): slow answers are measured, not
dropped; a call that exceeds it counts at the deadline (a lower bound) and
as a timeout.

Validation windows come from each miner's log: a round's window at a miner
opens at the line storing the last of the round's selected updates ("stored
update of ..."; nothing can be validated before it, and the primary starts
at once) and closes at that miner's own "verdicts: ..." line for the round
(logged right after its ``validate_round``); a miner that logs none (it
voted on another miner's verdicts, validating them in its PBFT check) closes
at its next "round ... open" or "stopped" line (a looser, later bound;
``end_by`` in the JSON says which). A call counts as "validating" when it
was outstanding during a window of the miner it went to (sent before the
window closed, answered after it opened): a call sent a few ms before the
window's log line already waits for the same busy loop. Log times (millisecond
resolution, local clock) are compared with the send and answer times on
the same machine.

Selection is ``random`` by default: with ``--frac 1.0`` every client is
selected every round, so every round has ``--clients`` updates to validate
(``network up``'s own default, ``weighted``, drops the clients whose
updates validation rejected).

The JSON holds p50/p90/p99/max overall, while validating and outside the
windows, calls over the target, timeouts and errors, per-miner figures, the
windows, the slowest calls, what the miners' logs and stores say (final PBFT
view, verdict records each miner submitted itself, state transfers,
warnings), the run configuration and the load average (the machine is
shared, so absolute latencies are noisy). ``met`` is p99 while validating
<= ``--target-ms``.

Every process is stopped by pid at the end, on error and on Ctrl-C: the
``network up`` child with SIGTERM (it stops its nodes), then any node of
its ``pids.json`` still alive. The temp folder is removed unless ``--keep``.

python bench/status_latency.py --data-dir data
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import re
import shutil
import signal
import sqlite3
import subprocess
import sys
import tempfile
import time
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import grpc

from commands.launcher import operator_transport
from node.genesis import read_genesis
from node.serving import channel, use_transport
from proto import llbcfl_pb2 as pb
from proto import llbcfl_pb2_grpc as pb_grpc

try:
    import tomllib
except ModuleNotFoundError:  # Python 3.10
    import tomli as tomllib

REPO = Path(__file__).resolve().parents[1]
LOG_LINE = re.compile(
    r"^(\d{4}-\d\d-\d\d \d\d:\d\d:\d\d),(\d{3}) \[(\S+) r(\d+)(?: v\d+ h\d+)?\] (.*)$"
)


def progress(message: str) -> None:
    print(f"[status_latency] {message}", file=sys.stderr, flush=True)


@dataclass
class Call:
    miner: str
    sent: float  # time.time() at send
    latency: float  # seconds (the deadline for a timeout)
    code: str  # "OK", "DEADLINE_EXCEEDED", ...


@dataclass
class Window:
    miner: str
    round: int
    start: float  # time.time() scale
    end: float
    end_by: str  # "verdicts", "round-open", "stopped"
    complete: bool  # every selected update was stored at this miner


def network_command(args: argparse.Namespace, run_dir: Path) -> list[str]:
    cmd = [
        sys.executable, str(REPO / "cli.py"), "network", "up",
        "--clients", str(args.clients), "--frac", str(args.frac), "--rounds", str(args.rounds),
        "--miners", str(args.miners), "--client-procs", str(args.client_procs),
        "--train-size", str(args.train_size), "--val-size", str(args.val_size),
        "--local-epochs", str(args.local_epochs), "--model", args.model,
        "--dp", args.dp, "--epsilon", str(args.epsilon), "--seed", str(args.seed),
        "--selection", args.selection,
        "--run-dir", str(run_dir), "--timeout", str(args.timeout),
    ]  # fmt: skip
    if args.data_dir:
        cmd += ["--data-dir", args.data_dir]
    return cmd


def miner_addresses(genesis: Path) -> dict[str, str]:
    doc = tomllib.loads(genesis.read_text(encoding="utf-8"))
    return {n["id"]: n["address"] for n in doc["nodes"] if n["role"] == "miner"}


async def wait_for_file(path: Path, launcher: subprocess.Popen, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while not path.exists():
        if launcher.poll() is not None:
            raise RuntimeError(f"network up exited ({launcher.returncode}) before {path.name}")
        if time.monotonic() > deadline:
            raise TimeoutError(f"no {path} after {timeout:.0f} s")
        await asyncio.sleep(0.1)
    await asyncio.sleep(0.2)  # written in one go by init_network; let it finish


async def poll_miner(
    name: str,
    address: str,
    *,
    interval: float,
    deadline: float,
    stop: asyncio.Event,
    calls: list[Call],
    ready: list[str],
) -> None:
    """Status to one miner every ``interval`` s until ``stop``, from its first answer on."""
    request = pb.StatusRequest()
    async with channel(address) as ch:
        status = pb_grpc.NodeStub(ch).Status
        while not stop.is_set():  # the miner is still starting (torch, data)
            try:
                await status(request, timeout=1)
                break
            except grpc.aio.AioRpcError:
                await asyncio.sleep(0.2)  # waiting for another process to listen
        else:
            return
        ready.append(name)
        progress(f"{name} answers; polling every {1e3 * interval:g} ms")

        async def one() -> None:
            sent, t0 = time.time(), time.perf_counter()
            try:
                await status(request, timeout=deadline)
                code = "OK"
            except grpc.aio.AioRpcError as exc:
                code = exc.code().name
            latency = time.perf_counter() - t0
            if code == "DEADLINE_EXCEEDED":
                latency = max(latency, deadline)
            calls.append(Call(name, sent, latency, code))

        loop = asyncio.get_running_loop()
        pending: set[asyncio.Task] = set()
        due = loop.time()
        while not stop.is_set():
            task = asyncio.create_task(one())
            pending.add(task)
            task.add_done_callback(pending.discard)
            due += interval
            if due < loop.time():  # this loop fell behind: no burst to catch up
                due = loop.time()
            with contextlib.suppress(asyncio.TimeoutError):
                await asyncio.wait_for(stop.wait(), due - loop.time())
        if pending:
            await asyncio.gather(*pending)


async def measure(
    args: argparse.Namespace, run_dir: Path, launcher: subprocess.Popen
) -> tuple[list[Call], list[str]]:
    await wait_for_file(run_dir / "genesis.toml", launcher, 120)
    miners = miner_addresses(run_dir / "genesis.toml")
    genesis = read_genesis(run_dir / "genesis.toml")
    use_transport(operator_transport(run_dir, genesis))  # mutual TLS, as the server
    if args.poll != "all":
        wanted = [f"miner-{i.strip()}" for i in args.poll.split(",")]
        miners = {m: miners[m] for m in wanted}
    stop = asyncio.Event()
    calls: list[Call] = []
    ready: list[str] = []
    pollers = [
        asyncio.create_task(
            poll_miner(
                name,
                address,
                interval=args.poll_ms / 1e3,
                deadline=args.deadline,
                stop=stop,
                calls=calls,
                ready=ready,
            )
        )
        for name, address in miners.items()
    ]
    done_file = run_dir / "server" / "metrics.json"
    start = time.monotonic()
    try:
        # Until the server has written its metrics (the launcher then only
        # compares chain heads and stops the nodes), or network up exits.
        while not done_file.exists() and launcher.poll() is None:
            if time.monotonic() - start > args.timeout + 60:
                raise TimeoutError("network up did not finish in time")
            await asyncio.sleep(0.2)  # following a child process
    finally:
        stop.set()
        await asyncio.gather(*pollers, return_exceptions=True)
    return calls, sorted(ready)


def log_time(date: str, millis: str) -> float:
    return time.mktime(time.strptime(date, "%Y-%m-%d %H:%M:%S")) + int(millis) / 1e3


def read_log(path: Path) -> list[tuple[float, int, str]]:
    """(time, round, message) of every ``[node rN]`` line of a node log."""
    lines = []
    if path.exists():
        for line in path.read_text(errors="replace").splitlines():
            m = LOG_LINE.match(line)
            if m:
                lines.append((log_time(m[1], m[2]), int(m[4]), m[5]))
    return lines


def validation_windows(miner: str, lines: list[tuple[float, int, str]]) -> list[Window]:
    selected: dict[int, int] = {}  # round -> number of clients selected
    stored: dict[int, set[str]] = {}
    start: dict[int, tuple[float, bool]] = {}  # round -> (window start, all stored)
    windows: list[Window] = []
    for _t, _, message in lines:
        opened = re.match(r"round (\d+) open at height \d+: selected \[(.*)\]", message)
        if opened:
            rnd = int(opened[1])
            selected[rnd] = len(re.findall(r"'[^']+'", opened[2]))
    for t, rnd, message in lines:
        if message.startswith("stored update of "):
            stored.setdefault(rnd, set()).add(message.split()[3])
            complete = len(stored[rnd]) >= selected.get(rnd, 0)
            if rnd not in start or not start[rnd][1]:
                start[rnd] = (t, complete)
    closed: set[int] = set()
    for t, rnd, message in lines:
        opened = re.match(r"round (\d+) open", message)
        if message.startswith("verdicts:"):
            ends = [(rnd, "verdicts")]
        elif opened:
            ends = [(r, "round-open") for r in start if r < int(opened[1])]
        elif message == "stopped":
            ends = [(r, "stopped") for r in start]
        else:
            continue
        for r, end_by in ends:
            if r in start and r not in closed and start[r][0] <= t:
                closed.add(r)
                windows.append(Window(miner, r, start[r][0], t, end_by, start[r][1]))
    return sorted(windows, key=lambda w: (w.round, w.start))


def final_view(db: Path) -> int | None:
    if not db.exists():
        return None
    try:
        with contextlib.closing(sqlite3.connect(f"file:{db}?mode=ro", uri=True)) as conn:
            row = conn.execute("SELECT value FROM hard_state WHERE name = 'view'").fetchone()
    except sqlite3.Error:
        return None
    return int(row[0]) if row else None


def log_notes(run_dir: Path, miner: str, lines: list[tuple[float, int, str]]) -> dict[str, Any]:
    def count(prefix: str) -> int:
        return sum(1 for _, _, m in lines if m.startswith(prefix))

    return {
        "final_view": final_view(run_dir / miner / "chain.db"),
        "verdicts_submitted": count("verdicts:"),
        "state_transfers": count("state transfer"),
        "behind": count("behind:"),
        "links_down": sum(1 for _, _, m in lines if m.startswith("link to") and "down" in m),
        "warnings": count("WARNING"),
        "errors": count("ERROR"),
    }


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(q * (len(ordered) - 1)))]


def summary(latencies: list[float], target: float) -> dict[str, Any]:
    if not latencies:
        return {"calls": 0}
    return {
        "calls": len(latencies),
        "p50_ms": round(1e3 * percentile(latencies, 0.50), 1),
        "p90_ms": round(1e3 * percentile(latencies, 0.90), 1),
        "p99_ms": round(1e3 * percentile(latencies, 0.99), 1),
        "max_ms": round(1e3 * max(latencies), 1),
        "over_target": sum(1 for v in latencies if v > target),
    }


def window_of(call: Call, windows: list[Window]) -> Window | None:
    for w in windows:
        if w.miner == call.miner and call.sent <= w.end and call.sent + call.latency >= w.start:
            return w
    return None


def stop_pid(pid: int, marker: str, timeout: float = 10.0) -> None:
    """SIGTERM (then SIGKILL) a node process of this run that is still alive.

    The node is a child of ``network up``, not of this process, so it is
    watched through /proc; its command line must name this run's folder (a
    pid the OS reused for something else is left alone).
    """

    def alive() -> bool:
        try:
            cmdline = Path(f"/proc/{pid}/cmdline").read_bytes()
            state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
        except OSError:
            return False
        return marker.encode() in cmdline and state != "Z"

    if not alive():
        return
    progress(f"stopping leftover node process {pid}")
    with contextlib.suppress(OSError):
        os.kill(pid, signal.SIGTERM)
    deadline = time.monotonic() + timeout
    while alive() and time.monotonic() < deadline:
        time.sleep(0.1)  # another process's exit
    if alive():
        with contextlib.suppress(OSError):
            os.kill(pid, signal.SIGKILL)


def stop_all(launcher: subprocess.Popen | None, run_dir: Path) -> None:
    if launcher is not None and launcher.poll() is None:
        progress(f"stopping network up (pid {launcher.pid})")
        with contextlib.suppress(OSError):
            os.kill(launcher.pid, signal.SIGTERM)  # it stops its nodes by pid
        try:
            launcher.wait(60)
        except subprocess.TimeoutExpired:
            os.kill(launcher.pid, signal.SIGKILL)
            launcher.wait()
    try:
        pids = [
            int(info["pid"]) for info in json.loads((run_dir / "pids.json").read_text()).values()
        ]
    except (OSError, ValueError, KeyError, TypeError):
        pids = []  # network up never got as far as starting its nodes
    for pid in pids:
        stop_pid(pid, str(run_dir))


def stop_on_sigterm(signum: int, frame: object) -> None:
    raise KeyboardInterrupt  # the finally below stops everything this run started


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--data-dir", default=None)
    parser.add_argument("--clients", type=int, default=20)
    parser.add_argument("--frac", type=float, default=1.0, help="1.0: every client, every round")
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--miners", type=int, default=4)
    parser.add_argument("--client-procs", type=int, default=2)
    parser.add_argument("--train-size", type=int, default=12000, help="images shared by clients")
    parser.add_argument("--val-size", type=int, default=1000, help="each miner's validation set")
    parser.add_argument("--local-epochs", type=float, default=1.0)
    parser.add_argument("--model", default="cnn")
    parser.add_argument("--dp", default="gaussian", choices=["none", "gaussian", "laplace"])
    parser.add_argument("--epsilon", type=float, default=10.0)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument(
        "--selection",
        default="random",
        choices=["weighted", "paper", "random"],
        help="random with --frac 1.0 selects every client every round (weighted drops the "
        "clients validation rejected)",
    )
    parser.add_argument("--poll", default="all", help="miner indices to poll, e.g. 0,2; or all")
    parser.add_argument("--poll-ms", type=float, default=20.0, help="one Status call every ...")
    parser.add_argument("--deadline", type=float, default=10.0, help="per Status call, seconds")
    parser.add_argument("--target-ms", type=float, default=100.0, help="p99 while validating")
    parser.add_argument("--timeout", type=float, default=900.0, help="whole network run, seconds")
    parser.add_argument("--keep", action="store_true", help="keep the run folder (logs, chains)")
    args = parser.parse_args()
    signal.signal(signal.SIGTERM, stop_on_sigterm)
    tmp = Path(tempfile.mkdtemp(prefix="status-latency-"))
    run_dir = tmp / "run"
    launcher: subprocess.Popen | None = None
    load_start = os.getloadavg()
    try:
        cmd = network_command(args, run_dir)
        progress(" ".join(cmd[1:]))
        started = time.time()
        # Its own session: a Ctrl-C here reaches it only through the finally
        # below (SIGTERM), after which it stops its nodes itself.
        launcher = subprocess.Popen(
            cmd, stdout=sys.stderr, stderr=sys.stderr, cwd=REPO, start_new_session=True
        )
        calls, polled = asyncio.run(measure(args, run_dir, launcher))
        with contextlib.suppress(subprocess.TimeoutExpired):
            launcher.wait(60)  # else it is stopped in the finally
        seconds = time.time() - started
        finished = launcher.poll() == 0 and (run_dir / "metrics.json").exists()
        server_metrics = run_dir / "server" / "metrics.json"
        selected: list[int] = []
        if server_metrics.exists():
            selected = [
                len(r["selected"]) for r in json.loads(server_metrics.read_text())["rounds"]
            ]
        logs = {m: read_log(run_dir / m / "log") for m in miner_addresses(run_dir / "genesis.toml")}
        windows = [w for m, lines in logs.items() for w in validation_windows(m, lines)]
        notes = {m: log_notes(run_dir, m, lines) for m, lines in logs.items()}
    finally:
        # A second Ctrl-C must not cut the clean-up short (it is bounded).
        signal.signal(signal.SIGINT, signal.SIG_IGN)
        signal.signal(signal.SIGTERM, signal.SIG_IGN)
        stop_all(launcher, run_dir)
        if args.keep:
            progress(f"run folder kept: {run_dir}")
        else:
            shutil.rmtree(tmp, ignore_errors=True)
    target = args.target_ms / 1e3
    measured = [c for c in calls if c.code in ("OK", "DEADLINE_EXCEEDED")]
    inside = [c for c in measured if window_of(c, windows) is not None]
    outside = [c for c in measured if window_of(c, windows) is None]
    validating = summary([c.latency for c in inside], target)
    by_miner = {}
    for m in polled:
        mine = [c for c in measured if c.miner == m]
        by_miner[m] = {
            "overall": summary([c.latency for c in mine], target),
            "validating": summary([c.latency for c in inside if c.miner == m], target),
        }

    def slowest(group: list[Call], count: int) -> list[dict[str, Any]]:
        return [
            {
                "miner": c.miner,
                "sent_s": round(c.sent - started, 2),
                "ms": round(1e3 * c.latency, 1),
                "round": w.round if (w := window_of(c, windows)) else None,
            }
            for c in sorted(group, key=lambda c: -c.latency)[:count]
        ]

    result = {
        "requirement": "Node.Status p99 within target while a miner validates a round",
        "target_p99_ms": args.target_ms,
        "met": bool(inside) and validating["p99_ms"] <= args.target_ms,
        "validating": validating,
        "overall": summary([c.latency for c in measured], target),
        "outside_windows": summary([c.latency for c in outside], target),
        "timeouts": sum(1 for c in calls if c.code == "DEADLINE_EXCEEDED"),
        "errors": dict(Counter(c.code for c in calls if c.code not in ("OK", "DEADLINE_EXCEEDED"))),
        "by_miner": by_miner,
        "windows": [
            {
                "miner": w.miner,
                "round": w.round,
                "start_s": round(w.start - started, 2),
                "seconds": round(w.end - w.start, 2),
                "end_by": w.end_by,
                "complete": w.complete,
                **{
                    k: v
                    for k, v in summary(
                        [c.latency for c in inside if window_of(c, [w]) is not None], target
                    ).items()
                    if k in ("calls", "p99_ms", "max_ms")
                },
            }
            for w in sorted(windows, key=lambda w: (w.round, w.miner))
        ],
        "slowest": slowest(measured, 5),
        "slowest_outside_windows": slowest(outside, 5),
        "miner_logs": notes,
        "config": {
            "clients": args.clients,
            "frac": args.frac,
            "updates_per_round": round(args.clients * args.frac),
            "rounds": args.rounds,
            "miners": args.miners,
            "client_procs": args.client_procs,
            "train_size": args.train_size,
            "val_size": args.val_size,
            "local_epochs": args.local_epochs,
            "model": args.model,
            "selection": args.selection,
            "dp": args.dp,
            "epsilon": args.epsilon,
            "poll_ms": args.poll_ms,
            "deadline_s": args.deadline,
            "polled": polled,
        },
        "rounds_completed": len(selected),
        "selected_per_round": selected,
        "finished": finished,
        "seconds": round(seconds, 1),
        "cpus": os.cpu_count(),
        "loadavg_start": [round(v, 2) for v in load_start],
        "loadavg_end": [round(v, 2) for v in os.getloadavg()],
    }
    print(json.dumps(result))


if __name__ == "__main__":
    try:
        main()
    except KeyboardInterrupt:
        progress("interrupted; every process of the run was stopped")
        sys.exit(130)
