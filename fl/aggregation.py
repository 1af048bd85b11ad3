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
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

AGGREGATIONS: tuple[str, ...] = ("fedavg", "median", "trimmed-mean", "krum")


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


def aggregate(
    name: str,
    updates: torch.Tensor,
    *,
    weights: Sequence[float],
    trim_ratio: float = 0.1,
    krum_f: int | None = None,
) -> torch.Tensor:
    """Dispatch by the ``--aggregation`` name."""
    if name == "fedavg":
        return fedavg(updates, weights)
    if name == "median":
        return coordinate_median(updates)
    if name == "trimmed-mean":
        return trimmed_mean(updates, beta=trim_ratio)
    if name == "krum":
        n = updates.shape[0]
        f = krum_f if krum_f is not None else max(0, (n - 3) // 2)
        return krum(updates, f=f)
    raise ValueError(f"unknown aggregation {name!r}; choose one of {', '.join(AGGREGATIONS)}")
