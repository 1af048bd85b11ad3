"""Recovery times of the multi-host fault suite: how long the chain takes to move again.

Runs the faults of tests/multihost/faults.py (the same implementation as the
suite in tests/multihost/test_lan.py), each on a fresh network of seven
hosts (Linux network namespaces on a bridge, 198.18.0.0/24; needs root):
the server, four miners (one per host), two hosts of two clients, each
started with its bundle's ``sh run.sh``. While a run lasts, every miner's
chain height is read from its ``chain.db`` (read-only) every 0.1 s; after
it, ``chain show`` gives the height of every round's summary block.

For each fault, from its reference time (the kill for a kill -9 and
restart; the end of the outage for SIGSTOP, a cut link, two miners down,
where it is the restart of the first of the two):

* ``next_block_s``: until the highest chain holds a block it did not hold
  at the reference;
* ``round_end_s``: until it holds the summary of the round in progress at
  the reference (the end of that round);
* ``caught_up_s`` (a restarted or stopped miner): from its restart (or
  SIGCONT, or link up) until its own chain is as high as the highest.

Times come from samples taken every 0.1 s (plus the time to read four chain
files; ``sample_gap_max_s`` is the largest gap between samples from 5 s
before to 30 s after the reference: the resolution, which a loaded machine
widens). The JSON also holds each fault's length, the
blocks committed during it, the wall time of each run and the totals. The
machine may be shared: these are times on a loaded 2-core machine, and a
restarted process's start-up (Python, torch, MNIST) is part of its
recovery. Every namespace, link and process is removed after each fault,
even on error.

sudo python bench/faults.py --data-dir data            # every fault, about 9 minutes
sudo python bench/faults.py --faults kill-primary,cut-server
"""

from __future__ import annotations

import argparse
import itertools
import json
import shutil
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))  # this checkout's tests/ and node code

from fl.data import resolve_data_root  # noqa: E402
from tests.multihost.faults import FAULTS, ROUNDS, Network, Record, run_fault  # noqa: E402
from tests.multihost.netns import Lan, unavailable  # noqa: E402


def first_after(
    samples: list[tuple[float, tuple[int, ...]]], start: float, test: Any
) -> float | None:
    """Seconds from ``start`` to the first sample at or after it that passes ``test``."""
    for t, heights in samples:
        if t >= start and test(heights):
            return round(t - start, 3)
    return None


def height_at(samples: list[tuple[float, tuple[int, ...]]], when: float) -> int:
    """The highest chain of the last sample at or before ``when``."""
    before = [max(h) for t, h in samples if t <= when]
    return before[-1] if before else 0


def recovery(net: Network, record: Record) -> dict[str, Any]:
    assert net.watch is not None
    samples = net.watch.samples
    summaries = net.summary_heights()
    ref = record.reference
    at_ref = height_at(samples, ref)
    in_progress = 1 + sum(1 for h in summaries.values() if h <= at_ref)
    stamps = [t for t, _ in samples if ref - 5 <= t <= ref + 30]
    gaps = [b - a for a, b in itertools.pairwise(stamps)]
    result: dict[str, Any] = {
        "fault": record.fault,
        "hosts": list(record.hosts),
        "measured_from": "kill" if record.kind == "kill" else "end of the outage",
        "fault_s": round(record.ended - record.started, 3),
        "blocks_during_fault": height_at(samples, record.ended)
        - height_at(samples, record.started),
        "height_at_reference": at_ref,
        "round_in_progress": in_progress if in_progress <= ROUNDS else None,
        "sample_gap_max_s": round(max(gaps), 3) if gaps else None,
        "next_block_s": first_after(samples, ref, lambda h: max(h) > at_ref),
        "round_end_s": (
            first_after(samples, ref, lambda h: max(h) >= summaries[in_progress])
            if in_progress in summaries
            else None
        ),
    }
    victims = record.notes.get("victims") or (
        [record.notes["victim"]] if "victim" in record.notes else []
    )
    restarts = record.notes.get("restarted", {})
    if victims:
        result["caught_up_s"] = {
            f"miner-{v}": first_after(
                samples, restarts.get(v, record.ended), lambda h, v=v: h[v] >= max(h)
            )
            for v in victims
        }
    for key in ("primary", "stalled_at"):
        if key in record.notes:
            result[key] = record.notes[key]
    return result


def total(results: list[dict[str, Any]], key: str) -> float | None:
    values = [r[key] for r in results if r.get(key) is not None]
    return round(sum(values), 3) if values else None


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--data-dir", default=None, help="MNIST root [default: $LLBCFL_DATA]")
    parser.add_argument("--faults", default=",".join(FAULTS), help="comma-separated names")
    parser.add_argument("--out", default=None, help="also write the JSON here")
    parser.add_argument("--keep", action="store_true", help="keep the run folders")
    args = parser.parse_args()
    reason = unavailable()
    if reason:
        sys.exit(f"cannot run: {reason}")
    names = [n for n in args.faults.split(",") if n]
    unknown = [n for n in names if n not in FAULTS]
    if unknown:
        sys.exit(f"unknown fault(s) {unknown}; known: {list(FAULTS)}")
    data = resolve_data_root(args.data_dir).resolve()
    base = Path(tempfile.mkdtemp(prefix="llbcfl-faults-"))
    results, began = [], time.monotonic()
    for name in names:
        print(f"{name} ...", file=sys.stderr, flush=True)
        lan, started = Lan(), time.monotonic()
        try:
            net, record, head = run_fault(lan, base / name, data, name)
            result = {"name": name, **recovery(net, record), "head": head.split()[-1][:16]}
        except AssertionError as exc:  # the fault's run failed: say so, go on with the next
            result = {"name": name, "error": str(exc)[:2000]}
        finally:
            lan.close()
            left = lan.leftovers()
            if left:
                sys.exit(f"left behind: {left}")
        result["run_s"] = round(time.monotonic() - started, 1)
        print(json.dumps(result), file=sys.stderr, flush=True)
        results.append(result)
    report = {
        "faults": results,
        "totals": {
            "faults": len(results),
            "failed": [r["name"] for r in results if "error" in r],
            "next_block_s": total(results, "next_block_s"),
            "round_end_s": total(results, "round_end_s"),
            "wall_s": round(time.monotonic() - began, 1),
        },
        "run": "4 miners (one per host), server, 2 hosts of 2 clients; mlp, 3 rounds",
        "folder": str(base) if args.keep else None,
    }
    text = json.dumps(report, indent=1)
    print(text)
    if args.out:
        Path(args.out).write_text(text + "\n")
    if not args.keep:
        shutil.rmtree(base, ignore_errors=True)


if __name__ == "__main__":
    main()
