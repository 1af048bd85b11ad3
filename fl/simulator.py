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

import torch

from fl.config import RunConfig
from fl.datasets import Splits
from fl.models import model_for
from fl.privacy import mechanism_of
from fl.reputation import ReputationBook
from fl.rounds import (
    Federation,
    aggregate_round,
    privacy_report,
    reputation_params,
    select_round,
    selection_seed,
    validate_round,
)
from fl.seeds import torch_generator
from fl.training import evaluate
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
    malicious_clients: list[str],
    extra: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """The metrics file schema shared by ``simulate`` and ``network up``."""
    accuracies = [r.accuracy for r in rounds]
    doc: dict[str, Any] = {
        "config": {**config.to_dict(), "malicious_clients": malicious_clients},
        "privacy": privacy_report(config),
        "rounds": [r.to_dict() for r in rounds],
        "final_accuracy": accuracies[-1] if accuracies else None,
        "best_accuracy": max(accuracies) if accuracies else None,
        "total_seconds": total_seconds,
    }
    doc.update(extra or {})
    return doc


def simulate_rounds(
    config: RunConfig,
    splits: Splits,
    *,
    clock: Callable[[], float],
    federation: Federation | None = None,
) -> Iterator[RoundRecord]:
    """Yield one record per round; the caller decides when to stop."""
    federation = federation or Federation.create(config, splits.train)
    model = model_for(config, generator=torch_generator(config.seed, "init"))
    global_weights = get_weights(model)
    book = ReputationBook(reputation_params(config))
    self_scores = federation.self_scores(config)
    velocity: torch.Tensor | None = None
    private = not mechanism_of(config).is_none
    for rnd in range(1, config.rounds + 1):
        t0 = clock()
        declined = sorted(cid for cid, c in federation.clients.items() if c.declines())
        reputations = book.scores(rnd - 1, clients=federation.ids) if config.reputation else None
        selected = select_round(
            config,
            rnd=rnd,
            self_scores=self_scores,
            reputations=reputations,
            declined=declined,
            seed=selection_seed(config, rnd),
        )
        sent = [
            u
            for cid in selected
            if (
                u := federation.client(cid).participate(
                    model, global_weights, round=rnd, config=config
                )
            )
            is not None
        ]
        verdicts = validate_round(
            config,
            model=model,
            global_weights=global_weights,
            updates=sent,
            validation=splits.validation,
        )
        accepted = [u for u in sent if verdicts[u.client].accepted]
        rejected = {cid: v.reason for cid, v in sorted(verdicts.items()) if not v.accepted}
        silent = sorted(set(selected) - {u.client for u in sent})
        if config.reputation:
            book.record_round(rnd, [u.client for u in accepted], list(rejected), silent)
        global_weights, velocity = aggregate_round(
            config, global_weights, accepted, rnd=rnd, velocity=velocity
        )
        set_weights(model, global_weights)
        loss, acc = evaluate(model, splits.test.x, splits.test.y)
        spent = [c.accountant.spent_epsilon() for c in federation.clients.values()]
        extra: dict[str, Any] = {"declined": declined, "silent": silent}
        if private:
            extra["epsilon_spent_mean"] = sum(spent) / len(spent)
        if config.reputation:
            extra["reputation"] = {
                k: round(v, 6) for k, v in book.scores(rnd, clients=federation.ids).items()
            }
        yield RoundRecord(
            round=rnd,
            accuracy=acc,
            loss=loss,
            selected=selected,
            accepted=sorted(u.client for u in accepted),
            rejected=rejected,
            epsilon_spent_max=max(spent) if private else None,
            seconds=clock() - t0,
            extra=extra,
        )


def run_simulation(
    config: RunConfig,
    splits: Splits,
    *,
    clock: Callable[[], float],
    until: Callable[[RoundRecord], bool] | None = None,
) -> dict[str, Any]:
    """Run every round (or until ``until(record)`` is true); return the metrics document."""
    start = clock()
    federation = Federation.create(config, splits.train)
    records: list[RoundRecord] = []
    for record in simulate_rounds(config, splits, clock=clock, federation=federation):
        records.append(record)
        if until is not None and until(record):
            break
    return metrics_document(
        config, records, total_seconds=clock() - start, malicious_clients=federation.malicious
    )
