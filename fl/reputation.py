"""Client reputation by subjective logic.

Follows the reputation scheme of Kang et al., "Incentive Mechanism for
Reliable Federated Learning: A Joint Optimization Approach to Combining
Reputation and Contract Theory" (IEEE IoT Journal, 2019), as used by the
LL-BCFL paper (Wu & Kang): per client, positive evidence (update accepted)
and negative evidence (rejected, malformed, selected but silent); each round's
evidence is weighted by freshness ``z ** (now - round)``; negatives weigh more
than positives (``kappa + eta = 1``, ``kappa < eta``). With
``r = kappa * sum(fresh positives)`` and ``s = eta * sum(fresh negatives)``
and prior weight ``W`` (Josang, "Subjective Logic", 2016, the binomial
opinion from evidence):

    b = r / (r + s + W),  d = s / (r + s + W),  u = W / (r + s + W),
    T = b + a * u.

Reputation must be a deterministic function of the chain: every replica
recomputes it and votes only if the numbers agree, so every float here is
computed by a fixed sequence of IEEE operations (fixed summation order, no
libm ``pow``), and the result does not depend on the order evidence arrived in.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Any


@dataclass(frozen=True)
class ReputationParams:
    """Subjective-logic parameters; defaults as documented in the module."""

    z: float = 0.9
    kappa: float = 0.3
    eta: float = 0.7
    W: float = 2.0  # upper case: the symbol used in the literature
    a: float = 0.5
    threshold: float = 0.4

    def __post_init__(self) -> None:
        if not 0 < self.z <= 1:
            raise ValueError(f"freshness z must be in (0, 1], got {self.z}")
        if not (self.kappa > 0 and self.eta > 0):
            raise ValueError(f"kappa and eta must be > 0, got {self.kappa} and {self.eta}")
        if abs(self.kappa + self.eta - 1) > 1e-12:
            raise ValueError(f"kappa + eta must be 1, got {self.kappa} + {self.eta}")
        if not self.kappa < self.eta:
            raise ValueError(
                "negative evidence must weigh more: need kappa < eta, "
                f"got {self.kappa} >= {self.eta}"
            )
        if not self.W > 0:
            raise ValueError(f"prior weight W must be > 0, got {self.W}")
        if not 0 <= self.a <= 1:
            raise ValueError(f"base rate a must be in [0, 1], got {self.a}")
        if not 0 <= self.threshold <= 1:
            raise ValueError(f"threshold must be in [0, 1], got {self.threshold}")


@dataclass(frozen=True)
class Evidence:
    """Interactions with one client in one round."""

    round: int
    positive: int
    negative: int

    def __post_init__(self) -> None:
        if self.positive < 0 or self.negative < 0:
            raise ValueError(
                f"evidence counts must be >= 0, got {self.positive} and {self.negative}"
            )


@dataclass(frozen=True)
class Opinion:
    """A binomial subjective-logic opinion; ``belief + disbelief + uncertainty == 1``."""

    belief: float
    disbelief: float
    uncertainty: float
    base_rate: float

    @property
    def reputation(self) -> float:
        """Projected probability ``T = b + a * u``."""
        return self.belief + self.base_rate * self.uncertainty


def freshness(z: float, age: int) -> float:
    """``z ** age`` by square-and-multiply.

    libm ``pow`` is not required to be correctly rounded, so two platforms
    could disagree in the last bit; plain multiplications are exact IEEE
    operations and give the same bits everywhere.
    """
    result, base = 1.0, z
    while age:
        if age & 1:
            result *= base
        base *= base
        age >>= 1
    return result


def opinion_from_evidence(
    history: Sequence[Evidence], *, now: int, params: ReputationParams
) -> Opinion:
    """The opinion at round ``now`` from a client's evidence (any order, any rounds <= now)."""
    positive = 0.0
    negative = 0.0
    # Sorting on the whole record fixes the summation order, so the same
    # evidence in any input order gives bit-identical floats.
    for ev in sorted(history, key=lambda e: (e.round, e.positive, e.negative)):
        if ev.round > now:
            raise ValueError(f"evidence from round {ev.round} is newer than now={now}")
        weight = freshness(params.z, now - ev.round)
        positive += weight * ev.positive
        negative += weight * ev.negative
    r = params.kappa * positive
    s = params.eta * negative
    total = r + s + params.W
    return Opinion(
        belief=r / total,
        disbelief=s / total,
        uncertainty=params.W / total,
        base_rate=params.a,
    )


class ReputationBook:
    """Evidence per client, fed round by round from committed blocks."""

    def __init__(self, params: ReputationParams | None = None) -> None:
        self.params = params if params is not None else ReputationParams()
        self._evidence: dict[str, list[Evidence]] = {}
        self._last_round: int | None = None

    def record_round(
        self,
        round: int,
        accepted: Iterable[str],
        rejected: Iterable[str],
        silent: Iterable[str],
    ) -> None:
        """Add one round's outcome; rounds must be recorded in increasing order.

        An accepted update is one positive interaction; a rejected or
        malformed update, and a selected client that sent nothing, is one
        negative interaction each. A client listed more than once gets one
        interaction per listing.
        """
        if self._last_round is not None and round <= self._last_round:
            raise ValueError(f"round {round} recorded after round {self._last_round}")
        counts: dict[str, list[int]] = {}
        for client in accepted:
            counts.setdefault(client, [0, 0])[0] += 1
        for client in (*rejected, *silent):
            counts.setdefault(client, [0, 0])[1] += 1
        for client, (pos, neg) in counts.items():
            self._evidence.setdefault(client, []).append(Evidence(round, pos, neg))
        self._last_round = round

    def evidence(self, client: str) -> tuple[Evidence, ...]:
        return tuple(self._evidence.get(client, ()))

    def opinion(self, client: str, now: int) -> Opinion:
        """The client's opinion at round ``now``; a newcomer has ``T == a`` exactly."""
        return opinion_from_evidence(self._evidence.get(client, ()), now=now, params=self.params)

    def scores(self, now: int, *, clients: Iterable[str] | None = None) -> dict[str, float]:
        """Reputation ``T`` per client, keyed in sorted id order.

        Without ``clients``, every client with evidence; with it, exactly
        those clients (newcomers get the base rate).
        """
        names = sorted(self._evidence if clients is None else set(clients))
        return {name: self.opinion(name, now).reputation for name in names}

    def state_dict(self) -> dict[str, Any]:
        """JSON-serialisable evidence, in sorted client order."""
        return {
            "last_round": self._last_round,
            "evidence": {
                client: [[e.round, e.positive, e.negative] for e in history]
                for client, history in sorted(self._evidence.items())
            },
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        evidence = {
            client: [Evidence(int(r), int(p), int(n)) for r, p, n in history]
            for client, history in state["evidence"].items()
        }
        last = state["last_round"]
        self._evidence = evidence
        self._last_round = None if last is None else int(last)
