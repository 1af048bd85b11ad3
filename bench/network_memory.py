"""Resident memory of a whole local network: K=100 clients in 4 processes, 4 miners, the server.

Runs ``network up`` as a child process with its own ``--run-dir``, reads
the pids of every node process from ``pids.json`` and samples
``/proc/<pid>/status`` every ``--interval`` seconds while they run: the
result is the sum over nodes of each one's peak resident set (``VmHWM``,
the kernel's high-water mark, at the last sample before the node exited),
the largest sum of current ``VmRSS`` seen at one sample, and the largest sum
of ``Pss`` (``/proc/<pid>/smaps_rollup``: shared pages such as libtorch's
divided among the processes that map them, so the sum is the physical
memory the nodes use together). RSS counts every shared page once per
process. The launcher process itself is not counted (it only follows the
server's progress).

python bench/network_memory.py --data-dir data --rounds 1
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def status_kib(pid: int) -> dict[str, int]:
    """VmRSS, VmHWM and Pss of ``pid`` in KiB; empty once the process is gone."""
    fields = {}
    for name, keys in (("status", ("VmRSS", "VmHWM")), ("smaps_rollup", ("Pss",))):
        try:
            lines = Path(f"/proc/{pid}/{name}").read_text().splitlines()
        except OSError:
            return {}
        for line in lines:
            key, _, value = line.partition(":")
            if key in keys:
                fields[key] = int(value.split()[0])
    return fields


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--data-dir", default=None)
    parser.add_argument("--rounds", type=int, default=1)
    parser.add_argument("--clients", type=int, default=100)
    parser.add_argument("--client-procs", type=int, default=4)
    parser.add_argument("--frac", type=float, default=0.1)
    parser.add_argument("--train-size", type=int, default=60000)
    parser.add_argument("--model", default="cnn")
    parser.add_argument("--interval", type=float, default=0.5)
    parser.add_argument("--timeout", type=float, default=900.0)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        run_dir = Path(tmp) / "run"
        cmd = [
            sys.executable, str(REPO / "cli.py"), "network", "up",
            "--clients", str(args.clients), "--client-procs", str(args.client_procs),
            "--miners", "4", "--frac", str(args.frac), "--rounds", str(args.rounds),
            "--train-size", str(args.train_size), "--model", args.model,
            "--run-dir", str(run_dir), "--timeout", str(args.timeout),
        ]  # fmt: skip
        if args.data_dir:
            cmd += ["--data-dir", args.data_dir]
        start = time.perf_counter()
        launcher = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        peak: dict[str, int] = {}  # node -> VmHWM KiB at its last sample
        max_rss_sum = max_pss_sum = 0
        pids: dict[str, int] = {}
        try:
            while launcher.poll() is None:
                if time.perf_counter() - start > args.timeout + 60:
                    raise TimeoutError("network up did not finish in time")
                if not pids and (run_dir / "pids.json").exists():
                    with_pids = json.loads((run_dir / "pids.json").read_text())
                    pids = {name: info["pid"] for name, info in with_pids.items()}
                samples = {name: status_kib(pid) for name, pid in pids.items()}
                for name, fields in samples.items():
                    if fields:
                        peak[name] = max(peak.get(name, 0), fields["VmHWM"])
                max_rss_sum = max(max_rss_sum, sum(f.get("VmRSS", 0) for f in samples.values()))
                max_pss_sum = max(max_pss_sum, sum(f.get("Pss", 0) for f in samples.values()))
                time.sleep(args.interval)
        finally:
            if launcher.poll() is None:
                launcher.terminate()  # network up stops its nodes on SIGTERM
                launcher.wait(30)
        seconds = time.perf_counter() - start
        finished = (run_dir / "metrics.json").exists()
    print(
        json.dumps(
            {
                "clients": args.clients,
                "client_procs": args.client_procs,
                "miners": 4,
                "rounds": args.rounds,
                "frac": args.frac,
                "train_size": args.train_size,
                "processes": len(peak),
                "sum_peak_rss_mb": round(sum(peak.values()) / 1024, 1),
                "max_sampled_rss_sum_mb": round(max_rss_sum / 1024, 1),
                "max_sampled_pss_sum_mb": round(max_pss_sum / 1024, 1),
                "peak_rss_mb_by_node": {k: round(v / 1024, 1) for k, v in sorted(peak.items())},
                "limit_mb": 6144,
                "finished": finished and launcher.returncode == 0,
                "seconds": round(seconds, 1),
            }
        )
    )


if __name__ == "__main__":
    main()
