"""Soak and speed benchmark for the PBFT core (consensus/), printing one JSON object.

Soak: many seeded simulator runs with random faults (delay, drop,
duplication, partitions, crash/restart, up to f Byzantine replicas); counts
safety violations and liveness failures and prints a replay command for
each failing seed. ``--byzantine K`` forces K faulty replicas (K = f+1 must
produce violations: the checker can fail).

Perf (``--perf``): committed blocks per second of the pure core in the
simulator, no faults, no-op signatures, no wire encoding, for n = 4, 7, 10.

    python bench/consensus_soak.py --replicas 4 --seeds 1000 --blocks 200
    python bench/consensus_soak.py --replicas 4 --seed 1234 --blocks 200   # replay one seed
    python bench/consensus_soak.py --perf --blocks 5000
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from consensus.sim import Simulation


def soak(args: argparse.Namespace) -> dict[str, object]:
    seeds = (
        [args.seed]
        if args.seed is not None
        else range(args.first_seed, args.first_seed + args.seeds)
    )
    started = time.perf_counter()
    committed = violations = liveness = 0
    failing: list[str] = []
    for done, seed in enumerate(seeds, start=1):
        result = Simulation(
            n=args.replicas,
            seed=seed,
            blocks=args.blocks,
            byzantine=args.byzantine,
            faults=not args.no_faults,
        ).run()
        committed += result.blocks_committed
        if result.violations:
            violations += 1
        if result.liveness_failure is not None:
            liveness += 1
        if not result.ok:
            reason = result.violations[0] if result.violations else result.liveness_failure
            print(f"FAIL seed {seed}: {reason}\n  replay: {result.replay}", file=sys.stderr)
            failing.append(result.replay)
        if args.verbose or done % 50 == 0:
            elapsed = time.perf_counter() - started
            print(
                f"[{done}/{len(seeds)}] {elapsed:.1f}s committed={committed} "
                f"violations={violations} liveness_failures={liveness}",
                file=sys.stderr,
            )
    return {
        "replicas": args.replicas,
        "seeds": len(seeds),
        "blocks": args.blocks,
        "byzantine": args.byzantine,
        "blocks_committed": committed,
        "safety_violations": violations,
        "liveness_failures": liveness,
        "seconds": round(time.perf_counter() - started, 2),
        "failing_replays": failing[:20],
    }


def perf(args: argparse.Namespace) -> dict[str, object]:
    rates: dict[str, float] = {}
    started = time.perf_counter()
    for n in (4, 7, 10):
        sim = Simulation(n=n, seed=0, blocks=args.blocks, faults=False, wire=False, fast=True)
        t0 = time.perf_counter()
        result = sim.run()
        elapsed = time.perf_counter() - t0
        if not result.ok:
            raise SystemExit(f"perf run failed: {result.violations or result.liveness_failure}")
        rates[f"blocks_per_second_n{n}"] = round(result.blocks_committed / elapsed, 1)
        print(f"n={n}: {result.blocks_committed} blocks in {elapsed:.2f}s", file=sys.stderr)
    return {
        "mode": "perf",
        "blocks": args.blocks,
        **rates,
        "seconds": round(time.perf_counter() - started, 2),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--replicas", type=int, default=4)
    parser.add_argument("--seeds", type=int, default=100)
    parser.add_argument("--first-seed", type=int, default=0)
    parser.add_argument("--seed", type=int, default=None, help="replay exactly this seed")
    parser.add_argument("--blocks", type=int, default=200)
    parser.add_argument("--byzantine", type=int, default=None, help="force K faulty replicas")
    parser.add_argument("--no-faults", action="store_true", help="no random faults")
    parser.add_argument("--perf", action="store_true", help="blocks/s for n = 4, 7, 10")
    parser.add_argument("--json", action="store_true", help="print only the JSON object")
    parser.add_argument("--verbose", action="store_true")
    args = parser.parse_args()
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    report = perf(args) if args.perf else soak(args)
    print(json.dumps(report) if args.json else json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
