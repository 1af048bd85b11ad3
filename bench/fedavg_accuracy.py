"""Accuracy targets of the foundation (no DP, paper CNN, K=100, C=0.1, B=10).

Runs, each as its own process (``--jobs`` at a time):
  iid_e1     IID,     E=1, 60 rounds  -> rounds to 97%, accuracy at 60
  noniid_e1  non-IID, E=1, 100 rounds -> mean accuracy over rounds 96-100
  iid_e5     IID,     E=5, until 97% (at most 60 rounds) -> rounds to 97%
Prints one JSON object; metrics and a plot go to --out-dir.

    python bench/fedavg_accuracy.py --data-dir data --jobs 2
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

RUNS = {
    "iid_e1": {"dist": "iid", "local_epochs": 1, "rounds": 60},
    "noniid_e1": {"dist": "noniid", "local_epochs": 1, "rounds": 100},
    "iid_e5": {"dist": "iid", "local_epochs": 5, "rounds": 60, "stop_at": 0.97},
}
TARGET = 0.97


def _run(
    name: str,
    spec: dict,
    data_dir: str | None,
    out_dir: str,
    seed: int,
    server_momentum: float,
    server_lr: float,
) -> dict:
    import torch

    from chain.simulator import run_simulation
    from fl.config import RunConfig
    from fl.data import load_mnist, resolve_data_root
    from node.durable import write_json_durably

    torch.set_num_threads(1)
    stop_at = spec.get("stop_at")
    cfg = RunConfig(
        data_dir=data_dir,
        clients=100,
        frac=0.1,
        batch_size=10,
        lr=0.01,
        momentum=0.5,
        seed=seed,
        # Plain FedAvg: uniform sampling, every update accepted.
        selection="random",
        validation=False,
        reputation=False,
        server_momentum=server_momentum,
        server_lr=server_lr,
        **{k: v for k, v in spec.items() if k != "stop_at"},
    )
    splits = load_mnist(
        resolve_data_root(data_dir),
        train_size=cfg.train_size,
        val_size=cfg.val_size,
        test_size=cfg.test_size,
    )

    def until(record) -> bool:
        print(
            f"[{name}] round {record.round} acc {record.accuracy:.4f}", file=sys.stderr, flush=True
        )
        return stop_at is not None and record.accuracy >= stop_at

    doc = run_simulation(cfg, splits, clock=time.perf_counter, until=until)
    write_json_durably(Path(out_dir) / f"{name}.json", doc)
    return doc


def _rounds_to(doc: dict, target: float) -> int | None:
    return next((r["round"] for r in doc["rounds"] if r["accuracy"] >= target), None)


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--data-dir", default=None)
    parser.add_argument("--out-dir", default="out/bench/fedavg")
    parser.add_argument("--jobs", type=int, default=2)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--server-momentum", type=float, default=0.0)
    parser.add_argument("--server-lr", type=float, default=1.0)
    parser.add_argument("--only", nargs="*", choices=list(RUNS), default=list(RUNS))
    args = parser.parse_args()
    Path(args.out_dir).mkdir(parents=True, exist_ok=True)
    start = time.perf_counter()
    with ProcessPoolExecutor(max_workers=args.jobs) as pool:
        futures = {
            n: pool.submit(
                _run,
                n,
                RUNS[n],
                args.data_dir,
                args.out_dir,
                args.seed,
                args.server_momentum,
                args.server_lr,
            )
            for n in args.only
        }
        docs = {n: f.result() for n, f in futures.items()}
    result: dict = {
        "seed": args.seed,
        "server_momentum": args.server_momentum,
        "server_lr": args.server_lr,
    }
    for name, doc in docs.items():
        acc = [r["accuracy"] for r in doc["rounds"]]
        entry = {
            "rounds_run": len(acc),
            "rounds_to_97": _rounds_to(doc, TARGET),
            "final_accuracy": acc[-1],
            "best_accuracy": max(acc),
            "seconds_per_round": doc["total_seconds"] / len(acc),
        }
        if name == "noniid_e1":
            entry["mean_accuracy_rounds_96_100"] = sum(acc[95:100]) / len(acc[95:100])
        result[name] = entry
    from commands.plotting import plot_runs

    plot_runs(
        list(docs.values()),
        Path(args.out_dir) / "fedavg.png",
        title="FedAvg, no DP, paper CNN",
        labels=list(docs),
    )
    result["total_seconds"] = time.perf_counter() - start
    print(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()
