"""Peak resident memory of a K=100 ``simulate`` run (a child process).

python bench/memory.py --data-dir data --rounds 3
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--data-dir", default=None)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--clients", type=int, default=100)
    parser.add_argument("--model", default="cnn")
    parser.add_argument("extra", nargs="*", help="more simulate options, after --")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        cmd = [
            sys.executable,
            str(REPO / "cli.py"),
            "simulate",
            "--clients",
            str(args.clients),
            "--rounds",
            str(args.rounds),
            "--model",
            args.model,
            "--quiet",
            "--metrics-out",
            str(Path(tmp) / "m.json"),
            *args.extra,
        ]
        if args.data_dir:
            cmd += ["--data-dir", args.data_dir]
        t0 = time.perf_counter()
        subprocess.run(cmd, check=True, stdout=subprocess.DEVNULL)
        seconds = time.perf_counter() - t0
    peak_kib = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss  # KiB on Linux
    print(
        json.dumps(
            {
                "clients": args.clients,
                "rounds": args.rounds,
                "model": args.model,
                "peak_rss_mb": round(peak_kib / 1024, 1),
                "limit_mb": 2048,
                "seconds": round(seconds, 1),
            },
            indent=1,
        )
    )


if __name__ == "__main__":
    main()
