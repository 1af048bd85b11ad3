"""Free riding: updates that copy an update the chain has already seen (pure).

Anyone who can read a client's update can send it again as its own, and
without this check a copy scores like the original: it is a real update,
only not the sender's work. :func:`copied_updates` finds, in one round,
the updates that copy another, from what every miner holds alike (the
chain's update records of earlier rounds, the tensors of the accepted ones
among them, and the round's own updates), so every correct miner and the
simulator reach the same verdicts; ``fl.rounds.validate_round`` rejects
them before any other test, as negative evidence like any rejection.

Four rules, in this order (an update gets the first reason that applies):

1. **Earlier exact copy.** Its digest is the digest of an update record
   of an earlier round, any client, any verdict.
2. **Same-round exact copy.** Two or more updates of the round have one
   digest: every one of them is rejected. Nothing on the chain says who
   trained it and who copied it (arrival order differs from miner to
   miner), and only miners and the server can read updates
   (``Miner/FetchUpdate``), so a same-round copy takes a sender that
   shared its update: both are party to it.
3. **Earlier near copy.** Its *copy residual* (:func:`copy_residual`, the
   distance from the update to the nearest non-negative multiple of the
   other, relative to the update's own norm: the sine of the angle between
   them, 1 for opposite directions) to an accepted update of the previous
   :data:`COPY_WINDOW` rounds is at most :data:`COPY_TOLERANCE`. A copy
   with a little noise added, or scaled, stays within it.
4. **Same-round near copy.** Two updates of the round within the
   tolerance of each other: both are rejected (as rule 2).

One exemption: an earlier update of the *same client from the same base
model* (the global model did not move, e.g. a round that accepted nothing
without server momentum) is not compared, since training the same data
from the same model may honestly give the same update again.

The tolerance: honest updates are far apart. On MNIST
(``bench/copy_residual.py``, docs/RESULTS.md) the smallest residual between
two honest updates, in one round or against an accepted update of any
earlier round, was 0.30 without DP (a client of two-label shards against
its own update of 4 rounds before, 30 rounds) and 0.85 with Gaussian DP at
epsilon 10; 0.05 is 6 times below that, and still catches a copy whose
added noise is under 5% of its norm. Zero updates have no direction: they
are compared by digest only. The window bounds the cost (each update is
compared with the accepted updates of the last :data:`COPY_WINDOW` rounds,
whose tensors every miner holds anyway to recompute the global model);
exact copies are found over the whole chain at no cost, from the digests.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Final

import torch

from fl.weights import flat_by_name

# Largest copy residual (sine of the angle) of an update to another that
# counts as a copy: 6 times below the closest two honest MNIST updates (0.30).
COPY_TOLERANCE: Final = 0.05
# Rounds back whose accepted updates each update is compared with for near copies.
COPY_WINDOW: Final = 5


@dataclass(frozen=True)
class SeenUpdate:
    """An update of an earlier round, as the chain records it.

    ``delta``: its tensors when it is compared for near copies (the
    accepted updates of the window), else None (compared by digest only).
    """

    client: str
    round: int
    digest: bytes
    base_digest: bytes
    delta: Mapping[str, torch.Tensor] | None = None


@dataclass(frozen=True)
class RoundHistory:
    """What a round's updates are compared with for copies.

    ``base_digest``: the round's global model; ``digests``: client -> the
    digest of its update in this round; ``seen``: the update records of
    earlier rounds (``chain.verdicts.round_history`` builds it from the chain).
    """

    base_digest: bytes
    digests: Mapping[str, bytes]
    seen: tuple[SeenUpdate, ...] = ()


def copy_residual(update: torch.Tensor, other: torch.Tensor) -> float:
    """Distance from ``update`` to the nearest non-negative multiple of ``other``,
    relative to ``update``'s norm (flat float64 vectors of one length).

    The sine of the angle between them when it is below 90 degrees, else 1;
    symmetric, and blind to scale. 1 when either is zero (no direction).
    """
    scale = float(update.norm()) * float(other.norm())
    if not scale > 0:
        return 1.0
    cos = float(update @ other) / scale
    if not cos > 0:
        return 1.0
    return max(0.0, 1.0 - cos * cos) ** 0.5


def _exempt(client: str, seen: SeenUpdate, base_digest: bytes) -> bool:
    # The same client from the same model may honestly send the same update again.
    return seen.client == client and seen.base_digest == base_digest


def _near_reason(residual: float, whose: str, tolerance: float) -> str:
    return f"copy: within {residual:.2e} of {whose} (copy tolerance {tolerance:g})"


def copied_updates(
    updates: Mapping[str, Mapping[str, torch.Tensor]],
    history: RoundHistory,
    *,
    tolerance: float = COPY_TOLERANCE,
) -> dict[str, str]:
    """client -> why, for every update of the round that copies another (module doc).

    ``updates``: client -> update of this round (structurally checked
    already; one of another length than the other is compared by digest only).
    """
    reasons: dict[str, str] = {}
    clients = sorted(updates)
    for cid in clients:
        digest = history.digests[cid]
        for s in history.seen:
            if s.digest == digest and not _exempt(cid, s, history.base_digest):
                reasons[cid] = (
                    f"copy: the digest of {s.client}'s round-{s.round} update "
                    f"{digest.hex()[:12]}, already on the chain"
                )
                break
    for cid in clients:
        twins = [c for c in clients if c != cid and history.digests[c] == history.digests[cid]]
        if twins and cid not in reasons:
            reasons[cid] = f"copy: the same update as {', '.join(twins)} in this round"
    vectors = {cid: flat_by_name(updates[cid]) for cid in clients}
    earlier = [
        (s, flat_by_name(s.delta))
        for s in sorted(history.seen, key=lambda s: (s.round, s.client))
        if s.delta is not None
    ]
    for cid in clients:
        if cid in reasons:
            continue
        u = vectors[cid]
        for s, e in earlier:
            if e.numel() != u.numel() or _exempt(cid, s, history.base_digest):
                continue
            residual = copy_residual(u, e)
            if residual <= tolerance:
                whose = f"{s.client}'s round-{s.round} update"
                reasons[cid] = _near_reason(residual, whose, tolerance)
                break
    for i, cid in enumerate(clients):
        for other in clients[i + 1 :]:
            u, v = vectors[cid], vectors[other]
            if u.numel() != v.numel():
                continue
            residual = copy_residual(u, v)
            if residual <= tolerance:
                reasons.setdefault(cid, _near_reason(residual, f"{other}'s update", tolerance))
                reasons.setdefault(other, _near_reason(residual, f"{cid}'s update", tolerance))
    return reasons
