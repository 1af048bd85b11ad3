"""One client claims the largest record count the run admits and sends a zero update.

Runs ``simulate`` in this process, same seed and settings, four ways:

- ``honest``: no attacker;
- ``inflate``: one client (``--attack inflate``) registers the record cap
  (``--max-records``, default 4 equal shares) and sends a zero update; FedAvg
  weights bounded by ``fl.aggregation.fedavg_weights`` (the cap and twice
  the round's lower median): the rules as they are;
- ``inflate_cap_only``: the same, with the round-median bound switched off
  (weights are the registered counts, held to the cap at admission);
- ``inflate_unbounded``: the situation of issue #18 before the cap: the
  attacker claims 10^9 records and its weight is not bounded;
- ``zero_at_equal_share``: the floor no weight rule can go below: the same
  zero update from a client claiming an honest count (the cap set to the
  equal share; without ``--dp`` every honest count is exactly that).

in two settings: ``defended`` (the defaults: validation, reputation,
weighted selection) and ``plain`` (uniform selection, no validation, no
reputation: only the weights stand between the attacker and the model).
Every client is selected in every round (``--frac 1``), so the attacker
takes part whenever the rules let it. Prints JSON: per run the accuracy of
every round, the final accuracy and, for the attacked runs, the gap to the
honest run in points, in the last round and the largest over the rounds
(target: within 2 points).

    python bench/inflated_weight.py --data-dir data [--dp]
"""

from __future__ import annotations

import argparse
import contextlib
import json
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import fl.rounds
from chain.simulator import run_simulation
from fl.config import RunConfig
from fl.datasets import load_splits

BASE: dict[str, Any] = {
    "clients": 10,
    "frac": 1.0,
    "train_size": 6_000,
    "val_size": 500,
    "test_size": 2_000,
    "dist": "iid",
}
# bench/accuracy.py's Gaussian hyper-parameters (full batch, server momentum).
GAUSSIAN: dict[str, Any] = {
    "dp": "gaussian",
    "epsilon": 10.0,
    "batch_size": 600,
    "lr": 2.0,
    "momentum": 0.0,
    "clip": 1.0,
    "server_momentum": 0.9,
    "dropout": False,
    "reproducible_noise": True,
}
SETTINGS: dict[str, dict[str, Any]] = {
    "defended": {},
    "plain": {"selection": "random", "validation": False, "reputation": False},
}
ATTACKER = {"malicious": 0.1, "attack": "inflate"}  # one client of ten
UNBOUNDED_CLAIM = 10**9


@contextlib.contextmanager
def weight_rule(kind: str) -> Iterator[None]:
    """Swap the FedAvg weight rule for the duration of one run (bench only)."""
    original = fl.rounds.fedavg_weights
    if kind == "cap_only":
        fl.rounds.fedavg_weights = lambda counts, *, cap: [min(c, cap) for c in counts]
    elif kind == "unbounded":
        fl.rounds.fedavg_weights = lambda counts, *, cap: list(counts)
    try:
        yield
    finally:
        fl.rounds.fedavg_weights = original


def run(spec: dict[str, Any], *, rule: str = "as_is") -> list[float]:
    config = RunConfig(**spec)
    splits = load_splits(config)
    clock = iter(range(10**9))
    with weight_rule(rule):
        doc = run_simulation(config, splits, clock=lambda: float(next(clock)))
    return [round(r["accuracy"], 4) for r in doc["rounds"]]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--data-dir", default=None)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--dp", action="store_true", help="Gaussian epsilon 10 (reproducible)")
    parser.add_argument("--only", choices=tuple(SETTINGS), default=None)
    args = parser.parse_args()
    base = {**BASE, "rounds": args.rounds, "seed": args.seed, "data_dir": args.data_dir}
    if args.dp:
        base.update(GAUSSIAN)
    out: dict[str, Any] = {"base": base, "settings": {}}
    for name, setting in SETTINGS.items():
        if args.only is not None and name != args.only:
            continue
        spec = {**base, **setting}
        runs = {
            "honest": run(spec),
            "inflate": run({**spec, **ATTACKER}),
            "inflate_cap_only": run({**spec, **ATTACKER}, rule="cap_only"),
            "inflate_unbounded": run(
                {**spec, **ATTACKER, "max_records": UNBOUNDED_CLAIM}, rule="unbounded"
            ),
            "zero_at_equal_share": run(
                {**spec, **ATTACKER, "max_records": RunConfig(**spec).expected_records}
            ),
        }
        honest = runs["honest"]
        out["settings"][name] = {
            "setting": setting,
            "record_cap": fl.rounds.record_cap(RunConfig(**spec)),
            "accuracy": runs,
            "final": {k: v[-1] for k, v in runs.items()},
            "max_gap_points": {
                k: round(100 * max(h - a for h, a in zip(honest, v, strict=True)), 2)
                for k, v in runs.items()
                if k != "honest"
            },
            "final_gap_points": {
                k: round(100 * (honest[-1] - v[-1]), 2) for k, v in runs.items() if k != "honest"
            },
        }
        print(json.dumps({name: out["settings"][name]}), file=sys.stderr, flush=True)
    print(json.dumps(out, indent=2))


if __name__ == "__main__":
    main()
