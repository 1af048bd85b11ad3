"""The in-process simulator: the whole federated loop in one process.

It calls the same functions the network nodes call (``fl.rounds``), so a run
here and a run of the multi-process network with the same seed select, accept
and aggregate the same updates.  Time comes in through an injected ``clock``
(the package reads no clock of its own).
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any

from fl.config import RunConfig
from fl.data import MnistSplits
from fl.models import build_model
from fl.rounds import Federation, aggregate_round, local_update, select_round
from fl.seeds import torch_generator
from fl.training import TrainConfig, evaluate
from fl.weights import get_weights, set_weights


@dataclass
class RoundRecord:
    round: int
    accuracy: float
    loss: float
    selected: list[str]
    accepted: list[str]
    rejected: dict[str, str]
    epsilon_spent_max: float | None
    seconds: float
    extra: dict[str, Any] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        out = {
            "round": self.round,
            "accuracy": self.accuracy,
            "loss": self.loss,
            "selected": self.selected,
            "accepted": self.accepted,
            "rejected": self.rejected,
            "epsilon_spent_max": self.epsilon_spent_max,
            "seconds": self.seconds,
        }
        out.update(self.extra)
        return out


def metrics_document(
    config: RunConfig,
    rounds: list[RoundRecord],
    *,
    total_seconds: float,
    extra: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """The metrics file schema shared by ``simulate`` and ``network up``."""
    accuracies = [r.accuracy for r in rounds]
    doc: dict[str, Any] = {
        "config": config.to_dict(),
        "rounds": [r.to_dict() for r in rounds],
        "final_accuracy": accuracies[-1] if accuracies else None,
        "best_accuracy": max(accuracies) if accuracies else None,
        "total_seconds": total_seconds,
    }
    doc.update(extra or {})
    return doc


def simulate_rounds(
    config: RunConfig, splits: MnistSplits, *, clock: Callable[[], float]
) -> Iterator[RoundRecord]:
    """Yield one record per round; the caller decides when to stop."""
    federation = Federation.create(config, splits.train)
    model = build_model(config.model, generator=torch_generator(config.seed, "init"))
    global_weights = get_weights(model)
    train_cfg = TrainConfig(
        epochs=config.local_epochs,
        batch_size=config.batch_size,
        lr=config.lr,
        momentum=config.momentum,
    )
    for rnd in range(1, config.rounds + 1):
        t0 = clock()
        selected = select_round(config, federation, rnd)
        updates = [
            local_update(
                model,
                global_weights,
                federation.client(cid),
                round=rnd,
                seed=config.seed,
                train=train_cfg,
            )
            for cid in selected
        ]
        global_weights = aggregate_round(config, global_weights, updates)
        set_weights(model, global_weights)
        loss, acc = evaluate(model, splits.test.x, splits.test.y)
        yield RoundRecord(
            round=rnd,
            accuracy=acc,
            loss=loss,
            selected=selected,
            accepted=[u.client for u in updates],
            rejected={},
            epsilon_spent_max=None,
            seconds=clock() - t0,
        )


def run_simulation(
    config: RunConfig,
    splits: MnistSplits,
    *,
    clock: Callable[[], float],
    until: Callable[[RoundRecord], bool] | None = None,
) -> dict[str, Any]:
    """Run every round (or until ``until(record)`` is true); return the metrics document."""
    start = clock()
    records: list[RoundRecord] = []
    for record in simulate_rounds(config, splits, clock=clock):
        records.append(record)
        if until is not None and until(record):
            break
    return metrics_document(config, records, total_seconds=clock() - start)
