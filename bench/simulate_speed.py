"""Does a change alter what ``simulate`` computes, or how fast? This tree against a baseline tree.

Runs the same ``python cli.py simulate ...`` (reproducible noise, so that
results can be compared to the last digit) in this working tree and in a
baseline tree (for example ``git worktree add /tmp/base <commit>``), in
alternating order, ``--repeats`` times each, one process at a time. Prints
JSON: per tree the mean seconds per round (the rounds' own timings, which
leave out start-up and data loading), their ratio (this / baseline; target
for a refactoring: at most 1.05), and whether every round's accuracy, loss,
selection, verdicts, reputations and privacy spent are identical.

    python bench/simulate_speed.py --baseline /tmp/base --data-dir data
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

HERE = Path(__file__).resolve().parents[1]
COMPARED = (
    "accuracy",
    "loss",
    "selected",
    "accepted",
    "rejected",
    "declined",
    "silent",
    "reputation",
    "epsilon_spent_max",
    "epsilon_spent_mean",
)
DEFAULT_RUN = (
    "--clients 20 --frac 0.5 --rounds 5 --dist iid --dp gaussian --epsilon 10 "
    "--malicious 0.2 --attack labelflip"
)


def simulate(tree: Path, run: list[str], data_dir: str | None, out: Path) -> dict:
    env = {**os.environ}
    if data_dir is not None:
        env["LLBCFL_DATA"] = data_dir
    command = [sys.executable, "cli.py", "simulate", *run, "--reproducible-noise", "--quiet"]
    command += ["--metrics-out", str(out)]
    subprocess.run(command, cwd=tree, env=env, check=True, stdout=subprocess.DEVNULL)
    return json.loads(out.read_text())


def rounds_of(doc: dict) -> list[dict]:
    return [{k: r.get(k) for k in COMPARED} for r in doc["rounds"]]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--baseline", required=True, type=Path, help="the tree to compare with")
    parser.add_argument("--data-dir", default=None)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--run", default=DEFAULT_RUN, help="simulate options (quoted)")
    args = parser.parse_args()
    if not (args.baseline / "cli.py").is_file():
        parser.error(f"{args.baseline} holds no cli.py: not a tree of this project")
    run = args.run.split()
    seconds: dict[str, list[float]] = {"this": [], "baseline": []}
    results: dict[str, list[dict]] = {}
    with tempfile.TemporaryDirectory() as tmp:
        for i in range(args.repeats):
            order = [("this", HERE), ("baseline", args.baseline)]
            for name, tree in order if i % 2 == 0 else order[::-1]:
                print(f"repeat {i + 1}/{args.repeats}: {name}", file=sys.stderr)
                doc = simulate(tree, run, args.data_dir, Path(tmp) / f"{name}-{i}.json")
                seconds[name].append(statistics.mean(r["seconds"] for r in doc["rounds"]))
                results.setdefault(name, rounds_of(doc))
                if rounds_of(doc) != results[name]:
                    raise SystemExit(f"{name}: two runs of the same seed differ")
    mean = {k: statistics.mean(v) for k, v in seconds.items()}
    print(
        json.dumps(
            {
                "run": " ".join(run) + " --reproducible-noise",
                "repeats": args.repeats,
                "seconds_per_round": {k: round(v, 4) for k, v in mean.items()},
                "ratio": round(mean["this"] / mean["baseline"], 4),
                "target_ratio": 1.05,
                "identical_results": results["this"] == results["baseline"],
                "final_accuracy": results["this"][-1]["accuracy"],
                "loadavg": [round(x, 2) for x in os.getloadavg()],
            },
            indent=2,
        )
    )


if __name__ == "__main__":
    main()
