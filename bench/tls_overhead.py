"""Round time of a network over mutual TLS, next to the same network in plaintext.

Runs ``network up`` (4 miners, one OS process per node on 127.0.0.1) with
the same configuration twice per pair, once with mutual TLS (the default)
and once with ``--insecure``, alternating, in this one run, and compares
the per-round ``seconds`` the server writes to its metrics JSON (rounds
only: process start-up, data loading and registration are left out). The
two runs of a pair must agree on every round's selected and accepted
clients and accuracy (seeded selection and noise), so the time compared is
the time of the same work.

python bench/tls_overhead.py --data-dir data --rounds 5 [--pairs 2]
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]


def options(args: argparse.Namespace) -> list[str]:
    out = [
        "--clients", str(args.clients), "--frac", str(args.frac), "--rounds", str(args.rounds),
        "--model", args.model, "--train-size", str(args.train_size), "--seed", str(args.seed),
        "--dp", "gaussian", "--epsilon", "10", "--reproducible-noise",
        "--selection-seed", "run", "--miners", "4", "--client-procs", "2", "--quiet",
    ]  # fmt: skip
    if args.data_dir:
        out += ["--data-dir", args.data_dir]
    return out


def run(args: argparse.Namespace, folder: Path, *, tls: bool) -> dict[str, Any]:
    out = folder / ("tls" if tls else "plain")
    command = [sys.executable, str(REPO / "cli.py"), "network", "up", *options(args)]
    command += ["--run-dir", str(out / "run"), "--metrics-out", str(out / "metrics.json")]
    if not tls:
        command.append("--insecure")
    start = time.perf_counter()
    subprocess.run(command, check=True, stdout=subprocess.DEVNULL, timeout=args.timeout)
    doc = json.loads((out / "metrics.json").read_text())
    doc["wall_seconds"] = time.perf_counter() - start
    return doc


def same_work(a: dict[str, Any], b: dict[str, Any]) -> bool:
    return len(a["rounds"]) == len(b["rounds"]) and all(
        sorted(x["selected"]) == sorted(y["selected"])
        and sorted(x["accepted"]) == sorted(y["accepted"])
        and round(x["accuracy"], 4) == round(y["accuracy"], 4)
        for x, y in zip(a["rounds"], b["rounds"], strict=True)
    )


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--data-dir", default=None)
    parser.add_argument("--clients", type=int, default=10)
    parser.add_argument("--frac", type=float, default=0.5)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--model", default="cnn")
    parser.add_argument("--train-size", type=int, default=6000)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--pairs", type=int, default=1, help="TLS/plaintext pairs, alternating")
    parser.add_argument("--timeout", type=float, default=1800.0)
    args = parser.parse_args()
    tls_rounds: list[float] = []
    plain_rounds: list[float] = []
    walls: dict[str, list[float]] = {"tls": [], "plaintext": []}
    agree = True
    with tempfile.TemporaryDirectory(prefix="tls-overhead-") as tmp:
        for pair in range(args.pairs):
            order = (False, True) if pair % 2 == 0 else (True, False)
            docs = {}
            for tls in order:
                docs[tls] = run(args, Path(tmp) / f"pair-{pair}", tls=tls)
                print(f"pair {pair + 1}: {'TLS' if tls else 'plaintext'} done", file=sys.stderr)
            agree &= same_work(docs[True], docs[False])
            tls_rounds += [r["seconds"] for r in docs[True]["rounds"]]
            plain_rounds += [r["seconds"] for r in docs[False]["rounds"]]
            walls["tls"].append(docs[True]["wall_seconds"])
            walls["plaintext"].append(docs[False]["wall_seconds"])
    tls_mean, plain_mean = statistics.mean(tls_rounds), statistics.mean(plain_rounds)
    print(
        json.dumps(
            {
                "config": {k: v for k, v in vars(args).items() if k not in ("timeout",)},
                "rounds_compared": len(tls_rounds),
                "same_selections_and_accuracies": agree,
                "round_seconds_mean": {
                    "tls": round(tls_mean, 3),
                    "plaintext": round(plain_mean, 3),
                },
                "round_seconds_median": {
                    "tls": round(statistics.median(tls_rounds), 3),
                    "plaintext": round(statistics.median(plain_rounds), 3),
                },
                "round_seconds": {
                    "tls": [round(x, 2) for x in tls_rounds],
                    "plaintext": [round(x, 2) for x in plain_rounds],
                },
                "tls_to_plaintext_round_time_ratio": round(tls_mean / plain_mean, 3),
                "tls_to_plaintext_median_ratio": round(
                    statistics.median(tls_rounds) / statistics.median(plain_rounds), 3
                ),
                "target_ratio": 1.05,
                "wall_seconds": {k: [round(x, 1) for x in v] for k, v in walls.items()},
            }
        )
    )


if __name__ == "__main__":
    main()
