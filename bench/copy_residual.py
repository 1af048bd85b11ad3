"""How close do honest updates come to each other? The margin of the copy tolerance.

``fl.copies`` rejects an update whose copy residual (the sine of its angle
to another update; 1 past 90 degrees) to an update of its round, or to an
accepted update of the previous ``COPY_WINDOW`` rounds, is at most
``COPY_TOLERANCE``. This runs ``simulate`` on MNIST, all clients honest,
in several settings (no DP and Gaussian DP; IID, Dirichlet and the
two-label shards; 10 or 20 clients a round), records every update each
round sends, and prints JSON: per setting the smallest residual between two
updates of one round, the smallest to an accepted update of 1, 2, ...
rounds before (the sender's own earlier updates included, except from the
same base model, as the rule does; lags past the window too, to show the
trend), the smallest within the window, and how many rounds recorded a
copy verdict (target: none, with the smallest residual far above the
tolerance). Seed 0, the defaults of ``simulate`` otherwise.

    python bench/copy_residual.py --data-dir data [--rounds 10] [--only nodp_iid,...]
"""

from __future__ import annotations

import argparse
import contextlib
import itertools
import json
import math
import os
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import chain.simulator
from chain.digests import weights_digest
from chain.simulator import run_simulation
from fl.config import RunConfig
from fl.copies import COPY_TOLERANCE, COPY_WINDOW, copy_residual
from fl.datasets import load_splits
from fl.weights import flat_by_name

BASE: dict[str, Any] = {"clients": 20, "frac": 0.5, "val_size": 500, "test_size": 2_000}
GAUSSIAN: dict[str, Any] = {"dp": "gaussian", "epsilon": 10.0, "reproducible_noise": True}
SETTINGS: dict[str, dict[str, Any]] = {
    "nodp_iid": {"dist": "iid"},
    "nodp_dirichlet": {"dist": "dirichlet", "alpha": 0.5},
    "nodp_shards": {"dist": "noniid"},
    # Every client in every round: a client's consecutive updates, lag 1.
    "nodp_shards_all": {"dist": "noniid", "clients": 10, "frac": 1.0},
    "nodp_iid_all": {"dist": "iid", "clients": 10, "frac": 1.0},
    "gaussian_iid": {"dist": "iid", **GAUSSIAN},
    "gaussian_dirichlet": {"dist": "dirichlet", "alpha": 0.5, **GAUSSIAN},
}


@contextlib.contextmanager
def recording(rounds: list[dict[str, Any]]) -> Iterator[None]:
    """Record each round's updates, base model and verdicts (bench only)."""
    original = chain.simulator.validate_round

    def validate_and_record(config: RunConfig, **kwargs: Any) -> Any:
        verdicts = original(config, **kwargs)
        rounds.append(
            {
                "base": weights_digest(kwargs["global_weights"]),
                "updates": {u.client: flat_by_name(u.delta) for u in kwargs["updates"]},
                "accepted": {c for c, v in verdicts.items() if v.accepted},
            }
        )
        return verdicts

    chain.simulator.validate_round = validate_and_record
    try:
        yield
    finally:
        chain.simulator.validate_round = original


def residuals(rounds: list[dict[str, Any]], *, max_lag: int) -> dict[str, Any]:
    same_round = math.inf
    by_lag = dict.fromkeys(range(1, max_lag + 1), math.inf)
    own = math.inf  # the sender's own earlier updates, within the window
    for r, now in enumerate(rounds):
        ids = sorted(now["updates"])
        for a, b in itertools.combinations(ids, 2):
            same_round = min(same_round, copy_residual(now["updates"][a], now["updates"][b]))
        for lag in range(1, min(max_lag, r) + 1):
            before = rounds[r - lag]
            for cid in ids:
                for other in sorted(before["accepted"]):
                    if other == cid and before["base"] == now["base"]:
                        continue  # exempt by the rule
                    res = copy_residual(now["updates"][cid], before["updates"][other])
                    by_lag[lag] = min(by_lag[lag], res)
                    if other == cid and lag <= COPY_WINDOW:
                        own = min(own, res)
    window = min([same_round, *(v for k, v in by_lag.items() if k <= COPY_WINDOW)])
    return {
        "updates": sum(len(r["updates"]) for r in rounds),
        "min_same_round": round(same_round, 4),
        "min_by_lag": {k: round(v, 4) for k, v in by_lag.items() if v < math.inf},
        "min_own_earlier": round(own, 4) if own < math.inf else None,
        "min_within_window": round(window, 4),
        "margin": round(window / COPY_TOLERANCE, 1),
    }


def measure(name: str, overrides: dict[str, Any], *, rounds: int, data_dir: str | None) -> dict:
    config = RunConfig(**{**BASE, **overrides, "rounds": rounds, "data_dir": data_dir})
    splits = load_splits(config)
    record: list[dict[str, Any]] = []
    start = time.perf_counter()
    with recording(record):
        doc = run_simulation(config, splits, clock=time.perf_counter)
    out = residuals(record, max_lag=rounds - 1)
    flagged = sum(any(v.startswith("copy:") for v in r["rejected"].values()) for r in doc["rounds"])
    return {
        **out,
        "honest_rounds_with_a_copy_verdict": flagged,
        "final_accuracy": doc["rounds"][-1]["accuracy"],
        "seconds": round(time.perf_counter() - start, 1),
        "setting": name,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--data-dir", default=None)
    parser.add_argument("--rounds", type=int, default=10)
    parser.add_argument("--only", default=None, help="comma-separated settings")
    args = parser.parse_args()
    names = args.only.split(",") if args.only else list(SETTINGS)
    results = []
    for name in names:
        print(f"{name} ...", file=sys.stderr)
        results.append(measure(name, SETTINGS[name], rounds=args.rounds, data_dir=args.data_dir))
        print(json.dumps(results[-1]), file=sys.stderr)
    overall = min(r["min_within_window"] for r in results)
    print(
        json.dumps(
            {
                "copy_tolerance": COPY_TOLERANCE,
                "copy_window": COPY_WINDOW,
                "rounds": args.rounds,
                "settings": results,
                "min_honest_residual": overall,
                "margin": round(overall / COPY_TOLERANCE, 1),
                "loadavg": [round(x, 2) for x in os.getloadavg()],
            },
            indent=2,
        )
    )


if __name__ == "__main__":
    main()
