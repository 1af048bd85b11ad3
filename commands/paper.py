"""The paper's experiments (its Figures 3-8): the runs, their resumable execution, the figures.

The paper's evaluation: global test accuracy per round on MNIST, K = 100
clients, 10% of them a round, for IID and non-IID data, at 100, 200 and
500 rounds, without DP and with Laplace and Gaussian local DP. That is 18
curves; each figure shows the three mechanisms of one partition and one
length. The runs use the run options' defaults, which for each mechanism
are its tuned settings (``fl.privacy``, ``tuned``), at one stated epsilon.

A run without DP depends on its length only through where it stops (no
option of it reads the total number of rounds), so the 100- and 200-round
curves without DP are the first rounds of the 500-round run: 14 runs
draw 18 curves. A DP run's noise is calibrated for its length, so each
DP length is a run of its own.

Each finished run is a metrics file under ``OUT/runs/``; a run whose file
is complete and was made with the same configuration is not run again,
so an interrupted command resumes where it stopped.
"""

from __future__ import annotations

import json
import multiprocessing
import queue
from collections.abc import Callable, Iterator
from concurrent.futures import FIRST_COMPLETED, Future, ProcessPoolExecutor, wait
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from fl.config import RunConfig

DISTS = ("iid", "noniid")
MECHS = ("none", "laplace", "gaussian")
LENGTHS = (100, 200, 500)
# Figure number of each (partition, length), in the paper's order.
FIGURES = {
    ("iid", 100): 3,
    ("noniid", 100): 4,
    ("iid", 200): 5,
    ("noniid", 200): 6,
    ("iid", 500): 7,
    ("noniid", 500): 8,
}
PANEL_TITLES = {"none": "No-DP", "laplace": "Laplace-DP", "gaussian": "Gaussian-DP"}
DIST_TITLES = {"iid": "IID", "noniid": "non-IID"}
# Evaluation is a third of a round's time at the default sizes; these keep
# the 4,200 rounds of a full run within 90 minutes on 2 cores. Validation
# and test images are disjoint parts of MNIST's 10,000 test images.
EVAL = {"val_size": 500, "test_size": 5_000}
# --quick: the whole pipeline on a tenth of the data, 2-4 rounds a run.
QUICK = {"train_size": 6_000, "val_size": 200, "test_size": 1_000}
QUICK_LENGTHS = {100: 2, 200: 3, 500: 4}


@dataclass(frozen=True)
class Curve:
    """One of the 18 curves: a partition, a mechanism and a length."""

    dist: str
    dp: str
    rounds: int  # the paper's length (100, 200 or 500)

    @property
    def name(self) -> str:
        return f"{self.dist}-{self.dp}-{self.rounds}"

    @property
    def run(self) -> Curve:
        """The curve whose run draws this one (the longest, without DP)."""
        return Curve(self.dist, self.dp, max(LENGTHS)) if self.dp == "none" else self


def curves() -> list[Curve]:
    return [Curve(d, m, n) for n in LENGTHS for d in DISTS for m in MECHS]


def runs() -> list[Curve]:
    """The runs to make, longest first (so two jobs finish together)."""
    unique = {c.run for c in curves()}
    return sorted(unique, key=lambda c: (-c.rounds, c.dp == "none", c.dist, c.dp))


def run_config(
    curve: Curve, *, epsilon: float, seed: int, data_dir: str | None, quick: bool
) -> RunConfig:
    sizes = QUICK if quick else EVAL
    rounds = QUICK_LENGTHS[curve.rounds] if quick else curve.rounds
    return RunConfig(
        data_dir=data_dir,
        clients=100,
        frac=0.1,
        rounds=rounds,
        dist=curve.dist,
        dp=curve.dp,
        epsilon=epsilon,
        seed=seed,
        **sizes,
    )


def finished(path: Path, config: RunConfig) -> dict[str, Any] | None:
    """The metrics document at ``path`` if it is a complete run of ``config``."""
    try:
        doc = json.loads(path.read_text())
    except (OSError, ValueError):
        return None
    if not isinstance(doc, dict) or doc.get("interrupted"):
        return None
    # Read as a RunConfig, so that an option added since the run (absent from
    # its file) counts at its default.
    try:
        saved = RunConfig.from_dict(doc.get("config", {}))
    except (TypeError, ValueError):
        return None
    if saved != config or len(doc.get("rounds", [])) != config.rounds:
        return None
    return doc


def prefix(doc: dict[str, Any], rounds: int) -> dict[str, Any]:
    """The document of the run's first ``rounds`` rounds."""
    kept = doc["rounds"][:rounds]
    accuracies = [r["accuracy"] for r in kept]
    return {
        **doc,
        "config": {**doc["config"], "rounds": rounds},
        "rounds": kept,
        "final_accuracy": accuracies[-1],
        "best_accuracy": max(accuracies),
        "total_seconds": sum(r["seconds"] for r in kept),
        "prefix_of": f"the first {rounds} of {len(doc['rounds'])} rounds",
    }


# Running --------------------------------------------------------------------

_PROGRESS: Any = None  # the worker's queue to the parent
_SPLITS: dict[tuple[Any, ...], Any] = {}  # the worker's loaded data, by sizes


def _init_worker(progress: Any) -> None:
    global _PROGRESS
    _PROGRESS = progress


def _run_one(name: str, config_dict: dict[str, Any], path: str) -> str:
    """Worker: run one configuration, reporting each round; write its metrics."""
    import time

    import torch

    from chain.metrics import metrics_document
    from chain.simulator import simulate_rounds
    from fl.datasets import load_splits
    from fl.rounds import Federation
    from node.durable import write_json_durably

    config = RunConfig.from_dict(config_dict)
    torch.set_num_threads(config.threads)
    key = (config.dataset, config.data_dir, config.train_size, config.val_size, config.test_size)
    if key not in _SPLITS:
        _SPLITS.clear()
        _SPLITS[key] = load_splits(config)
    splits = _SPLITS[key]
    start = time.perf_counter()
    federation = Federation.create(config, splits.train)
    records = []
    for record in simulate_rounds(config, splits, clock=time.perf_counter, federation=federation):
        records.append(record)
        _PROGRESS.put((name, record.round, record.accuracy))
    doc = metrics_document(
        config,
        records,
        total_seconds=time.perf_counter() - start,
        malicious_clients=federation.malicious,
    )
    write_json_durably(Path(path), doc)
    return name


@dataclass
class Plan:
    """What one invocation runs: the configurations, and which are already done."""

    out: Path
    configs: dict[Curve, RunConfig]  # by run
    done: dict[Curve, dict[str, Any]]
    quick: bool = False

    def path(self, run: Curve) -> Path:
        return self.out / "runs" / f"{run.name}.json"

    @property
    def todo(self) -> list[Curve]:
        return [r for r in self.configs if r not in self.done]

    def rounds_left(self) -> int:
        return sum(self.configs[r].rounds for r in self.todo)


def plan(out: Path, *, epsilon: float, seed: int, data_dir: str | None, quick: bool) -> Plan:
    configs = {
        r: run_config(r, epsilon=epsilon, seed=seed, data_dir=data_dir, quick=quick) for r in runs()
    }
    result = Plan(out, configs, {}, quick)
    for run, config in configs.items():
        doc = finished(result.path(run), config)
        if doc is not None:
            result.done[run] = doc
    return result


def execute(
    the_plan: Plan,
    *,
    jobs: int,
    on_round: Callable[[str, int, float], None],
    on_done: Callable[[Curve], None],
) -> None:
    """Run what is left of ``the_plan``, ``jobs`` at a time (each in its own process).

    ``on_round(name, round, accuracy)`` is called as rounds finish, and
    ``on_done(run)`` as runs do; a run's metrics file is written only when
    it has finished, so an interruption loses only the runs under way.
    """
    todo = the_plan.todo
    if not todo:
        return
    (the_plan.out / "runs").mkdir(parents=True, exist_ok=True)
    context = multiprocessing.get_context("spawn")
    progress = context.Queue()
    by_name = {r.name: r for r in todo}
    with ProcessPoolExecutor(
        max_workers=jobs, mp_context=context, initializer=_init_worker, initargs=(progress,)
    ) as pool:
        pending: set[Future[str]] = {
            pool.submit(_run_one, r.name, the_plan.configs[r].to_dict(), str(the_plan.path(r)))
            for r in todo
        }
        try:
            while pending:
                finished_now, pending = wait(pending, timeout=0.5, return_when=FIRST_COMPLETED)
                for item in _drain(progress):
                    on_round(*item)
                for future in finished_now:
                    run = by_name[future.result()]
                    the_plan.done[run] = json.loads(the_plan.path(run).read_text())
                    on_done(run)
        except BaseException:
            for future in pending:
                future.cancel()
            for process in list(getattr(pool, "_processes", {}).values()):
                process.terminate()  # stop the runs under way now, not at their end
            raise
    for item in _drain(progress):
        on_round(*item)


def _drain(progress: Any) -> Iterator[tuple[str, int, float]]:
    while True:
        try:
            yield progress.get_nowait()
        except queue.Empty:
            return


def documents(the_plan: Plan) -> dict[Curve, dict[str, Any]]:
    """The 18 curves' documents (the shorter no-DP ones cut from the longest run)."""
    out = {}
    for curve in curves():
        doc = the_plan.done[curve.run]
        if curve.run != curve:
            doc = prefix(doc, QUICK_LENGTHS[curve.rounds] if the_plan.quick else curve.rounds)
        out[curve] = doc
    return out
