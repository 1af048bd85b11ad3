"""Client selection: Algorithm 1 of Wu & Kang (self-assessment + reputation).

Each client declares a data summary (derived from its registration); its
self-assessment is ``w1 * size + w2 * quality + w3 * coverage``. Round 1
selects by self-assessment alone; later rounds by
``w4 * self + w5 * reputation``. Two modes:

``paper``
    Top-N by score, descending, as published (ties broken by client id).
``weighted`` (default)
    Gate on the reputation threshold, then draw N of the eligible clients
    without replacement, weighted by score, using the Efraimidis-Spirakis
    keys ``u ** (1 / w)`` (Efraimidis & Spirakis, "Weighted random sampling
    with a reservoir", Information Processing Letters 97(5), 2006). ``u`` comes
    from a ``random.Random`` seeded by SHA-256 over a domain tag, the seed
    (the previous block hash) and the round, so every miner can verify the
    draw and every eligible client keeps a chance to take part.

Clients that declined (budget exhausted) are never selected in either mode.
Both modes return the selected ids sorted, since the selection is a set.
"""

from __future__ import annotations

import hashlib
import math
import random
from collections.abc import Collection, Mapping, Sequence
from dataclasses import dataclass
from typing import Literal

SELECTION_DOMAIN = b"LLBCFL/select/v1"


@dataclass(frozen=True)
class DataSummary:
    """What a client declares about its data (on-chain at registration).

    ``quality`` in [0, 1] is self-declared, so a lying client can inflate
    it; reputation is what eventually corrects for that.
    """

    client: str
    n_samples: int
    classes_present: tuple[int, ...]
    quality: float


def summary_from_histogram(
    client: str, histogram: Sequence[int], *, class_threshold: float
) -> DataSummary:
    """What the chain derives from a registration's (noisy) label histogram.

    ``histogram`` has one count per class and, last, the count of records
    whose label is not a valid class. The record count is the sum of all
    bins (at least 1); a class is present when its count reaches
    ``class_threshold``; quality is the share of valid labels among the
    non-negative counts. Everything here is post-processing of one DP
    release, so it costs no privacy beyond it.
    """
    if len(histogram) < 2:
        raise ValueError(f"a histogram needs a bin per class and one more, got {len(histogram)}")
    *per_class, invalid = (int(c) for c in histogram)
    classes = tuple(c for c, count in enumerate(per_class) if count >= class_threshold)
    valid = sum(max(0, c) for c in per_class)
    bad = max(0, invalid)
    quality = valid / (valid + bad) if valid + bad > 0 else 0.0
    return DataSummary(client, max(1, sum(per_class) + invalid), classes, quality)


def _clamp01(x: float) -> float:
    return min(1.0, max(0.0, x))


def self_assessment(
    summary: DataSummary,
    *,
    max_samples: int,
    num_classes: int,
    weights: tuple[float, float, float] = (0.4, 0.3, 0.3),
) -> float:
    """``w1 * size + w2 * quality + w3 * coverage``, each term and the result in [0, 1].

    ``size = min(1, n / max_samples)``; ``coverage`` counts distinct classes
    in ``range(num_classes)``, so duplicated or invented class labels cannot
    inflate it.
    """
    if max_samples < 1 or num_classes < 1:
        raise ValueError(
            f"max_samples and num_classes must be >= 1, got {max_samples} and {num_classes}"
        )
    if len(weights) != 3 or any(not (w >= 0 and math.isfinite(w)) for w in weights):
        raise ValueError(f"weights must be three finite numbers >= 0, got {weights}")
    if not math.isfinite(summary.quality):
        raise ValueError(f"quality of {summary.client!r} is not finite: {summary.quality}")
    size = _clamp01(summary.n_samples / max_samples)
    quality = _clamp01(summary.quality)
    coverage = len({c for c in summary.classes_present if 0 <= c < num_classes}) / num_classes
    w1, w2, w3 = weights
    return _clamp01(w1 * size + w2 * quality + w3 * coverage)


@dataclass(frozen=True)
class SelectionParams:
    """How many clients to select and how."""

    n: int
    mode: Literal["weighted", "paper"] = "weighted"
    w4: float = 0.5
    w5: float = 0.5
    threshold: float = 0.4

    def __post_init__(self) -> None:
        if self.n < 1:
            raise ValueError(f"n must be >= 1, got {self.n}")
        if self.mode not in ("weighted", "paper"):
            raise ValueError(
                f"unknown selection mode {self.mode!r}; expected 'weighted' or 'paper'"
            )
        if not (self.w4 >= 0 and self.w5 >= 0 and math.isfinite(self.w4 + self.w5)):
            raise ValueError(f"w4 and w5 must be finite and >= 0, got {self.w4} and {self.w5}")
        if not 0 <= self.threshold <= 1:
            raise ValueError(f"threshold must be in [0, 1], got {self.threshold}")


def selection_rng(*, seed: bytes, round: int) -> random.Random:
    """The verifiable RNG for one round's draw (seed = previous block hash)."""
    digest = hashlib.sha256(SELECTION_DOMAIN + seed + round.to_bytes(8, "big")).digest()
    return random.Random(digest)


def _scores(
    *,
    use_reputation: bool,
    self_scores: Mapping[str, float],
    reputations: Mapping[str, float] | None,
    params: SelectionParams,
) -> dict[str, float]:
    scores: dict[str, float] = {}
    for client in sorted(self_scores):
        own = self_scores[client]
        if not (own >= 0 and math.isfinite(own)):
            raise ValueError(f"self score of {client!r} must be finite and >= 0, got {own}")
        if not use_reputation:
            scores[client] = own
            continue
        assert reputations is not None
        if client not in reputations:
            raise ValueError(f"no reputation for client {client!r}")
        rep = reputations[client]
        if not (rep >= 0 and math.isfinite(rep)):
            raise ValueError(f"reputation of {client!r} must be finite and >= 0, got {rep}")
        scores[client] = params.w4 * own + params.w5 * rep
    return scores


def select_clients(
    *,
    round: int,
    self_scores: Mapping[str, float],
    reputations: Mapping[str, float] | None,
    declined: Collection[str],
    params: SelectionParams,
    seed: bytes,
) -> list[str]:
    """The clients selected for ``round``, as a sorted list of ids.

    Candidates are the keys of ``self_scores``. Round 1, or
    ``reputations=None``, scores by self-assessment only and does not gate
    on reputation; otherwise every candidate needs a reputation. Returns
    ``min(n, eligible)`` clients and never a declined one (nor, in
    ``weighted`` mode, one below the reputation threshold). ``seed`` is only
    used in ``weighted`` mode.
    """
    if round < 1:
        raise ValueError(f"round must be >= 1, got {round}")
    use_reputation = round > 1 and reputations is not None
    scores = _scores(
        use_reputation=use_reputation,
        self_scores=self_scores,
        reputations=reputations,
        params=params,
    )
    declined_set = set(declined)
    if params.mode == "paper":
        ranked = sorted((c for c in scores if c not in declined_set), key=lambda c: (-scores[c], c))
        return sorted(ranked[: params.n])

    rng = selection_rng(seed=seed, round=round)
    # One draw per candidate in sorted id order, eligible or not, so a
    # client's key depends only on the seed, the round and the candidate set.
    keys: dict[str, float] = {}
    for client, score in scores.items():
        u = rng.random()
        eligible = client not in declined_set and (
            not use_reputation or reputations[client] >= params.threshold  # type: ignore[index]
        )
        if eligible:
            keys[client] = _es_log_key(u, score)
    ranked = sorted(keys, key=lambda c: (-keys[c], c))
    return sorted(ranked[: params.n])


def _es_log_key(u: float, weight: float) -> float:
    # log(u ** (1/w)) = log(u) / w orders clients exactly like u ** (1/w) but
    # does not underflow to a tie at 0.0 for small weights. A zero weight (or
    # u == 0.0, which random() can return) ranks last; such clients are
    # taken only when fewer than n others are eligible.
    if weight == 0 or u == 0:
        return -math.inf
    return math.log(u) / weight
