"""The metrics file: one record per round, read off the chain (pure).

``simulate`` and ``network up`` write the same document: the run's
configuration, its privacy report, and for every round what the chain
holds (selection, verdicts, reputations, privacy spent, the summary's test
accuracy), plus the round's wall time that the caller measured.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from chain.state import ChainState
from fl.config import RunConfig
from fl.privacy import mechanism_of
from fl.rounds import privacy_report


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


def round_record(state: ChainState, rnd: int, *, seconds: float) -> RoundRecord:
    """Round ``rnd`` as the chain records it (its summary must be applied)."""
    config = state.config
    selection = state.selections[rnd]
    verdicts = state.verdicts[rnd]
    summary = state.summaries[rnd]
    spent = [v for _, v in verdicts.privacy]
    private = not mechanism_of(config).is_none
    extra: dict[str, Any] = {"declined": list(selection.declined), "silent": list(verdicts.silent)}
    if private:
        extra["epsilon_spent_mean"] = sum(spent) / len(spent)
    if config.reputation:
        extra["reputation"] = {k: round(v, 6) for k, v in verdicts.reputations}
    return RoundRecord(
        round=rnd,
        accuracy=summary.accuracy,
        loss=summary.loss,
        selected=list(selection.selected),
        accepted=sorted(verdicts.accepted),
        rejected=dict(sorted(verdicts.rejected.items())),
        epsilon_spent_max=max(spent) if private else None,
        seconds=seconds,
        extra=extra,
    )


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
