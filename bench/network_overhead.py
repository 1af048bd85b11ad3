"""Wall time per round of ``network up`` over ``simulate`` with the same configuration.

Runs ``simulate`` then ``network up`` (4 miners, one OS process per node on
127.0.0.1) as child processes, one after the other in this one run, and
compares the per-round ``seconds`` both write to their metrics JSON (which
leave out process start-up, data loading and registration), next to the
total wall time of each command. Also checks that the two runs agree: the
selected and accepted sets of every round, and the accuracies to 4 decimals.

python bench/network_overhead.py --data-dir data --rounds 5
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]


def run_config(args: argparse.Namespace) -> list[str]:
    options = [
        "--clients", str(args.clients), "--frac", str(args.frac), "--rounds", str(args.rounds),
        "--local-epochs", str(args.local_epochs), "--model", args.model,
        "--dp", "gaussian", "--epsilon", str(args.epsilon),
        # Seeded noise: the two runs must agree number for number (no privacy).
        "--reproducible-noise",
        "--train-size", str(args.train_size), "--seed", str(args.seed),
    ]  # fmt: skip
    if args.data_dir:
        options += ["--data-dir", args.data_dir]
    return options


def timed(cmd: list[str], timeout: float) -> float:
    start = time.perf_counter()
    subprocess.run(cmd, check=True, stdout=subprocess.DEVNULL, timeout=timeout)
    return time.perf_counter() - start


def per_round(doc: dict[str, Any]) -> float:
    return sum(r["seconds"] for r in doc["rounds"]) / len(doc["rounds"])


def compare(sim: dict[str, Any], net: dict[str, Any]) -> tuple[bool, float]:
    """(selected and accepted equal in every round, largest |accuracy difference|)."""
    same = len(sim["rounds"]) == len(net["rounds"])
    diff = 0.0
    for a, b in zip(sim["rounds"], net["rounds"], strict=False):
        same &= sorted(a["selected"]) == sorted(b["selected"])
        same &= sorted(a["accepted"]) == sorted(b["accepted"])
        diff = max(diff, abs(round(a["accuracy"], 4) - round(b["accuracy"], 4)))
    return same, diff


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--data-dir", default=None)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--clients", type=int, default=20)
    parser.add_argument("--frac", type=float, default=0.5)
    parser.add_argument("--local-epochs", type=float, default=1.0)
    parser.add_argument("--model", default="cnn")
    parser.add_argument("--epsilon", type=float, default=10.0)
    parser.add_argument("--train-size", type=int, default=60000)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--client-procs", type=int, default=2)
    parser.add_argument("--timeout", type=float, default=3600.0, help="per command, seconds")
    args = parser.parse_args()
    cli = [sys.executable, str(REPO / "cli.py")]
    options = run_config(args)
    with tempfile.TemporaryDirectory() as tmp:
        sim_out, net_out = Path(tmp) / "sim.json", Path(tmp) / "net.json"
        sim_wall = timed(
            [*cli, "simulate", *options, "--quiet", "--metrics-out", str(sim_out)], args.timeout
        )
        net_cmd = [
            *cli, "network", "up", *options, "--miners", "4",
            "--client-procs", str(args.client_procs), "--run-dir", str(Path(tmp) / "run"),
            "--timeout", str(args.timeout), "--metrics-out", str(net_out),
            "--selection-seed", "run",  # simulate's seeds, so the selections are comparable
        ]  # fmt: skip
        net_wall = timed(net_cmd, args.timeout + 60)
        sim, net = json.loads(sim_out.read_text()), json.loads(net_out.read_text())
    same, diff = compare(sim, net)
    sim_round, net_round = per_round(sim), per_round(net)
    print(
        json.dumps(
            {
                "rounds": args.rounds,
                "clients": args.clients,
                "frac": args.frac,
                "model": args.model,
                "train_size": args.train_size,
                "simulate_seconds_per_round": round(sim_round, 3),
                "network_seconds_per_round": round(net_round, 3),
                "ratio": round(net_round / sim_round, 3),
                "target_ratio": 1.3,
                "simulate_wall_seconds": round(sim_wall, 1),
                "network_wall_seconds": round(net_wall, 1),
                "identical_selected_accepted": same,
                "max_accuracy_diff": round(diff, 4),
            }
        )
    )


if __name__ == "__main__":
    main()
