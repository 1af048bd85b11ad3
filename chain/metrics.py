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


def progress_report(state: ChainState) -> dict[str, Any]:
    """Where a run stands, as the chain records it: what ``network up`` shows.

    ``round`` is the last summarised round (0: none yet) and ``accuracy``
    its test accuracy; ``phase`` is the chain's :class:`chain.state.Phase`
    (``registering``, ``selecting``, ``training``: the selected clients
    train and the miners validate, ``aggregating``, ``done``), and
    ``selected`` the number of clients selected for the round in progress.
    ``epsilon_spent_max`` is the largest privacy spent by any client that
    the newest verdict record states (None before the first one, and
    without DP), against the budget ``epsilon_budget`` (None without DP).
    """
    config = state.config
    done = state.last_summarised
    private = not mechanism_of(config).is_none
    newest = state.verdicts[max(state.verdicts)] if state.verdicts else None
    spent = max((v for _, v in newest.privacy), default=None) if newest else None
    selection = state.selections.get(state.due_round)
    return {
        "round": done,
        "rounds": config.rounds,
        "accuracy": state.summaries[done].accuracy if done else None,
        "phase": state.phase.name.lower(),
        "registered": len(state.registrations),
        "clients": len(state.clients),
        "selected": len(selection.selected) if selection else None,
        "blocks": state.height,
        "epsilon_spent_max": spent if private else None,
        "epsilon_budget": config.epsilon if private else None,
    }
