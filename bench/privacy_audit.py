"""The privacy audit at the benchmark setting, in its three cases, one JSON summary.

Runs ``python cli.py privacy audit`` (full size: 10,000 trials, 50 records)
with secret noise (the bound must stay below the claim: how close it comes is
the audit's tightness), with public noise (the bound must reach its ceiling)
and with noise calibrated for half the sensitivity (the bound must exceed the
claim), then with secret noise for the Laplace mechanism.

    python bench/privacy_audit.py --data-dir data
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
CASES = {
    "gaussian_secret": [],
    "gaussian_public_noise": ["--reproducible-noise"],
    "gaussian_halved_sensitivity": ["--fault", "halve-sensitivity"],
    "laplace_secret": ["--dp", "laplace"],
}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--data-dir", default=None)
    parser.add_argument("--quick", action="store_true", help="the audits' --quick size")
    parser.add_argument("--only", nargs="*", default=None, help="case names")
    args = parser.parse_args()
    summary = {}
    for name, extra in CASES.items():
        if args.only and name not in args.only:
            continue
        command = [sys.executable, str(ROOT / "cli.py"), "privacy", "audit", "--quiet", *extra]
        if args.data_dir:
            command += ["--data-dir", args.data_dir]
        if args.quick:
            command.append("--quick")
        done = subprocess.run(command, capture_output=True, text=True, cwd=ROOT)
        if done.returncode not in (0, 1):
            raise SystemExit(f"{name}: audit failed to run:\n{done.stderr}")
        report = json.loads(done.stdout)
        summary[name] = {
            "claimed_epsilon_per_release": round(report["claimed_epsilon_per_release"], 4),
            "accountant_epsilon_per_release": report["accountant_epsilon_per_release"],
            "empirical_epsilon_lower_bound": round(report["empirical_epsilon_lower_bound"], 4),
            "lower_bound_over_claim": round(report["lower_bound_over_claim"], 4),
            "ceiling": round(report["ceiling"], 4),
            "bound": report["bound"],
            "passed": report["passed"],
            "noise_regenerated_by_a_miner": report["miner_view"]["noise_regenerated"],
            "trials": report["trials"],
            "seconds": report["seconds"],
        }
        print(f"{name}: {summary[name]}", file=sys.stderr, flush=True)
    print(json.dumps(summary, indent=1))


if __name__ == "__main__":
    main()
