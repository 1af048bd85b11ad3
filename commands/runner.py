"""Front-end glue for ``simulate``: load data, show progress, write results.

Metrics are written atomically (temp file + rename), and an interrupted run
(Ctrl-C) still writes the rounds it completed, marked ``"interrupted": true``.
"""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any

import torch
from tqdm import tqdm

from chain.metrics import RoundRecord, metrics_document
from chain.simulator import simulate_rounds
from commands.plotting import plot_run
from fl.config import RunConfig
from fl.datasets import load_splits
from fl.rounds import Federation
from node.durable import write_json_durably


def read_metrics(path: Path) -> dict[str, Any]:
    try:
        doc = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as exc:
        raise ValueError(f"{path}: not a readable metrics file ({exc})") from exc
    if not isinstance(doc, dict) or not isinstance(doc.get("rounds"), list):
        raise ValueError(f"{path}: not a metrics file (no 'rounds' list)")
    return doc


def run_simulate(
    config: RunConfig, *, metrics_out: Path | None, plot: Path | None, progress: bool = True
) -> dict[str, Any]:
    torch.set_num_threads(config.threads)
    splits = load_splits(config)
    start = time.perf_counter()
    federation = Federation.create(config, splits.train)
    records: list[RoundRecord] = []
    bar = tqdm(total=config.rounds, desc="simulate", unit="round", disable=not progress)
    interrupted = False
    try:
        for record in simulate_rounds(
            config, splits, clock=time.perf_counter, federation=federation
        ):
            records.append(record)
            bar.set_postfix(acc=f"{record.accuracy:.4f}", sec=f"{record.seconds:.1f}")
            bar.update(1)
    except KeyboardInterrupt:
        interrupted = True
    finally:
        bar.close()
    extra = {"interrupted": True} if interrupted else None
    doc = metrics_document(
        config,
        records,
        total_seconds=time.perf_counter() - start,
        malicious_clients=federation.malicious,
        extra=extra,
    )
    if metrics_out is not None:
        write_json_durably(metrics_out, doc)
    if plot is not None and records:
        plot_run(doc, plot)
    if interrupted:
        raise KeyboardInterrupt
    return doc
