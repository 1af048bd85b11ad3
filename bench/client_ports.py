"""Listening ports of the client processes: clients dial out, so none.

Runs ``network up`` with K clients spread over P client processes (default
K = 100 in 4), waits until the server has selected round 1's clients (every
client process has registered and attends the server by then), and counts
the TCP sockets in LISTEN state that each node process holds (from
``/proc``: a socket inode in ``/proc/net/tcp[6]`` with state 0A, among the
process's file descriptors). The run then goes on to its end; the JSON
also says whether it finished. Linux only.

python bench/client_ports.py --data-dir data [--clients 100 --client-procs 4]
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
LISTEN = "0A"


def listening_inodes() -> set[str]:
    inodes = set()
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        try:
            lines = Path(table).read_text().splitlines()[1:]
        except OSError:
            continue
        for line in lines:
            fields = line.split()
            if len(fields) > 9 and fields[3] == LISTEN:
                inodes.add(fields[9])
    return inodes


def listening_ports_of(pid: int, listening: set[str]) -> int:
    count = 0
    fd_dir = Path(f"/proc/{pid}/fd")
    for fd in fd_dir.iterdir():
        try:
            target = os.readlink(fd)
        except OSError:
            continue
        if target.startswith("socket:[") and target[8:-1] in listening:
            count += 1
    return count


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--data-dir", default=None)
    parser.add_argument("--clients", type=int, default=100)
    parser.add_argument("--client-procs", type=int, default=4)
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--timeout", type=float, default=900.0)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="client-ports-") as tmp:
        run_dir = Path(tmp) / "run"
        command = [
            sys.executable, str(REPO / "cli.py"), "network", "up", "--quiet",
            "--clients", str(args.clients), "--client-procs", str(args.client_procs),
            "--frac", "0.1", "--rounds", str(args.rounds), "--model", "mlp",
            "--train-size", str(60 * args.clients), "--val-size", "500", "--test-size", "1000",
            "--run-dir", str(run_dir),
        ]  # fmt: skip
        if args.data_dir:
            command += ["--data-dir", args.data_dir]
        launcher = subprocess.Popen(command, stdout=subprocess.DEVNULL)
        counts: dict[str, int] = {}
        try:
            deadline = time.monotonic() + args.timeout
            progress = run_dir / "server" / "progress.json"
            while time.monotonic() < deadline and launcher.poll() is None:
                try:
                    if json.loads(progress.read_text()).get("round", 0) >= 1 or any(
                        "selecting" in line
                        for line in (run_dir / "server" / "log").read_text().splitlines()
                    ):
                        break
                except (OSError, ValueError):
                    pass
                time.sleep(0.2)  # polling another process's files; not a race
            listening = listening_inodes()
            pids = json.loads((run_dir / "pids.json").read_text())
            counts = {
                name: listening_ports_of(info["pid"], listening) for name, info in pids.items()
            }
            finished = launcher.wait(timeout=max(1.0, deadline - time.monotonic())) == 0
        finally:
            if launcher.poll() is None:
                launcher.terminate()
                launcher.wait(timeout=60)
    clients = {k: v for k, v in counts.items() if k.startswith("clients-")}
    print(
        json.dumps(
            {
                "clients": args.clients,
                "client_processes": len(clients),
                "listening_ports_of_client_processes": sum(clients.values()),
                "listening_ports_per_process": counts,
                "target": 0,
                "run_finished": finished,
            }
        )
    )


if __name__ == "__main__":
    main()
