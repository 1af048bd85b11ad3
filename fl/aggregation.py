"""Aggregation rules over stacked client updates.

Every rule is a free function over a ``[clients, parameters]`` tensor (rows
in a fixed client order, so the result is bit-for-bit reproducible):

- ``fedavg``: mean weighted by sample count (McMahan et al. 2017).
- ``coordinate_median``: per-coordinate median (Yin et al. 2018); the mean of
  the two middle values for an even count.
- ``trimmed_mean``: per coordinate, drop the ``beta`` fraction of largest and
  smallest values and average the rest (Yin et al. 2018).
- ``krum``: the update closest to its n - f - 2 nearest neighbours (Blanchard
  et al. 2017); ``m > 1`` averages the m best (multi-Krum).

FedAvg's weights are the record counts the chain holds for the updates
(each client's registration), bounded by :func:`fedavg_weights` so that no
single client can dominate a round: every count is clipped to the run's
record cap and to :data:`WEIGHT_MEDIAN_MULTIPLE` times the round's (lower)
median count.

``--aggregation`` names a rule of ``AGGREGATION_REGISTRY``: a function
``(updates, context) -> aggregate`` registered under its name, which takes
from :class:`AggregationContext` whatever it needs (weights, trim ratio,
Krum's f). A new rule is one more registered function.
"""

from __future__ import annotations

import statistics
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Final

import torch

from fl.registry import Registry


@dataclass(frozen=True)
class AggregationContext:
    """What a rule may use besides the updates: the FedAvg weights (one per
    row), the trimmed mean's trim ratio and Krum's assumed attacker count
    (None: the most Krum tolerates)."""

    weights: Sequence[float]
    trim_ratio: float = 0.1
    krum_f: int | None = None


# No update weighs more than this many times the (lower) median record count
# of the updates aggregated with it. Twice, not once: honest shards differ in
# size (Dirichlet splits), and FedAvg should keep weighting them by it.
WEIGHT_MEDIAN_MULTIPLE: Final = 2


def fedavg_weights(counts: Sequence[int], *, cap: int) -> list[float]:
    """The FedAvg weight of each of a round's updates, from their record counts.

    ``min(count, cap, WEIGHT_MEDIAN_MULTIPLE * median_low(counts))``: the
    record cap (which registrations are already held to) and a bound
    relative to the round, so one client claiming far more than the others
    weighs at most twice as much as the median update, as long as fewer than
    half of the round's updates claim more. The lower median (of an even
    count, the smaller middle value) keeps a round of two updates from
    giving the larger claim the upper hand. Counts within both bounds are
    kept as they are, so honest rounds aggregate exactly as plain FedAvg.
    """
    if not counts:
        return []
    bound = min(cap, WEIGHT_MEDIAN_MULTIPLE * statistics.median_low(counts))
    return [min(c, bound) for c in counts]


AggregationRule = Callable[[torch.Tensor, AggregationContext], torch.Tensor]
AGGREGATION_REGISTRY: Registry[AggregationRule] = Registry("aggregation")


def _check(updates: torch.Tensor) -> None:
    if updates.ndim != 2 or updates.shape[0] == 0:
        raise ValueError(
            f"expected a non-empty [clients, parameters] tensor, got {tuple(updates.shape)}"
        )


def fedavg(updates: torch.Tensor, weights: Sequence[float]) -> torch.Tensor:
    _check(updates)
    w = torch.tensor(weights, dtype=torch.float64)
    if w.shape[0] != updates.shape[0] or bool((w < 0).any()) or float(w.sum()) <= 0:
        raise ValueError("fedavg needs one non-negative weight per update, not all zero")
    w = (w / w.sum()).to(updates.dtype)
    return (w.unsqueeze(1) * updates).sum(dim=0)


def coordinate_median(updates: torch.Tensor) -> torch.Tensor:
    _check(updates)
    ordered, _ = torch.sort(updates, dim=0)
    n = ordered.shape[0]
    if n % 2:
        return ordered[n // 2].clone()
    return (ordered[n // 2 - 1] + ordered[n // 2]) / 2


def trimmed_mean(updates: torch.Tensor, *, beta: float = 0.1) -> torch.Tensor:
    _check(updates)
    if not 0 <= beta < 0.5:
        raise ValueError(f"trim fraction must be in [0, 0.5), got {beta}")
    n = updates.shape[0]
    k = int(beta * n)
    ordered, _ = torch.sort(updates, dim=0)
    return ordered[k : n - k].mean(dim=0)


def krum(updates: torch.Tensor, *, f: int, m: int = 1) -> torch.Tensor:
    _check(updates)
    n = updates.shape[0]
    if n < 2 * f + 3:
        raise ValueError(f"krum with f={f} needs at least {2 * f + 3} updates, got {n}")
    if not 1 <= m <= n:
        raise ValueError(f"multi-krum m must be in 1..{n}, got {m}")
    distances = torch.cdist(updates.double(), updates.double()).pow(2)
    nearest, _ = torch.sort(distances, dim=1)
    # Column 0 is the distance to itself (zero); score over the next n - f - 2.
    scores = nearest[:, 1 : n - f - 1].sum(dim=1)
    best = torch.argsort(scores, stable=True)[:m]
    return updates[best].mean(dim=0)


@AGGREGATION_REGISTRY.register("fedavg")
def _fedavg_rule(updates: torch.Tensor, context: AggregationContext) -> torch.Tensor:
    return fedavg(updates, context.weights)


@AGGREGATION_REGISTRY.register("median")
def _median_rule(updates: torch.Tensor, context: AggregationContext) -> torch.Tensor:
    return coordinate_median(updates)


@AGGREGATION_REGISTRY.register("trimmed-mean")
def _trimmed_mean_rule(updates: torch.Tensor, context: AggregationContext) -> torch.Tensor:
    return trimmed_mean(updates, beta=context.trim_ratio)


@AGGREGATION_REGISTRY.register("krum")
def _krum_rule(updates: torch.Tensor, context: AggregationContext) -> torch.Tensor:
    n = updates.shape[0]
    f = context.krum_f if context.krum_f is not None else max(0, (n - 3) // 2)
    return krum(updates, f=f)


AGGREGATIONS: tuple[str, ...] = AGGREGATION_REGISTRY.names()


def aggregate(
    name: str,
    updates: torch.Tensor,
    *,
    weights: Sequence[float],
    trim_ratio: float = 0.1,
    krum_f: int | None = None,
) -> torch.Tensor:
    """Apply the rule registered as ``name`` (the ``--aggregation`` name)."""
    rule = AGGREGATION_REGISTRY.get(name)
    return rule(updates, AggregationContext(weights, trim_ratio, krum_f))
